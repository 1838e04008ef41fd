"""The model registry: models, versions and their artifacts."""

from __future__ import annotations

import functools
import logging
from datetime import timedelta
from pathlib import Path
from typing import BinaryIO, cast

from django.conf import settings
from django.db import transaction
from django.db.models import Max, Q
from django.db.models.functions import Now
from django.utils import timezone

from agent.contract import wire
from agent.contract.manifest import build_manifest
from fleet import jobs, signing
from fleet.choices import (
    OPEN_PIPELINE_STATES,
    ArtifactRole,
    ArtifactStatus,
    HardwareClass,
    VariantQuality,
    VersionStatus,
)
from fleet.errors import Invalid, ServiceError
from fleet.lib.chunking import chunk_lengths
from fleet.lib.onnx_check import InvalidModel, inspect_onnx
from fleet.models import Artifact, Device, Model, ModelVersion, Tag, VariantPin, VersionTag
from fleet.services.audit import Actor, acting_user, record
from fleet.storage import get_store

log = logging.getLogger(__name__)

# Roles of the files that travel to devices, and so are signed at publish.
DEVICE_ROLES = (ArtifactRole.MODEL, ArtifactRole.MODEL_DATA, ArtifactRole.TOKENIZER, ArtifactRole.CONFIG)


class RegistryError(ServiceError):
    """A registry change that the current state does not allow; the text says why."""


class DuplicateArtifact(RegistryError):
    """The same file (same sha256) is already an artifact of the version."""


class ArtifactRejected(Invalid, ValueError):
    """An uploaded file that is not what it claims to be: not ONNX, truncated, an unloadable opset."""

    field = "file"


def create_model(*, name: str, description: str = "", actor: Actor) -> Model:
    with transaction.atomic():
        model = Model(name=name, description=description)
        model.full_clean()
        model.save()
        record(actor, "model.created", model, after={"name": name, "description": description})
    return model


def create_version(model: Model, *, actor: Actor, parent: ModelVersion | None = None, **fields) -> ModelVersion:
    """A new draft version, numbered one past the model's highest."""
    with transaction.atomic():
        # Lock the model row: two concurrent creates would otherwise take the same number.
        Model.objects.select_for_update().get(pk=model.pk)
        highest = model.versions.aggregate(n=Max("number"))["n"] or 0
        version = ModelVersion(model=model, number=highest + 1, parent=parent, created_by=acting_user(actor), **fields)
        version.full_clean()
        version.save()
        after = {"number": version.number, "parent": parent and parent.pk, **_audited(version, fields)}
        record(actor, "version.created", version, after=after)
    return version


def _audited(version: ModelVersion, fields: dict) -> dict:
    """The fields a version was created with, as the audit log keeps them (related rows by id)."""
    return {name: getattr(version, f"{name}_id", getattr(version, name)) for name in fields}


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
    """Store an uploaded file and queue its checks and chunk manifest; the version must still be a draft.

    The request only streams the file to disk, hashing it on the way: an ONNX model is
    parsed and checked by the worker (``process_artifact``), since parsing takes a few
    times the file's size in memory and files may be gigabytes. A refused upload (too
    large, a duplicate, a published version) leaves no file and no row behind.
    """
    store = get_store()
    incoming = store.save_incoming(stream, max_bytes=settings.ARTIFACT_MAX_BYTES)
    try:
        with transaction.atomic():
            # Lock the version: publishing it concurrently must not let a file in afterwards,
            # and two uploads of one file must not both pass the duplicate check.
            locked = ModelVersion.objects.select_for_update().get(pk=version.pk)
            _check_draft(locked)
            _check_not_duplicate(locked, incoming.sha256)
            artifact = Artifact(
                version=locked,
                role=role,
                filename=filename[:200],
                format=format,
                precision=precision,
                hardware_class=hardware_class,
                size=incoming.size,
                sha256=incoming.sha256,
                storage_key=incoming.key,
                created_by=acting_user(actor),
            )
            artifact.full_clean()
            artifact.save()
            record(actor, "artifact.uploaded", artifact, after={"filename": filename, "size": incoming.size})
            transaction.on_commit(lambda: jobs.enqueue("fleet.process_artifact", artifact.pk))
    except BaseException:
        store.delete(incoming.key)
        raise
    return artifact


def _is_onnx_model(role: str, format: str) -> bool:
    return role == ArtifactRole.MODEL and format == "onnx"


def _check_model_file(path: Path, *, allow_external_data: bool = False) -> dict:
    try:
        info = inspect_onnx(path, allow_external_data=allow_external_data)
    except InvalidModel as exc:
        raise ArtifactRejected(str(exc)) from None
    return {**info.signature, "opset": info.opset}


def _check_evaluation_set(path: Path) -> None:
    """An uploaded evaluation set must stay small once loaded: the plane loads it to build desired messages."""
    from fleet.lib import evaluation

    try:
        evaluation.check_set(path, max_bytes=settings.EVALUATION_SET_MAX_BYTES)
    except evaluation.EvaluationSetRejected as exc:
        raise ArtifactRejected(str(exc)) from None


def _check_gguf(path: Path) -> None:
    """Its metadata must read (memory-mapped, the tensors untouched); the conversion checks the rest."""
    from fleet.lib.gguf.reader import GGUFError, GGUFModel

    try:
        GGUFModel(path)
    except GGUFError as exc:
        raise ArtifactRejected(str(exc).split(": ", 1)[-1]) from None


def _check_draft(version: ModelVersion) -> None:
    if version.is_published:
        raise RegistryError(f"{version.label} is published and cannot change; create a new version instead.")


def _check_not_duplicate(version: ModelVersion, sha256: str) -> None:
    duplicate = version.artifacts.filter(sha256=sha256).first()
    if duplicate is not None:
        raise DuplicateArtifact(
            f"the same file (sha256 {sha256}) is already artifact {duplicate.pk} of {version.label}"
        )


def _io(signature: dict) -> tuple:
    return signature.get("inputs"), signature.get("outputs")


def reference_signature(version: ModelVersion) -> dict:
    """The signature of the version's first model artifact that is not a variant of another."""
    artifact = (
        version.artifacts.filter(role=ArtifactRole.MODEL, derived_from__isnull=True)
        .exclude(signature={})
        .order_by("id")
        .first()
    )
    return artifact.signature if artifact else {}


def _update_breaking(version: ModelVersion) -> None:
    """Flag the version when its model signature differs from its parent's."""
    if version.parent is None:
        return
    mine, parents = reference_signature(version), reference_signature(version.parent)
    breaking = bool(mine and parents and _io(mine) != _io(parents))
    if breaking != version.breaking:
        ModelVersion.objects.filter(pk=version.pk).update(breaking=breaking)
        version.breaking = breaking
        record("system", "version.breaking_changed", version, after={"breaking": breaking})


def add_generated_artifact(
    version: ModelVersion,
    path: Path,
    *,
    filename: str,
    actor: Actor,
    role: str = ArtifactRole.MODEL,
    precision: str = "",
    hardware_class: str = HardwareClass.ANY,
    format: str = "onnx",
    derived_from: Artifact | None = None,
    recipe: dict | None = None,
    quality: str = VariantQuality.UNEVALUATED,
    part_of: Artifact | None = None,
) -> Artifact:
    """A file the plane made itself (an import, a variant, an evaluation set): stored ready at once.

    Its model may keep its weights beside it (a generative bundle's model.onnx.data): the plane
    wrote both files, so the checker may follow the reference, which must name a sibling file.
    """
    signature = _check_model_file(path, allow_external_data=True) if _is_onnx_model(role, format) else {}
    manifest = _build_manifest(path, role)
    store = get_store()
    key = store.promote(store.copy_in(path), manifest.sha256)
    try:
        artifact = _create_generated(
            version,
            key,
            manifest,
            actor=actor,
            role=role,
            filename=filename,
            format=format,
            precision=precision,
            hardware_class=hardware_class,
            derived_from=derived_from,
            recipe=recipe,
            signature=signature,
            quality=quality,
            part_of=part_of,
        )
    except BaseException:
        # Content-addressed: the file may be another artifact's too, and then it stays.
        if not Artifact.objects.filter(storage_key=key).exists():
            store.delete(key)
        raise
    return artifact


def _create_generated(
    version: ModelVersion, key: str, manifest, *, actor: Actor, derived_from, recipe, signature, **fields
) -> Artifact:
    with transaction.atomic():
        locked = ModelVersion.objects.select_for_update().get(pk=version.pk)
        _check_draft(locked)
        _check_not_duplicate(locked, manifest.sha256)
        artifact = Artifact.objects.create(
            version=locked,
            **fields,
            status=ArtifactStatus.READY,
            size=manifest.size,
            sha256=manifest.sha256,
            storage_key=key,
            chunk_size=manifest.chunk_size,
            chunk_hashes=manifest.chunks,
            chunk_count=len(manifest.chunks),
            chunk_lengths=manifest.lengths,
            derived_from=derived_from,
            recipe=recipe or {},
            signature=signature,
            created_by=acting_user(actor),
        )
        record(
            actor,
            "artifact.generated",
            artifact,
            after={"sha256": manifest.sha256, "size": manifest.size, "derived_from": derived_from and derived_from.pk},
        )
        if signature and derived_from is None:
            _update_breaking(locked)
    return artifact


def _build_manifest(path: Path, role: str) -> wire.FileManifest:
    """Hash ``path`` chunk by chunk, cut as the settings say (fleet/lib/chunking.py)."""
    lengths = chunk_lengths(path, chunking=settings.ARTIFACT_CHUNKING, average=settings.ARTIFACT_CHUNK_SIZE)
    return build_manifest(path, role=role, chunk_size=settings.ARTIFACT_CHUNK_SIZE, lengths=lengths)  # type: ignore[arg-type]  # evaluation sets never reach the wire


def process_artifact(artifact_id: int) -> Artifact | None:
    """Check an uploaded file, build its chunk manifest and move it to its content address.

    Runs in the worker. An ONNX model that onnxruntime could not load fails here, with the
    reason in ``error``. Idempotent, and safe to run twice at once (a redelivered task, the
    sweep): a run first claims the artifact for ARTIFACT_PROCESSING_LEASE seconds, and a run
    that finds it claimed, or no longer processing, leaves it as it is. Past the lease its
    worker is presumed dead and the next run checks the file again; should the first still
    finish, whichever run finishes first decides, under the row's lock, and the other changes nothing.
    """
    artifact = _claim(artifact_id)
    if artifact is None:
        return Artifact.objects.select_related("version__model").filter(pk=artifact_id).first()
    path = get_store().path(artifact.storage_key)
    try:
        signature = _check_model_file(path) if _is_onnx_model(artifact.role, artifact.format) else {}
        if artifact.role == ArtifactRole.EVALUATION:
            _check_evaluation_set(path)
        if artifact.format == "gguf":
            _check_gguf(path)
        manifest = _build_manifest(path, artifact.role)
    except ArtifactRejected as exc:
        return _fail_processing(artifact, str(exc))
    except FileNotFoundError:
        # A run that claimed the artifact after this one's lease ran out finished first and moved the file.
        current = Artifact.objects.get(pk=artifact.pk)
        if current.status != ArtifactStatus.PROCESSING:
            return current
        raise
    duplicate = (
        Artifact.objects.filter(version=artifact.version, sha256=manifest.sha256).exclude(pk=artifact.pk).first()
    )
    if duplicate is not None:
        return _fail_processing(
            artifact, f"the same file (sha256 {manifest.sha256}) is already artifact {duplicate.pk}"
        )
    return _finish_processing(artifact, manifest, signature)


def _claim(artifact_id: int) -> Artifact | None:
    """The artifact, claimed by this run; None if it is not processing or another run's lease holds it."""
    lease = timedelta(seconds=settings.ARTIFACT_PROCESSING_LEASE)
    # Compare-and-swap, on the database's clock so that the workers' clocks need not agree:
    # of two runs given one artifact (a redelivered task), one claims it and the other leaves it.
    claimed = (
        Artifact.objects.filter(pk=artifact_id, status=ArtifactStatus.PROCESSING)
        .filter(Q(lease_expires_at__isnull=True) | Q(lease_expires_at__lte=Now()))
        .update(lease_expires_at=Now() + lease)
    )
    return Artifact.objects.select_related("version__model").get(pk=artifact_id) if claimed else None


def _finish_processing(artifact: Artifact, manifest: wire.FileManifest, signature: dict) -> Artifact:
    with transaction.atomic():
        # Lock the row: a run whose lease ran out must not mark it too, nor move a file it no longer holds.
        locked = Artifact.objects.select_for_update().get(pk=artifact.pk)
        if locked.status != ArtifactStatus.PROCESSING:
            return locked
        fields = {
            "status": ArtifactStatus.READY,
            "sha256": manifest.sha256,
            "size": manifest.size,
            "chunk_size": manifest.chunk_size,
            "chunk_hashes": manifest.chunks,
            "chunk_count": len(manifest.chunks),
            "chunk_lengths": manifest.lengths,
            "signature": signature,
            # Moved last: should the move fail, the row stays processing and the file where it was.
            "storage_key": get_store().promote(locked.storage_key, manifest.sha256),
        }
        for name, value in fields.items():
            setattr(locked, name, value)
        locked.save(update_fields=list(fields))
        record("system", "artifact.ready", locked, after={"sha256": manifest.sha256, "size": manifest.size})
        if signature:
            # Lock the version: two uploads processed at once must not both judge "breaking".
            _update_breaking(ModelVersion.objects.select_for_update().get(pk=locked.version_id))
    return locked


def _fail_processing(artifact: Artifact, error: str) -> Artifact:
    with transaction.atomic():
        # Lock the row: a run that finished first (its file moved, this one's check failing on it) decides.
        locked = Artifact.objects.select_for_update().get(pk=artifact.pk)
        if locked.status != ArtifactStatus.PROCESSING:
            return locked
        get_store().delete(locked.storage_key)
        locked.status, locked.error = ArtifactStatus.FAILED, error
        locked.save(update_fields=["status", "error"])
        record("system", "artifact.failed", locked, reason=error)
    log.warning("artifact %s failed: %s", locked.pk, error)
    return locked


def retry_stale_artifacts() -> list[int]:
    """Queue the check again for uploads left processing: their worker died (the lease ran out),
    or their task was lost (never claimed, a lease after the upload)."""
    lease = timedelta(seconds=settings.ARTIFACT_PROCESSING_LEASE)
    stale = Artifact.objects.filter(status=ArtifactStatus.PROCESSING).filter(
        Q(lease_expires_at__lte=Now()) | Q(lease_expires_at__isnull=True, created_at__lte=Now() - lease)
    )
    ids = list(stale.order_by("pk").values_list("pk", flat=True))
    for pk in ids:
        transaction.on_commit(functools.partial(jobs.enqueue, "fleet.process_artifact", pk))
    if ids:
        log.warning("checking %d upload(s) left processing again: %s", len(ids), ids)
    return ids


def publish_version(version: ModelVersion, *, actor: Actor) -> ModelVersion:
    """Freeze a draft: from here its files and metadata never change."""
    with transaction.atomic():
        locked = ModelVersion.objects.select_for_update().get(pk=version.pk)
        artifacts = list(locked.artifacts.all())
        if locked.pipelines.filter(state__in=OPEN_PIPELINE_STATES).exists():
            raise RegistryError(f"{locked.label} has an optimization pipeline running; publish when it is done.")
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
        signed = sign_artifacts(locked, artifacts)
        record(
            actor,
            "version.published",
            locked,
            before={"status": "draft"},
            after={"status": "published", "signed_artifacts": signed, "signing_key": signing.public_key()},
        )
    return locked


def sign_artifacts(version: ModelVersion, artifacts: list[Artifact]) -> list[int]:
    """Sign the manifest of every file a device may fetch; the version is frozen, so they never change."""
    signed = []
    for artifact in artifacts:
        if artifact.status != ArtifactStatus.READY or artifact.role not in DEVICE_ROLES:
            continue
        artifact.manifest_signature = signing.sign_file(
            file_manifest(artifact), model=version.model.name, version=str(version.number)
        )
        artifact.save(update_fields=["manifest_signature"])
        signed.append(artifact.pk)
    return signed


def pin_variant(
    artifact: Artifact, *, actor: Actor, device: Device | None = None, tag: Tag | None = None, reason: str = ""
) -> VariantPin:
    """Make ``artifact`` the variant its version gives this device, or every device with this tag."""
    with transaction.atomic():
        pin = VariantPin(
            version=artifact.version,
            artifact=artifact,
            device=device,
            tag=tag,
            reason=reason,
            created_by=acting_user(actor),
        )
        pin.full_clean()
        pin.save()
        record(actor, "variant.pinned", pin, after={"artifact": artifact.pk}, reason=reason)
    return pin


def unpin_variant(pin: VariantPin, *, actor: Actor) -> None:
    with transaction.atomic():
        record(actor, "variant.unpinned", pin, before={"artifact": pin.artifact_id})
        pin.delete()


def set_version_tags(version: ModelVersion, tags: dict[str, str], *, actor: Actor) -> ModelVersion:
    """Replace the version's tags. Tags annotate a release, so a published version takes them too."""
    with transaction.atomic():
        # Lock the version: two concurrent replacements would otherwise interleave their rows.
        locked = ModelVersion.objects.select_for_update().get(pk=version.pk)
        before = dict(locked.tags.values_list("key", "value"))
        rows = [VersionTag(version=locked, key=key, value=value) for key, value in sorted(tags.items())]
        for row in rows:
            row.full_clean(exclude=["version"], validate_unique=False)
        locked.tags.all().delete()
        VersionTag.objects.bulk_create(rows)
        record(actor, "version.tags_changed", locked, before={"tags": before}, after={"tags": dict(tags)})
    return locked


def file_manifest(artifact: Artifact) -> wire.FileManifest:
    return wire.FileManifest(
        role=cast(wire.FileRole, artifact.role),  # the model's choices are the wire's roles
        filename=artifact.filename,
        sha256=artifact.sha256,
        size=artifact.size,
        chunk_size=artifact.chunk_size,
        chunks=artifact.chunk_hashes,
        lengths=artifact.chunk_lengths,
        format=artifact.format,
        precision=artifact.precision,
        signature=artifact.manifest_signature,
    )
