"""How ``edgefleet rollouts watch`` decides a rollout's outcome from its progress answers.

Exit codes, for pipelines:

- 0: the rollout completed;
- 1: it rolled back or was aborted (or the CLI failed: unreachable plane, refused token);
- 3: it is held past its deadline: the plane says so (the stage's status is
  ``held_past_deadline``, after its ``inconclusive_timeout``), or the current stage's soak is
  over, a gate neither passes nor fails (``inconclusive`` health, or devices still
  ``waiting``), and nothing moved for ``hold_timeout`` seconds;
- 4: ``--timeout`` passed while it was still running.

The plane's deadline is the stage's ``inconclusive_timeout`` (default an hour). The client-side
rule is for a shorter wait in a pipeline: its clock restarts whenever the stage or its device
counts change.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

COMPLETED, FAILED, HELD, TIMED_OUT = 0, 1, 3, 4
OUTCOMES = {COMPLETED: "completed", FAILED: "failed", HELD: "held", TIMED_OUT: "timed_out"}
HOLDING_VERDICTS = ("inconclusive", "waiting")


@dataclass
class Verdict:
    code: int
    message: str

    @property
    def outcome(self) -> str:
        return OUTCOMES[self.code]


class Watch:
    """Fed one progress answer at a time; says when to stop and with which code."""

    def __init__(
        self, *, timeout: float | None, hold_timeout: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.clock = clock
        self.deadline = clock() + timeout if timeout else None
        self.timeout = timeout
        self.hold_timeout = hold_timeout
        self.hold_key: tuple[Any, ...] | None = None
        self.held_since: float | None = None
        self.failing_since: float | None = None

    def give_up_on_errors(self) -> bool:
        """After a failed poll: stop at the deadline, or once polls have failed for ``hold_timeout``."""
        now = self.clock()
        self.failing_since = self.failing_since if self.failing_since is not None else now
        past_deadline = self.deadline is not None and now >= self.deadline
        return past_deadline or now - self.failing_since >= self.hold_timeout

    def observe(self, progress: dict[str, Any]) -> Verdict | None:
        self.failing_since = None
        state = progress["state"]
        if state == "completed":
            return Verdict(COMPLETED, "the rollout completed")
        if state in ("rolled_back", "aborted"):
            reason = progress.get("reason") or "no reason given"
            return Verdict(FAILED, f"the rollout was {state.replace('_', ' ')}: {reason}")
        stage = current_stage(progress)
        if state == "running" and stage is not None and stage["status"] == "held_past_deadline":
            hold = stage.get("hold") or {}
            return Verdict(
                HELD,
                f"stage {stage['index'] + 1} ({stage['name']}) is held past its deadline "
                f"({hold.get('expired_at') or hold.get('deadline')}): {hold.get('reason') or 'a gate cannot judge'}",
            )
        now = self.clock()
        held = holding_gates(progress)
        if held:
            stage = current_stage(progress)
            assert stage is not None
            key = (stage["index"], tuple(sorted(stage["counts"].items())))
            if key != self.hold_key:
                self.hold_key, self.held_since = key, now
            elif self.held_since is not None and now - self.held_since >= self.hold_timeout:
                gates = ", ".join(f"{g['gate']} {g['verdict']} ({g['detail']})" for g in held)
                return Verdict(
                    HELD,
                    f"stage {stage['index'] + 1} ({stage['name']}) has been held for {now - self.held_since:.0f} s "
                    f"with its soak over: {gates}",
                )
        else:
            self.hold_key = self.held_since = None
        if self.deadline is not None and now >= self.deadline:
            return Verdict(TIMED_OUT, f"the rollout is still {state} after the {self.timeout:.0f} s timeout")
        return None


def current_stage(progress: dict[str, Any]) -> dict[str, Any] | None:
    index = progress.get("current_stage")
    return next((s for s in progress["stages"] if s["index"] == index), None)


def holding_gates(progress: dict[str, Any]) -> list[dict[str, Any]]:
    """The gates holding a running stage whose soak is over (none while it soaks or moves on)."""
    stage = current_stage(progress)
    if progress["state"] != "running" or stage is None or stage["status"] not in ("running", "held"):
        return []
    soak = stage.get("soak_remaining_s")
    if soak is None or soak > 0:
        return []
    return [gate for gate in stage["gates"] if gate["verdict"] in HOLDING_VERDICTS]
