"""/metrics of the plane, the bridge and the Celery workers, read back with prometheus_client's parser."""

import time

import paho.mqtt.client as mqtt
import pytest
from django.test import Client
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from agent.contract import wire
from fleet import tasks
from fleet.bridge.metrics import BridgeMetrics
from fleet.bridge.transport import Bridge
from fleet.choices import EnrollmentState, RolloutState
from fleet.models import Device
from fleet.storage import get_store
from tests.fleet.test_bridge import FakeClient, heartbeat, hello

pytestmark = pytest.mark.django_db


def parse(text: str) -> dict[str, dict[tuple, float]]:
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def test_it_shows_loopback_scrapers_the_fleet_by_state(settings, tmp_path):
    settings.ARTIFACT_ROOT = tmp_path / "artifacts"
    Device.objects.create(device_id="on-1", online=True)
    Device.objects.create(device_id="off-1", online=False)
    Device.objects.create(device_id="off-2", online=False, enrollment=EnrollmentState.DECOMMISSIONED)
    response = Client().get("/metrics")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    samples = parse(response.content.decode())
    devices = samples["edgefleet_devices"]
    assert devices[(("enrollment", "accepted"), ("status", "online"))] == 1
    assert devices[(("enrollment", "accepted"), ("status", "offline"))] == 1
    assert devices[(("enrollment", "decommissioned"), ("status", "offline"))] == 1
    # Every rollout state is there before the first rollout: an alert on its change needs the series.
    assert samples["edgefleet_rollouts"][(("state", RolloutState.ROLLED_BACK),)] == 0
    assert samples["edgefleet_artifact_store_free_bytes"][()] > 0
    assert samples["edgefleet_heartbeat_last_received_timestamp_seconds"][()] == 0


def test_it_refuses_a_remote_scraper_without_the_token(settings):
    settings.METRICS_TOKEN = ""
    assert Client(REMOTE_ADDR="10.0.0.9").get("/metrics").status_code == 403
    settings.METRICS_TOKEN = "s3cret"
    assert Client(REMOTE_ADDR="10.0.0.9").get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 403
    response = Client(REMOTE_ADDR="10.0.0.9").get("/metrics", HTTP_AUTHORIZATION="Bearer s3cret")
    assert response.status_code == 200


def test_it_serves_a_scraper_inside_the_stack_by_its_service_name_over_plain_http(settings):
    settings.SECURE_SSL_REDIRECT = True
    settings.ALLOWED_HOSTS = ["plane.example.com", "web"]  # as docker/.env.example sets them
    settings.METRICS_TOKEN = "s3cret"
    scraper = Client(REMOTE_ADDR="172.18.0.7", HTTP_HOST="web:8000")

    assert scraper.get("/metrics", HTTP_AUTHORIZATION="Bearer s3cret").status_code == 200
    assert scraper.get("/api/v1/").status_code == 301


def deliver(bridge: Bridge, device_id: str, channel: wire.Channel, payload: bytes) -> None:
    """What paho's thread does with a message: route it; then the database thread's turn."""
    message = mqtt.MQTTMessage(topic=wire.topic(device_id, channel).encode())
    message.payload = payload
    bridge._on_message(None, None, message)
    bridge.handle(bridge.inbox.get_nowait())


def test_it_counts_bridge_messages_by_kind_and_refusals_by_reason(settings, tmp_path):
    settings.ARTIFACT_ROOT = tmp_path / "artifacts"
    bridge = Bridge(FakeClient(), get_store(), batch_size=100)
    metrics = BridgeMetrics(bridge)
    deliver(bridge, "dev-1", wire.Channel.HELLO, wire.encode(hello()))
    bridge.flush()
    for seq in (1, 2, 3):
        deliver(bridge, "dev-1", wire.Channel.HEARTBEAT, wire.encode(heartbeat(seq=seq)))
    deliver(bridge, "dev-1", wire.Channel.HEARTBEAT, b"{not json")
    deliver(bridge, "ghost", wire.Channel.HEARTBEAT, wire.encode(heartbeat("ghost")))
    bridge.flush()
    samples = parse(metrics.registry_text())
    kinds = samples["edgefleet_bridge_messages_total"]
    assert kinds[(("kind", "hello"),)] == 1
    assert kinds[(("kind", "heartbeat"),)] == 5
    bad = samples["edgefleet_bridge_bad_messages_total"]
    assert bad[(("reason", "bad_message"),)] == 1
    assert bad[(("reason", "unknown_device"),)] == 1
    assert samples["edgefleet_bridge_heartbeats_stored_total"][()] == 3
    assert samples["edgefleet_bridge_batch_messages_sum"][(("kind", "heartbeats"),)] == 3
    assert samples["edgefleet_bridge_flush_duration_seconds_count"][(("kind", "hellos"),)] == 1
    assert samples["edgefleet_bridge_heartbeat_lag_seconds_count"][()] == 1
    assert 0 <= samples["edgefleet_bridge_heartbeat_lag_seconds_sum"][()] < 5
    assert samples["edgefleet_bridge_queue_messages"][(("queue", "held"),)] == 0


def test_it_serves_the_bridge_metrics_on_their_own_port(settings, tmp_path):
    import urllib.request

    settings.ARTIFACT_ROOT = tmp_path / "artifacts"
    metrics = BridgeMetrics(Bridge(FakeClient(), get_store()))
    port = metrics.serve(0)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            assert "edgefleet_bridge_messages_total" in parse(response.read().decode())
    finally:
        metrics.close()


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_it_counts_and_times_each_task_by_name_and_outcome():
    before = value("edgefleet_worker_tasks_total", task="fleet.mark_offline_devices", outcome="success")
    timed = value("edgefleet_worker_task_duration_seconds_count", task="fleet.mark_offline_devices")
    started = time.monotonic()
    tasks.mark_offline_devices.delay()  # eager in the tests: the same signals as in a worker
    assert time.monotonic() - started < 5
    assert value("edgefleet_worker_tasks_total", task="fleet.mark_offline_devices", outcome="success") == before + 1
    assert value("edgefleet_worker_task_duration_seconds_count", task="fleet.mark_offline_devices") == timed + 1
