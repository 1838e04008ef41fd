"""Celery against the real Redis: an upload is hashed by a real worker, not inline."""

import hashlib
import io

import pytest
from celery.contrib.testing.worker import start_worker

from fleet.choices import ArtifactStatus
from fleet.models import Artifact
from fleet.services import registry
from tests.fleet.helpers import onnx_bytes
from tests.support import celery_on_redis, wait_until


@pytest.fixture
def redis_worker():
    with celery_on_redis() as app, start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=10):
        yield


@pytest.mark.django_db(transaction=True)
def test_it_hashes_an_upload_in_a_real_worker(settings, tmp_path, redis_worker):
    settings.ARTIFACT_ROOT = tmp_path
    settings.ARTIFACT_CHUNK_SIZE = 4096
    version = registry.create_version(registry.create_model(name="m", actor="system"), actor="system")
    data = onnx_bytes(weights=2_400)  # about 9.7 KB: three 4 KB chunks

    artifact = registry.add_artifact(version, io.BytesIO(data), filename="m.onnx", precision="fp32", actor="system")
    assert artifact.status == ArtifactStatus.PROCESSING

    ready = wait_until(
        lambda: Artifact.objects.filter(pk=artifact.pk, status=ArtifactStatus.READY).first(),
        timeout=30,
        what="the worker processing the artifact",
    )
    assert ready.sha256 == hashlib.sha256(data).hexdigest()
    assert len(ready.chunk_hashes) == 3
    assert (tmp_path / ready.storage_key).read_bytes() == data
    assert not list((tmp_path / "incoming").iterdir())


@pytest.mark.django_db
def test_it_leaves_a_processed_artifact_alone(settings, tmp_path, django_capture_on_commit_callbacks):
    settings.ARTIFACT_ROOT = tmp_path
    version = registry.create_version(registry.create_model(name="m", actor="system"), actor="system")
    with django_capture_on_commit_callbacks(execute=True):
        artifact = registry.add_artifact(version, io.BytesIO(onnx_bytes()), filename="m", precision="fp32", actor="s")

    again = registry.process_artifact(artifact.pk)

    assert again.status == ArtifactStatus.READY
    assert Artifact.objects.get(pk=artifact.pk).sha256 == hashlib.sha256(onnx_bytes()).hexdigest()
