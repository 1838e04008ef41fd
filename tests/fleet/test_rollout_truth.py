"""The rollout API tells the truth: final verdicts, honest counts, filters, holds with deadlines, clear refusals."""

from __future__ import annotations

import time
from datetime import timedelta

import msgspec
import pytest
from django.utils import timezone

from agent.contract import wire
from fleet.bridge.transport import Bridge
from fleet.models import AuditEvent, Deployment, Rollout
from fleet.services import assignments, reports, rollouts, telemetry
from fleet.services.desired import current_deployment
from fleet.storage import get_store
from tests.fleet.helpers import heartbeat, make_device, make_published_version, token_client
from tests.fleet.test_bridge import FakeClient, inbound

pytestmark = pytest.mark.django_db

API = "/api/v1/rollouts"


@pytest.fixture
def lab():
    """Four devices running the old version, each with an hour of healthy heartbeats at p95 10 ms."""
    old = make_published_version("embedder")
    devices = [make_device(f"dev-{i}", tags=["lab"]) for i in range(4)]
    assignments.assign_version(old, devices, actor="system")
    for device in devices:
        report_state(device, current_deployment(device), "active")
        beats = [heartbeat(device.device_id, seq=n, p95_ms=10.0) for n in range(1, 4)]
        ago = timezone.now() - timedelta(minutes=10)
        telemetry.store_heartbeats([telemetry.ReceivedHeartbeat(device.pk, b, ago) for b in beats])
    return devices


@pytest.fixture
def new_version(lab):
    return make_published_version("embedder")


def report_state(device, deployment, state, error=""):
    report = wire.StateReport(
        device_id=device.device_id,
        deployment_id=deployment.pk,
        state=state,
        sha256=deployment.artifact.sha256 if state == "active" else None,
        error=error,
        sent_at=time.time(),
    )
    return reports.record_state(device, report)


def canary_of(rollout_id):
    return Rollout.objects.get(pk=rollout_id).members.select_related("device", "deployment__artifact").get()


def beat_on(member, seq, p95_ms, count=10):
    """A heartbeat of the canary running the rollout's deployment."""
    beat = heartbeat(member.device.device_id, seq=seq, p95_ms=p95_ms)
    active = wire.ActiveModel(deployment_id=member.deployment_id, sha256=member.deployment.artifact.sha256)
    latency = msgspec.structs.replace(beat.latency, count=count)
    return msgspec.structs.replace(beat, active=active, requests=count, latency=latency)


def create(client, version, stages, **fields):
    body = {"version": version.pk, "selector": {"tags": ["lab"]}, "stages": stages, **fields}
    response = client.post(f"{API}/", body, format="json")
    assert response.status_code == 201, response.content
    return response.json()["id"]


def act(client, rollout_id, action, **body):
    return client.post(f"{API}/{rollout_id}/{action}/", body, format="json")


HEALTH_CANARY = [
    {"device_count": 1, "health_p95_ratio": "1.5", "health_min_samples": 20},
    {"percent": 100},
]


def test_it_shows_the_final_verdicts_after_a_health_rollback(operator, lab, new_version):
    client = token_client(operator)
    rollout_id = create(client, new_version, HEALTH_CANARY)
    act(client, rollout_id, "start")
    canary = canary_of(rollout_id)
    report_state(canary.device, canary.deployment, "active")
    slow = [beat_on(canary, seq, p95_ms=43.0) for seq in (10, 11, 12)]
    telemetry.store_heartbeats([telemetry.ReceivedHeartbeat(canary.device.pk, b, timezone.now()) for b in slow])

    rollouts.evaluate_rollout(rollout_id)

    detail = client.get(f"{API}/{rollout_id}/").json()
    progress = client.get(f"{API}/{rollout_id}/progress/").json()
    assert (detail["state"], progress["state"], progress["done"]) == ("rolled_back", "rolled_back", True)
    verdicts = {g["gate"]: g["verdict"] for g in progress["stages"][0]["gates"]}
    assert verdicts == {"success": "pass", "failure": "pass", "health": "fail"}
    assert verdicts == {name: g["verdict"] for name, g in detail["gates"].items()}
    assert "p95 43.00 ms vs baseline 10.00 ms" in progress["stages"][0]["gates"][2]["detail"]


def test_its_counts_follow_the_deployments_states_after_a_rollback(operator, lab, new_version):
    client = token_client(operator)
    rollout_id = create(client, new_version, [{"device_count": 1}, {"percent": 100}])
    act(client, rollout_id, "start")
    canary = canary_of(rollout_id)
    report_state(canary.device, canary.deployment, "failed", error="out of memory loading the model")

    rollouts.evaluate_rollout(rollout_id)

    rollout = client.get(f"{API}/{rollout_id}/").json()
    counts = client.get(f"{API}/{rollout_id}/progress/").json()["stages"][0]["counts"]
    assert rollout["state"] == "rolled_back"
    assert (counts["failed"], counts["rolled_back"], counts["sent_back"]) == (1, 0, 1)
    # The reason names the canary and its own error.
    assert f"{canary.device.device_id}: out of memory loading the model" in rollout["reason"]
    # And progress says which device is the canary, and what it said.
    stage = client.get(f"{API}/{rollout_id}/progress/").json()["stages"][0]
    shown = {"device": canary.device.device_id, "state": "failed", "error": "out of memory loading the model",
             "sent_back": True}  # fmt: skip
    assert stage["canary"] == stage["failing"] == [shown]


def test_it_filters_deployments_by_rollout(operator, lab, new_version):
    client = token_client(operator)
    rollout_id = create(client, new_version, [{"device_count": 1}, {"percent": 100}])
    act(client, rollout_id, "start")

    listed = client.get("/api/v1/deployments/", {"rollout": rollout_id}).json()

    assert [d["id"] for d in listed["results"]] == [canary_of(rollout_id).deployment_id]
    assert client.get("/api/v1/deployments/", {"rollout": rollout_id + 1000}).json()["count"] == 0


def test_promote_on_a_held_stage_answers_409_with_the_reason(operator, lab, new_version):
    client = token_client(operator)
    stages = [{**HEALTH_CANARY[0], "min_soak_seconds": 3600}, HEALTH_CANARY[1]]
    rollout_id = create(client, new_version, stages)
    act(client, rollout_id, "start")
    canary = canary_of(rollout_id)
    report_state(canary.device, canary.deployment, "active")

    response = act(client, rollout_id, "promote", reason="looks fine")

    assert response.status_code == 409, response.content
    assert "health gate inconclusive: 0 samples on the new version" in response.json()["detail"]
    rollout = Rollout.objects.get(pk=rollout_id)
    assert (rollout.current_stage, rollout.soak_skipped) == (0, False)
    assert not AuditEvent.objects.filter(action="rollout.promote").exists()


@pytest.mark.parametrize("action", ["hold", "notify"])
def test_an_inconclusive_hold_shows_its_deadline_and_when_it_ran_past_it(operator, lab, new_version, action):
    client = token_client(operator)
    stages = [{**HEALTH_CANARY[0], "inconclusive_timeout": 60, "inconclusive_action": action}, HEALTH_CANARY[1]]
    rollout_id = create(client, new_version, stages)
    act(client, rollout_id, "start")
    canary = canary_of(rollout_id)
    report_state(canary.device, canary.deployment, "active")
    now = timezone.now()

    rollouts.evaluate_rollout(rollout_id, now=now)
    held = client.get(f"{API}/{rollout_id}/progress/").json()["stages"][0]
    rollouts.evaluate_rollout(rollout_id, now=now + timedelta(seconds=61))
    expired = client.get(f"{API}/{rollout_id}/progress/").json()["stages"][0]

    assert held["status"] == "held"
    assert held["hold"]["expired_at"] is None
    assert "0 samples on the new version" in held["hold"]["reason"]
    assert expired["status"] == "held_past_deadline"
    assert expired["hold"]["expired_at"] is not None
    assert expired["hold"]["deadline"] == held["hold"]["deadline"]
    assert Rollout.objects.get(pk=rollout_id).state == "running"
    assert AuditEvent.objects.filter(action="rollout.hold_expired", object_id=str(rollout_id)).count() == 1


def test_an_inconclusive_hold_rolls_back_at_its_deadline_when_told_to(operator, lab, new_version):
    client = token_client(operator)
    stages = [{**HEALTH_CANARY[0], "inconclusive_timeout": 60, "inconclusive_action": "rollback"}, HEALTH_CANARY[1]]
    rollout_id = create(client, new_version, stages)
    act(client, rollout_id, "start")
    canary = canary_of(rollout_id)
    report_state(canary.device, canary.deployment, "active")
    now = timezone.now()

    rollouts.evaluate_rollout(rollout_id, now=now)
    rollouts.evaluate_rollout(rollout_id, now=now + timedelta(seconds=61))

    rollout = Rollout.objects.get(pk=rollout_id)
    assert rollout.state == "rolled_back"
    assert "held past its deadline (60 s)" in rollout.reason
    assert current_deployment(canary.device).version != new_version


def test_a_stage_error_names_its_stage(operator, lab, new_version):
    body = {"version": new_version.pk, "selector": {"tags": ["lab"]}}
    client = token_client(operator)

    bad_percent = client.post(f"{API}/", {**body, "stages": [{"device_count": 1}, {"percent": 0}]}, format="json")
    shrinking = client.post(f"{API}/", {**body, "stages": [{"percent": 50}, {"percent": 20}]}, format="json")

    assert bad_percent.status_code == 400
    assert "stage 2: percent: More than 0" in bad_percent.content.decode()
    assert shrinking.status_code == 409
    assert "stage 2's percent (20" in shrinking.json()["detail"]


def test_it_refuses_a_selector_naming_an_unknown_device(operator, lab, new_version):
    body = {"version": new_version.pk, "selector": {"devices": ["dev-1", "dev-404"]}, "stages": [{"percent": 100}]}

    response = token_client(operator).post(f"{API}/", body, format="json")

    assert response.status_code == 400
    assert "No device has the id dev-404." in response.json()["selector"]
    assert not Rollout.objects.exists()


def test_a_rollback_keeps_a_failed_deployment_failed_on_a_device_that_ran_nothing_before(operator):
    devices = [make_device(f"new-{i}", tags=["fresh"]) for i in range(2)]
    client = token_client(operator)
    version = make_published_version("embedder")
    rollout_id = create(client, version, [{"device_count": 1}, {"percent": 100}], selector={"tags": ["fresh"]})
    act(client, rollout_id, "start")
    canary = canary_of(rollout_id)
    report_state(canary.device, canary.deployment, "failed", error="out of memory loading the model")

    rollouts.evaluate_rollout(rollout_id)

    assert Rollout.objects.get(pk=rollout_id).state == "rolled_back"
    failed = Deployment.objects.get(pk=canary.deployment_id)
    assert (failed.state, failed.error) == ("failed", "out of memory loading the model")
    assert {d.device_id for d in devices} >= {canary.device.device_id}


def test_the_bridge_has_a_health_gate_judged_as_soon_as_the_heartbeats_arrive(
    operator, lab, new_version, settings, tmp_path, fake_publisher
):
    settings.ARTIFACT_ROOT = tmp_path / "artifacts"
    client = token_client(operator)
    rollout_id = create(client, new_version, HEALTH_CANARY)
    act(client, rollout_id, "start")
    canary = canary_of(rollout_id)
    report_state(canary.device, canary.deployment, "active")
    bridge = Bridge(FakeClient(), get_store(), batch_size=100)

    for seq in (10, 11, 12):
        bridge.handle(inbound(canary.device.device_id, wire.Channel.HEARTBEAT, beat_on(canary, seq, p95_ms=43.0)))
    bridge.ingest.tick()  # one flush interval; no beat task runs

    rollout = Rollout.objects.get(pk=rollout_id)
    assert rollout.state == "rolled_back"
    assert "health gate tripped in stage 1" in rollout.reason


def test_the_bridge_wakes_the_evaluator_for_a_gated_stage_at_most_once_a_second(
    operator, lab, new_version, settings, tmp_path, fake_publisher, monkeypatch
):
    settings.ARTIFACT_ROOT = tmp_path / "artifacts"
    client = token_client(operator)
    rollout_id = create(client, new_version, HEALTH_CANARY)
    act(client, rollout_id, "start")
    canary = canary_of(rollout_id)
    report_state(canary.device, canary.deployment, "active")
    queued = []
    monkeypatch.setattr("fleet.bridge.ingest.jobs.enqueue", lambda name, *args: queued.append((name, *args)))
    monkeypatch.setattr("fleet.bridge.ingest.JUDGE_EVERY_S", 0.3)
    bridge = Bridge(FakeClient(), get_store(), batch_size=100)

    for seq in range(10, 16):  # six flushes, each with a heartbeat the health gate judges
        bridge.handle(inbound(canary.device.device_id, wire.Channel.HEARTBEAT, beat_on(canary, seq, p95_ms=12.0)))
        bridge.ingest.tick()
    time.sleep(0.35)
    bridge.ingest.tick()

    assert queued == [("fleet.evaluate_rollouts_of_deployments", [canary.deployment_id])] * 2


@pytest.mark.parametrize("path", ["one", "batch"])
def test_a_download_that_reused_every_chunk_reports_real_bytes(operator, lab, new_version, path):
    device = lab[0]
    (deployment,) = assignments.assign_version(new_version, [device], actor="system").deployments
    # What an agent that held every chunk already sends: no bytes counted at all.
    report = wire.StateReport(device_id=device.device_id, deployment_id=deployment.pk, state="active",
                              sha256=deployment.artifact.sha256, sent_at=time.time())  # fmt: skip

    if path == "one":
        reports.record_state(device, report)
    else:
        reports.record_states([reports.ReceivedState(device.pk, device.device_id, report)])

    listed = token_client(operator).get("/api/v1/deployments/", {"device": device.device_id}).json()["results"][0]
    assert listed["state"] == "active"
    assert listed["bytes_done"] == listed["bytes_total"] == deployment.artifact.size > 0


def test_only_heartbeats_a_health_gate_judges_now_wake_the_evaluator(operator, lab, new_version):
    client = token_client(operator)
    gated = create(client, new_version, HEALTH_CANARY, selector={"devices": ["dev-0", "dev-1"]})
    plain = create(
        client, new_version, [{"device_count": 1}, {"percent": 100}], selector={"devices": ["dev-2", "dev-3"]}
    )
    act(client, gated, "start")
    act(client, plain, "start")
    on_gate, on_plain = canary_of(gated), canary_of(plain)
    old = Deployment.objects.filter(version__number=1).first().pk  # the lab's own, in no rollout

    judged = rollouts.health_judged_deployments({on_gate.deployment_id, on_plain.deployment_id, old, 10**9})

    # Not the canary of a rollout without a health gate, nor a deployment of no running rollout.
    assert judged == {on_gate.deployment_id}
