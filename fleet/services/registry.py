"""The model registry: models, versions and their artifacts."""

from __future__ import annotations

import logging
from typing import BinaryIO

from django.conf import settings
from django.db import transaction
from django.db.models import Max
from django.utils import timezone

from agent.manifest import build_manifest
from fleet.choices import ArtifactRole, ArtifactStatus, HardwareClass, VersionStatus
from fleet.models import Artifact, Model, ModelVersion
from fleet.services.audit import Actor, record
from fleet.storage import get_store

log = logging.getLogger(__name__)


class RegistryError(Exception):
    """A registry change that the current state does not allow; the text says why."""


def _user(actor: Actor):
    """The user behind an actor, or None for a device or the system."""
    return actor if not isinstance(actor, str) and actor and actor.is_authenticated else None


def create_model(*, name: str, description: str = "", actor: Actor) -> Model:
    with transaction.atomic():
        model = Model(name=name, description=description)
        model.full_clean()
        model.save()
        record(actor, "model.created", model, after={"name": name})
    return model


def create_version(model: Model, *, actor: Actor, parent: ModelVersion | None = None, **fields) -> ModelVersion:
    """A new draft version, numbered one past the model's highest."""
    with transaction.atomic():
        # Lock the model row: two concurrent creates would otherwise take the same number.
        Model.objects.select_for_update().get(pk=model.pk)
        highest = model.versions.aggregate(n=Max("number"))["n"] or 0
        version = ModelVersion(model=model, number=highest + 1, parent=parent, created_by=_user(actor), **fields)
        version.full_clean()
        version.save()
        record(actor, "version.created", version, after={"number": version.number, "parent": parent and parent.pk})
    return version


def update_version_notes(version: ModelVersion, *, notes: str, actor: Actor) -> ModelVersion:
    """Rewrite a draft's notes; a published version keeps the notes it was published with."""
    with transaction.atomic():
        # Lock the version: a concurrent publish must not let the notes change afterwards.
        locked = ModelVersion.objects.select_for_update().get(pk=version.pk)
        if locked.is_published:
            raise RegistryError(f"{locked.label} is published and cannot change; create a new version instead.")
        before = locked.notes
        locked.notes = notes
        locked.save(update_fields=["notes"])
        record(actor, "version.notes_changed", locked, before={"notes": before}, after={"notes": notes})
    return locked


def add_artifact(
    version: ModelVersion,
    stream: BinaryIO,
    *,
    filename: str,
    actor: Actor,
    role: str = ArtifactRole.MODEL,
    precision: str = "",
    hardware_class: str = HardwareClass.ANY,
    format: str = "onnx",
) -> Artifact:
    """Store an uploaded file and queue its hashing; the version must still be a draft."""
    store = get_store()
    key, size = store.save_incoming(stream, max_bytes=settings.ARTIFACT_MAX_BYTES)
    try:
        with transaction.atomic():
            # Lock the version: publishing it concurrently must not let a file in afterwards.
            locked = ModelVersion.objects.select_for_update().get(pk=version.pk)
            if locked.is_published:
                raise RegistryError(f"{locked.label} is published and cannot change; create a new version instead.")
            artifact = Artifact(
                version=locked,
                role=role,
                filename=filename[:200],
                format=format,
                precision=precision,
                hardware_class=hardware_class,
                size=size,
                storage_key=key,
                created_by=_user(actor),
            )
            artifact.full_clean()
            artifact.save()
            record(actor, "artifact.uploaded", artifact, after={"filename": filename, "size": size})
            transaction.on_commit(lambda: _enqueue_processing(artifact.pk))
    except BaseException:
        store.delete(key)
        raise
    return artifact


def _enqueue_processing(artifact_id: int) -> None:
    from fleet.tasks import process_artifact

    process_artifact.delay(artifact_id)


def process_artifact(artifact_id: int) -> Artifact | None:
    """Hash an uploaded file, build its chunk manifest and move it to its content address.

    Idempotent: an artifact that is no longer processing is left as it is.
    """
    artifact = Artifact.objects.select_related("version__model").filter(pk=artifact_id).first()
    if artifact is None or artifact.status != ArtifactStatus.PROCESSING:
        return artifact
    store = get_store()
    manifest = build_manifest(
        store.path(artifact.storage_key), role=artifact.role, chunk_size=settings.ARTIFACT_CHUNK_SIZE
    )
    duplicate = (
        Artifact.objects.filter(version=artifact.version, sha256=manifest.sha256).exclude(pk=artifact.pk).first()
    )
    if duplicate is not None:
        return _fail_processing(
            artifact, f"the same file (sha256 {manifest.sha256}) is already artifact {duplicate.pk}"
        )
    key = store.promote(artifact.storage_key, manifest.sha256)
    with transaction.atomic():
        changed = Artifact.objects.filter(pk=artifact.pk, status=ArtifactStatus.PROCESSING).update(
            status=ArtifactStatus.READY,
            storage_key=key,
            sha256=manifest.sha256,
            size=manifest.size,
            chunk_size=manifest.chunk_size,
            chunk_hashes=manifest.chunks,
        )
        if changed:
            artifact.refresh_from_db()
            record("system", "artifact.ready", artifact, after={"sha256": manifest.sha256, "size": manifest.size})
    return artifact


def _fail_processing(artifact: Artifact, error: str) -> Artifact:
    get_store().delete(artifact.storage_key)
    with transaction.atomic():
        Artifact.objects.filter(pk=artifact.pk, status=ArtifactStatus.PROCESSING).update(
            status=ArtifactStatus.FAILED, error=error
        )
        artifact.refresh_from_db()
        record("system", "artifact.failed", artifact, reason=error)
    log.warning("artifact %s failed: %s", artifact.pk, error)
    return artifact


def publish_version(version: ModelVersion, *, actor: Actor) -> ModelVersion:
    """Freeze a draft: from here its files and metadata never change."""
    with transaction.atomic():
        locked = ModelVersion.objects.select_for_update().get(pk=version.pk)
        artifacts = list(locked.artifacts.all())
        if any(a.status == ArtifactStatus.PROCESSING for a in artifacts):
            raise RegistryError(f"{locked.label} still has artifacts being processed; publish when they are ready.")
        if not any(a.role == ArtifactRole.MODEL and a.status == ArtifactStatus.READY for a in artifacts):
            raise RegistryError(f"{locked.label} has no ready model artifact; upload one first.")
        changed = ModelVersion.objects.filter(pk=locked.pk, status=VersionStatus.DRAFT).update(
            status=VersionStatus.PUBLISHED, published_at=timezone.now()
        )
        if not changed:
            raise RegistryError(f"{locked.label} is already published.")
        locked.refresh_from_db()
        record(actor, "version.published", locked, before={"status": "draft"}, after={"status": "published"})
    return locked
