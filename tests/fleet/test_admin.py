"""The admin renders every page for a superuser, and its writes go through the services."""

import pytest
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.contrib.auth.models import User
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse

from agent.contract import wire
from fleet.choices import ArtifactStatus, VersionStatus
from fleet.models import Artifact, AuditEvent, Deployment, Device, Heartbeat, Model, ModelVersion, Tag
from fleet.services import assignments, registry, reports
from tests.fleet.helpers import (
    add_ready_artifact,
    make_device,
    make_model,
    make_published_version,
    make_version,
    onnx_bytes,
)
from tests.fleet.test_api_devices import store_heartbeats

MODELS = [Model, ModelVersion, Artifact, Tag, Device, Deployment, Heartbeat, AuditEvent]


def url(model, view, *args):
    return reverse(f"admin:fleet_{model._meta.model_name}_{view}", args=args)


def empty_inlines(*prefixes):
    """The management forms of read-only inlines that a change form posts back."""
    data = {}
    for prefix in prefixes:
        data |= {f"{prefix}-TOTAL_FORMS": "0", f"{prefix}-INITIAL_FORMS": "0", f"{prefix}-MAX_NUM_FORMS": "0"}
    return data


@pytest.fixture
def admin_client(db, client):
    client.force_login(User.objects.create_superuser("root", "root@example.com", "correct horse battery staple"))
    return client


@pytest.fixture
def fleet(db):
    """One of everything: a device running a published version, with heartbeats and a draft beside it."""
    device = make_device("dev-1", tags=["lab"])
    version = make_published_version(notes="first")
    add_ready_artifact(make_version(version.model))
    deployment = assignments.assign_version(version, [device], actor="system").deployments[0]
    report = wire.StateReport(
        device_id="dev-1", deployment_id=deployment.pk, state="active", sha256=deployment.artifact.sha256, sent_at=1
    )
    reports.record_state(device, report)
    store_heartbeats(device, 3)
    return device


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m._meta.model_name)
def test_it_renders_the_changelist_and_change_page_of_every_model(admin_client, fleet, model):
    obj = model.objects.first()

    assert admin_client.get(url(model, "changelist")).status_code == 200
    assert admin_client.get(url(model, "changelist"), {"q": "dev"}).status_code == 200
    assert admin_client.get(url(model, "change", obj.pk)).status_code == 200


@pytest.mark.parametrize("model", [Model, ModelVersion, Artifact], ids=lambda m: m._meta.model_name)
def test_it_renders_the_add_page_where_operators_create(admin_client, model):
    assert admin_client.get(url(model, "add")).status_code == 200


@pytest.mark.parametrize("model", [Tag, Device, Deployment, Heartbeat, AuditEvent], ids=lambda m: m._meta.model_name)
def test_it_has_no_add_page_for_what_devices_and_services_record(admin_client, model):
    assert admin_client.get(url(model, "add")).status_code == 403


def test_it_lets_nobody_change_or_delete_the_audit_log(admin_client, fleet):
    event = AuditEvent.objects.first()

    page = admin_client.get(url(AuditEvent, "change", event.pk))
    delete = admin_client.post(url(AuditEvent, "delete", event.pk), {"post": "yes"})

    assert b'name="_save"' not in page.content
    assert delete.status_code == 403
    assert AuditEvent.objects.filter(pk=event.pk).exists()


def test_it_shows_a_published_version_read_only(admin_client, fleet):
    version = ModelVersion.objects.get(status=VersionStatus.PUBLISHED)

    page = admin_client.get(url(ModelVersion, "change", version.pk))
    post = admin_client.post(url(ModelVersion, "change", version.pk), {"notes": "rewritten"})

    assert b'name="_save"' not in page.content
    assert post.status_code == 403
    version.refresh_from_db()
    assert version.notes == "first"


def test_it_creates_a_model_through_the_registry(admin_client):
    response = admin_client.post(url(Model, "add"), {"name": "minilm", "description": "Embedder"})

    assert response.status_code == 302
    assert Model.objects.get().name == "minilm"
    assert AuditEvent.objects.get(action="model.created").actor_label == "user:root"


def test_it_creates_a_version_through_the_registry(admin_client):
    model = make_model("minilm")
    data = {"model": model.pk, "parent": "", "notes": "n", "task": "embedding", "pooling": "mean", "max_length": 128}

    response = admin_client.post(url(ModelVersion, "add"), data)

    assert response.status_code == 302
    version = ModelVersion.objects.get()
    assert (version.label, version.pooling, version.created_by.username) == ("minilm:1", "mean", "root")
    assert AuditEvent.objects.filter(action="version.created", actor_label="user:root").exists()


def test_it_changes_a_drafts_notes_through_the_registry(admin_client):
    version = make_version(notes="old")

    response = admin_client.post(
        url(ModelVersion, "change", version.pk), {"notes": "new", **empty_inlines("artifacts")}
    )

    assert response.status_code == 302
    version.refresh_from_db()
    assert version.notes == "new"
    assert AuditEvent.objects.get(action="version.notes_changed").actor_label == "user:root"


def test_it_publishes_with_the_admin_action(admin_client):
    ready = make_version()
    add_ready_artifact(ready)
    empty = make_version(ready.model)

    response = admin_client.post(
        url(ModelVersion, "changelist"),
        {"action": "publish", ACTION_CHECKBOX_NAME: [ready.pk, empty.pk], "index": "0"},
        follow=True,
    )

    messages = [str(m) for m in response.context["messages"]]
    assert "Published embedder:1." in messages
    assert "embedder:2 has no ready model artifact; upload one first." in messages
    assert ModelVersion.objects.get(pk=ready.pk).status == VersionStatus.PUBLISHED
    assert ModelVersion.objects.get(pk=empty.pk).status == VersionStatus.DRAFT
    assert AuditEvent.objects.get(action="version.published").actor_label == "user:root"


@pytest.mark.django_db(transaction=True)
def test_it_uploads_an_artifact_through_the_registry(admin_client):
    version = make_version()
    data = {
        "version": version.pk,
        "file": SimpleUploadedFile("model.onnx", onnx_bytes()),
        "role": "model",
        "precision": "int8",
        "hardware_class": "any",
        "format": "onnx",
    }

    response = admin_client.post(url(Artifact, "add"), data)

    assert response.status_code == 302
    artifact = Artifact.objects.get()
    assert (artifact.status, artifact.precision, artifact.created_by.username) == (ArtifactStatus.READY, "int8", "root")
    assert AuditEvent.objects.get(action="artifact.uploaded").actor_label == "user:root"


def test_it_offers_only_drafts_for_an_upload(admin_client):
    published = make_published_version()

    response = admin_client.post(
        url(Artifact, "add"),
        {"version": published.pk, "file": SimpleUploadedFile("m.onnx", b"x"), "role": "model", "precision": "fp32"},
    )

    assert response.status_code == 200
    assert "version" in response.context["adminform"].form.errors
    assert published.artifacts.count() == 1


def test_it_sets_a_devices_tags_through_the_service(admin_client, fleet):
    data = {"tag_names": "field, lab , rack-2", **empty_inlines("deployments", "rollups", "heartbeats")}

    response = admin_client.post(url(Device, "change", fleet.pk), data)

    assert response.status_code == 302
    assert sorted(fleet.tags.values_list("name", flat=True)) == ["field", "lab", "rack-2"]
    event = AuditEvent.objects.filter(action="device.tags_set").latest("id")
    assert (event.actor_label, event.after) == ("user:root", {"tags": ["field", "lab", "rack-2"]})


def test_it_refuses_a_tag_that_is_not_a_slug_in_the_admin(admin_client, fleet):
    data = {"tag_names": "Lab Room", **empty_inlines("deployments", "rollups", "heartbeats")}

    response = admin_client.post(url(Device, "change", fleet.pk), data)

    assert response.status_code == 200
    assert "tag_names" in response.context["adminform"].form.errors


@pytest.mark.django_db(transaction=True)
def test_it_assigns_a_version_with_the_admin_action(admin_client, fake_publisher):
    pi = make_device("pi", arch="aarch64")
    x86 = make_device("x86")
    version = make_version()
    add_ready_artifact(version, hardware_class="linux-x86_64")
    version = registry.publish_version(version, actor="system")
    selection = {"action": "assign_version", ACTION_CHECKBOX_NAME: [pi.pk, x86.pk]}
    fake_publisher.messages.clear()  # what the devices' hellos brought

    confirm = admin_client.post(url(Device, "changelist"), {**selection, "index": "0"})
    assert confirm.status_code == 200
    assert b"Assign a published version" in confirm.content
    assert Deployment.objects.count() == 0

    done = admin_client.post(
        url(Device, "changelist"), {**selection, "apply": "yes", "version": version.pk, "reason": "canary"}, follow=True
    )

    messages = [str(m) for m in done.context["messages"]]
    assert "Assigned embedder:1 to 1 device; skipped 1." in messages
    assert any(m.startswith("Skipped pi:") for m in messages)
    assert list(Deployment.objects.values_list("device__device_id", flat=True)) == ["x86"]
    assert [topic for topic, _, _ in fake_publisher.messages] == ["fleet/x86/desired"]
    assert AuditEvent.objects.get(action="deployment.assigned").reason == "canary"


def test_it_asks_again_when_no_version_was_picked(admin_client):
    device = make_device("dev-1")
    data = {"action": "assign_version", ACTION_CHECKBOX_NAME: [device.pk], "apply": "yes", "version": ""}

    response = admin_client.post(url(Device, "changelist"), data)

    assert response.status_code == 200
    assert response.context["form"].errors["version"]
    assert not Deployment.objects.exists()
