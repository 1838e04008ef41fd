"""A GGUF imported as a generate version: converted, evaluated, signed and sent as a bundle."""

import io

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from agent.contract import wire
from fleet.choices import ArtifactRole, PipelineState, VariantQuality
from fleet.management.commands.model_report import report
from fleet.models import ModelVersion
from fleet.services import assignments, generative, registry
from fleet.services.desired import desired_message
from tests.fleet.helpers import make_device, token_client
from tests.fleet.lib.gguf_fixtures import write_tiny_llama


@pytest.fixture
def imported(tmp_path, db, django_capture_on_commit_callbacks):
    """A draft imported from a tiny llama GGUF, its pipeline run to the end."""
    path = write_tiny_llama(tmp_path / "tiny.gguf")
    with django_capture_on_commit_callbacks(execute=True):
        call_command("import_gguf", str(path), model="tiny-llama", stdout=io.StringIO())
    return ModelVersion.objects.get(model__name="tiny-llama")


@pytest.mark.django_db
def test_it_imports_a_gguf_and_builds_the_reference_and_every_variant(imported, operator):
    assert imported.task == "generate"
    assert imported.pipelines.get().state == PipelineState.SUCCEEDED
    source = imported.artifacts.get(role=ArtifactRole.SOURCE)
    assert (source.format, source.recipe["source"]["architecture"]) == ("gguf", "llama")
    models = {a.recipe["parameters"]["variant"]: a for a in imported.artifacts.filter(role=ArtifactRole.MODEL)}
    assert sorted(models) == ["fp32", "int4", "int8", "repack"]
    assert models["fp32"].quality == VariantQuality.REFERENCE
    for name, model in models.items():
        (data,) = model.parts.all()
        assert (model.filename, data.filename, data.role) == ("model.onnx", "model.onnx.data", "model_data")
        assert model.derived_from == source and data.derived_from == source
        assert model.signature["outputs"][0]["name"] == "logits"
        body = token_client(operator).get(f"/api/v1/artifacts/{data.pk}/").json()
        assert (body["role"], body["part_of"]) == ("model_data", model.pk)
        evaluation = token_client(operator).get(f"/api/v1/artifacts/{model.pk}/").json()["evaluation"]
        assert 0 <= evaluation["token_agreement"] <= 1 and evaluation["perplexity"] > 1
        assert evaluation["decode_tokens_per_s"] > 0 and evaluation["peak_memory_bytes"] > 0
        assert evaluation["accepted"] == (model.quality in ("accepted", "reference")), name
    assert models["fp32"].evaluation.token_agreement == 1.0
    shared = sorted(imported.artifacts.filter(role__in=["tokenizer", "config"]).values_list("filename", "role"))
    assert shared == [("genai_config.json", "config"), ("tokenizer.json", "tokenizer"),
                      ("tokenizer_config.json", "tokenizer")]  # fmt: skip
    table = report(imported)
    assert "| repack | int4 |" in table and "| fp32 | fp32 |" in table and "reference |" in table


@pytest.mark.django_db
def test_it_sends_a_generate_variant_with_its_weights_config_tokenizer_and_token_selftest(imported):
    published = registry.publish_version(imported, actor="system")
    device = make_device()
    (deployment,) = assignments.assign_version(published, [device], actor="system").deployments

    desired = wire.decode(wire.Channel.DESIRED, wire.encode(desired_message(device)))

    assert desired.inference.task == "generate"
    roles = [(f.role, f.filename) for f in desired.files]
    assert roles[:2] == [("model", "model.onnx"), ("model_data", "model.onnx.data")]
    assert sorted(roles[2:]) == [("config", "genai_config.json"), ("tokenizer", "tokenizer.json"),
                                 ("tokenizer", "tokenizer_config.json")]  # fmt: skip
    assert desired.files[1].sha256 == deployment.artifact.parts.get().sha256
    assert all(f.signature for f in desired.files)
    test = desired.selftest
    assert len(test.prompts) == len(test.token_ids) == generative.SELFTEST_PROMPTS
    assert test.prompts[0].startswith("<|im_start|>user\nWhat is the capital of France?")
    # The reference's greedy tokens up to its end-of-sequence token, at most SELFTEST_TOKENS.
    assert all(1 <= len(ids) <= generative.SELFTEST_TOKENS for ids in test.token_ids)
    assert all(2 not in ids[:-1] for ids in test.token_ids)
    measured = deployment.artifact.evaluation.details["token_agreement"]
    assert test.min_token_agreement == max(0.0, round(measured - generative.SELFTEST_AGREEMENT_MARGIN, 2))


@pytest.mark.django_db
def test_it_refuses_a_file_that_is_not_a_gguf(tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"GGUF" + b"\0" * 64)

    with pytest.raises(CommandError, match="not a readable GGUF"):
        call_command("import_gguf", str(bogus), model="bogus")
    assert not ModelVersion.objects.filter(model__name="bogus").exists()


@pytest.mark.django_db
def test_it_finds_the_gguf_inside_a_wheel(tmp_path):
    import zipfile

    wheel = tmp_path / "llm_tiny-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(write_tiny_llama(tmp_path / "tiny.gguf"), "llm_tiny/tiny.gguf")

    found = generative.gguf_from(str(wheel), download_dir=tmp_path / "out")

    assert found.name == "tiny.gguf" and found.read_bytes()[:4] == b"GGUF"


@pytest.mark.django_db
def test_it_takes_a_gguf_through_the_upload_api_and_converts_it_on_optimize(
    operator, tmp_path, django_capture_on_commit_callbacks
):
    from django.core.files.uploadedfile import SimpleUploadedFile

    from tests.fleet.helpers import make_model

    client = token_client(operator)
    make_model("tiny-llama")
    version = client.post("/api/v1/versions/", {"model": "tiny-llama", "task": "generate"}, format="json").json()
    url = f"/api/v1/versions/{version['id']}/"
    data = write_tiny_llama(tmp_path / "tiny.gguf").read_bytes()
    bogus = {"file": SimpleUploadedFile("x.gguf", b"GGUF" + b"\0" * 60), "role": "source", "format": "gguf"}

    with django_capture_on_commit_callbacks(execute=True):  # the worker checks what the request stored
        refused = client.post(url + "artifacts/", bogus, format="multipart")
    with django_capture_on_commit_callbacks(execute=True):
        uploaded = client.post(
            url + "artifacts/", {"file": SimpleUploadedFile("tiny.gguf", data), "role": "source", "format": "gguf"},
            format="multipart",
        )  # fmt: skip
    with django_capture_on_commit_callbacks(execute=True):
        started = client.post(url + "optimize/", {"variants": ["repack"]}, format="json")

    checked = client.get(refused.json()["url"]).json()
    assert (checked["status"], "GGUF" in checked["error"]) == ("failed", True)
    assert uploaded.status_code == 201
    assert client.get(uploaded.json()["url"]).json()["status"] == "ready"
    assert started.status_code == 202
    run = client.get(started.json()["url"]).json()
    assert run["state"] == "succeeded"
    assert [(s["kind"], s["state"]) for s in run["steps"]] == [("evaluation_set", "done"), ("repack", "done")]
    assert [s["progress"] for s in run["steps"]] == ["fp32: greedy tokens of the prompt set", "repack: evaluating"]


@pytest.mark.django_db
def test_it_fails_the_pipeline_with_the_reason_when_the_gguf_lacks_a_tensor(
    tmp_path, django_capture_on_commit_callbacks
):
    path = write_tiny_llama(tmp_path / "short.gguf", declared_layers=3)
    with django_capture_on_commit_callbacks(execute=True):
        call_command("import_gguf", str(path), model="short", stdout=io.StringIO())

    run = ModelVersion.objects.get(model__name="short").pipelines.get()
    assert run.state == PipelineState.FAILED
    assert "tensor 'blk.2.attn_norm.weight' is missing" in run.error
    assert set(run.steps.values_list("state", flat=True)) == {"failed"}
