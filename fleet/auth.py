"""Sign-in with a limit on failures, for the admin's login and the API's token endpoint alike.

Both call django.contrib.auth.authenticate, so one backend counts the failures of both.
After LOGIN_FAILURE_LIMIT failures for a username, or LOGIN_FAILURE_LIMIT_PER_ADDRESS
from one client address (behind TRUSTED_PROXIES the client's, not the proxy's), within
LOGIN_FAILURE_WINDOW seconds, every attempt is refused (even with the right password)
until the window has passed since the last failure.

The counters live in Django's cache: per process with the default local-memory cache,
so N web workers allow N times the limit; point CACHES at Redis to share them.
"""

from __future__ import annotations

import hashlib
import secrets

from django.conf import settings
from django.contrib.auth.backends import ModelBackend
from django.core.cache import cache
from django.core.exceptions import PermissionDenied
from django.db import transaction
from rest_framework.authtoken.models import Token

from fleet.http import request_address
from fleet.services.audit import record


def _keys(request, username: str | None) -> list[tuple[str, int]]:
    """Cache keys and their limits: one for the username, one for the client's address."""
    keys = []
    if username:
        digest = hashlib.sha256(username.lower().encode()).hexdigest()[:32]
        keys.append((f"login-failures:user:{digest}", settings.LOGIN_FAILURE_LIMIT))
    address = request_address(request) if request is not None else None
    if address:
        keys.append((f"login-failures:addr:{address}", settings.LOGIN_FAILURE_LIMIT_PER_ADDRESS))
    return keys


def locked_out(request, username: str | None) -> bool:
    return any(cache.get(key, 0) >= limit for key, limit in _keys(request, username))


def _count_failure(request, username: str | None) -> None:
    for key, _ in _keys(request, username):
        # add() then incr(): incr alone fails on a missing key; the window restarts on each failure.
        cache.add(key, 0, timeout=settings.LOGIN_FAILURE_WINDOW)
        try:
            cache.incr(key)
            cache.touch(key, timeout=settings.LOGIN_FAILURE_WINDOW)
        except ValueError:
            cache.set(key, 1, timeout=settings.LOGIN_FAILURE_WINDOW)


class RateLimitedModelBackend(ModelBackend):
    """ModelBackend that refuses everyone once a username or an address failed too often."""

    def authenticate(self, request, username=None, password=None, **kwargs):
        username = username if username is not None else kwargs.get("username")
        if locked_out(request, username):
            # Stops the backend chain; authenticate() reports it as a failed login.
            raise PermissionDenied("too many failed sign-ins")
        user = super().authenticate(request, username=username, password=password, **kwargs)
        if user is None:
            _count_failure(request, username)
        return user


# An API token is 40 hex characters (160 random bits), shown once. The plane keeps its first
# eight, to tell tokens apart, then 32 hex characters of its SHA-256, in DRF's Token.key:
# a copy of the table, or an admin reading it, holds no usable token.
TOKEN_PREFIX_LENGTH = 8


def stored_token_key(secret: str) -> str:
    """What the plane stores, and looks up, for the token ``secret``."""
    digest = hashlib.sha256(secret.encode()).hexdigest()
    return secret[:TOKEN_PREFIX_LENGTH] + digest[: 40 - TOKEN_PREFIX_LENGTH]


def create_api_token(user, *, reason: str) -> str:
    """A new API token for ``user``, replacing any it had; the secret is returned once, never stored.

    A user has one token (DRF's Token): a new one retires the last, and the change is audited.
    """
    secret = secrets.token_hex(20)
    with transaction.atomic():
        Token.objects.filter(user=user).delete()
        Token.objects.create(user=user, key=stored_token_key(secret))
        record(user, "token.added", user, after={"user": user.get_username()}, reason=reason)
    return secret
