"""Deployments: which version each device should run, and how far it has got."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from django.db import transaction
from django.utils import timezone

from agent import wire
from fleet.choices import (
    DEPLOYMENT_PROGRESS,
    OPEN_DEPLOYMENT_STATES,
    UNOFFERED_QUALITIES,
    ArtifactRole,
    ArtifactStatus,
    DeploymentState,
    HardwareClass,
    VariantQuality,
)
from fleet.lib import variants
from fleet.models import Artifact, AuditEvent, Deployment, Device, ModelVersion, VariantPin
from fleet.services.audit import Actor, audit_event, record

log = logging.getLogger(__name__)


class DeploymentError(Exception):
    """An assignment the current state does not allow; the text says why."""


@dataclass
class AssignmentResult:
    deployments: list[Deployment] = field(default_factory=list)
    # device_id -> why it was not assigned
    skipped: dict[str, str] = field(default_factory=dict)


def select_artifact(
    version: ModelVersion, device: Device, artifacts: Sequence[Artifact] | None = None
) -> Artifact | None:
    """The variant of ``version`` this device should run (see fleet.lib.variants for the chain).

    Rejected variants and those still being evaluated are never offered.
    """
    if artifacts is None:
        artifacts = [a for a in version.artifacts.all() if a.role == ArtifactRole.MODEL]
    offered = {
        a.pk: a
        for a in artifacts
        if a.status == ArtifactStatus.READY and a.role == ArtifactRole.MODEL and a.quality not in UNOFFERED_QUALITIES
    }
    candidates = [
        variants.Candidate(
            id=a.pk,
            precision=a.precision,
            hardware_class=a.hardware_class,
            size=a.size,
            peak_memory_bytes=_peak_memory(a),
            recipe=a.recipe,
        )
        for a in offered.values()
    ]
    chosen = variants.choose_variant(_profile(device), candidates, pinned=_pinned(version, device))
    return offered[chosen.id] if chosen else None


def _peak_memory(artifact: Artifact) -> int | None:
    evaluation = getattr(artifact, "evaluation", None) if artifact.quality != VariantQuality.UNEVALUATED else None
    return evaluation.peak_memory_bytes if evaluation else None


def _profile(device: Device) -> variants.DeviceProfile:
    return variants.DeviceProfile(
        arch=device.arch,
        os=device.os,
        hardware_class=device.hardware_class or HardwareClass.ANY,
        ram_bytes=device.ram_bytes,
        providers=tuple(device.providers or ()),
        cpu_flags=frozenset(device.cpu_flags or ()),
    )


def _pinned(version: ModelVersion, device: Device) -> list[int]:
    """Pinned artifact ids for the device: its own pin first, then its tags' (oldest pin first)."""
    # Cached on the version: assigning one version to many devices reads its pins once.
    if not hasattr(version, "_pins"):
        version._pins = list(VariantPin.objects.filter(version=version).order_by("created_at", "id"))
    pins = version._pins
    if not pins:
        return []
    own = [p.artifact_id for p in pins if p.device_id == device.pk]
    tags = {t.pk for t in device.tags.all()} if any(p.tag_id for p in pins) else set()
    return own + [p.artifact_id for p in pins if p.tag_id in tags]


def assign_version(
    version: ModelVersion,
    devices: Iterable[Device],
    *,
    actor: Actor,
    reason: str = "",
    source_address: str | None = None,
) -> AssignmentResult:
    """Make ``version`` the desired one of each device; the devices hear of it after commit."""
    if not version.is_published:
        raise DeploymentError(f"{version.label} is a draft; publish it before assigning it to devices.")
    artifacts = list(version.artifacts.all())
    result = AssignmentResult()
    created_by = None if isinstance(actor, str) or actor is None or not actor.is_authenticated else actor
    with transaction.atomic():
        devices = list(Device.objects.select_for_update().filter(pk__in=[d.pk for d in devices]))
        for device in devices:
            artifact = select_artifact(version, device, artifacts)
            if artifact is None:
                result.skipped[device.device_id] = (
                    f"{version.label} has no ready model artifact for hardware class "
                    f"{device.hardware_class or 'unknown'} nor for any hardware"
                )
                continue
            result.deployments.append(
                Deployment(device=device, version=version, artifact=artifact, created_by=created_by)
            )
        targets = [d.device.pk for d in result.deployments]
        Deployment.objects.filter(device__in=targets, state__in=OPEN_DEPLOYMENT_STATES).update(
            state=DeploymentState.SUPERSEDED
        )
        Deployment.objects.bulk_create(result.deployments)
        events = [
            audit_event(
                actor,
                "deployment.assigned",
                d,
                after={"version": version.label, "artifact": d.artifact.sha256},
                reason=reason,
                source_address=source_address,
            )
            for d in result.deployments
        ]
        AuditEvent.objects.bulk_create(events)
        device_pks = [d.device.pk for d in result.deployments]
        transaction.on_commit(lambda: enqueue_desired(device_pks))
    return result


def enqueue_desired(device_pks: list[int]) -> None:
    """Queue publishing these devices' desired state; call it only after commit."""
    from fleet.tasks import publish_desired

    # Keep each task small enough to retry cheaply.
    for start in range(0, len(device_pks), 1000):
        publish_desired.delay(device_pks[start : start + 1000])


def current_deployment(device: Device) -> Deployment | None:
    """The newest deployment that has not been replaced: what the device should run."""
    return (
        device.deployments.exclude(state=DeploymentState.SUPERSEDED)
        .select_related("version__model", "artifact")
        .order_by("-id")
        .first()
    )


def desired_message(device: Device, *, deployment: Deployment | None = None) -> wire.Desired:
    deployment = deployment or current_deployment(device)
    now = timezone.now().timestamp()
    if deployment is None:
        return wire.Desired(device_id=device.device_id, deployment_id=None, issued_at=now)
    version = deployment.version
    files = [file_manifest(deployment.artifact)]
    tokenizers = version.artifacts.filter(role=ArtifactRole.TOKENIZER, status=ArtifactStatus.READY)
    files += [file_manifest(t) for t in tokenizers]
    return wire.Desired(
        device_id=device.device_id,
        deployment_id=deployment.pk,
        model=version.model.name,
        version=str(version.number),
        files=files,
        inference=wire.InferenceSpec(
            task=version.task, pooling=version.pooling, normalize=version.normalize, max_length=version.max_length
        ),
        issued_at=now,
    )


def file_manifest(artifact: Artifact) -> wire.FileManifest:
    return wire.FileManifest(
        role=artifact.role,
        filename=artifact.filename,
        sha256=artifact.sha256,
        size=artifact.size,
        chunk_size=artifact.chunk_size,
        chunks=artifact.chunk_hashes,
        format=artifact.format,
        precision=artifact.precision,
    )


class StaleReport(Exception):
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


def record_state(device: Device, report: wire.StateReport) -> Deployment:
    """Apply an agent's report to its deployment, compare-and-swap on the state."""
    new = DeploymentState(report.state)
    if new == DeploymentState.PENDING:
        raise StaleReport("agents do not report pending")
    now = timezone.now()
    updates: dict = {
        "state": new,
        "updated_at": now,
        "bytes_done": report.bytes_done,
        "bytes_total": report.bytes_total,
    }
    stamp = {
        "downloading": "downloading_at",
        "verifying": "verifying_at",
        "active": "active_at",
        "failed": "failed_at",
        "ineligible": "failed_at",
        "rolled_back": "failed_at",
    }
    with transaction.atomic():
        deployment = Deployment.objects.select_for_update().filter(pk=report.deployment_id, device=device).first()
        if deployment is None:
            raise StaleReport(f"deployment {report.deployment_id} is not one of {device.device_id}'s")
        before = deployment.state
        if before == new and new not in OPEN_DEPLOYMENT_STATES:
            # The agent confirms again after every reconnect; nothing changes.
            return deployment
        if new == DeploymentState.ACTIVE and report.sha256 and report.sha256 != deployment.artifact.sha256:
            new, updates["state"] = DeploymentState.FAILED, DeploymentState.FAILED
            updates["error"] = f"device activated sha256 {report.sha256}, expected {deployment.artifact.sha256}"
        if new in (DeploymentState.FAILED, DeploymentState.INELIGIBLE, DeploymentState.ROLLED_BACK):
            updates.setdefault("error", report.error or f"the device reported {new} without a reason")
        if before != new:
            updates[stamp[new]] = now
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
