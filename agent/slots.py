"""The two model slots, saved in ``<data_dir>/slots.json``.

A new version goes into the idle slot and, once it passed its self-test, becomes
the current one; the other slot keeps the previous version (its files stay in
``artifacts/``) so the agent can go back to it on its own. The current slot is on
probation until it has served ``activation.probation`` seconds without crossing
the error threshold; until then ``starts`` counts the agent's start-ups with it,
so a model that kills the agent at every start is rolled back too.

A plane-directed move back (a rollback by a rollout or an operator) is final: the
version it leaves is dropped from the slots, so no probation can fall back to the
version the plane withdrew (see ``moves_back``).

``active.json`` keeps naming the current deployment, for tools that read it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Final, Literal

import msgspec

from agent.active import ActiveDeployment, load_active, save_active
from agent.files import write_atomic

log = logging.getLogger(__name__)

FILENAME: Final = "slots.json"
MAX_REJECTED: Final = 32

SlotName = Literal["a", "b"]


class Slots(msgspec.Struct, kw_only=True):
    """Both slots, which one serves, and how its probation goes."""

    a: ActiveDeployment | None = None
    b: ActiveDeployment | None = None
    current: SlotName = "a"
    healthy: bool = True
    starts: int = 0
    # Deployments this device rolled back: a redelivered desired message must not bring them back.
    rejected: list[int] = []

    @property
    def idle(self) -> SlotName:
        return "b" if self.current == "a" else "a"

    @property
    def active(self) -> ActiveDeployment | None:
        return self.a if self.current == "a" else self.b

    @property
    def previous(self) -> ActiveDeployment | None:
        return self.b if self.current == "a" else self.a

    def activated(self, deployment: ActiveDeployment) -> Slots:
        """``deployment`` in the idle slot, now current and on probation; the current one kept as previous."""
        slots = msgspec.structs.replace(self, current=self.idle, healthy=False, starts=1)
        return slots.with_current(deployment)

    def moves_back(self, deployment: ActiveDeployment) -> bool:
        """True when the plane is taking the device back from its current version, not forward.

        Either ``deployment`` runs what the previous slot holds (the device ran it before the
        current one), or it is an older version of the current model. Falling back from it
        to the current version would undo the plane's rollback.
        """
        current, previous = self.active, self.previous
        if current is None:
            return False
        if previous is not None and previous.runs_same_files(deployment):
            return True
        new, now = _version_key(deployment.version), _version_key(current.version)
        return deployment.model == current.model and new is not None and now is not None and new < now

    def switched_back(self, deployment: ActiveDeployment) -> Slots:
        """``deployment`` current and healthy, and the version it replaced dropped: no fallback to it, ever."""
        slots = msgspec.structs.replace(self, current=self.idle, healthy=True, starts=0).with_current(deployment)
        return slots.with_previous(None)

    def relabelled(self, deployment: ActiveDeployment) -> Slots:
        return self.with_current(deployment)

    def with_current(self, deployment: ActiveDeployment) -> Slots:
        if self.current == "a":
            return msgspec.structs.replace(self, a=deployment)
        return msgspec.structs.replace(self, b=deployment)

    def with_previous(self, deployment: ActiveDeployment | None) -> Slots:
        if self.current == "a":
            return msgspec.structs.replace(self, b=deployment)
        return msgspec.structs.replace(self, a=deployment)

    def rolled_back(self) -> Slots:
        """The previous slot current again; the failed deployment remembered as rejected."""
        bad = self.active
        rejected = [*self.rejected, bad.deployment_id][-MAX_REJECTED:] if bad else self.rejected
        return msgspec.structs.replace(self, current=self.idle, healthy=True, starts=0, rejected=rejected)


def _version_key(version: str) -> tuple[int, ...] | None:
    """``"3"`` or ``"1.2.0"`` as numbers to compare; None for anything else."""
    parts = version.split(".")
    if not version or not all(part.isdigit() for part in parts):
        return None
    return tuple(int(part) for part in parts)


def load_slots(data_dir: Path) -> Slots:
    path = data_dir / FILENAME
    try:
        return msgspec.json.decode(path.read_bytes(), type=Slots)
    except FileNotFoundError:
        pass
    except (OSError, msgspec.DecodeError) as exc:
        log.error("slots.unreadable path=%s error=%r", path, str(exc))
    active = load_active(data_dir)  # an agent from before slots: its one model is healthy
    return Slots(a=active) if active else Slots()


def save_slots(data_dir: Path, slots: Slots) -> None:
    write_atomic(data_dir / FILENAME, msgspec.json.encode(slots))
    if slots.active is not None:
        save_active(data_dir, slots.active)
