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
import time
from datetime import UTC, datetime

import msgspec
import paho.mqtt.client as mqtt

from bench import harness
from bench.blaster import blast_processes
from bench.context import Context, Sampler
from bench.report import Figure, Section
from bench.simulate import Options, simulate

WARMUP_S = 1.0


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
            "rates are taken over the steady window after the first second."
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
    rows = int(min(200_000, max(2_000, sizes.ingest_rate * sizes.ingest_seconds / 3)))
    copy_rate, service_rate = database_ceilings(ctx, device_pks, rows)
    section.figures.append(
        Figure(section.title, "store_heartbeats in-process, 500-row batches", service_rate, "rows/s",
               ceiling=f"COPY of the same rows: {copy_rate:,.0f} rows/s")
    )  # fmt: skip
    return section
