"""The simulator logs in as agents do: each device enrolls with a live plane, then logs in to a
Mosquitto with dynamic security under a login of its own, held to its own topics."""

import json
import queue
from datetime import timedelta

import paho.mqtt.client as mqtt
import pytest
from django.core.cache import cache

from bench.simulate import Options, simulate
from fleet.models import AuditEvent, Device
from fleet.mqtt.broker_admin import dynsec_session
from fleet.services import enrollment
from tests.support import DYNSEC_PLUGIN, secure_mosquitto, wait_until

pytestmark = pytest.mark.skipif(not DYNSEC_PLUGIN.exists(), reason=f"{DYNSEC_PLUGIN} is not installed")


@pytest.fixture
def secure_plane(settings, live_server, tmp_path):
    """A live plane that makes device logins on a broker of the test's own; yields the broker's port."""
    with secure_mosquitto(tmp_path, admin_password="admin-secret") as port:
        settings.MQTT_DYNSEC = True
        settings.MQTT_ADMIN_URL = f"mqtt://admin@127.0.0.1:{port}"
        settings.MQTT_ADMIN_PASSWORD = "admin-secret"
        settings.MQTT_DEVICE_URL = f"mqtt://127.0.0.1:{port}"
        settings.ENROLLMENT_REQUIRED = True
        cache.clear()  # enrollment is throttled per client address, in this process's cache
        with dynsec_session() as dynsec:
            dynsec.ensure_roles()
        yield port


@pytest.fixture
def fleet(secure_plane, live_server, tmp_path):
    _, secret = enrollment.create_token(name="sim", expires_in=timedelta(hours=1), actor="system", auto_approve=True)
    return Options(broker_url=f"mqtt://127.0.0.1:{secure_plane}", devices=3, prefix="sim", heartbeat_interval=0.5,
                   duration=3.0, state_dir=str(tmp_path / "devices"), plane_url=live_server.url,
                   enroll_token=secret)  # fmt: skip


class Listener:
    """The broker's admin login, hearing every device's heartbeats."""

    def __init__(self, port, username="admin", password="admin-secret"):
        self.received = queue.Queue()
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.username_pw_set(username, password)
        self.client.on_connect = lambda c, *a: c.subscribe("fleet/+/heartbeat", qos=1)
        self.client.on_message = lambda c, u, m: self.received.put((m.topic, m.payload))
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def topics(self):
        topics = set()
        while not self.received.empty():
            topics.add(self.received.get()[0])
        return topics

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()


@pytest.mark.django_db(transaction=True)
def test_it_enrolls_each_device_through_the_plane_and_logs_it_in_with_its_own_login(secure_plane, fleet):
    listener = Listener(secure_plane)
    try:
        totals = simulate(fleet)
        heard = listener.topics()
    finally:
        listener.close()

    assert (totals.connects, totals.refused) == (3, 0)
    assert heard == {f"fleet/sim-00000{n}/heartbeat" for n in range(3)}
    enrolled = set(Device.objects.values_list("device_id", "enrollment"))
    assert enrolled == {(f"sim-00000{n}", "accepted") for n in range(3)}
    with dynsec_session() as dynsec:
        client = dynsec.execute("getClient", username="device:sim-000001")["data"]["client"]
    assert client["roles"] == [{"rolename": "edgefleet-device-sim-000001"}]


@pytest.mark.django_db(transaction=True)
def test_a_restarted_simulator_logs_in_with_the_saved_logins_without_enrolling_again(secure_plane, fleet):
    simulate(fleet)

    totals = simulate(fleet)

    assert (totals.connects, totals.refused) == (3, 0)
    assert AuditEvent.objects.filter(action="device.credentials_issued").count() == 3


@pytest.mark.django_db(transaction=True)
def test_a_simulated_devices_login_speaks_only_for_that_device(secure_plane, fleet, tmp_path):
    simulate(fleet)
    saved = json.loads((tmp_path / "devices" / "sim-000000" / "broker.json").read_text())
    listener = Listener(secure_plane)
    device = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    device.username_pw_set(saved["username"], saved["password"])
    try:
        device.connect("127.0.0.1", secure_plane)
        device.loop_start()
        wait_until(device.is_connected, timeout=5)
        device.publish("fleet/sim-000001/heartbeat", b"forged", qos=1).wait_for_publish(5)
        device.publish("fleet/sim-000000/heartbeat", b"mine", qos=1).wait_for_publish(5)
        wait_until(lambda: not listener.received.empty(), timeout=5)
        heard = listener.topics()
    finally:
        device.loop_stop()
        device.disconnect()
        listener.close()

    assert heard == {"fleet/sim-000000/heartbeat"}
