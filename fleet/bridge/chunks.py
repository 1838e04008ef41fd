"""Serving chunk requests: what a device may read, and how much it may have on its way.

A chunk request is 261 bytes and may name 64 chunks of up to 4 MiB each, so an unchecked
bridge amplifies one small message into 16 MiB or more. Every device therefore has a
budget: a token bucket of bytes a second (``rate``, ``burst``) and a cap on the bytes
published to it that the broker has not yet acknowledged (``device_inflight``). All the
devices together may have at most ``total_inflight`` bytes unacknowledged; past that, a
worker waits, so paho's outgoing queue stays bounded. A chunk past a device's budget is
not sent and is counted as ``chunks_throttled``: the agent asks for it again after its
stall timeout, so an honest agent (a window of 16 chunks) never meets the limit.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from django.db import InterfaceError, OperationalError, connection

from agent.contract import wire
from agent.contract.manifest import layout
from fleet.choices import ArtifactRole, ArtifactStatus, EnrollmentState
from fleet.models import Artifact, Deployment
from fleet.services.enrollment import may_speak
from fleet.storage import ArtifactStore

log = logging.getLogger("fleet.bridge")

# How long a device's right to a file is trusted before it is read again: a device
# decommissioned, or a deployment superseded, is refused within this many seconds.
GRANT_TTL_S = 5.0
MAX_GRANTS = 10_000


class ChunkRefused(Exception):
    """A chunk request the bridge will not serve; the text goes back to the agent."""


class Counter(Protocol):
    def add(self, key: str, n: int = 1) -> None: ...


@dataclass(frozen=True)
class ChunkLimits:
    """Per-device and total budgets, in bytes (docs/security.md)."""

    rate: float = 256 * 2**20
    burst: int = 64 * 2**20
    device_inflight: int = 32 * 2**20
    total_inflight: int = 256 * 2**20

    def __post_init__(self) -> None:
        # A budget smaller than one chunk would refuse that chunk for ever.
        for name in ("burst", "device_inflight", "total_inflight"):
            if getattr(self, name) < wire.MAX_CHUNK_BYTES:
                raise ValueError(f"chunk budget {name} must be at least {wire.MAX_CHUNK_BYTES} bytes (one chunk)")
        if self.rate <= 0:
            raise ValueError("chunk budget rate must be positive")

    @classmethod
    def from_settings(cls) -> ChunkLimits:
        from django.conf import settings

        return cls(
            rate=settings.BRIDGE_CHUNK_DEVICE_RATE,
            burst=settings.BRIDGE_CHUNK_DEVICE_BURST,
            device_inflight=settings.BRIDGE_CHUNK_DEVICE_INFLIGHT,
            total_inflight=settings.BRIDGE_CHUNK_TOTAL_INFLIGHT,
        )


@dataclass
class _Budget:
    tokens: float
    updated: float
    inflight: int = 0


@dataclass
class _Grant:
    path: str
    spans: list[tuple[int, int]]
    granted_at: float


@dataclass
class Budgets:
    """What each device may still be sent; thread-safe."""

    limits: ChunkLimits
    clock: Callable[[], float] = time.monotonic
    _devices: dict[str, _Budget] = field(default_factory=dict)
    # (paho's message info, bytes, device) in publish order: the broker acknowledges in order.
    _unacked: deque[tuple[Any, int, str]] = field(default_factory=deque)
    _total: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, device_id: str, nbytes: int) -> bool:
        """Reserve ``nbytes`` for the device if its rate and its unacknowledged bytes allow."""
        with self._lock:
            self._prune()
            now = self.clock()
            budget = self._devices.get(device_id)
            if budget is None:
                budget = self._devices[device_id] = _Budget(tokens=self.limits.burst, updated=now)
            budget.tokens = min(self.limits.burst, budget.tokens + (now - budget.updated) * self.limits.rate)
            budget.updated = now
            if budget.tokens < nbytes or budget.inflight + nbytes > self.limits.device_inflight:
                return False
            budget.tokens -= nbytes
            budget.inflight += nbytes
            self._total += nbytes
            return True

    def sent(self, device_id: str, nbytes: int, info: Any) -> None:
        """The chunk is published: it counts against the device until the broker acknowledges it."""
        with self._lock:
            self._unacked.append((info, nbytes, device_id))

    def wait_for_room(self, stopping: threading.Event) -> None:
        """Block while every device together has too much unacknowledged."""
        while not stopping.is_set():
            with self._lock:
                self._prune()
                if self._total < self.limits.total_inflight:
                    return
            stopping.wait(0.01)

    def _prune(self) -> None:
        while self._unacked and _acknowledged(self._unacked[0][0]):
            _, nbytes, device_id = self._unacked.popleft()
            self._total -= nbytes
            budget = self._devices.get(device_id)
            if budget is not None:
                budget.inflight -= nbytes
        if len(self._devices) > MAX_GRANTS:
            self._devices = {d: b for d, b in self._devices.items() if b.inflight > 0}


def _acknowledged(info: Any) -> bool:
    # A client that returns no message info (a test's fake) delivers at once.
    return info is None or info.is_published() or info.rc != 0


class ChunkServer:
    """Answers each chunk request with the chunks a device may read, within its budget."""

    def __init__(self, client: Any, store: ArtifactStore, stats: Counter, limits: ChunkLimits) -> None:
        self.client = client
        self.store = store
        self.stats = stats
        self.budgets = Budgets(limits)
        self._grants: dict[tuple[str, int, str], _Grant] = {}
        self._layouts: dict[str, list[tuple[int, int]]] = {}
        self._lock = threading.Lock()

    def serve(self, topic: str, payload: bytes, stopping: threading.Event) -> None:
        """Serve one request. Never raises: a failure is counted and logged."""
        try:
            device_id, _, request = wire.decode_from(topic, payload)
        except wire.WireError as exc:
            self._refuse("bad_message", topic, str(exc))
            return
        assert isinstance(request, wire.ChunkRequest)  # the topic fixes the type
        reply_topic = wire.topic(device_id, wire.Channel.CHUNK_DATA)
        try:
            try:
                self._serve(device_id, request, reply_topic, stopping)
            except (OperationalError, InterfaceError):
                # The database restarted under this worker: its connection is dead for good.
                log.warning("chunk worker lost the database; reconnecting")
                connection.close()
                self._serve(device_id, request, reply_topic, stopping)
        except ChunkRefused as exc:
            self._refuse("chunk_refused", topic, str(exc))
            frame = wire.encode_chunk(request.sha256, 0, str(exc).encode(), wire.ChunkKind.ERROR)
            self.client.publish(reply_topic, frame, qos=1)
        except Exception:
            self.stats.add("errors")
            log.exception("failed to serve chunks on %s", topic)

    def _serve(self, device_id: str, request: wire.ChunkRequest, reply_topic: str, stopping: threading.Event) -> None:
        grant = self._grant(device_id, request.deployment_id, request.sha256)
        spans = grant.spans
        served = throttled = 0
        with open(grant.path, "rb") as f:
            # A chunk named twice in one request is sent once: repeats would only amplify.
            for index in dict.fromkeys(request.indexes):
                if index >= len(spans):
                    raise ChunkRefused(f"chunk {index} is outside a file of {len(spans)} chunks")
                offset, length = spans[index]
                self.budgets.wait_for_room(stopping)
                if not self.budgets.take(device_id, length):
                    throttled += 1
                    continue
                data = os.pread(f.fileno(), length, offset)
                info = self.client.publish(reply_topic, wire.encode_chunk(request.sha256, index, data), qos=1)
                self.budgets.sent(device_id, length, info)
                served += len(data)
        self.stats.add("chunks_served", len(set(request.indexes)) - throttled)
        self.stats.add("chunk_bytes_served", served)
        if throttled:
            self.stats.add("chunks_throttled", throttled)
            log.warning(
                "throttled %d chunk(s) of %s for %s: over its budget", throttled, request.sha256[:12], device_id
            )

    def _grant(self, device_id: str, deployment_id: int, sha256: str) -> _Grant:
        """The file's path and chunk spans if this device may speak and its deployment includes the file."""
        key = (device_id, deployment_id, sha256)
        now = time.monotonic()
        with self._lock:
            grant = self._grants.get(key)
        if grant is not None and now - grant.granted_at < GRANT_TTL_S:
            return grant
        deployment = (
            Deployment.objects.select_related("device").filter(pk=deployment_id, device__device_id=device_id).first()
        )
        if deployment is None:
            raise ChunkRefused(f"deployment {deployment_id} is not assigned to {device_id}")
        if not may_speak(deployment.device.enrollment):
            raise ChunkRefused(f"{device_id} is {deployment.device.enrollment or EnrollmentState.PENDING}")
        # What the desired message sends (services.desired): the model file, its external
        # weights (a generate bundle's model.onnx.data), the version's tokenizer and config files.
        ready = Artifact.objects.filter(status=ArtifactStatus.READY, sha256=sha256)
        allowed = (
            ready.filter(pk=deployment.artifact_id)
            | ready.filter(role=ArtifactRole.MODEL_DATA, part_of=deployment.artifact_id)
            | ready.filter(version=deployment.version_id, role__in=(ArtifactRole.TOKENIZER, ArtifactRole.CONFIG))
        )
        artifact = allowed.first()
        if artifact is None:
            raise ChunkRefused(f"file {sha256} is not part of deployment {deployment_id}")
        with self._lock:
            if len(self._grants) > MAX_GRANTS:
                self._grants.clear()
                self._layouts.clear()
            # One span list a file, shared by every device's grant to it.
            spans = self._layouts.get(sha256)
            if spans is None:
                spans = self._layouts[sha256] = layout(artifact.size, artifact.chunk_size, artifact.chunk_lengths)
            grant = self._grants[key] = _Grant(str(self.store.path(artifact.storage_key)), spans, now)
        return grant

    def _refuse(self, reason: str, where: str, detail: str) -> None:
        self.stats.add(reason)
        log.warning("refused (%s) on %s: %s", reason, where, detail)
