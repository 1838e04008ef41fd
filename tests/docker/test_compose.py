"""The shipped compose stack is secure by default: there is no Docker engine here, so this
reads what compose would run (``docker-compose config``) and starts the broker the way its
container does, with docker/mosquitto/entrypoint.sh and secure.conf."""

import json
import os
import shutil
import subprocess

import pytest

from tests.support import REPO

COMPOSE = shutil.which("docker-compose", path=str(REPO / ".venv" / "bin")) or shutil.which("docker-compose")
pytestmark = pytest.mark.skipif(COMPOSE is None, reason="docker-compose is not installed")
PLANE_SERVICES = ("migrate", "broker-setup", "web", "bridge", "worker", "beat")


@pytest.fixture(scope="module")
def stack():
    result = subprocess.run(
        [COMPOSE, "-f", "docker/compose.yaml", "--env-file", "docker/.env.example", "config", "--format", "json"],
        cwd=REPO,
        # A clean shell, as an operator's: compose interpolates ${MQTT_URL:-…} and the like
        # from the environment, and the test run's own settings must not leak in.
        env={"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/root")},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout)


def test_it_runs_the_broker_from_secure_conf_without_anonymous_access(stack):
    mounts = {m["target"]: m["source"] for m in stack["services"]["mosquitto"]["volumes"]}
    conf = (REPO / "docker" / "mosquitto" / "secure.conf").read_text().splitlines()

    assert mounts["/mosquitto/config/mosquitto.conf"] == str(REPO / "docker" / "mosquitto" / "secure.conf")
    assert "allow_anonymous false" in conf
    assert "allow_anonymous true" not in conf
    assert any(line.startswith("plugin ") and "dynamic_security" in line for line in conf)


@pytest.mark.parametrize("service", PLANE_SERVICES)
def test_it_runs_the_plane_with_enrollment_required_and_broker_logins(stack, service):
    env = stack["services"][service]["environment"]

    assert env["ENROLLMENT_REQUIRED"] == "true"
    assert env["MQTT_DYNSEC"] == "true"
    assert env["MQTT_PASSWORD_FILE"].startswith("/run/secrets/")
    assert env["MQTT_ADMIN_PASSWORD_FILE"].startswith("/run/secrets/")
    assert ":" not in env["MQTT_URL"].split("//")[1].split("@")[0], "no password inside MQTT_URL"


def test_it_starts_the_plane_only_once_the_broker_knows_its_login(stack):
    for service in ("web", "bridge", "worker", "beat"):
        depends = stack["services"][service]["depends_on"]
        assert depends["broker-setup"]["condition"] == "service_completed_successfully"


def test_it_keeps_secrets_out_of_the_repository(stack):
    secrets = {name: spec["file"] for name, spec in stack["secrets"].items()}

    assert all(path.startswith(str(REPO / "docker" / "secrets")) for path in secrets.values())
    assert "/docker/secrets/" in (REPO / ".gitignore").read_text().splitlines()
