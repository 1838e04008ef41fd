"""Edgefleet's Python client: ``Client(url, token)`` for the plane's REST API, and the ``edgefleet`` CLI."""

from edgefleet_client.api import Client
from edgefleet_client.errors import (
    ApiError,
    AuthenticationFailed,
    ConfigError,
    Conflict,
    EdgefleetError,
    NotFound,
    PermissionDenied,
    ServerError,
    Unreachable,
    ValidationFailed,
)

__all__ = [
    "ApiError",
    "AuthenticationFailed",
    "Client",
    "ConfigError",
    "Conflict",
    "EdgefleetError",
    "NotFound",
    "PermissionDenied",
    "ServerError",
    "Unreachable",
    "ValidationFailed",
]
