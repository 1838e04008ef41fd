"""The CLI against a live plane: pytest-django's live_server, the tests' Mosquitto, simulated devices."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from click.testing import CliRunner
from edgefleet_client.cli import cli

from tests.fleet import helpers

# The plane's own fixtures: the bridge on the test's broker, eager Celery, per-test artifacts and signing key.
from tests.fleet.conftest import (  # noqa: F401
    artifact_root,
    eager_celery,
    fake_publisher,
    fresh_login_failures,
    plane,
    signing_key,
)


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    def json(self):
        return json.loads(self.stdout)


@pytest.fixture
def config_home(tmp_path, monkeypatch):
    """No test reads the machine's own profiles or environment."""
    home = tmp_path / "config"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home))
    for name in ("EDGEFLEET_URL", "EDGEFLEET_TOKEN", "EDGEFLEET_PROFILE", "EDGEFLEET_CONFIG", "EDGEFLEET_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    return home


@pytest.fixture
def run(config_home) -> Callable[..., Result]:
    """``run("models", "list", url=..., token=...)``: the CLI in this process, as a user would call it."""

    def invoke(*args: str, url: str | None = None, token: str | None = None, input: str | None = None) -> Result:
        options = [*(["--url", url] if url else []), *(["--token", token] if token else [])]
        result = CliRunner().invoke(cli, [*options, *args], input=input, catch_exceptions=False)
        return Result(result.exit_code, result.stdout, result.stderr)

    return invoke


@pytest.fixture
def release_token(transactional_db) -> str:
    """An API token of a release manager: registry writes and every rollout action."""
    return helpers.api_token(helpers.make_release_manager())


@pytest.fixture
def plane_url(live_server) -> str:
    return live_server.url
