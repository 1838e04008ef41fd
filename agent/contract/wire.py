"""The wire contract between the control plane and its agents.

The heart of agent.contract, the one package the two sides share. It names every MQTT
topic and every message schema, and it decodes and validates what arrives. The plane
imports it too, so it must never import Django, the plane, the rest of the agent, or
anything heavier than msgspec.

Every message carries ``v``, the schema version. A receiver refuses a version it
does not know rather than guessing at its meaning.

docs/protocol.md is the prose form of this module; keep them in step.
"""

from __future__ import annotations

import enum
import struct
from typing import Annotated, Any, Final, Literal
from urllib.parse import parse_qs, unquote, urlsplit

import msgspec

SCHEMA_VERSION: Final = 1
SUPPORTED_VERSIONS: Final = frozenset({1})

TOPIC_ROOT: Final = "fleet"
SHARE_GROUP: Final = "edgefleet-plane"

# Agent-to-plane JSON messages are small; anything bigger is refused unread.
MAX_MESSAGE_BYTES: Final = 64 * 1024
MAX_CHUNKS_PER_REQUEST: Final = 64
# The largest chunk a manifest may name: well under the broker's 8 MiB message limit.
MAX_CHUNK_BYTES: Final = 4 * 1024 * 1024

# \Z, not $: "$" also matches before a trailing newline, and "dev-a\n" is not dev-a.
DeviceId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}\Z")]
Sha256 = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]
ShortText = Annotated[str, msgspec.Meta(max_length=200)]
ErrorText = Annotated[str, msgspec.Meta(max_length=2000)]
# Every number has a range the plane can store: a heartbeat with requests = 2**31 or
# sent_at = 1e12 is refused here, by the contract, rather than by the database in the
# middle of a batch. Counts fit PostgreSQL's integer, big counts (bytes, sequence numbers,
# ids) its bigint, and times are seconds since the epoch before 2100.
MAX_COUNT: Final = 2**31 - 1
MAX_BIG_COUNT: Final = 2**63 - 1
MAX_TIMESTAMP: Final = 4_102_444_800.0
MAX_MEASURE: Final = 1e15
Count = Annotated[int, msgspec.Meta(ge=0, le=MAX_COUNT)]
BigCount = Annotated[int, msgspec.Meta(ge=0, le=MAX_BIG_COUNT)]
Timestamp = Annotated[float, msgspec.Meta(ge=0, le=MAX_TIMESTAMP)]
# Finite, too: the bound refuses the infinity that a JSON number such as 1e999 decodes to.
NonNegative = Annotated[float, msgspec.Meta(ge=0, le=MAX_MEASURE)]
# A file's name inside a model's directory: no path separator, no control character, not "." or "..".
Filename = Annotated[str, msgspec.Meta(pattern=r"^(?!\.\.?\Z)[^/\\\x00-\x1f]{1,200}\Z")]


class WireError(ValueError):
    """A topic or payload that breaks the contract. The text says what is wrong."""


class Channel(enum.StrEnum):
    """The last part of a device topic: ``fleet/<device_id>/<channel>``."""

    HELLO = "hello"
    HEARTBEAT = "heartbeat"
    STATE = "state"
    PRESENCE = "presence"
    CHUNK_REQUEST = "chunks/req"
    DESIRED = "desired"
    CHUNK_DATA = "chunks/data"


AGENT_CHANNELS: Final = (
    Channel.HELLO,
    Channel.HEARTBEAT,
    Channel.STATE,
    Channel.PRESENCE,
    Channel.CHUNK_REQUEST,
)
PLANE_CHANNELS: Final = (Channel.DESIRED, Channel.CHUNK_DATA)


_CHANNELS: Final[dict[str, Channel]] = {str(c): c for c in Channel}


def topic(device_id: str, channel: Channel) -> str:
    return f"{TOPIC_ROOT}/{device_id}/{channel}"


def parse_topic(name: str) -> tuple[str, Channel]:
    """Split ``fleet/<device_id>/<channel>``; raise WireError for anything else."""
    root, _, rest = name.partition("/")
    device_id, _, channel = rest.partition("/")
    if root != TOPIC_ROOT or not device_id:
        raise WireError(f"topic {name!r} is not under {TOPIC_ROOT}/<device_id>/")
    # A dict, not Channel(channel): the enum's own lookup is a microsecond, once a message on the bridge.
    found = _CHANNELS.get(channel)
    if found is None:
        raise WireError(f"topic {name!r} names no known channel")
    return device_id, found


def plane_subscriptions(*, shared: bool = True) -> list[str]:
    """Topic filters the plane subscribes to.

    With ``shared``, they are MQTT v5 shared subscriptions, so the broker splits
    the load between every bridge process in the group.
    """
    filters = [f"{TOPIC_ROOT}/+/{channel}" for channel in AGENT_CHANNELS]
    if shared:
        return [f"$share/{SHARE_GROUP}/{f}" for f in filters]
    return filters


# --- Messages -----------------------------------------------------------------

# ineligible: the device cannot take it (disk, RAM, execution provider); it downloaded nothing.
# rolled_back: it was active, and the device went back to its previous model on its own.
DeploymentStateName = Literal["pending", "downloading", "verifying", "active", "failed", "ineligible", "rolled_back"]


class Message(msgspec.Struct, kw_only=True):
    v: int = SCHEMA_VERSION
    device_id: DeviceId


# As long as the plane's columns for them: a longer value is refused here, not by the database.
Label = Annotated[str, msgspec.Meta(max_length=32)]


class HardwareProfile(msgspec.Struct, kw_only=True):
    arch: Label
    os: Label
    os_release: ShortText = ""
    cpu_model: ShortText = ""
    cpu_count: Count
    cpu_flags: Annotated[list[ShortText], msgspec.Meta(max_length=256)] = []
    ram_bytes: BigCount
    disk_free_bytes: BigCount = 0
    providers: Annotated[list[ShortText], msgspec.Meta(max_length=32)]
    agent_version: Annotated[str, msgspec.Meta(max_length=64)] = ""


class ActiveModel(msgspec.Struct, kw_only=True):
    deployment_id: BigCount
    sha256: Sha256


class Hello(Message, kw_only=True):
    name: ShortText = ""
    hardware: HardwareProfile
    active: ActiveModel | None = None
    sent_at: Timestamp


class LatencyStats(msgspec.Struct, kw_only=True):
    count: Count
    p50_ms: NonNegative
    p95_ms: NonNegative
    p99_ms: NonNegative
    max_ms: NonNegative


# Generation telemetry: bounded, so one absurd figure is refused at decode, never stored.
GenerationCount = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]
Milliseconds = Annotated[float, msgspec.Meta(ge=0, le=86_400_000.0)]
TokensPerSecond = Annotated[float, msgspec.Meta(ge=0, le=1_000_000.0)]


class GenerationStats(msgspec.Struct, kw_only=True):
    """A generative model's chat completions since the last heartbeat."""

    requests: GenerationCount
    errors: GenerationCount = 0
    # Tokens generated (prompt tokens not counted).
    tokens: GenerationCount = 0
    # Time to first token: from the request's arrival (queueing included) to its first generated token.
    ttft_p50_ms: Milliseconds = 0.0
    ttft_p95_ms: Milliseconds = 0.0
    # Per request: generated tokens after the first, over the time they took.
    decode_tps_p50: TokensPerSecond = 0.0


class Heartbeat(Message, kw_only=True):
    seq: BigCount
    sent_at: Timestamp
    interval_s: NonNegative
    uptime_s: NonNegative
    cpu_percent: NonNegative
    mem_rss_bytes: BigCount
    mem_available_bytes: BigCount
    active: ActiveModel | None = None
    requests: Count = 0
    errors: Count = 0
    latency: LatencyStats | None = None
    # Telemetry messages this device's on-disk queue has dropped to stay in its bound, in total.
    dropped: BigCount = 0
    # Generative models only, and only when some chat completion ran since the last heartbeat.
    generation: GenerationStats | None = None


class StateReport(Message, kw_only=True):
    deployment_id: BigCount
    state: DeploymentStateName
    sha256: Sha256 | None = None
    error: ErrorText = ""
    bytes_done: BigCount = 0
    bytes_total: BigCount = 0
    sent_at: Timestamp


class Presence(Message, kw_only=True):
    online: bool
    reason: ShortText = ""


class ChunkRequest(Message, kw_only=True):
    deployment_id: BigCount
    sha256: Sha256
    indexes: Annotated[list[Count], msgspec.Meta(min_length=1, max_length=MAX_CHUNKS_PER_REQUEST)]


# A generate bundle: model (model.onnx), model_data (its external weights), tokenizer
# (tokenizer.json, tokenizer_config.json), config (genai_config.json). The agent puts every
# file of such a bundle in one directory under its manifest filename.
FileRole = Literal["model", "model_data", "tokenizer", "config"]


class FileManifest(msgspec.Struct, kw_only=True):
    """One file to fetch: its hash, size, and the hash of every chunk."""

    role: FileRole
    filename: Filename
    sha256: Sha256
    size: BigCount
    chunk_size: Annotated[int, msgspec.Meta(ge=1024, le=MAX_CHUNK_BYTES)]
    chunks: list[Sha256]
    format: ShortText = "onnx"
    precision: ShortText = ""
    # Content-defined chunks: the length of each, in order. Empty: every chunk is chunk_size
    # bytes but the last. Cut at content, an edit moves only the boundaries near it, so a new
    # version shares most chunks with the one an agent holds (agent.chunkcache).
    lengths: list[Annotated[int, msgspec.Meta(ge=1, le=MAX_CHUNK_BYTES)]] = []
    # The plane's Ed25519 signature over agent.contract.manifest.canonical_manifest, base64; empty: unsigned.
    signature: Annotated[str, msgspec.Meta(max_length=200)] = ""


class InferenceSpec(msgspec.Struct, frozen=True, kw_only=True):
    """How the agent turns text into model inputs and outputs into a result."""

    # generate: an onnxruntime-genai decoder bundle, served as OpenAI chat completions.
    task: Literal["embedding", "tensor", "generate"] = "tensor"
    pooling: Literal["mean", "cls", "none"] = "none"
    normalize: bool = False
    max_length: Annotated[int, msgspec.Meta(ge=1, le=8192)] = 256


Cosine = Annotated[float, msgspec.Meta(ge=-1.0, le=1.0)]
Share = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
MAX_SELFTEST_CASES: Final = 16
MAX_SELFTEST_TOKENS: Final = 256
TokenId = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]


class SelfTest(msgspec.Struct, frozen=True, kw_only=True):
    """The version's evaluation inputs and what the model must answer, checked before activation.

    Embedding models: ``texts`` and the ``embeddings`` expected for them, each within
    ``min_cosine``. Tensor models: ``inputs`` (one feed of named nested lists per case)
    and ``outputs`` (per case, output name to expected nested lists; outputs not named
    are not checked), each element within ``max_abs_error``. Generate models: ``prompts``
    (raw text, encoded with the bundle's tokenizer, no chat template) and ``token_ids``, the
    reference variant's first greedy tokens for each; the share of positions where the
    model's own greedy tokens match must be at least ``min_token_agreement``.
    """

    texts: Annotated[list[str], msgspec.Meta(max_length=MAX_SELFTEST_CASES)] = []
    embeddings: Annotated[list[list[float]], msgspec.Meta(max_length=MAX_SELFTEST_CASES)] = []
    inputs: Annotated[list[dict[str, Any]], msgspec.Meta(max_length=MAX_SELFTEST_CASES)] = []
    outputs: Annotated[list[dict[str, Any]], msgspec.Meta(max_length=MAX_SELFTEST_CASES)] = []
    min_cosine: Cosine = 0.99
    max_abs_error: NonNegative = 1e-3
    prompts: Annotated[
        list[Annotated[str, msgspec.Meta(max_length=4000)]], msgspec.Meta(max_length=MAX_SELFTEST_CASES)
    ] = []
    token_ids: Annotated[
        list[Annotated[list[TokenId], msgspec.Meta(max_length=MAX_SELFTEST_TOKENS)]],
        msgspec.Meta(max_length=MAX_SELFTEST_CASES),
    ] = []
    min_token_agreement: Share = 0.9


class Desired(Message, kw_only=True):
    """What the device should run. Retained; ``deployment_id`` None means nothing.

    ``seq`` orders the plane's messages to one device (the plane's issue time in
    microseconds, never repeated): the agent refuses one below the last it accepted.
    ``signature`` is the plane's over the whole message (agent.contract.signing.canonical_desired).
    Both were added without a schema version change: an older agent ignores them, and
    an older plane sends neither (seq 0, unsigned), which an agent that requires
    signatures refuses.
    """

    deployment_id: BigCount | None
    model: ShortText = ""
    version: ShortText = ""
    files: list[FileManifest] = []
    inference: InferenceSpec = InferenceSpec()
    issued_at: Timestamp
    # Execution providers the version needs, every one (e.g. "CoreMLExecutionProvider");
    # a device without them reports ineligible. Empty: any device will do.
    providers: Annotated[list[ShortText], msgspec.Meta(max_length=8)] = []
    # None: the agent only checks that a smoke inference returns finite values of the right shape.
    selftest: SelfTest | None = None
    seq: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)] = 0  # microseconds: past a 32-bit range
    # The plane's Ed25519 signature over agent.contract.signing.canonical_desired, base64; empty: unsigned.
    signature: Annotated[str, msgspec.Meta(max_length=200)] = ""


AgentMessage = Hello | Heartbeat | StateReport | Presence | ChunkRequest

_TYPES: Final[dict[Channel, type[Message]]] = {
    Channel.HELLO: Hello,
    Channel.HEARTBEAT: Heartbeat,
    Channel.STATE: StateReport,
    Channel.PRESENCE: Presence,
    Channel.CHUNK_REQUEST: ChunkRequest,
    Channel.DESIRED: Desired,
}
_DECODERS: Final[dict[Channel, msgspec.json.Decoder[Message]]] = {
    channel: msgspec.json.Decoder(t) for channel, t in _TYPES.items()
}


def encode(message: Message) -> bytes:
    return msgspec.json.encode(message)


def decode(channel: Channel, payload: bytes, *, max_bytes: int = MAX_MESSAGE_BYTES) -> Message:
    """Decode and validate one JSON message of ``channel``. Raises WireError."""
    if channel is Channel.CHUNK_DATA:
        raise WireError("chunk data is binary: use decode_chunk")
    if len(payload) > max_bytes:
        raise WireError(f"payload of {len(payload)} bytes is over the {max_bytes}-byte limit")
    try:
        message = _DECODERS[channel].decode(payload)
    except msgspec.DecodeError as exc:  # ValidationError is a DecodeError too
        raise WireError(f"bad {channel} message: {exc}") from None
    if message.v not in SUPPORTED_VERSIONS:
        raise WireError(f"schema version {message.v} is not supported (this side speaks {sorted(SUPPORTED_VERSIONS)})")
    return message


def decode_from(topic_name: str, payload: bytes) -> tuple[str, Channel, Message]:
    """Decode a message and check that it speaks for the device its topic names.

    A payload that claims another device's id is refused even if the broker let it
    through: the topic is what the broker's ACL confines, so it is the one we trust.
    """
    device_id, channel = parse_topic(topic_name)
    message = decode(channel, payload)
    if message.device_id != device_id:
        raise WireError(f"payload claims device {message.device_id!r} on the topic of {device_id!r}")
    return device_id, channel, message


# --- Chunk data ---------------------------------------------------------------
# Binary, to spare base64: a fixed header, then the chunk's bytes (or, for an
# error frame, the UTF-8 reason). Header: magic "EFC", schema version, kind,
# the file's sha256 as 32 raw bytes, the chunk index.

_CHUNK_HEADER: Final = struct.Struct(">3sBB32sI")
_CHUNK_MAGIC: Final = b"EFC"
CHUNK_HEADER_BYTES: Final = _CHUNK_HEADER.size


class ChunkKind(enum.IntEnum):
    DATA = 0
    ERROR = 1


class Chunk(msgspec.Struct, frozen=True):
    kind: ChunkKind
    sha256: str
    index: int
    data: bytes


def encode_chunk(sha256: str, index: int, data: bytes, kind: ChunkKind = ChunkKind.DATA) -> bytes:
    return _CHUNK_HEADER.pack(_CHUNK_MAGIC, SCHEMA_VERSION, kind, bytes.fromhex(sha256), index) + data


def decode_chunk(payload: bytes) -> Chunk:
    if len(payload) < CHUNK_HEADER_BYTES:
        raise WireError(f"chunk frame of {len(payload)} bytes is shorter than its header")
    magic, version, kind, digest, index = _CHUNK_HEADER.unpack_from(payload)
    if magic != _CHUNK_MAGIC:
        raise WireError("chunk frame has no EFC magic")
    if version not in SUPPORTED_VERSIONS:
        raise WireError(f"chunk frame schema version {version} is not supported")
    try:
        kind = ChunkKind(kind)
    except ValueError:
        raise WireError(f"chunk frame kind {kind} is unknown") from None
    return Chunk(kind, digest.hex(), index, payload[CHUNK_HEADER_BYTES:])


# --- Broker address -----------------------------------------------------------


class BrokerUrl(msgspec.Struct, frozen=True, kw_only=True):
    """Where and how to reach the broker, parsed from ``mqtt[s]://user:pass@host:port?protocol=5``."""

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None
    protocol: Literal["5", "3.1.1"] = "5"

    @property
    def mqtt_v5(self) -> bool:
        return self.protocol == "5"


def parse_broker_url(url: str) -> BrokerUrl:
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts"):
        raise WireError(f"broker URL {url!r} must start with mqtt:// or mqtts://")
    if not parts.hostname:
        raise WireError(f"broker URL {url!r} names no host")
    try:
        port = parts.port or (8883 if parts.scheme == "mqtts" else 1883)
    except ValueError:
        raise WireError(f"broker URL {url!r} has a bad port") from None
    protocol = parse_qs(parts.query).get("protocol", ["5"])[-1]
    if protocol not in ("5", "3.1.1"):
        raise WireError(f"broker URL {url!r}: protocol must be 5 or 3.1.1")
    return BrokerUrl(
        host=parts.hostname,
        port=port,
        tls=parts.scheme == "mqtts",
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        protocol=protocol,  # type: ignore[arg-type]  # checked against the Literal just above
    )
