"""SmolLM2 from its GGUF to a real agent over a real Mosquitto, rolled out through the API.

The bridge, a Celery worker (on the real Redis) and the agent run as their own processes; the
test process plays the API client, and the official ``openai`` client talks to the agent. The
first test converts the GGUF through the plane's pipeline (the fp32 reference and its evaluation
set, then the repack and int4 variants: about 70 s here), the pipeline being part of what it
shows. The second starts where a pipeline ends, from a bundle converted once (cached with the
agent's tests): its subject is the device and the rollout. Skipped when the GGUF is not cached
(``make models``).
"""

from __future__ import annotations

import json
import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from fleet.choices import ArtifactRole, DeploymentState, Precision, RolloutState, VariantQuality
from fleet.lib.gguf import convert as gguf_convert
from fleet.lib.gguf import evaluate as gguf_evaluate
from fleet.models import Artifact, Deployment, Device, Heartbeat, ModelVersion, Rollout, VariantEvaluation
from fleet.services import generative, registry
from tests.agent.generators import SMOLLM2_GGUF, smollm2_bundle
from tests.e2e.helpers import Process, release_gguf
from tests.support import free_port, wait_for_port, wait_until

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(not SMOLLM2_GGUF.exists(), reason=f"no SmolLM2 GGUF in {SMOLLM2_GGUF.parent}: make models"),
]
# Greedy answers flip on near-ties; a short-answer system message keeps this one on "Paris".
FRANCE = [
    {"role": "system", "content": "You are a helpful assistant. Answer in one short sentence."},
    {"role": "user", "content": "What is the capital of France?"},
]
CANARY = [{"name": "canary", "device_count": 1, "min_soak_seconds": 0}, {"name": "all", "percent": 100}]


class Fleet:
    """The bridge and one agent, with the agent's device id and HTTP port."""

    def __init__(self, plane: dict, api, broker_port: int, tmp_path: Path) -> None:
        # A device id of its own: the session's broker keeps the last test's retained desired state.
        self.device = f"edge-slm-{uuid.uuid4().hex[:8]}"
        self.port = free_port()
        config = tmp_path / "agent.toml"
        config.write_text(
            f'device_id = "{self.device}"\nbroker_url = "mqtt://127.0.0.1:{broker_port}"\n'
            f'data_dir = "{tmp_path / "agent"}"\nheartbeat_interval = 1.0\n\n'
            f'[http]\nhost = "127.0.0.1"\nport = {self.port}\n\n'
            "[generation]\nthreads = 1\n\n"
            f'[security]\nplane_public_key = "{api.get("/api/v1/signing-key/").json()["public_key"]}"\n'
        )
        bridge = [sys.executable, "manage.py", "run_bridge", "--stats-every", "5"]
        self.bridge = Process("bridge", bridge, plane, tmp_path)
        self.agent = Process("agent", [sys.executable, "-m", "agent", "--config", str(config)], plane, tmp_path)

    def stop(self) -> None:
        agent_code, bridge_code = self.agent.stop(), self.bridge.stop()
        # Shown by pytest only when the test fails.
        print(f"--- bridge ---\n{self.bridge.output()[-5000:]}\n--- agent ---\n{self.agent.output()[-5000:]}")
        assert agent_code == 0, self.agent.output()[-3000:]
        assert bridge_code == 0, self.bridge.output()[-3000:]


@pytest.fixture
def fleet(plane, api, broker_port, tmp_path) -> Iterator[Fleet]:
    running = Fleet(plane, api, broker_port, tmp_path)
    try:
        wait_until(
            lambda: Device.objects.filter(device_id=running.device).exists(), timeout=30, what="the agent's hello"
        )
        yield running
    finally:
        running.stop()


GENERATE_VERSION = {"model": "smollm2", "task": "generate", "max_length": 2048, "quality_threshold": 0.9}


@pytest.fixture(scope="module")
def smollm2_int4(tmp_path_factory) -> tuple[Path, Path]:
    """SmolLM2's int4 RTN bundle and an evaluation set of its fp32 reference, made by the plane's
    converter and evaluator as its pipeline makes them, once for the module.

    The set holds only the prompts and tokens a device's self-test gets (the reference's greedy
    tokens are the same, fewer of them): a quarter of the full set's cost.
    """
    int4 = smollm2_bundle()  # the agent's tests share it: converted once into the model cache
    assert int4 is not None
    tmp = tmp_path_factory.mktemp("smollm2")
    gguf_convert.convert(SMOLLM2_GGUF, tmp / "fp32", variant="fp32", context_length=GENERATE_VERSION["max_length"])
    questions, heldout = gguf_evaluate.default_prompts()
    evaluation_set = gguf_evaluate.build_evaluation_set(
        tmp / "fp32",
        questions=questions[: generative.SELFTEST_PROMPTS],
        heldout=heldout,
        n_tokens=generative.SELFTEST_TOKENS,
    )
    shutil.rmtree(tmp / "fp32")  # 540 MB, not kept with pytest's last three runs
    path = tmp / "evaluation.json"
    path.write_text(json.dumps(evaluation_set, ensure_ascii=False), encoding="utf-8")
    return int4, path


def store_forced_int4(version: ModelVersion, bundle: Path, evaluation_set: Path) -> Artifact:
    """The int4 variant and the evaluation set stored as the pipeline stores them (fleet.services.
    generative), the variant accepted with the bar of one that agreed on 90%."""

    def store(name: str, **fields) -> Artifact:
        return registry.add_generated_artifact(version, bundle / name, filename=name, actor="system", **fields)

    model = store("model.onnx", precision=Precision.INT4, quality=VariantQuality.ACCEPTED)
    store("model.onnx.data", role=ArtifactRole.MODEL_DATA, format="onnx-data", precision=Precision.INT4, part_of=model)
    for name, role in generative.SHARED_FILES:
        store(name, role=role, format="json")
    evaluation = registry.add_generated_artifact(
        version, evaluation_set, filename="evaluation.json", actor="system", role=ArtifactRole.EVALUATION,
        format="json",
    )  # fmt: skip
    VariantEvaluation.objects.create(
        artifact=model, evaluation_set=evaluation, samples=generative.SELFTEST_PROMPTS, token_agreement=0.9,
        details={"token_agreement": 0.9}, latency_median_ms=10.0, latency_p95_ms=10.0,
        peak_memory_bytes=300 << 20, threshold=0.9, accepted=True,
    )  # fmt: skip
    return model


def roll_out(api, version: dict, device: str) -> dict:
    body = {"name": f"{version['label']} canary", "version": version["id"], "selector": {"devices": [device]},
            "stages": CANARY}  # fmt: skip
    response = api.post("/api/v1/rollouts/", body, format="json")
    assert response.status_code == 201, response.content
    rollout = response.json()
    response = api.post(f"/api/v1/rollouts/{rollout['id']}/start/", {"reason": "e2e"}, format="json")
    assert response.status_code == 200, response.content
    return rollout


def finished(deployment_filter: dict) -> Deployment:
    return wait_until(
        lambda: Deployment.objects.filter(**deployment_filter, state__in=["active", "failed"]).first(),
        timeout=300,
        interval=0.5,
        what="the deployment finishing",
    )


def test_it_rolls_smollm2_out_and_answers_paris_to_the_openai_client(fleet, api):
    version = release_gguf(api, SMOLLM2_GGUF, model="smollm2", variants=["repack", "int4"])
    reference = Artifact.objects.get(version=version["id"], role="model", precision="fp32")
    repack = Artifact.objects.get(version=version["id"], role="model", recipe__parameters__variant="repack")
    int4 = Artifact.objects.get(version=version["id"], role="model", recipe__parameters__variant="int4")
    # Lossless weights; only MatMulNBits' int8 activations separate the repack from the reference.
    assert repack.quality == "accepted"
    assert repack.evaluation.token_agreement >= 0.9
    assert repack.evaluation.perplexity <= 1.05 * reference.evaluation.perplexity
    assert repack.parts.get().size < 0.3 * reference.parts.get().size
    # int4 RTN degrades SmolLM2 (docs/models.md); a rejected variant is never offered.
    assert int4.quality == "rejected"

    rollout = roll_out(api, version, fleet.device)

    deployment = finished({"device__device_id": fleet.device, "rollout_member__rollout": rollout["id"]})
    assert deployment.state == DeploymentState.ACTIVE, deployment.error
    assert deployment.artifact_id == repack.pk
    wait_for_port(fleet.port)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{fleet.port}/v1", api_key="unused", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == ["smollm2"]
    answer = client.chat.completions.create(model="smollm2", messages=FRANCE, temperature=0, max_tokens=32)  # type: ignore[arg-type]
    assert "Paris" in (answer.choices[0].message.content or ""), answer

    beat = wait_until(
        lambda: Heartbeat.objects.filter(device__device_id=fleet.device, gen_requests__gt=0).first(),
        timeout=30,
        what="a heartbeat with generation figures",
    )
    assert beat.gen_tokens == answer.usage.completion_tokens  # type: ignore[union-attr]
    assert beat.ttft_p50_ms > 0 and beat.ttft_p95_ms >= beat.ttft_p50_ms
    assert beat.decode_tps_p50 > 0
    assert beat.active_sha256 == repack.sha256
    rollout_state = wait_until(
        lambda: (r := Rollout.objects.get(pk=rollout["id"])).state != RolloutState.RUNNING and r.state,
        timeout=60,
        what="the rollout finishing",
    )
    assert rollout_state == RolloutState.COMPLETED


def test_it_refuses_a_degraded_variant_by_the_devices_self_test_and_rolls_back(fleet, api, smollm2_int4):
    """int4 RTN degrades SmolLM2 (docs/models.md): the pipeline rejects it (the test above shows
    it). Forced through anyway, with the bar of a variant that agreed on 90%, the device's
    self-test refuses to switch to it."""
    assert api.post("/api/v1/models/", {"name": "smollm2"}, format="json").status_code == 201
    version = api.post("/api/v1/versions/", GENERATE_VERSION, format="json").json()
    int4 = store_forced_int4(ModelVersion.objects.get(pk=version["id"]), *smollm2_int4)
    response = api.post(f"/api/v1/versions/{version['id']}/publish/")
    assert response.status_code == 200, response.content

    rollout = roll_out(api, version, fleet.device)

    finished_rollout = wait_until(
        lambda: (r := Rollout.objects.get(pk=rollout["id"])).state != RolloutState.RUNNING and r,
        timeout=300,
        interval=0.5,
        what="the rollout's failure gate",
    )
    assert finished_rollout.state == RolloutState.ROLLED_BACK
    deployment = Deployment.objects.get(rollout_member__rollout=rollout["id"])
    assert deployment.artifact_id == int4.pk
    # The device reported it failed; with no version before it, the rollback withdrew the version
    # and the deployment stays failed, its state saying what happened (6d61e78).
    assert deployment.state == DeploymentState.FAILED
    assert "self-test failed" in deployment.error and "below the 65%" in deployment.error, deployment.error
    assert Device.objects.get(device_id=fleet.device).current_version_id is None
    assert "runtime.installed" not in fleet.agent.output()
