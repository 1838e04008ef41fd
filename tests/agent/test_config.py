from __future__ import annotations

from pathlib import Path

import pytest

from agent.__main__ import EXIT_BAD_CONFIG, main
from agent.config import ConfigError, load_config, parse_config

EXAMPLE = Path(__file__).resolve().parents[2] / "agent" / "agent.example.toml"
MINIMAL = 'device_id = "dev-1"\ndata_dir = "/tmp/edgefleet"\n'


def test_it_loads_the_documented_example() -> None:
    config = load_config(EXAMPLE)
    assert (config.device_id, config.http.port, config.transfer.window) == ("dev-1", 8471, 16)
    assert config.broker.port == 1883 and config.broker.mqtt_v5


def test_it_fills_in_defaults_around_the_required_keys() -> None:
    config = parse_config(MINIMAL)
    assert config.broker_url == "mqtt://127.0.0.1:1883"
    assert (config.heartbeat_interval, config.http.host, config.transfer.stall_timeout) == (30.0, "127.0.0.1", 10.0)


def test_it_reads_the_protocol_and_credentials_from_the_broker_url() -> None:
    config = parse_config(MINIMAL + 'broker_url = "mqtts://dev%401:s3cret@broker:8883?protocol=3.1.1"\n')
    broker = config.broker
    assert (broker.tls, broker.username, broker.password, broker.protocol) == (True, "dev@1", "s3cret", "3.1.1")


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('data_dir = "/x"\n', "missing required field `device_id`"),
        ('device_id = "no spaces"\ndata_dir = "/x"\n', "device_id: Expected `str` matching regex"),
        (MINIMAL + "[http]\nport = 70000\n", "http.port: Expected `int` <= 65535"),
        (MINIMAL + "[transfer]\nwindow = 0\n", "transfer.window: Expected `int` >= 1"),
        (MINIMAL + "heartbeat_interval = -1\n", "heartbeat_interval: Expected `float` > 0"),
        (MINIMAL + "hearbeat_interval = 5\n", "unknown field `hearbeat_interval`"),
        (MINIMAL + 'broker_url = "http://x"\n', "broker_url: broker URL 'http://x' must start with mqtt://"),
        (MINIMAL + '[tls]\ncert_file = "c.pem"\n', "tls.cert_file and tls.key_file must be given together"),
        ("device_id = \n", "not valid TOML"),
    ],
)
def test_it_names_the_key_at_fault(text: str, error: str) -> None:
    with pytest.raises(ConfigError, match="config: ") as caught:
        parse_config(text)
    assert error in str(caught.value)


def test_it_exits_2_on_a_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(MINIMAL + "[http]\nport = 'x'\n")
    assert main(["--config", str(path)]) == EXIT_BAD_CONFIG
    assert "http.port" in capsys.readouterr().err


def test_it_exits_2_on_a_missing_config(tmp_path: Path) -> None:
    assert main(["--config", str(tmp_path / "absent.toml")]) == EXIT_BAD_CONFIG


def test_it_documents_every_option_in_the_example() -> None:
    import msgspec

    from agent.config import Config

    text = EXAMPLE.read_text()

    def keys(struct: type, prefix: str = "") -> list[str]:
        found = []
        for field in msgspec.structs.fields(struct):
            kind = field.type
            if isinstance(kind, type) and issubclass(kind, msgspec.Struct):
                assert f"[{field.name}]" in text, f"[{field.name}] is not in agent.example.toml"
                found += keys(kind, f"{field.name}.")
            else:
                found.append(prefix + field.name)
        return found

    undocumented = [key for key in keys(Config) if f"\n{key.rpartition('.')[2]} = " not in text]
    assert undocumented == []


def test_it_ships_service_files_that_run_the_agent() -> None:
    import plistlib

    packaging = EXAMPLE.parents[1] / "packaging"
    unit = (packaging / "systemd" / "edgefleet-agent.service").read_text()
    assert "ExecStart=/opt/edgefleet-agent/bin/edgefleet-agent run --config /etc/edgefleet/agent.toml" in unit
    plist = plistlib.loads((packaging / "launchd" / "io.edgefleet.agent.plist").read_bytes())
    assert plist["Label"] == "io.edgefleet.agent"
    assert plist["ProgramArguments"][1:3] == ["run", "--config"]
