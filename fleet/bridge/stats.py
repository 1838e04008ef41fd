"""The bridge's counters: what came in, what was stored, what was refused and why."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime

from agent.contract import wire

# The kinds of message counted by ``Stats.by_kind``: the agent's channels, and anything else as "other".
KINDS = (*(str(c) for c in wire.AGENT_CHANNELS), "other")


class Stats:
    """Thread-safe counters: what came in, what was stored, what was refused and why."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        # Counted for every message by paho's network thread alone: one writer needs no lock,
        # and taking one per message was 4% of a saturated bridge's samples.
        self.received = 0
        # By kind (the topic's channel), by the same single writer; the keys are fixed up front,
        # so a reader copying the dict from another thread never sees it change size.
        self.by_kind: dict[str, int] = dict.fromkeys(KINDS, 0)
        # Set by fleet.bridge.metrics when the bridge serves /metrics; the database thread calls them.
        self.on_batch: Callable[[str, int, float], None] | None = None
        self.on_lag: Callable[[float], None] | None = None

    def batch_applied(self, kind: str, size: int, seconds: float) -> None:
        """A batch of ``size`` messages of ``kind`` applied in one transaction taking ``seconds``."""
        if self.on_batch is not None:
            self.on_batch(kind, size, seconds)

    def heartbeats_committed(self, oldest_received_at: datetime) -> None:
        """A batch of heartbeats is committed; its oldest arrived at the bridge at ``oldest_received_at``."""
        if self.on_lag is not None:
            self.on_lag(time.time() - oldest_received_at.timestamp())

    def count_kind(self, topic: str) -> None:
        """paho's thread only: one more message on ``topic``."""
        kind = topic.split("/", 2)[-1]
        if kind not in self.by_kind:
            kind = "other"
        self.by_kind[kind] += 1

    def add(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            counts = dict(self._counts)
        if self.received:
            counts["received"] = self.received
        return counts
