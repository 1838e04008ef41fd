"""Deployments: which version each device should run, and how far it has got."""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import msgspec
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from agent import wire
from fleet import jobs, signing
from fleet.choices import (
    DEPLOYMENT_PROGRESS,
    OPEN_DEPLOYMENT_STATES,
    UNOFFERED_QUALITIES,
    ArtifactRole,
    ArtifactStatus,
    DeploymentState,
    EnrollmentState,
    HardwareClass,
    InferenceTask,
    VariantQuality,
    VersionStatus,
)
from fleet.errors import ServiceError
from fleet.lib import variants
from fleet.models import Artifact, AuditEvent, Deployment, Device, ModelVersion, VariantPin
from fleet.services.audit import Actor, acting_user, audit_event, record, record_many
from fleet.services.registry import file_manifest

log = logging.getLogger(__name__)


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


def enqueue_desired(device_pks: list[int]) -> None:
    """Queue publishing these devices' desired state; call it only after commit."""
    # Keep each task small enough to retry cheaply.
    for start in range(0, len(device_pks), 1000):
        jobs.enqueue("fleet.publish_desired", device_pks[start : start + 1000])


def current_deployment(device: Device) -> Deployment | None:
    """The newest deployment that has not been replaced: what the device should run."""
    return (
        device.deployments.exclude(state=DeploymentState.SUPERSEDED)
        .select_related("version__model", "artifact")
        .order_by("-id")
        .first()
    )


def current_deployments(device_pks: Iterable[int]) -> dict[int, Deployment]:
    """``current_deployment`` of many devices in one query: device pk -> its deployment."""
    found: dict[int, Deployment] = {}
    rows = (
        Deployment.objects.filter(device__in=list(device_pks))
        .exclude(state=DeploymentState.SUPERSEDED)
        .select_related("version__model")
        .order_by("device_id", "-id")
    )
    for deployment in rows:
        found.setdefault(deployment.device_id, deployment)
    # One object per artifact, not one per device: a fan-out's thousand deployments share one
    # file, and its row (the chunk hashes) is most of what the join read.
    artifacts = Artifact.objects.in_bulk({d.artifact_id for d in found.values()})
    for deployment in found.values():
        deployment.artifact = artifacts[deployment.artifact_id]
    return found


def desired_message(device: Device, *, deployment: Deployment | None = None) -> wire.Desired:
    deployment = deployment or current_deployment(device)
    return _desired(device, deployment, _VersionFiles.load([deployment.version] if deployment else []))


def desired_messages(devices: Sequence[Device]) -> list[wire.Desired]:
    """Each device's desired state, in order, with a handful of queries for the whole list."""
    current = current_deployments(d.pk for d in devices)
    files = _VersionFiles.load({d.version_id: d.version for d in current.values()}.values())
    return [_desired(device, current.get(device.pk), files) for device in devices]


def _desired(device: Device, deployment: Deployment | None, files: _VersionFiles) -> wire.Desired:
    # Signed whole, for this device, with a seq the agent requires to grow (fleet.signing).
    return signing.sign_desired(_unsigned_desired(device, deployment, files))


def _unsigned_desired(device: Device, deployment: Deployment | None, files: _VersionFiles) -> wire.Desired:
    now = timezone.now().timestamp()
    if deployment is None:
        return wire.Desired(device_id=device.device_id, deployment_id=None, issued_at=now)
    version = deployment.version
    return wire.Desired(
        device_id=device.device_id,
        deployment_id=deployment.pk,
        model=version.model.name,
        version=str(version.number),
        files=[
            files.manifest(deployment.artifact),
            *files.parts.get(deployment.artifact_id, []),
            *files.tokenizers.get(version.pk, []),
        ],
        inference=msgspec.convert(
            {
                "task": version.task,
                "pooling": version.pooling,
                "normalize": version.normalize,
                "max_length": version.max_length,
            },
            wire.InferenceSpec,
        ),
        issued_at=now,
        providers=variant_providers(deployment.artifact),
        selftest=files.selftest(version, deployment.artifact_id),
    )


class _VersionFiles:
    """What the desired messages of a batch share, read once per version: manifests and self-tests."""

    def __init__(
        self,
        tokenizers: dict[int, list[wire.FileManifest]],
        evaluations: dict[int, Artifact],
        parts: dict[int, list[wire.FileManifest]] | None = None,
    ) -> None:
        # Per version: its tokenizer files and, for a generate version, its genai_config.json.
        self.tokenizers = tokenizers
        self.evaluations = evaluations
        # Per model artifact: the files that go with it (its external weights).
        self.parts = parts or {}
        self._manifests: dict[int, wire.FileManifest] = {}

    @classmethod
    def load(cls, versions: Iterable[ModelVersion]) -> _VersionFiles:
        pks = [v.pk for v in versions]
        tokenizers: dict[int, list[wire.FileManifest]] = {}
        evaluations: dict[int, Artifact] = {}
        parts: dict[int, list[wire.FileManifest]] = {}
        if pks:
            roles = (ArtifactRole.TOKENIZER, ArtifactRole.CONFIG, ArtifactRole.MODEL_DATA, ArtifactRole.EVALUATION)
            rows = Artifact.objects.filter(version__in=pks, role__in=roles, status=ArtifactStatus.READY).order_by("pk")
            for artifact in rows:
                if artifact.role in (ArtifactRole.TOKENIZER, ArtifactRole.CONFIG):
                    tokenizers.setdefault(artifact.version_id, []).append(file_manifest(artifact))
                elif artifact.role == ArtifactRole.MODEL_DATA and artifact.part_of_id is not None:
                    parts.setdefault(artifact.part_of_id, []).append(file_manifest(artifact))
                else:
                    # The newest evaluation set: one built from the version's current fp32 source.
                    evaluations[artifact.version_id] = artifact
        return cls(tokenizers, evaluations, parts)

    def manifest(self, artifact: Artifact) -> wire.FileManifest:
        if artifact.pk not in self._manifests:
            self._manifests[artifact.pk] = file_manifest(artifact)
        return self._manifests[artifact.pk]

    def selftest(self, version: ModelVersion, artifact_id: int | None = None) -> wire.SelfTest | None:
        evaluation_set = self.evaluations.get(version.pk)
        if evaluation_set is not None and version.task == InferenceTask.GENERATE and artifact_id is not None:
            from fleet.services.generative import selftest_for

            return selftest_for(evaluation_set, artifact_id)
        if evaluation_set is None or version.task != InferenceTask.EMBEDDING:
            return None
        try:
            return _selftest(
                evaluation_set.sha256, evaluation_set.storage_key,
                version.pooling, version.normalize, version.quality_threshold,
            )  # fmt: skip
        except (OSError, ValueError, KeyError) as exc:
            # Not cached: the next message tries again. The agent falls back to its smoke test.
            log.warning("evaluation set %s of %s is unreadable; no self-test shipped: %s",
                        evaluation_set.sha256, version.label, exc)  # fmt: skip
            return None


# How many evaluation sentences a device runs before it activates, and the room they may take
# in the desired message (wire.MAX_MESSAGE_BYTES is 64 KiB; the file manifests need the rest).
SELFTEST_TEXTS = 4
SELFTEST_MAX_BYTES = 24 * 1024
# The expected embeddings are the fp32 reference; the device runs a variant (int8, int4, fp16)
# that the pipeline accepted for a *mean* cosine ≥ quality_threshold over the whole set. One
# sentence may sit a little below the mean, so the device is held to the threshold minus this.
SELFTEST_COSINE_MARGIN = 0.02
# Five decimals of a unit vector: a cosine error under 1e-5, a third of the bytes of full floats.
SELFTEST_DECIMALS = 5


@functools.lru_cache(maxsize=64)
def _selftest(sha256: str, storage_key: str, pooling: str, normalize: bool, threshold: float) -> wire.SelfTest | None:
    """Up to SELFTEST_TEXTS real sentences of the evaluation set and their fp32 embeddings.

    Cached by the set's content: an evaluation set is immutable, so a fan-out reads it once.
    """
    from fleet.lib import evaluation
    from fleet.storage import get_store

    path = get_store().path(storage_key)
    # Bounded: a set's arrays are checked against the limit before any is loaded.
    inputs, outputs = evaluation.load_set(path, max_bytes=settings.EVALUATION_SET_MAX_BYTES)
    texts = evaluation.load_texts(path, max_bytes=settings.EVALUATION_SET_MAX_BYTES)
    if not texts or not outputs:
        return None
    reference = next(iter(outputs.values()))
    vectors = evaluation.device_embeddings(reference, inputs.get("attention_mask"), pooling, normalize)
    cases = [
        (text, [round(float(x), SELFTEST_DECIMALS) for x in vector])
        for text, vector in zip(texts[:SELFTEST_TEXTS], vectors, strict=False)
    ]
    min_cosine = max(0.0, round(threshold - SELFTEST_COSINE_MARGIN, 4))
    while cases:
        test = wire.SelfTest(texts=[t for t, _ in cases], embeddings=[e for _, e in cases], min_cosine=min_cosine)
        if len(msgspec.json.encode(test)) <= SELFTEST_MAX_BYTES:
            return test
        cases.pop()
    return None


def variant_providers(artifact: Artifact) -> list[str]:
    """Execution providers the variant cannot run without; the CPU provider goes without saying.

    A recipe may name them (``recipe["providers"]``); an fp16 build for macOS arm64 is made
    for CoreML, and on the CPU provider it would run slower than the fp32 it replaces.
    """
    named = artifact.recipe.get("providers") if isinstance(artifact.recipe, dict) else None
    if named is None and artifact.precision == "fp16" and artifact.hardware_class == HardwareClass.DARWIN_ARM64:
        named = ["CoreMLExecutionProvider"]
    return [str(p) for p in (named or []) if p != "CPUExecutionProvider"][:8]


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
