"""Reconciliation repairs what lost messages left behind (issue #13, items 12 and 15)."""

from datetime import UTC, datetime, timedelta

import pytest
from django.utils import timezone

from agent.contract import wire
from fleet.choices import DeploymentState
from fleet.models import AuditEvent, Deployment, Device
from fleet.services import assignments, telemetry
from fleet.services.reconcile import reconcile_deployments
from tests.fleet.helpers import heartbeat, make_device, make_published_version

pytestmark = pytest.mark.django_db

LATER = timedelta(minutes=5)


def beat_running(device, deployment, *, at, seq=1):
    """A heartbeat stored at ``at`` saying the device runs ``deployment`` (None: nothing)."""
    message = heartbeat(device.device_id, seq=seq)
    if deployment is not None:
        message.active = wire.ActiveModel(deployment_id=deployment.pk, sha256=deployment.artifact.sha256)
    telemetry.store_heartbeats([telemetry.ReceivedHeartbeat(device.pk, message, at)])


def assign(version, device, **kwargs):
    return assignments.assign_version(version, [device], actor="system").deployments[0]


def desired_topics(fake_publisher):
    return [topic for topic, _, _ in fake_publisher.messages]


def test_it_activates_a_deployment_whose_state_report_was_lost(django_capture_on_commit_callbacks):
    device, version = make_device(), make_published_version()
    with django_capture_on_commit_callbacks(execute=True):
        deployment = assign(version, device)
    beat_running(device, deployment, at=timezone.now())

    done = reconcile_deployments()

    deployment.refresh_from_db()
    device.refresh_from_db()
    assert done.activated == ["dev-1"]
    assert deployment.state == DeploymentState.ACTIVE
    assert device.current_version == version


def test_it_publishes_again_the_desired_state_a_device_never_got(fake_publisher, django_capture_on_commit_callbacks):
    device, version = make_device(), make_published_version()
    deployment = assign(version, device)  # its desired message is never published: no commit hook ran
    Deployment.objects.filter(pk=deployment.pk).update(created_at=timezone.now() - LATER)
    beat_running(device, None, at=timezone.now())
    fake_publisher.messages.clear()

    with django_capture_on_commit_callbacks(execute=True):
        done = reconcile_deployments()

    assert done.republished == ["dev-1"]
    assert desired_topics(fake_publisher) == ["fleet/dev-1/desired"]
    assert AuditEvent.objects.filter(action="device.desired_republished").count() == 1


def test_it_leaves_a_fresh_deployment_to_the_device(fake_publisher, django_capture_on_commit_callbacks):
    device, version = make_device(), make_published_version()
    assign(version, device)
    beat_running(device, None, at=timezone.now())
    fake_publisher.messages.clear()

    with django_capture_on_commit_callbacks(execute=True):
        done = reconcile_deployments()

    assert (done.activated, done.republished, done.drifted) == ([], [], [])
    assert fake_publisher.messages == []


def test_it_corrects_a_device_that_went_back_to_a_version_the_plane_withdrew(
    fake_publisher, django_capture_on_commit_callbacks
):
    # The plane rolled dev-1 back from v3 to v2; the device went back to v3 on its own (item 15).
    device, v2, v3 = make_device(), make_published_version(), make_published_version()
    withdrawn = assign(v3, device)
    wanted = assign(v2, device)
    Deployment.objects.filter(pk=wanted.pk).update(
        state=DeploymentState.ACTIVE, active_at=timezone.now() - LATER, created_at=timezone.now() - LATER
    )
    Device.objects.filter(pk=device.pk).update(current_version=v2)
    beat_running(device, withdrawn, at=timezone.now())
    fake_publisher.messages.clear()

    with django_capture_on_commit_callbacks(execute=True):
        done = reconcile_deployments()

    device.refresh_from_db()
    assert done.drifted == ["dev-1"]
    assert device.current_version is None, "the plane no longer shows v2 as running there"
    assert desired_topics(fake_publisher) == ["fleet/dev-1/desired"]
    assert AuditEvent.objects.filter(action="device.drift_corrected").count() == 1


def test_it_waits_for_a_heartbeat_sent_after_the_switch_before_it_calls_a_device_drifted(
    fake_publisher, django_capture_on_commit_callbacks
):
    device, v1, v2 = make_device(), make_published_version(), make_published_version()
    old = assign(v1, device)
    new = assign(v2, device)
    Deployment.objects.filter(pk=new.pk).update(state=DeploymentState.ACTIVE, active_at=timezone.now())
    beat_running(device, old, at=datetime.now(tz=UTC))  # sent just before the switch

    with django_capture_on_commit_callbacks(execute=True):
        done = reconcile_deployments()

    assert done.drifted == []
