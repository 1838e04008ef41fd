"""Models, versions and artifacts through the API: every change goes through the registry."""

import onnx
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from agent.contract.manifest import build_manifest
from fleet.choices import ArtifactStatus, VersionStatus
from fleet.lib.chunking import cdc_lengths
from fleet.models import Artifact, AuditEvent, ModelVersion
from tests.fleet.helpers import (
    add_ready_artifact,
    make_model,
    make_published_version,
    make_version,
    onnx_bytes,
    token_client,
)


def upload(client, version, data, **fields):
    payload = {"file": SimpleUploadedFile("model.onnx", data), "precision": "fp32", **fields}
    return client.post(f"/api/v1/versions/{version.pk}/artifacts/", payload, format="multipart")


def incoming_files(root):
    return list((root / "incoming").glob("*")) if (root / "incoming").exists() else []


# --- Models ------------------------------------------------------------------------


@pytest.mark.django_db
def test_it_creates_a_model_and_audits_it(operator):
    response = token_client(operator).post("/api/v1/models/", {"name": "minilm", "description": "Sentence embedder"})

    assert response.status_code == 201
    assert response.json()["name"] == "minilm"
    assert response.json()["version_count"] == 0
    event = AuditEvent.objects.get(action="model.created")
    assert (event.actor, event.actor_label, event.object_repr) == (operator, "user:olivia", "minilm")


@pytest.mark.django_db
def test_it_finds_a_model_by_name(viewer):
    make_version(make_model("minilm.v2"))

    response = token_client(viewer).get("/api/v1/models/minilm.v2/")

    assert response.status_code == 200
    assert response.json()["version_count"] == 1


@pytest.mark.django_db
def test_it_refuses_a_model_name_that_is_not_a_slug_or_taken(operator):
    make_model("minilm")
    client = token_client(operator)

    assert client.post("/api/v1/models/", {"name": "Mini LM"}).status_code == 400
    assert client.post("/api/v1/models/", {"name": "minilm"}).status_code == 400


# --- Versions ----------------------------------------------------------------------


@pytest.mark.django_db
def test_it_creates_numbered_drafts(operator):
    model = make_model("minilm")
    client = token_client(operator)

    first = client.post("/api/v1/versions/", {"model": "minilm", "notes": "first"}, format="json").json()
    second = client.post(
        "/api/v1/versions/",
        {
            "model": "minilm",
            "parent": first["id"],
            "task": "embedding",
            "pooling": "mean",
            "normalize": True,
            "max_length": 128,
        },
        format="json",
    )

    assert second.status_code == 201
    body = second.json()
    assert (first["number"], body["number"], body["label"], body["status"]) == (1, 2, "minilm:2", "draft")
    assert (body["parent"], body["task"], body["pooling"], body["max_length"]) == (
        first["id"],
        "embedding",
        "mean",
        128,
    )
    assert body["created_by"] == "olivia"
    assert model.versions.count() == 2
    assert AuditEvent.objects.filter(action="version.created", actor=operator).count() == 2


@pytest.mark.django_db
def test_it_refuses_a_parent_from_another_model(operator):
    other = make_version(make_model("other"))
    make_model("minilm")

    response = token_client(operator).post("/api/v1/versions/", {"model": "minilm", "parent": other.pk}, format="json")

    assert response.status_code == 400
    assert "parent" in response.json()


@pytest.mark.django_db
def test_it_refuses_pooling_on_a_tensor_model(operator):
    make_model("minilm")

    response = token_client(operator).post(
        "/api/v1/versions/", {"model": "minilm", "task": "tensor", "pooling": "mean"}, format="json"
    )

    assert response.status_code == 400
    assert "pooling" in response.json()


@pytest.mark.django_db
def test_it_filters_versions_by_model_and_status(viewer):
    draft = make_version(make_model("a"))
    published = make_published_version("b")
    client = token_client(viewer)

    by_model = client.get("/api/v1/versions/?model=a").json()["results"]
    by_status = client.get("/api/v1/versions/?status=published").json()["results"]

    assert [v["id"] for v in by_model] == [draft.pk]
    assert [v["id"] for v in by_status] == [published.pk]
    assert by_status[0]["artifacts"][0]["status"] == "ready"


@pytest.mark.django_db
def test_it_changes_the_notes_of_a_draft(operator):
    version = make_version(notes="old")

    response = token_client(operator).patch(f"/api/v1/versions/{version.pk}/", {"notes": "new"}, format="json")

    assert response.status_code == 200
    assert response.json()["notes"] == "new"
    event = AuditEvent.objects.get(action="version.notes_changed")
    assert (event.before, event.after, event.actor) == ({"notes": "old"}, {"notes": "new"}, operator)


@pytest.mark.django_db
def test_it_changes_nothing_but_the_notes(operator):
    version = make_version()

    response = token_client(operator).patch(f"/api/v1/versions/{version.pk}/", {"max_length": 9}, format="json")

    assert response.status_code == 400
    version.refresh_from_db()
    assert version.max_length == 256


@pytest.mark.django_db
def test_it_has_no_put_on_versions(operator):
    version = make_version()

    response = token_client(operator).put(f"/api/v1/versions/{version.pk}/", {"notes": "x"}, format="json")

    assert response.status_code == 405


@pytest.mark.django_db
def test_it_keeps_a_published_version_immutable(operator):
    version = make_version(notes="as released")
    add_ready_artifact(version)
    client = token_client(operator)
    assert client.post(f"/api/v1/versions/{version.pk}/publish/").status_code == 200

    response = client.patch(f"/api/v1/versions/{version.pk}/", {"notes": "rewritten"}, format="json")

    assert response.status_code == 409
    assert "is published and cannot change" in response.json()["detail"]
    version.refresh_from_db()
    assert version.notes == "as released"


# --- Publishing --------------------------------------------------------------------


@pytest.mark.django_db
def test_it_publishes_a_draft_with_a_ready_model_artifact(operator):
    version = make_version()
    add_ready_artifact(version)

    response = token_client(operator).post(f"/api/v1/versions/{version.pk}/publish/")

    assert response.status_code == 200
    assert response.json()["status"] == "published"
    assert response.json()["published_at"]
    assert AuditEvent.objects.filter(action="version.published", actor=operator).count() == 1


@pytest.mark.django_db
def test_it_refuses_to_publish_without_a_ready_model_artifact(operator):
    version = make_version()

    response = token_client(operator).post(f"/api/v1/versions/{version.pk}/publish/")

    assert response.status_code == 409
    assert response.json() == {"detail": "embedder:1 has no ready model artifact; upload one first."}
    assert ModelVersion.objects.get(pk=version.pk).status == VersionStatus.DRAFT


@pytest.mark.django_db
def test_it_refuses_to_publish_twice(operator):
    version = make_version()
    add_ready_artifact(version)
    client = token_client(operator)
    client.post(f"/api/v1/versions/{version.pk}/publish/")

    response = client.post(f"/api/v1/versions/{version.pk}/publish/")

    assert response.status_code == 409
    assert response.json() == {"detail": "embedder:1 is already published."}
    assert AuditEvent.objects.filter(action="version.published").count() == 1


# --- Artifacts ---------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_it_uploads_an_artifact_that_is_ready_with_its_manifest(operator, settings, tmp_path):
    settings.ARTIFACT_CHUNK_SIZE = 1024
    version = make_version()
    data = onnx_bytes(weights=5000)
    (tmp_path / "same.onnx").write_bytes(data)
    lengths = cdc_lengths(tmp_path / "same.onnx", 1024)
    expected = build_manifest(tmp_path / "same.onnx", role="model", chunk_size=1024, lengths=lengths)

    response = upload(token_client(operator), version, data, hardware_class="linux-x86_64")

    assert response.status_code == 201
    body = response.json()
    assert (body["status"], body["sha256"], body["size"]) == ("ready", expected.sha256, len(data))
    assert body["chunk_hashes"] == expected.chunks
    assert body["chunk_lengths"] == lengths and sum(lengths) == len(data)
    assert body["chunk_count"] == len(expected.chunks) > 1
    assert (body["filename"], body["precision"], body["hardware_class"]) == ("model.onnx", "fp32", "linux-x86_64")
    assert response["Location"] == body["url"]
    assert body["created_by"] == "olivia"
    assert [e.action for e in AuditEvent.objects.order_by("id")][-2:] == ["artifact.uploaded", "artifact.ready"]


@pytest.mark.django_db(transaction=True)
def test_it_cuts_fixed_size_chunks_when_told_to(operator, settings):
    settings.ARTIFACT_CHUNK_SIZE = 1024
    settings.ARTIFACT_CHUNKING = "fixed"
    data = onnx_bytes(weights=5000)

    body = upload(token_client(operator), make_version(), data).json()

    assert body["chunk_lengths"] == [] and body["chunk_count"] == -(-len(data) // 1024)


@pytest.mark.django_db
def test_it_answers_processing_with_a_url_to_poll_until_the_worker_ran(operator, django_capture_on_commit_callbacks):
    version = make_version()
    client = token_client(operator)

    with django_capture_on_commit_callbacks(execute=True):
        response = upload(client, version, onnx_bytes())

    assert response.status_code == 201
    assert response.json()["status"] == "processing"
    polled = client.get(response.json()["url"])
    assert polled.json()["status"] == "ready"
    assert len(polled.json()["sha256"]) == 64


@pytest.mark.django_db(transaction=True)
def test_it_refuses_a_second_upload_of_the_same_file_in_a_version(operator, artifact_root):
    version = make_version()
    client = token_client(operator)
    first = upload(client, version, onnx_bytes()).json()

    response = upload(client, version, onnx_bytes(), precision="fp16")

    assert response.status_code == 409
    assert f"is already artifact {first['id']}" in response.json()["detail"]
    assert version.artifacts.count() == 1
    assert incoming_files(artifact_root) == []


def truncated_onnx() -> bytes:
    data = onnx_bytes(weights=1000)
    return data[: len(data) // 2]


def onnx_at_opset(opset: int) -> bytes:
    model = onnx.load_from_string(onnx_bytes())
    model.opset_import[0].version = opset
    return model.SerializeToString()


def external_data_onnx(location: str) -> bytes:
    """A model whose weights ``w`` are said to live in another file."""
    model = onnx.load_from_string(onnx_bytes())
    weights = model.graph.initializer[0]
    weights.ClearField("raw_data")
    weights.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "64")):
        entry = weights.external_data.add()
        entry.key, entry.value = key, value
    return model.SerializeToString()


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"PK\x03\x04 a zip file, not a model", "not an ONNX model"),
        (truncated_onnx(), "truncated"),
        (onnx_at_opset(99), "uses opset 99; this plane's onnxruntime loads opsets 7 to"),
        (onnx_at_opset(3), "uses opset 3"),
        (external_data_onnx("weights.bin"), "keeps tensor 'w' in an external file ('weights.bin')"),
        (external_data_onnx("../../../../etc/passwd"), "keeps tensor 'w' in an external file"),
    ],
    ids=["not-onnx", "truncated", "opset-too-new", "opset-too-old", "external-data", "external-data-escaping"],
)
def test_it_takes_the_file_and_fails_a_model_onnxruntime_cannot_load_in_the_worker(
    operator, artifact_root, data, expected, django_capture_on_commit_callbacks
):
    version = make_version()
    client = token_client(operator)

    with django_capture_on_commit_callbacks(execute=True):
        response = upload(client, version, data)
    polled = client.get(response.json()["url"]).json()

    # The request only stored the file: it never parsed it.
    assert (response.status_code, response.json()["status"]) == (201, "processing")
    assert polled["status"] == "failed"
    assert expected in polled["error"]
    assert not [p for p in artifact_root.rglob("*") if p.is_file()]
    assert AuditEvent.objects.filter(action="artifact.failed").count() == 1


@pytest.mark.django_db
def test_it_reads_the_signature_in_the_worker(operator, django_capture_on_commit_callbacks):
    version = make_version()

    with django_capture_on_commit_callbacks(execute=True):
        body = upload(token_client(operator), version, onnx_bytes(weights=8)).json()

    artifact = Artifact.objects.get(pk=body["id"])
    assert artifact.signature == {
        "inputs": [{"name": "x", "dtype": "float", "shape": [1, 8]}],
        "outputs": [{"name": "y", "dtype": "float", "shape": [1, 8]}],
        "opset": 17,
    }


@pytest.mark.django_db
def test_it_flags_a_version_whose_signature_differs_from_its_parent(operator, django_capture_on_commit_callbacks):
    parent = make_published_version()
    same = make_version(parent.model, parent=parent)
    changed = make_version(parent.model, parent=parent)
    client = token_client(operator)

    with django_capture_on_commit_callbacks(execute=True):
        upload(client, same, onnx_bytes("same-signature"))
    with django_capture_on_commit_callbacks(execute=True):
        upload(client, changed, onnx_bytes(weights=32))

    assert client.get(f"/api/v1/versions/{same.pk}/").json()["breaking"] is False
    assert client.get(f"/api/v1/versions/{changed.pk}/").json()["breaking"] is True


@pytest.mark.django_db
def test_it_needs_a_precision_for_a_model_file(operator, artifact_root):
    version = make_version()

    response = upload(token_client(operator), version, onnx_bytes(), precision="")

    assert response.status_code == 400
    assert "precision" in response.json()
    assert not Artifact.objects.exists()
    assert incoming_files(artifact_root) == []


@pytest.mark.django_db
def test_it_takes_a_tokenizer_without_precision(operator):
    version = make_version()

    response = upload(token_client(operator), version, b'{"model": {}}', role="tokenizer", precision="", format="json")

    assert response.status_code == 201
    assert (response.json()["role"], response.json()["format"]) == ("tokenizer", "json")


@pytest.mark.django_db
@pytest.mark.parametrize("size", [4_000, 200_000], ids=["refused-by-the-store", "refused-before-reading"])
def test_it_refuses_an_oversize_upload_and_keeps_nothing(operator, settings, artifact_root, size):
    settings.ARTIFACT_MAX_BYTES = 1_000
    version = make_version()

    response = upload(token_client(operator), version, b"x" * size)

    assert response.status_code == 413
    assert "1000-byte limit" in response.json()["detail"]
    assert not Artifact.objects.exists()
    assert incoming_files(artifact_root) == []


@pytest.mark.django_db
def test_it_refuses_an_upload_to_a_published_version(operator, artifact_root):
    version = make_version()
    add_ready_artifact(version)
    client = token_client(operator)
    client.post(f"/api/v1/versions/{version.pk}/publish/")

    response = upload(client, version, onnx_bytes("late"))

    assert response.status_code == 409
    assert "is published and cannot change" in response.json()["detail"]
    assert version.artifacts.count() == 1
    assert incoming_files(artifact_root) == []


@pytest.mark.django_db
def test_it_filters_artifacts(viewer):
    version = make_version()
    ready = add_ready_artifact(version)
    other = add_ready_artifact(make_version(make_model("other")), precision="int8")
    client = token_client(viewer)

    def ids(query):
        return [a["id"] for a in client.get(f"/api/v1/artifacts/?{query}").json()["results"]]

    assert ids(f"version={version.pk}") == [ready.pk]
    assert ids(f"sha256={other.sha256}") == [other.pk]
    assert ids("status=ready&role=model&precision=int8") == [other.pk]
    assert ids("status=failed") == []
    assert other.status == ArtifactStatus.READY
    assert "chunk_hashes" not in client.get("/api/v1/artifacts/").json()["results"][0]
    assert client.get(f"/api/v1/artifacts/{ready.pk}/").json()["chunk_hashes"] == ready.chunk_hashes


@pytest.mark.django_db
def test_it_has_no_writes_on_artifacts(operator):
    artifact = add_ready_artifact(make_version())
    client = token_client(operator)

    assert client.delete(f"/api/v1/artifacts/{artifact.pk}/").status_code == 405
    assert client.patch(f"/api/v1/artifacts/{artifact.pk}/", {"status": "failed"}).status_code == 405
