"""The agent's TOML config file, validated into typed structs.

Every error names the key at fault, so a device owner can fix the file without
reading code. Unknown keys are refused: a typo must not silently fall back to a default.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import msgspec

from agent import enrollment
from agent.contract import signing, wire

Seconds = Annotated[float, msgspec.Meta(gt=0)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]


class ConfigError(ValueError):
    """The config file is missing, unreadable or invalid. The text names the key."""


class HttpConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Where the local inference server listens."""

    host: str = "127.0.0.1"
    port: Port = 8471
    # A connection that sends nothing (or stops reading a stream) for this long is closed.
    timeout: Seconds = 30.0
    # Connections served at once, each with its thread; more get 503 with Retry-After.
    max_connections: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 64


class GenerationConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """How a generative model runs: its threads and how many chat completions at once."""

    # onnxruntime's intra-op threads per generation; 0: the device's cores less one, at least 1.
    threads: Annotated[int, msgspec.Meta(ge=0, le=256)] = 0
    # Generations running at once; past it requests wait, and past max_waiting they get 429.
    max_running: Annotated[int, msgspec.Meta(ge=1, le=64)] = 1
    max_waiting: Annotated[int, msgspec.Meta(ge=0, le=1024)] = 8
    # max_tokens when a request names none.
    default_max_tokens: Annotated[int, msgspec.Meta(ge=1, le=32_768)] = 512

    def thread_count(self) -> int:
        return self.threads or max(1, (os.cpu_count() or 1) - 1)


class MetricsConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The agent's Prometheus /metrics (agent/metrics.py): off unless enabled."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: Port = 9471


class TransferConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """How artifact chunks are pulled from the plane."""

    window: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 16
    stall_timeout: Seconds = 10.0
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=100)] = 8


class AdmissionConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What a device must have free before it downloads a version; short of it, it reports ineligible."""

    # Free disk in data_dir, as a multiple of the bytes still to fetch: the part file plus room to spare.
    disk_factor: Annotated[float, msgspec.Meta(ge=1.0, le=100.0)] = 2.0
    # Available RAM, as a multiple of the model file's size, plus ram_margin_mb: onnxruntime
    # holds the file's bytes and its own copy of the weights while it builds the session.
    ram_factor: Annotated[float, msgspec.Meta(ge=0.0, le=100.0)] = 2.0
    ram_margin_mb: Annotated[int, msgspec.Meta(ge=0)] = 64


class ActivationConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Probation after a switch: when the agent rolls back to the previous slot on its own."""

    probation: Seconds = 300.0
    # Roll back when, within probation, at least min_requests local inferences ran and
    # this share of them failed inside the model (HTTP 500; a caller's bad input does not count).
    max_error_rate: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 0.5
    min_requests: Annotated[int, msgspec.Meta(ge=1)] = 20
    # Roll back at start-up when the agent has died this many times with the new model
    # before it lived through its probation: a crash loop.
    max_crashes: Annotated[int, msgspec.Meta(ge=1, le=100)] = 3


class TelemetryConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The on-disk queue of heartbeats and state reports waiting for the broker."""

    # Past this many queued messages the oldest heartbeats are dropped (state reports last), and counted.
    max_queued: Annotated[int, msgspec.Meta(ge=10, le=10_000_000)] = 20_000
    # Messages handed to the MQTT client and not yet acknowledged, at most.
    window: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 50


class TlsConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Files for mqtts:// brokers; empty means the system's CAs and no client certificate."""

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""


class SecurityConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Whom the agent trusts: the plane's Ed25519 public key, base64 of its 32 raw bytes."""

    # Empty: every deployment is refused, unless allow_unsigned says otherwise.
    plane_public_key: str = ""
    # Development only: with no plane_public_key, accept unsigned desired messages and files,
    # with a loud warning at start and on every deployment.
    allow_unsigned: bool = False


class EnrollmentConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Joining a fleet (agent/enrollment.py): the plane's HTTPS URL and an enrollment token.

    Empty: the agent uses ``broker_url`` as it is (a broker without per-device logins).
    """

    plane_url: str = ""
    token: str = ""
    # The token read from a file instead, e.g. a secret mounted by the provisioning system.
    token_file: str = ""
    poll_interval: Seconds = 10.0
    # Hosts the plane may send the device to for its broker, besides plane_url's and broker_url's.
    broker_hosts: list[str] = []
    # A lab network only: enroll over plain http:// and take a broker without TLS from the plane.
    # Loopback addresses need no such permission.
    allow_insecure: bool = False

    def secret(self) -> str:
        return Path(self.token_file).read_text().strip() if self.token_file else self.token


class Config(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The whole agent config file."""

    device_id: wire.DeviceId
    data_dir: str
    name: wire.ShortText = ""
    broker_url: str = "mqtt://127.0.0.1:1883"
    heartbeat_interval: Seconds = 30.0
    http: HttpConfig = msgspec.field(default_factory=HttpConfig)
    generation: GenerationConfig = msgspec.field(default_factory=GenerationConfig)
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)
    transfer: TransferConfig = msgspec.field(default_factory=TransferConfig)
    admission: AdmissionConfig = msgspec.field(default_factory=AdmissionConfig)
    activation: ActivationConfig = msgspec.field(default_factory=ActivationConfig)
    telemetry: TelemetryConfig = msgspec.field(default_factory=TelemetryConfig)
    tls: TlsConfig = msgspec.field(default_factory=TlsConfig)
    security: SecurityConfig = msgspec.field(default_factory=SecurityConfig)
    enrollment: EnrollmentConfig = msgspec.field(default_factory=EnrollmentConfig)

    @property
    def broker(self) -> wire.BrokerUrl:
        return wire.parse_broker_url(self.broker_url)

    @property
    def broker_hosts(self) -> set[str]:
        """Hosts the plane may name as the broker at enrollment: its own, broker_url's, and those listed."""
        hosts = {self.broker.host, *self.enrollment.broker_hosts}
        if self.enrollment.plane_url:
            hosts.add(enrollment.check_plane_url(self.enrollment.plane_url, allow_insecure=True))
        return hosts

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
    if config.enrollment.plane_url and not (config.enrollment.token or config.enrollment.token_file):
        raise ConfigError(f"{source}: enrollment.plane_url needs enrollment.token or enrollment.token_file")
    if config.enrollment.plane_url:
        try:
            enrollment.check_plane_url(config.enrollment.plane_url, allow_insecure=config.enrollment.allow_insecure)
        except enrollment.EnrollmentError as exc:
            raise ConfigError(f"{source}: enrollment.plane_url: {exc}") from None
    if bool(config.tls.cert_file) != bool(config.tls.key_file):
        raise ConfigError(f"{source}: tls.cert_file and tls.key_file must be given together")
    if config.security.plane_public_key:
        if config.security.allow_unsigned:
            raise ConfigError(
                f"{source}: security.allow_unsigned: must not be true with a plane_public_key "
                "(with a key, every message is verified)"
            )
        try:
            signing.load_public_key(config.security.plane_public_key)
        except ValueError as exc:
            raise ConfigError(f"{source}: security.plane_public_key: {exc}") from None


def _name_the_key(message: str) -> str:
    """Turn msgspec's ``... - at `$.http.port``` into ``http.port: ...``."""
    text, sep, where = message.rpartition(" - at `$.")
    if not sep:
        return message
    return f"{where.rstrip('`')}: {text}"
