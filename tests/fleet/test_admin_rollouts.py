"""The rollout pages of the admin: progress and gates on view, transitions for releasers only."""

import pytest
from django.contrib.admin import helpers
from django.test import Client

from fleet.choices import RolloutState
from fleet.models import Rollout
from fleet.services import rollouts
from tests.fleet.helpers import make_device, make_operator, make_published_version, make_viewer

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
