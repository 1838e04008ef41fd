"""The audit trail: who, what, from where; and nobody rewrites it through the app."""

import pytest
from django.contrib.auth.models import User

from fleet.models import AuditEvent
from tests.fleet.helpers import make_device, make_version, token_client

pytestmark = pytest.mark.django_db


def test_it_records_the_source_address_of_an_api_write(operator):
    client = token_client(operator)

    client.post("/api/v1/models/", {"name": "minilm"}, REMOTE_ADDR="203.0.113.7")
    client.put("/api/v1/devices/dev-1/tags/", {"tags": ["lab"]}, format="json", REMOTE_ADDR="2001:db8::5")

    events = AuditEvent.objects.filter(actor=operator)
    assert {(e.action, e.source_address) for e in events} >= {("model.created", "203.0.113.7")}


def test_it_records_the_source_address_and_the_change_of_a_tag_edit(operator):
    make_device("dev-1")

    token_client(operator).put(
        "/api/v1/devices/dev-1/tags/", {"tags": ["lab"]}, format="json", REMOTE_ADDR="2001:db8::5"
    )

    event = AuditEvent.objects.get(action="device.tags_set", actor=operator)
    assert event.source_address == "2001:db8::5"
    assert (event.before, event.after) == ({"tags": []}, {"tags": ["lab"]})
    assert event.actor_label == "user:olivia"
    assert event.created_at is not None


def test_it_records_the_source_address_of_an_admin_write(client):
    user = User.objects.create_superuser("ada", password="correct horse battery staple")
    client.force_login(user)
    version = make_version()

    client.post(
        f"/admin/fleet/modelversion/{version.pk}/change/",
        {"notes": "reviewed", "artifacts-TOTAL_FORMS": 0, "artifacts-INITIAL_FORMS": 0},
        REMOTE_ADDR="198.51.100.4",
    )

    event = AuditEvent.objects.get(action="version.notes_changed", actor=user)
    assert event.source_address == "198.51.100.4"


def test_it_leaves_no_address_on_what_devices_and_tasks_write():
    make_device("dev-1")

    assert AuditEvent.objects.get(action="device.registered").source_address is None


@pytest.mark.parametrize("method", ["post", "put", "patch", "delete"])
def test_it_never_lets_the_api_change_the_audit_log(method):
    # A superuser holds every permission: only the read-only viewset stands in the way.
    admin = User.objects.create_superuser("ada", password="correct horse battery staple")
    make_device("dev-1")
    event = AuditEvent.objects.get()
    client = token_client(admin)

    on_list = getattr(client, method)("/api/v1/audit/", {}, format="json")
    on_event = getattr(client, method)(f"/api/v1/audit/{event.pk}/", {}, format="json")

    assert (on_list.status_code, on_event.status_code) == (405, 405)
    assert AuditEvent.objects.get().after == event.after


@pytest.mark.django_db
def test_a_creation_records_what_was_created(operator):
    client = token_client(operator)
    model = client.post("/api/v1/models/", {"name": "audited", "description": "for the log"}, format="json").json()
    response = client.post("/api/v1/versions/", {"model": model["name"], "notes": "first cut"}, format="json")
    assert response.status_code == 201, response.json()

    created = {e.action: e for e in AuditEvent.objects.filter(action__in=["model.created", "version.created"])}
    assert created["model.created"].before is None
    assert created["model.created"].after == {"name": "audited", "description": "for the log"}
    assert created["version.created"].after["notes"] == "first cut"
    assert created["version.created"].after["number"] == 1
