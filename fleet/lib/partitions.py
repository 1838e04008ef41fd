"""Daily range partitions of the heartbeat table on PostgreSQL: names, bounds and the SQL.

The table is partitioned by ``sent_at``, the device's own timestamp, because a partitioned
table's unique constraint must include its partition key: the constraint that makes a
resent heartbeat a no-op is (device, seq, sent_at), and it stays exactly that. Partitioning
by ``received_at`` would have made the bridge's arrival time part of a heartbeat's identity,
so a message the broker delivers twice (QoS 1) would be stored twice.

A DEFAULT partition takes the rows whose day has no partition of its own (a device clock
far off, or data older than the partitions when the table was converted); creating a
partition moves its day's rows out of it first. No ORM here: the migration and the
retention service both build their SQL from these functions.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta

TABLE = "fleet_heartbeat"
DEFAULT = f"{TABLE}_default"
PREFIX = f"{TABLE}_p"


def partition_name(day: date) -> str:
    return f"{PREFIX}{day:%Y%m%d}"


def day_of(name: str) -> date | None:
    """The day a partition holds, from its name; None for the default partition or another table."""
    if not name.startswith(PREFIX):
        return None
    try:
        return datetime.strptime(name.removeprefix(PREFIX), "%Y%m%d").replace(tzinfo=UTC).date()
    except ValueError:
        return None


def bounds(day: date) -> tuple[datetime, datetime]:
    start = datetime.combine(day, time(), tzinfo=UTC)
    return start, start + timedelta(days=1)


def create_partition_sql(day: date) -> list[tuple[str, list[object]]]:
    """Statements (with parameters) that add ``day``'s partition, its rows moved out of the default first.

    A partition cannot be created while the default partition holds rows of its range, so
    it is built apart, filled from the default, then attached. Attaching takes only a
    SHARE UPDATE EXCLUSIVE lock on the table: the bridges keep storing meanwhile.
    """
    name = partition_name(day)
    start, end = bounds(day)
    return [
        (f'CREATE TABLE "{name}" (LIKE "{TABLE}" INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', []),
        (
            f'WITH moved AS (DELETE FROM "{DEFAULT}" WHERE sent_at >= %s AND sent_at < %s RETURNING *)'
            f' INSERT INTO "{name}" SELECT * FROM moved',
            [start, end],
        ),
        (f"ALTER TABLE \"{TABLE}\" ATTACH PARTITION \"{name}\" FOR VALUES FROM ('{start.isoformat()}')"
         f" TO ('{end.isoformat()}')", []),
    ]  # fmt: skip


LIST_PARTITIONS_SQL = (
    "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
    " JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = %s ORDER BY c.relname"
)
IS_PARTITIONED_SQL = (
    "SELECT EXISTS (SELECT 1 FROM pg_partitioned_table t JOIN pg_class c ON c.oid = t.partrelid WHERE c.relname = %s)"
)


def days(first: date, last: date) -> list[date]:
    """Every day from ``first`` to ``last``, both included."""
    return [first + timedelta(days=n) for n in range((last - first).days + 1)]
