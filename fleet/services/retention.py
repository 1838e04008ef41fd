"""Retention: archiving a version nothing needs any more, or deleting it with its files.

A version may go only when no device runs it, no open deployment or unfinished rollout
takes it, and no alias points at it; otherwise the request is refused with every reason.
Deleting also needs a version with no history at all (deployments, rollouts, children):
such a version is archived instead, so the record of what ran where stays whole.
"""

from __future__ import annotations

from django.db import transaction
from django.db.models import Q

from fleet.choices import OPEN_DEPLOYMENT_STATES, RolloutState, VersionStatus
from fleet.errors import ServiceError
from fleet.models import Artifact, Deployment, Device, ModelVersion, Pipeline, PipelineStep, Rollout, VariantEvaluation
from fleet.services.audit import Actor, record
from fleet.storage import get_store

UNFINISHED_ROLLOUT_STATES = (RolloutState.DRAFT, RolloutState.RUNNING, RolloutState.PAUSED)


class RetentionRefused(ServiceError):
    """The version is still needed; the text names every reason."""


def blockers(version: ModelVersion) -> list[str]:
    """Why the version cannot be archived or deleted now; empty when it can."""
    reasons = []
    running = list(Device.objects.filter(current_version=version).values_list("device_id", flat=True)[:6])
    if running:
        reasons.append(f"{_some(running)} run(s) it")
    open_deployments = Deployment.objects.filter(version=version, state__in=OPEN_DEPLOYMENT_STATES).count()
    if open_deployments:
        reasons.append(f"{open_deployments} open deployment(s) take it")
    rollouts = list(
        Rollout.objects.filter(version=version, state__in=UNFINISHED_ROLLOUT_STATES).values_list("pk", flat=True)[:6]
    )
    rollouts += list(
        Rollout.objects.filter(members__previous_version=version, state__in=UNFINISHED_ROLLOUT_STATES)
        .values_list("pk", flat=True)
        .distinct()[:6]
    )
    if rollouts:
        reasons.append(f"unfinished rollout(s) {_some(sorted(set(rollouts)))} reference it")
    aliases = [f"{version.model.name}:{name}" for name in version.aliases.values_list("name", flat=True)]
    if aliases:
        reasons.append(f"alias(es) {', '.join(aliases)} point at it")
    return reasons


def history(version: ModelVersion) -> list[str]:
    """Records that name the version and would lose it if it were deleted."""
    reasons = []
    if deployments := Deployment.objects.filter(version=version).count():
        reasons.append(f"{deployments} deployment(s) in the history")
    if rollouts := Rollout.objects.filter(Q(version=version) | Q(members__previous_version=version)).distinct().count():
        reasons.append(f"{rollouts} rollout(s) in the history")
    if children := list(version.children.values_list("number", flat=True)[:6]):
        reasons.append(f"version(s) {_some(children)} derive from it")
    return reasons


def _some(items: list) -> str:
    shown = ", ".join(str(i) for i in items[:5])
    return shown + (" and more" if len(items) > 5 else "")


def archive_version(version: ModelVersion, *, actor: Actor, reason: str = "") -> ModelVersion:
    """Retire a published version: never offered again, its files kept."""
    with transaction.atomic():
        locked = _lock(version)
        if locked.status != VersionStatus.PUBLISHED:
            raise RetentionRefused(f"{locked.label} is {locked.status}; only a published version can be archived.")
        _refuse_if_needed(locked, "archived")
        changed = ModelVersion.objects.filter(pk=locked.pk, status=VersionStatus.PUBLISHED).update(
            status=VersionStatus.ARCHIVED
        )
        if changed != 1:
            raise RetentionRefused(f"{locked.label} changed meanwhile; look again and retry.")
        locked.refresh_from_db()
        record(
            actor,
            "version.archived",
            locked,
            before={"status": "published"},
            after={"status": "archived"},
            reason=reason,
        )
    return locked


def delete_version(version: ModelVersion, *, actor: Actor, reason: str = "") -> None:
    """Delete a version and its artifacts; each file leaves the store unless another artifact shares it."""
    with transaction.atomic():
        locked = _lock(version)
        _refuse_if_needed(locked, "deleted")
        if past := history(locked):
            raise RetentionRefused(f"{locked.label} cannot be deleted: {'; '.join(past)}. Archive it instead.")
        artifacts = list(locked.artifacts.all())
        keys = {a.storage_key for a in artifacts if a.storage_key}
        record(
            actor,
            "version.deleted",
            locked,
            before={"status": locked.status, "artifacts": [a.sha256 for a in artifacts]},
            reason=reason,
        )
        _delete_rows(locked, artifacts)
        transaction.on_commit(lambda: _delete_files(keys))


def _lock(version: ModelVersion) -> ModelVersion:
    # Lock the version: two retention requests, a publish, or an assignment
    # (assignments.assign_version locks it too) would otherwise both act on the status they read.
    return ModelVersion.objects.select_for_update().select_related("model").get(pk=version.pk)


def _refuse_if_needed(version: ModelVersion, what: str) -> None:
    if reasons := blockers(version):
        raise RetentionRefused(f"{version.label} cannot be {what}: {'; '.join(reasons)}.")


def _delete_rows(version: ModelVersion, artifacts: list[Artifact]) -> None:
    """Delete in the order the PROTECT references demand: pipelines, evaluations, variants, then sources."""
    PipelineStep.objects.filter(pipeline__version=version).delete()
    Pipeline.objects.filter(version=version).delete()
    VariantEvaluation.objects.filter(artifact__version=version).delete()
    remaining = {a.pk: a for a in artifacts}
    while remaining:
        sources = {a.derived_from_id for a in remaining.values()}
        leaves = [pk for pk in remaining if pk not in sources]
        Artifact.objects.filter(pk__in=leaves).delete()
        for pk in leaves:
            del remaining[pk]
    version.delete()


def _delete_files(keys: set[str]) -> None:
    """Content-addressed: a file another artifact (of any version) still names stays."""
    store = get_store()
    shared = set(Artifact.objects.filter(storage_key__in=keys).values_list("storage_key", flat=True))
    for key in keys - shared:
        store.delete(key)
