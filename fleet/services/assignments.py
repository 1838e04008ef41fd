"""Assignments: which version, and which of its variants, each device should run.

``assign_version`` replaces a device's open deployments with new ones in pending; once it
commits, the devices hear of them through their desired messages (services.desired).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from django.db import transaction

from fleet.choices import (
    OPEN_DEPLOYMENT_STATES,
    UNOFFERED_QUALITIES,
    ArtifactRole,
    ArtifactStatus,
    DeploymentState,
    EnrollmentState,
    HardwareClass,
    VariantQuality,
    VersionStatus,
)
from fleet.errors import ServiceError
from fleet.lib import variants
from fleet.models import Artifact, Deployment, Device, ModelVersion, VariantPin
from fleet.services.audit import Actor, acting_user, audit_event, record_many
from fleet.services.desired import enqueue_desired


class DeploymentError(ServiceError):
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
    pins: list[VariantPin] | None = getattr(version, "_pins", None)
    if pins is None:
        pins = list(VariantPin.objects.filter(version=version).order_by("created_at", "id"))
        setattr(version, "_pins", pins)  # noqa: B010  (an attribute the model does not declare)
    if not pins:
        return []
    own = [p.artifact_id for p in pins if p.device_id == device.pk]
    tags = {t.pk for t in device.tags.all()} if any(p.tag_id for p in pins) else set()
    return own + [p.artifact_id for p in pins if p.tag_id in tags]


# What choosing a device's variant reads (_profile, _pinned), what callers read of the result.
_ASSIGN_FIELDS = ("device_id", "arch", "os", "hardware_class", "ram_bytes", "providers", "cpu_flags",
                  "current_version", "enrollment")  # fmt: skip


def assign_version(
    version: ModelVersion,
    devices: Iterable[Device],
    *,
    actor: Actor,
    reason: str = "",
    source_address: str | None = None,
) -> AssignmentResult:
    """Make ``version`` the desired one of each device; the devices hear of it after commit."""
    result = AssignmentResult()
    created_by = acting_user(actor)
    with transaction.atomic():
        # Devices in id order, as every writer of deployments takes them: see record_states.
        devices = list(
            Device.objects.select_for_update()
            .filter(pk__in=[d.pk for d in devices])
            .only(*_ASSIGN_FIELDS)
            .order_by("pk")
        )
        # Lock the version and read its status again: an archive (or delete) committing
        # between a check of the caller's copy and our insert would leave open deployments
        # of a retired version. Under the lock either retention sees these deployments and
        # refuses, or we see its change and refuse. Devices first, then the version: the
        # order start_rollout takes them in, so the two cannot deadlock.
        locked = ModelVersion.objects.select_for_update().filter(pk=version.pk).first()
        if locked is None:
            raise DeploymentError(f"{version.label} no longer exists.")
        if locked.status == VersionStatus.DRAFT:
            raise DeploymentError(f"{version.label} is a draft; publish it before assigning it to devices.")
        if not locked.is_published:
            raise DeploymentError(f"{version.label} is {locked.status}; only a published version goes to devices.")
        artifacts = list(locked.artifacts.all())
        # Devices alike get the same variant: a fleet of ten thousand is a handful of choices.
        chosen: dict[tuple, Artifact | None] = {}
        for device in devices:
            if device.enrollment != EnrollmentState.ACCEPTED:
                # It would never fetch the version nor report on it: a stage holding it never passes.
                result.skipped[device.device_id] = f"{device.device_id} is {device.enrollment}, not accepted"
                continue
            key = (_profile(device), tuple(_pinned(version, device)))
            if key not in chosen:
                chosen[key] = select_artifact(version, device, artifacts)
            artifact = chosen[key]
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
        record_many(events)
        device_pks = [d.device.pk for d in result.deployments]
        transaction.on_commit(lambda: enqueue_desired(device_pks))
    return result
