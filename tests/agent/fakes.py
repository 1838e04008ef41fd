"""Fakes for the agent's boundaries: a broker link that records and injects, and a plane that serves chunks."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from agent.contract import manifest, wire
from agent.mqtt import Inbound


class Published(NamedTuple):
    topic: str
    payload: bytes
    qos: int
    retain: bool


class FakeLink:
    """Records publishes and subscriptions; ``inject`` delivers a message as the broker would."""

    def __init__(self) -> None:
        self.messages: queue.Queue[Inbound] = queue.Queue()
        self.on_connected: Callable[[], None] | None = None
        self.published: list[Published] = []
        self.subscriptions: list[str] = []
        self.farewell: Inbound | None = None
        self.closed = False
        self.on_publish: Callable[[str, bytes], None] | None = None
        self._connected = False
        self._held: list[tuple[str, bytes, Callable[[], None]]] = []
        self._lock = threading.Lock()

    @property
    def connected(self) -> bool:
        return self._connected

    def connect(self) -> None:
        self.reconnect()

    def reconnect(self) -> None:
        self._connected = True
        held, self._held = self._held, []
        for topic, payload, on_acked in held:
            self.deliver(topic, payload, on_acked)
        if self.on_connected is not None:
            self.on_connected()

    def drop(self) -> None:
        self._connected = False

    def subscribe(self, topics: Sequence[str], qos: int = 1) -> None:
        self.subscriptions.extend(topics)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        with self._lock:
            self.published.append(Published(topic, payload, qos, retain))
        if self.on_publish is not None:
            self.on_publish(topic, payload)

    def deliver(self, topic: str, payload: bytes, on_acked: Callable[[], None]) -> None:
        """Like publish with QoS 1; acknowledged at once while connected, else held until reconnect."""
        if not self._connected:
            self._held.append((topic, payload, on_acked))
            return
        self.publish(topic, payload, qos=1)
        on_acked()

    def close(self, farewell: Inbound | None = None, timeout: float = 2.0) -> None:
        self.farewell = farewell
        self.closed = True
        self._connected = False

    def inject(self, topic: str, payload: bytes) -> None:
        self.messages.put(Inbound(topic, payload))

    def sent(self, channel: wire.Channel) -> list[Any]:
        """Every message published on ``channel``, decoded."""
        with self._lock:
            published = list(self.published)
        return [wire.decode_from(p.topic, p.payload)[2] for p in published if wire.parse_topic(p.topic)[1] is channel]


class FakePlane:
    """Answers the agent's chunk requests from real files with real frames, like the bridge would.

    ``corrupt`` damages the first delivery of the given (sha256, index) chunks;
    ``refuse`` answers every request for a sha256 with an error frame;
    ``serve_limit`` stops answering after that many chunks, like a plane gone away.
    """

    def __init__(self, link: FakeLink) -> None:
        self.link = link
        self.files: dict[str, tuple[wire.FileManifest, bytes]] = {}
        self.requested: list[tuple[str, int]] = []
        self.corrupt: set[tuple[str, int]] = set()
        self.refuse: dict[str, str] = {}
        self.serve_limit: int | None = None
        self.served = 0
        link.on_publish = self.on_publish

    def add(self, path: Path, role: wire.FileRole, chunk_size: int = 1024) -> wire.FileManifest:
        file = manifest.build_manifest(path, role=role, chunk_size=chunk_size)
        self.files[file.sha256] = (file, path.read_bytes())
        return file

    def on_publish(self, topic: str, payload: bytes) -> None:
        device_id, channel = wire.parse_topic(topic)
        if channel is not wire.Channel.CHUNK_REQUEST:
            return
        request = wire.decode(channel, payload)
        assert isinstance(request, wire.ChunkRequest)
        for index in request.indexes:
            self.requested.append((request.sha256, index))
            self._answer(device_id, request.sha256, index)

    def _answer(self, device_id: str, sha256: str, index: int) -> None:
        if self.serve_limit is not None and self.served >= self.serve_limit:
            return
        self.served += 1
        self.link.inject(wire.topic(device_id, wire.Channel.CHUNK_DATA), self.frame(sha256, index))

    def frame(self, sha256: str, index: int) -> bytes:
        if sha256 in self.refuse:
            return wire.encode_chunk(sha256, index, self.refuse[sha256].encode(), wire.ChunkKind.ERROR)
        file, data = self.files[sha256]
        offset, length = manifest.chunk_span(index, file.size, file.chunk_size)
        chunk = data[offset : offset + length]
        if (sha256, index) in self.corrupt:
            self.corrupt.discard((sha256, index))
            chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
        return wire.encode_chunk(sha256, index, chunk)

    def indexes_requested(self, sha256: str) -> list[int]:
        return [index for sha, index in self.requested if sha == sha256]


class FakeClock:
    """Wall time fixed for stable timestamps; monotonic time real, so timeouts still pass."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now
        self._mono = threading.Event()

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        import time

        return time.monotonic()
