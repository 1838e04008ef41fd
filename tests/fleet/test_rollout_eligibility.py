"""Rollouts and assignments pick only devices that may speak (issue #13, item 11)."""

import pytest

from fleet.choices import EnrollmentState, RolloutState
from fleet.models import Deployment, Device
from fleet.services import assignments, rollouts
from tests.fleet.helpers import make_device, make_published_version

pytestmark = pytest.mark.django_db


@pytest.fixture
def lab():
    devices = [make_device(f"dev-{i}", tags=["lab"]) for i in range(4)]
    Device.objects.filter(device_id="dev-2").update(enrollment=EnrollmentState.PENDING)
    Device.objects.filter(device_id="dev-3").update(enrollment=EnrollmentState.DECOMMISSIONED)
    return devices


def test_it_leaves_pending_and_decommissioned_devices_out_of_a_rollout(lab):
    version = make_published_version()
    rollout = rollouts.create_rollout(
        version, stages=[{"percent": 100, "failure_percent": 0}], tags=["lab"], actor="system"
    )

    rollouts.start_rollout(rollout, actor="system")

    rollout.refresh_from_db()
    assert rollout.state == RolloutState.RUNNING
    assert sorted(rollout.members.values_list("device__device_id", flat=True)) == ["dev-0", "dev-1"]
    assert sorted(Deployment.objects.values_list("device__device_id", flat=True)) == ["dev-0", "dev-1"]


def test_it_skips_a_device_that_may_not_speak_when_a_version_is_assigned(lab):
    version = make_published_version()

    result = assignments.assign_version(version, Device.objects.all(), actor="system")

    assert sorted(d.device.device_id for d in result.deployments) == ["dev-0", "dev-1"]
    assert result.skipped == {
        "dev-2": "dev-2 is pending, not accepted",
        "dev-3": "dev-3 is decommissioned, not accepted",
    }
