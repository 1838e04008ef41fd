"""Which chunk size should the agent pull with? Pull MB/s per chunk size over a real Mosquitto.

    .venv/bin/python -m bench.agent_chunk_size [--mib 32] [--repeat 3]

For each chunk size, the agent's own Transfer pulls one file through its MqttLink
(TCP_NODELAY, the default window) from a plane stand-in that answers chunk
requests like the bridge. Beside it, in the same run, the broker's raw ceiling for
messages of that size: one paho publisher streaming QoS 1 to one subscriber,
no request/reply. Prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.clock import SystemClock
from agent.config import TransferConfig
from agent.contract import wire
from agent.mqtt import MqttLink, Will
from agent.transfer import Transfer
from tests import support
from tests.agent.chunkserver import ChunkServer

SIZES = [64 * 1024, 128 * 1024, 256 * 1024, 512 * 1024, 1024 * 1024]
MIB = 1024 * 1024


def pull(broker: wire.BrokerUrl, server: ChunkServer, file: wire.FileManifest, data_dir: Path) -> float:
    """Seconds for the agent's Transfer to fetch ``file`` over the broker."""
    device_id = f"bench-{uuid.uuid4().hex[:8]}"
    link = MqttLink(broker, client_id=device_id, will=Will("bench/will", b""))
    transfer: Transfer | None = None
    link.on_connected = lambda: link.subscribe([wire.topic(device_id, wire.Channel.CHUNK_DATA)])
    link.connect()
    assert link.wait_connected(10)
    stop = threading.Event()

    def pump() -> None:
        while not stop.is_set():
            try:
                message = link.messages.get(timeout=0.1)
            except Exception:
                continue
            if transfer is not None:
                transfer.feed(wire.decode_chunk(message.payload))

    def request(indexes: list[int]) -> None:
        req = wire.ChunkRequest(device_id=device_id, deployment_id=1, sha256=file.sha256, indexes=indexes)
        link.publish(wire.topic(device_id, wire.Channel.CHUNK_REQUEST), wire.encode(req))

    transfer = Transfer(file, data_dir=data_dir, request=request, settings=TransferConfig(), clock=SystemClock())
    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    started = time.perf_counter()
    path = transfer.run()
    elapsed = time.perf_counter() - started
    stop.set()
    thread.join()
    link.close()
    path.unlink()
    return elapsed


def raw(port: int, message_size: int, total: int) -> float:
    """Seconds for ``total`` bytes in ``message_size`` QoS 1 messages, one publisher to one subscriber."""
    count = max(1, total // message_size)
    got = threading.Event()
    received = 0

    def on_message(client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        nonlocal received
        received += 1
        if received == count:
            got.set()

    def client(name: str) -> mqtt.Client:
        c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5)
        c.on_socket_open = lambda client, userdata, sock: sock.setsockopt(6, 1, 1)  # TCP_NODELAY
        c.max_inflight_messages_set(100)
        c.max_queued_messages_set(0)
        c.connect("127.0.0.1", port)
        c.loop_start()
        return c

    topic = f"bench/raw/{uuid.uuid4().hex[:6]}"
    sub = client(f"sub-{topic[-6:]}")
    sub.on_message = on_message
    sub.subscribe(topic, qos=1)
    time.sleep(0.3)
    pub = client(f"pub-{topic[-6:]}")
    payload = os.urandom(message_size)
    started = time.perf_counter()
    for _ in range(count):
        pub.publish(topic, payload, qos=1)
    assert got.wait(120), f"raw: {received}/{count} messages arrived"
    elapsed = time.perf_counter() - started
    for c in (pub, sub):
        c.disconnect()
        c.loop_stop()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=32, help="size of the file pulled, MiB")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    total = args.mib * MIB
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        source = tmp / "artifact.bin"
        source.write_bytes(os.urandom(total))
        with support.broker(tmp / "broker") as mosquitto:
            broker = wire.BrokerUrl(host="127.0.0.1", port=mosquitto.port)
            server = ChunkServer(broker).start()
            rows = []
            for size in SIZES:
                file = server.add(source, chunk_size=size)
                pulls = [pull(broker, server, file, tmp / "data") for _ in range(args.repeat)]
                raws = [raw(mosquitto.port, size, total) for _ in range(args.repeat)]
                pull_mbs, raw_mbs = total / MIB / statistics.median(pulls), total / MIB / statistics.median(raws)
                rows.append((size, pull_mbs, raw_mbs))
                print(f"chunk {size // 1024:>5} KiB: pull {pull_mbs:7.1f} MiB/s   raw {raw_mbs:7.1f} MiB/s", flush=True)
            server.stop()
    print()
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, {args.mib} MiB file, window 16, median of {args.repeat}")
    print()
    print("| chunk | agent pull (MiB/s) | broker raw, same message size (MiB/s) | pull / raw |")
    print("|---|---|---|---|")
    for size, pull_mbs, raw_mbs in rows:
        print(f"| {size // 1024} KiB | {pull_mbs:.1f} | {raw_mbs:.1f} | {pull_mbs / raw_mbs:.0%} |")


if __name__ == "__main__":
    main()
