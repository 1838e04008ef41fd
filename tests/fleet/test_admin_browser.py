"""The admin as an operator uses it: a real browser (Debian's Chromium) against a live server."""

import os
import shutil
from decimal import Decimal

import pytest

from fleet.choices import DeploymentState, RolloutState
from fleet.models import Deployment, Rollout
from tests.fleet.helpers import make_device, make_published_version

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Chromium is not installed: `apt-get install chromium`"),
]


@pytest.fixture
def page(monkeypatch, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    # Playwright's sync API runs an event loop in this thread; the test's own ORM calls are still synchronous.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
        )
        page = browser.new_page()
        page.set_default_timeout(15_000)
        yield page
        browser.close()


def log_in(page, live_server, django_user_model):
    django_user_model.objects.create_superuser("olivia", password="a-long-operator-password")
    page.goto(f"{live_server.url}/admin/")
    page.fill("#id_username", "olivia")
    page.fill("#id_password", "a-long-operator-password")
    page.click("input[type=submit]")
    page.wait_for_selector("text=Edgefleet control plane")


def test_it_assigns_a_version_to_devices_from_the_device_list(page, live_server, django_user_model, fake_publisher,
                                                               tmp_path):  # fmt: skip
    make_device("lab-1")
    make_device("lab-2")
    version = make_published_version("minilm-embedder")
    log_in(page, live_server, django_user_model)

    page.get_by_role("link", name="Devices", exact=True).first.click()
    page.get_by_role("row", name="lab-1").get_by_role("checkbox").check()
    page.select_option("select[name=action]", "assign_version")
    page.click("button[name=index]")
    page.wait_for_selector("text=Assign a published version")
    page.select_option("select[name=version]", str(version.pk))
    page.fill("input[name=reason]", "canary from the browser")
    page.click("input[value=Assign]")

    page.wait_for_selector("text=Assigned minilm-embedder:1 to 1 device;")
    page.screenshot(path=str(tmp_path / "assigned.png"), full_page=True)
    deployment = Deployment.objects.get()
    assert deployment.device.device_id == "lab-1"
    assert deployment.state == DeploymentState.PENDING
    assert [topic for topic, _, _ in fake_publisher.messages][-1] == "fleet/lab-1/desired"


def test_it_shows_a_device_with_its_deployments_and_heartbeats(page, live_server, django_user_model, fake_publisher,
                                                               tmp_path):  # fmt: skip
    make_device("lab-1")
    log_in(page, live_server, django_user_model)

    page.goto(f"{live_server.url}/admin/fleet/device/")
    page.click("text=lab-1")

    page.wait_for_selector("text=Recent deployments")
    page.screenshot(path=str(tmp_path / "device.png"), full_page=True)
    assert "Linux x86_64" in page.inner_text("body")
    assert "LAST HEARTBEATS" in page.inner_text("body").upper()


def test_it_creates_and_starts_a_rollout_from_the_add_page(page, live_server, django_user_model, fake_publisher,
                                                           tmp_path):  # fmt: skip
    for i in range(4):
        make_device(f"lab-{i}", tags=["lab"])
    version = make_published_version("minilm-embedder")
    log_in(page, live_server, django_user_model)

    page.goto(f"{live_server.url}/admin/fleet/rollout/")
    page.get_by_role("link", name="Add rollout").click()
    page.wait_for_selector("text=Stages and gates")
    page.fill("input[name=name]", "lab canary")
    page.select_option("select[name=version]", str(version.pk))
    page.fill("input[name=tags]", "lab")
    page.fill("input[name=stages-0-health_p95_ratio]", "1.2")
    page.fill("input[name=reason]", "release from the browser")
    page.click("input[value='Create rollout']")

    page.wait_for_selector("text=Created and started lab canary.")
    page.screenshot(path=str(tmp_path / "rollout.png"), full_page=True)
    rollout = Rollout.objects.get()
    assert rollout.state == RolloutState.RUNNING
    assert [(s.percent, s.health_p95_ratio) for s in rollout.stages.all()] == [
        (Decimal(5), Decimal("1.2")),
        (Decimal(25), None),
        (Decimal(100), None),
    ]
    assert "canary (running)" in page.inner_text("body")
