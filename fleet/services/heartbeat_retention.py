"""Heartbeats that do not grow without bound: hourly rollups, daily partitions, retention.

The Celery task ``fleet.maintain_heartbeats`` runs ``maintain_heartbeats`` a few minutes past
every hour. It rolls up each complete hour not yet rolled up (one row a device and hour),
makes the next days' partitions, and drops what is past the retention:

- raw heartbeats after ``HEARTBEAT_RETENTION_DAYS``: on PostgreSQL whole daily partitions
  are dropped (fleet/lib/partitions.py), which costs no vacuum; on SQLite (the demo) the rows
  are deleted;
- rollups after ``HEARTBEAT_ROLLUP_RETENTION_DAYS``.

A rollup's hour is the hour its heartbeats reached a bridge (``received_at``), as the gates
and the heartbeat list count time; partitions and retention go by ``sent_at``, the
partition key. Gates read the raw rows; charts and the API's history read the rollups.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Max, Min

from fleet.lib import partitions
from fleet.models import Heartbeat, HeartbeatRollup

log = logging.getLogger(__name__)

HOUR = timedelta(hours=1)
# Rollup columns besides device and hour; a column added here and to HeartbeatRollup is rolled up
# once _ROLLUP_SQL (PostgreSQL) and _roll_up_in_python (SQLite) compute it too.
ROLLUP_FIELDS = ("heartbeats", "requests", "errors", "latency_count", "p50_ms", "p95_ms", "p99_ms", "max_ms",
                 "cpu_percent")  # fmt: skip
_ROLLUP_SQL = f"""
INSERT INTO fleet_heartbeatrollup (device_id, hour, {", ".join(ROLLUP_FIELDS)})
SELECT device_id, date_trunc('hour', received_at, 'UTC'), count(*), sum(requests), sum(errors),
       sum(latency_count),
       percentile_cont(0.5) WITHIN GROUP (ORDER BY p50_ms),
       percentile_cont(0.95) WITHIN GROUP (ORDER BY p95_ms),
       percentile_cont(0.99) WITHIN GROUP (ORDER BY p99_ms),
       max(max_ms), avg(cpu_percent)
FROM fleet_heartbeat WHERE received_at >= %s AND received_at < %s
GROUP BY 1, 2
ON CONFLICT (device_id, hour) DO UPDATE SET {", ".join(f"{f} = EXCLUDED.{f}" for f in ROLLUP_FIELDS)}
"""  # noqa: S608 (no input: column names from the constant above)


@dataclass
class Maintenance:
    """What one run did."""

    hours_rolled_up: list[datetime] = field(default_factory=list)
    partitions_created: list[date] = field(default_factory=list)
    partitions_dropped: list[date] = field(default_factory=list)
    rows_deleted: int = 0
    rollups_deleted: int = 0


def maintain_heartbeats(now: datetime | None = None) -> Maintenance:
    now = now or datetime.now(tz=UTC)
    done = Maintenance()
    done.hours_rolled_up = roll_up_pending(now)
    done.partitions_created = ensure_partitions(now.date())
    done.partitions_dropped, done.rows_deleted = drop_expired(now)
    cutoff = now - timedelta(days=settings.HEARTBEAT_ROLLUP_RETENTION_DAYS)
    done.rollups_deleted, _ = HeartbeatRollup.objects.filter(hour__lt=cutoff).delete()
    return done


def floor_hour(at: datetime) -> datetime:
    return at.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


# --- rollups -------------------------------------------------------------------------


def roll_up_pending(now: datetime) -> list[datetime]:
    """Roll up every complete hour after the newest rolled up, within the raw rows' retention."""
    end = floor_hour(now)
    newest = HeartbeatRollup.objects.aggregate(at=Max("hour"))["at"]
    if newest is not None:
        start = newest + HOUR
    else:
        first = Heartbeat.objects.aggregate(at=Min("received_at"))["at"]
        if first is None:
            return []
        start = floor_hour(first)
    start = max(start, end - timedelta(days=settings.HEARTBEAT_RETENTION_DAYS))
    hours = []
    while start < end:
        roll_up(start, start + HOUR)
        hours.append(start)
        start += HOUR
    return hours


def roll_up(start: datetime, end: datetime) -> int:
    """Roll up the heartbeats received in [start, end), an hour or several; a rolled-up hour is replaced."""
    with transaction.atomic():
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute(_ROLLUP_SQL, [start, end])
                return int(cursor.rowcount)
        return _roll_up_in_python(start, end)


def _roll_up_in_python(start: datetime, end: datetime) -> int:
    """The same figures as _ROLLUP_SQL, for SQLite: the demo's volumes fit in memory."""
    groups: dict[tuple[int, datetime], list[tuple]] = defaultdict(list)
    columns = ("device_id", "received_at", "requests", "errors", "latency_count", "p50_ms", "p95_ms", "p99_ms",
               "max_ms", "cpu_percent")  # fmt: skip
    for row in Heartbeat.objects.filter(received_at__gte=start, received_at__lt=end).values_list(*columns):
        groups[(row[0], floor_hour(row[1]))].append(row[2:])
    rollups = []
    for (device_pk, hour), rows in groups.items():
        requests, errors, counts, p50s, p95s, p99s, maxes, cpus = zip(*rows, strict=True)
        rollups.append(HeartbeatRollup(
            device_id=device_pk, hour=hour, heartbeats=len(rows), requests=sum(requests), errors=sum(errors),
            latency_count=sum(counts), p50_ms=percentile(p50s, 0.5), p95_ms=percentile(p95s, 0.95),
            p99_ms=percentile(p99s, 0.99), max_ms=max((m for m in maxes if m is not None), default=None),
            cpu_percent=sum(cpus) / len(cpus),
        ))  # fmt: skip
    HeartbeatRollup.objects.bulk_create(
        rollups, update_conflicts=True, unique_fields=["device", "hour"], update_fields=list(ROLLUP_FIELDS)
    )
    return len(rollups)


def percentile(values, q: float) -> float | None:
    """PostgreSQL's percentile_cont: linear between the two nearest ranks; None values are left out."""
    ordered = sorted(v for v in values if v is not None)
    if not ordered:
        return None
    rank = (len(ordered) - 1) * q
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


# --- partitions and retention ------------------------------------------------------------


def is_partitioned() -> bool:
    if connection.vendor != "postgresql":
        return False
    with connection.cursor() as cursor:
        cursor.execute(partitions.IS_PARTITIONED_SQL, [partitions.TABLE])
        return bool(cursor.fetchone()[0])


def partition_days() -> list[date]:
    """The days that have their own partition, oldest first."""
    with connection.cursor() as cursor:
        cursor.execute(partitions.LIST_PARTITIONS_SQL, [partitions.TABLE])
        names = [row[0] for row in cursor.fetchall()]
    return sorted(day for day in map(partitions.day_of, names) if day is not None)


def ensure_partitions(today: date) -> list[date]:
    """Make the partitions of today and the next HEARTBEAT_PARTITIONS_AHEAD days that are missing."""
    if not is_partitioned():
        return []
    existing = set(partition_days())
    wanted = partitions.days(today, today + timedelta(days=settings.HEARTBEAT_PARTITIONS_AHEAD))
    created = []
    for day in wanted:
        if day in existing:
            continue
        with transaction.atomic(), connection.cursor() as cursor:
            for sql, params in partitions.create_partition_sql(day):
                cursor.execute(sql, params)  # type: ignore[arg-type]  # dates and strings, as psycopg takes
        created.append(day)
        log.info("heartbeat partition for %s created", day)
    return created


def drop_expired(now: datetime) -> tuple[list[date], int]:
    """Drop the raw heartbeats sent before the retention; returns the partitions dropped and rows deleted."""
    first_kept = (now - timedelta(days=settings.HEARTBEAT_RETENTION_DAYS)).astimezone(UTC).date()
    cutoff, _ = partitions.bounds(first_kept)
    if not is_partitioned():
        deleted, _ = Heartbeat.objects.filter(sent_at__lt=cutoff).delete()
        return [], deleted
    dropped = [day for day in partition_days() if day < first_kept]
    with transaction.atomic(), connection.cursor() as cursor:
        # A table with deferred foreign-key checks pending cannot be dropped: run them now. Only a
        # caller that stored heartbeats in its own open transaction has any (a test does).
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")
        for day in dropped:
            cursor.execute(f'DROP TABLE "{partitions.partition_name(day)}"')
            log.info("heartbeat partition for %s dropped (retention %d days)", day, settings.HEARTBEAT_RETENTION_DAYS)
        # The default partition holds days without a partition of their own: a clock far off.
        cursor.execute(f'DELETE FROM "{partitions.DEFAULT}" WHERE sent_at < %s', [cutoff])
        deleted = cursor.rowcount
    return dropped, deleted
