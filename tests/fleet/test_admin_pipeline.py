"""The admin's model pipeline pages: uploads failed with a reason, pipelines, evaluations and pins."""

import pytest
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.contrib.auth.models import User
from django.core.files.uploadedfile import SimpleUploadedFile

from fleet.models import Artifact, AuditEvent, Pipeline, Tag, VariantEvaluation, VariantPin
from tests.fleet.helpers import make_device, make_version
from tests.fleet.test_admin import url
from tests.fleet.test_pipeline import imported  # noqa: F401  (fixture)


@pytest.fixture
def admin_client(db, client):
    client.force_login(User.objects.create_superuser("root", "root@example.com", "correct horse battery staple"))
    return client


def test_it_takes_an_upload_that_is_not_onnx_and_the_worker_fails_it_with_the_reason(
    admin_client, artifact_root, django_capture_on_commit_callbacks
):
    version = make_version()
    data = {"version": version.pk, "file": SimpleUploadedFile("model.onnx", b"not a model"), "role": "model"}

    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(
            url(Artifact, "add"), {**data, "precision": "fp32", "hardware_class": "any", "format": "onnx"}, follow=True
        )
    artifact = Artifact.objects.get()
    page = admin_client.get(url(Artifact, "change", artifact.pk))

    assert response.redirect_chain, response.context["adminform"].form.errors
    assert artifact.status == "failed"
    assert "the file is not an ONNX model, or it is truncated" in artifact.error
    assert "the file is not an ONNX model, or it is truncated" in page.content.decode()
    assert not [p for p in artifact_root.rglob("*") if p.is_file()]


def test_it_starts_a_pipeline_and_shows_its_steps_and_evaluations(
    admin_client,
    imported,  # noqa: F811
    django_capture_on_commit_callbacks,
):
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(
            url(type(imported), "changelist"),
            {"action": "optimize", ACTION_CHECKBOX_NAME: [imported.pk], "index": "0"},
            follow=True,
        )

    run = Pipeline.objects.get()
    assert f"Queued pipeline {run.pk} for tiny-bert:1." in [str(m) for m in response.context["messages"]]
    page = admin_client.get(url(Pipeline, "change", run.pk)).content.decode()
    assert "evaluation_set" in page and "int4" in page and "succeeded" in page
    evaluated = VariantEvaluation.objects.filter(artifact__precision="int8").get()
    page = admin_client.get(url(Artifact, "change", evaluated.artifact_id)).content.decode()
    assert "Mean cosine" in page
    assert admin_client.get(url(Pipeline, "changelist")).status_code == 200


def test_it_pins_a_variant_for_a_tag_through_the_registry(admin_client, imported):  # noqa: F811
    make_device("dev-1", tags=["lab"])
    fp32 = imported.artifacts.get(precision="fp32")

    response = admin_client.post(
        url(VariantPin, "add"),
        {"artifact": fp32.pk, "device": "", "tag": Tag.objects.get(name="lab").pk, "reason": "known good"},
    )

    assert response.status_code == 302
    pin = VariantPin.objects.get()
    assert (pin.version, pin.artifact, pin.tag.name) == (imported, fp32, "lab")
    assert AuditEvent.objects.get(action="variant.pinned").actor_label == "user:root"
    assert admin_client.post(url(VariantPin, "delete", pin.pk), {"post": "yes"}).status_code == 302
    assert not VariantPin.objects.exists()


def test_it_refuses_a_pin_on_both_a_device_and_a_tag(admin_client, imported):  # noqa: F811
    device = make_device("dev-1", tags=["lab"])
    fp32 = imported.artifacts.get(precision="fp32")

    response = admin_client.post(
        url(VariantPin, "add"),
        {"artifact": fp32.pk, "device": device.pk, "tag": Tag.objects.get(name="lab").pk, "reason": ""},
    )

    assert response.status_code == 200
    assert not VariantPin.objects.exists()
