"""API tokens are stored hashed (fleet.auth.stored_token_key): each existing key is replaced by
its hashed form, so the clients that hold it keep working and the table holds no usable token."""

import hashlib

from django.db import migrations

PREFIX = 8


def stored_token_key(secret: str) -> str:
    # A copy of fleet.auth.stored_token_key as it was when this ran: migrations never import app code.
    return secret[:PREFIX] + hashlib.sha256(secret.encode()).hexdigest()[: 40 - PREFIX]


def hash_existing_keys(apps, schema_editor):
    Token = apps.get_model("authtoken", "Token")
    for token in list(Token.objects.all()):
        user_id, created, key = token.user_id, token.created, token.key
        # The key is the primary key: replace the row (one per user).
        token.delete()
        Token.objects.create(key=stored_token_key(key), user_id=user_id)
        # ``created`` is auto_now_add: keep the token's real age.
        Token.objects.filter(key=stored_token_key(key)).update(created=created)


class Migration(migrations.Migration):
    dependencies = [
        ("fleet", "0011_generation_telemetry"),
        ("authtoken", "0004_alter_tokenproxy_options"),
    ]

    # No way back: a hash does not give the key again. After a downgrade, users sign in anew.
    operations = [migrations.RunPython(hash_existing_keys, migrations.RunPython.noop)]
