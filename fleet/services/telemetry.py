"""Heartbeats: stored in batches, because a fleet sends thousands a second.

On PostgreSQL a batch goes in with one COPY: it stores about ten times as many
rows a second as ``bulk_create``, which builds a model instance and binds
seventeen parameters per row (docs/benchmarks.md has the figures).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

import psycopg
from django.db import IntegrityError, connection, transaction
from django.db.models import Field, Q

from agent.contract import wire
from fleet.models import Device, Heartbeat
from fleet.services import rollouts


class ReceivedHeartbeat(NamedTuple):
    """A heartbeat as the bridge received it; a tuple, built once a message on its hot path."""

    device_pk: int
    message: wire.Heartbeat
    received_at: datetime


def judged_deployments(batch: Iterable[ReceivedHeartbeat]) -> set[int]:
    """The deployments these heartbeats bring inference numbers for, where a health gate judges them now.

    One query for the whole batch, and none when no heartbeat names a deployment: the bridge
    calls it for every batch it stores, so a fleet at 100% wakes no evaluator.
    """
    reported = {
        item.message.active.deployment_id
        for item in batch
        if item.message.active is not None and (item.message.requests or item.message.latency is not None)
    }
    return rollouts.health_judged_deployments(reported) if reported else set()


def device_pks(device_ids: Iterable[str]) -> dict[str, int]:
    return dict(Device.objects.filter(device_id__in=set(device_ids)).values_list("device_id", "pk"))


# Heartbeat columns in the order heartbeat_values gives them.
HEARTBEAT_COLUMNS = (
    "device_id", "received_at", "sent_at", "seq", "uptime_s", "cpu_percent", "mem_rss_bytes",
    "mem_available_bytes", "deployment_id_reported", "active_sha256", "requests", "errors",
    "latency_count", "p50_ms", "p95_ms", "p99_ms", "max_ms",
    "gen_requests", "gen_errors", "gen_tokens", "ttft_p50_ms", "ttft_p95_ms", "decode_tps_p50",
)  # fmt: skip
# A device's last_seen moves forward at most this often: rewriting every device row on every
# batch cost the bridge half its time (docs/benchmarks.md).
LAST_SEEN_SLACK = timedelta(seconds=5)
# The connection's own staging table for a batch on its way in (see _copy_heartbeats).
INCOMING = "heartbeat_incoming"


def heartbeat_row(item: ReceivedHeartbeat) -> Heartbeat:
    return Heartbeat(**dict(zip(HEARTBEAT_COLUMNS, heartbeat_values(item), strict=True)))


def heartbeat_values(item: ReceivedHeartbeat) -> tuple[object, ...]:
    """The column values of one heartbeat row, in the order of HEARTBEAT_COLUMNS."""
    beat = item.message
    latency = beat.latency
    active = beat.active
    gen = beat.generation
    return (
        item.device_pk,
        item.received_at,
        datetime.fromtimestamp(beat.sent_at, tz=UTC),
        beat.seq,
        beat.uptime_s,
        beat.cpu_percent,
        beat.mem_rss_bytes,
        beat.mem_available_bytes,
        active.deployment_id if active else None,
        active.sha256 if active else "",
        beat.requests,
        beat.errors,
        latency.count if latency else 0,
        latency.p50_ms if latency else None,
        latency.p95_ms if latency else None,
        latency.p99_ms if latency else None,
        latency.max_ms if latency else None,
        gen.requests if gen else 0,
        gen.errors if gen else 0,
        gen.tokens if gen else 0,
        gen.ttft_p50_ms if gen else None,
        gen.ttft_p95_ms if gen else None,
        gen.decode_tps_p50 if gen else None,
    )


def store_heartbeats(batch: Sequence[ReceivedHeartbeat]) -> int:
    """Store a batch in one transaction and bring each device's last-seen forward.

    A heartbeat already stored (same device, seq and sent_at: a resend) is skipped; the
    answer is how many were new.
    """
    if not batch:
        return 0
    with transaction.atomic():
        newest = max(item.received_at for item in batch)
        pks = sorted({item.device_pk for item in batch})
        if connection.vendor == "postgresql":
            stored = _copy_heartbeats(batch)
            _mark_seen_postgresql(pks, newest)
        else:
            before = Heartbeat.objects.filter(device__in=pks).count()
            rows = [heartbeat_row(item) for item in batch]
            Heartbeat.objects.bulk_create(rows, batch_size=1000, ignore_conflicts=True)
            stored = Heartbeat.objects.filter(device__in=pks).count() - before
            Device.objects.filter(pk__in=pks).filter(
                Q(online=False) | Q(last_seen__isnull=True) | Q(last_seen__lt=newest - LAST_SEEN_SLACK)
            ).update(online=True, last_seen=newest)
    return stored


def _mark_seen_postgresql(pks: list[int], newest: datetime) -> None:
    """One UPDATE for the batch, of the devices not marked seen within the slack.

    A device's last_seen is at most a batch window plus LAST_SEEN_SLACK late. One array
    parameter instead of Django's IN (%s, %s, ...): binding hundreds of them cost more
    than the update.
    """
    table = connection.ops.quote_name(Device._meta.db_table)
    # The array as one literal: psycopg's list dumper ran a regular expression on each element,
    # a microsecond a heartbeat in a batch of distinct devices. Integers need no quoting.
    ids = "{" + ",".join(map(str, pks)) + "}"
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {table} SET online = true, last_seen = %s WHERE id = ANY(%s::bigint[])"
            " AND (NOT online OR last_seen IS NULL OR last_seen < %s)",
            [newest, ids, newest - LAST_SEEN_SLACK],
        )


def _column(name: str) -> str:
    field = Heartbeat._meta.get_field(name)
    assert isinstance(field, Field) and field.column  # a concrete column, not a relation's other side
    return field.column


def _copy_heartbeats(batch: Sequence[ReceivedHeartbeat]) -> int:
    # A field added to the model but not to HEARTBEAT_COLUMNS is stored with its default.
    extra = [f for f in Heartbeat._meta.concrete_fields if not f.primary_key and f.attname not in HEARTBEAT_COLUMNS]
    names = [_column(c.removesuffix("_id") if c == "device_id" else c) for c in HEARTBEAT_COLUMNS]
    names += [_column(f.name) for f in extra]
    defaults = tuple(f.get_default() for f in extra)
    columns = ", ".join(connection.ops.quote_name(name) for name in names)
    table = connection.ops.quote_name(Heartbeat._meta.db_table)
    types = column_types(Heartbeat._meta.db_table, names)
    rows = [heartbeat_values(item) + defaults for item in batch]
    with connection.cursor() as cursor:
        # Telemetry, not state: a PostgreSQL crash may lose the last moment of heartbeats,
        # and in exchange a batch does not wait for its WAL flush (another 15% of the cost).
        cursor.execute("SET LOCAL synchronous_commit = off")
        # Almost every batch holds no resend: COPY it straight in. One that does breaks the
        # unique constraint, and only then goes the slower way below (measured by make bench:
        # the staging table for every batch halved what one bridge stores).
        try:
            with transaction.atomic():
                _copy_rows(cursor, table, columns, types, rows)
            return len(rows)
        except (IntegrityError, psycopg.errors.UniqueViolation):
            pass
        # COPY cannot skip a row that breaks the unique constraint (a resent heartbeat), so the
        # batch goes by COPY into a temporary table, then on with INSERT ... ON CONFLICT DO
        # NOTHING. The table lives as long as the connection; the move empties it, so an outer
        # transaction may store another batch.
        cursor.execute(
            f"CREATE TEMPORARY TABLE IF NOT EXISTS {INCOMING} ON COMMIT DELETE ROWS"
            f" AS SELECT {columns} FROM {table} WITH NO DATA"
        )
        _copy_rows(cursor, INCOMING, columns, types, rows)
        cursor.execute(
            f"WITH moved AS (DELETE FROM {INCOMING} RETURNING {columns})"
            f" INSERT INTO {table} ({columns}) SELECT {columns} FROM moved ON CONFLICT DO NOTHING"
        )
        stored: int = cursor.rowcount
    return stored


def _copy_rows(cursor, table: str, columns: str, types: list[int], rows: list[tuple[object, ...]]) -> None:
    """COPY in PostgreSQL's binary format: a fifth of the bridge's CPU for each row that the text
    format takes, and less parsing for the server (docs/benchmarks.md)."""
    with cursor.copy(f"COPY {table} ({columns}) FROM STDIN (FORMAT BINARY)") as copy:
        copy.set_types(types)
        for row in rows:
            copy.write_row(row)


# table -> column -> type oid, read once a process: binary COPY must name each column's type.
_TYPES: dict[str, dict[str, int]] = {}


def column_types(table: str, names: list[str]) -> list[int]:
    if table not in _TYPES:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT attname, atttypid FROM pg_attribute"
                " WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped",
                [table],
            )
            _TYPES[table] = dict(cursor.fetchall())
    return [_TYPES[table][name] for name in names]
