"""The operator console: pages read in a fixed number of queries, and buttons that call services."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from agent.contract import wire
from fleet.choices import RolloutState
from fleet.models import Rollout
from fleet.services import assignments, reports, rollouts, telemetry
from fleet.services.desired import current_deployment
from tests.fleet.helpers import heartbeat, make_device, make_published_version

pytestmark = pytest.mark.django_db


def signed_in(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def report(device, deployment, state, error=""):
    sha = deployment.artifact.sha256 if state == "active" else None
    message = wire.StateReport(device_id=device.device_id, deployment_id=deployment.pk, state=state, sha256=sha,
                               error=error, sent_at=time.time())  # fmt: skip
    return reports.record_state(device, message)


def build_fleet(n: int) -> tuple[list, Rollout]:
    """``n`` lab devices on v1 with heartbeats, and a running rollout of v2 whose canary failed once."""
    v1 = make_published_version("minilm")
    lab = [make_device(f"lab-{i:03}", tags=["lab"]) for i in range(n)]
    assignments.assign_version(v1, lab, actor="system")
    ago = timezone.now() - timedelta(minutes=5)
    for device in lab:
        report(device, current_deployment(device), "active")
        telemetry.store_heartbeats([telemetry.ReceivedHeartbeat(device.pk, heartbeat(device.device_id), ago)])
    v2 = make_published_version("minilm")
    stages = [{"device_count": 1, "min_soak_seconds": 3600, "health_p95_ratio": "1.5", "health_min_samples": 5},
              {"percent": 100}]  # fmt: skip
    rollout = rollouts.create_rollout(v2, stages=stages, tags=["lab"], actor="system", name="minilm v2")
    rollouts.start_rollout(rollout, actor="system")
    return lab, Rollout.objects.get(pk=rollout.pk)


def test_a_signed_out_visitor_is_sent_to_sign_in_and_an_outsider_refused(outsider):
    assert Client().get("/").status_code == 302
    assert "/admin/login/" in Client().get("/")["Location"]
    assert signed_in(outsider).get("/").status_code == 403


def test_the_overview_shows_classes_versions_rollouts_and_failures(operator):
    lab, rollout = build_fleet(3)
    canary = rollout.members.select_related("device", "deployment__artifact").get()
    report(canary.device, canary.deployment, "failed", error="self-test failed: output is NaN")
    rollouts.evaluate_rollout(rollout.pk)

    page = signed_in(operator).get("/").content.decode()

    assert "Devices by hardware class" in page
    assert "3 heartbeats in the last minute" not in page  # stored five minutes ago
    assert "minilm:1" in page and "3 devices" in page
    assert "self-test failed: output is NaN" in page  # the failing device's own error
    assert "failure gate tripped in stage 1" in page  # the rollback and its reason
    assert "Aliass" not in page


def test_the_rollout_page_shows_a_failing_device_with_its_own_error(operator):
    lab, rollout = build_fleet(3)
    canary = rollout.members.select_related("device", "deployment__artifact").get()
    report(canary.device, canary.deployment, "failed", error="self-test failed: output is NaN")
    rollouts.evaluate_rollout(rollout.pk)

    page = signed_in(operator).get(f"/rollouts/{rollout.pk}/").content.decode()

    assert 'class="failing"' in page
    assert f"{canary.device.device_id}: self-test failed: output is NaN" in page  # in the reason
    assert "Never started." in page
    assert "</button>" not in page  # a rolled-back rollout has no action left


def test_the_rollout_page_names_the_canary_its_gates_and_the_actions(operator):
    lab, rollout = build_fleet(3)
    canary = rollout.members.select_related("device").get()

    page = signed_in(operator).get(f"/rollouts/{rollout.pk}/").content.decode()

    assert canary.device.device_id in page
    assert 'class="canary"' in page
    assert "0 samples on the new version, 5 on the baseline; need 5" not in page  # baseline beats are 10 samples
    assert "samples on the new version" in page
    for action in ("Pause", "Promote", "Abort", "Rollback"):
        assert f">{action}</button>" in page
    assert "End the current stage&#x27;s soak now" in page
    assert "Resume</button>" not in page  # only what the state allows


def test_an_operator_pauses_from_the_rollout_page_through_the_service(operator):
    lab, rollout = build_fleet(2)

    response = signed_in(operator).post(f"/rollouts/{rollout.pk}/pause/", {"reason": "lunch"}, follow=True)

    assert Rollout.objects.get(pk=rollout.pk).state == RolloutState.PAUSED
    assert "rollout" in response.content.decode() and "is now paused" in response.content.decode()
    assert rollout.pk and Rollout.objects.get(pk=rollout.pk).state == "paused"


def test_a_refused_action_says_why(operator):
    lab, rollout = build_fleet(2)

    response = signed_in(operator).post(f"/rollouts/{rollout.pk}/resume/", follow=True)

    assert "Resume refused: Rollout" in response.content.decode()


def test_a_viewer_sees_no_buttons_and_cannot_act(viewer):
    lab, rollout = build_fleet(2)
    client = signed_in(viewer)

    assert "</button>" not in client.get(f"/rollouts/{rollout.pk}/").content.decode()
    assert client.post(f"/rollouts/{rollout.pk}/abort/").status_code == 403
    assert Rollout.objects.get(pk=rollout.pk).state == RolloutState.RUNNING


def test_the_device_page_speaks_in_human_units(operator):
    lab, rollout = build_fleet(1)

    page = signed_in(operator).get(f"/devices/{lab[0].device_id}/").content.decode()

    assert "50.0 MiB" in page  # the agent's RSS, not 52428800
    assert "52428800" not in page
    assert "8.0 GiB" in page
    assert "4 CPUs" in page
    assert "10 requests, 0 errors" in page


# Session, user and the permission checks (4), then each page's own reads: a fixed set of
# aggregates and bounded lists (pinned here so that an N+1 shows up as a changed number). A rollout
# page reads two sums more for each started stage with a health gate: per stage, never per device.
PAGE_QUERIES = {"/": 4 + 8, "/rollouts/{rollout}/": 4 + 7, "/devices/lab-000/": 4 + 3}


@pytest.mark.parametrize("path", list(PAGE_QUERIES))
def test_a_page_makes_a_fixed_number_of_queries_whatever_the_fleet(operator, path):
    client = signed_in(operator)
    counts = []
    lab, _ = build_fleet(2)
    for n in (2, 12):
        for i in range(len(lab), n):
            lab.append(make_device(f"lab-{i:03}", tags=["lab"]))
        rollout = everyone_with_half_failing(lab)
        with CaptureQueriesContext(connection) as queries:
            assert client.get(path.format(rollout=rollout.pk)).status_code == 200
        counts.append(len(queries))
    assert counts == [PAGE_QUERIES[path]] * 2


def everyone_with_half_failing(lab) -> Rollout:
    """A new rollout to every device of the lab; every other device fails with its own error."""
    Rollout.objects.filter(state__in=["running", "paused"]).update(state="aborted")
    version = make_published_version("minilm")
    stages = [{"percent": 100, "failure_percent": 100, "min_soak_seconds": 3600}]
    rollout = rollouts.create_rollout(version, stages=stages, tags=["lab"], actor="system")
    rollouts.start_rollout(rollout, actor="system")
    for member in rollout.members.select_related("device", "deployment__artifact")[::2]:
        report(member.device, member.deployment, "failed", error=f"{member.device.device_id} ran out of memory")
    return rollout


def test_the_admin_says_aliases_and_shows_bytes_in_human_units(django_user_model):
    lab, rollout = build_fleet(1)
    client = signed_in(django_user_model.objects.create_superuser("root", password="a-long-admin-password"))

    index = client.get("/admin/").content.decode()
    device = client.get(f"/admin/fleet/device/{lab[0].pk}/change/").content.decode()

    assert "Aliases" in index and "Aliass" not in index
    assert "8.0 GiB" in device and str(8 << 30) not in device
    assert "50.0 MiB" in device and str(50 << 20) not in device
    version = client.get(f"/admin/fleet/modelversion/{rollout.version_id}/change/").content.decode()
    artifact = rollout.version.artifacts.get()
    assert f"{artifact.sha256[:12]}…" in version and f">{artifact.sha256}<" not in version
    assert "View site" in index  # to "/", the console


@pytest.mark.parametrize(
    "path",
    [
        "/static/fleet/console.js",
        "/static/admin/css/base.css",
        "/static/drf_spectacular_sidecar/swagger-ui-dist/swagger-ui-bundle.js",
    ],
)
def test_the_plane_serves_its_static_files_itself_with_debug_off(settings, path):
    settings.DEBUG = False  # as in compose and make cluster: gunicorn, no web server in front

    response = Client().get(path)

    assert response.status_code == 200
    assert b"".join(response.streaming_content)


def test_the_api_docs_load_swagger_ui_from_the_plane_not_a_cdn(operator):
    page = signed_in(operator).get("/api/docs/").content.decode()

    assert "/static/drf_spectacular_sidecar/swagger-ui-dist/swagger-ui-bundle.js" in page
    assert "cdn" not in page.lower()


def test_the_device_page_charts_time_to_first_token_and_decode_rate_of_a_generative_model(operator):
    device = make_device("chat-1")
    beat = heartbeat("chat-1")
    beat.generation = wire.GenerationStats(
        requests=4, tokens=256, ttft_p50_ms=61.0, ttft_p95_ms=88.5, decode_tps_p50=63.2
    )
    telemetry.store_heartbeats([telemetry.ReceivedHeartbeat(device.pk, beat, timezone.now())])

    page = signed_in(operator).get("/devices/chat-1/").content.decode()

    assert "Generation: time to first token and decode rate" in page
    assert "88.5" in page and "63.2" in page


def test_the_device_page_of_an_embedder_shows_no_generation_chart(operator):
    lab, _ = build_fleet(1)

    page = signed_in(operator).get(f"/devices/{lab[0].device_id}/").content.decode()

    assert "time to first token" not in page
