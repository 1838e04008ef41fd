"""A secure broker for the benchmarks, and a simulated fleet with a broker login a device.

The plane makes a device's broker login when the device fetches its credentials
(``fleet.services.enrollment.issue_credentials``, over the broker's control topic).
Mosquitto 2.0's dynamic-security plugin rewrites its whole file, about 1.5 KB a device,
after every change, so each login costs more as the fleet grows: made that way, ten
thousand would take most of an hour on this machine (docs/benchmarks.md). A benchmark
therefore stands up most of its fleet as one that enrolled before the run:

- each device is in the plane's database as an accepted enrollment leaves it, with an
  Ed25519 key of its own and the auto-approve token it enrolled with;
- its login is in the plugin's file when the broker starts, made by the plane's own
  definition (``fleet.mqtt.dynsec.device_login``: the role, ACLs and client the control
  topic would create), its password hashed as Mosquitto hashes it;
- its agent state (``device.key``, ``broker.json``) is in the simulator's state directory
  as agent/enrollment.py keeps it, so the simulated device logs in as a restarted agent.

The broker then starts, ``prepare_broker`` (what ``manage.py setup_broker`` runs) gives
the plane its login as in production, and the rest of the fleet enrolls through the plane's API as agents do
(``bench.simulate.log_in``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from agent import enrollment as agent_enrollment
from agent.contract import wire
from bench import harness
from fleet.mqtt import dynsec
from tests.support import secure_broker_config

# What mosquitto_ctrl and the 2.0 plugin use: PBKDF2-HMAC-SHA512, a 12-byte salt, 101 rounds.
PASSWORD_ITERATIONS = 101
PLANE_LOGIN = "edgefleet-plane"
ADMIN_LOGIN = "admin"


def hashed(password: str) -> dict[str, Any]:
    """A password as the plugin's file keeps it."""
    salt = os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, PASSWORD_ITERATIONS)
    return {"password": base64.b64encode(digest).decode(), "salt": base64.b64encode(salt).decode(),
            "iterations": PASSWORD_ITERATIONS}  # fmt: skip


def plugin_entries(device_id: str, password: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The device's role and client in the plugin file's shape, from the commands the plane would send."""
    role, client = dynsec.device_login(device_id, password)
    return (
        {"rolename": role["rolename"], "acls": role["acls"]},
        {"username": client["username"], "textName": client["textname"], **hashed(client["password"]),
         "roles": client["roles"]},
    )  # fmt: skip


def write_plugin_file(path: Path, admin_password: str, logins: dict[str, str]) -> None:
    """The plugin's file as ``mosquitto_ctrl dynsec init`` makes it, with a login for each device."""
    subprocess.run(["mosquitto_ctrl", "dynsec", "init", str(path), ADMIN_LOGIN, admin_password],
                   check=True, capture_output=True)  # fmt: skip
    config = json.loads(path.read_text())
    for device_id, password in logins.items():
        role, client = plugin_entries(device_id, password)
        config["roles"].append(role)
        config["clients"].append(client)
    path.write_text(json.dumps(config))


@dataclass
class EnrolledDevice:
    """A device enrolled before the run: its key, and the broker password the plane gave it."""

    device_id: str
    key: Ed25519PrivateKey
    password: str


def new_devices(device_ids: list[str]) -> list[EnrolledDevice]:
    """A key and a broker password for each device, as the device and the plane would make them."""
    return [EnrolledDevice(d, Ed25519PrivateKey.generate(), secrets.token_urlsafe(24)) for d in device_ids]


def enroll_earlier(token: Any, devices: list[EnrolledDevice], state_dir: Path, broker_url: str) -> None:
    """Leave the devices as an accepted enrollment leaves them, and each its agent state on disk.

    The rows are what ``fleet.services.enrollment.enroll`` makes under an auto-approve token
    (accepted, with the device's public key and the token), written in bulk: through the
    service one at a time, 500 enrolled at 43 a second on this shared machine.
    """
    from fleet.choices import EnrollmentState
    from fleet.models import Device

    rows = [Device(device_id=d.device_id, name=d.device_id, public_key=agent_enrollment.public_key_text(d.key),
                   enrollment_token=token, enrollment=EnrollmentState.ACCEPTED) for d in devices]  # fmt: skip
    Device.objects.bulk_create(rows, batch_size=2000)
    for device in devices:
        write_agent_state(state_dir, device, broker_url)


def write_agent_state(state_dir: Path, device: EnrolledDevice, broker_url: str) -> None:
    """``device.key`` and ``broker.json`` in the device's data directory, as the agent writes them."""
    data = state_dir / device.device_id
    data.mkdir(parents=True, exist_ok=True)
    pem = device.key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    credentials = agent_enrollment.Credentials(username=dynsec.device_username(device.device_id),
                                               password=device.password, broker_url=broker_url)  # fmt: skip
    agent_enrollment.write_private(data / agent_enrollment.KEY_FILE, pem)
    agent_enrollment.write_private(data / agent_enrollment.CREDENTIALS_FILE, msgspec.json.encode(credentials))


@dataclass
class SecureBroker:
    """A Mosquitto of the benchmark's own from docker/mosquitto/secure.conf, and its two plane logins."""

    broker: harness.Broker
    admin_password: str
    plane_password: str

    @property
    def port(self) -> int:
        return self.broker.port

    @property
    def url(self) -> str:
        return self.broker.url

    def plane_env(self) -> dict[str, str]:
        """The plane's settings for this broker, as docker/compose.yaml sets them."""
        return {
            "MQTT_URL": f"mqtt://{PLANE_LOGIN}@127.0.0.1:{self.port}",
            "MQTT_PASSWORD": self.plane_password,
            "MQTT_DYNSEC": "true",
            "MQTT_ADMIN_URL": f"mqtt://{ADMIN_LOGIN}@127.0.0.1:{self.port}",
            "MQTT_ADMIN_PASSWORD": self.admin_password,
            "MQTT_DEVICE_URL": self.url,
            "ENROLLMENT_REQUIRED": "true",
        }


@contextmanager
def secure_broker(workdir: Path, logins: dict[str, str]) -> Iterator[SecureBroker]:
    """A secure broker whose plugin file holds ``logins`` (device id -> password) when it starts."""
    admin_password = secrets.token_urlsafe(16)
    workdir.mkdir(parents=True, exist_ok=True)
    write_plugin_file(workdir / "dynamic-security.json", admin_password, logins)
    with harness.broker(workdir, config=secure_broker_config) as broker:
        yield SecureBroker(broker, admin_password, secrets.token_urlsafe(16))


def setup_broker(broker: SecureBroker) -> None:
    """What ``manage.py setup_broker`` does at each start of the stack: default deny, the bridge's
    role and the plane's login (``prepare_broker``), here in-process with this broker's settings,
    since the command would cost another Django start (seconds on this machine)."""
    from django.test import override_settings

    from fleet.mqtt.broker_admin import prepare_broker

    env = broker.plane_env()
    plane = msgspec.structs.replace(wire.parse_broker_url(env["MQTT_URL"]), password=env["MQTT_PASSWORD"])
    with override_settings(MQTT_BROKER=plane, MQTT_DYNSEC=True, MQTT_ADMIN_URL=env["MQTT_ADMIN_URL"],
                           MQTT_ADMIN_PASSWORD=env["MQTT_ADMIN_PASSWORD"]):  # fmt: skip
        prepare_broker()
