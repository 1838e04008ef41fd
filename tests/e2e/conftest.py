import os
import sys

import pytest
from rest_framework.test import APIClient

from fleet.auth import create_api_token
from tests.e2e.helpers import Process, database_url
from tests.support import REDIS_URL, celery_on_redis


@pytest.fixture
def plane(settings, tmp_path, broker_port):
    """The plane's processes, sharing this test's database, artifact root, broker and Redis."""
    settings.ARTIFACT_ROOT = tmp_path / "artifacts"
    env = {
        **os.environ,
        "DATABASE_URL": database_url(),
        "ARTIFACT_ROOT": str(settings.ARTIFACT_ROOT),
        "MQTT_URL": f"mqtt://127.0.0.1:{broker_port}",
        "REDIS_URL": REDIS_URL,
        "BRIDGE_FLUSH_MS": "50",
    }
    with celery_on_redis():
        worker = Process("worker", [sys.executable, "-m", "celery", "-A", "controlplane", "worker",
                                    "--pool", "solo", "-l", "info"], env, tmp_path)  # fmt: skip
        try:
            yield env
        finally:
            worker.stop()


@pytest.fixture
def api(django_user_model):
    user = django_user_model.objects.create_superuser("releaser", password="x")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {create_api_token(user, reason='test')}")
    return client
