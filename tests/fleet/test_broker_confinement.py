"""A real Mosquitto with the dynamic-security plugin confines each device to its own topics.

Denials are checked by what is actually delivered, never by client return codes:
Mosquitto answers a denied subscription with a SUBACK and a denied publish with a
PUBACK, and simply delivers nothing.
"""

import queue
import time

import paho.mqtt.client as mqtt
import pytest

from fleet.mqtt.dynsec import DynSec, DynSecError, device_acls, device_role, device_username
from tests.support import DYNSEC_PLUGIN, secure_mosquitto

pytestmark = pytest.mark.skipif(not DYNSEC_PLUGIN.exists(), reason=f"{DYNSEC_PLUGIN} is not installed")
SETTLE = 0.5  # long enough for a message the broker would deliver to arrive on loopback


class Client:
    """A paho client that records what it receives and how its connection attempt ended."""

    def __init__(self, port, username=None, password=None):
        self.received = queue.Queue()
        self.connack = queue.Queue()
        self.paho = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        if username:
            self.paho.username_pw_set(username, password)
        self.paho.on_connect = lambda c, u, f, reason, p: self.connack.put(reason)
        self.paho.on_message = lambda c, u, m: self.received.put((m.topic, m.payload))
        self.paho.connect("127.0.0.1", port)
        self.paho.loop_start()
        self.reason = self.connack.get(timeout=5)

    @property
    def accepted(self):
        return not self.reason.is_failure

    def subscribe(self, topic):
        self.paho.subscribe(topic, qos=1)
        time.sleep(0.2)

    def publish(self, topic, payload=b"x"):
        self.paho.publish(topic, payload, qos=1).wait_for_publish(5)

    def got(self):
        time.sleep(SETTLE)
        items = []
        while not self.received.empty():
            items.append(self.received.get())
        return items

    def close(self):
        self.paho.disconnect()  # before loop_stop, which would otherwise wait out the loop's 1 s select
        self.paho.loop_stop()


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    with secure_mosquitto(tmp_path_factory.mktemp("secure-broker"), admin_password="admin-secret") as port:
        admin = Client(port, "admin", "admin-secret")
        dynsec = DynSec(admin.paho)
        dynsec.ensure_roles()
        for device_id in ("dev-a", "dev-b", "dev-gone", "dev-off"):
            dynsec.add_device(device_id, f"{device_id}-secret")
        dynsec.add_bridge("bridge", "bridge-secret")
        yield port, dynsec
        admin.close()


@pytest.fixture
def clients(broker):
    port, _ = broker
    opened = []

    def connect(username=None, password=None):
        password = password or (f"{username}-secret" if username else None)
        # Devices log in under their namespaced login (dynsec.device_username); "dev-a" is device dev-a.
        login = device_username(username) if username and username.startswith("dev-") else username
        client = Client(port, login, password)
        opened.append(client)
        return client

    yield connect
    for client in opened:
        client.close()


def test_it_lets_a_device_speak_on_its_own_topics(clients):
    bridge, device = clients("bridge"), clients("dev-a")
    bridge.subscribe("$share/edgefleet-plane/fleet/+/heartbeat")
    device.subscribe("fleet/dev-a/desired")

    device.publish("fleet/dev-a/heartbeat", b"beat")
    bridge.publish("fleet/dev-a/desired", b"run v2")

    assert bridge.got() == [("fleet/dev-a/heartbeat", b"beat")]
    assert device.got() == [("fleet/dev-a/desired", b"run v2")]


def test_it_stops_a_device_publishing_as_another(clients):
    bridge, device = clients("bridge"), clients("dev-a")
    bridge.subscribe("fleet/+/heartbeat")

    device.publish("fleet/dev-b/heartbeat", b"forged")
    device.publish("fleet/dev-b/state", b"forged")

    assert bridge.got() == []


def test_it_stops_a_device_reading_another_devices_topics(clients):
    bridge, spy = clients("bridge"), clients("dev-a")
    for topic in ("fleet/dev-b/desired", "fleet/dev-b/chunks/data", "fleet/+/desired", "fleet/#", "#"):
        spy.subscribe(topic)

    bridge.publish("fleet/dev-b/desired", b"secret model")
    bridge.publish("fleet/dev-b/chunks/data", b"secret bytes")

    assert spy.got() == []


def test_it_refuses_anonymous_and_unknown_clients(clients):
    assert not clients().accepted
    assert not clients("dev-unknown", "whatever").accepted
    assert not clients("dev-a", "wrong-password").accepted
    assert clients("dev-a").accepted


def test_it_disconnects_a_decommissioned_device_at_once(broker, clients):
    _, dynsec = broker
    device = clients("dev-gone")
    assert device.accepted

    dynsec.remove_device("dev-gone")

    deadline = time.monotonic() + 5
    while device.paho.is_connected() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not device.paho.is_connected()
    assert not clients("dev-gone").accepted


def test_it_refuses_a_disabled_device(broker, clients):
    _, dynsec = broker
    dynsec.disable_device("dev-off")

    assert not clients("dev-off").accepted


def test_it_says_what_the_broker_refused(broker):
    _, dynsec = broker

    with pytest.raises(DynSecError, match="createClient"):
        dynsec.add_device("dev-a", "again")


def test_it_narrows_a_widened_device_role_back_to_its_own_topics_when_it_sets_a_password(broker, clients):
    _, dynsec = broker
    dynsec.add_device("dev-widened", "first")
    role = device_role("dev-widened")
    dynsec.execute("addRoleACL", rolename=role, acltype="publishClientSend", topic="fleet/dev-b/hello", allow=True)
    dynsec.execute("removeRoleACL", rolename=role, acltype="publishClientSend", topic="fleet/dev-widened/heartbeat")

    dynsec.set_device_password("dev-widened", "dev-widened-secret")

    bridge, device = clients("bridge"), clients("dev-widened")
    bridge.subscribe("fleet/+/hello")
    bridge.subscribe("fleet/+/heartbeat")
    device.publish("fleet/dev-b/hello", b"forged")
    device.publish("fleet/dev-widened/heartbeat", b"mine")
    assert bridge.got() == [("fleet/dev-widened/heartbeat", b"mine")]
    acls = dynsec.execute("getRole", rolename=role)["data"]["role"]["acls"]
    assert sorted((a["acltype"], a["topic"]) for a in acls) == sorted(
        (a["acltype"], a["topic"]) for a in device_acls("dev-widened")
    )
