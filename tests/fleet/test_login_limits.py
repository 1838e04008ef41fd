"""Repeated sign-in failures lock out, at the token endpoint and the admin's login alike."""

import time

import pytest
from django.contrib.auth.models import User

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
