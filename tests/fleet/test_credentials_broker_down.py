"""A device asking for its credentials while the plane cannot administer the broker gets a clear 503."""

import time
from datetime import timedelta

import pytest

from fleet.services import enrollment
from tests.fleet.helpers import make_member, token_client
from tests.fleet.test_enrollment import Agent
from tests.support import DYNSEC_PLUGIN, free_port, secure_mosquitto

pytestmark = [
    pytest.mark.skipif(not DYNSEC_PLUGIN.exists(), reason=f"{DYNSEC_PLUGIN} is not installed"),
    pytest.mark.django_db,
]


@pytest.fixture(scope="module")
def broker_port(tmp_path_factory):
    with secure_mosquitto(tmp_path_factory.mktemp("creds-broker"), admin_password="admin-secret") as port:
        yield port


def test_it_answers_503_saying_what_to_do_when_the_broker_refuses_the_admin_login(settings, broker_port):
    settings.MQTT_DYNSEC = True
    settings.MQTT_ADMIN_URL = f"mqtt://admin@127.0.0.1:{broker_port}"
    settings.MQTT_ADMIN_PASSWORD = "not-the-admin-password"
    _, secret = enrollment.create_token(name="t", expires_in=timedelta(hours=1), actor="system")
    agent = Agent("dev-creds")
    agent.enroll(secret)
    token_client(make_member("op", "operator")).post("/api/v1/devices/dev-creds/accept/")

    started = time.monotonic()
    response = agent.credentials()

    assert response.status_code == 503
    assert "broker" in response.json()["detail"] and "try again" in response.json()["detail"]
    assert "not-the-admin-password" not in response.content.decode()
    assert int(response["Retry-After"]) > 0
    assert time.monotonic() - started < 15


def test_it_answers_503_when_the_broker_cannot_be_reached_at_all(settings):
    settings.MQTT_DYNSEC = True
    settings.MQTT_ADMIN_URL = f"mqtt://admin@127.0.0.1:{free_port()}"  # nothing listens there
    settings.MQTT_ADMIN_PASSWORD = "admin-secret"
    _, secret = enrollment.create_token(name="t", expires_in=timedelta(hours=1), actor="system")
    agent = Agent("dev-down")
    agent.enroll(secret)
    token_client(make_member("op", "operator")).post("/api/v1/devices/dev-down/accept/")

    response = agent.credentials()

    assert response.status_code == 503
    assert "try again" in response.json()["detail"]
