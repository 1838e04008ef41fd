"""Assigning a version while retention retires it: the version row's lock decides who wins."""

import threading

import pytest
from django.db import connection, transaction

from fleet.choices import VersionStatus
from fleet.models import Deployment, ModelVersion
from fleet.services import assignments, retention
from fleet.services.assignments import DeploymentError
from fleet.services.retention import RetentionRefused
from tests.fleet.helpers import make_device, make_published_version


def in_thread_holding(work, held: threading.Event, release: threading.Event) -> threading.Thread:
    """Run ``work`` in a transaction of its own connection and keep it open until ``release``."""

    def run():
        try:
            with transaction.atomic():
                work()
                held.set()
                release.wait(30)
        finally:
            held.set()
            connection.close()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


@pytest.mark.django_db
def test_it_refuses_a_version_archived_after_the_caller_read_it(fake_publisher):
    version = make_published_version()
    device = make_device()
    retention.archive_version(ModelVersion.objects.get(pk=version.pk), actor="system")

    with pytest.raises(DeploymentError, match="is archived; only a published version goes to devices"):
        assignments.assign_version(version, [device], actor="system")  # the caller's copy still says published

    assert not Deployment.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_it_waits_for_an_archive_in_flight_and_then_refuses(fake_publisher):
    version = make_published_version()
    device = make_device()
    held, release = threading.Event(), threading.Event()
    thread = in_thread_holding(lambda: retention.archive_version(version, actor="system"), held, release)
    held.wait(30)

    # The archive holds the version's lock until it commits; the assignment waits for it.
    threading.Timer(0.5, release.set).start()
    with pytest.raises(DeploymentError, match="is archived"):
        assignments.assign_version(version, [device], actor="system")
    thread.join(30)

    assert ModelVersion.objects.get(pk=version.pk).status == VersionStatus.ARCHIVED
    assert not Deployment.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_an_archive_waits_for_an_assignment_in_flight_and_then_refuses(fake_publisher):
    version = make_published_version()
    device = make_device()
    held, release = threading.Event(), threading.Event()
    thread = in_thread_holding(lambda: assignments.assign_version(version, [device], actor="system"), held, release)
    held.wait(30)

    threading.Timer(0.5, release.set).start()
    with pytest.raises(RetentionRefused, match="open deployment"):
        retention.archive_version(version, actor="system")
    thread.join(30)

    assert ModelVersion.objects.get(pk=version.pk).status == VersionStatus.PUBLISHED
    assert Deployment.objects.get().version_id == version.pk
