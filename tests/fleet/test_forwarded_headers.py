"""X-Forwarded-Proto is believed from a trusted proxy only: nobody else can claim HTTPS."""

import pytest
from django.test import Client

from fleet.lib.addresses import parse_networks


@pytest.fixture
def https_behind_proxy(settings):
    settings.TRUSTED_PROXIES = parse_networks(["10.0.0.0/24"])
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    settings.SECURE_HSTS_SECONDS = 3600
    return settings


def hsts(peer: str) -> str | None:
    response = Client().get("/api/v1/signing-key/", REMOTE_ADDR=peer, HTTP_X_FORWARDED_PROTO="https")
    assert response.status_code == 200
    return response.headers.get("Strict-Transport-Security")


def test_it_takes_https_from_a_trusted_proxy(https_behind_proxy):
    assert hsts("10.0.0.5") == "max-age=3600"


def test_it_ignores_a_claim_of_https_from_any_other_peer(https_behind_proxy):
    assert hsts("192.0.2.1") is None
