"""The paho adapter against a real Mosquitto."""

from __future__ import annotations

import queue
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from agent.config import TlsConfig
from agent.contract import wire
from agent.mqtt import Inbound, LinkError, MqttLink, Will

REPO = Path(__file__).resolve().parents[2]


def unique_id() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


def make_link(broker: wire.BrokerUrl, device_id: str, **fields: object) -> MqttLink:
    goodbye = wire.encode(wire.Presence(device_id=device_id, online=False, reason="lost"))
    url = msgspec.structs.replace(broker, **fields)
    return MqttLink(
        url, client_id=f"{device_id}-{uuid.uuid4().hex[:6]}", will=Will(f"fleet/{device_id}/presence", goodbye)
    )


@pytest.fixture
def watcher(broker: wire.BrokerUrl) -> Iterator[MqttLink]:
    link = make_link(broker, unique_id())
    link.connect()
    assert link.wait_connected(5), "cannot reach the test broker"
    yield link
    link.close()


def next_message(link: MqttLink, timeout: float = 5.0) -> Inbound:
    try:
        return link.messages.get(timeout=timeout)
    except queue.Empty:
        raise AssertionError(f"no message within {timeout}s") from None


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_it_round_trips_a_message(broker: wire.BrokerUrl, protocol: str) -> None:
    device_id = unique_id()
    link = make_link(broker, device_id, protocol=protocol)
    connected: list[bool] = []

    def on_connected() -> None:
        connected.append(True)
        link.subscribe([f"fleet/{device_id}/#"])

    link.on_connected = on_connected
    link.connect()
    try:
        assert link.wait_connected(5)
        assert connected == [True]
        link.publish(f"fleet/{device_id}/hello", b"\x00binary\xff")
        assert next_message(link) == Inbound(f"fleet/{device_id}/hello", b"\x00binary\xff")
    finally:
        link.close()
    assert not link.connected


def test_it_turns_off_nagle_on_its_socket(broker: wire.BrokerUrl) -> None:
    link = make_link(broker, unique_id())
    link.connect()
    try:
        assert link.wait_connected(5)
        sock = link._client.socket()  # the adapter's own socket: nothing public shows this
        assert isinstance(sock, socket.socket)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        link.close()


def test_it_raises_its_own_error_for_a_bad_topic(broker: wire.BrokerUrl) -> None:
    link = make_link(broker, unique_id())
    with pytest.raises(LinkError, match="cannot publish"):
        link.publish("fleet/+/hello", b"x")
    with pytest.raises(LinkError, match="subscribe"):
        link.subscribe(["fleet/#/bad"])


def test_it_sends_a_farewell_and_no_last_will_on_close(broker: wire.BrokerUrl, watcher: MqttLink) -> None:
    device_id = unique_id()
    watcher.subscribe([f"fleet/{device_id}/presence"])
    link = make_link(broker, device_id)
    link.connect()
    assert link.wait_connected(5)
    bye = wire.encode(wire.Presence(device_id=device_id, online=False, reason="shutdown"))
    link.close(farewell=Inbound(f"fleet/{device_id}/presence", bye))
    assert next_message(watcher).payload == bye
    with pytest.raises(AssertionError):
        next_message(watcher, timeout=1.0)


def test_it_leaves_a_last_will_when_the_connection_drops(broker: wire.BrokerUrl, watcher: MqttLink) -> None:
    device_id = unique_id()
    watcher.subscribe([f"fleet/{device_id}/presence"])
    script = (
        "import sys, time\n"
        "from agent.contract import wire\n"
        "from tests.agent.test_mqtt import make_link\n"
        f"link = make_link(wire.BrokerUrl(host={broker.host!r}, port={broker.port}), {device_id!r})\n"
        "link.connect()\n"
        "assert link.wait_connected(5)\n"
        "print('up', flush=True)\n"
        "time.sleep(60)\n"
    )
    device = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert device.stdout is not None and device.stdout.readline().strip() == "up"
        device.kill()  # no DISCONNECT: the broker must publish the will
        device.wait(5)
        message = next_message(watcher)
    finally:
        device.kill()
    will = wire.decode(wire.Channel.PRESENCE, message.payload)
    assert will == wire.Presence(device_id=device_id, online=False, reason="lost")


def test_it_raises_its_own_error_for_an_unreadable_ca_file(broker: wire.BrokerUrl, tmp_path: Path) -> None:
    tls_broker = msgspec.structs.replace(broker, tls=True)
    with pytest.raises(LinkError, match="cannot set up TLS"):
        MqttLink(
            tls_broker,
            client_id=unique_id(),
            will=Will("fleet/x/presence", b""),
            tls=TlsConfig(ca_file=str(tmp_path / "missing-ca.pem")),
        )
