"""Stage sizes and gate arithmetic of a rollout. No Django here: plain numbers in, verdicts out.

Percentages are exact (``Fraction`` of their decimal text), so a value exactly at a
threshold always lands on the documented side of it: at the boundary a gate passes.
"""

from __future__ import annotations

import enum
import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction

Number = int | float | Decimal | Fraction | str


def exact(value: Number) -> Fraction:
    """``Fraction("0.1")`` is exactly one tenth, where ``Fraction(0.1)`` is not."""
    return value if isinstance(value, Fraction) else Fraction(str(value))


# --- Cohorts and stage sizes ------------------------------------------------------


def cohort_key(rollout_id: int, device_id: str) -> str:
    """A device's place in a rollout's order: stable, and unrelated between rollouts."""
    return hashlib.sha256(f"{rollout_id}:{device_id}".encode()).hexdigest()


def cohort_order(rollout_id: int, device_ids: Iterable[str]) -> list[str]:
    return sorted(device_ids, key=lambda device_id: (cohort_key(rollout_id, device_id), device_id))


@dataclass(frozen=True, slots=True)
class StageSize:
    """How far the rollout reaches by the end of a stage: a percentage of the selection, or a count."""

    percent: Number | None = None
    device_count: int | None = None

    def __post_init__(self) -> None:
        # The arithmetic's preconditions, not the rules a user meets: RolloutStage.clean() refuses
        # such a stage, with a message naming it, before it is saved.
        if (self.percent is None) == (self.device_count is None):
            raise ValueError("a stage size is a percentage or a device count, not both or neither")
        if self.percent is not None and not 0 < exact(self.percent) <= 100:
            raise ValueError("a stage percentage is more than 0 and at most 100")
        if self.device_count is not None and self.device_count < 1:
            raise ValueError("a stage reaches at least one device")

    def raw(self, fleet: int) -> int:
        if self.device_count is not None:
            return self.device_count
        # Round up: a percentage of a non-empty fleet never means zero devices.
        return math.ceil(exact(self.percent) * fleet / 100)  # type: ignore[arg-type]  # percent is set here


def cumulative_targets(fleet: int, sizes: Sequence[StageSize]) -> list[int]:
    """How many devices run the new version once each stage is reached; never more than the fleet.

    Each stage reaches at least one device more than the one before, while devices remain,
    so no stage is empty because its percentage rounded down.
    """
    targets: list[int] = []
    reached = 0
    for size in sizes:
        reached = min(fleet, max(size.raw(fleet), reached + 1))
        targets.append(reached)
    return targets


# --- Gates ------------------------------------------------------------------------


class Verdict(enum.StrEnum):
    PASS = "pass"
    FAIL = "fail"
    # Not enough to judge: it holds the stage and never lets it pass.
    INCONCLUSIVE = "inconclusive"
    # Still waiting for devices to finish.
    WAITING = "waiting"


@dataclass(frozen=True, slots=True)
class StageCounts:
    """Where a stage's devices are; ``ineligible`` ones are neither successes nor failures."""

    targeted: int = 0
    pending: int = 0
    downloading: int = 0
    verifying: int = 0
    active: int = 0
    failed: int = 0
    rolled_back: int = 0
    ineligible: int = 0
    # Sent back to their previous version by the rollout's own rollback, whatever state they reached.
    sent_back: int = 0

    @property
    def eligible(self) -> int:
        return self.targeted - self.ineligible

    @property
    def finished(self) -> int:
        return self.active + self.failed + self.rolled_back

    @property
    def failures(self) -> int:
        return self.failed + self.rolled_back


@dataclass(frozen=True, slots=True)
class GateResult:
    gate: str
    verdict: Verdict
    value: float | None
    threshold: float | None
    detail: str

    def as_dict(self) -> dict:
        return {
            "gate": self.gate,
            "verdict": str(self.verdict),
            "value": self.value,
            "threshold": self.threshold,
            "detail": self.detail,
        }


def _percent(part: int, whole: int) -> float | None:
    return round(100 * part / whole, 2) if whole else None


def success_gate(counts: StageCounts, min_active_percent: Number) -> GateResult:
    """Pass once at least X% of the stage's eligible devices are active on the new version."""
    threshold = exact(min_active_percent)
    value = _percent(counts.active, counts.eligible)
    if counts.eligible == 0:
        return GateResult("success", Verdict.PASS, value, float(threshold), "no eligible device in this stage")
    passed = counts.active * 100 >= threshold * counts.eligible
    detail = f"{counts.active} of {counts.eligible} eligible devices active"
    return GateResult("success", Verdict.PASS if passed else Verdict.WAITING, value, float(threshold), detail)


def failure_gate(counts: StageCounts, max_failed_percent: Number, min_finished: int) -> GateResult:
    """Fail when failed plus rolled-back devices exceed Y% of the finished ones.

    Judged only once ``min_finished`` devices have finished (AWS's minimum of executed
    things), or all eligible devices have, when the stage is smaller than that.
    """
    threshold = exact(max_failed_percent)
    needed = max(1, min(min_finished, counts.eligible))
    value = _percent(counts.failures, counts.finished)
    detail = f"{counts.failures} of {counts.finished} finished devices failed or rolled back"
    if counts.eligible == 0 or counts.finished < needed:
        return GateResult("failure", Verdict.WAITING, value, float(threshold), f"{detail}; judged from {needed}")
    tripped = counts.failures * 100 > threshold * counts.finished
    return GateResult("failure", Verdict.FAIL if tripped else Verdict.PASS, value, float(threshold), detail)


@dataclass(frozen=True, slots=True)
class Inference:
    """Inference telemetry summed over heartbeats: calls, errors, latency samples and their p95s."""

    requests: int = 0
    errors: int = 0
    samples: int = 0
    # Sum over heartbeats of p95 × latency count; divided by ``samples`` it is a weighted mean p95.
    p95_weighted_sum: Number = 0

    @property
    def p95_ms(self) -> Fraction | None:
        return exact(self.p95_weighted_sum) / self.samples if self.samples else None

    @property
    def error_rate(self) -> Fraction | None:
        return Fraction(self.errors, self.requests) if self.requests else None


@dataclass(frozen=True, slots=True)
class Generation:
    """Generation telemetry summed over heartbeats: chat completions, with TTFT p95 and decode
    tok/s each weighted by the completions of its heartbeat."""

    requests: int = 0
    errors: int = 0
    ttft_p95_weighted_sum: Number = 0
    tps_weighted_sum: Number = 0

    @property
    def ttft_p95_ms(self) -> Fraction | None:
        return exact(self.ttft_p95_weighted_sum) / self.requests if self.requests else None

    @property
    def decode_tps(self) -> Fraction | None:
        return exact(self.tps_weighted_sum) / self.requests if self.requests else None


def generation_gate(
    candidate: Generation,
    baseline: Generation,
    *,
    max_ttft_ratio: Number | None,
    min_tps_ratio: Number | None,
    min_samples: int,
) -> GateResult:
    """Pass when TTFT p95 ≤ ratio × baseline and decode tok/s ≥ ratio × baseline (each if set);
    fewer than ``min_samples`` completions on either side is inconclusive. The value is the
    TTFT ratio when that is judged, else the tok/s ratio."""
    ttft_limit = exact(max_ttft_ratio) if max_ttft_ratio is not None else None
    tps_floor = exact(min_tps_ratio) if min_tps_ratio is not None else None
    threshold = float(ttft_limit if ttft_limit is not None else tps_floor or 0)
    if candidate.requests < min_samples or baseline.requests < min_samples:
        detail = (
            f"{candidate.requests} completions on the new version, {baseline.requests} on the baseline; "
            f"need {min_samples}"
        )
        return GateResult("generation", Verdict.INCONCLUSIVE, None, threshold, detail)
    cand_ttft, base_ttft = candidate.ttft_p95_ms or Fraction(0), baseline.ttft_p95_ms or Fraction(0)
    cand_tps, base_tps = candidate.decode_tps or Fraction(0), baseline.decode_tps or Fraction(0)
    ttft_ratio = float(cand_ttft / base_ttft) if base_ttft else (1.0 if cand_ttft == 0 else math.inf)
    tps_ratio = float(cand_tps / base_tps) if base_tps else 1.0
    slow_start = ttft_limit is not None and cand_ttft > ttft_limit * base_ttft
    slow_decode = tps_floor is not None and cand_tps < tps_floor * base_tps
    parts = []
    if ttft_limit is not None:
        parts.append(
            f"TTFT p95 {float(cand_ttft):.1f} ms vs baseline {float(base_ttft):.1f} ms (at most ×{float(ttft_limit)})"
        )
    if tps_floor is not None:
        parts.append(f"decode {float(cand_tps):.1f} tok/s vs {float(base_tps):.1f} (at least ×{float(tps_floor)})")
    detail = "; ".join(parts) + f"; {candidate.requests} completions"
    value = ttft_ratio if ttft_limit is not None else tps_ratio
    verdict = Verdict.FAIL if slow_start or slow_decode else Verdict.PASS
    return GateResult("generation", verdict, value, threshold, detail)


def health_gate(
    candidate: Inference,
    baseline: Inference,
    *,
    max_p95_ratio: Number,
    max_error_rate_points: Number,
    min_samples: int,
) -> GateResult:
    """Pass when p95 ≤ ratio × baseline p95 and error rate ≤ baseline + points; too few samples is inconclusive."""
    ratio, points = exact(max_p95_ratio), exact(max_error_rate_points)
    if candidate.samples < min_samples or baseline.samples < min_samples or not candidate.requests:
        detail = (
            f"{candidate.samples} samples on the new version, {baseline.samples} on the baseline; need {min_samples}"
        )
        return GateResult("health", Verdict.INCONCLUSIVE, None, float(ratio), detail)
    # Both sides have samples, so both have a p95 and (requests ≥ samples) an error rate.
    cand_p95, base_p95 = candidate.p95_ms or Fraction(0), baseline.p95_ms or Fraction(0)
    cand_err, base_err = candidate.error_rate, baseline.error_rate or Fraction(0)
    p95_ratio = float(cand_p95 / base_p95) if base_p95 else (1.0 if cand_p95 == 0 else math.inf)
    slow = cand_p95 > ratio * base_p95
    erring = cand_err is not None and cand_err > base_err + points / 100
    detail = (
        f"p95 {float(cand_p95):.2f} ms vs baseline {float(base_p95):.2f} ms (at most ×{float(ratio)}); "
        f"error rate {float(cand_err or 0) * 100:.2f}% vs {float(base_err) * 100:.2f}% "
        f"(at most +{float(points)} points); {candidate.samples} samples on the new version, "
        f"{baseline.samples} on the baseline"
    )
    return GateResult("health", Verdict.FAIL if slow or erring else Verdict.PASS, p95_ratio, float(ratio), detail)
