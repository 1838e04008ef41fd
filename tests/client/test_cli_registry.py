"""Releasing a model from the CLI against a live plane: push, publish, alias, devices, tokens, audit."""

from __future__ import annotations

import pytest

from fleet.choices import ArtifactStatus, VersionStatus
from fleet.models import Alias, Device, EnrollmentToken, ModelVersion
from tests.fleet import helpers
from tests.fleet.lib.gguf_fixtures import write_tiny_llama

pytestmark = pytest.mark.django_db(transaction=True)


def test_it_pushes_a_directory_and_publishes_it(run, plane_url, release_token, tmp_path):
    folder = tmp_path / "minilm"
    folder.mkdir()
    (folder / "model.int8.onnx").write_bytes(helpers.onnx_bytes("pushed"))
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    (folder / "README.md").write_text("not pushed")

    result = run("-o", "json", "versions", "push", str(folder), "--model", "minilm", "--create-model",
                 "--task", "embedding", "--pooling", "mean", "--normalize", "--publish",
                 url=plane_url, token=release_token)  # fmt: skip

    assert result.code == 0, result.stderr
    version = ModelVersion.objects.get(model__name="minilm")
    assert (version.status, version.task, version.pooling, version.normalize) == (
        VersionStatus.PUBLISHED, "embedding", "mean", True
    )  # fmt: skip
    files = {(a.filename, a.role, a.precision, a.status) for a in version.artifacts.all()}
    assert files == {
        ("model.int8.onnx", "model", "int8", ArtifactStatus.READY),
        ("tokenizer.json", "tokenizer", "", ArtifactStatus.READY),
    }
    assert result.json()["label"] == version.label
    assert "created draft version minilm:1" in result.stderr


def test_it_pushes_a_gguf_with_the_precision_its_name_states(run, plane_url, release_token, tmp_path):
    helpers.make_model("qwen")
    gguf = write_tiny_llama(tmp_path / "qwen2-0_5b-instruct-q4_k_m.gguf")

    result = run("versions", "push", str(gguf), "--model", "qwen", url=plane_url, token=release_token)

    assert result.code == 0, result.stderr
    version = ModelVersion.objects.get(model__name="qwen")
    artifact = version.artifacts.get()
    assert (version.task, artifact.format, artifact.precision, artifact.role) == ("generate", "gguf", "int4", "source")
    assert artifact.size == gguf.stat().st_size


def test_it_refuses_to_push_a_path_with_no_model(run, plane_url, release_token, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")

    result = run("versions", "push", str(tmp_path), "--model", "m", url=plane_url, token=release_token)

    assert result.code == 1
    assert f"error: {tmp_path} holds no .onnx or .gguf model file" in result.stderr


def test_publish_wait_then_alias_set_by_label(run, plane_url, release_token):
    version = helpers.make_version(helpers.make_model("embedder"))
    helpers.add_ready_artifact(version)

    published = run("versions", "publish", version.label, "--wait", url=plane_url, token=release_token)
    moved = run("-o", "json", "alias", "set", "stable", version.label, "--reason", "release 1",
                url=plane_url, token=release_token)  # fmt: skip

    assert published.code == 0, published.stderr
    assert moved.code == 0, moved.stderr
    assert moved.json()["version_label"] == version.label
    assert Alias.objects.get(model__name="embedder", name="stable").version_id == version.pk
    shown = run("-o", "json", "versions", "show", "embedder:stable", url=plane_url, token=release_token)
    assert shown.json()["id"] == version.pk


def test_devices_list_filters_by_tag_and_presence(run, plane_url, release_token, fake_publisher):
    helpers.make_device("lab-1", tags=["lab"])
    helpers.make_device("lab-2", tags=["lab"])
    helpers.make_device("office-1", tags=["office"])
    Device.objects.filter(device_id="lab-2").update(online=False)

    online = run("devices", "list", "--tag", "lab", "--online", "--output", "json", url=plane_url, token=release_token)
    offline = run("-o", "json", "devices", "list", "--offline", url=plane_url, token=release_token)
    table = run("devices", "list", "--tag", "lab", url=plane_url, token=release_token)

    assert [d["device_id"] for d in online.json()] == ["lab-1"]
    assert [d["device_id"] for d in offline.json()] == ["lab-2"]
    assert "lab-1" in table.stdout and "lab-2" in table.stdout and "office-1" not in table.stdout


def test_enrollment_tokens_and_the_audit_log(run, plane_url):
    token = helpers.api_token(helpers.make_admin())

    created = run("-o", "json", "enrollment-tokens", "create", "line-3", "--auto-approve", url=plane_url, token=token)
    listed = run("-o", "json", "enrollment-tokens", "list", url=plane_url, token=token)
    revoked = run("-o", "json", "enrollment-tokens", "revoke", str(created.json()["id"]), url=plane_url, token=token)
    audit = run("-o", "json", "audit", "--object-type", "enrollmenttoken", url=plane_url, token=token)

    assert created.code == 0, created.stderr
    assert created.json()["token"]  # the secret, shown once
    assert [t["name"] for t in listed.json()] == ["line-3"] and "token" not in listed.json()[0]
    assert revoked.json()["revoked_at"] and EnrollmentToken.objects.get().revoked_at
    assert audit.code == 0, audit.stderr
    assert {e["action"] for e in audit.json()} >= {"enrollment_token.created", "enrollment_token.revoked"}


def test_optimize_wait_answers_the_finished_pipeline(run, plane_url, release_token):
    version = helpers.make_version(helpers.make_model("embedder"))
    helpers.add_ready_artifact(version, helpers.onnx_bytes("fp32", weights=64))

    result = run("-o", "json", "versions", "optimize", version.label, "--variant", "int8", "--wait",
                 url=plane_url, token=release_token)  # fmt: skip

    assert result.code == 0, result.stderr
    pipeline = result.json()
    assert pipeline["state"] == "succeeded"
    assert [(step["kind"], step["state"]) for step in pipeline["steps"]] == [
        ("evaluation_set", "done"),
        ("int8", "done"),
    ]
