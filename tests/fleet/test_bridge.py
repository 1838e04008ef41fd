import hashlib
import io
import time

import paho.mqtt.client as mqtt
import pytest

from agent.contract import wire
from fleet.bridge.ingest import Inbound
from fleet.bridge.transport import Bridge
from fleet.choices import DeploymentState
from fleet.models import Artifact as ArtifactModel
from fleet.models import AuditEvent, Deployment, Device, Heartbeat
from fleet.mqtt.client import make_client
from fleet.services import assignments, registry
from fleet.storage import get_store
from tests.fleet.helpers import onnx_bytes
from tests.support import wait_until


class FakeClient:
    """Records what the bridge publishes; the bridge sets its callbacks on it."""

    def __init__(self):
        self.published = []

    def publish(self, topic, payload, qos=0, retain=False):
        self.published.append((topic, payload))


def hello(device_id="dev-1"):
    return wire.Hello(
        device_id=device_id,
        name="Lab box",
        hardware=wire.HardwareProfile(
            arch="x86_64", os="linux", cpu_count=2, ram_bytes=8 << 30, providers=["CPUExecutionProvider"]
        ),
        sent_at=time.time(),
    )


def heartbeat(device_id="dev-1", seq=1, p95=12.0):
    return wire.Heartbeat(
        device_id=device_id,
        seq=seq,
        sent_at=time.time(),
        interval_s=30,
        uptime_s=5,
        cpu_percent=3.5,
        mem_rss_bytes=50 << 20,
        mem_available_bytes=4 << 30,
        requests=10,
        errors=0,
        latency=wire.LatencyStats(count=10, p50_ms=8.0, p95_ms=p95, p99_ms=p95 + 1, max_ms=p95 + 2),
    )


def inbound(device_id, channel, payload):
    if isinstance(payload, wire.Message):
        payload = wire.encode(payload)
    return Inbound(wire.topic(device_id, channel), payload, time.time())


@pytest.fixture
def bridge(settings, tmp_path):
    settings.ARTIFACT_ROOT = tmp_path / "artifacts"
    return Bridge(FakeClient(), get_store(), batch_size=100)


@pytest.fixture
def deployment(settings, bridge, django_capture_on_commit_callbacks, fake_publisher):
    """dev-1 assigned a published version whose model file is a 700 KB ONNX graph, in 64 KiB chunks."""
    settings.ARTIFACT_CHUNK_SIZE = 64 * 1024
    bridge.handle(inbound("dev-1", wire.Channel.HELLO, hello()))
    bridge.flush()
    model = registry.create_model(name="tiny", actor="system")
    version = registry.create_version(model, actor="system")
    data = onnx_bytes(weights=175_000)
    with django_capture_on_commit_callbacks(execute=True):
        registry.add_artifact(version, io.BytesIO(data), filename="tiny.onnx", precision="fp32", actor="system")
    version = registry.publish_version(version, actor="system")
    with django_capture_on_commit_callbacks(execute=True):
        result = assignments.assign_version(version, Device.objects.all(), actor="system")
    return result.deployments[0], data


@pytest.mark.django_db
class TestBadMessages:
    @pytest.mark.parametrize("channel", wire.AGENT_CHANNELS)
    @pytest.mark.parametrize(
        "payload",
        [b"not json", b'{"v": 1, "device_id": "dev-1", "seq": "many"}', b"[]", b"\xff\xfe", b"x" * 70_000],
        ids=["not-json", "wrong-types", "wrong-shape", "not-utf8", "oversized"],
    )
    def test_it_counts_and_survives_a_bad_message(self, bridge, channel, payload):
        bridge.handle(inbound("dev-1", channel, payload))

        assert bridge.stats.snapshot()["bad_message"] == 1

    def test_it_refuses_a_payload_that_claims_another_device(self, bridge):
        bridge.handle(inbound("dev-1", wire.Channel.HELLO, hello("dev-2")))

        assert bridge.stats.snapshot()["bad_message"] == 1
        assert not Device.objects.exists()

    def test_it_refuses_a_heartbeat_from_an_unknown_device(self, bridge):
        bridge.handle(inbound("ghost", wire.Channel.HEARTBEAT, heartbeat("ghost")))
        bridge.flush()

        assert bridge.stats.snapshot()["unknown_device"] == 1
        assert not Heartbeat.objects.exists()

    def test_it_refuses_an_unknown_schema_version(self, bridge):
        message = hello()
        message.v = 99
        bridge.handle(inbound("dev-1", wire.Channel.HELLO, message))

        assert bridge.stats.snapshot()["bad_message"] == 1

    def test_it_ignores_topics_outside_the_contract(self, bridge):
        bridge.handle(Inbound("fleet/dev-1/bogus", b"{}", time.time()))
        bridge.handle(Inbound("elsewhere", b"{}", time.time()))

        assert bridge.stats.snapshot()["bad_message"] == 2


@pytest.mark.django_db
class TestMessages:
    def test_it_registers_a_device_from_its_hello(self, bridge):
        bridge.handle(inbound("dev-1", wire.Channel.HELLO, hello()))
        bridge.flush()

        device = Device.objects.get(device_id="dev-1")
        assert device.online
        assert device.hardware_class == "linux-x86_64"
        assert device.providers == ["CPUExecutionProvider"]

    def test_it_applies_a_flush_of_hellos_with_a_fixed_number_of_queries(self, bridge, django_assert_max_num_queries):
        for n in range(50):
            bridge.handle(inbound(f"dev-{n}", wire.Channel.HELLO, hello(f"dev-{n}")))
        assert not Device.objects.exists()

        with django_assert_max_num_queries(6):
            bridge.flush()

        assert Device.objects.filter(online=True, hardware_class="linux-x86_64").count() == 50
        assert AuditEvent.objects.filter(action="device.registered").count() == 50
        assert bridge.stats.snapshot()["hellos"] == 50

    def test_it_refreshes_a_known_device_without_registering_it_again(self, bridge):
        bridge.handle(inbound("dev-1", wire.Channel.HELLO, hello()))
        bridge.flush()
        Device.objects.update(online=False)
        unnamed = hello()
        unnamed.name = ""
        unnamed.hardware.ram_bytes = 16 << 30
        bridge.handle(inbound("dev-1", wire.Channel.HELLO, unnamed))
        bridge.flush()

        device = Device.objects.get(device_id="dev-1")
        assert (device.online, device.ram_bytes, device.name) == (True, 16 << 30, "Lab box")
        assert AuditEvent.objects.filter(action="device.registered").count() == 1

    def test_it_keeps_a_connect_storm_of_hellos_and_presences_in_one_batch(self, bridge, django_assert_max_num_queries):
        for n in range(20):
            bridge.handle(inbound(f"dev-{n}", wire.Channel.HELLO, hello(f"dev-{n}")))
            presence = wire.Presence(device_id=f"dev-{n}", online=True, reason="connected")
            with django_assert_max_num_queries(0):
                bridge.handle(inbound(f"dev-{n}", wire.Channel.PRESENCE, presence))

        bridge.flush()

        assert Device.objects.filter(online=True).count() == 20
        assert bridge.stats.snapshot()["presence"] == 20

    def test_it_applies_a_new_devices_hello_before_its_other_messages(self, bridge):
        bridge.handle(inbound("dev-7", wire.Channel.HELLO, hello("dev-7")))
        bridge.handle(inbound("dev-7", wire.Channel.HEARTBEAT, heartbeat("dev-7")))
        bridge.handle(inbound("dev-8", wire.Channel.HELLO, hello("dev-8")))
        bridge.handle(inbound("dev-8", wire.Channel.PRESENCE, wire.Presence(device_id="dev-8", online=False)))
        bridge.flush()

        assert Heartbeat.objects.filter(device__device_id="dev-7").count() == 1
        assert not Device.objects.get(device_id="dev-8").online
        assert "unknown_device" not in bridge.stats.snapshot()

    def test_it_stores_heartbeats_in_one_batch(self, bridge, django_assert_max_num_queries):
        bridge.handle(inbound("dev-1", wire.Channel.HELLO, hello()))
        for seq in range(50):
            bridge.handle(inbound("dev-1", wire.Channel.HEARTBEAT, heartbeat(seq=seq)))
        assert not Heartbeat.objects.exists()

        with django_assert_max_num_queries(7):
            bridge.flush()

        assert Heartbeat.objects.count() == 50
        assert Heartbeat.objects.filter(p95_ms=12.0, latency_count=10).count() == 50

    def test_it_flushes_when_the_batch_is_full(self, bridge):
        bridge.handle(inbound("dev-1", wire.Channel.HELLO, hello()))
        for seq in range(100):
            bridge.handle(inbound("dev-1", wire.Channel.HEARTBEAT, heartbeat(seq=seq)))

        assert Heartbeat.objects.count() == 100

    def test_it_marks_a_device_offline_on_its_last_will(self, bridge):
        bridge.handle(inbound("dev-1", wire.Channel.HELLO, hello()))
        bridge.handle(inbound("dev-1", wire.Channel.PRESENCE, wire.Presence(device_id="dev-1", online=False)))
        bridge.flush()

        assert not Device.objects.get(device_id="dev-1").online

    def test_it_applies_a_mass_disconnect_in_one_batch(self, bridge, django_assert_max_num_queries):
        for n in range(60):
            bridge.handle(inbound(f"dev-{n}", wire.Channel.HELLO, hello(f"dev-{n}")))
        bridge.flush()
        bridge.handle(inbound("ghost", wire.Channel.PRESENCE, wire.Presence(device_id="ghost", online=False)))
        for n in range(60):
            will = wire.Presence(device_id=f"dev-{n}", online=False, reason="lost")
            with django_assert_max_num_queries(0):
                bridge.handle(inbound(f"dev-{n}", wire.Channel.PRESENCE, will))

        with django_assert_max_num_queries(8):
            bridge.flush()

        assert not Device.objects.filter(online=True).exists()
        assert bridge.stats.snapshot()["unknown_device"] == 1

    def test_it_keeps_a_device_that_said_hello_after_its_last_will_online(self, bridge):
        bridge.handle(inbound("dev-1", wire.Channel.HELLO, hello()))
        bridge.flush()
        bridge.handle(inbound("dev-1", wire.Channel.PRESENCE, wire.Presence(device_id="dev-1", online=False)))
        bridge.handle(inbound("dev-1", wire.Channel.HELLO, hello()))
        bridge.flush()

        assert Device.objects.get(device_id="dev-1").online

    def test_it_moves_a_deployment_through_its_states(self, bridge, deployment):
        dep, data = deployment
        sha = hashlib.sha256(data).hexdigest()
        for state in ("downloading", "verifying", "active"):
            report = wire.StateReport(
                device_id="dev-1", deployment_id=dep.pk, state=state, sha256=sha, sent_at=time.time()
            )
            bridge.handle(inbound("dev-1", wire.Channel.STATE, report))
        bridge.flush()

        dep.refresh_from_db()
        assert dep.state == DeploymentState.ACTIVE
        assert dep.active_at is not None
        assert Device.objects.get(device_id="dev-1").current_version_id == dep.version_id
        counts = bridge.stats.snapshot()
        assert (counts["state_downloading"], counts["state_verifying"], counts["state_active"]) == (1, 1, 1)

    def test_it_never_moves_a_deployment_back(self, bridge, deployment):
        dep, _ = deployment
        for state in ("verifying", "downloading"):
            report = wire.StateReport(device_id="dev-1", deployment_id=dep.pk, state=state, sent_at=time.time())
            bridge.handle(inbound("dev-1", wire.Channel.STATE, report))
        bridge.flush()

        dep.refresh_from_db()
        assert dep.state == DeploymentState.VERIFYING
        assert bridge.stats.snapshot()["stale_report"] == 1

    def test_it_fails_a_deployment_that_activated_the_wrong_file(self, bridge, deployment):
        dep, _ = deployment
        report = wire.StateReport(
            device_id="dev-1", deployment_id=dep.pk, state="active", sha256="0" * 64, sent_at=time.time()
        )
        bridge.handle(inbound("dev-1", wire.Channel.STATE, report))
        bridge.flush()

        dep.refresh_from_db()
        assert dep.state == DeploymentState.FAILED
        assert "expected" in dep.error

    def test_it_refuses_a_report_on_another_devices_deployment(self, bridge, deployment):
        dep, _ = deployment
        bridge.handle(inbound("dev-2", wire.Channel.HELLO, hello("dev-2")))
        report = wire.StateReport(device_id="dev-2", deployment_id=dep.pk, state="failed", sent_at=time.time())
        bridge.handle(inbound("dev-2", wire.Channel.STATE, report))
        bridge.flush()

        assert Deployment.objects.get(pk=dep.pk).state == DeploymentState.PENDING
        assert bridge.stats.snapshot()["stale_report"] == 1


@pytest.mark.django_db
class TestChunks:
    def request(self, dep, sha, indexes, device_id="dev-1"):
        return inbound(
            device_id,
            wire.Channel.CHUNK_REQUEST,
            wire.ChunkRequest(device_id=device_id, deployment_id=dep.pk, sha256=sha, indexes=indexes),
        )

    def test_it_serves_the_chunks_a_device_asks_for(self, bridge, deployment):
        dep, data = deployment
        sha = hashlib.sha256(data).hexdigest()

        bridge.serve_chunk_request(self.request(dep, sha, [2, 0]))

        frames = [wire.decode_chunk(payload) for _, payload in bridge.client.published]
        lengths = dep.artifact.chunk_lengths
        assert len(lengths) > 2  # content-defined: each chunk as long as its content says
        assert [f.index for f in frames] == [2, 0]
        assert frames[0].data == data[sum(lengths[:2]) : sum(lengths[:3])]
        assert frames[1].data == data[: lengths[0]]
        assert {topic for topic, _ in bridge.client.published} == {"fleet/dev-1/chunks/data"}
        assert bridge.stats.snapshot()["chunk_bytes_served"] == lengths[0] + lengths[2]

    def test_it_serves_fixed_size_chunks_of_a_file_stored_that_way(self, settings, bridge, deployment):
        dep, data = deployment
        size = dep.artifact.chunk_size
        # A file stored before content-defined chunking, or with ARTIFACT_CHUNKING=fixed.
        type(dep.artifact).objects.filter(pk=dep.artifact.pk).update(chunk_lengths=[])

        bridge.serve_chunk_request(self.request(dep, hashlib.sha256(data).hexdigest(), [2]))

        frame = wire.decode_chunk(bridge.client.published[0][1])
        assert frame.data == data[2 * size : 3 * size]

    def test_it_refuses_a_file_outside_the_devices_deployment(self, bridge, deployment):
        dep, _ = deployment

        bridge.serve_chunk_request(self.request(dep, "ab" * 32, [0]))

        frame = wire.decode_chunk(bridge.client.published[0][1])
        assert frame.kind == wire.ChunkKind.ERROR
        assert b"not part of deployment" in frame.data

    def test_it_serves_a_bundles_external_weights_and_config_but_not_another_models(
        self, settings, bridge, tmp_path, django_capture_on_commit_callbacks, fake_publisher
    ):
        bridge.handle(inbound("dev-1", wire.Channel.HELLO, hello()))
        bridge.flush()
        version = registry.create_version(registry.create_model(name="lm", actor="system"), actor="system")
        with django_capture_on_commit_callbacks(execute=True):
            models = [
                registry.add_artifact(
                    version,
                    io.BytesIO(onnx_bytes(weights=n)),
                    filename=f"m{n}.onnx",
                    precision=precision,
                    actor="system",
                )  # fmt: skip
                for n, precision in ((1000, "int4"), (2000, "int8"))
            ]
        files = {}
        for name, role, part_of in [("w4", "model_data", 0), ("w8", "model_data", 1), ("cfg", "config", None)]:
            (tmp_path / name).write_bytes(name.encode() * 1000)
            files[name] = registry.add_generated_artifact(
                version, tmp_path / name, filename=name, actor="system", role=role, format="bin",
                part_of=None if part_of is None else models[part_of],
            )  # fmt: skip
        ArtifactModel.objects.filter(pk=models[1].pk).update(quality="rejected")
        version = registry.publish_version(version, actor="system")
        with django_capture_on_commit_callbacks(execute=True):
            dep = assignments.assign_version(version, Device.objects.all(), actor="system").deployments[0]
        assert dep.artifact_id == models[0].pk

        for name in ("w4", "cfg", "w8"):
            bridge.serve_chunk_request(self.request(dep, files[name].sha256, [0]))
        served, refused = bridge.client.published[:2], bridge.client.published[2]

        assert [wire.decode_chunk(payload).data for _, payload in served] == [b"w4" * 1000, b"cfg" * 1000]
        assert wire.decode_chunk(refused[1]).kind == wire.ChunkKind.ERROR

    def test_it_refuses_another_devices_deployment(self, bridge, deployment):
        dep, data = deployment
        bridge.handle(inbound("dev-2", wire.Channel.HELLO, hello("dev-2")))

        bridge.serve_chunk_request(self.request(dep, hashlib.sha256(data).hexdigest(), [0], device_id="dev-2"))

        frame = wire.decode_chunk(bridge.client.published[0][1])
        assert frame.kind == wire.ChunkKind.ERROR
        assert bridge.client.published[0][0] == "fleet/dev-2/chunks/data"

    def test_it_refuses_a_chunk_past_the_end(self, bridge, deployment):
        dep, data = deployment

        bridge.serve_chunk_request(self.request(dep, hashlib.sha256(data).hexdigest(), [999]))

        assert wire.decode_chunk(bridge.client.published[0][1]).kind == wire.ChunkKind.ERROR


@pytest.mark.django_db(transaction=True)
def test_it_keeps_running_through_bad_messages_on_a_real_broker(settings, tmp_path, broker_port, fake_publisher):
    settings.ARTIFACT_ROOT = tmp_path
    broker = wire.parse_broker_url(f"mqtt://127.0.0.1:{broker_port}")
    settings.MQTT_BROKER = broker
    bridge = Bridge(make_client("bridge-test", broker=broker), get_store(), flush_seconds=0.05)
    bridge.start()
    agent = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    agent.connect("127.0.0.1", broker_port)
    agent.loop_start()
    try:
        wait_until(bridge.connected.is_set, timeout=10, what="bridge connected")
        time.sleep(0.2)  # let the subscription land
        for channel in wire.AGENT_CHANNELS:
            for bad in (b"not json", b'{"v":1}', b"x" * 70_000):
                agent.publish(wire.topic("dev-9", channel), bad, qos=1).wait_for_publish(5)
        agent.publish("fleet/dev-9/heartbeat", wire.encode(heartbeat("dev-9")), qos=1).wait_for_publish(5)
        agent.publish("fleet/dev-9/hello", wire.encode(hello("dev-9")), qos=1).wait_for_publish(5)
        agent.publish("fleet/dev-9/heartbeat", wire.encode(heartbeat("dev-9", seq=2)), qos=1).wait_for_publish(5)

        wait_until(lambda: Heartbeat.objects.filter(device__device_id="dev-9").exists(), timeout=10, what="heartbeat")
        stats = bridge.stats.snapshot()
        assert stats["bad_message"] == 3 * len(wire.AGENT_CHANNELS)
        assert stats["unknown_device"] == 1
        assert all(thread.is_alive() for thread in bridge._threads)
        wait_until(lambda: fake_publisher.messages, timeout=5, what="the hello answered")
        assert [topic for topic, _, retain in fake_publisher.messages if retain] == ["fleet/dev-9/desired"]
    finally:
        agent.disconnect()
        agent.loop_stop()
        bridge.stop()


@pytest.mark.django_db
def test_it_takes_a_repeated_active_report_as_a_confirmation(bridge, deployment):
    dep, data = deployment
    report = wire.StateReport(
        device_id="dev-1", deployment_id=dep.pk, state="active", sha256=hashlib.sha256(data).hexdigest(), sent_at=1.0
    )
    bridge.handle(inbound("dev-1", wire.Channel.STATE, report))
    bridge.handle(inbound("dev-1", wire.Channel.STATE, report))
    bridge.flush()

    assert Deployment.objects.get(pk=dep.pk).state == DeploymentState.ACTIVE
    assert "stale_report" not in bridge.stats.snapshot()


@pytest.mark.django_db
def test_it_records_an_ineligible_device_without_calling_it_a_failure(bridge, deployment):
    dep, _ = deployment
    report = wire.StateReport(
        device_id="dev-1", deployment_id=dep.pk, state="ineligible", error="needs 2 GB of disk", sent_at=1.0
    )
    bridge.handle(inbound("dev-1", wire.Channel.STATE, report))
    bridge.flush()

    dep.refresh_from_db()
    assert dep.state == DeploymentState.INELIGIBLE
    assert dep.error == "needs 2 GB of disk"


@pytest.mark.django_db
def test_it_records_a_local_rollback_and_what_the_device_runs_again(bridge, deployment):
    dep, data = deployment
    sha = hashlib.sha256(data).hexdigest()
    for state in ("active", "rolled_back"):
        report = wire.StateReport(
            device_id="dev-1", deployment_id=dep.pk, state=state, sha256=sha, error="error rate 40%", sent_at=1.0
        )
        bridge.handle(inbound("dev-1", wire.Channel.STATE, report))
    bridge.flush()

    dep.refresh_from_db()
    assert dep.state == DeploymentState.ROLLED_BACK
    assert Device.objects.get(device_id="dev-1").current_version is None


@pytest.mark.django_db
def test_it_answers_many_hellos_with_one_batch(bridge, django_capture_on_commit_callbacks, fake_publisher):
    with django_capture_on_commit_callbacks(execute=True):
        for n in range(5):
            bridge.handle(inbound(f"dev-{n}", wire.Channel.HELLO, hello(f"dev-{n}")))
        bridge.flush()
    assert fake_publisher.messages == []

    bridge.ingest._answer_hellos()

    assert sorted(topic for topic, _, _ in fake_publisher.messages) == [f"fleet/dev-{n}/desired" for n in range(5)]


@pytest.mark.django_db(transaction=True)  # the fallback closes a connection a failed batch left unusable
def test_it_refuses_a_hello_whose_fields_the_plane_cannot_store(bridge):
    bad = hello("dev-bad")
    bad.hardware.arch = "x" * 40  # beyond the column's 32
    for message in (hello("dev-1"), bad, hello("dev-2")):
        bridge.handle(inbound(message.device_id, wire.Channel.HELLO, message))

    bridge.flush()

    assert sorted(Device.objects.values_list("device_id", flat=True)) == ["dev-1", "dev-2"]
    assert bridge.stats.snapshot()["bad_message"] == 1
    assert bridge.stats.snapshot()["hellos"] == 2
