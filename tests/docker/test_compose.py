"""The shipped compose stack is secure by default: there is no Docker engine here, so this
reads what compose would run (``docker-compose config``) and starts the broker the way its
container does, with docker/mosquitto/entrypoint.sh and secure.conf."""

import json
import os
import re
import shutil
import subprocess

import pytest
import yaml

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
    assert env["DEBUG"] == "false"
    assert env["SECRET_KEY_FILE"] == "/run/secrets/secret_key"
    assert ":" not in env["MQTT_URL"].split("//")[1].split("@")[0], "no password inside MQTT_URL"


# Which secrets each service uses, and so is given; no other.
SECRETS_USED = {
    "mosquitto": {"mqtt_admin_password"},
    "broker-setup": {"secret_key", "mqtt_plane_password", "mqtt_admin_password"},
    "migrate": {"secret_key"},
    "web": {"secret_key", "mqtt_admin_password", "signing_key", "metrics_token"},
    "bridge": {"secret_key", "mqtt_plane_password"},
    "worker": {"secret_key", "mqtt_plane_password", "signing_key"},
    "beat": {"secret_key"},
    "postgres": set(),
    "redis": set(),
    "prometheus": {"metrics_token"},
    "grafana": {"grafana_admin_password"},
}
# Who may read each mounted secret: the plane's user alone, but for the metrics token, which web
# checks and Prometheus (the image's "nobody", in the plane's group) sends, and Grafana's own
# password, read by the Grafana image's user.
READERS = {
    "metrics_token": {("10001", "10001", "0440"), ("65534", "10001", "0440")},
    "grafana_admin_password": {("472", "472", "0400")},
}
PLANE_USER_ALONE = {("10001", "10001", "0400")}


@pytest.mark.parametrize("service", sorted(SECRETS_USED))
def test_it_gives_each_service_only_the_secrets_it_uses_readable_by_their_readers_alone(stack, service):
    mounted = stack["services"][service].get("secrets", [])

    assert {m["source"] for m in mounted} == SECRETS_USED[service]
    for m in mounted:
        assert (m.get("uid"), m.get("gid"), m.get("mode")) in READERS.get(m["source"], PLANE_USER_ALONE)


def test_it_lets_prometheus_read_the_metrics_token_through_the_plane_group_only(stack):
    prometheus = stack["services"]["prometheus"]

    assert prometheus["group_add"] == ["10001"]
    assert "user" not in prometheus, "the image's own unprivileged user"
    assert {p["host_ip"] for s in ("prometheus", "grafana") for p in stack["services"][s]["ports"]} == {"127.0.0.1"}


@pytest.mark.parametrize("service", PLANE_SERVICES)
def test_it_points_a_plane_service_only_at_secret_files_it_has(stack, service):
    spec = stack["services"][service]
    files = {value for name, value in spec["environment"].items() if name.endswith("_FILE")}

    assert files == {f"/run/secrets/{m['source']}" for m in spec["secrets"]}


def test_it_lists_every_setting_in_env_example_and_sets_no_secret_file_for_every_service():
    source = (REPO / "controlplane" / "settings.py").read_text()
    read = set(re.findall(r'env_\w+\("([A-Z0-9_]+)"', source))
    secrets = set(re.findall(r'env_secret\("([A-Z0-9_]+)"', source))
    example = (REPO / "docker" / ".env.example").read_text().splitlines()
    listed = {line.lstrip("#").split("=")[0] for line in example if re.match(r"#?[A-Z0-9_]+=", line)}
    # Copied to docker/.env, it goes to every plane service (env_file): a secret's file there
    # would point services that do not mount it at a missing file.
    active = {line.split("=")[0] for line in example if re.match(r"[A-Z0-9_]+=", line)}

    assert {name for name in read if name not in listed and f"{name}_FILE" not in listed} == set()
    assert {f"{name}_FILE" for name in secrets} & active == set()


def test_it_provisions_grafana_with_the_stacks_prometheus_and_the_shipped_dashboard(stack):
    provisioning = REPO / "docker" / "grafana" / "provisioning"
    grafana = stack["services"]["grafana"]
    mounts = {m["target"]: m["source"] for m in grafana["volumes"]}
    source = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    provider = yaml.safe_load((provisioning / "dashboards" / "edgefleet.yml").read_text())["providers"][0]

    assert mounts["/etc/grafana/provisioning"] == str(provisioning)
    assert mounts[f"{provider['options']['path']}/edgefleet.json"] == str(
        REPO / "docker" / "grafana" / "edgefleet.json"
    )
    assert source["url"] == "http://prometheus:9090" and "9090" in {
        str(p["target"]) for p in stack["services"]["prometheus"]["ports"]
    }
