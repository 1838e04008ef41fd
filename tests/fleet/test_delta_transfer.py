"""Delta transfer end to end: the real agent, the bridge and a real Mosquitto, with real MiniLM files.

The agent installs fp32 MiniLM v1, then v2 (every weight of one encoder layer
changed), then v3 (v2's weights, new metadata). The plane cuts each file at
content-defined boundaries, and the bridge counts the bytes it serves: for v2 and v3
they are exactly the chunks the agent did not hold already.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from agent.clock import SystemClock
from agent.config import SecurityConfig
from agent.contract import wire
from agent.core import Agent
from agent.mqtt import MqttLink, Will
from agent.runtime import Runner
from bench.delta import layer_changed, make_versions, metadata_changed
from fleet import signing as plane_signing
from fleet.models import Artifact, Device
from fleet.services import assignments, registry
from tests.agent.helpers import make_config
from tests.support import wait_until

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(scope="module")
def minilm(tmp_path_factory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("minilm")
    paths = make_versions(directory)
    # v3 carries v2's weights: only its metadata differs from what the agent holds then.
    metadata_changed(paths["v2"], paths["v3"])
    return paths


def release(model, path: Path, number_hint: str):
    version = registry.create_version(model, actor="system", notes=number_hint)
    with path.open("rb") as upload:
        artifact = registry.add_artifact(
            version, upload, filename="model.onnx", precision="fp32", hardware_class="any", actor="system"
        )
    registry.process_artifact(artifact.pk)
    return registry.publish_version(version, actor="system"), Artifact.objects.get(pk=artifact.pk)


@pytest.fixture
def agent(plane, broker_port, tmp_path):
    device_id = f"delta-{uuid.uuid4().hex[:8]}"
    broker = wire.parse_broker_url(f"mqtt://127.0.0.1:{broker_port}")
    goodbye = wire.encode(wire.Presence(device_id=device_id, online=False, reason="lost"))
    link = MqttLink(broker, client_id=device_id, will=Will(wire.topic(device_id, wire.Channel.PRESENCE), goodbye))
    security = SecurityConfig(plane_public_key=plane_signing.public_key())
    agent = Agent(
        make_config(tmp_path / "device", device_id=device_id, security=security), link, Runner(), SystemClock()
    )
    agent.start()
    try:
        wait_until(lambda: Device.objects.filter(device_id=device_id).exists(), timeout=15, what="the agent's hello")
        yield agent
    finally:
        agent.stop()


def install(plane, agent, version, artifact) -> int:
    """Assign ``version`` to the agent's device; the bytes the bridge served until it was active."""
    before = plane.stats.snapshot().get("chunk_bytes_served", 0)
    device = Device.objects.get(device_id=agent.config.device_id)
    assignments.assign_version(version, [device], actor="system")
    wait_until(
        lambda: agent.active is not None and agent.active.sha256 == artifact.sha256,
        timeout=60,
        what=f"{version.label} active on the device",
    )
    return plane.stats.snapshot().get("chunk_bytes_served", 0) - before


def not_held(new: Artifact, *held: Artifact) -> int:
    have = {digest for artifact in held for digest in artifact.chunk_hashes}
    return sum(n for digest, n in zip(new.chunk_hashes, new.chunk_lengths, strict=True) if digest not in have)


def test_a_new_version_costs_only_the_chunks_the_device_does_not_hold(plane, agent, minilm):
    model = registry.create_model(name="minilm-delta", actor="system")
    v1, a1 = release(model, minilm["v1"], "as released")
    v2, a2 = release(model, minilm["v2"], "layer 3 fine-tuned")
    v3, a3 = release(model, minilm["v3"], "new metadata")
    assert a1.chunk_lengths and len(a1.chunk_lengths) == a1.chunk_count

    assert install(plane, agent, v1, a1) == a1.size

    sent = install(plane, agent, v2, a2)
    assert sent == not_held(a2, a1)
    assert 0 < sent <= 0.15 * a2.size

    sent = install(plane, agent, v3, a3)
    assert sent == not_held(a3, a1, a2)
    assert 0 < sent <= 0.01 * a3.size


def test_the_delta_helpers_change_what_they_say(minilm, tmp_path):
    """The fixtures' own check: one layer's weights (and nothing else), or the metadata only."""
    import onnx

    v1, v2, v3 = (onnx.load(minilm[name]) for name in ("v1", "v2", "v3"))
    differing = [a.name for a, b in zip(v1.graph.initializer, v2.graph.initializer, strict=True) if a != b]
    assert differing and all(".layer.3." in name for name in differing)
    assert list(v2.graph.initializer) == list(v3.graph.initializer) and v2.doc_string != v3.doc_string
    assert layer_changed(minilm["v1"], tmp_path / "again.onnx") == sum(
        len(init.raw_data) for init in v1.graph.initializer if ".layer.3." in init.name
    )
