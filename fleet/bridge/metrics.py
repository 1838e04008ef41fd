"""The bridge's ``/metrics`` for Prometheus (``run_bridge --metrics-port``; docs/metrics.md).

Counters are read from ``fleet.bridge.stats`` when Prometheus scrapes, so the message path
pays nothing for them. Three histograms are fed once a batch, by the hooks in ``Stats``:
the batch size, how long the batch's transaction took, and how long the batch's oldest
heartbeat waited in the bridge between its arrival and its commit.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from fleet.bridge.transport import Bridge

# Stats keys that count a message refused or dropped; the label is the key. bad_<kind> is a
# message of that kind that failed alone inside its batch (fleet.bridge.ingest._apply_split).
BAD_REASONS = (
    "bad_message", "not_accepted", "unknown_device", "stale_report", "chunk_refused",
    "bad_hellos", "bad_heartbeats", "bad_presences", "bad_state_reports",
)  # fmt: skip
BATCH_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class BridgeCollector(Collector):
    """What the bridge counted and holds, read at scrape time."""

    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge

    def collect(self) -> Iterator[Metric]:
        stats = self.bridge.stats
        counts = stats.snapshot()
        messages = CounterMetricFamily(
            "edgefleet_bridge_messages", "Agent messages received from the broker, by kind.", labels=["kind"]
        )
        for kind, n in dict(stats.by_kind).items():
            messages.add_metric([kind], n)
        yield messages
        bad = CounterMetricFamily(
            "edgefleet_bridge_bad_messages", "Agent messages refused or dropped, by reason.", labels=["reason"]
        )
        for reason in BAD_REASONS:
            bad.add_metric([reason], counts.get(reason, 0))
        yield bad
        yield _counter("edgefleet_bridge_heartbeats_stored", "Heartbeat rows stored (resends skipped).", counts)
        yield _counter("edgefleet_bridge_chunks_sent", "Model file chunks published to devices.", counts,
                       key="chunks_served")  # fmt: skip
        yield _counter("edgefleet_bridge_chunks_sent_bytes", "Bytes of model file chunks published to devices.",
                       counts, key="chunk_bytes_served")  # fmt: skip
        yield _counter("edgefleet_bridge_chunks_throttled", "Chunks not sent: past the device's budget.", counts)
        yield _counter("edgefleet_bridge_flush_failures", "Batches held because the database was unreachable.",
                       counts)  # fmt: skip
        yield _counter("edgefleet_bridge_backpressure_waits", "Times paho's thread waited on a full queue.", counts)
        yield _counter("edgefleet_bridge_errors", "Unexpected failures, logged with their traceback.", counts)
        queued = GaugeMetricFamily(
            "edgefleet_bridge_queue_messages",
            "Messages waiting: in the database thread's and the chunk pool's queues, and taken but not yet stored.",
            labels=["queue"],
        )
        queued.add_metric(["ingest"], self.bridge.inbox.qsize())
        queued.add_metric(["chunks"], self.bridge.chunk_inbox.qsize())
        queued.add_metric(["held"], self.bridge.held())
        yield queued
        yield GaugeMetricFamily(
            "edgefleet_bridge_connected", "1 while the bridge holds its broker connection.",
            value=int(self.bridge.connected.is_set()),
        )  # fmt: skip


def _counter(name: str, documentation: str, counts: dict[str, int], key: str = "") -> CounterMetricFamily:
    key = key or name.removeprefix("edgefleet_bridge_")
    return CounterMetricFamily(name, documentation, value=counts.get(key, 0))


class BridgeMetrics:
    """The bridge's registry: its collector and the per-batch histograms the database thread feeds."""

    def __init__(self, bridge: Bridge) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(BridgeCollector(bridge))
        self.batch_size = Histogram(
            "edgefleet_bridge_batch_messages", "Messages applied in one transaction, by kind.",
            ["kind"], registry=self.registry, buckets=BATCH_BUCKETS,
        )  # fmt: skip
        self.flush_seconds = Histogram(
            "edgefleet_bridge_flush_duration_seconds", "How long one batch's transaction took, by kind.",
            ["kind"], registry=self.registry, buckets=SECONDS_BUCKETS,
        )  # fmt: skip
        self.lag = Histogram(
            "edgefleet_bridge_heartbeat_lag_seconds",
            "For each batch of heartbeats: from the arrival of its oldest at the bridge to its commit.",
            registry=self.registry, buckets=SECONDS_BUCKETS,
        )  # fmt: skip
        bridge.stats.on_batch = self.observe_batch
        bridge.stats.on_lag = self.lag.observe
        self._server: Any = None

    def observe_batch(self, kind: str, size: int, seconds: float) -> None:
        self.batch_size.labels(kind).observe(size)
        self.flush_seconds.labels(kind).observe(seconds)

    def serve(self, port: int, addr: str = "127.0.0.1") -> int:
        """Serve /metrics on ``addr:port`` from a daemon thread; the port actually bound is returned."""
        self._server, _ = start_http_server(port, addr=addr, registry=self.registry)
        return int(self._server.server_address[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def registry_text(self) -> str:
        """What a scrape would read now."""
        return generate_latest(self.registry).decode()
