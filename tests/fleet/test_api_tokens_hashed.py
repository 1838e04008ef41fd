"""API tokens are stored hashed: the table and the admin hold nothing a caller could use."""

import importlib

import pytest
from django.apps import apps
from django.contrib.auth.models import User
from django.core.management import call_command
from django.urls import reverse
from rest_framework.authtoken.models import Token, TokenProxy

from fleet.auth import stored_token_key
from tests.fleet.helpers import api_token, token_client


def url(model, view, *args):
    return reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_{view}", args=args)


pytestmark = pytest.mark.django_db


def test_it_stores_no_usable_token(operator):
    secret = api_token(operator)

    stored = Token.objects.get(user=operator).key
    assert secret not in stored
    assert stored == stored_token_key(secret) and stored[:8] == secret[:8]
    # What is stored is no token either.
    assert token_client(None).get("/api/v1/models/", HTTP_AUTHORIZATION=f"Token {stored}").status_code == 401
    assert token_client(None).get("/api/v1/models/", HTTP_AUTHORIZATION=f"Token {secret}").status_code == 200


def test_it_shows_a_token_made_in_the_admin_once_then_only_its_first_characters(client, operator):
    client.force_login(User.objects.create_superuser("root", "root@example.com", "correct horse battery staple"))

    added = client.post(url(TokenProxy, "add"), {"user": operator.pk}, follow=True)
    (message,) = [str(m) for m in added.context["messages"] if "API token" in str(m)]
    secret = message.split(" is ")[1].split(" ")[0]
    listing = client.get(url(TokenProxy, "changelist")).content.decode()
    page = client.get(url(TokenProxy, "change", operator.pk)).content.decode()

    assert "will not be shown again" in message
    assert token_client(None).get("/api/v1/models/", HTTP_AUTHORIZATION=f"Token {secret}").status_code == 200
    assert f"{secret[:8]}…" in listing
    assert secret not in listing and secret not in page
    assert secret not in client.get(url(TokenProxy, "changelist")).content.decode()


def test_it_keeps_a_token_issued_before_hashing_working(operator):
    # A client holding a key stored in the clear, as DRF stores them, before migration 0012.
    legacy = Token.objects.create(user=operator).key
    migration = importlib.import_module("fleet.migrations.0012_api_tokens_hashed")

    migration.hash_existing_keys(apps, None)

    assert not Token.objects.filter(key=legacy).exists()
    assert token_client(None).get("/api/v1/models/", HTTP_AUTHORIZATION=f"Token {legacy}").status_code == 200


def test_it_prints_a_token_that_works_from_create_api_token(operator, capsys):
    call_command("create_api_token", "olivia")
    secret = capsys.readouterr().out.split()[2]

    assert token_client(None).get("/api/v1/models/", HTTP_AUTHORIZATION=f"Token {secret}").status_code == 200
    assert not Token.objects.filter(key=secret).exists()
