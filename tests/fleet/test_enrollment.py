"""Enrollment: tokens, the operator's verdict, signed credential requests, and the bridge's refusal."""

import base64
import time
from datetime import timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from django.core.management import call_command

from agent.contract import wire
from fleet.bridge.ingest import Inbound
from fleet.bridge.transport import Bridge
from fleet.choices import EnrollmentState
from fleet.models import AuditEvent, Device, EnrollmentToken, Heartbeat
from fleet.services import enrollment
from fleet.storage import get_store
from tests.fleet.helpers import make_member, token_client
from tests.fleet.test_bridge import FakeClient, heartbeat, hello

pytestmark = pytest.mark.django_db


class Agent:
    """The device side of enrollment: a key pair, and the requests it signs."""

    def __init__(self, device_id="dev-1"):
        self.device_id = device_id
        self.key = Ed25519PrivateKey.generate()
        raw = self.key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.public_key = base64.b64encode(raw).decode()

    def enroll(self, secret):
        body = {"token": secret, "device_id": self.device_id, "public_key": self.public_key}
        return token_client(None).post("/api/v1/enroll/", body, format="json")

    def signed(self, timestamp_ms=None, key=None):
        timestamp_ms = timestamp_ms or int(time.time() * 1000)
        signature = (key or self.key).sign(enrollment.signed_message(self.device_id, timestamp_ms))
        return {"timestamp_ms": timestamp_ms, "signature": base64.b64encode(signature).decode()}

    def credentials(self, **kwargs):
        url = f"/api/v1/enroll/{self.device_id}/credentials/"
        return token_client(None).post(url, self.signed(**kwargs), format="json")


@pytest.fixture
def secret():
    return enrollment.create_token(name="lab", expires_in=timedelta(hours=1), actor="system")[1]


def test_it_stores_only_a_hash_of_the_token(secret):
    token = EnrollmentToken.objects.get()

    assert secret not in (token.token_hash, token.prefix)
    assert token.token_hash == enrollment.hash_token(secret)


def test_it_lists_a_device_as_pending_until_an_operator_accepts_it(secret):
    agent = Agent()

    answer = agent.enroll(secret)
    waiting = agent.credentials()
    token_client(make_member("olivia", "operator")).post("/api/v1/devices/dev-1/accept/")
    granted = agent.credentials()

    assert (answer.status_code, answer.json()["state"]) == (202, "pending")
    assert (waiting.status_code, waiting.json()["state"]) == (202, "pending")
    assert granted.status_code == 200
    assert granted.json()["state"] == "accepted"
    assert AuditEvent.objects.filter(action="device.accepted", actor_label="user:olivia").exists()


def test_it_accepts_at_once_under_an_auto_approve_token():
    _, secret = enrollment.create_token(name="line", expires_in=timedelta(hours=1), auto_approve=True, actor="system")

    assert Agent().enroll(secret).json()["state"] == "accepted"


@pytest.mark.parametrize("what", ["unknown", "expired", "revoked"])
def test_it_refuses_a_bad_token(what, secret):
    token = EnrollmentToken.objects.get()
    if what == "expired":
        EnrollmentToken.objects.update(expires_at=token.created_at - timedelta(seconds=1))
    if what == "revoked":
        enrollment.revoke_token(token, actor="system")

    response = Agent().enroll("eft_guess" if what == "unknown" else secret)

    assert response.status_code == 400
    assert not Device.objects.exists()


def test_it_refuses_another_key_for_an_enrolled_device(secret):
    Agent("dev-1").enroll(secret)

    response = Agent("dev-1").enroll(secret)

    assert response.status_code == 400
    assert "another key" in response.json()["detail"]


def test_it_stops_enrolling_once_the_token_reached_its_limit():
    _, secret = enrollment.create_token(name="one", expires_in=timedelta(hours=1), max_devices=1, actor="system")

    assert Agent("dev-1").enroll(secret).status_code == 202
    assert Agent("dev-2").enroll(secret).status_code == 400


def test_it_refuses_credentials_without_the_devices_key(secret):
    agent = Agent()
    agent.enroll(secret)
    enrollment.accept_device(Device.objects.get(), actor="system")

    forged = agent.credentials(key=Ed25519PrivateKey.generate())

    assert forged.status_code == 403


def test_it_refuses_a_replayed_or_stale_signed_request(secret):
    agent = Agent()
    agent.enroll(secret)
    enrollment.accept_device(Device.objects.get(), actor="system")
    now_ms = int(time.time() * 1000)

    first = agent.credentials(timestamp_ms=now_ms)
    replay = agent.credentials(timestamp_ms=now_ms)
    stale = agent.credentials(timestamp_ms=now_ms - 3600_000)

    assert (first.status_code, replay.status_code, stale.status_code) == (200, 403, 400)


@pytest.mark.parametrize("verdict", ["reject", "decommission"])
def test_it_gives_no_credentials_to_a_rejected_or_decommissioned_device(verdict, secret):
    agent = Agent()
    agent.enroll(secret)

    token_client(make_member("olivia", "operator")).post(f"/api/v1/devices/dev-1/{verdict}/")

    assert agent.credentials().status_code == 403


def test_it_lets_only_an_admin_create_tokens_and_shows_the_secret_once():
    body = {"name": "shelf", "expires_in_hours": 2, "auto_approve": False}

    refused = token_client(make_member("olivia", "operator")).post("/api/v1/enrollment-tokens/", body, format="json")
    created = token_client(make_member("ada", "admin")).post("/api/v1/enrollment-tokens/", body, format="json")
    listed = token_client(make_member("victor", "viewer")).get("/api/v1/enrollment-tokens/")

    assert refused.status_code == 403
    assert created.status_code == 201
    assert created.json()["token"].startswith("eft_")
    assert "token" not in listed.json()["results"][0]
    assert Agent().enroll(created.json()["token"]).status_code == 202


def test_it_creates_a_token_from_the_command_line(capsys):
    call_command("create_enrollment_token", "shelf", "--hours", "2", "--auto-approve")

    secret = capsys.readouterr().out.strip()
    assert EnrollmentToken.objects.get().token_hash == enrollment.hash_token(secret)


class TestBridgeUnderEnrollment:
    @pytest.fixture
    def bridge(self, settings, secret):
        settings.ENROLLMENT_REQUIRED = True
        return Bridge(FakeClient(), get_store(), batch_size=100)

    def send(self, bridge, device_id, channel, message):
        bridge.handle(Inbound(wire.topic(device_id, channel), wire.encode(message), time.time()))

    def test_it_refuses_hellos_and_heartbeats_from_a_device_never_enrolled(self, bridge):
        self.send(bridge, "dev-9", wire.Channel.HELLO, hello("dev-9"))
        self.send(bridge, "dev-9", wire.Channel.HEARTBEAT, heartbeat("dev-9"))
        bridge.flush()

        assert bridge.stats.snapshot()["not_accepted"] == 2
        assert not Device.objects.exists()

    @pytest.mark.parametrize("verdict", [None, "reject", "decommission"])
    def test_it_refuses_a_pending_rejected_or_decommissioned_device(self, bridge, secret, verdict):
        Agent().enroll(secret)
        if verdict:
            getattr(enrollment, f"{verdict}_device")(Device.objects.get(), actor="system")

        self.send(bridge, "dev-1", wire.Channel.HELLO, hello("dev-1"))
        bridge.flush()

        assert bridge.stats.snapshot()["not_accepted"] == 1
        assert Device.objects.get().hardware_class == ""

    def test_it_refuses_a_device_decommissioned_while_the_bridge_runs(self, bridge, secret):
        Agent().enroll(secret)
        enrollment.accept_device(Device.objects.get(), actor="system")
        self.send(bridge, "dev-1", wire.Channel.HELLO, hello("dev-1"))
        self.send(bridge, "dev-1", wire.Channel.HEARTBEAT, heartbeat("dev-1", seq=1))
        bridge.flush()

        enrollment.decommission_device(Device.objects.get(), actor="system")
        bridge.ingest.enrollment_recheck_seconds = 0  # the cache of accepted devices is checked at once
        self.send(bridge, "dev-1", wire.Channel.HEARTBEAT, heartbeat("dev-1", seq=2))
        self.send(bridge, "dev-1", wire.Channel.PRESENCE, wire.Presence(device_id="dev-1", online=True))
        bridge.flush()

        assert bridge.stats.snapshot()["not_accepted"] == 2
        assert Heartbeat.objects.count() == 1
        assert not Device.objects.get().online

    def test_it_refuses_only_the_devices_not_accepted_in_a_flush_of_hellos(self, bridge, secret):
        Agent().enroll(secret)
        enrollment.accept_device(Device.objects.get(), actor="system")
        Agent(device_id="dev-2").enroll(secret)

        for device_id in ("dev-1", "dev-2", "dev-9"):
            self.send(bridge, device_id, wire.Channel.HELLO, hello(device_id))
        bridge.flush()

        assert bridge.stats.snapshot()["not_accepted"] == 2
        assert bridge.stats.snapshot()["hellos"] == 1
        assert list(Device.objects.filter(online=True).values_list("device_id", flat=True)) == ["dev-1"]
        assert not Device.objects.filter(device_id="dev-9").exists()

    def test_it_takes_an_accepted_device(self, bridge, secret):
        Agent().enroll(secret)
        enrollment.accept_device(Device.objects.get(), actor="system")

        self.send(bridge, "dev-1", wire.Channel.HELLO, hello("dev-1"))
        bridge.flush()

        assert bridge.stats.snapshot().get("not_accepted", 0) == 0
        assert Device.objects.get().enrollment == EnrollmentState.ACCEPTED
        assert Device.objects.get().online


class TestAdmin:
    @pytest.fixture
    def admin_client(self, client):
        from django.contrib.auth.models import User

        client.force_login(User.objects.create_superuser("root", password="correct horse battery staple"))
        return client

    def test_it_creates_a_token_and_shows_its_secret_once(self, admin_client):
        response = admin_client.post(
            "/admin/fleet/enrollmenttoken/add/",
            {"name": "shelf", "expires_in_hours": 2, "max_devices": ""},
            follow=True,
        )

        shown = [str(m) for m in response.context["messages"] if "shown this once" in str(m)]
        secret = shown[0].rsplit(" ", 1)[1]
        assert EnrollmentToken.objects.get().token_hash == enrollment.hash_token(secret)

    def test_it_accepts_devices_with_an_admin_action(self, admin_client, secret):
        Agent("dev-1").enroll(secret)

        admin_client.post(
            "/admin/fleet/device/",
            {"action": "accept", "_selected_action": [Device.objects.get().pk]},
            REMOTE_ADDR="198.51.100.9",
        )

        assert Device.objects.get().enrollment == EnrollmentState.ACCEPTED
        assert AuditEvent.objects.get(action="device.accepted").source_address == "198.51.100.9"
