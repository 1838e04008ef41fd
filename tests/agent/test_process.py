"""The agent as a process: ``python -m agent --config`` against a real Mosquitto."""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.contract import signing, wire
from agent.mqtt import MqttLink, Will

REPO = Path(__file__).resolve().parents[2]


def write_config(tmp_path: Path, device_id: str, broker: wire.BrokerUrl) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(
        f'device_id = "{device_id}"\n'
        f'broker_url = "mqtt://{broker.host}:{broker.port}"\n'
        f'data_dir = "{tmp_path / "data"}"\n'
        "heartbeat_interval = 0.5\n"
        "[http]\nport = 0\n"
        f'[security]\nplane_public_key = "{signing.public_key_text(Ed25519PrivateKey.generate())}"\n'
    )
    return path


def _wait_subscribed(link: MqttLink, device_id: str) -> None:
    """A probe that comes back proves the subscription is in place, so the agent's first messages are seen."""
    probe = f"fleet/{device_id}/probe"
    for _ in range(50):
        link.publish(probe, b"probe", qos=1)
        try:
            while link.messages.get(timeout=0.2).topic != probe:
                pass
            return
        except queue.Empty:
            continue
    raise AssertionError("the watcher's subscription never took effect")


def next_on(link: MqttLink, channel: wire.Channel | tuple[wire.Channel, ...], timeout: float = 15.0) -> wire.Message:
    channels = channel if isinstance(channel, tuple) else (channel,)
    while True:
        try:
            message = link.messages.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"nothing on {channels} within {timeout}s") from None
        if not message.topic.endswith("/probe") and wire.parse_topic(message.topic)[1] in channels:
            return wire.decode_from(message.topic, message.payload)[2]


def test_it_runs_says_hello_and_leaves_cleanly_on_sigterm(tmp_path: Path, broker: wire.BrokerUrl) -> None:
    device_id = f"proc-{uuid.uuid4().hex[:10]}"
    watcher = MqttLink(broker, client_id=f"watch-{device_id}", will=Will("test/ignored", b""))
    watcher.on_connected = lambda: watcher.subscribe([f"fleet/{device_id}/#"])
    watcher.connect()
    assert watcher.wait_connected(5)
    _wait_subscribed(watcher, device_id)
    config = write_config(tmp_path, device_id, broker)
    agent = subprocess.Popen(
        [sys.executable, "-m", "agent", "--config", str(config)], cwd=REPO, stderr=subprocess.PIPE, text=True
    )
    try:
        # Hello and the first heartbeat may come in either order.
        first = {}
        while len(first) < 2:
            message = next_on(watcher, (wire.Channel.HELLO, wire.Channel.HEARTBEAT))
            first.setdefault(type(message), message)
        hello, heartbeat = first[wire.Hello], first[wire.Heartbeat]
        assert isinstance(hello, wire.Hello) and hello.device_id == device_id
        assert isinstance(heartbeat, wire.Heartbeat) and heartbeat.seq == 1
        assert (tmp_path / "data" / "http.port").read_text().strip().isdigit()
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(10) == 0
        presence = next_on(watcher, wire.Channel.PRESENCE)
        while isinstance(presence, wire.Presence) and presence.online:
            presence = next_on(watcher, wire.Channel.PRESENCE)
        assert presence == wire.Presence(device_id=device_id, online=False, reason="shutdown")
    finally:
        agent.kill()
        watcher.close()
        _, err = agent.communicate(timeout=5)
    assert "level=error" not in err, err


def test_it_exits_2_for_a_bad_config(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('device_id = "bad id"\ndata_dir = "x"\n')
    result = subprocess.run(
        [sys.executable, "-m", "agent", "--config", str(config)], cwd=REPO, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert "device_id" in result.stderr


pytestmark = pytest.mark.timeout(60)
