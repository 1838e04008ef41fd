"""Ed25519 signatures: the plane signs, the agent verifies.

Two things are signed. Each file manifest, as the version is published, over
``manifest.canonical_manifest`` (it binds the file to its model and version). And
every desired message as a whole, as it is built, over ``canonical_desired``: the
device it is for, its deployment, every file manifest, ``inference``, ``selftest``,
``providers``, ``issued_at`` and ``seq``. The agent refuses a desired message with a
``seq`` below the last one it accepted, so an old, validly signed message cannot be
replayed to move a device back to a withdrawn version.

Keys travel as standard base64 of their 32 raw bytes (RFC 8032): the plane's private
key in SIGNING_KEY, its public key in the agent's ``[security] plane_public_key``.
A signature is base64 of its 64 raw bytes. The plane imports this module too, so it
needs nothing beyond ``cryptography``.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Final

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.contract.manifest import canonical_manifest
from agent.contract.wire import Desired, FileManifest

KEY_BYTES = 32


SIGNED_DESIRED_DOMAIN: Final = b"edgefleet-desired-v1\n"


class SignatureError(ValueError):
    """A manifest or desired message that is unsigned, or whose signature does not verify. The text says why."""


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


def canonical_desired(desired: Desired) -> bytes:
    """The bytes a desired message's signature covers: a domain tag, then every field but the
    signature as compact JSON with sorted keys.

    Both sides build it from the decoded message, not from the bytes on the wire, so the
    encoder's field order and spacing do not matter; a field this agent does not know is not
    in its decoded message, so a message from a newer plane that sets one fails to verify
    rather than being half-trusted.
    """
    fields = msgspec.to_builtins(desired)
    fields.pop("signature", None)
    return SIGNED_DESIRED_DOMAIN + json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def sign_desired(key: Ed25519PrivateKey, desired: Desired) -> Desired:
    """``desired`` with its signature set."""
    unsigned = msgspec.structs.replace(desired, signature="")
    signature = base64.b64encode(key.sign(canonical_desired(unsigned))).decode()
    return msgspec.structs.replace(unsigned, signature=signature)


def verify_desired(key: Ed25519PublicKey, desired: Desired) -> None:
    """Raise SignatureError unless ``desired.signature`` is the plane's over this whole message."""
    if not desired.signature:
        raise SignatureError("signature missing: the desired message is unsigned")
    try:
        signature = _raw(desired.signature, "the signature", 64)
    except ValueError as exc:
        raise SignatureError(f"signature unreadable on the desired message: {exc}") from None
    try:
        key.verify(signature, canonical_desired(desired))
    except InvalidSignature:
        raise SignatureError(
            "signature invalid on the desired message: not signed by this plane's key, or the message was altered"
        ) from None


def signed_message(device_id: str, timestamp_ms: int) -> bytes:
    """The bytes a device signs to fetch its broker credentials; the plane checks the same bytes."""
    return f"edgefleet-credentials-v1\n{device_id}\n{timestamp_ms}".encode()
