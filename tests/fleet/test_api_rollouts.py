"""The rollout API as a canary script uses it: create, act, poll progress. Devices report through the service."""

from __future__ import annotations

import time

import pytest

from agent.contract import wire
from fleet.choices import RolloutState
from fleet.models import AuditEvent, Deployment, Rollout
from fleet.services import assignments, reports, rollouts
from fleet.services.desired import current_deployment
from tests.fleet.helpers import make_device, make_published_version, token_client

pytestmark = pytest.mark.django_db

SOAKING = [{"device_count": 1, "min_soak_seconds": 3600}, {"percent": 100, "min_soak_seconds": 3600}]


@pytest.fixture
def version():
    return make_published_version()


@pytest.fixture
def lab():
    return [make_device(f"dev-{i}", tags=["lab"]) for i in range(4)]


def create(client, version, stages=SOAKING, **fields):
    body = {"version": version.pk, "selector": {"tags": ["lab"]}, "stages": stages, **fields}
    return client.post("/api/v1/rollouts/", body, format="json")


def act(client, rollout_id, action, **body):
    return client.post(f"/api/v1/rollouts/{rollout_id}/{action}/", body, format="json")


def activate_members(rollout_id: int, stage: int) -> None:
    """Each device of the stage reports its rollout deployment active, as its agent would."""
    for member in Rollout.objects.get(pk=rollout_id).members.filter(stage_index=stage).select_related("deployment"):
        report = wire.StateReport(
            device_id=member.device.device_id,
            deployment_id=member.deployment_id,
            state="active",
            sha256=member.deployment.artifact.sha256,
            sent_at=time.time(),
        )
        reports.record_state(member.device, report)


def test_it_creates_a_draft_that_reaches_no_device(operator, version, lab):
    response = create(token_client(operator), version)

    assert response.status_code == 201, response.content
    body = response.json()
    assert body["state"] == "draft"
    assert [s["device_count"] for s in body["stages"]] == [1, None]
    assert body["selector"] == {"tags": ["lab"], "devices": [], "hardware_class": ""}
    assert not Deployment.objects.exists()


@pytest.mark.parametrize(
    "change, complaint",
    [
        ({"stages": []}, "at least one stage"),
        ({"stages": [{"percent": 10, "device_count": 1}]}, "not both"),
        ({"stages": [{"percent": 10, "devices": 1}]}, "not both"),
        ({"stages": [{}]}, "not both"),
        ({"stages": [{"percent": 0}]}, "percent"),
        ({"stages": [{"percent": 50}, {"percent": 20}]}, "cumulative"),
        ({"selector": {}}, "Select devices"),
        ({"version": 999999}, "version"),
        ({"stages": [{"device_count": 1, "success_percent": 150}]}, "success_percent"),
    ],
)
def test_it_refuses_a_bad_rollout_with_a_clear_4xx(operator, version, change, complaint):
    body = {"version": version.pk, "selector": {"tags": ["lab"]}, "stages": SOAKING, **change}

    response = token_client(operator).post("/api/v1/rollouts/", body, format="json")

    assert 400 <= response.status_code < 500, response.content
    assert complaint.lower() in response.content.decode().lower()


def test_it_takes_devices_in_a_stage_as_the_deprecated_name_of_device_count(operator, version, lab):
    stages = [{"devices": 1, "min_soak_seconds": 3600}, {"percent": 100}]

    response = create(token_client(operator), version, stages)

    assert response.status_code == 201, response.content
    assert [s["device_count"] for s in response.json()["stages"]] == [1, None]
    assert all("devices" not in s for s in response.json()["stages"])
    assert [s.device_count for s in Rollout.objects.get().stages.all()] == [1, None]


def test_it_refuses_a_stage_giving_both_device_count_and_devices(operator, version, lab):
    response = create(token_client(operator), version, [{"device_count": 1, "devices": 2}, {"percent": 100}])

    assert response.status_code == 400, response.content
    assert response.json()["stages"]["0"]["devices"] == [
        "Give 'device_count' alone: 'devices' is its deprecated former name."
    ]
    assert not Rollout.objects.exists()


def test_the_schema_names_device_count_and_marks_devices_deprecated(client):
    schema = client.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json").json()["components"]["schemas"]

    stage = schema["RolloutStage"]["properties"]
    assert stage["device_count"]["type"] == "integer"
    assert (stage["devices"]["deprecated"], stage["devices"]["writeOnly"]) == (True, True)
    assert "former name of `device_count`" in stage["devices"]["description"]


def test_it_pauses_resumes_promotes_and_aborts_as_documented(operator, version, lab):
    client = token_client(operator)
    rollout_id = create(client, version).json()["id"]

    assert act(client, rollout_id, "start").json()["state"] == "running"
    assert Deployment.objects.count() == 1  # the canary
    activate_members(rollout_id, 0)
    rollouts.evaluate_rollout(rollout_id)
    assert Rollout.objects.get(pk=rollout_id).current_stage == 0  # soaking for an hour

    assert act(client, rollout_id, "pause", reason="lunch").json()["state"] == "paused"
    assert act(client, rollout_id, "promote").status_code == 409  # only a running rollout
    rollouts.evaluate_rollout(rollout_id)
    assert Deployment.objects.count() == 1  # paused: nothing moves

    assert act(client, rollout_id, "resume").json()["state"] == "running"
    promoted = act(client, rollout_id, "promote", reason="canary looks fine").json()
    assert (promoted["state"], promoted["current_stage"]) == ("running", 1)
    assert Deployment.objects.count() == 4

    aborted = act(client, rollout_id, "abort", reason="enough for today").json()
    assert (aborted["state"], aborted["reason"]) == ("aborted", "enough for today")
    assert act(client, rollout_id, "resume").status_code == 409
    assert Deployment.objects.count() == 4  # devices keep what they have
    actions = list(
        AuditEvent.objects.filter(object_type="rollout", object_id=str(rollout_id))
        .order_by("id")
        .values_list("action", "actor_label")
    )
    assert actions == [
        ("rollout.created", "user:olivia"),
        ("rollout.start", "user:olivia"),
        ("rollout.pause", "user:olivia"),
        ("rollout.resume", "user:olivia"),
        ("rollout.promote", "user:olivia"),
        ("rollout.stage_passed", "system"),
        ("rollout.abort", "user:olivia"),
    ]


def test_an_operator_rolls_back_an_aborted_rollout(operator, version, lab):
    client = token_client(operator)
    older = make_published_version()
    assignments.assign_version(older, lab, actor="system")
    for device in lab:
        dep = current_deployment(device)
        reports.record_state(
            device,
            wire.StateReport(
                device_id=device.device_id, deployment_id=dep.pk, state="active", sha256=dep.artifact.sha256, sent_at=1
            ),
        )
    rollout_id = create(client, version).json()["id"]
    act(client, rollout_id, "start")
    act(client, rollout_id, "abort")

    response = act(client, rollout_id, "rollback", reason="not today")

    assert response.json()["state"] == "rolled_back"
    canary = Rollout.objects.get(pk=rollout_id).members.get()
    assert canary.rollback_deployment.version == older
    assert current_deployment(canary.device).version == older


def test_it_refuses_a_conflicting_rollout_unless_told_to_supersede(operator, version, lab):
    client = token_client(operator)
    first = create(client, version).json()["id"]
    act(client, first, "start")
    second = create(client, version, selector={"devices": ["dev-2"]}).json()["id"]

    refused = act(client, second, "start")

    assert refused.status_code == 409
    assert f"dev-2 (rollout {first})" in refused.json()["detail"]
    assert Rollout.objects.get(pk=second).state == RolloutState.DRAFT
    superseding = act(client, second, "start", supersede=True)
    assert superseding.json()["state"] == "running"
    assert Rollout.objects.get(pk=first).state == RolloutState.ABORTED
    assert Rollout.objects.get(pk=first).reason == f"superseded by rollout {second}"


def test_the_progress_shows_each_stage_and_its_gates(operator, version, lab):
    client = token_client(operator)
    rollout_id = create(client, version).json()["id"]
    act(client, rollout_id, "start")
    activate_members(rollout_id, 0)

    progress = client.get(f"/api/v1/rollouts/{rollout_id}/progress/").json()

    assert (progress["state"], progress["done"], progress["fleet"]) == ("running", False, 4)
    canary, rest = progress["stages"]
    assert (canary["status"], canary["planned"], rest["status"], rest["planned"]) == ("running", 1, "pending", 3)
    assert canary["counts"]["active"] == canary["counts"]["targeted"] == 1
    gates = {g["gate"]: g for g in canary["gates"]}
    assert gates["success"]["verdict"] == "pass"
    assert (gates["success"]["value"], gates["success"]["threshold"]) == (100.0, 100.0)
    assert gates["failure"]["verdict"] == "pass"
    assert canary["soak_remaining_s"] > 3500
    assert rest["gates"] == []


def test_it_caps_assignments_per_minute(operator, version, lab):
    client = token_client(operator)
    rollout_id = create(client, version, stages=[{"percent": 100}], max_per_minute=3).json()["id"]

    act(client, rollout_id, "start")

    assert Deployment.objects.count() == 3
    rollouts.evaluate_rollout(rollout_id)
    assert Deployment.objects.count() == 3


def test_only_releasers_may_act(viewer, outsider, version, lab):
    rollout = rollouts.create_rollout(version, stages=[{"device_count": 1}], tags=["lab"], actor="system")

    assert token_client(viewer).get(f"/api/v1/rollouts/{rollout.pk}/progress/").status_code == 200
    assert act(token_client(viewer), rollout.pk, "start").status_code == 403
    assert token_client(outsider).get("/api/v1/rollouts/").status_code == 403
    assert create(token_client(viewer), version).status_code == 403
    assert Rollout.objects.get(pk=rollout.pk).state == RolloutState.DRAFT


def test_it_lists_rollouts_in_a_fixed_number_of_queries(operator, version, lab, django_assert_num_queries):
    for _ in range(3):
        rollouts.create_rollout(version, stages=SOAKING_ROWS, tags=["lab"], actor="system")
    client = token_client(operator)

    # Token, user and group permissions; count, page, stages.
    with django_assert_num_queries(6):
        response = client.get("/api/v1/rollouts/")

    assert response.json()["count"] == 3


SOAKING_ROWS = [{"device_count": 1}, {"percent": 100}]
