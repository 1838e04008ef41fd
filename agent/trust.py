"""Which desired messages the agent acts on: signed by its plane, for this device, and not older
than the last one it accepted.

The last accepted ``seq`` is kept in ``<data_dir>/desired.json`` (written and fsynced before the
agent acts on the message), so a restart does not reopen the door to a replayed old message.
Without a plane key the agent refuses every deployment, unless the config says
``allow_unsigned = true`` (development only; it is warned about loudly).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Final

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.contract import signing, wire
from agent.files import write_atomic

log = logging.getLogger(__name__)

FILENAME: Final = "desired.json"
NO_KEY: Final = (
    "signature required: this agent has no security.plane_public_key and security.allow_unsigned is "
    "not true, so it refuses every deployment. Set plane_public_key (GET /api/v1/signing-key/)"
)


class Refused(ValueError):
    """A desired message the agent will not act on. The text says why."""


class Stale(Refused):
    """A desired message older than one already accepted: a replay, or a reordered delivery."""


class LastAccepted(msgspec.Struct, kw_only=True):
    """The newest desired message the agent acted on."""

    seq: int
    issued_at: float
    deployment_id: int | None


class DesiredTrust:
    """Vets desired messages for one device; ``accept`` records the one it acts on."""

    def __init__(self, data_dir: Path, device_id: str, key: Ed25519PublicKey | None, *, allow_unsigned: bool) -> None:
        self.path = data_dir / FILENAME
        self.device_id = device_id
        self.key = key
        self.allow_unsigned = allow_unsigned
        self.last = self._load()

    @property
    def verifies(self) -> bool:
        return self.key is not None

    def check(self, desired: wire.Desired) -> None:
        """Raise Refused (Stale for a replay) unless the agent may act on ``desired``."""
        if desired.device_id != self.device_id:
            raise Refused(f"the desired message is for device {desired.device_id!r}, not this one")
        if self.key is not None:
            signing.verify_desired(self.key, desired)  # SignatureError is a ValueError: callers catch both
        elif not self.allow_unsigned:
            raise Refused(NO_KEY)
        if self.last is not None and desired.seq < self.last.seq:
            raise Stale(
                f"desired message seq {desired.seq} (issued at {desired.issued_at:.3f}) is older than "
                f"seq {self.last.seq}, accepted already: a replay, or a late delivery"
            )

    def accept(self, desired: wire.Desired) -> None:
        if self.last is not None and desired.seq == self.last.seq:
            return  # the same message again, e.g. redelivered on reconnect
        self.last = LastAccepted(seq=desired.seq, issued_at=desired.issued_at, deployment_id=desired.deployment_id)
        write_atomic(self.path, msgspec.json.encode(self.last))

    def _load(self) -> LastAccepted | None:
        try:
            return msgspec.json.decode(self.path.read_bytes(), type=LastAccepted)
        except FileNotFoundError:
            return None
        except (OSError, msgspec.DecodeError) as exc:
            # Fail closed would brick the device until someone deletes the file; the plane's next
            # message is still checked for its signature, and only replays of old ones get through.
            log.error("trust.unreadable path=%s error=%r: the replay check starts over", self.path, str(exc))
            return None
