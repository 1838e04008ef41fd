"""Offline-first telemetry: the on-disk outbox and heartbeats that survive an outage."""

from __future__ import annotations

import queue
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.clock import SystemClock
from agent.config import TelemetryConfig
from agent.contract import wire
from agent.core import Agent
from agent.mqtt import MqttLink, Will
from agent.outbox import Outbox
from agent.runtime import Runner
from tests import support
from tests.agent.fakes import FakeLink
from tests.agent.helpers import make_config, wait_for

TOPIC = "fleet/dev-1/heartbeat"


@pytest.fixture
def link() -> FakeLink:
    return FakeLink()


@pytest.fixture
def outbox(tmp_path: Path, link: FakeLink) -> Iterator[Outbox]:
    box = Outbox(tmp_path / "outbox.sqlite3", link, max_queued=10, window=3)
    box.start()
    yield box
    box.stop()


def sent_payloads(link: FakeLink) -> list[bytes]:
    return [p.payload for p in link.published]


def test_it_sends_queued_messages_in_order_once_connected(outbox: Outbox, link: FakeLink) -> None:
    for n in range(8):
        outbox.put(wire.Channel.HEARTBEAT, TOPIC, b"%d" % n)
    assert outbox.depth == 8 and link.published == []
    link.connect()
    wait_for(lambda: outbox.depth == 0, what="the outbox to drain")
    assert sent_payloads(link) == [b"%d" % n for n in range(8)]
    assert all(p.qos == 1 for p in link.published)


def test_it_keeps_what_the_broker_has_not_acknowledged_across_a_restart(tmp_path: Path, link: FakeLink) -> None:
    first = Outbox(tmp_path / "outbox.sqlite3", link, max_queued=10, window=3)
    first.start()
    for n in range(4):
        first.put(wire.Channel.STATE, "fleet/dev-1/state", b"%d" % n)
    first.stop()  # never connected: nothing acknowledged

    second_link = FakeLink()
    second = Outbox(tmp_path / "outbox.sqlite3", second_link, max_queued=10, window=3)
    second.start()
    try:
        assert second.depth == 4
        second_link.connect()
        wait_for(lambda: second.depth == 0, what="the outbox to drain")
    finally:
        second.stop()
    assert sent_payloads(second_link) == [b"0", b"1", b"2", b"3"]


def test_it_deletes_a_message_only_after_the_broker_acknowledged_it(tmp_path: Path, link: FakeLink) -> None:
    unacked: list[object] = []
    link.deliver = lambda topic, payload, on_acked: unacked.append(on_acked)  # type: ignore[method-assign]  # a broker that never answers
    box = Outbox(tmp_path / "outbox.sqlite3", link, max_queued=10, window=3)
    box.start()
    try:
        link.connect()
        for n in range(5):
            box.put(wire.Channel.HEARTBEAT, TOPIC, b"%d" % n)
        wait_for(lambda: len(unacked) == 3, what="a full window handed over")
        assert box.depth == 5
        unacked[0]()  # type: ignore[operator]  # the first PUBACK
        wait_for(lambda: box.depth == 4, what="the acknowledged message deleted")
        wait_for(lambda: len(unacked) == 4, what="the window to move on")
    finally:
        box.stop()


def test_it_drops_the_oldest_heartbeats_past_its_bound_and_counts_them(outbox: Outbox, link: FakeLink) -> None:
    outbox.put(wire.Channel.STATE, "fleet/dev-1/state", b"state")
    for n in range(14):
        outbox.put(wire.Channel.HEARTBEAT, TOPIC, b"%d" % n)
    assert (outbox.depth, outbox.dropped) == (10, 5)
    link.connect()
    wait_for(lambda: outbox.depth == 0, what="the outbox to drain")
    assert sent_payloads(link) == [b"state", *(b"%d" % n for n in range(5, 14))]


def test_it_remembers_its_drop_count(tmp_path: Path, link: FakeLink) -> None:
    box = Outbox(tmp_path / "outbox.sqlite3", link, max_queued=10, window=3)
    box.start()
    for n in range(12):
        box.put(wire.Channel.HEARTBEAT, TOPIC, b"%d" % n)
    box.stop()
    again = Outbox(tmp_path / "outbox.sqlite3", link, max_queued=10, window=3)
    again.open()
    assert again.dropped == 2
    again.stop()


def test_it_reports_drops_in_the_heartbeat(tmp_path: Path, link: FakeLink) -> None:
    config = make_config(tmp_path / "data", telemetry=TelemetryConfig(max_queued=10))
    agent = Agent(config, link, Runner(), SystemClock())
    link.connect = lambda: None  # type: ignore[method-assign]  # offline from the start
    agent.start()
    try:
        for _ in range(12):
            agent.send_heartbeat()
        assert agent.outbox.dropped >= 2
        link.reconnect()
        # Drain first: a heartbeat put into a full outbox would itself push one more out.
        wait_for(lambda: agent.outbox.depth == 0, what="the outbox to drain")
        agent.send_heartbeat()  # built after the drops, so it counts them all
        wait_for(lambda: agent.outbox.depth == 0, what="the outbox to drain again")
    finally:
        agent.stop()
    beats = link.sent(wire.Channel.HEARTBEAT)
    assert beats[-1].dropped == agent.outbox.dropped
    seqs = [b.seq for b in beats]
    assert seqs == sorted(seqs)


def test_it_survives_a_damaged_queue_file(tmp_path: Path, link: FakeLink) -> None:
    path = tmp_path / "outbox.sqlite3"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(sqlite3.DatabaseError):
        Outbox(path, link, max_queued=10, window=3).open()


def test_it_delivers_every_heartbeat_of_an_outage_in_order_over_a_real_broker(
    tmp_path: Path, broker: wire.BrokerUrl
) -> None:
    """Cut the agent's network for many heartbeat intervals; a watcher on the broker sees them all after."""
    proxy = support.TcpProxy(broker.port)
    device_id = f"outage-{uuid.uuid4().hex[:8]}"
    watcher = MqttLink(broker, client_id=f"w-{device_id}", will=Will("test/w", b""))
    watcher.on_connected = lambda: watcher.subscribe([wire.topic(device_id, wire.Channel.HEARTBEAT)])
    watcher.connect()
    assert watcher.wait_connected(5)
    link = MqttLink(
        wire.BrokerUrl(host="127.0.0.1", port=proxy.port),
        client_id=device_id,
        will=Will(wire.topic(device_id, wire.Channel.PRESENCE), b""),
    )
    interval = 0.05
    agent = Agent(
        make_config(tmp_path / "data", device_id=device_id, heartbeat_interval=interval),
        link,
        Runner(),
        SystemClock(),
    )
    seen: list[int] = []

    def drain() -> None:
        while True:
            try:
                message = watcher.messages.get_nowait()
            except queue.Empty:
                return
            heartbeat = wire.decode_from(message.topic, message.payload)[2]
            assert isinstance(heartbeat, wire.Heartbeat)
            seen.append(heartbeat.seq)

    agent.start()
    try:
        assert link.wait_connected(5)
        wait_for(lambda: drain() or len(seen) >= 3, what="heartbeats before the outage")
        proxy.cut()
        wait_for(lambda: not link.connected, what="the agent to notice the outage")
        cut_at = agent.heartbeats.seq
        wait_for(lambda: agent.heartbeats.seq >= cut_at + 40, timeout=10, what="40 heartbeat intervals offline")
        assert agent.outbox.depth >= 30
        proxy.mend()
        last = agent.heartbeats.seq
        wait_for(lambda: drain() or (seen and max(seen) >= last), timeout=30, what="the buffered heartbeats")
    finally:
        agent.stop()
        watcher.close()
        proxy.close()
    unique = list(dict.fromkeys(seen))  # QoS 1 is at least once: a resent duplicate is allowed, a gap is not
    assert unique == list(range(1, len(unique) + 1))
    assert unique == sorted(seen, key=unique.index)  # and nothing arrives after a younger one
