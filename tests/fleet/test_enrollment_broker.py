"""Enrollment against a real Mosquitto with the dynamic-security plugin.

An accepted device fetches a broker login and is confined to its own topics; a rejected
device never has one; decommissioning removes the login and the broker drops the device.
Denials are checked by what is delivered (see test_broker_confinement).
"""

import time
from datetime import timedelta

import pytest

from fleet.models import Device
from fleet.mqtt.broker_admin import dynsec_session
from fleet.services import enrollment
from tests.fleet.helpers import make_member, token_client
from tests.fleet.test_broker_confinement import Client
from tests.fleet.test_enrollment import Agent
from tests.support import DYNSEC_PLUGIN, secure_mosquitto, wait_until

pytestmark = [
    pytest.mark.skipif(not DYNSEC_PLUGIN.exists(), reason=f"{DYNSEC_PLUGIN} is not installed"),
    pytest.mark.django_db,
]


@pytest.fixture(scope="module")
def broker_port(tmp_path_factory):
    with secure_mosquitto(tmp_path_factory.mktemp("enroll-broker"), admin_password="admin-secret") as port:
        yield port


@pytest.fixture
def plane(settings, broker_port):
    settings.MQTT_DYNSEC = True
    settings.MQTT_ADMIN_URL = f"mqtt://admin@127.0.0.1:{broker_port}"
    settings.MQTT_ADMIN_PASSWORD = "admin-secret"
    settings.MQTT_DEVICE_URL = f"mqtt://127.0.0.1:{broker_port}"
    settings.ENROLLMENT_REQUIRED = True
    with dynsec_session() as dynsec:
        dynsec.ensure_roles()
        dynsec.execute("deleteClient", username="bridge", ignore=("Client not found",))
        dynsec.add_bridge("bridge", "bridge-secret")
    return broker_port


@pytest.fixture
def opened():
    clients = []
    yield clients
    for client in clients:
        client.close()


def enrolled(device_id, *, accept=True):
    _, secret = enrollment.create_token(name=device_id, expires_in=timedelta(hours=1), actor="system")
    agent = Agent(device_id)
    agent.enroll(secret)
    if accept:
        token_client(make_member(f"op-{device_id}", "operator")).post(f"/api/v1/devices/{device_id}/accept/")
    return agent


def test_it_gives_an_accepted_device_a_login_confined_to_its_own_topics(plane, opened):
    a = enrolled("dev-a").credentials().json()
    b = enrolled("dev-b").credentials().json()

    client_a = Client(plane, a["username"], a["password"])
    client_b = Client(plane, b["username"], b["password"])
    bridge = Client(plane, "bridge", "bridge-secret")
    opened += [client_a, client_b, bridge]
    bridge.subscribe("fleet/+/hello")
    client_b.subscribe("fleet/dev-b/desired")
    client_a.subscribe("fleet/dev-b/desired")
    client_a.publish("fleet/dev-b/hello", b"spoof")
    client_a.publish("fleet/dev-a/hello", b"mine")
    bridge.publish("fleet/dev-b/desired", b"for b")

    assert (a["username"], a["broker_url"]) == ("dev-a", f"mqtt://127.0.0.1:{plane}")
    assert bridge.got() == [("fleet/dev-a/hello", b"mine")]
    assert client_b.got() == [("fleet/dev-b/desired", b"for b")]
    assert client_a.got() == []


def test_it_gives_a_new_password_on_each_signed_request_and_the_old_one_stops_working(plane, opened):
    agent = enrolled("dev-c")
    first = agent.credentials().json()
    time.sleep(0.01)
    second = agent.credentials().json()

    assert first["password"] != second["password"]
    assert not Client(plane, "dev-c", first["password"]).accepted
    client = Client(plane, "dev-c", second["password"])
    opened.append(client)
    assert client.accepted


def test_it_never_lets_a_rejected_or_pending_device_connect(plane, opened):
    pending = enrolled("dev-p", accept=False)
    rejected = enrolled("dev-r", accept=False)
    enrollment.reject_device(Device.objects.get(device_id="dev-r"), actor="system")

    assert pending.credentials().status_code == 202
    assert rejected.credentials().status_code == 403
    for device_id in ("dev-p", "dev-r"):
        client = Client(plane, device_id, "any-guess")
        opened.append(client)
        assert not client.accepted


def test_it_disconnects_a_decommissioned_device_at_once(plane, opened):
    creds = enrolled("dev-d").credentials().json()
    client = Client(plane, creds["username"], creds["password"])
    opened.append(client)
    disconnected = []
    client.paho.on_disconnect = lambda *args: disconnected.append(args)
    client.paho.reconnect_delay_set(60, 60)
    assert client.accepted

    response = token_client(make_member("olivia", "operator")).post("/api/v1/devices/dev-d/decommission/")

    assert response.status_code == 200
    wait_until(lambda: disconnected, timeout=5, what="the broker to drop the decommissioned device")
    again = Client(plane, creds["username"], creds["password"])
    opened.append(again)
    assert not again.accepted
    assert not Device.objects.get(device_id="dev-d").online
