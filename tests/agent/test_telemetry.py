from __future__ import annotations

import threading

import numpy as np

from agent.telemetry import HeartbeatBuilder, LatencyRecorder, latency_stats
from tests.agent.fakes import FakeClock


def test_it_drains_counts_and_percentiles_of_the_window() -> None:
    recorder = LatencyRecorder()
    for ms in range(1, 101):
        recorder.record(float(ms), ok=True)
    recorder.record(5000.0, ok=False)
    requests, errors, latency = recorder.drain()
    assert (requests, errors) == (101, 1)
    assert latency is not None
    assert (latency.count, latency.max_ms) == (100, 100.0)
    assert 50 <= latency.p50_ms <= 51 and 95 <= latency.p95_ms <= 96 and 99 <= latency.p99_ms <= 100


def test_its_percentiles_are_numpys_linear_ones() -> None:
    latencies = [0.4, 7.25, 3.0, 12.5, 1.0, 9.75, 2.5]
    stats = latency_stats(latencies)

    assert stats is not None
    want = [round(float(v), 3) for v in np.percentile(latencies, [50, 95, 99])]
    assert [stats.p50_ms, stats.p95_ms, stats.p99_ms] == want
    single = latency_stats([4.2])
    assert single is not None and (single.p50_ms, single.p99_ms, single.max_ms) == (4.2, 4.2, 4.2)


def test_it_starts_a_fresh_window_after_each_drain() -> None:
    recorder = LatencyRecorder()
    recorder.record(3.0, ok=True)
    recorder.drain()
    assert recorder.drain() == (0, 0, None)


def test_it_records_from_many_threads() -> None:
    recorder = LatencyRecorder()

    def record_many() -> None:
        for _ in range(500):
            recorder.record(1.0, ok=True)

    threads = [threading.Thread(target=record_many) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert recorder.drain()[0] == 4000


def test_it_numbers_heartbeats_and_carries_the_window() -> None:
    recorder = LatencyRecorder()
    builder = HeartbeatBuilder("dev-1", FakeClock(now=1234.5), recorder)
    recorder.record(7.0, ok=True)
    first = builder.build(30.0, None)
    second = builder.build(30.0, None)
    assert (first.seq, first.sent_at, first.requests, first.interval_s) == (1, 1234.5, 1, 30.0)
    assert first.mem_rss_bytes > 0 and first.mem_available_bytes > 0
    assert (second.seq, second.requests, second.latency) == (2, 0, None)
