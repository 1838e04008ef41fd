"""Processing an upload twice at once, and after its worker died: against the real PostgreSQL."""

import hashlib
import io
import threading
import time
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from fleet.choices import ArtifactStatus
from fleet.models import Artifact, AuditEvent, ModelVersion
from fleet.services import registry
from fleet.storage import get_store
from tests.fleet.helpers import make_version, onnx_bytes


def processing_artifact(data: bytes, version: ModelVersion | None = None) -> Artifact:
    """An upload as add_artifact leaves it, its task not run yet (as a worker finds it)."""
    incoming = get_store().save_incoming(io.BytesIO(data), max_bytes=len(data))
    return Artifact.objects.create(
        version=version or make_version(),
        filename="model.onnx",
        precision="fp32",
        size=incoming.size,
        sha256=incoming.sha256,
        storage_key=incoming.key,
    )


def audits(artifact: Artifact, action: str) -> int:
    return AuditEvent.objects.filter(action=action, object_id=str(artifact.pk)).count()


@pytest.fixture
def slow_check(monkeypatch):
    """onnxruntime's check as it is, a moment slower, so that two runs overlap; counts its calls."""
    calls = []
    real = registry.inspect_onnx

    def inspect(path, **kwargs):
        calls.append(path)
        time.sleep(0.4)
        return real(path, **kwargs)

    monkeypatch.setattr(registry, "inspect_onnx", inspect)
    return calls


def run_twice_at_once(artifact_id: int) -> list:
    """Two workers given the same artifact, the second 0.2 s after the first (a redelivered task)."""
    results: list = []

    def worker(delay: float) -> None:
        time.sleep(delay)
        try:
            results.append(registry.process_artifact(artifact_id).status)
        except Exception as exc:  # the test shows what a worker would have raised
            results.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=worker, args=(delay,)) for delay in (0.0, 0.2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return results


@pytest.mark.django_db(transaction=True)
def test_it_makes_an_artifact_ready_once_when_two_workers_process_it_at_once(slow_check, artifact_root):
    data = onnx_bytes()
    artifact = processing_artifact(data)

    results = run_twice_at_once(artifact.pk)

    done = Artifact.objects.get(pk=artifact.pk)
    assert done.status == ArtifactStatus.READY, done.error
    assert sorted(map(str, results)) == ["processing", "ready"]  # the second found it claimed
    assert len(slow_check) == 1
    assert (audits(done, "artifact.ready"), audits(done, "artifact.failed")) == (1, 0)
    assert (artifact_root / done.storage_key).read_bytes() == data
    assert done.sha256 == hashlib.sha256(data).hexdigest()


@pytest.mark.django_db(transaction=True)
def test_it_lets_the_first_run_to_finish_decide_when_a_lease_ran_out(slow_check, settings, artifact_root):
    """The first worker outlived its lease: both check the file, the second finds it moved and changes nothing."""
    settings.ARTIFACT_PROCESSING_LEASE = 0
    artifact = processing_artifact(onnx_bytes())

    results = run_twice_at_once(artifact.pk)

    done = Artifact.objects.get(pk=artifact.pk)
    assert done.status == ArtifactStatus.READY, done.error
    assert results == ["ready", "ready"]
    assert len(slow_check) == 2
    assert (audits(done, "artifact.ready"), audits(done, "artifact.failed")) == (1, 0)
    assert (artifact_root / done.storage_key).is_file()


@pytest.mark.django_db
def test_it_leaves_an_artifact_another_worker_holds(settings):
    artifact = processing_artifact(onnx_bytes())
    Artifact.objects.filter(pk=artifact.pk).update(lease_expires_at=timezone.now() + timedelta(minutes=5))

    assert registry.process_artifact(artifact.pk).status == ArtifactStatus.PROCESSING
    assert registry.retry_stale_artifacts() == []
    assert audits(artifact, "artifact.ready") == 0


@pytest.mark.django_db
def test_it_checks_again_an_artifact_whose_worker_died(django_capture_on_commit_callbacks):
    artifact = processing_artifact(onnx_bytes())
    # A worker claimed it and died: its lease ran out a second ago.
    Artifact.objects.filter(pk=artifact.pk).update(lease_expires_at=timezone.now() - timedelta(seconds=1))

    with django_capture_on_commit_callbacks(execute=True):
        assert registry.retry_stale_artifacts() == [artifact.pk]

    assert Artifact.objects.get(pk=artifact.pk).status == ArtifactStatus.READY
    assert audits(artifact, "artifact.ready") == 1


@pytest.mark.django_db
def test_it_checks_an_artifact_whose_task_was_lost(settings, django_capture_on_commit_callbacks):
    old = processing_artifact(onnx_bytes("old"))
    new = processing_artifact(onnx_bytes("new"), old.version)  # its task may still be in the queue
    Artifact.objects.filter(pk=old.pk).update(created_at=timezone.now() - timedelta(hours=1))

    with django_capture_on_commit_callbacks(execute=True):
        assert registry.retry_stale_artifacts() == [old.pk]

    assert Artifact.objects.get(pk=old.pk).status == ArtifactStatus.READY
    assert Artifact.objects.get(pk=new.pk).status == ArtifactStatus.PROCESSING
