"""The operator's canary story in a real browser (Debian's Chromium): create, watch, see the canary fail and roll back.

With CONSOLE_SCREENSHOTS=docs/console the screenshots docs/console.md shows are written there.
"""

from __future__ import annotations

import os
import shutil
from datetime import timedelta
from pathlib import Path

import msgspec
import pytest
from django.utils import timezone

from agent.contract import wire
from fleet import tasks
from fleet.models import Rollout, RolloutStage
from fleet.services import assignments, telemetry
from fleet.services.desired import current_deployment
from tests.fleet.helpers import heartbeat, make_device, make_published_version
from tests.fleet.test_rollout_truth import report_state

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Chromium is not installed: `apt-get install chromium`"),
]


@pytest.fixture
def shots(tmp_path) -> Path:
    return Path(os.environ.get("CONSOLE_SCREENSHOTS") or tmp_path)


@pytest.fixture
def page(monkeypatch):
    sync_api = pytest.importorskip("playwright.sync_api")
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
        )
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.set_default_timeout(20_000)
        yield page
        browser.close()


def beat(device, seq: int, p95_ms: float, at, deployment=None):
    """A heartbeat of 40 inference calls; on ``deployment`` when given."""
    message = heartbeat(device.device_id, seq=seq, p95_ms=p95_ms)
    latency = msgspec.structs.replace(message.latency, count=40, p50_ms=p95_ms * 0.6, p99_ms=p95_ms * 1.2)
    message = msgspec.structs.replace(message, requests=40, latency=latency)
    if deployment is not None:
        active = wire.ActiveModel(deployment_id=deployment.pk, sha256=deployment.artifact.sha256)
        message = msgspec.structs.replace(message, active=active)
    return telemetry.ReceivedHeartbeat(device.pk, message, at)


@pytest.fixture
def lab():
    """Eight devices on minilm-embedder:1 with half an hour of heartbeats at a p95 near 15.7 ms."""
    v1 = make_published_version("minilm-embedder")
    devices = [make_device(f"pi-{i:02}", tags=["lab"]) for i in range(1, 9)]
    assignments.assign_version(v1, devices, actor="system")
    now = timezone.now()
    for device in devices:
        report_state(device, current_deployment(device), "active")
        beats = [beat(device, n, 15.0 + (n % 3) * 0.5, now - timedelta(minutes=40 - n)) for n in range(1, 30)]
        telemetry.store_heartbeats(beats)
    make_published_version("minilm-embedder")
    return devices


def sign_in(page, live_server, django_user_model):
    django_user_model.objects.create_superuser("olivia", password="a-long-operator-password")
    page.goto(f"{live_server.url}/")  # the console sends a signed-out visitor to sign in
    page.fill("#id_username", "olivia")
    page.fill("#id_password", "a-long-operator-password")
    page.click("input[type=submit]")
    page.wait_for_selector("h1:has-text('Fleet overview')")


def create_rollout(page, live_server):
    page.goto(f"{live_server.url}/admin/fleet/rollout/add/")
    page.fill("input[name=name]", "minilm v2 canary")
    page.select_option("select[name=version]", label="minilm-embedder:2")
    page.fill("input[name=tags]", "lab")
    page.fill("input[name=stages-0-percent]", "")
    page.fill("input[name=stages-0-device_count]", "1")
    page.fill("input[name=stages-0-health_p95_ratio]", "1.5")
    page.fill("input[name=stages-0-health_min_samples]", "200")
    page.fill("input[name=reason]", "minilm v2: int8 variant for the Pi fleet")
    page.click("input[name=_save]")
    page.wait_for_selector("text=Created and started minilm v2 canary.")
    return Rollout.objects.get(name="minilm v2 canary")


def test_an_operator_watches_a_canary_fail_and_roll_back(page, live_server, django_user_model, fake_publisher,
                                                        lab, shots):  # fmt: skip
    sign_in(page, live_server, django_user_model)
    rollout = create_rollout(page, live_server)
    canary = rollout.members.select_related("device", "deployment__artifact").get()
    # Ten minutes ago, so the chart has a story to tell: the canary took the version then.
    began = timezone.now() - timedelta(minutes=10)
    rollout.members.update(assigned_at=began)
    RolloutStage.objects.filter(rollout=rollout, index=0).update(started_at=began)
    report_state(canary.device, canary.deployment, "active")
    tasks.evaluate_rollouts_of_deployments([canary.deployment_id])  # soaked, but too few samples: held

    # Watch: the overview lists the rollout with a bar per stage; its page names the canary.
    page.goto(f"{live_server.url}/")
    page.wait_for_selector("text=minilm v2 canary")
    page.screenshot(path=shots / "overview.png", full_page=True)
    page.click("a:has-text('minilm v2 canary')")
    page.wait_for_selector(f"tr.canary:has-text('{canary.device.device_id}')")
    page.wait_for_selector("[data-gate=health] .badge.inconclusive")
    held = page.inner_text("[data-stage='0'] .reason")
    assert "Held since" in held and "then hold" in held and "0 samples on the new version" in held
    page.wait_for_selector("#canary-chart canvas")
    page.screenshot(path=shots / "rollout-watching.png", full_page=True)

    # The canary reports a p95 near 43 ms, past 1.5 × its baseline: the gate is judged on arrival.
    slow = [beat(canary.device, 100 + n, 38.0 + n, began + timedelta(minutes=n + 1), canary.deployment)
            for n in range(8)]  # fmt: skip
    telemetry.store_heartbeats(slow)
    tasks.evaluate_rollouts_of_deployments([canary.deployment_id])

    # The page refreshes itself: the rollback, its reason, the canary and the chart.
    page.wait_for_selector("h1 .badge.rolled_back", timeout=15_000)
    reason = page.inner_text(".reason")
    assert "health gate tripped in canary: p95 41.50 ms vs baseline 15.5" in reason
    assert canary.device.device_id in page.inner_text("tr.canary")
    assert "sent back" in page.inner_text("tr.canary")
    assert page.locator("[data-gate=health] .badge.fail").count() == 1
    page.wait_for_selector("#canary-chart canvas")
    assert page.locator("#canary-chart .u-legend").inner_text().count("p95") == 2
    page.screenshot(path=shots / "rollout-rolled-back.png", full_page=True)

    # The device page: its latency before and after, and the deployment history.
    page.click(f"tr.canary a:has-text('{canary.device.device_id}')")
    page.wait_for_selector("h2:has-text('Latency')")
    page.wait_for_selector(".chart canvas")
    assert "minilm-embedder:2" in page.inner_text("table:has(th:has-text('Version'))")
    page.screenshot(path=shots / "device.png", full_page=True)

    # Back on the overview: the rollback and its reason among the recent ones.
    page.click("header a:has-text('Fleet overview')")
    page.wait_for_selector("section:has(h2:has-text('Recent rollbacks')) >> text=health gate tripped in canary")
    assert "No rollout is running or paused." in page.inner_text("body")
    page.screenshot(path=shots / "overview-after.png", full_page=True)
