"""Heartbeat ingestion into the partitioned table against the unpartitioned one, side by side.

The same database is switched between the two layouts by the migration itself (back to
0014 and forward again), the table emptied before each round, and the rounds alternate
(partitioned, unpartitioned, partitioned, unpartitioned...) so that whatever else the
machine does falls on both. Each round measures:

- one ``run_bridge`` process draining a backlog of heartbeats (bench.ingestion.bridge_drain:
  what an operator sees, with the load generator off the cores while it is timed; a live
  load made the rounds of one layout differ by a factor of two on two shared cores);
- ``store_heartbeats`` in-process, in the bench's batch size (the database's side alone,
  where the partition routing costs).
"""

from __future__ import annotations

import statistics
import time
from datetime import UTC, datetime

import msgspec

from bench import ingestion
from bench.context import Context
from bench.report import Figure, Section

# The migration before the partitions (0015): back to it is the unpartitioned table, as it was.
UNPARTITIONED = "0014_stage_holds_final_gates"
BATCH = 1000


def use_layout(partitioned: bool) -> None:
    from django.core.management import call_command
    from django.db import connection

    if partitioned:
        call_command("migrate", "fleet", verbosity=0)
    else:
        call_command("migrate", "fleet", UNPARTITIONED, verbosity=0)
    with connection.cursor() as cursor:
        cursor.execute("TRUNCATE fleet_heartbeat")
        cursor.execute("SELECT EXISTS (SELECT 1 FROM pg_partitioned_table)")
        assert cursor.fetchone()[0] == partitioned


def service_rate(device_pks: list[int], rows: int, first_seq: int) -> float:
    """Rows a second that store_heartbeats stores in fresh batches of BATCH, a commit each."""
    from agent.contract import wire
    from bench.blaster import heartbeat_payload
    from fleet.services import telemetry

    now = datetime.now(tz=UTC)
    beat = wire.decode(wire.Channel.HEARTBEAT, heartbeat_payload("d0", 0))
    items = [
        telemetry.ReceivedHeartbeat(device_pks[n % len(device_pks)],
                                    msgspec.structs.replace(beat, seq=first_seq + n), now)
        for n in range(rows)
    ]  # fmt: skip
    started = time.perf_counter()
    for start in range(0, rows, BATCH):
        telemetry.store_heartbeats(items[start : start + BATCH])
    return rows / (time.perf_counter() - started)


def run(ctx: Context) -> Section:
    from fleet.models import Device

    sizes = ctx.sizes
    section = Section(
        "Heartbeat partitions",
        "python -m bench.run --only partitions",
        notes=[
            f"Rounds alternate partitioned and unpartitioned ({sizes.partition_rounds} of each); the table is "
            f"emptied before each. A bridge round drains a backlog of {sizes.partition_backlog:,} heartbeats from "
            f"{sizes.ingest_devices:,} devices (as in Telemetry ingestion); an in-process round stores "
            f"{sizes.partition_rows:,} rows in batches of {BATCH}. Figures are medians of the rounds.",
        ],
    )
    prefix = "parts"
    register = ingestion.harness.bridges(1, ctx.env, ctx.workdir)
    try:
        ingestion.harness.wait_for_log(register[0], "bridge connecting")
        time.sleep(1.0)
        ingestion.register_devices(ctx, prefix, sizes.ingest_devices)
    finally:
        register[0].stop()
    device_ids = sorted(Device.objects.filter(device_id__startswith=f"{prefix}-").values_list("device_id", flat=True))
    device_pks = list(Device.objects.filter(device_id__in=device_ids).values_list("pk", flat=True))
    bridge: dict[bool, list[float]] = {True: [], False: []}
    service: dict[bool, list[float]] = {True: [], False: []}
    try:
        for n in range(sizes.partition_rounds):
            for partitioned in (True, False):
                use_layout(partitioned)
                service[partitioned].append(service_rate(device_pks, sizes.partition_rows, n * sizes.partition_rows))
                use_layout(partitioned)
                drained = ingestion.bridge_drain(ctx, device_ids, bridges=1, size=sizes.partition_backlog)
                if drained.done < drained.total:
                    raise RuntimeError(f"the bridge stored {drained.done:,} of a backlog of {drained.total:,}")
                stored = drained.rate
                bridge[partitioned].append(stored)
                label = "partitioned" if partitioned else "unpartitioned"
                ctx.log(f"partitions round {n}: {label}: bridge {stored:,.0f}/s, "
                        f"in-process {service[partitioned][-1]:,.0f} rows/s")  # fmt: skip
    finally:
        use_layout(True)
    layouts = (
        ("1 bridge process draining a backlog", bridge, "/s"),
        ("store_heartbeats in-process", service, "rows/s"),
    )
    for what, rates, unit in layouts:
        parted, plain = statistics.median(rates[True]), statistics.median(rates[False])
        ratio = parted / plain if plain else 0.0
        section.figures.append(
            Figure(section.title, f"heartbeats stored, {what}, partitioned", parted, unit,
                   ceiling=f"unpartitioned, same run: {plain:,.0f} {unit} "
                           f"(rounds: {', '.join(f'{r:,.0f}' for r in rates[True])} against "
                           f"{', '.join(f'{r:,.0f}' for r in rates[False])})",
                   target="within 5% of unpartitioned", met=ratio >= 0.95, note=f"{ratio:.1%} of unpartitioned")
        )  # fmt: skip
    return section
