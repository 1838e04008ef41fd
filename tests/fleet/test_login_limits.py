"""Repeated sign-in failures lock out, at the token endpoint and the admin's login alike."""

import time

import pytest
from django.contrib.auth.models import User

from fleet.lib.addresses import parse_networks
from fleet.models import AuditEvent
from tests.fleet.helpers import token_client

pytestmark = pytest.mark.django_db

PASSWORD = "correct horse battery staple"


@pytest.fixture
def limits(settings):
    settings.LOGIN_FAILURE_LIMIT = 3
    settings.LOGIN_FAILURE_LIMIT_PER_ADDRESS = 5
    return settings


def ask_token(username, password, address="192.0.2.1"):
    return token_client(None).post(
        "/api/v1/auth/token/", {"username": username, "password": password}, REMOTE_ADDR=address
    )


def test_it_refuses_a_token_after_repeated_failures_even_with_the_right_password(limits, operator):
    failures = [ask_token("olivia", "guess").status_code for _ in range(3)]

    locked = ask_token("olivia", PASSWORD)

    assert failures == [400, 400, 400]
    assert locked.status_code == 429
    assert int(locked["Retry-After"]) > 0


def test_it_locks_out_an_address_that_tries_many_usernames(limits, operator):
    for n in range(5):
        ask_token(f"user{n}", "guess", address="192.0.2.9")

    assert ask_token("olivia", PASSWORD, address="192.0.2.9").status_code == 429
    assert ask_token("olivia", PASSWORD, address="192.0.2.10").status_code == 200


def test_it_lets_a_user_in_again_after_the_window(limits, operator):
    limits.LOGIN_FAILURE_WINDOW = 1
    for _ in range(3):
        ask_token("olivia", "guess")

    time.sleep(1.5)

    assert ask_token("olivia", PASSWORD).status_code == 200


def test_it_counts_a_few_failures_without_locking_out(limits, operator):
    ask_token("olivia", "guess")
    ask_token("olivia", "guess")

    assert ask_token("olivia", PASSWORD).status_code == 200


def test_it_locks_the_admin_login_after_repeated_failures(limits, client):
    User.objects.create_superuser("root", password=PASSWORD)
    for _ in range(3):
        client.post("/admin/login/", {"username": "root", "password": "guess"}, REMOTE_ADDR="192.0.2.2")

    response = client.post("/admin/login/", {"username": "root", "password": PASSWORD}, REMOTE_ADDR="192.0.2.2")

    assert response.status_code == 200  # the form again, not the redirect of a sign-in
    assert "_auth_user_id" not in client.session
    # The lockout also holds at the API: one counter for both doors.
    assert ask_token("root", PASSWORD, address="192.0.2.3").status_code == 429


# --- Behind a reverse proxy (TRUSTED_PROXIES) --------------------------------------------

PROXY = "10.0.0.5"


@pytest.fixture
def behind_proxy(limits):
    limits.TRUSTED_PROXIES = parse_networks(["10.0.0.0/24"])
    return limits


def via_proxy(username, password, client_address, forwarded_for=None):
    return token_client(None).post(
        "/api/v1/auth/token/",
        {"username": username, "password": password},
        REMOTE_ADDR=PROXY,
        HTTP_X_FORWARDED_FOR=forwarded_for or client_address,
    )


def test_it_locks_out_only_the_guessing_client_behind_a_trusted_proxy(behind_proxy, operator):
    for n in range(5):
        via_proxy(f"user{n}", "guess", "198.51.100.1")

    assert via_proxy("olivia", PASSWORD, "198.51.100.1").status_code == 429
    assert via_proxy("olivia", PASSWORD, "198.51.100.2").status_code == 200


def test_it_takes_the_rightmost_address_the_proxy_wrote_not_one_the_client_made_up(behind_proxy, operator):
    # The guesser puts a new address at the left of X-Forwarded-For each time; the proxy appends the real one.
    for n in range(5):
        via_proxy(f"user{n}", "guess", None, forwarded_for=f"203.0.113.{n}, 198.51.100.1")

    assert via_proxy("olivia", PASSWORD, None, forwarded_for="203.0.113.99, 198.51.100.1").status_code == 429


def test_it_ignores_x_forwarded_for_from_a_peer_that_is_not_a_trusted_proxy(behind_proxy, operator):
    for n in range(5):
        token_client(None).post(
            "/api/v1/auth/token/",
            {"username": f"user{n}", "password": "guess"},
            REMOTE_ADDR="192.0.2.9",
            HTTP_X_FORWARDED_FOR=f"203.0.113.{n}",
        )

    assert ask_token("olivia", PASSWORD, address="192.0.2.9").status_code == 429


def test_it_records_the_client_behind_a_trusted_proxy_as_the_audit_source(behind_proxy, operator):
    token_client(operator).post(
        "/api/v1/models/", {"name": "m1"}, REMOTE_ADDR=PROXY, HTTP_X_FORWARDED_FOR="6.6.6.6, 198.51.100.7"
    )

    assert AuditEvent.objects.get(action="model.created").source_address == "198.51.100.7"


def test_it_throttles_enrollment_by_the_client_however_it_fills_x_forwarded_for(settings):
    statuses = [
        token_client(None)
        .post("/api/v1/enroll/", {}, format="json", REMOTE_ADDR="192.0.2.20", HTTP_X_FORWARDED_FOR=f"203.0.113.{n}")
        .status_code
        for n in range(31)
    ]

    assert statuses[:30] == [400] * 30
    assert statuses[30] == 429
