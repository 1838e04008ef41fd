"""The plane's Ed25519 signing key, and signing with it: an artifact's manifest, and each desired message.

The key comes from settings.SIGNING_KEY (or SIGNING_KEY_FILE). In development, with no
key set, the plane generates one on first use and keeps it in SIGNING_KEY_DEV_FILE, so
the demo signs without any setup; agents verify with the public key (GET /api/v1/signing-key/).
"""

from __future__ import annotations

import functools
import os
import threading
from pathlib import Path

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from agent.contract import signing, wire


def signing_key() -> Ed25519PrivateKey:
    return _load(_key_text())


def public_key() -> str:
    return signing.public_key_text(signing_key())


def sign_file(file: wire.FileManifest, *, model: str, version: str) -> str:
    return signing.sign_manifest(signing_key(), file, model=model, version=version)


def sign_desired(desired: wire.Desired) -> wire.Desired:
    """``desired`` with the next ``seq`` and the plane's signature over the whole message.

    The agent refuses a desired message whose ``seq`` is below the last it accepted, so seq
    must grow for each device: it is the issue time in microseconds, and never repeats or
    goes back within this process even if two messages are built in the same microsecond.
    """
    seq = _next_seq(desired.issued_at)
    return signing.sign_desired(signing_key(), msgspec.structs.replace(desired, seq=seq))


_seq_lock = threading.Lock()
_last_seq = 0


def _next_seq(issued_at: float) -> int:
    global _last_seq
    with _seq_lock:
        _last_seq = max(int(issued_at * 1_000_000), _last_seq + 1)
        return _last_seq


def write_key_file(path: Path) -> str:
    """Write a new private key to ``path`` (owner-only) and return it; refuse to overwrite."""
    text = signing.generate_private_key()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as stream:
        stream.write(text + "\n")
    return text


@functools.lru_cache(maxsize=4)
def _load(text: str) -> Ed25519PrivateKey:
    try:
        return signing.load_private_key(text)
    except ValueError as exc:
        raise ImproperlyConfigured(f"SIGNING_KEY (or SIGNING_KEY_FILE): {exc}") from None


def _key_text() -> str:
    if settings.SIGNING_KEY:
        return settings.SIGNING_KEY
    path = settings.SIGNING_KEY_DEV_FILE
    if path is None:
        raise ImproperlyConfigured(
            "SIGNING_KEY (or SIGNING_KEY_FILE) must be set when DEBUG is false: "
            "run `manage.py generate_signing_key` to make one"
        )
    path = Path(path)
    try:
        return write_key_file(path)
    except FileExistsError:
        # Made by an earlier run, or by another process (web, worker) just now.
        return path.read_text().strip()
