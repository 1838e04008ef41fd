"""Property-based fuzz of the bridge's message handling: whatever an agent sends, the bridge
keeps going, and every message it cannot decode is counted as bad."""

import json
import time

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.contract import wire
from fleet.bridge.ingest import Inbound
from fleet.bridge.transport import Bridge
from fleet.models import Heartbeat
from fleet.storage import get_store
from tests.fleet.test_bridge import FakeClient, heartbeat, hello

pytestmark = pytest.mark.django_db

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))

# A valid message of each agent channel, as JSON values: the mutations start from these.
TEMPLATES = {
    wire.Channel.HELLO: msgspec.to_builtins(hello()),
    wire.Channel.HEARTBEAT: msgspec.to_builtins(heartbeat()),
    wire.Channel.STATE: msgspec.to_builtins(
        wire.StateReport(device_id="dev-1", deployment_id=1, state="downloading", sent_at=time.time())
    ),
    wire.Channel.PRESENCE: msgspec.to_builtins(wire.Presence(device_id="dev-1", online=False)),
    wire.Channel.CHUNK_REQUEST: msgspec.to_builtins(
        wire.ChunkRequest(device_id="dev-1", deployment_id=1, sha256="0" * 64, indexes=[0])
    ),
}

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=80),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20,
)


@st.composite
def mutated(draw, channel: wire.Channel) -> bytes:
    """A valid message with fields replaced, removed or added."""
    message = dict(TEMPLATES[channel])
    for key in draw(st.lists(st.sampled_from(sorted(message)), max_size=3)):
        message.pop(key, None)
    message.update(draw(st.dictionaries(st.sampled_from([*sorted(TEMPLATES[channel]), "extra"]), json_values)))
    return json.dumps(message).encode()


garbage = (
    st.binary(max_size=300)
    | st.text(max_size=300).map(str.encode)
    | json_values.map(lambda v: json.dumps(v).encode())
    | st.integers(min_value=65_000, max_value=70_000).map(lambda n: b"{" + b" " * n + b"}")
)


def new_bridge() -> Bridge:
    bridge = Bridge(FakeClient(), get_store(), batch_size=10)
    bridge.handle(Inbound(wire.topic("dev-1", wire.Channel.HELLO), wire.encode(hello()), time.time()))
    return bridge


def deliver(bridge: Bridge, channel: wire.Channel, payload: bytes) -> None:
    """As the bridge's threads do: chunk requests to the chunk server, the rest to the database loop."""
    item = Inbound(wire.topic("dev-1", channel), payload, time.time())
    if channel is wire.Channel.CHUNK_REQUEST:
        bridge.serve_chunk_request(item)
    else:
        bridge.handle(item)


def decodes(channel: wire.Channel, payload: bytes) -> bool:
    try:
        wire.decode_from(wire.topic("dev-1", channel), payload)
    except wire.WireError:
        return False
    return True


def check_one(bridge: Bridge, channel: wire.Channel, payload: bytes) -> None:
    before = bridge.stats.snapshot()
    deliver(bridge, channel, payload)
    after = bridge.stats.snapshot()
    bad = after.get("bad_message", 0) - before.get("bad_message", 0)
    assert bad == (0 if decodes(channel, payload) else 1)
    # Nothing escaped as an unexpected failure: each message ended as stored, refused or counted.
    assert after.get("errors", 0) == 0, payload


@FUZZ
@given(channel=st.sampled_from(wire.AGENT_CHANNELS), payload=garbage)
def test_it_counts_every_garbage_message_as_bad(channel, payload):
    bridge = new_bridge()

    check_one(bridge, channel, payload)


@FUZZ
@given(data=st.data(), channel=st.sampled_from(wire.AGENT_CHANNELS))
def test_it_survives_every_malformed_message(data, channel):
    bridge = new_bridge()

    check_one(bridge, channel, data.draw(mutated(channel)))

    bridge.flush()
    assert bridge.stats.snapshot().get("flush_failures", 0) == 0
    # Still working: a good heartbeat is taken.
    deliver(bridge, wire.Channel.HEARTBEAT, wire.encode(heartbeat(seq=99)))
    assert bridge.stats.snapshot().get("errors", 0) == 0


# --- Issue #13: numbers at and past every limit, ids at the edge of the pattern ---------------

EDGE_NUMBERS = st.sampled_from(
    [-1, 0, 1, 2**31 - 1, 2**31, 2**32, 2**53, 2**63 - 1, 2**63, 2**64, 10**30, 1e12, 4.1e9, 1e15, 1e16, 1e308,
     -0.0, 0.5, "1", None, True, [], {}]
)  # fmt: skip
EDGE_IDS = st.sampled_from(
    ["d" * 64, "d" * 65, "dev-1\n", "dev-1\x00", "-dev", "dev 1", "dév-1", "", "dev/1", "$SYS", "dev-1\r\n"]
)


def numeric_paths(value, path=()):
    """Every path to a number inside a JSON value (the fields a range applies to)."""
    if isinstance(value, bool):
        return
    if isinstance(value, int | float):
        yield path
    elif isinstance(value, dict):
        for key, inner in value.items():
            yield from numeric_paths(inner, (*path, key))
    elif isinstance(value, list):
        for n, inner in enumerate(value):
            yield from numeric_paths(inner, (*path, n))


def replaced(value, path, new):
    if not path:
        return new
    copy = list(value) if isinstance(value, list) else dict(value)
    copy[path[0]] = replaced(value[path[0]], path[1:], new)
    return copy


@st.composite
def at_the_edges(draw, channel: wire.Channel) -> bytes:
    """A valid message with numbers set at or past their limits, and perhaps an id at the pattern's edge."""
    message = dict(TEMPLATES[channel])
    paths = list(numeric_paths(message))
    for path in draw(st.lists(st.sampled_from(paths), min_size=1, max_size=3)):
        message = replaced(message, path, draw(EDGE_NUMBERS))
    if draw(st.booleans()):
        message["device_id"] = draw(EDGE_IDS)
    return json.dumps(message).encode()


@FUZZ
@given(data=st.data(), channel=st.sampled_from(wire.AGENT_CHANNELS))
def test_it_never_stops_storing_whatever_numbers_or_ids_a_message_carries(data, channel):
    bridge = new_bridge()
    bridge.flush()
    before = Heartbeat.objects.filter(seq=12345).count()  # examples share the test's transaction

    check_one(bridge, channel, data.draw(at_the_edges(channel)))
    bridge.flush()

    # Nothing is held for ever, and a good heartbeat sent next is stored.
    deliver(bridge, wire.Channel.HEARTBEAT, wire.encode(heartbeat(seq=12345)))
    bridge.flush()
    assert bridge.held() == 0
    assert Heartbeat.objects.filter(seq=12345).count() == before + 1
    assert bridge.stats.snapshot().get("errors", 0) == 0
