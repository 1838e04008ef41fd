"""Issue #13, item 21: the agent enrolls only over HTTPS (plain HTTP on loopback) and connects only to a
broker its own config names, over TLS, whatever the plane (or someone in its path) answers."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from agent import __main__ as cli
from agent import enrollment
from agent.config import ConfigError, parse_config
from agent.contract import wire
from agent.enrollment import Credentials, EnrollmentError

CONFIGURED = wire.parse_broker_url("mqtts://broker.fleet.example:8883")
HOSTS = {"plane.fleet.example", "broker.fleet.example"}


def config_text(tmp_path: Path, plane_url: str, extra: str = "") -> str:
    return (
        f'device_id = "d"\ndata_dir = "{tmp_path}"\nbroker_url = "mqtts://broker.fleet.example"\n'
        f'[enrollment]\nplane_url = "{plane_url}"\ntoken = "eft_x"\n{extra}'
    )


def test_it_refuses_a_config_that_enrolls_over_plain_http(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="enrollment.plane_url: plane URL 'http://plane.fleet.example' is plain http"):
        parse_config(config_text(tmp_path, "http://plane.fleet.example"))


@pytest.mark.parametrize(
    ("plane_url", "extra"),
    [
        ("https://plane.fleet.example", ""),
        ("http://127.0.0.1:8000", ""),
        ("http://localhost:8000", ""),
        ("http://[::1]:8000", ""),
        ("http://plane.lab:8000", "allow_insecure = true\n"),
    ],
    ids=["https", "loopback-v4", "localhost", "loopback-v6", "explicitly-insecure"],
)
def test_it_accepts_https_loopback_http_or_an_explicit_allowance(tmp_path: Path, plane_url: str, extra: str) -> None:
    assert parse_config(config_text(tmp_path, plane_url, extra)).enrollment.plane_url == plane_url


def test_it_sends_nothing_to_a_plane_over_plain_http(tmp_path: Path) -> None:
    sent: list[str] = []

    def post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        sent.append(url)
        return 202, {}

    with pytest.raises(EnrollmentError, match="plain http"):
        enrollment.enroll(
            plane_url="http://plane.fleet.example",
            token="eft_secret",
            device_id="d",
            name="",
            data_path=tmp_path,
            stop=threading.Event(),
            post=post,
        )
    assert sent == []  # the token never left the device


def test_it_exits_with_a_config_error_for_a_plain_http_plane(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(config_text(tmp_path / "data", "http://plane.fleet.example"))
    assert cli.main(["--config", str(path)]) == cli.EXIT_BAD_CONFIG


def test_it_connects_to_a_broker_the_plane_names_on_a_host_its_config_knows(tmp_path: Path) -> None:
    credentials = Credentials(username="d", password="pw", broker_url="mqtts://plane.fleet.example:8884")
    broker = enrollment.broker_with(CONFIGURED, credentials, allowed_hosts=HOSTS)
    assert (broker.host, broker.port, broker.tls, broker.username) == ("plane.fleet.example", 8884, True, "d")


def test_it_refuses_a_broker_on_a_host_its_config_does_not_name() -> None:
    credentials = Credentials(username="d", password="pw", broker_url="mqtts://evil.example:8883")
    with pytest.raises(EnrollmentError, match="broker host 'evil.example', which is not the plane's host"):
        enrollment.broker_with(CONFIGURED, credentials, allowed_hosts=HOSTS)


def test_it_refuses_a_broker_without_tls_unless_allowed() -> None:
    credentials = Credentials(username="d", password="pw", broker_url="mqtt://broker.fleet.example:1883")
    with pytest.raises(EnrollmentError, match="without TLS"):
        enrollment.broker_with(CONFIGURED, credentials, allowed_hosts=HOSTS)
    allowed = enrollment.broker_with(CONFIGURED, credentials, allowed_hosts=HOSTS, allow_insecure=True)
    assert (allowed.host, allowed.tls) == ("broker.fleet.example", False)


def test_it_takes_a_plain_broker_on_loopback_as_the_demo_does() -> None:
    credentials = Credentials(username="d", password="pw", broker_url="mqtt://127.0.0.1:1883")
    broker = enrollment.broker_with(CONFIGURED, credentials, allowed_hosts={"127.0.0.1"})
    assert (broker.host, broker.tls) == ("127.0.0.1", False)


def test_the_allowed_hosts_are_the_planes_the_brokers_and_those_listed(tmp_path: Path) -> None:
    config = parse_config(
        config_text(tmp_path, "https://plane.fleet.example:8443", 'broker_hosts = ["mqtt-2.fleet.example"]\n')
    )
    assert config.broker_hosts == {"plane.fleet.example", "broker.fleet.example", "mqtt-2.fleet.example"}
