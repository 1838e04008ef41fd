"""Ed25519 signatures over file manifests: the plane signs, the agent verifies.

Keys travel as standard base64 of their 32 raw bytes (RFC 8032): the plane's private
key in SIGNING_KEY, its public key in the agent's ``[security] plane_public_key``.
A signature is base64 of its 64 raw bytes over ``manifest.canonical_manifest``.
The plane imports this module too, so it needs nothing beyond ``cryptography``.
"""

from __future__ import annotations

import base64
import binascii

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.manifest import canonical_manifest
from agent.wire import FileManifest

KEY_BYTES = 32


class SignatureError(ValueError):
    """A manifest that is unsigned, or whose signature does not verify. The text says which file and why."""


def _raw(text: str, what: str, length: int) -> bytes:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{what} is not base64") from None
    if len(raw) != length:
        raise ValueError(f"{what} is {len(raw)} bytes once decoded, not {length}")
    return raw


def load_private_key(text: str) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(_raw(text, "the private key", KEY_BYTES))


def load_public_key(text: str) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(_raw(text, "the public key", KEY_BYTES))


def generate_private_key() -> str:
    return private_key_text(Ed25519PrivateKey.generate())


def private_key_text(key: Ed25519PrivateKey) -> str:
    return base64.b64encode(key.private_bytes_raw()).decode()


def public_key_text(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return base64.b64encode(public.public_bytes_raw()).decode()


def sign_manifest(key: Ed25519PrivateKey, file: FileManifest, *, model: str, version: str) -> str:
    return base64.b64encode(key.sign(canonical_manifest(file, model=model, version=version))).decode()


def verify_manifest(key: Ed25519PublicKey, file: FileManifest, *, model: str, version: str) -> None:
    """Raise SignatureError unless ``file.signature`` is the plane's over this manifest."""
    if not file.signature:
        raise SignatureError(f"signature missing: the {file.role} file {file.filename!r} is unsigned")
    try:
        signature = _raw(file.signature, "the signature", 64)
    except ValueError as exc:
        raise SignatureError(f"signature unreadable on the {file.role} file {file.filename!r}: {exc}") from None
    try:
        key.verify(signature, canonical_manifest(file, model=model, version=version))
    except InvalidSignature:
        raise SignatureError(
            f"signature invalid on the {file.role} file {file.filename!r}: not signed by this plane's key, "
            "or the manifest was altered"
        ) from None
