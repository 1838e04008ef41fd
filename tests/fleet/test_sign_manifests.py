"""``manage.py sign_manifests``: versions published before signing get signed once, with the publish code."""

from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from agent.contract import signing
from fleet.models import Artifact, AuditEvent
from fleet.services.registry import file_manifest
from tests.fleet.helpers import SIGNING_KEY, make_published_version, make_version

pytestmark = pytest.mark.django_db


def published_unsigned(model_name: str = "embedder"):
    """A version as one published before the plane signed: its artifacts carry no signature."""
    version = make_published_version(model_name)
    version.artifacts.update(manifest_signature="")
    return version


def sign(*args: str) -> str:
    out = StringIO()
    call_command("sign_manifests", *args, stdout=out)
    return out.getvalue()


def test_it_signs_the_unsigned_artifacts_of_published_versions_so_agents_verify_them():
    version = published_unsigned()

    output = sign("--all")

    artifact = Artifact.objects.get(version=version)
    public = signing.load_private_key(SIGNING_KEY).public_key()
    signing.verify_manifest(public, file_manifest(artifact), model="embedder", version=str(version.number))
    assert f"{version.label}: signed 1 artifact(s) ({artifact.pk})" in output
    assert "Signed 1 artifact(s) of 1 version(s)." in output
    event = AuditEvent.objects.get(action="version.manifests_signed")
    assert (event.object_id, event.after["signed_artifacts"]) == (str(version.pk), [artifact.pk])


def test_it_changes_nothing_when_run_again():
    version = published_unsigned()
    sign("--all")
    signature = Artifact.objects.get(version=version).manifest_signature

    output = sign("--all")

    assert "Signed 0 artifact(s) of 0 version(s)." in output
    assert Artifact.objects.get(version=version).manifest_signature == signature
    assert AuditEvent.objects.filter(action="version.manifests_signed").count() == 1


def test_a_dry_run_lists_what_it_would_sign_and_signs_nothing():
    version = published_unsigned()

    output = sign("--all", "--dry-run")

    assert f"{version.label}: would sign 1 artifact(s)" in output
    assert Artifact.objects.get(version=version).manifest_signature == ""
    assert not AuditEvent.objects.filter(action="version.manifests_signed").exists()


def test_it_signs_only_the_named_model_and_leaves_drafts_alone():
    mine = published_unsigned("embedder")
    other = published_unsigned("classifier")
    draft = make_version(mine.model)

    sign("--model", "embedder")

    assert Artifact.objects.get(version=mine).manifest_signature != ""
    assert Artifact.objects.get(version=other).manifest_signature == ""
    assert not draft.artifacts.exclude(manifest_signature="").exists()


def test_it_asks_which_versions_and_knows_the_model():
    with pytest.raises(CommandError, match="one of the arguments --model --all is required"):
        sign()
    with pytest.raises(CommandError, match="no model named 'nope'"):
        sign("--model", "nope")
