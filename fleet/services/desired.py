"""Desired messages: what each device should run now, signed for it, and queuing their publication.

A device's current deployment is the newest one not replaced; its desired message lists the
deployment's files (manifests from the registry), how to run the model, the providers it
needs and the self-test it must pass before it activates.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Sequence

import msgspec
from django.conf import settings
from django.utils import timezone

from agent.contract import wire
from fleet import jobs, signing
from fleet.choices import ArtifactRole, ArtifactStatus, DeploymentState, HardwareClass, InferenceTask
from fleet.models import Artifact, Deployment, Device, ModelVersion
from fleet.services.registry import file_manifest

log = logging.getLogger(__name__)


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
