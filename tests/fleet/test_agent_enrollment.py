"""The agent's side of enrollment against a live plane: real HTTP, the agent's own key pair."""

import stat
import threading
from datetime import timedelta

import pytest

from agent import enrollment as agent_enrollment
from agent.contract import wire
from fleet.models import Device
from fleet.services import enrollment

pytestmark = pytest.mark.django_db(transaction=True)


def test_it_enrolls_waits_for_acceptance_and_keeps_its_credentials(live_server, tmp_path, settings):
    settings.MQTT_DEVICE_URL = "mqtt://broker.example:1883"
    _, secret = enrollment.create_token(name="lab", expires_in=timedelta(hours=1), actor="system")
    stop = threading.Event()
    polls = []

    def post(url, body):
        status, answer = agent_enrollment.http_post(url, body)
        if url.endswith("/credentials/"):
            polls.append(status)
            if status == 202:
                enrollment.accept_device(Device.objects.get(device_id="dev-1"), actor="system")
        return status, answer

    kwargs = {"plane_url": live_server.url, "token": secret, "device_id": "dev-1", "name": "Lab box"}
    credentials = agent_enrollment.enroll(**kwargs, data_path=tmp_path, stop=stop, poll_interval=0.01, post=post)
    again = agent_enrollment.enroll(**kwargs, data_path=tmp_path, stop=stop, post=post)

    assert polls == [202, 200]
    assert credentials is not None and credentials.broker_url == "mqtt://broker.example:1883"
    assert again == credentials  # read from broker.json, no new request
    assert len(polls) == 2
    device = Device.objects.get(device_id="dev-1")
    key = agent_enrollment.load_or_create_key(tmp_path)
    assert device.public_key == agent_enrollment.public_key_text(key)
    for name in (agent_enrollment.KEY_FILE, agent_enrollment.CREDENTIALS_FILE):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    configured = wire.parse_broker_url("mqtt://127.0.0.1:1883")
    with pytest.raises(agent_enrollment.EnrollmentError, match="broker host 'broker.example'"):
        agent_enrollment.broker_with(configured, credentials, allowed_hosts={"127.0.0.1", "localhost"})
    broker = agent_enrollment.broker_with(
        configured, credentials, allowed_hosts={"broker.example"}, allow_insecure=True
    )
    assert (broker.host, broker.port) == ("broker.example", 1883)


def test_it_stops_when_the_plane_rejects_the_device(live_server, tmp_path):
    _, secret = enrollment.create_token(name="lab", expires_in=timedelta(hours=1), actor="system")

    def post(url, body):
        if url.endswith("/credentials/") and Device.objects.filter(enrollment="pending").exists():
            enrollment.reject_device(Device.objects.get(), actor="system")
        return agent_enrollment.http_post(url, body)

    with pytest.raises(agent_enrollment.EnrollmentError, match="403"):
        agent_enrollment.enroll(
            plane_url=live_server.url,
            token=secret,
            device_id="dev-1",
            name="",
            data_path=tmp_path,
            stop=threading.Event(),
            poll_interval=0.01,
            post=post,
        )


def test_it_refuses_a_bad_token(live_server, tmp_path):
    with pytest.raises(agent_enrollment.EnrollmentError, match="400"):
        agent_enrollment.enroll(
            plane_url=live_server.url,
            token="eft_guess",
            device_id="dev-1",
            name="",
            data_path=tmp_path,
            stop=threading.Event(),
        )
