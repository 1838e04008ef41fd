"""The agent's opt-in /metrics: Prometheus' text format, written without a metrics library."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.config import ConfigError, MetricsConfig, parse_config
from agent.metrics import AgentMetrics
from agent.telemetry import LatencyRecorder
from tests.agent.helpers import make_agent


def parse(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Every sample by name and labels, read by prometheus_client's own parser (it refuses malformed text)."""
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def scrape(port: int, path: str = "/metrics") -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return response.read().decode()


def test_it_counts_each_local_request_by_outcome_and_times_the_successful_ones():
    metrics = AgentMetrics()
    recorder = LatencyRecorder(metrics)
    recorder.record(3.0, ok=True)
    recorder.record(40.0, ok=True)
    recorder.record(1.0, ok=False)
    recorder.record(1.0, ok=False, fault=True)
    samples = parse(metrics.render().decode())
    assert samples["edgefleet_inference_requests_total"] == {
        (("outcome", "ok"),): 2, (("outcome", "error"),): 1, (("outcome", "fault"),): 1,
    }  # fmt: skip
    buckets = samples["edgefleet_inference_duration_seconds_bucket"]
    assert buckets[(("le", "0.0025"),)] == 0
    assert buckets[(("le", "0.005"),)] == 1
    assert buckets[(("le", "0.05"),)] == 2
    assert buckets[(("le", "+Inf"),)] == 2
    assert samples["edgefleet_inference_duration_seconds_sum"][()] == pytest.approx(0.043)
    # The heartbeat still drains its own per-interval figures.
    requests, errors, latency = recorder.drain()
    assert (requests, errors, latency and latency.count) == (4, 2, 2)


def test_it_records_ttft_and_tokens_a_second_through_the_generation_hook():
    metrics = AgentMetrics()
    metrics.observe_generation(ttft_s=0.2, output_tokens=21, duration_s=2.2)
    metrics.observe_generation(ttft_s=0.1, output_tokens=0, duration_s=0.1)  # nothing generated: not counted
    samples = parse(metrics.render().decode())
    assert samples["edgefleet_time_to_first_token_seconds_count"][()] == 1
    assert samples["edgefleet_time_to_first_token_seconds_bucket"][(("le", "0.25"),)] == 1
    assert samples["edgefleet_time_to_first_token_seconds_bucket"][(("le", "0.1"),)] == 0
    assert samples["edgefleet_inter_token_latency_seconds_sum"][()] == pytest.approx(0.1)
    assert samples["edgefleet_output_tokens_per_second_sum"][()] == pytest.approx(21 / 2.2)
    assert samples["edgefleet_generation_tokens_total"][()] == 21


def test_it_serves_no_metrics_unless_enabled(tmp_path: Path):
    agent = make_agent(tmp_path / "data")
    agent.start()
    try:
        assert agent.metrics_server is None
        assert not (tmp_path / "data" / "metrics.port").exists()
    finally:
        agent.stop()


def test_it_serves_latency_outbox_and_download_figures_when_enabled(tmp_path: Path):
    agent = make_agent(tmp_path / "data", metrics=MetricsConfig(enabled=True, port=0))
    agent.start()
    try:
        port = int((tmp_path / "data" / "metrics.port").read_text())
        agent.recorder.record(12.0, ok=True)
        agent.send_heartbeat()
        samples = parse(scrape(port))
        assert samples["edgefleet_inference_duration_seconds_count"][()] == 1
        # The outbox drains on its own thread meanwhile: its depth at the scrape is not pinned.
        assert samples["edgefleet_outbox_messages"][()] >= 0
        assert samples["edgefleet_download_size_bytes"][()] == 0
        assert "edgefleet_broker_connected" in samples
        with pytest.raises(urllib.error.HTTPError) as refused:
            scrape(port, "/v1/infer")
        assert refused.value.code == 404
    finally:
        agent.stop()


def test_it_refuses_a_metrics_section_with_a_typo():
    with pytest.raises(ConfigError, match="metrics"):
        parse_config('device_id = "d1"\ndata_dir = "/tmp/x"\n[metrics]\nenabeld = true\n')
