"""A deployment over a real Mosquitto: the real agent and adapter, a small plane stand-in serving chunks."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.clock import SystemClock
from agent.contract import manifest, wire
from agent.core import Agent
from agent.mqtt import MqttLink, Will
from agent.runtime import Runner
from tests.agent.helpers import make_config, wait_for
from tests.agent.models import write_tensor_model

CHUNK = 64 * 1024


class ChunkServer:
    """Serves chunk requests for one file over the broker, as the bridge does."""

    def __init__(self, broker: wire.BrokerUrl, path: Path) -> None:
        self.file = manifest.build_manifest(path, role="model", chunk_size=CHUNK)
        self.data = path.read_bytes()
        self.link = MqttLink(broker, client_id=f"plane-{uuid.uuid4().hex[:8]}", will=Will("test/plane", b""))
        self.link.on_connected = lambda: self.link.subscribe([f"{wire.TOPIC_ROOT}/+/{wire.Channel.CHUNK_REQUEST}"])
        self.stopping = threading.Event()
        self.states: list[wire.StateReport] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def start(self) -> None:
        self.link.connect()
        assert self.link.wait_connected(5)
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        self.link.close()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                message = self.link.messages.get(timeout=0.1)
            except Exception:
                continue
            device_id, _, request = wire.decode_from(message.topic, message.payload)
            assert isinstance(request, wire.ChunkRequest)
            for index in request.indexes:
                offset, length = manifest.chunk_span(index, self.file.size, self.file.chunk_size)
                frame = wire.encode_chunk(request.sha256, index, self.data[offset : offset + length])
                self.link.publish(wire.topic(device_id, wire.Channel.CHUNK_DATA), frame)


@pytest.fixture
def server(broker: wire.BrokerUrl, tmp_path: Path) -> Iterator[ChunkServer]:
    server = ChunkServer(broker, write_tensor_model(tmp_path / "model.onnx", ballast_bytes=4 * 1024 * 1024))
    server.start()
    yield server
    server.stop()


def test_it_deploys_over_a_real_broker(broker: wire.BrokerUrl, server: ChunkServer, tmp_path: Path) -> None:
    device_id = f"deploy-{uuid.uuid4().hex[:10]}"
    config = make_config(tmp_path / "data", device_id=device_id)
    goodbye = wire.encode(wire.Presence(device_id=device_id, online=False, reason="lost"))
    link = MqttLink(broker, client_id=device_id, will=Will(wire.topic(device_id, wire.Channel.PRESENCE), goodbye))
    agent = Agent(config, link, Runner(), SystemClock())
    agent.start()
    try:
        assert link.wait_connected(5)
        desired = wire.Desired(device_id=device_id, deployment_id=42, files=[server.file], issued_at=time.time())
        agent.on_desired(desired)
        wait_for(lambda: agent.active is not None, timeout=30, what="the model to become active")
    finally:
        agent.stop()
    assert agent.active is not None and agent.active.sha256 == server.file.sha256
