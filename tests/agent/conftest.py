from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.contract import wire
from agent.core import Agent
from tests.agent.fakes import FakeLink, FakePlane
from tests.agent.helpers import make_agent

SHARED_BROKER = ("127.0.0.1", 1883)


def _listening(address: tuple[str, int]) -> bool:
    try:
        socket.create_connection(address, timeout=0.5).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def broker(request: pytest.FixtureRequest) -> wire.BrokerUrl:
    """The Mosquitto on 127.0.0.1:1883 if one runs, else one of our own (tests/conftest.py's broker_port)."""
    if _listening(SHARED_BROKER):
        return wire.BrokerUrl(host=SHARED_BROKER[0], port=SHARED_BROKER[1])
    return wire.BrokerUrl(host="127.0.0.1", port=request.getfixturevalue("broker_port"))


@pytest.fixture
def link() -> FakeLink:
    return FakeLink()


@pytest.fixture
def plane(link: FakeLink) -> FakePlane:
    return FakePlane(link)


@pytest.fixture
def agent(tmp_path: Path, link: FakeLink) -> Iterator[Agent]:
    agent = make_agent(tmp_path / "data", link)
    agent.start()
    yield agent
    agent.stop()
