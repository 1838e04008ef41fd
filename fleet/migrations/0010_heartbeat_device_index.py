"""Drop the heartbeat table's index on device_id alone: (device, -received_at) covers it.

Django's AlterField would drop and re-add the foreign key to get there, and re-adding
it checks every heartbeat row under a lock. Only the index goes here, CONCURRENTLY on
PostgreSQL so that a running bridge keeps storing meanwhile.
"""

import django.db.models.deletion
from django.db import migrations, models

# Django's name for the ForeignKey's own index (schema_editor._create_index_name), the same on every backend.
INDEX = "fleet_heartbeat_device_id_8c8c2309"


def _concurrently(schema_editor) -> str:
    return " CONCURRENTLY" if schema_editor.connection.vendor == "postgresql" else ""


def drop_index(apps, schema_editor):
    schema_editor.execute(f'DROP INDEX{_concurrently(schema_editor)} IF EXISTS "{INDEX}"')


def create_index(apps, schema_editor):
    schema_editor.execute(
        f'CREATE INDEX{_concurrently(schema_editor)} IF NOT EXISTS "{INDEX}" ON "fleet_heartbeat" ("device_id")'
    )


class Migration(migrations.Migration):
    atomic = False  # CREATE/DROP INDEX CONCURRENTLY cannot run in a transaction

    dependencies = [
        ("fleet", "0009_heartbeat_indexes"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AlterField(
                    model_name="heartbeat",
                    name="device",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="heartbeats",
                        to="fleet.device",
                    ),
                ),
            ],
            database_operations=[migrations.RunPython(drop_index, create_index)],
        ),
    ]
