"""Telemetry ingestion: heartbeats a second that the bridge stores in PostgreSQL, sustained.

Both the figure and its ceiling are measured against the same load (bench.blaster,
real ``Heartbeat`` payloads at a fixed offered rate) on the same broker:

- ceiling: as many bare subscribers as bridges, in a shared subscription, doing
  nothing with what they receive (stock paho, and the bridge's own client class);
- figure: that many ``run_bridge`` processes storing what they receive;
- the database's own ceiling: COPY of the same rows, and ``store_heartbeats``
  (the service the bridge calls) in-process, batch by batch.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import statistics
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bench import harness
from bench.blaster import blast_processes
from bench.context import Context, Sampler
from bench.report import Figure, Section
from bench.simulate import Options, simulate
from tests.support import broker_config

WARMUP_S = 1.0
# Draining a backlog: how often the consumers are sampled, how long they may take, and how
# long the count must stand still (once it moved) to call the backlog taken.
DRAIN_SAMPLE_S = 0.1
DRAIN_TIMEOUT_S = 180.0
DRAIN_QUIET_S = 3.0
DRAIN_MIN_SAMPLES = 5
DRAIN_INBOX = 2_000
# Issue 16's targets for the bridges' share of the ceiling, by how many bridges share the load.
DRAIN_TARGETS = {1: 0.70, 2: 0.85}


def register_devices(ctx: Context, prefix: str, count: int) -> None:
    """Devices say hello through a running bridge, as real ones do; wait until all are stored."""
    from fleet.models import Device

    simulate(
        Options(broker_url=ctx.broker.url, devices=count, prefix=prefix, heartbeat_interval=3600,
                connect_rate=1000, duration=count / 1000 + 1.0)
    )  # fmt: skip
    deadline = time.monotonic() + 60 + count / 100
    while Device.objects.filter(device_id__startswith=f"{prefix}-").count() < count:
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"only {Device.objects.filter(device_id__startswith=prefix).count()} of {count} hellos stored"
            )
        time.sleep(0.2)


def _bare_subscriber(port: int, buffered: bool, seconds: float, results) -> None:
    from fleet.mqtt.client import BufferedClient

    cls = BufferedClient if buffered else mqtt.Client
    client = cls(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5,
                 client_id=f"bench-bare-{time.monotonic_ns()}")  # fmt: skip
    client.max_inflight_messages_set(1000)
    count = [0]

    def on_message(client, userdata, message) -> None:
        count[0] += 1

    client.on_message = on_message
    client.on_connect = lambda c, *args: c.subscribe("$share/bench-bare/fleet/+/heartbeat", qos=1)
    client.connect("127.0.0.1", port)
    client.loop_start()
    samples = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        samples.append((time.monotonic(), count[0]))
        time.sleep(0.5)
    client.disconnect()
    client.loop_stop()
    results.put(samples)


def bare_ceiling(ctx: Context, device_ids: list[str], *, subscribers: int, buffered: bool) -> float:
    """Messages a second that ``subscribers`` do-nothing subscribers receive from the load."""
    sizes = ctx.sizes
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    seconds = sizes.ingest_ceiling_seconds + 3
    procs = [
        context.Process(target=_bare_subscriber, args=(ctx.broker.port, buffered, seconds, results))
        for _ in range(subscribers)
    ]
    for proc in procs:
        proc.start()
    time.sleep(1.0)
    started = time.monotonic()
    blast_processes(ctx.broker.port, device_ids, duration=sizes.ingest_ceiling_seconds, rate=sizes.ingest_rate)
    ended = time.monotonic()
    total = 0.0
    for _ in procs:
        sampler = Sampler(lambda: 0)
        sampler.samples = results.get(timeout=60)
        total += sampler.rate(started + WARMUP_S, ended)
    for proc in procs:
        proc.join(timeout=10)
    return total


def _max_heartbeat_id() -> float:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT coalesce(max(id), 0) FROM fleet_heartbeat")
        return float(cursor.fetchone()[0])


def _last_heartbeat_id() -> float:
    """The last heartbeat id handed out: the rows stored from now on have ids above it, even in
    a table just emptied (whose max(id) says 0 while its sequence goes on)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_get_serial_sequence('fleet_heartbeat', 'id')")
        sequence = cursor.fetchone()[0]
        cursor.execute(f"SELECT last_value, is_called FROM {sequence}")
        value, called = cursor.fetchone()
    return float(value if called else value - 1)


def bridge_rate(ctx: Context, device_ids: list[str], *, bridges: int) -> tuple[float, float]:
    """Heartbeats a second stored by ``bridges`` run_bridge processes; and the offered rate acked."""
    from django.db import connections

    procs = harness.bridges(bridges, ctx.env, ctx.workdir)
    try:
        for proc in procs:
            harness.wait_for_log(proc, "bridge connecting")
        time.sleep(2.0)
        with Sampler(_max_heartbeat_id, every=0.5) as sampler:
            started = time.monotonic()
            acked = blast_processes(ctx.broker.port, device_ids, duration=ctx.sizes.ingest_seconds,
                                    rate=ctx.sizes.ingest_rate)  # fmt: skip
            ended = time.monotonic()
            time.sleep(0.6)
        connections.close_all()
        return sampler.rate(started + WARMUP_S, ended), acked / (ended - started)
    finally:
        for proc in procs:
            proc.stop()


# --- draining a backlog: the load generator off the cores while the rate is taken ------


def _backlog_config(port: int, data_dir: Path) -> str:
    """The shipped configuration, with no bound on what a session may queue: the backlog is the point."""
    config = broker_config(port, data_dir)
    config = re.sub(r"^max_queued_messages .*$", "max_queued_messages 0", config, flags=re.M)
    return re.sub(r"^max_queued_bytes .*$", "max_queued_bytes 0", config, flags=re.M)


def _open_session(port: int, client_id: str, filters: list[str]) -> None:
    """Subscribe as ``client_id`` with a session that outlives the connection, then leave."""
    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5,
                         client_id=client_id)  # fmt: skip
    subscribed = threading.Event()
    client.on_subscribe = lambda *args: subscribed.set()
    client.on_connect = lambda c, *args: c.subscribe([(f, 1) for f in filters])
    client.connect("127.0.0.1", port, clean_start=False, properties=_session_properties())
    client.loop_start()
    if not subscribed.wait(10):
        raise TimeoutError(f"the backlog broker did not confirm {client_id}'s subscription")
    client.disconnect()
    client.loop_stop()


def _session_properties() -> Properties:
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = 3600
    return properties


@contextmanager
def backlog(ctx: Context, device_ids: list[str], client_ids: list[str], filters: list[str], name: str, size: int):
    """A broker of its own holding ``size`` heartbeats for these sessions; yields it and the count.

    The sessions share one subscription, so the broker splits the backlog between them as it
    splits live load; nobody is connected while it is published.
    """
    rate = ctx.sizes.ingest_rate
    with harness.broker(ctx.workdir / f"backlog-{name}", _backlog_config) as broker:
        for client_id in client_ids:
            _open_session(broker.port, client_id, filters)
        acked = blast_processes(broker.port, device_ids, duration=size / rate, rate=rate, settle=True)
        yield broker, acked


@dataclass
class Drain:
    rate: float  # messages a second between 5% and 95% of the backlog
    cpu_us: float  # the consumers' CPU (user + system) a message over the same stretch
    done: int  # how many of the backlog the consumers took in all
    total: int  # how many the broker acknowledged into the backlog


def _process_cpu(pid: int) -> float:
    """User plus system CPU seconds of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _drain(samples: list[tuple[float, float, float]], total: int) -> Drain:
    """The rate and CPU a message between the samples where 5% and 95% of ``total`` had arrived."""
    low = next((s for s in samples if s[1] >= 0.05 * total), None)
    high = next((s for s in samples if s[1] >= 0.95 * total), None)
    done = int(samples[-1][1]) if samples else 0
    if low is None or high is None or samples.index(high) - samples.index(low) < DRAIN_MIN_SAMPLES:
        return Drain(0.0, 0.0, done, total)  # taken too fast to time: a backlog this small measures nothing
    count = high[1] - low[1]
    return Drain(count / (high[0] - low[0]), (high[2] - low[2]) / count * 1e6, done, total)


def _sample_drain(read: Callable[[], tuple[float, float]], total: int) -> list[tuple[float, float, float]]:
    """(time, taken, CPU seconds) every DRAIN_SAMPLE_S, until ``total`` are taken, nothing more has
    arrived for DRAIN_QUIET_S once something did, or DRAIN_TIMEOUT_S passed."""
    samples: list[tuple[float, float, float]] = []
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    moved_at = time.monotonic()
    while time.monotonic() < deadline:
        taken, cpu = read()
        samples.append((time.monotonic(), taken, cpu))
        if len(samples) > 1 and taken != samples[-2][1]:
            moved_at = time.monotonic()
        if taken >= total or (taken and time.monotonic() - moved_at > DRAIN_QUIET_S):
            break
        time.sleep(DRAIN_SAMPLE_S)
    return samples


def _bare_drainer(port: int, client_id: str, total: int, results) -> None:
    from fleet.mqtt.client import BufferedClient

    client = BufferedClient(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5,
                            client_id=client_id)  # fmt: skip
    client.max_inflight_messages_set(1000)
    count = [0]

    def on_message(client, userdata, message) -> None:
        count[0] += 1

    client.on_message = on_message
    client.connect("127.0.0.1", port, clean_start=False, properties=_session_properties())
    client.loop_start()

    def read() -> tuple[float, float]:
        cpu = os.times()
        return count[0], cpu.user + cpu.system

    samples = _sample_drain(read, total)
    client.disconnect()
    client.loop_stop()
    results.put(samples)


def _combined(per_consumer: list[list[tuple[float, float, float]]]) -> list[tuple[float, float, float]]:
    """Each consumer's samples summed at the times of the first's (the others' nearest earlier sample)."""
    combined = []
    for t, _, _ in per_consumer[0]:
        count = cpu = 0.0
        for samples in per_consumer:
            before = [s for s in samples if s[0] <= t] or samples[:1]
            count += before[-1][1]
            cpu += before[-1][2]
        combined.append((t, count, cpu))
    return combined


def bare_drain(ctx: Context, device_ids: list[str], *, subscribers: int) -> Drain:
    """How fast ``subscribers`` do-nothing subscribers (the bridge's client) take a backlog."""
    client_ids = [f"bench-drain-bare-{n}" for n in range(subscribers)]
    filters = ["$share/bench-drain/fleet/+/heartbeat"]
    size = ctx.sizes.ingest_backlog
    with backlog(ctx, device_ids, client_ids, filters, f"bare-{subscribers}", size) as (broker, total):
        context = multiprocessing.get_context("fork")
        results = context.Queue()
        share = total // subscribers
        procs = [context.Process(target=_bare_drainer, args=(broker.port, cid, share, results)) for cid in client_ids]
        for proc in procs:
            proc.start()
        per_consumer = [results.get(timeout=DRAIN_TIMEOUT_S + 30) for _ in procs]
        for proc in procs:
            proc.join(timeout=10)
    return _drain(_combined(per_consumer), total)


def bridge_drain(ctx: Context, device_ids: list[str], *, bridges: int, size: int | None = None) -> Drain:
    """How fast ``bridges`` run_bridge processes store a backlog (``size``, or the sizes' own):
    named, so each finds its session."""
    from django.conf import settings
    from django.db import connections

    from agent.contract import wire

    names = [f"drain-{n}" for n in range(bridges)]
    client_ids = [f"{settings.MQTT_CLIENT_PREFIX}-bridge-{name}" for name in names]
    filters = wire.plane_subscriptions(shared=True)
    size = size or ctx.sizes.ingest_backlog
    with backlog(ctx, device_ids, client_ids, filters, f"bridge-{bridges}", size) as (broker, total):
        start_id = _last_heartbeat_id()
        # A small inbox: a bridge takes up to its inbox's worth from the broker before it stores the
        # first row, and that receiving would fall before the timed stretch (20,000, the default, was
        # two thirds of bench-quick's backlog and a tenth of make bench's).
        env = {**ctx.env, "MQTT_URL": broker.url, "BRIDGE_QUEUE_SIZE": str(DRAIN_INBOX)}
        procs = harness.bridges(bridges, env, ctx.workdir, names=names)

        def read() -> tuple[float, float]:
            return _max_heartbeat_id() - start_id, sum(_process_cpu(p.proc.pid) for p in procs)

        try:
            samples = _sample_drain(read, total)
        finally:
            for proc in procs:
                proc.stop()
            connections.close_all()
    return _drain(samples, total)


def drain_figures(ctx: Context, device_ids: list[str], bridges: int) -> list[Figure]:
    """Rounds of bare subscribers then bridges draining the same size of backlog; medians of each.

    The bare subscriber's CPU a message moved by a fifth between runs (32-39 µs), so one
    round's share of the ceiling moved by as much: the rounds alternate, as in partitions.
    """
    title = "Telemetry ingestion"
    bare_rounds: list[Drain] = []
    bridge_rounds: list[Drain] = []
    for n in range(ctx.sizes.ingest_drain_rounds):
        bare_rounds.append(bare_drain(ctx, device_ids, subscribers=bridges))
        bridge_rounds.append(bridge_drain(ctx, device_ids, bridges=bridges))
        ctx.log(f"ingestion drain x{bridges} round {n}: stored {bridge_rounds[-1].rate:,.0f}/s "
                f"({bridge_rounds[-1].cpu_us:.1f} us CPU a message), bare {bare_rounds[-1].rate:,.0f}/s "
                f"({bare_rounds[-1].cpu_us:.1f} us)")  # fmt: skip
    rate, bare_rate = _median(r.rate for r in bridge_rounds), _median(r.rate for r in bare_rounds)
    cpu, bare_cpu = _median(r.cpu_us for r in bridge_rounds), _median(r.cpu_us for r in bare_rounds)
    done, total = sum(r.done for r in bridge_rounds), sum(r.total for r in bridge_rounds)
    share = rate / bare_rate if bare_rate else 0.0
    target = DRAIN_TARGETS.get(bridges, 0.7)
    rounds = ", ".join(f"{b.rate:,.0f}/{c.rate:,.0f}" for b, c in zip(bridge_rounds, bare_rounds, strict=True))
    figures = [
        Figure(title, f"heartbeats stored/s draining a backlog, {bridges} bridge process(es)", rate or None, "/s",
               ceiling=f"bare subscriber(s) (bridge's client) draining the same backlog: {bare_rate:,.0f}/s "
                       f"(rounds, bridge/bare: {rounds}); CPU a message: bridge {cpu:.1f} µs, bare {bare_cpu:.1f} µs; "
                       f"stored {done:,} of {total:,}",
               target=f"≥ {target:.0%} of ceiling",
               met=share >= target and done >= total if rate and bare_rate else None,
               note=f"{share:.0%} of the ceiling")
    ]  # fmt: skip
    if bridges == 1 and cpu and bare_cpu:
        figures.append(
            Figure(title, "heartbeats a bridge core stores (1 s over the bridge's CPU a message, draining)",
                   1e6 / cpu, "/s", ceiling=f"a bare subscriber core receives {1e6 / bare_cpu:,.0f}/s",
                   note=f"{bare_cpu / cpu:.0%} of the bare subscriber's")
        )  # fmt: skip
    return figures


def _median(values) -> float:
    values = list(values)
    return statistics.median(values) if values else 0.0


def heartbeat_batch(device_pks: list[int], count: int):
    from agent.contract import wire
    from bench.blaster import heartbeat_payload
    from fleet.services.telemetry import ReceivedHeartbeat

    now = datetime.now(tz=UTC)
    beats = [wire.decode(wire.Channel.HEARTBEAT, heartbeat_payload(f"d{n}", n)) for n in range(200)]
    # Each row its own seq: a row repeating (device, seq, sent_at) is a resend, stored once.
    return [
        ReceivedHeartbeat(device_pks[n % len(device_pks)], msgspec.structs.replace(beats[n % 200], seq=n), now)
        for n in range(count)
    ]


def database_ceilings(ctx: Context, device_pks: list[int], rows: int, batch: int = 500) -> tuple[float, float]:
    """Rows a second for COPY of ready-made rows, and for ``store_heartbeats``, a commit per batch."""
    from django.db import connection, transaction

    from fleet.services import telemetry

    items = heartbeat_batch(device_pks, rows)
    tuples = [telemetry.heartbeat_values(i) for i in items]
    columns = ", ".join(telemetry.HEARTBEAT_COLUMNS)
    types = telemetry.column_types("fleet_heartbeat", list(telemetry.HEARTBEAT_COLUMNS))
    started = time.perf_counter()
    for start in range(0, rows, batch):
        with transaction.atomic(), connection.cursor() as cursor:
            # The format store_heartbeats uses: binary, each column's type named.
            with cursor.copy(f"COPY fleet_heartbeat ({columns}) FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(types)
                for row in tuples[start : start + batch]:
                    copy.write_row(row)
    copy_rate = rows / (time.perf_counter() - started)
    started = time.perf_counter()
    for start in range(0, rows, batch):
        telemetry.store_heartbeats(items[start : start + batch])
    service_rate = rows / (time.perf_counter() - started)
    return copy_rate, service_rate


def run(ctx: Context) -> Section:
    from fleet.models import Device

    sizes = ctx.sizes
    section = Section(
        "Telemetry ingestion",
        "python -m bench.run --only ingestion",
        notes=[
            f"Offered load: {sizes.ingest_rate:,.0f} heartbeats/s (QoS 1, real Heartbeat payloads) for "
            f"{sizes.ingest_devices:,} registered devices; the bridges store for {sizes.ingest_seconds:g} s, the bare "
            f"subscribers (whose rate is steady within seconds) receive for {sizes.ingest_ceiling_seconds:g} s; "
            "rates are taken over the steady window after the first second.",
            f"Draining a backlog: {sizes.ingest_backlog:,} heartbeats are published into a broker of its own (the "
            "shipped configuration with no bound on a session's queue) while its consumers, named sessions in one "
            "shared subscription, are away; then they connect and take it. The rate is taken between 5% and 95% of "
            "the backlog, so the load generator is off the cores while it is measured; CPU a message is the "
            "consumers' own (user and system) over the same stretch.",
        ],
    )
    prefix = "ingest"
    register = harness.bridges(1, ctx.env, ctx.workdir)
    try:
        harness.wait_for_log(register[0], "bridge connecting")
        time.sleep(1.0)
        register_devices(ctx, prefix, sizes.ingest_devices)
    finally:
        register[0].stop()
    device_ids = sorted(Device.objects.filter(device_id__startswith=f"{prefix}-").values_list("device_id", flat=True))
    device_pks = list(Device.objects.filter(device_id__in=device_ids).values_list("pk", flat=True))
    for bridges in sizes.ingest_bridges:
        stock = bare_ceiling(ctx, device_ids, subscribers=bridges, buffered=False)
        buffered = bare_ceiling(ctx, device_ids, subscribers=bridges, buffered=True)
        stored, offered = bridge_rate(ctx, device_ids, bridges=bridges)
        ceiling = max(stock, buffered)
        share = stored / ceiling if ceiling else 0.0
        ctx.log(f"ingestion x{bridges}: stored {stored:.0f}/s, bare {stock:.0f}/s (stock), {buffered:.0f}/s (buffered)")
        section.figures.append(
            Figure(section.title, f"heartbeats stored/s, {bridges} bridge process(es)", stored, "/s",
                   ceiling=f"bare subscriber(s): {stock:,.0f}/s stock paho, {buffered:,.0f}/s bridge's client; "
                           f"offered {offered:,.0f}/s",
                   target="≥ 10,000/s and ≥ 70% of ceiling",
                   met=stored >= 10_000 and share >= 0.7, note=f"{share:.0%} of the ceiling")
        )  # fmt: skip
    for bridges in sizes.ingest_drain_bridges:
        section.figures += drain_figures(ctx, device_ids, bridges)
    rows = int(min(200_000, max(2_000, sizes.ingest_rate * sizes.ingest_seconds / 3)))
    copy_rate, service_rate = database_ceilings(ctx, device_pks, rows)
    section.figures.append(
        Figure(section.title, "store_heartbeats in-process, 500-row batches", service_rate, "rows/s",
               ceiling=f"COPY of the same rows: {copy_rate:,.0f} rows/s")
    )  # fmt: skip
    return section
