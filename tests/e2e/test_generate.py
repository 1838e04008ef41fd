"""SmolLM2 from its GGUF to a real agent over a real Mosquitto, rolled out through the API.

The bridge, a Celery worker (on the real Redis) and the agent run as their own processes; the
test process plays the API client, and the official ``openai`` client talks to the agent. Each
test converts the GGUF through the plane's pipeline (the fp32 reference and its evaluation set,
then the variant: about a minute here). Skipped when the GGUF is not cached (``make models``).
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from fleet.choices import DeploymentState, RolloutState
from fleet.models import Artifact, Deployment, Device, Heartbeat, Rollout, VariantEvaluation
from tests.agent.generators import SMOLLM2_GGUF
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
    version = release_gguf(api, SMOLLM2_GGUF, model="smollm2", variants=["repack"])
    repack = Artifact.objects.get(version=version["id"], role="model", recipe__parameters__variant="repack")
    assert repack.quality == "accepted"

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


def test_it_refuses_a_degraded_variant_by_the_devices_self_test_and_rolls_back(fleet, api):
    """int4 RTN degrades SmolLM2 (docs/models.md): the pipeline rejects it. Forced through anyway,
    with the bar of a variant that agreed on 90%, the device's self-test refuses to switch to it."""
    version = release_gguf(api, SMOLLM2_GGUF, model="smollm2", variants=["int4"], publish=False)
    int4 = Artifact.objects.get(version=version["id"], role="model", recipe__parameters__variant="int4")
    assert int4.quality == "rejected"
    Artifact.objects.filter(pk=int4.pk).update(quality="accepted")
    evaluation = VariantEvaluation.objects.get(artifact=int4)
    VariantEvaluation.objects.filter(pk=evaluation.pk).update(details={**evaluation.details, "token_agreement": 0.9})
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
    # The device reported it failed; with no version before it, the rollback withdrew it.
    assert deployment.state == DeploymentState.SUPERSEDED
    assert "self-test failed" in deployment.error and "below the 65%" in deployment.error, deployment.error
    assert Device.objects.get(device_id=fleet.device).current_version_id is None
    assert "runtime.installed" not in fleet.agent.output()
