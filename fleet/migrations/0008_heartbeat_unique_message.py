from django.db import migrations, models

# Keep the first copy of each heartbeat stored twice before the constraint existed.
DELETE_DUPLICATES = """
DELETE FROM fleet_heartbeat AS later
USING fleet_heartbeat AS first
WHERE later.device_id = first.device_id
  AND later.seq = first.seq
  AND later.sent_at = first.sent_at
  AND later.id > first.id
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
