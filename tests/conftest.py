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
