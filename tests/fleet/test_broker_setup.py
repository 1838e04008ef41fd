"""The compose stack's broker start-up, for real: docker/mosquitto/entrypoint.sh creates the
dynamic-security file with the admin login and starts Mosquitto from secure.conf; then
``manage.py setup_broker`` gives the plane its own login with the bridge's role."""

import os
import subprocess

import pytest
from django.core.management import CommandError, call_command

from agent.contract.wire import parse_broker_url
from fleet.mqtt.broker_admin import dynsec_session
from tests.fleet.test_broker_confinement import Client
from tests.support import DYNSEC_PLUGIN, REPO, free_port, secure_broker_config, wait_for_port

pytestmark = pytest.mark.skipif(not DYNSEC_PLUGIN.exists(), reason=f"{DYNSEC_PLUGIN} is not installed")


@pytest.fixture(scope="module")
def shipped_broker(tmp_path_factory):
    """A broker started as its container starts it; yields its port."""
    tmp = tmp_path_factory.mktemp("compose-broker")
    (tmp / "admin_password").write_text("admin-from-a-secret\n")
    port = free_port()
    (tmp / "mosquitto.conf").write_text(secure_broker_config(port, tmp))
    env = {
        **os.environ,
        "DYNSEC_FILE": str(tmp / "dynamic-security.json"),
        "MQTT_ADMIN_PASSWORD_FILE": str(tmp / "admin_password"),
    }
    with (tmp / "mosquitto.log").open("ab") as log:
        proc = subprocess.Popen(
            [
                "sh",
                str(REPO / "docker" / "mosquitto" / "entrypoint.sh"),
                "mosquitto",
                "-c",
                str(tmp / "mosquitto.conf"),
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_port(port)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def plane_settings(settings, shipped_broker):
    settings.MQTT_DYNSEC = True
    settings.MQTT_ADMIN_URL = f"mqtt://admin@127.0.0.1:{shipped_broker}"
    settings.MQTT_ADMIN_PASSWORD = "admin-from-a-secret"
    settings.MQTT_BROKER = plane_login(shipped_broker, "plane-secret")
    return settings


def plane_login(port, password):
    return parse_broker_url(f"mqtt://edgefleet-plane:{password}@127.0.0.1:{port}")


@pytest.fixture
def opened():
    clients = []
    yield clients
    for client in clients:
        client.close()


def test_it_refuses_anonymous_clients_on_the_shipped_broker(shipped_broker, opened):
    anonymous = Client(shipped_broker)
    opened.append(anonymous)

    assert not anonymous.accepted


def test_it_gives_the_plane_a_login_that_hears_devices_and_nothing_more(plane_settings, shipped_broker, opened):
    call_command("setup_broker", "--wait", "5")
    call_command("setup_broker", "--wait", "5")  # every start of the stack runs it again

    with dynsec_session() as dynsec:
        dynsec.execute("deleteClient", username="device:dev-a", ignore=("Client not found",))
        dynsec.add_device("dev-a", "dev-a-secret")
    plane = Client(shipped_broker, "edgefleet-plane", "plane-secret")
    device = Client(shipped_broker, "device:dev-a", "dev-a-secret")
    opened += [plane, device]
    plane.subscribe("$share/edgefleet-plane/fleet/+/heartbeat")
    plane.subscribe("$CONTROL/dynamic-security/v1/response")  # the admin's channel, not the plane's
    plane.publish("$CONTROL/dynamic-security/v1", b'{"commands": [{"command": "listClients"}]}')
    device.publish("fleet/dev-a/heartbeat", b"beat")

    assert plane.accepted
    assert plane.got() == [("fleet/dev-a/heartbeat", b"beat")]


def test_it_sets_the_plane_password_again_at_every_start(plane_settings, shipped_broker, opened):
    call_command("setup_broker", "--wait", "5")
    plane_settings.MQTT_BROKER = plane_login(shipped_broker, "rotated")
    call_command("setup_broker", "--wait", "5")

    old, new = (
        Client(shipped_broker, "edgefleet-plane", "plane-secret"),
        Client(shipped_broker, "edgefleet-plane", "rotated"),
    )
    opened += [old, new]

    assert not old.accepted
    assert new.accepted


def test_it_refuses_to_run_without_a_plane_password(plane_settings):
    plane_settings.MQTT_BROKER = parse_broker_url("mqtt://edgefleet-plane@127.0.0.1:1")

    with pytest.raises(CommandError, match="MQTT_PASSWORD"):
        call_command("setup_broker", "--wait", "0")
