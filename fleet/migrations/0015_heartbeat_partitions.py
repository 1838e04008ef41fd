"""Heartbeats into daily range partitions on PostgreSQL (by sent_at; fleet/lib/partitions.py says why).

The table is rebuilt: a partitioned table named like the old one, the days of the last
HEARTBEAT_RETENTION_DAYS and the next HEARTBEAT_PARTITIONS_AHEAD each in their own
partition, anything else in the default one, then every row copied over in one statement.
The primary key becomes (id, sent_at), since a partitioned table's keys must include the
partition key; Django still sees ``id``, which stays unique by its identity sequence. The
indexes and constraints keep their names, so Django's state does not change. It runs in the
migration's transaction and holds the table meanwhile: the bridges wait, they lose nothing.
SQLite (the demo) is left unpartitioned.
"""

from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.db import migrations

from fleet.lib import partitions

TABLE = partitions.TABLE
OLD = "fleet_heartbeat_unpartitioned"
# The names Django gave them (0001, 0008, 0009): the same again on the new table.
INDEXES = {
    "fleet_heart_device__1eb748_idx": "(device_id, received_at DESC)",
    "heartbeat_received": "(received_at DESC)",
    "heartbeat_deployment": "(deployment_id_reported)",
}
UNIQUE = "unique_heartbeat_message"
PKEY = "fleet_heartbeat_pkey"
FKEY = "fleet_heartbeat_device_id_8c8c2309_fk_fleet_device_id"


def _set_aside(cursor) -> None:
    """Rename the old table and everything named after it out of the way."""
    cursor.execute(f'ALTER TABLE "{TABLE}" RENAME TO "{OLD}"')
    for name in INDEXES:
        cursor.execute(f'ALTER INDEX "{name}" RENAME TO "{name}_old"')
    for name in (PKEY, UNIQUE, FKEY):
        cursor.execute(f'ALTER TABLE "{OLD}" RENAME CONSTRAINT "{name}" TO "{name}_old"')
    cursor.execute(f"SELECT pg_get_serial_sequence('{OLD}', 'id')")
    sequence = cursor.fetchone()[0]
    cursor.execute(f"ALTER SEQUENCE {sequence} RENAME TO fleet_heartbeat_id_seq_old")


def _keys_and_indexes(cursor, primary_key: str) -> None:
    cursor.execute(f'ALTER TABLE "{TABLE}" ADD CONSTRAINT "{PKEY}" PRIMARY KEY {primary_key}')
    cursor.execute(f'ALTER TABLE "{TABLE}" ADD CONSTRAINT "{UNIQUE}" UNIQUE (device_id, seq, sent_at)')
    for name, columns in INDEXES.items():
        cursor.execute(f'CREATE INDEX "{name}" ON "{TABLE}" {columns}')
    cursor.execute(
        f'ALTER TABLE "{TABLE}" ADD CONSTRAINT "{FKEY}" FOREIGN KEY (device_id)'
        ' REFERENCES fleet_device (id) DEFERRABLE INITIALLY DEFERRED'
    )


def _copy_and_drop_old(cursor) -> None:
    cursor.execute(f'INSERT INTO "{TABLE}" SELECT * FROM "{OLD}"')
    cursor.execute(f"SELECT coalesce(max(id), 0) + 1 FROM \"{OLD}\"")
    next_id = cursor.fetchone()[0]
    cursor.execute(f'DROP TABLE "{OLD}"')
    # The new table's identity took the old sequence's name, set aside above.
    cursor.execute(f"SELECT setval(pg_get_serial_sequence('{TABLE}', 'id'), %s, false)", [next_id])


def partition(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    today = datetime.now(tz=UTC).date()
    first = today - timedelta(days=settings.HEARTBEAT_RETENTION_DAYS)
    last = today + timedelta(days=settings.HEARTBEAT_PARTITIONS_AHEAD)
    with schema_editor.connection.cursor() as cursor:
        _set_aside(cursor)
        cursor.execute(
            f'CREATE TABLE "{TABLE}" (LIKE "{OLD}" INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING IDENTITY)'
            " PARTITION BY RANGE (sent_at)"
        )
        cursor.execute(f'CREATE TABLE "{partitions.DEFAULT}" PARTITION OF "{TABLE}" DEFAULT')
        for day in partitions.days(first, last):
            start, end = partitions.bounds(day)
            cursor.execute(
                f'CREATE TABLE "{partitions.partition_name(day)}" PARTITION OF "{TABLE}" FOR VALUES FROM (%s) TO (%s)',
                [start, end],
            )
        _copy_and_drop_old(cursor)
        _keys_and_indexes(cursor, "(id, sent_at)")


def unpartition(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    with schema_editor.connection.cursor() as cursor:
        cursor.execute(partitions.IS_PARTITIONED_SQL, [TABLE])
        if not cursor.fetchone()[0]:
            return
        _set_aside(cursor)
        cursor.execute(
            f'CREATE TABLE "{TABLE}" (LIKE "{OLD}" INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING IDENTITY)'
        )
        _copy_and_drop_old(cursor)
        _keys_and_indexes(cursor, "(id)")


class Migration(migrations.Migration):
    dependencies = [
        ("fleet", "0014_stage_holds_final_gates"),
    ]

    operations = [migrations.RunPython(partition, unpartition)]
