"""The agent's TOML config file, validated into typed structs.

Every error names the key at fault, so a device owner can fix the file without
reading code. Unknown keys are refused: a typo must not silently fall back to a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import msgspec

from agent import wire

Seconds = Annotated[float, msgspec.Meta(gt=0)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]


class ConfigError(ValueError):
    """The config file is missing, unreadable or invalid. The text names the key."""


class HttpConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Where the local inference server listens."""

    host: str = "127.0.0.1"
    port: Port = 8471


class TransferConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """How artifact chunks are pulled from the plane."""

    window: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 16
    stall_timeout: Seconds = 10.0
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=100)] = 8


class TlsConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Files for mqtts:// brokers; empty means the system's CAs and no client certificate."""

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""


class Config(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The whole agent config file."""

    device_id: wire.DeviceId
    data_dir: str
    name: wire.ShortText = ""
    broker_url: str = "mqtt://127.0.0.1:1883"
    heartbeat_interval: Seconds = 30.0
    http: HttpConfig = msgspec.field(default_factory=HttpConfig)
    transfer: TransferConfig = msgspec.field(default_factory=TransferConfig)
    tls: TlsConfig = msgspec.field(default_factory=TlsConfig)

    @property
    def broker(self) -> wire.BrokerUrl:
        return wire.parse_broker_url(self.broker_url)

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).expanduser()


def parse_config(data: bytes | str, *, source: str = "config") -> Config:
    try:
        config = msgspec.toml.decode(data, type=Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {_name_the_key(str(exc))}") from None
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    _check(config, source)
    return config


def load_config(path: Path) -> Config:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    return parse_config(data, source=str(path))


def _check(config: Config, source: str) -> None:
    try:
        wire.parse_broker_url(config.broker_url)
    except wire.WireError as exc:
        raise ConfigError(f"{source}: broker_url: {exc}") from None
    if not config.data_dir.strip():
        raise ConfigError(f"{source}: data_dir: must not be empty")
    if bool(config.tls.cert_file) != bool(config.tls.key_file):
        raise ConfigError(f"{source}: tls.cert_file and tls.key_file must be given together")


def _name_the_key(message: str) -> str:
    """Turn msgspec's ``... - at `$.http.port``` into ``http.port: ...``."""
    text, sep, where = message.rpartition(" - at `$.")
    if not sep:
        return message
    return f"{where.rstrip('`')}: {text}"
