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

    assert (a["username"], a["broker_url"]) == ("device:dev-a", f"mqtt://127.0.0.1:{plane}")
    assert bridge.got() == [("fleet/dev-a/hello", b"mine")]
    assert client_b.got() == [("fleet/dev-b/desired", b"for b")]
    assert client_a.got() == []


def test_it_gives_a_new_password_on_each_signed_request_and_the_old_one_stops_working(plane, opened):
    agent = enrolled("dev-c")
    first = agent.credentials().json()
    time.sleep(0.01)
    second = agent.credentials().json()

    assert first["password"] != second["password"]
    assert not Client(plane, "device:dev-c", first["password"]).accepted
    client = Client(plane, "device:dev-c", second["password"])
    opened.append(client)
    assert client.accepted


def test_it_never_lets_a_rejected_or_pending_device_connect(plane, opened):
    pending = enrolled("dev-p", accept=False)
    rejected = enrolled("dev-r", accept=False)
    enrollment.reject_device(Device.objects.get(device_id="dev-r"), actor="system")

    assert pending.credentials().status_code == 202
    assert rejected.credentials().status_code == 403
    for device_id in ("dev-p", "dev-r"):
        client = Client(plane, f"device:{device_id}", "any-guess")
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


# --- Issue #13, item 1: a device id never takes over a broker login that is not its own --------


@pytest.mark.parametrize("device_id", ["admin", "bridge", "edgefleet-plane", "Edgefleet-x", "ADMIN"])
def test_it_refuses_to_enroll_a_device_id_reserved_for_the_plane(plane, device_id):
    _, secret = enrollment.create_token(name="t", expires_in=timedelta(hours=1), actor="system", auto_approve=True)

    response = Agent(device_id).enroll(secret)

    assert response.status_code == 400
    assert "reserved" in str(response.json())
    assert not Device.objects.filter(device_id=device_id).exists()


def test_it_gives_a_device_a_login_of_its_own_even_when_its_id_names_another_client(plane, opened):
    # "plane-7" names a broker login of the plane's (say, a second bridge's) that is not reserved.
    with dynsec_session() as dynsec:
        dynsec.execute("deleteClient", username="plane-7", ignore=("Client not found",))
        dynsec.add_bridge("plane-7", "plane-7-secret")
    creds = enrolled("plane-7").credentials().json()

    device = Client(plane, creds["username"], creds["password"])
    real_plane = Client(plane, "plane-7", "plane-7-secret")
    opened += [device, real_plane]
    real_plane.subscribe("fleet/+/hello")
    device.subscribe("fleet/+/hello")
    device.publish("fleet/plane-7/hello", b"mine")

    assert creds["username"] == "device:plane-7"
    assert real_plane.accepted, "the plane's login keeps its password and its role"
    assert real_plane.got() == [("fleet/plane-7/hello", b"mine")]
    assert device.got() == [], "the device does not hear what the plane hears"


def test_it_never_touches_a_login_in_the_device_namespace_that_it_did_not_create(plane, opened):
    with dynsec_session() as dynsec:
        dynsec.execute("deleteClient", username="device:dev-planted", ignore=("Client not found",))
        dynsec.add_bridge("device:dev-planted", "planted-secret")  # someone else's client, with the bridge's role
    agent = enrolled("dev-planted")

    response = agent.credentials()

    assert response.status_code == 503
    planted = Client(plane, "device:dev-planted", "planted-secret")
    opened.append(planted)
    assert planted.accepted


# --- Issue #13, item 7: a credentials request racing a decommission leaves no login -------------


@pytest.mark.django_db(transaction=True)
def test_it_leaves_no_login_when_credentials_race_a_decommission(plane, opened, monkeypatch):
    import threading

    from fleet.mqtt import broker_admin

    agent = enrolled("dev-race")
    real_session = broker_admin.dynsec_session
    paused, go = threading.Event(), threading.Event()

    class Paused:
        """The real DynSec, held just before it sets the device's password."""

        def __init__(self, dynsec):
            self.dynsec = dynsec

        def set_device_password(self, *args):
            paused.set()
            go.wait(10)
            self.dynsec.set_device_password(*args)

        def __getattr__(self, name):
            return getattr(self.dynsec, name)

    def session(*args, **kwargs):
        from contextlib import contextmanager

        @contextmanager
        def wrapped():
            with real_session(*args, **kwargs) as dynsec:
                yield Paused(dynsec)

        return wrapped()

    monkeypatch.setattr(broker_admin, "dynsec_session", session)
    answers = {}

    def fetch():
        answers["credentials"] = agent.credentials()

    def decommission():
        answers["decommission"] = enrollment.decommission_device(Device.objects.get(device_id="dev-race"), actor="op")

    fetching = threading.Thread(target=fetch)
    fetching.start()
    assert paused.wait(10)
    deciding = threading.Thread(target=decommission)
    deciding.start()
    deciding.join(0.5)  # it waits for the credentials request, or (before the fix) finished already
    go.set()
    fetching.join(10)
    deciding.join(10)

    creds = answers["credentials"].json()
    late = Client(plane, creds["username"], creds["password"])
    opened.append(late)
    assert Device.objects.get(device_id="dev-race").enrollment == "decommissioned"
    assert not late.accepted
