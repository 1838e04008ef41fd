from pathlib import Path

import pytest

from tests import support


@pytest.fixture(scope="session")
def broker_port(tmp_path_factory) -> int:
    """A Mosquitto of our own, started from docker/mosquitto/mosquitto.conf on a free port."""
    with support.broker(tmp_path_factory.mktemp("mosquitto")) as running:
        yield running.port


@pytest.fixture(scope="session")
def minilm() -> dict[str, Path]:
    return support.minilm_files()


@pytest.fixture(scope="session", autouse=True)
def fast_passwords():
    """Users' passwords hashed with MD5 in the suite's own process, as Django's testing docs advise:
    PBKDF2's million rounds took a quarter of a second a user or sign-in, a quarter of the
    plane's tests' time. Processes a test starts (the plane, a bridge, the demo) hash properly."""
    from django.test import override_settings

    with override_settings(PASSWORD_HASHERS=["django.contrib.auth.hashers.MD5PasswordHasher"]):
        yield
