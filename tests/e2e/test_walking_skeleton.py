"""A model version travels from the plane to a real agent over a real Mosquitto, runs, and reports back.

The bridge, a Celery worker (on the real Redis) and the agent run as their own
processes, as in production; the test process plays the API client.
"""

import json
import sys
import urllib.request

import pytest

from agent.contract.manifest import file_sha256
from fleet.choices import DeploymentState
from fleet.models import Deployment, Device, Heartbeat
from tests.e2e.helpers import Process, release_minilm
from tests.support import free_port, wait_for_port, wait_until

SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.", "The new movie is awful."]
pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def test_it_deploys_a_real_model_to_a_real_agent_and_hears_back(plane, api, minilm, broker_port, tmp_path):
    version = release_minilm(api, minilm)
    agent_port = free_port()
    config = tmp_path / "agent.toml"
    config.write_text(
        f'device_id = "edge-1"\nbroker_url = "mqtt://127.0.0.1:{broker_port}"\n'
        f'data_dir = "{tmp_path / "agent"}"\nheartbeat_interval = 1.0\n\n'
        f'[http]\nhost = "127.0.0.1"\nport = {agent_port}\n\n'
        f'[security]\nplane_public_key = "{api.get("/api/v1/signing-key/").json()["public_key"]}"\n'
    )
    bridge = Process("bridge", [sys.executable, "manage.py", "run_bridge", "--stats-every", "5"], plane, tmp_path)
    agent = Process("agent", [sys.executable, "-m", "agent", "--config", str(config)], plane, tmp_path)
    try:
        device = wait_until(
            lambda: Device.objects.filter(device_id="edge-1").first(), timeout=30, what="the agent's hello"
        )
        assert device.online

        response = api.post(f"/api/v1/versions/{version['id']}/assign/", {"devices": ["edge-1"]}, format="json")
        assert response.status_code == 201, response.content

        deployment = wait_until(
            lambda: Deployment.objects.filter(device=device, state__in=["active", "failed"]).first(),
            timeout=120,
            what="the deployment finishing",
        )
        assert deployment.state == DeploymentState.ACTIVE, deployment.error
        assert deployment.artifact.sha256 == file_sha256(minilm["model"])
        assert deployment.downloading_at and deployment.active_at
        device.refresh_from_db()
        assert device.current_version_id == version["id"]

        wait_for_port(agent_port)
        request = urllib.request.Request(
            f"http://127.0.0.1:{agent_port}/v1/infer",
            data=json.dumps({"texts": SENTENCES}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as reply:
            vectors = json.loads(reply.read())["embeddings"]
        similar, different = (sum(a * b for a, b in zip(vectors[0], v, strict=True)) for v in vectors[1:])
        assert similar > different + 0.3

        beat = wait_until(
            lambda: Heartbeat.objects.filter(device=device, latency_count__gt=0).first(),
            timeout=30,
            what="a heartbeat with latency figures",
        )
        assert beat.p50_ms > 0 and beat.p95_ms >= beat.p50_ms and beat.p99_ms >= beat.p95_ms
        assert beat.active_sha256 == deployment.artifact.sha256
    finally:
        agent_code = agent.stop()
        bridge_code = bridge.stop()
        # Shown by pytest only when the test fails.
        print(f"--- bridge ---\n{bridge.output()[-5000:]}\n--- agent ---\n{agent.output()[-5000:]}")
    assert agent_code == 0, agent.output()[-3000:]
    assert bridge_code == 0, bridge.output()[-3000:]
    assert "bridge stopped" in bridge.output()
    device.refresh_from_db()
    assert not device.online, "the agent's goodbye should mark it offline"
