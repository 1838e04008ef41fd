"""Rollouts: a version released stage by stage, each stage gated on install outcomes and on-device health.

Every transition is a compare-and-swap on the rollout's state with an audit record.
Devices are assigned through assignments.assign_version, so they hear of it only after
commit. The evaluator (``evaluate_rollout``) is the one place where a running rollout
moves on its own: it assigns a stage's devices, judges the stage's gates, and passes,
holds, completes or rolls back.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial

from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Count, Exists, F, FloatField, OuterRef, Q, QuerySet, Sum
from django.db.models.functions import Coalesce
from django.utils import timezone

from fleet.choices import (
    ACTIVE_ROLLOUT_STATES,
    OPEN_DEPLOYMENT_STATES,
    DeploymentState,
    EnrollmentState,
    HoldAction,
    RolloutBaseline,
    RolloutState,
)
from fleet.errors import ServiceError
from fleet.lib import gates
from fleet.lib.gates import GateResult
from fleet.lib.humanize import plural
from fleet.models import (
    Alias,
    Deployment,
    Device,
    Heartbeat,
    ModelVersion,
    Rollout,
    RolloutDevice,
    RolloutStage,
)
from fleet.services import assignments, desired, notifications
from fleet.services import stages as stage_rules
from fleet.services.audit import Actor, acting_user, record

log = logging.getLogger(__name__)

# How far back the previous-version baseline reaches before a device took the new version.
BASELINE_WINDOW = timedelta(hours=1)
RATE_WINDOW = timedelta(minutes=1)
FINISHED_STATES = (RolloutState.COMPLETED, RolloutState.ABORTED, RolloutState.ROLLED_BACK)


class RolloutError(ServiceError):
    """A rollout change the current state does not allow; the text says why."""


class RolloutConflict(RolloutError):
    """Devices this rollout selects already belong to another running or paused rollout."""


# action -> (states it may start from, state it leads to)
_TRANSITIONS: dict[str, tuple[tuple[str, ...], str]] = {
    "start": ((RolloutState.DRAFT,), RolloutState.RUNNING),
    "pause": ((RolloutState.RUNNING,), RolloutState.PAUSED),
    "resume": ((RolloutState.PAUSED,), RolloutState.RUNNING),
    "complete": ((RolloutState.RUNNING,), RolloutState.COMPLETED),
    "abort": ((RolloutState.DRAFT, RolloutState.RUNNING, RolloutState.PAUSED), RolloutState.ABORTED),
    "rollback": ((RolloutState.RUNNING, RolloutState.PAUSED, RolloutState.ABORTED), RolloutState.ROLLED_BACK),
}


# --- Creating ------------------------------------------------------------------------


def create_rollout(
    version: ModelVersion | None,
    *,
    stages: list[dict],
    actor: Actor,
    name: str = "",
    tags: Iterable[str] = (),
    device_ids: Iterable[str] = (),
    hardware_class: str = "",
    baseline: str = RolloutBaseline.PREVIOUS_VERSION,
    max_per_minute: int = 1000,
    alias: Alias | None = None,
) -> Rollout:
    """A draft rollout; nothing reaches a device before it starts. ``stages`` hold RolloutStage fields.

    Given an ``alias``, the rollout follows it: ``version`` is where it points now, and
    start_rollout resolves it again and records the version it settled on.
    """
    if alias is not None:
        if version is not None and version.pk != alias.version_id:
            raise RolloutError(f"{alias} points at {alias.version.label}, not {version.label}; give one or the other.")
        version = alias.version
    if version is None:
        raise RolloutError("A rollout targets a version or an alias.")
    if not version.is_published:
        raise RolloutError(
            f"Version {version.pk} is not published ({version.label} is {version.status}): only a published "
            "version can be rolled out."
        )
    user = acting_user(actor)
    with transaction.atomic():
        rollout = Rollout(
            name=name,
            version=version,
            alias=alias,
            selector_tags=sorted(set(tags)),
            selector_device_ids=sorted(set(device_ids)),
            selector_hardware_class=hardware_class,
            baseline=baseline,
            max_per_minute=max_per_minute,
            created_by=user,
        )
        rows = _check_new(rollout, stages)
        rollout.save()
        RolloutStage.objects.bulk_create(rows)  # each row takes the rollout's id now that it has one
        record(
            actor,
            "rollout.created",
            rollout,
            after={"version": version.label, "alias": alias and str(alias), "stages": len(rows)},
        )
    return rollout


def _check_new(rollout: Rollout, stages: list[dict]) -> list[RolloutStage]:
    """The rollout's stages, built and checked with the rollout's own rules.

    Every broken rule at once (the admin shows them together), then whether the sizes grow.
    """
    problems: dict = {}
    unknown = _unknown_devices(rollout.selector_device_ids)
    if unknown:
        problems["selector"] = [unknown]
    try:
        rollout.full_clean()
    except ValidationError as exc:
        problems = exc.update_error_dict(problems)
    try:
        rows = stage_rules.build_stages(rollout, stages)
    except ValidationError as exc:
        problems = exc.update_error_dict(problems)
    if problems:
        raise ValidationError(problems)
    stage_rules.check_sizes_grow(rows)
    return rows


def _unknown_devices(device_ids: list[str]) -> str:
    """A selector naming a device the fleet does not have is a typo, not an empty selection."""
    known = set(Device.objects.filter(device_id__in=device_ids).values_list("device_id", flat=True))
    unknown = [device_id for device_id in device_ids if device_id not in known]
    if not unknown:
        return ""
    more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
    return f"No device has the id {', '.join(unknown[:10])}{more}."


# --- Selection and conflicts ---------------------------------------------------------


def selected_devices(rollout: Rollout) -> QuerySet[Device]:
    """The devices the rollout's selector names now: by tag or id, within the hardware class."""
    match = Q(pk__in=[])
    if rollout.selector_tags:
        match |= Q(tags__name__in=rollout.selector_tags)
    if rollout.selector_device_ids:
        match |= Q(device_id__in=rollout.selector_device_ids)
    # Only devices that may speak: a pending or decommissioned device never reports, so a stage
    # counting it would never pass.
    devices = Device.objects.filter(match, enrollment=EnrollmentState.ACCEPTED)
    if rollout.selector_hardware_class:
        devices = devices.filter(hardware_class=rollout.selector_hardware_class)
    return devices.distinct()


def _other_active(rollout: Rollout) -> QuerySet[Rollout]:
    return Rollout.objects.filter(state__in=ACTIVE_ROLLOUT_STATES).exclude(pk=rollout.pk)


def conflicts(rollout: Rollout) -> dict[str, int]:
    """Device id -> the other running or paused rollout that selects it or has it already."""
    mine = dict(selected_devices(rollout).values_list("pk", "device_id"))
    found: dict[str, int] = {}
    for other in _other_active(rollout).order_by("pk"):
        theirs = set(selected_devices(other).values_list("pk", flat=True))
        theirs |= set(other.members.values_list("device_id", flat=True))
        for pk in theirs & set(mine):
            found.setdefault(mine[pk], other.pk)
    return found


# --- Transitions ---------------------------------------------------------------------


def _transition(
    rollout: Rollout, action: str, *, actor: Actor, reason: str = "", gate_values: dict | None = None, **updates
) -> Rollout:
    """Compare-and-swap the state for ``action``, audit it; the caller holds the transaction."""
    allowed, new = _TRANSITIONS[action]
    current = Rollout.objects.select_related("version__model").get(pk=rollout.pk)
    if current.state not in allowed:
        raise RolloutError(
            f"Rollout {current.pk} is {current.state}; {action} applies only to a rollout that is "
            f"{' or '.join(allowed)}."
        )
    now = timezone.now()
    if new in FINISHED_STATES:
        updates.setdefault("finished_at", now)
        if gate_values is None:
            gate_values = _current_gate_values(current, now=now)
        # The final verdicts, in the rollout and on the stage that was judged, so both say the same.
        current.stages.filter(index=current.current_stage, started_at__isnull=False).update(final_gates=gate_values)
        notifications.notify_rollout_finished(current, new, reason=reason)
    if action in ("rollback", "abort", "complete"):
        updates.setdefault("reason", reason)
        updates.setdefault("gates", gate_values or {})
    changed = Rollout.objects.filter(pk=current.pk, state=current.state).update(state=new, **updates)
    if changed != 1:
        raise RolloutError(f"Rollout {current.pk} changed meanwhile; look again and retry.")
    record(
        actor,
        f"rollout.{action}",
        current,
        before={"state": current.state, "stage": current.current_stage},
        after={"state": new, "stage": updates.get("current_stage", current.current_stage), "gates": gate_values},
        reason=reason,
    )
    current.refresh_from_db()
    return current


def _current_gate_values(rollout: Rollout, *, now: datetime) -> dict:
    stage = rollout.stages.filter(index=rollout.current_stage, started_at__isnull=False).first()
    if stage is None:
        return {}
    return {g.gate: g.as_dict() for g in stage_progress(rollout, stage, now=now).gates}


def _lock(rollout: Rollout) -> Rollout:
    # Lock the rollout: an operator's action and the evaluator (beat task or a device report)
    # would otherwise both read one state and act on it, e.g. both assign the next stage.
    return Rollout.objects.select_for_update().get(pk=rollout.pk)


def start_rollout(rollout: Rollout, *, actor: Actor, supersede: bool = False, reason: str = "") -> Rollout:
    """Start a draft: refused while another active rollout has its devices, unless it supersedes them."""
    with transaction.atomic():
        locked = _lock(rollout)
        # Lock the selected devices too: two rollouts starting at once over the same devices
        # would otherwise each see no conflict.
        list(
            Device.objects.select_for_update()
            .filter(pk__in=selected_devices(locked).values("pk"))
            .order_by("pk")
            .values("pk")
        )
        found = conflicts(locked)
        if found and not supersede:
            names = ", ".join(f"{device_id} (rollout {other})" for device_id, other in sorted(found.items())[:10])
            more = f" and {len(found) - 10} more" if len(found) > 10 else ""
            raise RolloutConflict(
                f"{plural(len(found), 'selected device')} belong{'s' if len(found) == 1 else ''} to another "
                f"running or paused rollout: {names}{more}. "
                "Finish or abort that rollout first, or start this one with supersede to abort it."
            )
        for other_pk in sorted(set(found.values())):
            other = Rollout.objects.select_for_update().get(pk=other_pk)
            _transition(other, "abort", actor=actor, reason=f"superseded by rollout {locked.pk}")
        _resolve_alias(locked, actor=actor)
        now = timezone.now()
        started = _transition(
            locked, "start", actor=actor, reason=reason, started_at=now, current_stage=0, stage_started_at=now
        )
        started.stages.filter(index=0).update(started_at=now)
        _evaluate_locked(started, now=now)
    return _fresh(rollout)


def _resolve_alias(rollout: Rollout, *, actor: Actor) -> None:
    """Pin a rollout that follows an alias to the version the alias names as it starts."""
    if rollout.alias_id is None:
        return
    # Lock the alias: a move landing between this read and the first assignment would
    # otherwise start the rollout on a version the audit record does not name.
    alias = Alias.objects.select_for_update().select_related("version__model").get(pk=rollout.alias_id)
    record(
        actor,
        "rollout.alias_resolved",
        rollout,
        before={"version": rollout.version.label},
        after={"alias": str(alias), "version": alias.version.label},
    )
    if alias.version_id != rollout.version_id:
        Rollout.objects.filter(pk=rollout.pk, state=RolloutState.DRAFT).update(version=alias.version)
        rollout.version = alias.version


def pause_rollout(rollout: Rollout, *, actor: Actor, reason: str = "") -> Rollout:
    """Stop assigning and stop judging gates; devices keep what they have."""
    with transaction.atomic():
        _transition(_lock(rollout), "pause", actor=actor, reason=reason)
    return _fresh(rollout)


def resume_rollout(rollout: Rollout, *, actor: Actor, reason: str = "") -> Rollout:
    with transaction.atomic():
        _evaluate_locked(_transition(_lock(rollout), "resume", actor=actor, reason=reason), now=timezone.now())
    return _fresh(rollout)


def promote_rollout(rollout: Rollout, *, actor: Actor, reason: str = "") -> Rollout:
    """Skip the rest of the current stage's soak; its gates must still pass."""
    with transaction.atomic():
        locked = _lock(rollout)
        if locked.state != RolloutState.RUNNING:
            raise RolloutError(f"Rollout {locked.pk} is {locked.state}; only a running rollout can be promoted.")
        changed = Rollout.objects.filter(pk=locked.pk, state=RolloutState.RUNNING).update(soak_skipped=True)
        if changed != 1:
            raise RolloutError(f"Rollout {locked.pk} changed meanwhile; look again and retry.")
        record(
            actor,
            "rollout.promote",
            locked,
            before={"stage": locked.current_stage, "soak_skipped": locked.soak_skipped},
            after={"stage": locked.current_stage, "soak_skipped": True},
            reason=reason,
        )
        locked.refresh_from_db()
        stage = locked.current_stage
        blocked = _evaluate_locked(locked, now=timezone.now())
        locked.refresh_from_db()
        if blocked and locked.state == RolloutState.RUNNING and locked.current_stage == stage:
            # Refused as a whole: the operator sees why, and nothing is recorded as promoted.
            raise RolloutError(f"Promote skips only the soak; {blocked}")
    return _fresh(rollout)


def abort_rollout(rollout: Rollout, *, actor: Actor, reason: str = "") -> Rollout:
    """Stop for good; devices keep what they have. Roll back afterwards to undo the stages."""
    with transaction.atomic():
        _transition(_lock(rollout), "abort", actor=actor, reason=reason or "aborted by an operator")
    return _fresh(rollout)


def rollback_rollout(rollout: Rollout, *, actor: Actor, reason: str = "", gate_values: dict | None = None) -> Rollout:
    """Send every device the rollout reached back to the version it ran before."""
    with transaction.atomic():
        locked = _transition(
            _lock(rollout),
            "rollback",
            actor=actor,
            reason=reason or "rolled back by an operator",
            gate_values=gate_values,
        )
        _send_back(locked, actor=actor)
    return _fresh(rollout)


def _fresh(rollout: Rollout) -> Rollout:
    return Rollout.objects.select_related("version__model", "created_by").get(pk=rollout.pk)


def _send_back(rollout: Rollout, *, actor: Actor) -> None:
    """New deployments of each member's previous version; members that ran nothing get nothing."""
    members = list(
        rollout.members.filter(deployment__isnull=False, rollback_deployment__isnull=True)
        .exclude(deployment__state__in=[DeploymentState.INELIGIBLE, DeploymentState.SUPERSEDED])
        .select_related("device", "previous_version__model", "deployment")
    )
    by_version: dict[ModelVersion | None, list[RolloutDevice]] = defaultdict(list)
    for member in members:
        by_version[member.previous_version].append(member)
    why = f"rollback of rollout {rollout.pk}"
    for version, group in by_version.items():
        if version is None:
            # Nothing to go back to: the deployment is withdrawn and the device told to run nothing new.
            # One that failed, or that the device already left, keeps saying so.
            Deployment.objects.filter(
                pk__in=[m.deployment_id for m in group], state__in=[*OPEN_DEPLOYMENT_STATES, DeploymentState.ACTIVE]
            ).update(state=DeploymentState.SUPERSEDED)
            pks = [m.device_id for m in group]
            transaction.on_commit(partial(desired.enqueue_desired, pks))
            continue
        result = assignments.assign_version(version, [m.device for m in group], actor=actor, reason=why)
        made = {d.device_id: d for d in result.deployments}
        for member in group:
            member.rollback_deployment = made.get(member.device_id)
        RolloutDevice.objects.bulk_update(group, ["rollback_deployment"])


# --- The evaluator -------------------------------------------------------------------


def evaluate_rollout(rollout_id: int, *, now: datetime | None = None) -> Rollout | None:
    """Assign, judge the gates, and pass, hold, complete or roll back. Safe to call any time."""
    with transaction.atomic():
        # Lock the rollout: the beat task and report-triggered evaluations run concurrently
        # and would both assign the same stage or both advance it.
        rollout = Rollout.objects.select_for_update().filter(pk=rollout_id, state=RolloutState.RUNNING).first()
        if rollout is None:
            return None
        _evaluate_locked(rollout, now=now or timezone.now())
    return _fresh(rollout)


def running_rollout_ids() -> list[int]:
    return list(Rollout.objects.filter(state=RolloutState.RUNNING).values_list("pk", flat=True))


def rollout_ids_for_deployments(deployment_ids: Iterable[int]) -> list[int]:
    # order_by(): the model's ordering (stage, device) would join the DISTINCT and repeat a
    # rollout once per member reported on, and the task judged it that many times.
    return list(
        RolloutDevice.objects.filter(deployment__in=list(deployment_ids), rollout__state=RolloutState.RUNNING)
        .order_by()
        .values_list("rollout_id", flat=True)
        .distinct()
    )


def health_judged_deployments(deployment_ids: Iterable[int]) -> set[int]:
    """Of these deployments, those in the current, unpassed stage of a running rollout with a health gate."""
    gated = Q(health_p95_ratio__isnull=False) | Q(health_ttft_ratio__isnull=False) | Q(health_tps_ratio__isnull=False)
    current = RolloutStage.objects.filter(
        gated,
        rollout=OuterRef("rollout"),
        index=OuterRef("rollout__current_stage"),
        passed_at__isnull=True,
    )
    return set(
        RolloutDevice.objects.filter(
            Exists(current),
            deployment__in=list(deployment_ids),
            rollout__state=RolloutState.RUNNING,
            stage_index=F("rollout__current_stage"),
        ).values_list("deployment_id", flat=True)
    )


def _evaluate_locked(rollout: Rollout, *, now: datetime) -> str:
    """Move the rollout as far as its gates allow; why the current stage is blocked by a gate that
    cannot judge, or "" when it moved, ended, or waits only for devices or its soak."""
    stages = list(rollout.stages.all())
    # Each pass either stops or moves one stage on, so this ends within len(stages) passes.
    for _ in range(len(stages) + 1):
        if rollout.state != RolloutState.RUNNING:
            return ""
        stage = stages[rollout.current_stage]
        unassigned = _fill(rollout, stages, now=now)
        progress = stage_progress(rollout, stage, now=now)
        values = {g.gate: g.as_dict() for g in progress.gates}
        tripped = [g for g in progress.gates if g.verdict == gates.Verdict.FAIL]
        if tripped:
            reason = "; ".join(f"{g.gate} gate tripped in {stage}: {_with_errors(rollout, stage, g)}" for g in tripped)
            _transition(rollout, "rollback", actor="system", reason=reason, gate_values=values)
            _send_back(rollout, actor="system")
            return ""
        held = unassigned == 0 and progress.soaked and progress.inconclusive
        if _track_hold(rollout, stage, progress, held=held, now=now):
            return ""
        if unassigned or not progress.gates_pass or not progress.soaked:
            # Blocked, not merely on its way: a gate cannot judge, so skipping the soak changes nothing.
            return _why_waiting(stage, progress, unassigned) if progress.inconclusive else ""
        stage.passed_at = now
        stage.final_gates = values
        stage.save(update_fields=["passed_at", "final_gates"])
        if rollout.current_stage == len(stages) - 1:
            _transition(
                rollout,
                "complete",
                actor="system",
                reason=f"every stage passed; {stage} was the last",
                gate_values=values,
            )
            return ""
        rollout = _next_stage(rollout, stages, values, now=now)
    return ""


def _why_waiting(stage: RolloutStage, progress: StageProgress, unassigned: int) -> str:
    reasons = [f"{g.gate} gate {g.verdict}: {g.detail}" for g in progress.blocking]
    if unassigned:
        reasons.insert(0, f"{unassigned} device{'' if unassigned == 1 else 's'} still to assign (rate limit)")
    return f"{stage} is held: {'; '.join(reasons)}."


def _with_errors(rollout: Rollout, stage: RolloutStage, gate: gates.GateResult) -> str:
    """A tripped failure gate names the devices that failed and their own errors."""
    if gate.gate != "failure":
        return gate.detail
    failed = (
        rollout.members.filter(
            stage_index=stage.index,
            deployment__state__in=[DeploymentState.FAILED, DeploymentState.ROLLED_BACK],
        )
        .order_by("device__device_id")
        .values_list("device__device_id", "deployment__error")[:3]
    )
    errors = "; ".join(f"{device_id}: {error or 'no error given'}" for device_id, error in failed)
    return f"{gate.detail} ({errors})" if errors else gate.detail


def _track_hold(rollout: Rollout, stage: RolloutStage, progress: StageProgress, *, held: bool, now: datetime) -> bool:
    """Start, end or expire the stage's inconclusive hold; True when the expiry rolled the rollout back."""
    if not held:
        if stage.held_since is not None:
            stage.held_since = stage.hold_expired_at = None
            stage.save(update_fields=["held_since", "hold_expired_at"])
        return False
    if stage.held_since is None:
        stage.held_since = now
        stage.save(update_fields=["held_since"])
        record("system", "rollout.stage_held", rollout, after={"stage": stage.index}, reason=_hold_reason(progress))
    if stage.hold_expired_at is not None or now < stage.held_since + timedelta(seconds=stage.inconclusive_timeout):
        return False
    # A compare-and-swap, so the expiry acts once even if two evaluations see it.
    if not RolloutStage.objects.filter(pk=stage.pk, hold_expired_at__isnull=True).update(hold_expired_at=now):
        return False
    stage.hold_expired_at = now
    why = f"{stage} held past its deadline ({stage.inconclusive_timeout} s): {_hold_reason(progress)}"
    record("system", "rollout.hold_expired", rollout, after={"stage": stage.index}, reason=why)
    if stage.inconclusive_action == HoldAction.ROLLBACK:
        values = {g.gate: g.as_dict() for g in progress.gates}
        _transition(rollout, "rollback", actor="system", reason=why, gate_values=values)
        _send_back(rollout, actor="system")
        return True
    if stage.inconclusive_action == HoldAction.NOTIFY:
        notifications.notify(rollout, "rollout.hold_expired", reason=why, stage=stage.index)
    return False


def _hold_reason(progress: StageProgress) -> str:
    return "; ".join(f"{g.gate} gate inconclusive: {g.detail}" for g in progress.gates if g.verdict == "inconclusive")


def _next_stage(rollout: Rollout, stages: list[RolloutStage], values: dict, *, now: datetime) -> Rollout:
    index = rollout.current_stage
    changed = Rollout.objects.filter(pk=rollout.pk, state=RolloutState.RUNNING, current_stage=index).update(
        current_stage=index + 1, stage_started_at=now, soak_skipped=False
    )
    if changed != 1:
        raise RolloutError(f"Rollout {rollout.pk} changed meanwhile; look again and retry.")
    RolloutStage.objects.filter(pk=stages[index + 1].pk).update(started_at=now)
    stages[index + 1].started_at = now
    record(
        "system",
        "rollout.stage_passed",
        rollout,
        before={"stage": index},
        after={"stage": index + 1, "gates": values},
        reason=f"{stages[index]} passed its gates",
    )
    rollout.refresh_from_db()
    return rollout


def _fill(rollout: Rollout, stages: list[RolloutStage], *, now: datetime) -> int:
    """Assign the current stage up to its size, within the rate limit; how many are still to come."""
    members = dict(rollout.members.values_list("device_id", "stage_index"))
    candidates = dict(
        selected_devices(rollout)
        .exclude(rollout_memberships__rollout__in=_other_active(rollout))
        .values_list("pk", "device_id")
    )
    fleet = len(set(candidates) | set(members))
    target = gates.cumulative_targets(fleet, [_size(s) for s in stages])[rollout.current_stage] if fleet else 0
    missing = target - len(members)
    if missing <= 0:
        return 0
    recent = rollout.members.filter(assigned_at__gt=now - RATE_WINDOW).count()
    budget = max(0, rollout.max_per_minute - recent)
    newcomers = [device_id for pk, device_id in candidates.items() if pk not in members]
    chosen = gates.cohort_order(rollout.pk, newcomers)[: min(missing, budget)]
    if chosen:
        _assign(rollout, chosen, now=now)
    return missing - len(chosen)


def _size(stage: RolloutStage) -> gates.StageSize:
    return gates.StageSize(percent=stage.percent, device_count=stage.device_count)


def _assign(rollout: Rollout, device_ids: list[str], *, now: datetime) -> None:
    devices = list(Device.objects.filter(device_id__in=device_ids).only("device_id", "current_version"))
    result = assignments.assign_version(
        rollout.version, devices, actor=f"rollout:{rollout.pk}", reason=f"rollout {rollout.pk}"
    )
    made = {d.device_id: d for d in result.deployments}
    RolloutDevice.objects.bulk_create(
        [
            RolloutDevice(
                rollout=rollout,
                device=device,
                stage_index=rollout.current_stage,
                deployment=made.get(device.pk),
                ineligible_reason=result.skipped.get(device.device_id, ""),
                previous_version_id=device.current_version_id,
                assigned_at=now,
            )
            for device in devices
        ]
    )


# --- Progress and gates --------------------------------------------------------------


@dataclass
class StageProgress:
    stage: RolloutStage
    target: int
    counts: gates.StageCounts
    gates: list[gates.GateResult] = field(default_factory=list)
    soak_remaining_s: float | None = None

    @property
    def soaked(self) -> bool:
        return self.soak_remaining_s is not None and self.soak_remaining_s <= 0

    @property
    def inconclusive(self) -> bool:
        """Held by too little data: nothing failed, nothing waits on devices, but a gate cannot judge."""
        verdicts = {g.verdict for g in self.gates}
        return (
            gates.Verdict.INCONCLUSIVE in verdicts
            and gates.Verdict.FAIL not in verdicts
            and not any(g.verdict == gates.Verdict.WAITING and g.gate != "failure" for g in self.gates)
        )

    @property
    def blocking(self) -> list[GateResult]:
        return [g for g in self.gates if g.verdict != gates.Verdict.PASS and g.gate != "failure"]

    @property
    def gates_pass(self) -> bool:
        # The failure gate can only stop a stage; success and health must pass outright.
        return all(g.verdict == gates.Verdict.PASS or g.gate == "failure" for g in self.gates) and not any(
            g.verdict == gates.Verdict.FAIL for g in self.gates
        )


_BUCKETS = {
    DeploymentState.PENDING: "pending",
    DeploymentState.DOWNLOADING: "downloading",
    DeploymentState.VERIFYING: "verifying",
    DeploymentState.ACTIVE: "active",
    DeploymentState.FAILED: "failed",
    DeploymentState.ROLLED_BACK: "rolled_back",
    DeploymentState.INELIGIBLE: "ineligible",
    # Activated, then replaced by a newer version: it did take this one.
    DeploymentState.SUPERSEDED: "active",
}


def stage_counts(rollout: Rollout) -> dict[int, gates.StageCounts]:
    """Each stage's devices by where they are, in one query."""
    return stage_counts_of([rollout.pk]).get(rollout.pk, {})


def stage_counts_of(rollout_ids: Iterable[int]) -> dict[int, dict[int, gates.StageCounts]]:
    """Rollout id -> each stage's devices by where they are, for many rollouts in one query."""
    rows = (
        RolloutDevice.objects.filter(rollout__in=list(rollout_ids))
        .values("rollout_id", "stage_index", "deployment__state", "deployment__active_at", "rollback_deployment")
        .annotate(n=Count("id"))
        .order_by()
    )
    tallies: dict[tuple[int, int], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for row in rows:
        tally = tallies[row["rollout_id"], row["stage_index"]]
        tally["targeted"] += row["n"]
        if row["rollback_deployment"] is not None:
            tally["sent_back"] += row["n"]
        # By the deployment's own state, even once sent back: a failed device stays failed.
        state = row["deployment__state"]
        if state is None:
            bucket = "ineligible"  # no artifact of the version fits its hardware
        elif state == DeploymentState.SUPERSEDED and row["deployment__active_at"] is None:
            bucket = "ineligible"  # replaced before it ever ran: not this rollout's outcome
        else:
            bucket = _BUCKETS[DeploymentState(state)]
        tally[bucket] += row["n"]
    out: dict[int, dict[int, gates.StageCounts]] = defaultdict(dict)
    for (rollout_id, index), tally in tallies.items():
        out[rollout_id][index] = gates.StageCounts(**tally)
    return out


def stage_progress(
    rollout: Rollout,
    stage: RolloutStage,
    *,
    now: datetime,
    counts: dict[int, gates.StageCounts] | None = None,
    fleet: int | None = None,
    judge: bool = True,
) -> StageProgress:
    counts = counts if counts is not None else stage_counts(rollout)
    mine = counts.get(stage.index, gates.StageCounts())
    progress = StageProgress(stage=stage, target=mine.targeted, counts=mine)
    if stage.started_at is None:
        return progress
    soak_end = stage.started_at + timedelta(seconds=stage.min_soak_seconds)
    skip = rollout.soak_skipped and stage.index == rollout.current_stage
    progress.soak_remaining_s = 0.0 if skip else max(0.0, (soak_end - now).total_seconds())
    if not judge:
        return progress
    progress.gates = [
        gates.success_gate(mine, stage.success_percent),
        gates.failure_gate(mine, stage.failure_percent, stage.failure_min_finished),
    ]
    if stage.health_p95_ratio is not None:
        progress.gates.append(
            gates.health_gate(
                _inference(_candidate_beats(rollout, stage)),
                _inference(_baseline_beats(rollout, stage)),
                max_p95_ratio=stage.health_p95_ratio,
                max_error_rate_points=stage.health_error_points,
                min_samples=stage.health_min_samples,
            )
        )
    if stage.health_ttft_ratio is not None or stage.health_tps_ratio is not None:
        progress.gates.append(
            gates.generation_gate(
                _generation(_candidate_beats(rollout, stage)),
                _generation(_baseline_beats(rollout, stage)),
                max_ttft_ratio=stage.health_ttft_ratio,
                min_tps_ratio=stage.health_tps_ratio,
                min_samples=stage.health_min_samples,
            )
        )
    return progress


def rollout_progress(rollout: Rollout, *, now: datetime | None = None) -> dict:
    """Per stage: where its devices are and each gate's value against its threshold."""
    now = now or timezone.now()
    counts = stage_counts(rollout)
    stages = list(rollout.stages.all())
    members = sum(c.targeted for c in counts.values())
    if rollout.state not in FINISHED_STATES:
        # DISTINCT over the ids only: over every column of the devices it cost more than the rest together.
        fleet = max(members, selected_devices(rollout).values("pk").count())
    else:
        fleet = members
    targets = gates.cumulative_targets(fleet, [_size(s) for s in stages]) if fleet else [0] * len(stages)
    canary, failing = _devices_to_show(rollout)
    out = []
    for stage, target in zip(stages, targets, strict=True):
        progress = stage_progress(rollout, stage, now=now, counts=counts, judge=stage.final_gates is None)
        if stage.final_gates is not None:
            # Judged for the last time when it passed or the rollout ended: show that, not a recount
            # of devices the rollback has since sent back.
            progress.gates = _stored_gates(stage.final_gates)
        planned = target - (targets[stage.index - 1] if stage.index else 0)
        out.append(
            {
                "stage": stage,
                "planned": planned,
                "progress": progress,
                "status": _stage_status(rollout, stage),
                "hold": _hold(stage, progress),
                "canary": canary if stage.index == 0 else [],
                "failing": [m for m in failing if m["stage"] == stage.index],
            }
        )
    return {"rollout": rollout, "fleet": fleet, "done": rollout.state in FINISHED_STATES, "stages": out}


CANARY_SHOWN = 5
FAILING_SHOWN = 20


def _devices_to_show(rollout: Rollout) -> tuple[list[dict], list[dict]]:
    """The first stage's devices (the canary, when it is small), and failed devices with their own errors.

    Two bounded queries, whatever the size of the rollout.
    """
    members = RolloutDevice.objects.filter(rollout=rollout).select_related("device", "deployment")
    members = members.only(
        "stage_index", "ineligible_reason", "rollback_deployment", "device__device_id", "device__online",
        "deployment__state", "deployment__error",
    )  # fmt: skip
    canary = members.filter(stage_index=0).order_by("device__device_id")[:CANARY_SHOWN]
    failing = members.filter(deployment__state__in=[DeploymentState.FAILED, DeploymentState.ROLLED_BACK]).order_by(
        "stage_index", "device__device_id"
    )[:FAILING_SHOWN]
    return [_shown(m) for m in canary], [_shown(m) for m in failing]


def _shown(member: RolloutDevice) -> dict:
    deployment = member.deployment
    return {
        "device": member.device.device_id,
        "online": member.device.online,
        "stage": member.stage_index,
        "state": deployment.state if deployment else "ineligible",
        "error": (deployment.error if deployment else member.ineligible_reason) or "",
        "sent_back": member.rollback_deployment_id is not None,
    }


_GATE_ORDER = {"success": 0, "failure": 1, "health": 2}


def _stored_gates(values: dict) -> list[gates.GateResult]:
    # In the order they are judged: JSONB keeps its own order of keys.
    rows = sorted(values.values(), key=lambda g: _GATE_ORDER.get(g["gate"], len(_GATE_ORDER)))
    return [gates.GateResult(**{**g, "verdict": gates.Verdict(g["verdict"])}) for g in rows]


def _hold(stage: RolloutStage, progress: StageProgress) -> dict | None:
    if stage.held_since is None or stage.passed_at is not None:
        return None
    return {
        "since": stage.held_since,
        "deadline": stage.held_since + timedelta(seconds=stage.inconclusive_timeout),
        "expired_at": stage.hold_expired_at,
        "action": stage.inconclusive_action,
        "reason": _hold_reason(progress),
    }


def _stage_status(rollout: Rollout, stage: RolloutStage) -> str:
    if stage.passed_at is not None:
        return "passed"
    if stage.started_at is None or stage.index != rollout.current_stage:
        return "pending"
    if rollout.state == RolloutState.RUNNING and stage.hold_expired_at is not None:
        return "held_past_deadline"
    if rollout.state == RolloutState.RUNNING and stage.held_since is not None:
        return "held"
    labels: dict[str, str] = {RolloutState.RUNNING: "running", RolloutState.PAUSED: "paused"}
    return labels.get(rollout.state, rollout.state)


def _inference(beats: QuerySet[Heartbeat]) -> gates.Inference:
    totals = beats.aggregate(
        requests=Coalesce(Sum("requests"), 0),
        errors=Coalesce(Sum("errors"), 0),
        samples=Coalesce(Sum("latency_count"), 0),
        p95_sum=Coalesce(Sum(F("p95_ms") * F("latency_count"), output_field=FloatField()), 0.0),
    )
    return gates.Inference(
        requests=totals["requests"],
        errors=totals["errors"],
        samples=totals["samples"],
        p95_weighted_sum=totals["p95_sum"],
    )


def _generation(beats: QuerySet[Heartbeat]) -> gates.Generation:
    totals = beats.aggregate(
        requests=Coalesce(Sum("gen_requests"), 0),
        errors=Coalesce(Sum("gen_errors"), 0),
        ttft=Coalesce(Sum(F("ttft_p95_ms") * F("gen_requests"), output_field=FloatField()), 0.0),
        tps=Coalesce(Sum(F("decode_tps_p50") * F("gen_requests"), output_field=FloatField()), 0.0),
    )
    return gates.Generation(
        requests=totals["requests"],
        errors=totals["errors"],
        ttft_p95_weighted_sum=totals["ttft"],
        tps_weighted_sum=totals["tps"],
    )


def _candidate_beats(rollout: Rollout, stage: RolloutStage) -> QuerySet[Heartbeat]:
    """Heartbeats the stage's devices sent while running the rollout's deployment.

    A heartbeat names the deployment it ran, and a device could name anyone's: only a
    heartbeat whose sender is that deployment's own device counts.
    """
    members = rollout.members.filter(stage_index=stage.index, deployment__isnull=False)
    deployment_ids = list(members.values_list("deployment_id", flat=True))
    own = Deployment.objects.filter(pk=OuterRef("deployment_id_reported"), device_id=OuterRef("device_id"))
    return Heartbeat.objects.filter(Exists(own), deployment_id_reported__in=deployment_ids)


def _baseline_beats(rollout: Rollout, stage: RolloutStage) -> QuerySet[Heartbeat]:
    if rollout.baseline == RolloutBaseline.CONTROL:
        # Selected devices of the same hardware classes the rollout has not reached, over this stage.
        stage_devices = rollout.members.filter(stage_index=stage.index)
        classes = Device.objects.filter(rollout_memberships__in=stage_devices).values("hardware_class")
        control = (
            selected_devices(rollout)
            .filter(hardware_class__in=classes)
            .exclude(rollout_memberships__rollout=rollout)
            .values("pk")
        )
        return Heartbeat.objects.filter(device__in=control, received_at__gte=stage.started_at)
    # The same devices in the window before the rollout reached each of them. One filter()
    # call, so both conditions join the same membership row.
    return Heartbeat.objects.filter(
        device__rollout_memberships__rollout=rollout,
        device__rollout_memberships__stage_index=stage.index,
        received_at__lt=F("device__rollout_memberships__assigned_at"),
        received_at__gte=F("device__rollout_memberships__assigned_at") - BASELINE_WINDOW,
    )
