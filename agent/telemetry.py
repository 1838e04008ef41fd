"""What the agent measures about itself: inference latency and process health.

The recorder collects every local inference request between two heartbeats; each
heartbeat drains it, so the plane sees per-interval numbers it can compare
between a canary and the rest of the fleet.
"""

from __future__ import annotations

import statistics
import threading

import psutil

from agent.clock import Clock
from agent.contract import wire
from agent.metrics import AgentMetrics


class LatencyRecorder:
    """Thread-safe: the HTTP server's threads record, the heartbeat drains."""

    def __init__(self, metrics: AgentMetrics | None = None) -> None:
        self._metrics = metrics
        self._lock = threading.Lock()
        self._latencies: list[float] = []
        self._requests = 0
        self._errors = 0
        self._total_requests = 0
        self._total_faults = 0

    def record(self, latency_ms: float, ok: bool, fault: bool = False) -> None:
        """``fault``: the model itself failed (HTTP 500), not the caller's input; probation counts these."""
        with self._lock:
            self._requests += 1
            self._total_requests += 1
            self._total_faults += fault
            if ok:
                self._latencies.append(latency_ms)
            else:
                self._errors += 1
        if self._metrics is not None:
            self._metrics.observe_inference(latency_ms / 1000, ok=ok, fault=fault)

    def count(self, ok: bool, fault: bool = False) -> None:
        """A request whose latency is not an inference latency (a chat completion): counted, not timed."""
        with self._lock:
            self._requests += 1
            self._total_requests += 1
            self._total_faults += fault
            self._errors += not ok

    def totals(self) -> tuple[int, int]:
        """Requests and model faults since start, never drained: probation compares two readings."""
        with self._lock:
            return self._total_requests, self._total_faults

    def drain(self) -> tuple[int, int, wire.LatencyStats | None]:
        """Requests, errors and latency of successful requests since the last drain."""
        with self._lock:
            requests, errors, latencies = self._requests, self._errors, self._latencies
            self._requests, self._errors, self._latencies = 0, 0, []
        return requests, errors, latency_stats(latencies)


def latency_stats(latencies: list[float]) -> wire.LatencyStats | None:
    if not latencies:
        return None
    # numpy's default (linear) percentiles, without importing numpy into an idle agent.
    cuts = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else latencies * 99
    p50, p95, p99 = cuts[49], cuts[94], cuts[98]
    return wire.LatencyStats(
        count=len(latencies),
        p50_ms=round(float(p50), 3),
        p95_ms=round(float(p95), 3),
        p99_ms=round(float(p99), 3),
        max_ms=round(max(latencies), 3),
    )


class GenerationRecorder:
    """Chat completions between two heartbeats: time to first token, decode speed, tokens, errors."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self._requests = 0
        self._errors = 0
        self._tokens = 0
        self._ttfts: list[float] = []
        self._speeds: list[float] = []

    def record(
        self, *, ok: bool, tokens: int = 0, ttft_ms: float | None = None, decode_tps: float | None = None
    ) -> None:
        with self._lock:
            self._requests += 1
            self._errors += not ok
            self._tokens += tokens
            if ttft_ms is not None:
                self._ttfts.append(ttft_ms)
            if decode_tps is not None:
                self._speeds.append(decode_tps)

    def drain(self) -> wire.GenerationStats | None:
        """The figures since the last drain; None when no chat completion was asked for."""
        with self._lock:
            if not self._requests:
                return None
            requests, errors, tokens, ttfts, speeds = (
                self._requests,
                self._errors,
                self._tokens,
                self._ttfts,
                self._speeds,
            )
            self._reset()
        return wire.GenerationStats(
            requests=min(requests, MAX_COUNT),
            errors=min(errors, MAX_COUNT),
            tokens=min(tokens, MAX_COUNT),
            ttft_p50_ms=_bounded(percentile(ttfts, 50), MAX_MS),
            ttft_p95_ms=_bounded(percentile(ttfts, 95), MAX_MS),
            decode_tps_p50=_bounded(percentile(speeds, 50), MAX_TPS),
        )


MAX_COUNT = 2**31 - 1
MAX_MS = 86_400_000.0
MAX_TPS = 1_000_000.0


def percentile(values: list[float], p: int) -> float:
    """numpy's default (linear) percentile; 0.0 for no values."""
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


def _bounded(value: float, most: float) -> float:
    return round(min(max(value, 0.0), most), 3)


class HeartbeatBuilder:
    """Builds numbered heartbeats; the sequence lets the plane see gaps."""

    def __init__(
        self, device_id: str, clock: Clock, recorder: LatencyRecorder, generations: GenerationRecorder | None = None
    ) -> None:
        self.device_id = device_id
        self.clock = clock
        self.recorder = recorder
        self.generations = generations or GenerationRecorder()
        self.seq = 0
        self._started = clock.monotonic()
        self._process = psutil.Process()
        self._process.cpu_percent(None)  # the first reading is always 0.0; start the window now

    def build(self, interval_s: float, active: wire.ActiveModel | None, dropped: int = 0) -> wire.Heartbeat:
        requests, errors, latency = self.recorder.drain()
        self.seq += 1
        return wire.Heartbeat(
            device_id=self.device_id,
            seq=self.seq,
            sent_at=self.clock.time(),
            interval_s=interval_s,
            uptime_s=max(0.0, self.clock.monotonic() - self._started),
            cpu_percent=self._process.cpu_percent(None),
            mem_rss_bytes=self._process.memory_info().rss,
            mem_available_bytes=psutil.virtual_memory().available,
            active=active,
            requests=requests,
            errors=errors,
            latency=latency,
            dropped=dropped,
            generation=self.generations.drain(),
        )
