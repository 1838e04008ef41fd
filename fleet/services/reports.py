"""Device reports: how far each device has got with its deployment, applied compare-and-swap."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from django.db import transaction
from django.utils import timezone

from agent.contract import wire
from fleet.choices import DEPLOYMENT_PROGRESS, OPEN_DEPLOYMENT_STATES, DeploymentState
from fleet.errors import ServiceError
from fleet.models import Artifact, AuditEvent, Deployment, Device, ModelVersion
from fleet.services.audit import audit_event, record, record_many


class StaleReport(ServiceError):
    """A state report for a deployment that is replaced, finished, or not this device's."""


def _allowed_from(state: str) -> list[str]:
    if state in (DeploymentState.FAILED, DeploymentState.INELIGIBLE):
        return list(OPEN_DEPLOYMENT_STATES)
    if state == DeploymentState.ROLLED_BACK:
        return [DeploymentState.ACTIVE]
    rank = DEPLOYMENT_PROGRESS[DeploymentState(state)]
    # A report may skip states (a cached file goes straight to active) but never goes back;
    # repeating downloading carries progress.
    return [s for s, r in DEPLOYMENT_PROGRESS.items() if r < rank or (r == rank and s == DeploymentState.DOWNLOADING)]


_STAMPS = {
    DeploymentState.DOWNLOADING: "downloading_at",
    DeploymentState.VERIFYING: "verifying_at",
    DeploymentState.ACTIVE: "active_at",
    DeploymentState.FAILED: "failed_at",
    DeploymentState.INELIGIBLE: "failed_at",
    DeploymentState.ROLLED_BACK: "failed_at",
}


def _report_updates(deployment: Deployment, report: wire.StateReport, now) -> dict | None:
    """The fields a report changes on the deployment as it is now; None for a confirmation.

    Raises StaleReport when the report does not apply: the compare of compare-and-swap.
    """
    new = DeploymentState(report.state)
    before = deployment.state
    if before == new and new not in OPEN_DEPLOYMENT_STATES:
        # The agent confirms again after every reconnect; nothing changes.
        return None
    updates: dict = {"state": new, "updated_at": now, "bytes_done": report.bytes_done,
                     "bytes_total": report.bytes_total}  # fmt: skip
    if new in (DeploymentState.VERIFYING, DeploymentState.ACTIVE) and not report.bytes_total:
        # An agent that already held the file (a delta that reused every chunk, or the model it
        # runs under a new deployment) reports no bytes: the deployment still has them all.
        updates["bytes_done"] = updates["bytes_total"] = deployment.artifact.size
    if new == DeploymentState.ACTIVE and report.sha256 and report.sha256 != deployment.artifact.sha256:
        new = updates["state"] = DeploymentState.FAILED
        updates["error"] = f"device activated sha256 {report.sha256}, expected {deployment.artifact.sha256}"
    if new in (DeploymentState.FAILED, DeploymentState.INELIGIBLE, DeploymentState.ROLLED_BACK):
        updates.setdefault("error", report.error or f"the device reported {new} without a reason")
    if before != new:
        updates[_STAMPS[new]] = now
    if before not in _allowed_from(new):
        raise StaleReport(f"deployment {deployment.pk} is {before}; a {new} report does not apply")
    return updates


def _check_report(report: wire.StateReport) -> None:
    if report.state == DeploymentState.PENDING:
        raise StaleReport("agents do not report pending")


def record_state(device: Device, report: wire.StateReport) -> Deployment:
    """Apply an agent's report to its deployment, compare-and-swap on the state."""
    _check_report(report)
    now = timezone.now()
    with transaction.atomic():
        _lock_devices([device.pk])
        deployment = Deployment.objects.select_for_update().filter(pk=report.deployment_id, device=device).first()
        if deployment is None:
            raise StaleReport(f"deployment {report.deployment_id} is not one of {device.device_id}'s")
        before = deployment.state
        updates = _report_updates(deployment, report, now)
        if updates is None:
            return deployment
        new = updates["state"]
        changed = Deployment.objects.filter(pk=deployment.pk, state__in=_allowed_from(new)).update(**updates)
        if not changed:
            raise StaleReport(f"deployment {deployment.pk} is {before}; a {new} report does not apply")
        deployment.refresh_from_db()
        if before != new:
            record(
                f"device:{device.device_id}",
                f"deployment.{new}",
                deployment,
                before={"state": before},
                after={"state": new},
                reason=deployment.error,
            )
        if new == DeploymentState.ACTIVE:
            _make_current(device, deployment)
        elif new == DeploymentState.ROLLED_BACK:
            _restore_previous(device, deployment)
    return deployment


@dataclass(frozen=True, slots=True)
class ReceivedState:
    """One state report as the bridge received it, from a device it knows."""

    device_pk: int
    device_id: str
    report: wire.StateReport


def record_states(batch: Sequence[ReceivedState]) -> list[Deployment | StaleReport]:
    """Apply many reports in one transaction with a handful of queries; per report, in order,
    the deployment as it ends up or the StaleReport that refused it.

    Each report is judged exactly as ``record_state`` judges it, in the order received, so two
    reports on one deployment in a batch (downloading, then active) apply one after the other.
    """
    outcomes: list[Deployment | StaleReport] = []
    if not batch:
        return outcomes
    now = timezone.now()
    with transaction.atomic():
        # Lock every reported deployment, in id order so two bridges' batches cannot deadlock.
        # Under the lock the state read here is the one the write replaces: the batch's
        # compare-and-swap, without a conditional UPDATE per report.
        ids = sorted({item.report.deployment_id for item in batch})
        _lock_devices(Deployment.objects.filter(pk__in=ids).values_list("device_id", flat=True))
        rows = {
            d.pk: d
            for d in Deployment.objects.select_for_update(of=("self",))
            .select_related("device")
            # What judging a report and its audit row read. A whole artifact row (its chunk
            # hashes), version and device row per report cost more than the rest of the batch.
            .only("state", "error", "version", "artifact", "device__device_id")
            .filter(pk__in=ids)
            .order_by("pk")
        }
        _share_releases(rows.values())
        # deployment pk -> (its state before the batch, the fields the batch sets on it)
        changed: dict[int, tuple[str, dict]] = {}
        events: list[AuditEvent] = []
        # device pk -> (state reached, deployment) for each activation or rollback, in order
        effects: dict[int, list[tuple[str, Deployment]]] = {}
        for item in batch:
            try:
                outcomes.append(_apply_report(rows, item, now, changed, events, effects))
            except StaleReport as exc:
                outcomes.append(exc)
        _write_changes(changed)
        record_many(events)
        _apply_effects(effects)
    return outcomes


def _lock_devices(pks: Iterable[int]) -> None:
    """Lock these devices in id order before their deployments. assign_version takes a device,
    then its deployments; a report that locked the deployment first and then updated the
    device's current version would deadlock with it (seen when an assignment met the report
    of the deployment it replaced)."""
    list(Device.objects.select_for_update().filter(pk__in=list(pks)).order_by("pk").values_list("pk", flat=True))


def _share_releases(rows: Iterable[Deployment]) -> None:
    """One version (with its model) and one artifact object for all the deployments of each:
    two queries for a batch, where a fan-out's thousand reports share one of each."""
    rows = list(rows)
    versions = ModelVersion.objects.select_related("model").in_bulk({d.version_id for d in rows})
    artifacts = Artifact.objects.only("version", "sha256", "size").in_bulk({d.artifact_id for d in rows})
    for deployment in rows:
        deployment.version = versions[deployment.version_id]
        deployment.artifact = artifacts[deployment.artifact_id]


def _apply_report(rows, item: ReceivedState, now, changed, events, effects) -> Deployment:
    _check_report(item.report)
    deployment = rows.get(item.report.deployment_id)
    if deployment is None or deployment.device_id != item.device_pk:
        raise StaleReport(f"deployment {item.report.deployment_id} is not one of {item.device_id}'s")
    before = deployment.state
    updates = _report_updates(deployment, item.report, now)
    if updates is None:
        return deployment
    for name, value in updates.items():
        setattr(deployment, name, value)
    changed.setdefault(deployment.pk, (before, {}))[1].update(updates)
    new = deployment.state
    if before != new:
        events.append(
            audit_event(f"device:{item.device_id}", f"deployment.{new}", deployment,
                        before={"state": before}, after={"state": new}, reason=deployment.error)
        )  # fmt: skip
    if new in (DeploymentState.ACTIVE, DeploymentState.ROLLED_BACK):
        effects.setdefault(item.device_pk, []).append((new, deployment))
    return deployment


def _write_changes(changed: dict[int, tuple[str, dict]]) -> None:
    """One compare-and-swap UPDATE per distinct change: a fan-out's reports mostly share theirs."""
    groups: dict[tuple, list[int]] = {}
    for pk, (before, updates) in changed.items():
        groups.setdefault((before, tuple(sorted(updates.items()))), []).append(pk)
    for (before, updates), pks in groups.items():
        done = Deployment.objects.filter(pk__in=pks, state=before).update(**dict(updates))
        if done != len(pks):
            # The rows are locked since the batch read them: a mismatch is a bug, not a race.
            raise RuntimeError(f"{len(pks) - done} of {len(pks)} locked deployments changed state meanwhile")


def _apply_effects(effects: dict[int, list[tuple[str, Deployment]]]) -> None:
    """What each device runs now: for activations alone, two UPDATEs for a fan-out's batch."""
    simple = {pk: done[-1][1] for pk, done in effects.items() if all(s == DeploymentState.ACTIVE for s, _ in done)}
    if simple:
        # One UPDATE per version and artifact reached, not bulk_update: its CASE of a thousand
        # WHENs cost seconds in Python for a thousand activations (docs/benchmarks.md).
        running: dict[tuple[int, int], list[int]] = {}
        for pk, d in simple.items():
            running.setdefault((d.version_id, d.artifact_id), []).append(pk)
        for (version_id, artifact_id), pks in sorted(running.items()):
            Device.objects.filter(pk__in=sorted(pks)).update(current_version=version_id, current_artifact=artifact_id)
        Deployment.objects.filter(device__in=list(simple), state=DeploymentState.ACTIVE).exclude(
            pk__in=[d.pk for d in simple.values()]
        ).update(state=DeploymentState.SUPERSEDED)
    # A rollback among them: rare; replay that device's outcomes in order, as record_state would.
    for pk, done in effects.items():
        if pk in simple:
            continue
        device = Device.objects.get(pk=pk)
        for state, deployment in done:
            if state == DeploymentState.ACTIVE:
                _make_current(device, deployment)
            else:
                _restore_previous(device, deployment)


def _restore_previous(device: Device, deployment: Deployment) -> None:
    """The device runs what it ran before this deployment, or nothing if it ran nothing."""
    previous = (
        device.deployments.exclude(pk=deployment.pk).filter(active_at__isnull=False).order_by("-active_at").first()
    )
    Device.objects.filter(pk=device.pk).update(
        current_version=previous.version if previous else None,
        current_artifact=previous.artifact if previous else None,
    )


def _make_current(device: Device, deployment: Deployment) -> None:
    Device.objects.filter(pk=device.pk).update(current_version=deployment.version, current_artifact=deployment.artifact)
    device.deployments.filter(state=DeploymentState.ACTIVE).exclude(pk=deployment.pk).update(
        state=DeploymentState.SUPERSEDED
    )
