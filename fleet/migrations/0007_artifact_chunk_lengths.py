from django.db import migrations, models


def count_chunks(apps, schema_editor):
    Artifact = apps.get_model("fleet", "Artifact")
    for artifact in Artifact.objects.exclude(chunk_hashes=[]).only("chunk_hashes").iterator():
        Artifact.objects.filter(pk=artifact.pk).update(chunk_count=len(artifact.chunk_hashes))


class Migration(migrations.Migration):
    dependencies = [
        ("fleet", "0006_security"),
    ]

    operations = [
        migrations.AddField(
            model_name="artifact",
            name="chunk_lengths",
            field=models.JSONField(blank=True, default=list),
        ),
        migrations.AddField(
            model_name="artifact",
            name="chunk_count",
            field=models.PositiveIntegerField(default=0),
        ),
        migrations.RunPython(count_chunks, migrations.RunPython.noop),
    ]
