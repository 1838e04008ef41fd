"""Signing the manifests of versions published before the plane signed anything.

A version is signed as it is published (registry.publish_version). Versions published
earlier have unsigned artifacts, which an agent that requires signatures refuses. This
signs them afterwards with the very code publish uses, one version per transaction, and
only what is unsigned: running it again changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from django.db import transaction
from django.db.models import QuerySet

from fleet import signing
from fleet.choices import ArtifactStatus, VersionStatus
from fleet.models import Artifact, ModelVersion
from fleet.services import registry
from fleet.services.audit import Actor, record


@dataclass(frozen=True)
class Signed:
    """What one version got: the artifacts signed now (or, in a dry run, that would be)."""

    version: ModelVersion
    artifact_ids: list[int]


def unsigned_artifacts(version: ModelVersion) -> QuerySet[Artifact]:
    """The files of the version a device may fetch that carry no signature yet."""
    return version.artifacts.filter(
        status=ArtifactStatus.READY, role__in=registry.DEVICE_ROLES, manifest_signature=""
    ).order_by("pk")


def versions_to_sign(model: str | None = None) -> QuerySet[ModelVersion]:
    """Published versions with at least one unsigned device file; of one model when named."""
    versions = ModelVersion.objects.filter(
        status=VersionStatus.PUBLISHED,
        artifacts__status=ArtifactStatus.READY,
        artifacts__role__in=registry.DEVICE_ROLES,
        artifacts__manifest_signature="",
    )
    if model is not None:
        versions = versions.filter(model__name=model)
    return versions.select_related("model").distinct().order_by("model__name", "number")


def sign_version_manifests(version: ModelVersion, *, actor: Actor, dry_run: bool = False) -> Signed:
    """Sign the version's unsigned device files, with an audit record; nothing to sign, nothing written."""
    with transaction.atomic():
        # Lock the version: a second run (or an archive) at the same moment would otherwise
        # sign the same files twice and write two records, or sign a version being retired.
        locked = ModelVersion.objects.select_for_update().select_related("model").get(pk=version.pk)
        if locked.status != VersionStatus.PUBLISHED:
            return Signed(locked, [])
        artifacts = list(unsigned_artifacts(locked))
        if dry_run or not artifacts:
            return Signed(locked, [a.pk for a in artifacts])
        # The very function publish_version signs with, given only the unsigned files.
        signed = registry.sign_artifacts(locked, artifacts)
        record(
            actor,
            "version.manifests_signed",
            locked,
            after={"signed_artifacts": signed, "signing_key": signing.public_key()},
            reason="signed after publishing: published before the plane signed manifests",
        )
    return Signed(locked, signed)


def sign_unsigned_manifests(*, actor: Actor, model: str | None = None, dry_run: bool = False) -> Iterator[Signed]:
    """Each published version with unsigned files, signed in turn; yields as it goes, for progress."""
    for version in versions_to_sign(model):
        yield sign_version_manifests(version, actor=actor, dry_run=dry_run)
