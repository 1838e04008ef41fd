"""The bridge under bad rows, a lost database and hostile chunk requests (issue #13, items 2, 8, 9, 10)."""

import json
import time
from datetime import UTC, datetime

import msgspec
import psycopg
import pytest
from django.db import connection

from agent.contract import wire
from fleet.bridge import chunks
from fleet.bridge.chunks import ChunkLimits
from fleet.bridge.transport import Bridge
from fleet.choices import EnrollmentState
from fleet.models import Device, Heartbeat
from fleet.services import telemetry
from fleet.storage import get_store
from tests.fleet.test_bridge import FakeClient, deployment, heartbeat, hello, inbound  # noqa: F401  (fixture)

MiB = 2**20


@pytest.fixture
def bridge(settings, tmp_path):
    settings.ARTIFACT_ROOT = tmp_path / "artifacts"
    return Bridge(FakeClient(), get_store(), batch_size=100)


def greet(bridge, *device_ids):
    for device_id in device_ids:
        bridge.handle(inbound(device_id, wire.Channel.HELLO, hello(device_id)))
    bridge.flush()


def kill_backend(pid: int) -> None:
    """What a PostgreSQL restart does to a client: its connection is cut from the server side."""
    db = connection.settings_dict
    with psycopg.connect(
        host=db["HOST"], port=db["PORT"], user=db["USER"], password=db["PASSWORD"], dbname=db["NAME"], autocommit=True
    ) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", [pid])


def chunk_request(dep, indexes):
    return wire.ChunkRequest(device_id="dev-1", deployment_id=dep.pk, sha256=dep.artifact.sha256, indexes=indexes)


def my_backend_pid() -> int:
    connection.ensure_connection()
    return connection.connection.info.backend_pid


@pytest.mark.parametrize(
    "field, value",
    [("requests", "2147483648"), ("errors", "2147483648"), ("sent_at", "1e12"), ("seq", str(2**63)),
     ("cpu_percent", "1e999")],
)  # fmt: skip
def test_it_refuses_a_heartbeat_with_a_number_out_of_range(field, value):
    message = msgspec.to_builtins(heartbeat())
    message[field] = "VALUE"
    payload = json.dumps(message).replace('"VALUE"', value).encode()

    with pytest.raises(wire.WireError, match=field):
        wire.decode(wire.Channel.HEARTBEAT, payload)


def test_it_refuses_a_device_id_with_a_trailing_newline():
    payload = wire.encode(hello("dev-1")).replace(b'"dev-1"', b'"dev-1\\n"')

    with pytest.raises(wire.WireError):
        wire.decode(wire.Channel.HELLO, payload)


@pytest.mark.django_db(transaction=True)
def test_it_drops_only_the_row_the_database_refuses_and_keeps_storing(bridge):
    greet(bridge, "dev-1")
    pk = Device.objects.get().pk
    at = datetime.now(tz=UTC)
    bad = heartbeat(seq=2)
    bad.requests = 2**31  # as if the contract had let it through: the column is a 32-bit integer
    bridge.ingest._heartbeats += [
        telemetry.ReceivedHeartbeat(pk, m, at) for m in (heartbeat(seq=1), bad, heartbeat(seq=3))
    ]

    bridge.flush()
    bridge.handle(inbound("dev-1", wire.Channel.HEARTBEAT, heartbeat(seq=4)))
    bridge.flush()

    assert sorted(Heartbeat.objects.values_list("seq", flat=True)) == [1, 3, 4]
    assert bridge.stats.snapshot()["bad_heartbeats"] == 1
    assert bridge.held() == 0


@pytest.mark.django_db(transaction=True)
def test_it_holds_what_it_took_while_the_database_is_lost_and_stores_it_once_after(bridge):
    greet(bridge, "dev-1")
    for seq in range(1, 6):
        bridge.handle(inbound("dev-1", wire.Channel.HEARTBEAT, heartbeat(seq=seq)))
    kill_backend(my_backend_pid())

    bridge.flush()
    assert bridge.ingest.database_down
    assert bridge.held() == 5
    bridge.ingest._db_retry_at = 0  # the backoff has passed
    bridge.flush()

    assert sorted(Heartbeat.objects.values_list("seq", flat=True)) == [1, 2, 3, 4, 5]
    assert bridge.held() == 0
    assert bridge.stats.snapshot()["flush_failures"] == 1


@pytest.mark.django_db(transaction=True)
def test_it_serves_chunks_again_after_the_database_restarts(bridge, deployment, monkeypatch):  # noqa: F811
    dep, _ = deployment
    monkeypatch.setattr(chunks, "GRANT_TTL_S", 0.0)  # read the grant from the database every time
    request = wire.ChunkRequest(device_id="dev-1", deployment_id=dep.pk, sha256=dep.artifact.sha256, indexes=[0])
    bridge.serve_chunk_request(inbound("dev-1", wire.Channel.CHUNK_REQUEST, request))
    kill_backend(my_backend_pid())

    bridge.serve_chunk_request(inbound("dev-1", wire.Channel.CHUNK_REQUEST, request))

    frames = [wire.decode_chunk(p) for _, p in bridge.client.published]
    assert [(f.kind, f.index) for f in frames] == [(wire.ChunkKind.DATA, 0)] * 2
    assert "errors" not in bridge.stats.snapshot()


@pytest.mark.django_db
@pytest.mark.parametrize("enrollment_required", [False, True])
def test_it_serves_no_chunk_to_a_decommissioned_device(
    bridge,
    deployment,  # noqa: F811
    settings,
    monkeypatch,
    enrollment_required,
):
    settings.ENROLLMENT_REQUIRED = enrollment_required
    settings.MQTT_DYNSEC = False
    dep, _ = deployment
    monkeypatch.setattr(chunks, "GRANT_TTL_S", 0.0)
    Device.objects.filter(device_id="dev-1").update(enrollment=EnrollmentState.DECOMMISSIONED)
    request = wire.ChunkRequest(device_id="dev-1", deployment_id=dep.pk, sha256=dep.artifact.sha256, indexes=[0, 1])

    bridge.serve_chunk_request(inbound("dev-1", wire.Channel.CHUNK_REQUEST, request))

    frames = [wire.decode_chunk(p) for _, p in bridge.client.published]
    assert [f.kind for f in frames] == [wire.ChunkKind.ERROR]
    assert b"decommissioned" in frames[0].data
    assert bridge.stats.snapshot()["chunk_refused"] == 1


class Unacknowledged:
    """paho's message info for a publish the broker has not acknowledged yet."""

    rc = 0
    published = False

    def is_published(self):
        return self.published


class SlowBroker(FakeClient):
    """Records publishes and acknowledges none until told to."""

    def __init__(self):
        super().__init__()
        self.infos = []

    def publish(self, topic, payload, qos=0, retain=False):
        super().publish(topic, payload, qos, retain)
        self.infos.append(Unacknowledged())
        return self.infos[-1]

    def acknowledge_all(self):
        for info in self.infos:
            info.published = True


@pytest.mark.django_db
def test_it_caps_what_one_device_may_have_unacknowledged(settings, tmp_path, deployment):  # noqa: F811
    dep, data = deployment
    client = SlowBroker()
    limits = ChunkLimits(rate=1e12, burst=1 << 40, device_inflight=4 * MiB, total_inflight=64 * MiB)
    bridge = Bridge(client, get_store(), chunk_limits=limits)
    every_chunk = list(range(len(dep.artifact.chunk_lengths) or dep.artifact.chunk_count))
    request = wire.ChunkRequest(
        device_id="dev-1", deployment_id=dep.pk, sha256=dep.artifact.sha256, indexes=every_chunk
    )

    for _ in range(100):  # 100 requests of 261 bytes, each for the whole 700 KB file
        bridge.serve_chunk_request(inbound("dev-1", wire.Channel.CHUNK_REQUEST, request))
    sent = sum(len(p) - wire.CHUNK_HEADER_BYTES for _, p in client.published)

    assert sent <= 4 * MiB
    assert bridge.stats.snapshot()["chunks_throttled"] > 0
    client.acknowledge_all()
    bridge.serve_chunk_request(inbound("dev-1", wire.Channel.CHUNK_REQUEST, request))
    assert sum(len(p) - wire.CHUNK_HEADER_BYTES for _, p in client.published) == sent + len(data)


@pytest.mark.django_db
def test_it_limits_the_rate_at_which_one_device_is_sent_chunks(settings, tmp_path, deployment):  # noqa: F811
    dep, data = deployment
    limits = ChunkLimits(rate=1 * MiB, burst=4 * MiB, device_inflight=1 << 40, total_inflight=1 << 40)
    bridge = Bridge(FakeClient(), get_store(), chunk_limits=limits)
    every_chunk = list(range(dep.artifact.chunk_count))
    request = wire.ChunkRequest(
        device_id="dev-1", deployment_id=dep.pk, sha256=dep.artifact.sha256, indexes=every_chunk
    )

    started = time.monotonic()
    for _ in range(50):
        bridge.serve_chunk_request(inbound("dev-1", wire.Channel.CHUNK_REQUEST, request))
    elapsed = time.monotonic() - started
    sent = sum(len(p) - wire.CHUNK_HEADER_BYTES for _, p in bridge.client.published)

    assert sent <= 4 * MiB + elapsed * MiB
    assert sent < 50 * len(data) / 4


@pytest.mark.django_db
def test_it_sends_a_chunk_named_twice_in_one_request_once(bridge, deployment):  # noqa: F811
    dep, _ = deployment
    request = wire.ChunkRequest(device_id="dev-1", deployment_id=dep.pk, sha256=dep.artifact.sha256, indexes=[0] * 64)

    bridge.serve_chunk_request(inbound("dev-1", wire.Channel.CHUNK_REQUEST, request))

    assert len(bridge.client.published) == 1
