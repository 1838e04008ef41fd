from django.db import migrations, models

# Keep the first copy of each heartbeat stored twice before the constraint existed (SQL that
# PostgreSQL and the demo's SQLite both take).
DELETE_DUPLICATES = """
DELETE FROM fleet_heartbeat
WHERE id NOT IN (SELECT MIN(id) FROM fleet_heartbeat GROUP BY device_id, seq, sent_at)
"""


class Migration(migrations.Migration):
    dependencies = [
        ("fleet", "0007_artifact_chunk_lengths"),
    ]

    operations = [
        migrations.RunSQL(DELETE_DUPLICATES, migrations.RunSQL.noop),
        migrations.AddConstraint(
            model_name="heartbeat",
            constraint=models.UniqueConstraint(fields=("device", "seq", "sent_at"), name="unique_heartbeat_message"),
        ),
    ]
