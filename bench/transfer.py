"""Artifact transfer: MB/s of the MQTT pull of the real MiniLM file, for 1 and for N devices at once.

The figure runs the real pieces end to end: the agent's Transfer (agent/transfer.py)
over the agent's own MQTT adapter (agent/mqtt.py), asking a ``run_bridge`` process,
which serves the chunks from the artifact store after checking the deployment.
Ceilings from the same run: a plain HTTP download of the same file on loopback
(http.server, the hawkBit/Mender design) and the broker's raw byte throughput
(paho publisher to paho subscriber, same chunk size, QoS 1).
"""

from __future__ import annotations

import functools
import http.server
import shutil
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import paho.mqtt.client as mqtt

from agent.clock import SystemClock
from agent.config import TransferConfig
from agent.contract import wire
from agent.mqtt import MqttLink, Will
from agent.transfer import Transfer
from bench import harness
from bench.context import Context
from bench.ingestion import register_devices
from bench.report import Figure, Section
from tests.support import minilm_files

MB = 1_000_000


def release(path: Path, name: str):
    """A published version whose model artifact is ``path``, through the registry's services."""
    from django.db import transaction

    from fleet.services import registry

    model = registry.create_model(name=name, actor="system")
    version = registry.create_version(model, actor="system")
    with path.open("rb") as f, transaction.atomic():
        artifact = registry.add_artifact(version, f, filename=path.name, precision="int8", actor="system")
    registry.process_artifact(artifact.pk)
    return registry.publish_version(version, actor="system")


def _pull(broker: wire.BrokerUrl, device_id: str, deployment_id: int, file: wire.FileManifest, data_dir: Path) -> None:
    """One device fetching one file with the agent's own code."""
    presence = wire.encode(wire.Presence(device_id=device_id, online=False, reason="lost"))
    link = MqttLink(
        broker, client_id=f"{device_id}-pull", will=Will(wire.topic(device_id, wire.Channel.PRESENCE), presence)
    )
    link.connect()
    if not link.wait_connected(10):
        raise TimeoutError(f"{device_id} could not connect")
    link.subscribe([wire.topic(device_id, wire.Channel.CHUNK_DATA)])
    time.sleep(0.2)

    def request(indexes: list[int]) -> None:
        message = wire.ChunkRequest(
            device_id=device_id, deployment_id=deployment_id, sha256=file.sha256, indexes=indexes
        )
        link.publish(wire.topic(device_id, wire.Channel.CHUNK_REQUEST), wire.encode(message))

    transfer = Transfer(file, data_dir=data_dir, request=request, settings=TransferConfig(), clock=SystemClock())
    done = threading.Event()

    def pump() -> None:
        while not done.is_set():
            try:
                inbound = link.messages.get(timeout=0.1)
            except Exception:
                continue
            transfer.feed(wire.decode_chunk(inbound.payload))

    pumper = threading.Thread(target=pump, daemon=True)
    pumper.start()
    try:
        transfer.run()
    finally:
        done.set()
        pumper.join(timeout=5)
        link.close()


def mqtt_pull(ctx: Context, devices: list[tuple[str, int]], file: wire.FileManifest) -> float:
    """MB/s over all devices pulling at once, from the first request to the last verified file."""
    broker = wire.parse_broker_url(ctx.broker.url)
    errors: list[BaseException] = []
    with tempfile.TemporaryDirectory(dir=ctx.workdir) as tmp:

        def one(device_id: str, deployment_id: int) -> None:
            try:
                _pull(broker, device_id, deployment_id, file, Path(tmp) / device_id)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=one, args=d) for d in devices]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=600)
        elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    # Each pull spends 0.2 s settling its subscription first; that is not transfer time.
    return len(devices) * file.size / MB / max(elapsed - 0.2, 1e-6)


def http_download(path: Path, clients: int, workdir: Path) -> float:
    handler = functools.partial(_QuietHandler, directory=str(path.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/{path.name}"
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:

        def get(n: int) -> None:
            with urllib.request.urlopen(url, timeout=120) as reply, open(Path(tmp) / f"{n}", "wb") as out:
                shutil.copyfileobj(reply, out, 1 << 20)

        threads = [threading.Thread(target=get, args=(n,)) for n in range(clients)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=600)
        elapsed = time.perf_counter() - started
    server.shutdown()
    server.server_close()
    return clients * path.stat().st_size / MB / elapsed


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def broker_raw(port: int, chunk_size: int, total_bytes: int) -> float:
    """MB/s of paho publishing ``chunk_size`` payloads at QoS 1 to one paho subscriber."""
    count = max(1, total_bytes // chunk_size)
    received = [0]
    done = threading.Event()

    def on_message(client, userdata, message) -> None:
        received[0] += 1
        if received[0] >= count:
            done.set()

    def client(name: str) -> mqtt.Client:
        c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-raw-{name}",
                        protocol=mqtt.MQTTv5)  # fmt: skip
        c.on_socket_open = lambda c, u, sock: sock.setsockopt(6, 1, 1)  # TCP_NODELAY
        c.connect("127.0.0.1", port)
        c.loop_start()
        return c

    subscriber = client("sub")
    subscriber.on_message = on_message
    subscriber.subscribe("bench/raw", qos=1)
    publisher = client("pub")
    time.sleep(0.5)
    payload = bytes(chunk_size)
    started = time.perf_counter()
    for _ in range(count):
        publisher.publish("bench/raw", payload, qos=1)
    done.wait(120)
    elapsed = time.perf_counter() - started
    for c in (publisher, subscriber):
        c.disconnect()
        c.loop_stop()
    return received[0] * chunk_size / MB / elapsed


def run(ctx: Context) -> Section:
    from fleet.models import Device
    from fleet.services import assignments, registry

    path = minilm_files()["model"]
    counts = ctx.sizes.transfer_devices
    section = Section(
        "Artifact transfer",
        "python -m bench.run --only transfer",
        notes=[
            f"{path.name}, {path.stat().st_size / MB:.1f} MB, pulled by the agent's Transfer over agent/mqtt.py "
            f"from a run_bridge process; MB/s is the sum over all devices, from first request to last verified file."
        ],
    )
    bridge = harness.bridges(1, ctx.env, ctx.workdir)[0]
    try:
        harness.wait_for_log(bridge, "bridge connecting")
        time.sleep(1.0)
        register_devices(ctx, "xfer", max(counts))
        version = release(path, "bench-minilm")
        targets = list(Device.objects.filter(device_id__startswith="xfer-").order_by("device_id"))
        result = assignments.assign_version(version, targets, actor="system", reason="transfer benchmark")
        if not result.deployments:
            raise RuntimeError(f"nothing assigned: {result.skipped}")
        by_device = {d.device.device_id: d for d in result.deployments}
        artifact = result.deployments[0].artifact
        file = registry.file_manifest(artifact)
        for n in counts:
            chosen = [(device_id, by_device[device_id].pk) for device_id in sorted(by_device)[:n]]
            pulled = mqtt_pull(ctx, chosen, file)
            http = http_download(path, n, ctx.workdir)
            raw = broker_raw(ctx.broker.port, file.chunk_size, min(n, 4) * file.size)
            ctx.log(f"transfer x{n}: mqtt {pulled:.1f} MB/s, http {http:.1f} MB/s, raw broker {raw:.1f} MB/s")
            section.figures.append(
                Figure(section.title, f"MQTT pull, {n} device(s) at once", pulled, "MB/s (all devices)",
                       ceiling=f"HTTP on loopback: {http:,.0f} MB/s; broker raw: {raw:,.0f} MB/s",
                       target="≥ 100 MB/s" if n == 1 else "", met=pulled >= 100 if n == 1 else None,
                       note=f"chunks of {file.chunk_size // 1024} KiB, window {TransferConfig().window}")
            )  # fmt: skip
    finally:
        bridge.stop()
    return section
