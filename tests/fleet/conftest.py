import pytest
from django.core.cache import cache

from agent.contract import wire
from controlplane.celery import app as celery_app
from fleet.bridge.transport import Bridge
from fleet.mqtt import publisher
from fleet.mqtt.client import make_client
from fleet.storage import get_store
from tests.fleet import helpers
from tests.support import wait_until


class FakePublisher:
    """Records what the plane publishes: (topic, payload, retain)."""

    def __init__(self):
        self.messages = []

    def publish_many(self, messages, *, timeout=30.0):
        messages = list(messages)
        self.messages.extend(messages)
        return len(messages)


@pytest.fixture
def plane(settings, tmp_path, broker_port):
    """The bridge and a real publisher on the test's broker (tests marked transactional)."""
    settings.ARTIFACT_ROOT = tmp_path / "artifacts"
    broker = wire.parse_broker_url(f"mqtt://127.0.0.1:{broker_port}")
    settings.MQTT_BROKER = broker
    real = publisher.MqttPublisher(make_client("publisher", broker=broker))
    real.start()
    previous = publisher.install(real)
    bridge = Bridge(make_client("bridge", broker=broker), get_store(), flush_seconds=0.05)
    bridge.start()
    wait_until(bridge.connected.is_set, timeout=10, what="bridge connected")
    try:
        yield bridge
    finally:
        bridge.stop()
        publisher.install(previous)
        real.close()


@pytest.fixture
def fake_publisher():
    fake = FakePublisher()
    previous = publisher.install(fake)
    yield fake
    publisher.install(previous)


# --- API and admin tests ------------------------------------------------------------


@pytest.fixture(autouse=True)
def eager_celery():
    """Tasks run inline on commit even when REDIS_URL is set (as `make test` does).

    A test of the real worker opts out by setting task_always_eager=False itself (see test_tasks).
    """
    saved = celery_app.conf.task_always_eager
    celery_app.conf.task_always_eager = True
    yield
    celery_app.conf.task_always_eager = saved


@pytest.fixture(autouse=True)
def artifact_root(settings, tmp_path):
    """Each test stores artifacts under its own directory."""
    settings.ARTIFACT_ROOT = tmp_path / "artifacts"
    return settings.ARTIFACT_ROOT


@pytest.fixture(autouse=True)
def signing_key(settings):
    """The plane signs with a key of the tests' own, never one left in the var directory."""
    settings.SIGNING_KEY = helpers.SIGNING_KEY
    return helpers.SIGNING_KEY


@pytest.fixture
def operator(db):
    return helpers.make_operator()


@pytest.fixture
def viewer(db):
    return helpers.make_viewer()


@pytest.fixture
def outsider(db):
    return helpers.make_outsider()


@pytest.fixture(autouse=True)
def fresh_login_failures():
    """Failed sign-ins are counted in the local-memory cache: no test inherits another's."""
    yield
    cache.clear()
