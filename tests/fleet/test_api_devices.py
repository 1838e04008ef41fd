"""Devices, their tags and heartbeats, and assigning versions to them through the API."""

from datetime import timedelta

import pytest
from django.utils import timezone

from agent.contract import wire
from fleet.choices import DeploymentState
from fleet.models import AuditEvent, Deployment
from fleet.services import assignments, reports, telemetry
from tests.fleet.helpers import (
    add_ready_artifact,
    heartbeat,
    make_device,
    make_published_version,
    make_version,
    token_client,
)


def assign(client, version, **selection):
    return client.post(f"/api/v1/versions/{version.pk}/assign/", selection, format="json")


def store_heartbeats(device, count, *, received_at=None):
    received_at = received_at or timezone.now()
    batch = [
        telemetry.ReceivedHeartbeat(device.pk, heartbeat(device.device_id, seq), received_at + timedelta(seconds=seq))
        for seq in range(1, count + 1)
    ]
    telemetry.store_heartbeats(batch)


# --- Devices -----------------------------------------------------------------------


@pytest.mark.django_db
def test_it_shows_a_device_with_its_hardware_tags_and_deployment(viewer):
    device = make_device("dev-1", tags=["lab", "floor-2"])
    version = make_published_version()
    assignments.assign_version(version, [device], actor="system")

    body = token_client(viewer).get("/api/v1/devices/dev-1/").json()

    assert (body["device_id"], body["online"], body["tags"]) == ("dev-1", True, ["floor-2", "lab"])
    assert body["hardware"]["hardware_class"] == "linux-x86_64"
    assert body["hardware"]["providers"] == ["CPUExecutionProvider"]
    assert body["last_seen"]
    assert body["current_version"] is None
    assert body["current_deployment"]["state"] == "pending"
    assert body["current_deployment"]["version"] == "embedder:1"


@pytest.mark.django_db
def test_it_shows_the_version_a_device_runs(viewer):
    device = make_device("dev-1")
    version = make_published_version()
    deployment = assignments.assign_version(version, [device], actor="system").deployments[0]
    report = wire.StateReport(
        device_id="dev-1", deployment_id=deployment.pk, state="active", sha256=deployment.artifact.sha256, sent_at=1
    )
    reports.record_state(device, report)

    body = token_client(viewer).get("/api/v1/devices/dev-1/").json()

    assert body["current_version"]["label"] == "embedder:1"
    assert body["current_deployment"]["state"] == "active"


@pytest.mark.django_db
def test_it_finds_a_device_whose_id_has_dots(viewer):
    make_device("edge.box-1.lab")

    assert token_client(viewer).get("/api/v1/devices/edge.box-1.lab/").status_code == 200


@pytest.mark.django_db
def test_it_filters_devices(viewer):
    make_device("x86", tags=["lab"])
    make_device("pi", arch="aarch64", tags=["field"])
    mac = make_device("mac", arch="arm64", os="darwin")
    mac.online = False
    mac.save()
    version = make_published_version()
    runner = make_device("runner")
    runner.current_version = version
    runner.save()
    client = token_client(viewer)

    def ids(query):
        return [d["device_id"] for d in client.get(f"/api/v1/devices/?{query}").json()["results"]]

    assert ids("tag=lab") == ["x86"]
    assert ids("hardware_class=linux-aarch64") == ["pi"]
    assert ids("arch=arm64") == ["mac"]
    assert ids("online=false") == ["mac"]
    assert ids(f"current_version={version.pk}") == ["runner"]
    assert ids("model=embedder") == ["runner"]


@pytest.mark.django_db
def test_it_sets_a_devices_tags_and_audits_it(operator):
    make_device("dev-1", tags=["old"])

    response = token_client(operator).put("/api/v1/devices/dev-1/tags/", {"tags": ["lab", "b", "lab"]}, format="json")

    assert response.status_code == 200
    assert response.json()["tags"] == ["b", "lab"]
    event = AuditEvent.objects.filter(action="device.tags_set").latest("id")
    assert (event.actor, event.before, event.after) == (operator, {"tags": ["old"]}, {"tags": ["b", "lab"]})


@pytest.mark.django_db
def test_it_refuses_a_tag_that_is_not_a_slug(operator):
    make_device("dev-1")

    response = token_client(operator).put("/api/v1/devices/dev-1/tags/", {"tags": ["Lab Room"]}, format="json")

    assert response.status_code == 400
    assert "tags" in response.json()


@pytest.mark.django_db
def test_it_clears_a_devices_tags(operator):
    make_device("dev-1", tags=["lab"])

    response = token_client(operator).put("/api/v1/devices/dev-1/tags/", {"tags": []}, format="json")

    assert response.json()["tags"] == []


@pytest.mark.django_db
def test_it_lists_a_devices_latest_heartbeats_newest_first(viewer):
    device = make_device("dev-1")
    store_heartbeats(device, 5)
    store_heartbeats(make_device("dev-2"), 2)

    body = token_client(viewer).get("/api/v1/devices/dev-1/heartbeats/?limit=3").json()

    assert [b["seq"] for b in body] == [5, 4, 3]
    assert {b["device"] for b in body} == {"dev-1"}
    assert body[0]["p95_ms"] == 12.0


@pytest.mark.django_db
def test_it_filters_heartbeats_by_device_and_time(viewer):
    device = make_device("dev-1")
    start = timezone.now()
    store_heartbeats(device, 3, received_at=start)
    store_heartbeats(make_device("dev-2"), 1, received_at=start)
    since = (start + timedelta(seconds=2)).isoformat()

    response = token_client(viewer).get("/api/v1/heartbeats/", {"device": "dev-1", "since": since})

    assert [b["seq"] for b in response.json()["results"]] == [3, 2]


# --- Assigning ---------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_it_assigns_a_version_and_publishes_the_desired_state(operator, fake_publisher):
    make_device("dev-1")
    make_device("dev-2")
    version = make_published_version()
    artifact = version.artifacts.get()
    fake_publisher.messages.clear()  # what the devices' hellos brought

    response = assign(token_client(operator), version, devices=["dev-1"], reason="canary")

    assert response.status_code == 201
    body = response.json()
    assert body["skipped"] == {}
    [deployment] = body["deployments"]
    assert (deployment["device"], deployment["state"], deployment["artifact_sha256"]) == (
        "dev-1",
        "pending",
        artifact.sha256,
    )
    assert deployment["version"]["label"] == "embedder:1"
    assert deployment["created_by"] == "olivia"
    [(topic, payload, retain)] = fake_publisher.messages
    assert (topic, retain) == ("fleet/dev-1/desired", True)
    desired = wire.decode(wire.Channel.DESIRED, payload)
    assert (desired.deployment_id, desired.model, desired.version) == (deployment["id"], "embedder", "1")
    assert desired.files[0].sha256 == artifact.sha256
    assert desired.files[0].chunks == artifact.chunk_hashes
    event = AuditEvent.objects.get(action="deployment.assigned")
    assert (event.actor, event.reason, event.source_address) == (operator, "canary", "127.0.0.1")


@pytest.mark.django_db(transaction=True)
def test_it_assigns_to_the_union_of_devices_and_tags(operator, fake_publisher):
    make_device("dev-1", tags=["lab"])
    make_device("dev-2", tags=["lab", "field"])
    make_device("dev-3", tags=["field"])
    make_device("dev-4")
    version = make_published_version()
    fake_publisher.messages.clear()

    response = assign(token_client(operator), version, devices=["dev-4", "dev-1"], tags=["lab"])

    assert response.status_code == 201
    assert sorted(d["device"] for d in response.json()["deployments"]) == ["dev-1", "dev-2", "dev-4"]
    assert sorted(topic for topic, _, _ in fake_publisher.messages) == [
        "fleet/dev-1/desired",
        "fleet/dev-2/desired",
        "fleet/dev-4/desired",
    ]


@pytest.mark.django_db
def test_it_supersedes_the_open_deployment_of_a_reassigned_device(operator):
    device = make_device("dev-1")
    first = make_published_version()
    second = make_published_version()
    client = token_client(operator)
    old = assign(client, first, devices=["dev-1"]).json()["deployments"][0]

    new = assign(client, second, devices=["dev-1"]).json()["deployments"][0]

    assert Deployment.objects.get(pk=old["id"]).state == DeploymentState.SUPERSEDED
    device_body = client.get("/api/v1/devices/dev-1/").json()
    assert device_body["current_deployment"]["id"] == new["id"]
    assert device.deployments.count() == 2


@pytest.mark.django_db
def test_it_refuses_an_assignment_that_matches_no_device(operator):
    make_device("dev-1")
    version = make_published_version()

    response = assign(token_client(operator), version, devices=["ghost", "phantom"], tags=["nowhere"])

    assert response.status_code == 400
    message = response.json()["devices"][0]
    assert "ghost, phantom" in message
    assert "nowhere" in message
    assert not Deployment.objects.exists()


@pytest.mark.django_db
def test_it_refuses_an_assignment_that_names_nothing(operator):
    version = make_published_version()

    response = assign(token_client(operator), version)

    assert response.status_code == 400


@pytest.mark.django_db
def test_it_reports_unknown_ids_as_skipped_when_others_match(operator):
    make_device("dev-1")
    version = make_published_version()

    response = assign(token_client(operator), version, devices=["dev-1", "ghost"])

    assert response.status_code == 201
    assert [d["device"] for d in response.json()["deployments"]] == ["dev-1"]
    assert response.json()["skipped"] == {"ghost": "no device has this id"}


@pytest.mark.django_db
def test_it_skips_a_device_with_no_artifact_for_its_hardware(operator):
    make_device("pi", arch="aarch64")
    make_device("x86")
    version = make_version()
    add_ready_artifact(version, hardware_class="linux-x86_64")
    client = token_client(operator)
    client.post(f"/api/v1/versions/{version.pk}/publish/")

    response = assign(client, version, devices=["pi", "x86"])

    assert [d["device"] for d in response.json()["deployments"]] == ["x86"]
    assert "no ready model artifact for hardware class linux-aarch64" in response.json()["skipped"]["pi"]


@pytest.mark.django_db
def test_it_refuses_to_assign_a_draft(operator):
    make_device("dev-1")
    version = make_version()
    add_ready_artifact(version)

    response = assign(token_client(operator), version, devices=["dev-1"])

    assert response.status_code == 409
    assert "is a draft" in response.json()["detail"]


@pytest.mark.django_db
def test_it_filters_deployments(viewer):
    make_device("dev-1")
    make_device("dev-2")
    first = make_published_version()
    second = make_published_version()
    assignments.assign_version(first, [make_device("dev-1")], actor="system")
    assignments.assign_version(second, [make_device("dev-1"), make_device("dev-2")], actor="system")
    client = token_client(viewer)

    def count(query):
        return client.get(f"/api/v1/deployments/?{query}").json()["count"]

    assert count("device=dev-1") == 2
    assert count("device=dev-1&state=pending") == 1
    assert count("state=superseded") == 1
    assert count(f"version={second.pk}") == 2
