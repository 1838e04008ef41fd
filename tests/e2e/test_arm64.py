"""The real agent on an emulated Linux aarch64 (Debian arm64 under qemu-user) against the plane on this host.

``make test-arm64`` builds or reuses the arm64 root (scripts/arm64/root.sh) and names it in
EDGEFLEET_ARM64_ROOT; without it this test is skipped. The agent runs from this work tree,
bound into the root, with the root's own Python and aarch64 wheels; chroot keeps the host's
network, so it reaches the host's broker and the host reaches its HTTP port. Emulated
inference is ~150x slower than native (bench/arm64_emulation.py): this proves that the agent
works on aarch64, not how fast. Another model kind is one more release, ``deploy`` and
``post_json`` on the same running agent.
"""

import json
import os
import sys
import urllib.request
from pathlib import Path

import onnx
import pytest

from agent.contract.manifest import file_sha256
from fleet.choices import DeploymentState, HardwareClass
from fleet.models import Deployment, Device, Heartbeat
from tests.e2e.helpers import Process, release_minilm
from tests.support import REPO, free_port, wait_for_port, wait_until

ROOT = os.environ.get("EDGEFLEET_ARM64_ROOT", "")
SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.", "The new movie is awful."]
# Waits for the emulated agent. A whole run took 25-66 s on 2 shared cores; the margin is for a busier machine.
SLOW = 600
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.django_db(transaction=True),
    pytest.mark.timeout(1800),
    pytest.mark.skipif(not ROOT, reason="needs an arm64 root: make test-arm64"),
]


def start_arm64_agent(tmp_path: Path, broker_port: int, public_key: str) -> tuple[Process, int]:
    """``python -m agent`` inside the arm64 root, with its data dir and config in ``tmp_path`` (same path inside)."""
    port = free_port()
    config = tmp_path / "agent.toml"
    config.write_text(
        f'device_id = "pi-1"\nbroker_url = "mqtt://127.0.0.1:{broker_port}"\n'
        f'data_dir = "{tmp_path / "agent"}"\nheartbeat_interval = 1.0\n\n'
        f'[http]\nhost = "127.0.0.1"\nport = {port}\n\n'
        f'[security]\nplane_public_key = "{public_key}"\n'
    )
    cmd = [str(REPO / "scripts" / "arm64" / "run.sh"), ROOT,
           "--bind", f"{REPO}:/opt/edgefleet/src", "--bind", str(tmp_path),
           "--env", "PYTHONPATH=/opt/edgefleet/src", "--env", "PYTHONDONTWRITEBYTECODE=1",
           "--", "python", "-m", "agent", "--config", str(config)]  # fmt: skip
    return Process("arm64-agent", cmd, dict(os.environ), tmp_path), port


def running(agent: Process, what):
    """``what``, as a predicate that fails at once, with the agent's log, if the emulated agent has died."""

    def check():
        if agent.proc.poll() is not None:
            raise AssertionError(f"the arm64 agent exited with {agent.proc.returncode}:\n{agent.output()[-5000:]}")
        return what()

    return check


def x86_64_copy(model: Path, tmp_path: Path) -> Path:
    """The same int8 model with another doc string: a variant with its own sha256, for the wrong hardware."""
    decoy = onnx.load(str(model))
    decoy.doc_string = "the linux-x86_64 variant: an aarch64 device must not get it"
    path = tmp_path / "model.x86_64.int8.onnx"
    onnx.save(decoy, str(path))
    return path


def post_json(port: int, path: str, body: dict) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=SLOW) as reply:
        return json.loads(reply.read())


def deploy(api, version: dict, device: Device, agent: Process) -> Deployment:
    """Assign ``version`` to the device and wait until the agent has fetched, verified, self-tested and activated it."""
    response = api.post(f"/api/v1/versions/{version['id']}/assign/", {"devices": [device.device_id]}, format="json")
    assert response.status_code == 201, response.content
    deployment = wait_until(
        running(agent, lambda: Deployment.objects.filter(device=device, version_id=version["id"],
                                                         state__in=["active", "failed"]).first()),
        timeout=SLOW,
        what="the deployment finishing (download, signature, self-test, activation)",
    )  # fmt: skip
    assert deployment.state == DeploymentState.ACTIVE, deployment.error
    return deployment


def test_it_runs_the_agent_on_aarch64_from_hello_to_heartbeat(plane, api, minilm, broker_port, tmp_path):
    # Two variants of one version: the device must be given the one built for its hardware.
    x86_64 = {"precision": "int8", "hardware_class": HardwareClass.LINUX_X86_64}
    aarch64 = {"precision": "int8", "hardware_class": HardwareClass.LINUX_AARCH64}
    decoy = x86_64_copy(minilm["model"], tmp_path)
    version = release_minilm(api, minilm, variants=[(x86_64, decoy), (aarch64, minilm["model"])])
    bridge = Process("bridge", [sys.executable, "manage.py", "run_bridge", "--stats-every", "5"], plane, tmp_path)
    agent, agent_port = start_arm64_agent(tmp_path, broker_port, api.get("/api/v1/signing-key/").json()["public_key"])
    try:
        device = wait_until(
            running(agent, lambda: Device.objects.filter(device_id="pi-1").first()), timeout=SLOW, what="the hello"
        )
        assert (device.arch, device.os, device.hardware_class) == ("aarch64", "linux", HardwareClass.LINUX_AARCH64)

        deployment = deploy(api, version, device, agent)
        assert deployment.artifact.hardware_class == HardwareClass.LINUX_AARCH64
        assert deployment.artifact.sha256 == file_sha256(minilm["model"])

        wait_for_port(agent_port, timeout=60)
        vectors = post_json(agent_port, "/v1/infer", {"texts": SENTENCES})["embeddings"]
        similar, different = (sum(a * b for a, b in zip(vectors[0], v, strict=True)) for v in vectors[1:])
        assert similar > different + 0.3

        beat = wait_until(
            running(agent, lambda: Heartbeat.objects.filter(device=device, latency_count__gt=0).first()),
            timeout=120,
            what="a heartbeat with latency figures",
        )
        assert beat.active_sha256 == deployment.artifact.sha256
        device.refresh_from_db()
        assert device.arch == "aarch64" and device.current_version_id == version["id"]
    finally:
        agent_code = agent.stop(timeout=120)
        bridge_code = bridge.stop()
        # Shown by pytest only when the test fails: what happened inside the emulated root.
        print(f"--- bridge ---\n{bridge.output()[-5000:]}\n--- arm64 agent ---\n{agent.output()[-20000:]}")
    assert agent_code == 0, agent.output()[-5000:]
    assert bridge_code == 0, bridge.output()[-3000:]
