"""A stand-in for the plane's bridge over a real broker: serves chunk requests and collects state reports."""

from __future__ import annotations

import queue
import threading
import time
import uuid
from pathlib import Path

from agent.contract import manifest, wire
from agent.mqtt import MqttLink, Will


class ChunkServer:
    """Serves the chunks of its files as the bridge does, and counts every chunk it sent.

    ``delay`` slows each chunk down, so a test can act mid-transfer; ``corrupt``
    damages the first delivery of the given (sha256, index) chunks.
    """

    def __init__(self, broker: wire.BrokerUrl, *, delay: float = 0.0) -> None:
        self.link = MqttLink(broker, client_id=f"plane-{uuid.uuid4().hex[:8]}", will=Will("test/plane", b""))
        self.link.on_connected = self._subscribe
        self.delay = delay
        self.files: dict[str, tuple[wire.FileManifest, bytes]] = {}
        self.served: list[tuple[str, int]] = []
        self.served_bytes = 0
        self.corrupt: set[tuple[str, int]] = set()
        self.states: list[wire.StateReport] = []
        self.busy = False
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def add(self, path: Path, role: wire.FileRole = "model", chunk_size: int = 16 * 1024) -> wire.FileManifest:
        file = manifest.build_manifest(path, role=role, chunk_size=chunk_size)
        self.files[file.sha256] = (file, path.read_bytes())
        return file

    def start(self) -> ChunkServer:
        self.link.connect()
        assert self.link.wait_connected(10), "the chunk server cannot reach the broker"
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(5)
        self.link.close()

    def publish_desired(self, desired: wire.Desired) -> None:
        topic = wire.topic(desired.device_id, wire.Channel.DESIRED)
        self.link.publish(topic, wire.encode(desired), qos=1, retain=True)

    def state_of(self, deployment_id: int) -> str | None:
        reports = [r.state for r in list(self.states) if r.deployment_id == deployment_id]
        return reports[-1] if reports else None

    def wait_idle(self, quiet: float = 0.5) -> None:
        """Until no request is waiting or being answered, and none came for ``quiet`` seconds."""
        calm_since = time.monotonic()
        while time.monotonic() - calm_since < quiet:
            if self.busy or not self.link.messages.empty():
                calm_since = time.monotonic()
            time.sleep(0.02)

    def indexes(self, sha256: str) -> list[int]:
        return [index for sha, index in self.served if sha == sha256]

    def _subscribe(self) -> None:
        root = wire.TOPIC_ROOT
        self.link.subscribe([f"{root}/+/{wire.Channel.CHUNK_REQUEST}", f"{root}/+/{wire.Channel.STATE}"])

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                message = self.link.messages.get(timeout=0.1)
            except queue.Empty:
                continue
            self.busy = True
            try:
                self._handle(message.topic, message.payload)
            finally:
                self.busy = False

    def _handle(self, topic: str, payload: bytes) -> None:
        device_id, _, request = wire.decode_from(topic, payload)
        if isinstance(request, wire.StateReport):
            self.states.append(request)
            return
        assert isinstance(request, wire.ChunkRequest)
        if request.sha256 not in self.files:
            return  # another test's device on a shared broker
        for index in request.indexes:
            time.sleep(self.delay)
            file, data = self.files[request.sha256]
            offset, length = manifest.chunk_span(index, file.size, file.chunk_size)
            chunk = data[offset : offset + length]
            if (request.sha256, index) in self.corrupt:
                self.corrupt.discard((request.sha256, index))
                chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
            self.served.append((request.sha256, index))
            self.served_bytes += len(chunk)
            frame = wire.encode_chunk(request.sha256, index, chunk)
            self.link.publish(wire.topic(device_id, wire.Channel.CHUNK_DATA), frame)
