"""Signed manifests, aliases and their history, version tags, and retention (issue 3)."""

import io

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from django.core.management import call_command

from agent.contract import signing
from fleet.choices import DeploymentState, VersionStatus
from fleet.models import Alias, AliasMove, Artifact, AuditEvent, Deployment, ModelVersion, Rollout
from fleet.services import aliases, assignments, registry, retention, rollouts
from fleet.services.desired import desired_message, desired_messages
from fleet.storage import get_store
from tests.fleet.helpers import (
    SIGNING_KEY,
    add_ready_artifact,
    make_device,
    make_model,
    make_published_version,
    make_version,
    token_client,
)

pytestmark = pytest.mark.django_db
STAGE = [{"device_count": 1}]


def plane_public_key():
    return signing.load_private_key(SIGNING_KEY).public_key()


# --- Signing ---------------------------------------------------------------------------


def test_it_signs_every_file_a_device_fetches_when_the_version_is_published():
    version = make_version(make_model("embedder"), task="embedding", pooling="mean")
    add_ready_artifact(version)
    registry.add_artifact(version, io.BytesIO(b'{"model": {}}'), filename="tokenizer.json", role="tokenizer",
                          format="tokenizer.json", actor="system")  # fmt: skip
    for artifact in version.artifacts.all():
        registry.process_artifact(artifact.pk)
    version = registry.publish_version(version, actor="system")
    device = make_device("dev-1")
    assignments.assign_version(version, [device], actor="system")

    message = desired_message(device)

    assert sorted(f.role for f in message.files) == ["model", "tokenizer"]
    for file in message.files:
        signing.verify_manifest(plane_public_key(), file, model=message.model, version=message.version)


def test_it_signs_each_desired_message_whole_for_its_device_with_a_growing_seq():
    # Issue #13, item 5: the agent verifies the message as a whole and refuses an older seq.
    version = make_published_version()
    device, other = make_device("dev-1"), make_device("dev-2")
    assignments.assign_version(version, [device], actor="system")

    first = desired_message(device)
    second, nothing = desired_messages([device, other])

    for message in (first, second, nothing):
        signing.verify_desired(plane_public_key(), message)
    assert (first.device_id, nothing.device_id, nothing.deployment_id) == ("dev-1", "dev-2", None)
    assert 0 < first.seq < second.seq < nothing.seq
    assert abs(first.seq / 1e6 - first.issued_at) < 1
    with pytest.raises(signing.SignatureError, match="signature invalid"):
        signing.verify_desired(plane_public_key(), msgspec.structs.replace(first, seq=second.seq))


def test_it_leaves_drafts_unsigned_and_a_foreign_key_does_not_verify_them():
    version = make_version()
    artifact = add_ready_artifact(version)
    assert artifact.manifest_signature == ""
    registry.publish_version(version, actor="system")
    file = registry.file_manifest(Artifact.objects.get(pk=artifact.pk))

    with pytest.raises(signing.SignatureError, match="signature invalid"):
        signing.verify_manifest(Ed25519PrivateKey.generate().public_key(), file, model="embedder", version="1")
    with pytest.raises(signing.SignatureError, match="signature invalid"):
        signing.verify_manifest(plane_public_key(), file, model="embedder", version="2")


def test_it_serves_the_public_key_to_anyone():
    response = token_client(None).get("/api/v1/signing-key/")

    assert response.status_code == 200
    assert response.json() == {"algorithm": "ed25519", "public_key": signing.public_key_text(plane_public_key())}


def test_it_generates_a_key_in_development_and_refuses_to_publish_without_one_in_production(settings, tmp_path):
    settings.SIGNING_KEY = ""
    settings.SIGNING_KEY_DEV_FILE = tmp_path / "signing.key"
    first = make_published_version("one")
    assert (tmp_path / "signing.key").stat().st_mode & 0o777 == 0o600
    second = make_published_version("two")
    key = signing.load_private_key((tmp_path / "signing.key").read_text()).public_key()
    for version in (first, second):
        artifact = version.artifacts.get()
        signing.verify_manifest(
            key, registry.file_manifest(artifact), model=version.model.name, version=str(version.number)
        )

    settings.SIGNING_KEY_DEV_FILE = None
    version = make_version(make_model("three"))
    add_ready_artifact(version)
    with pytest.raises(Exception, match="SIGNING_KEY"):
        registry.publish_version(version, actor="system")
    assert ModelVersion.objects.get(pk=version.pk).status == VersionStatus.DRAFT


def test_it_writes_a_new_key_file_and_prints_its_public_key(tmp_path, capsys):
    path = tmp_path / "keys" / "plane.key"

    call_command("generate_signing_key", str(path))

    printed = capsys.readouterr().out.strip()
    assert signing.public_key_text(signing.load_private_key(path.read_text())) == printed
    with pytest.raises(Exception, match="exists"):
        call_command("generate_signing_key", str(path))


# --- Aliases ---------------------------------------------------------------------------


def test_it_moves_an_alias_through_the_api_and_keeps_every_move(operator):
    one = make_published_version("embedder")
    two = make_published_version("embedder")
    client = token_client(operator)
    url = "/api/v1/models/embedder/aliases/stable/"

    assert client.get(url).status_code == 404
    assert (
        client.put(url, {"version": one.pk, "reason": "first"}, format="json").json()["version_label"] == "embedder:1"
    )
    response = client.put(url, {"version": two.pk, "reason": "better recall"}, format="json")

    assert response.status_code == 200, response.content
    assert client.get(url).json()["version"] == two.pk
    history = client.get(url + "history/").json()
    assert [(m["from_label"], m["to_label"], m["actor"], m["reason"]) for m in history] == [
        ("embedder:1", "embedder:2", "user:olivia", "better recall"),
        ("", "embedder:1", "user:olivia", "first"),
    ]
    assert AuditEvent.objects.filter(action="alias.moved").count() == 2
    assert client.get("/api/v1/versions/embedder:stable/").json()["id"] == two.pk
    assert client.get("/api/v1/versions/embedder:1/").json()["id"] == one.pk
    assert client.get("/api/v1/versions/embedder:nope/").status_code == 404


def test_it_moves_an_alias_only_from_the_version_the_client_expects(operator):
    one = make_published_version("embedder")
    two = make_published_version("embedder")
    aliases.move_alias(one.model, "stable", one, actor="system")
    client = token_client(operator)
    url = "/api/v1/models/embedder/aliases/stable/"

    stale = client.put(url, {"version": two.pk, "expected_version": two.pk}, format="json")
    fresh = client.put(url, {"version": two.pk, "expected_version": one.pk}, format="json")

    assert stale.status_code == 409
    assert "points at embedder:1" in stale.json()["detail"]
    assert fresh.status_code == 200
    assert AliasMove.objects.count() == 2


@pytest.mark.parametrize("problem", ["draft", "other model", "bad name"])
def test_it_refuses_an_alias_on_a_draft_another_models_version_or_a_bad_name(operator, problem):
    published = make_published_version("embedder")
    target = {"draft": make_version(published.model), "other model": make_published_version("other")}.get(
        problem, published
    )
    name = "1234" if problem == "bad name" else "stable"

    response = token_client(operator).put(
        f"/api/v1/models/embedder/aliases/{name}/", {"version": target.pk}, format="json"
    )

    assert response.status_code in (400, 409), response.content
    assert not Alias.objects.exists()


def test_it_lets_only_release_writers_move_an_alias(viewer):
    version = make_published_version("embedder")

    response = token_client(viewer).put(
        "/api/v1/models/embedder/aliases/stable/", {"version": version.pk}, format="json"
    )

    assert response.status_code == 403


def test_it_resolves_a_rollouts_alias_when_it_starts_and_records_the_version(operator):
    one = make_published_version("embedder")
    two = make_published_version("embedder")
    aliases.move_alias(one.model, "stable", one, actor="system")
    make_device("dev-1", tags=["lab"])
    client = token_client(operator)

    created = client.post(
        "/api/v1/rollouts/", {"alias": "embedder:stable", "selector": {"tags": ["lab"]}, "stages": STAGE}, format="json"
    )
    assert created.status_code == 201, created.content
    assert (created.json()["alias"], created.json()["version_label"]) == ("embedder:stable", "embedder:1")
    aliases.move_alias(one.model, "stable", two, actor="system", reason="promote")

    started = client.post(f"/api/v1/rollouts/{created.json()['id']}/start/", {}, format="json")

    assert started.status_code == 200, started.content
    assert started.json()["version_label"] == "embedder:2"
    assert Deployment.objects.get().version == two
    event = AuditEvent.objects.get(action="rollout.alias_resolved")
    assert (event.before, event.after) == (
        {"version": "embedder:1"},
        {"alias": "embedder:stable", "version": "embedder:2"},
    )


def test_it_refuses_a_rollout_of_an_unknown_alias(operator):
    make_published_version("embedder")

    response = token_client(operator).post(
        "/api/v1/rollouts/", {"alias": "embedder:nope", "selector": {"tags": ["lab"]}, "stages": STAGE}, format="json"
    )

    assert response.status_code == 400
    assert "names no alias" in response.content.decode()


# --- Tags --------------------------------------------------------------------------------


def test_it_tags_versions_and_filters_them_by_tag(operator):
    one = make_published_version("embedder")
    two = make_published_version("embedder")
    client = token_client(operator)

    response = client.put(
        f"/api/v1/versions/{one.pk}/tags/", {"tags": {"dataset": "msmarco", "blessed": ""}}, format="json"
    )
    client.put(f"/api/v1/versions/{two.pk}/tags/", {"tags": {"dataset": "nli"}}, format="json")

    assert response.status_code == 200, response.content
    assert response.json()["tags"] == {"blessed": "", "dataset": "msmarco"}
    ids = lambda query: [v["id"] for v in client.get("/api/v1/versions/", {"tag": query}).json()["results"]]  # noqa: E731
    assert ids("dataset") == [two.pk, one.pk]
    assert ids("dataset=msmarco") == [one.pk]
    assert ids("blessed") == [one.pk]
    assert AuditEvent.objects.filter(action="version.tags_changed").count() == 2


# --- Retention ---------------------------------------------------------------------------


def test_it_archives_a_version_nothing_needs_and_never_offers_it_again(operator):
    version = make_published_version("embedder")
    client = token_client(operator)

    response = client.post(f"/api/v1/versions/{version.pk}/archive/", {"reason": "superseded"}, format="json")

    assert response.status_code == 200, response.content
    assert response.json()["status"] == "archived"
    assert Artifact.objects.filter(version=version).exists()
    assert get_store().path(version.artifacts.get().storage_key).exists()
    with pytest.raises(assignments.DeploymentError):
        assignments.assign_version(ModelVersion.objects.get(pk=version.pk), [make_device()], actor="system")
    assert AuditEvent.objects.get(action="version.archived").reason == "superseded"


def test_it_refuses_to_archive_or_delete_a_version_that_is_still_needed_and_says_why(operator):
    version = make_published_version("embedder")
    device = make_device("dev-1", tags=["lab"])
    deployment = assignments.assign_version(version, [device], actor="system").deployments[0]
    aliases.move_alias(version.model, "stable", version, actor="system")
    rollouts.create_rollout(version, stages=[{"device_count": 1}], tags=["lab"], actor="system")
    client = token_client(operator)

    archive = client.post(f"/api/v1/versions/{version.pk}/archive/", {}, format="json")
    delete = client.delete(f"/api/v1/versions/{version.pk}/")

    assert archive.status_code == delete.status_code == 409
    for reason in ("1 open deployment(s)", "alias(es) embedder:stable", "unfinished rollout(s)"):
        assert reason in archive.json()["detail"]
    Deployment.objects.filter(pk=deployment.pk).update(state=DeploymentState.ACTIVE)
    device.current_version = version
    device.save()
    assert "dev-1 run(s) it" in client.post(f"/api/v1/versions/{version.pk}/archive/").json()["detail"]
    assert ModelVersion.objects.get(pk=version.pk).status == VersionStatus.PUBLISHED


def test_it_deletes_an_unused_version_and_only_the_files_no_other_artifact_shares(
    operator, django_capture_on_commit_callbacks
):
    keep = make_published_version("embedder")
    shared = keep.artifacts.get()
    doomed = make_version(keep.model)
    add_ready_artifact(doomed, get_store().path(shared.storage_key).read_bytes())  # the same file, deduplicated
    own = add_ready_artifact(doomed, precision="int8")
    client = token_client(operator)

    with django_capture_on_commit_callbacks(execute=True):
        response = client.delete(f"/api/v1/versions/{doomed.pk}/?reason=bad+upload")

    assert response.status_code == 204, response.content
    assert not ModelVersion.objects.filter(pk=doomed.pk).exists()
    assert get_store().path(shared.storage_key).exists()
    assert not get_store().path(own.storage_key).exists()
    assert AuditEvent.objects.get(action="version.deleted").reason == "bad upload"


def test_it_refuses_to_delete_a_version_with_history_and_offers_archiving(operator):
    version = make_published_version("embedder")
    deployment = assignments.assign_version(version, [make_device()], actor="system").deployments[0]
    Deployment.objects.filter(pk=deployment.pk).update(state=DeploymentState.FAILED)

    with pytest.raises(retention.RetentionRefused, match="1 deployment\\(s\\) in the history.*Archive it instead"):
        retention.delete_version(version, actor="system")
    assert retention.archive_version(version, actor="system").status == VersionStatus.ARCHIVED
    assert not Rollout.objects.exists()


# --- Admin -------------------------------------------------------------------------------


@pytest.fixture
def admin_client(client, django_user_model):
    client.force_login(django_user_model.objects.create_superuser("root", "root@example.com", "x"))
    return client


def test_it_moves_an_alias_in_the_admin_through_the_service_and_shows_its_history(admin_client):
    one = make_published_version("embedder")
    two = make_published_version("embedder")
    inline = {"moves-TOTAL_FORMS": 0, "moves-INITIAL_FORMS": 0}
    add = admin_client.post(
        "/admin/fleet/alias/add/",
        {"model": one.model.pk, "name": "stable", "version": one.pk, "reason": "first", **inline},
    )
    alias = Alias.objects.get()
    move = admin_client.post(
        f"/admin/fleet/alias/{alias.pk}/change/",
        {"version": two.pk, "reason": "better", **inline, "moves-INITIAL_FORMS": 1, "moves-TOTAL_FORMS": 1},
    )

    assert (add.status_code, move.status_code) == (302, 302)
    assert Alias.objects.get().version == two
    assert [m.reason for m in AliasMove.objects.all()] == ["better", "first"]
    assert "better" in admin_client.get(f"/admin/fleet/alias/{alias.pk}/change/").content.decode()
    assert "stable" in admin_client.get(f"/admin/fleet/model/{one.model.pk}/change/").content.decode()


def test_it_archives_from_the_admin_and_shows_why_it_cannot(admin_client):
    free = make_published_version("embedder")
    aliased = make_published_version("embedder")
    aliases.move_alias(aliased.model, "stable", aliased, actor="system")

    response = admin_client.post(
        "/admin/fleet/modelversion/",
        {"action": "archive", "_selected_action": [free.pk, aliased.pk]},
        follow=True,
    )

    assert ModelVersion.objects.get(pk=free.pk).status == VersionStatus.ARCHIVED
    assert ModelVersion.objects.get(pk=aliased.pk).status == VersionStatus.PUBLISHED
    assert "alias(es) embedder:stable point at it" in response.content.decode()
