"""The rollout pages of the admin: progress and gates on view, transitions for releasers only."""

import pytest
from django.contrib.admin import helpers
from django.test import Client

from fleet.choices import Role, RolloutState
from fleet.models import AuditEvent, Rollout
from fleet.services import rollouts
from tests.fleet.helpers import (
    make_device,
    make_member,
    make_operator,
    make_published_version,
    make_user,
    make_version,
    make_viewer,
)

pytestmark = pytest.mark.django_db


@pytest.fixture
def rollout():
    version = make_published_version()
    for i in range(3):
        make_device(f"dev-{i}", tags=["lab"])
    stages = [{"device_count": 1, "min_soak_seconds": 60}, {"percent": 100}]
    return rollouts.create_rollout(version, stages=stages, tags=["lab"], actor="system")


def signed_in(user) -> Client:
    user.is_staff = True
    user.save()
    client = Client()
    client.force_login(user)
    return client


def test_it_shows_each_stage_with_its_counts_and_gates(rollout):
    rollouts.start_rollout(rollout, actor="system")

    page = signed_in(make_operator()).get(f"/admin/fleet/rollout/{rollout.pk}/change/")

    assert page.status_code == 200
    html = page.content.decode()
    assert "success: <b>waiting</b>" in html
    assert "stage 1 (running)" in html
    assert "stage 2 (pending)" in html


def test_it_lists_rollouts(rollout):
    page = signed_in(make_viewer()).get("/admin/fleet/rollout/")

    assert page.status_code == 200
    assert "1 of 2" in page.content.decode()


def test_a_releaser_starts_a_rollout_from_the_list(rollout):
    signed_in(make_operator()).post(
        "/admin/fleet/rollout/", {"action": "start", helpers.ACTION_CHECKBOX_NAME: [rollout.pk]}
    )

    assert Rollout.objects.get(pk=rollout.pk).state == RolloutState.RUNNING


def test_a_viewer_has_no_transition_actions(rollout):
    client = signed_in(make_viewer())

    page = client.get("/admin/fleet/rollout/")
    client.post("/admin/fleet/rollout/", {"action": "start", helpers.ACTION_CHECKBOX_NAME: [rollout.pk]})

    assert 'value="start"' not in page.content.decode()
    assert Rollout.objects.get(pk=rollout.pk).state == RolloutState.DRAFT


# --- Creating a rollout from the add page ---------------------------------------------


def add_form(version, **fields) -> dict:
    """The add page as it first shows (canary 5%, 25%, everyone), with ``fields`` changed."""
    body = {
        "name": "lab canary",
        "version": version.pk,
        "tags": "lab",
        "devices": "",
        "hardware_class": "",
        "baseline": "previous_version",
        "max_per_minute": 1000,
        "start": "on",
        "reason": "release from the admin",
        "stages-TOTAL_FORMS": 3,
        "stages-INITIAL_FORMS": 3,
    }
    for i, (name, percent, soak) in enumerate([("canary", 5, 600), ("quarter", 25, 600), ("everyone", 100, 0)]):
        body |= {
            f"stages-{i}-name": name,
            f"stages-{i}-percent": percent,
            f"stages-{i}-min_soak_seconds": soak,
            f"stages-{i}-success_percent": 100,
            f"stages-{i}-failure_percent": 0,
            f"stages-{i}-failure_min_finished": 1,
            f"stages-{i}-health_error_points": 1,
            f"stages-{i}-health_min_samples": 100,
            f"stages-{i}-inconclusive_timeout": 3600,
            f"stages-{i}-inconclusive_action": "hold",
        }
    body |= fields
    return {k: v for k, v in body.items() if v is not None}


@pytest.fixture
def lab():
    return [make_device(f"lab-{i}", tags=["lab"]) for i in range(4)]


@pytest.fixture
def release_manager():
    return make_member("rita", Role.RELEASE_MANAGER)


def test_it_offers_published_versions_and_default_stages_on_the_add_page(release_manager):
    published = make_published_version()
    draft = make_version(published.model)

    page = signed_in(release_manager).get("/admin/fleet/rollout/add/")

    html = page.content.decode()
    assert page.status_code == 200
    assert f'<option value="{published.pk}">{published.label}</option>' in html
    assert f'<option value="{draft.pk}">' not in html
    assert 'name="stages-0-percent" value="5"' in html
    assert 'name="stages-2-percent" value="100"' in html


def test_a_release_manager_creates_and_starts_a_rollout(release_manager, lab, fake_publisher):
    version = make_published_version()

    answer = signed_in(release_manager).post("/admin/fleet/rollout/add/", add_form(version), follow=True)

    rollout = Rollout.objects.get()
    assert answer.redirect_chain[-1][0] == f"/admin/fleet/rollout/{rollout.pk}/change/"
    assert "Created and started lab canary." in answer.content.decode()
    assert rollout.state == RolloutState.RUNNING
    assert rollout.selector_tags == ["lab"]
    assert [(s.name, s.percent, s.min_soak_seconds) for s in rollout.stages.all()] == [
        ("canary", 5, 600),
        ("quarter", 25, 600),
        ("everyone", 100, 0),
    ]
    assert rollout.members.count() == 1  # 5% of four devices rounds up to one canary
    events = AuditEvent.objects.filter(object_type="rollout", object_id=str(rollout.pk)).order_by("id")
    assert [e.action for e in events] == ["rollout.created", "rollout.start"]
    assert {(e.actor_label, e.source_address) for e in events} == {("user:rita", "127.0.0.1")}
    assert events[1].reason == "release from the admin"


def test_it_creates_a_draft_when_start_is_left_unticked(release_manager, lab):
    version = make_published_version()

    signed_in(release_manager).post("/admin/fleet/rollout/add/", add_form(version, start=None))

    assert Rollout.objects.get().state == RolloutState.DRAFT


def test_it_refuses_a_rollout_over_devices_another_one_runs_and_keeps_no_draft(release_manager, lab, fake_publisher):
    version = make_published_version()
    running = rollouts.create_rollout(version, stages=[{"percent": 100}], tags=["lab"], actor="system")
    rollouts.start_rollout(running, actor="system")

    page = signed_in(release_manager).post("/admin/fleet/rollout/add/", add_form(version))

    assert page.status_code == 200
    assert "belong to another running or paused rollout" in page.content.decode()
    assert list(Rollout.objects.all()) == [running]


def test_it_supersedes_the_other_rollout_when_asked(release_manager, lab, fake_publisher):
    version = make_published_version()
    running = rollouts.create_rollout(version, stages=[{"percent": 100}], tags=["lab"], actor="system")
    rollouts.start_rollout(running, actor="system")

    signed_in(release_manager).post("/admin/fleet/rollout/add/", add_form(version, supersede="on"))

    assert Rollout.objects.get(pk=running.pk).state == RolloutState.ABORTED
    assert Rollout.objects.exclude(pk=running.pk).get().state == RolloutState.RUNNING


def test_it_refuses_a_version_that_is_not_published(release_manager, lab):
    draft = make_version()

    page = signed_in(release_manager).post("/admin/fleet/rollout/add/", add_form(draft))

    assert f"Version {draft.pk} is not published" in page.content.decode()
    assert not Rollout.objects.exists()


def test_it_shows_the_domain_validation_of_a_stage(release_manager, lab):
    version = make_published_version()

    page = signed_in(release_manager).post(
        "/admin/fleet/rollout/add/", add_form(version, **{"stages-1-device_count": 3}, tags="")
    )

    html = page.content.decode()
    assert "stage 2 (quarter): Give each stage a &#x27;percent&#x27; or a &#x27;device_count&#x27;, not both." in html
    assert "selector: Select devices by &#x27;tags&#x27;" in html
    assert not Rollout.objects.exists()


def test_it_refuses_stages_that_shrink(release_manager, lab):
    version = make_published_version()

    page = signed_in(release_manager).post("/admin/fleet/rollout/add/", add_form(version, **{"stages-2-percent": 10}))

    assert "Stage sizes are cumulative" in page.content.decode()
    assert not Rollout.objects.exists()


def test_it_leaves_out_blank_stage_rows(release_manager, lab, fake_publisher):
    version = make_published_version()
    blank = {"stages-1-name": "", "stages-1-percent": "", "stages-TOTAL_FORMS": 3}

    signed_in(release_manager).post("/admin/fleet/rollout/add/", add_form(version, **blank))

    assert [s.name for s in Rollout.objects.get().stages.all()] == ["canary", "everyone"]


def test_only_a_releaser_may_start_what_they_create(lab):
    version = make_published_version()
    creator = make_user("carl", ["view_rollout", "add_rollout"])
    client = signed_in(creator)

    page = client.get("/admin/fleet/rollout/add/")
    refused = client.post("/admin/fleet/rollout/add/", add_form(version))
    client.post("/admin/fleet/rollout/add/", add_form(version, start=None))

    assert 'name="start"' not in page.content.decode()
    assert "needs the release permission" in refused.content.decode()
    assert Rollout.objects.get().state == RolloutState.DRAFT


@pytest.mark.parametrize("role", [Role.VIEWER, Role.OPERATOR])
def test_other_roles_cannot_add_rollouts(role):
    client = signed_in(make_member("someone", role))

    assert client.get("/admin/fleet/rollout/add/").status_code == 403
    assert "/admin/fleet/rollout/add/" not in client.get("/admin/fleet/rollout/").content.decode()
