"""Reconciliation: repair what lost messages left behind, from what each device says it runs.

MQTT delivers at least once only while both ends are up. A state report sent while no bridge
ran is gone; a desired message whose task was never queued (an enqueue failure, a killed
worker) never reaches the device. Every heartbeat names the deployment the device runs
(``active``), so once a minute (Celery beat, ``fleet.reconcile_deployments``) the plane
compares that with what it wants each device to run:

- the device runs the deployment the plane still shows as pending, downloading or
  verifying, with the right sha256: the report was lost, and the deployment is made active;
- the device has heartbeated for a while since a deployment was made and still does not run
  it: its desired message is published again;
- the device runs something the plane did not assign it, or no longer wants (a version
  rolled back, a device that went back to a withdrawn version on its own): its desired
  message is published again, and the device is not shown as running its assigned version.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial

from django.db import transaction
from django.db.models import OuterRef, Subquery
from django.utils import timezone

from agent.contract import wire
from fleet.choices import OPEN_DEPLOYMENT_STATES, DeploymentState
from fleet.models import Deployment, Device, Heartbeat
from fleet.services.audit import audit_event, record_many
from fleet.services.desired import current_deployments, enqueue_desired
from fleet.services.reports import ReceivedState, record_states

# How long a deployment may go unconfirmed by heartbeats before the plane acts on it: longer
# than a heartbeat interval and a download's first report.
RECONCILE_AFTER = timedelta(seconds=120)


@dataclass
class Reconciled:
    """What one pass repaired, by device id."""

    activated: list[str] = field(default_factory=list)
    republished: list[str] = field(default_factory=list)
    drifted: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Reported:
    """What an online device's newest recent heartbeat says it runs."""

    pk: int
    device_id: str
    beat_at: datetime
    runs: int | None
    sha256: str

    def as_device(self) -> Device:
        return Device(pk=self.pk, device_id=self.device_id)


def reconcile_deployments(*, now: datetime | None = None, after: timedelta = RECONCILE_AFTER) -> Reconciled:
    """One reconciliation pass over the online devices; idempotent."""
    now = now or timezone.now()
    devices = _reporting_devices(now - after)
    wanted = current_deployments(d.pk for d in devices)
    result = Reconciled()
    lost_reports: list[ReceivedState] = []
    for device in devices:
        deployment = wanted.get(device.pk)
        if deployment is None:
            continue
        if deployment.state in OPEN_DEPLOYMENT_STATES:
            if device.runs == deployment.pk and device.sha256 == deployment.artifact.sha256:
                lost_reports.append(_active_report(device, deployment))
            elif deployment.created_at <= now - after and device.beat_at >= deployment.created_at + after:
                result.republished.append(device.device_id)
        elif deployment.state == DeploymentState.ACTIVE and device.runs is not None and device.runs != deployment.pk:
            # A heartbeat sent just before the switch still names the old deployment: only one
            # sent well after the activation says the device went elsewhere.
            if deployment.active_at is not None and device.beat_at >= deployment.active_at + after:
                result.drifted.append(device.device_id)
    if lost_reports:
        outcomes = record_states(lost_reports)
        applied = zip(lost_reports, outcomes, strict=True)
        result.activated = [report.device_id for report, outcome in applied if isinstance(outcome, Deployment)]
    _correct(devices, result)
    return result


def _reporting_devices(since: datetime) -> list[Reported]:
    """Online devices, each with what its newest heartbeat (if recent) says it runs."""
    newest = Heartbeat.objects.filter(device=OuterRef("pk"), received_at__gte=since).order_by("-received_at")
    rows = (
        Device.objects.filter(online=True)
        .annotate(
            beat_at=Subquery(newest.values("received_at")[:1]),
            runs=Subquery(newest.values("deployment_id_reported")[:1]),
            sha256=Subquery(newest.values("active_sha256")[:1]),
        )
        .filter(beat_at__isnull=False)
        .values_list("pk", "device_id", "beat_at", "runs", "sha256")
    )
    return [Reported(*row) for row in rows]


def _active_report(device: Reported, deployment: Deployment) -> ReceivedState:
    report = wire.StateReport(
        device_id=device.device_id,
        deployment_id=deployment.pk,
        state="active",
        sha256=deployment.artifact.sha256,
        sent_at=time.time(),
    )
    return ReceivedState(device.pk, device.device_id, report)


@transaction.atomic
def _correct(devices: list[Reported], result: Reconciled) -> None:
    by_id = {d.device_id: d for d in devices}
    drifted = [by_id[d] for d in result.drifted]
    if drifted:
        # The plane must not show a version as running on a device that runs something else.
        Device.objects.filter(pk__in=[d.pk for d in drifted]).update(current_version=None, current_artifact=None)
    events = [
        audit_event(
            "system", "device.desired_republished", by_id[d].as_device(), reason="no heartbeat shows its deployment"
        )
        for d in result.republished
    ]
    events += [
        audit_event(
            "system",
            "device.drift_corrected",
            d.as_device(),
            before={"runs_deployment": d.runs},
            reason="the device runs a deployment the plane does not want it to",
        )
        for d in drifted
    ]
    record_many(events)
    targets = sorted([by_id[d].pk for d in result.republished] + [d.pk for d in drifted])
    if targets:
        transaction.on_commit(partial(enqueue_desired, targets))
