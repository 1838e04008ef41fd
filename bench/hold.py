"""Connections held: N simulated devices heartbeating against one broker and one ``run_bridge``.

The figure is how many devices the plane holds (connected, heartbeating, every one of
their heartbeats stored) and the lag from the ``sent_at`` a device puts in a heartbeat
to the row being visible in PostgreSQL (a poller reads new rows every ``POLL_S``, so
the lag includes up to that much polling). The ceilings, in the same run:

- connections: how many bare MQTT connections (raw CONNECT, nothing else) the same
  broker accepted, opened at the simulator's connect rate before the run;
- lag: a bare paho subscriber on the same heartbeats (a plain, not shared,
  subscription beside the bridge's), lag from ``sent_at`` to its ``on_message``.

Only heartbeats sent in the measurement window count; it starts once every device has
said hello and the bridge has worked through the hellos (a connect storm queues
them), and lasts ``hold_seconds``, two or three heartbeat intervals.
"""

from __future__ import annotations

import multiprocessing
import selectors
import socket
import statistics
import threading
import time

import paho.mqtt.client as mqtt

from bench import harness
from bench.blaster import connect_packet
from bench.context import Context
from bench.fanout import wait_registered
from bench.loop import leave_no_time_wait
from bench.report import Figure, Section
from bench.simulate import Options, simulate

POLL_S = 0.2
STRAGGLERS_S = 5.0
DEVICES_PER_PROCESS = 5000


def bare_connections(port: int, count: int, rate: float) -> int:
    """Open ``count`` raw MQTT connections at ``rate`` a second; how many the broker accepted."""
    selector = selectors.DefaultSelector()
    socks: list[socket.socket] = []
    accepted = 0
    started = time.monotonic()
    try:
        for n in range(count):
            while time.monotonic() < started + n / rate:
                accepted += _read_connacks(selector, 0.001)
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                leave_no_time_wait(sock)
                sock.sendall(connect_packet(f"bench-bare-conn-{n}"))
            except OSError:
                break
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
            socks.append(sock)
        deadline = time.monotonic() + 10
        while accepted < len(socks) and time.monotonic() < deadline:
            accepted += _read_connacks(selector, 0.05)
    finally:
        for sock in socks:
            sock.close()
        selector.close()
    return accepted


def _read_connacks(selector: selectors.BaseSelector, timeout: float) -> int:
    accepted = 0
    for key, _ in selector.select(timeout):
        sock = key.fileobj
        try:
            data = sock.recv(4)  # type: ignore[union-attr]
        except OSError:
            data = b""
        selector.unregister(sock)
        # CONNACK: 0x20, length 2, flags, return code 0 = accepted.
        accepted += int(len(data) == 4 and data[0] == 0x20 and data[3] == 0)
    return accepted


def _bare_subscriber(port: int, stop, seconds: float, results) -> None:
    """(sent_at, lag) of every heartbeat received; and the broker's own count of connected clients."""
    from agent.contract import wire

    lags: list[tuple[float, float]] = []
    connected = [0]

    def on_message(client, userdata, message) -> None:
        now = time.time()
        if message.topic.startswith("$SYS/"):
            connected[0] = max(connected[0], int(message.payload or 0))
            return
        try:
            sent_at = wire.decode(wire.Channel.HEARTBEAT, message.payload).sent_at  # type: ignore[union-attr]
        except wire.WireError:
            return
        lags.append((sent_at, now - sent_at))

    def on_connect(client, *args) -> None:
        client.subscribe([("fleet/+/heartbeat", 1), ("$SYS/broker/clients/connected", 0)])

    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5,
                         client_id=f"bench-hold-bare-{time.monotonic_ns()}")  # fmt: skip
    client.on_message = on_message
    client.on_connect = on_connect
    client.connect("127.0.0.1", port)
    client.loop_start()
    stop.wait(seconds)
    client.disconnect()
    client.loop_stop()
    results.put((lags, connected[0]))


class RowPoller:
    """Reads the heartbeat rows committed since the last look, every POLL_S: (device, sent_at, lag)."""

    def __init__(self, database_url: str) -> None:
        self.url = database_url
        self.rows: list[tuple[int, float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psycopg

        last = 0
        with psycopg.connect(self.url, autocommit=True) as conn:
            last = conn.execute("SELECT coalesce(max(id), 0) FROM fleet_heartbeat").fetchone()[0]
            while not self._stop.is_set():
                found = conn.execute(
                    "SELECT id, device_id, extract(epoch FROM sent_at) FROM fleet_heartbeat WHERE id > %s ORDER BY id",
                    (last,),
                ).fetchall()
                now = time.time()
                for row_id, device_pk, sent_at in found:
                    self.rows.append((device_pk, float(sent_at), now - float(sent_at)))
                    last = row_id
                self._stop.wait(POLL_S)

    def __enter__(self) -> RowPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def _run_part(options: Options) -> None:
    simulate(options)


def start_fleet(ctx: Context, prefix: str, seconds: float) -> list[multiprocessing.process.BaseProcess]:
    """The simulated devices, DEVICES_PER_PROCESS a process; the caller terminates them when done."""
    sizes = ctx.sizes
    count = sizes.hold_devices
    parts = -(-count // DEVICES_PER_PROCESS)
    per = -(-count // parts)
    procs = []
    for p in range(parts):
        options = Options(broker_url=ctx.broker.url, devices=min(per, count - p * per), prefix=prefix, first=p * per,
                          heartbeat_interval=sizes.hold_interval, connect_rate=sizes.hold_connect_rate / parts,
                          duration=seconds, seed=p + 1)  # fmt: skip
        proc = multiprocessing.get_context("fork").Process(target=_run_part, args=(options,), daemon=True)
        proc.start()
        procs.append(proc)
    return procs


def run(ctx: Context) -> Section:
    from fleet.models import Device

    sizes = ctx.sizes
    n = sizes.hold_devices
    section = Section(
        "Connections held",
        "python -m bench.run --only hold",
        notes=[
            f"{n:,} simulated devices (bench.simulate, QoS 1, real Heartbeat payloads) connect at "
            f"{sizes.hold_connect_rate:,.0f}/s and heartbeat every {sizes.hold_interval:g} s, against one Mosquitto "
            f"and one `run_bridge`. Measured over {sizes.hold_seconds:g} s once every device has said hello and "
            f"the bridge has applied the hellos. Lag to the database: from the heartbeat's `sent_at` to the row "
            f"being seen by a poller reading new rows every {POLL_S:g} s (so it includes up to {POLL_S:g} s of "
            "polling)."
        ],
    )
    accepted = bare_connections(ctx.broker.port, n, sizes.hold_connect_rate)
    ctx.log(f"hold: the broker accepted {accepted} of {n} bare connections")
    time.sleep(1.0)
    prefix = "hold"
    bridge = harness.bridges(1, ctx.env, ctx.workdir)[0]
    try:
        harness.wait_for_log(bridge, "bridge connecting")
        register_s = 60 + n / 50
        total = n / sizes.hold_connect_rate + register_s + sizes.hold_seconds + STRAGGLERS_S + 5
        context = multiprocessing.get_context("fork")
        results, stop = context.Queue(), context.Event()
        bare = context.Process(target=_bare_subscriber, args=(ctx.broker.port, stop, total, results), daemon=True)
        bare.start()
        started = time.monotonic()
        fleet = start_fleet(ctx, prefix, total)
        with RowPoller(ctx.database_url) as poller:
            wait_registered(prefix, n, timeout=register_s)
            registered_s = time.monotonic() - started
            # The hellos of a connect storm queue in the bridge ahead of heartbeats: wait until it is through.
            _wait_caught_up(poller, timeout=register_s)
            window = (time.time(), time.time() + sizes.hold_seconds)
            time.sleep(sizes.hold_seconds + STRAGGLERS_S)
        stop.set()
        lags, broker_connected = results.get(timeout=30)
        bare.join(timeout=10)
        for proc in fleet:
            proc.terminate()
            proc.join(timeout=30)
    finally:
        bridge.stop()
    pks = set(Device.objects.filter(device_id__startswith=f"{prefix}-").values_list("pk", flat=True))
    in_window = [(pk, lag) for pk, sent_at, lag in poller.rows if window[0] <= sent_at < window[1] and pk in pks]
    db_lags = [lag for _, lag in in_window]
    bare_lags = [lag for sent_at, lag in lags if window[0] <= sent_at < window[1]]
    held = len({pk for pk, _ in in_window})
    p50, p99 = percentile(db_lags, 50), percentile(db_lags, 99)
    bare50, bare99 = percentile(bare_lags, 50), percentile(bare_lags, 99)
    ctx.log(f"hold: registered in {registered_s:.0f} s; {held} devices heartbeating, {len(db_lags)} stored of "
            f"{len(bare_lags)} seen bare; p99 lag {p99} s (bare {bare99} s)")  # fmt: skip
    stored = f"{len(db_lags):,} of the {len(bare_lags):,} heartbeats the bare subscriber saw stored"
    counted = (f"broker counted up to {broker_connected:,} clients during the run" if broker_connected
               else "the broker's own count was not published in time")  # fmt: skip
    section.figures.append(
        Figure(section.title, f"devices held at a {sizes.hold_interval:g} s heartbeat, one broker, one bridge", held,
               "devices", ceiling=f"bare MQTT connections the broker accepted: {accepted:,} of {n:,} opened; {counted}",
               target="10,000", met=held >= 10_000, note=stored)
    )  # fmt: skip
    section.figures.append(
        Figure(section.title, "p99 lag, heartbeat sent to row in PostgreSQL", p99, "s",
               ceiling=f"bare subscriber: p99 {_s(bare99)}, p50 {_s(bare50)}", target="< 2 s",
               met=p99 is not None and p99 < 2, note=f"p50 {_s(p50)}")
    )  # fmt: skip
    section.notes.append(f"The fleet came up and every hello was applied {registered_s:.0f} s after the first connect.")
    return section


def _wait_caught_up(poller: RowPoller, timeout: float) -> None:
    """Until the rows stored in the last second were sent less than a second before."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        recent = [lag for _, _, lag in poller.rows[-50:]]
        if recent and max(recent) < 1.0 + POLL_S:
            return
        time.sleep(0.5)


def _s(value: float | None) -> str:
    return "not measured" if value is None else f"{value:.2f} s"
