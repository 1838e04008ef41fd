"""One exception hierarchy for everything that can go wrong talking to the plane.

Each error's message is what a user should read: the server's own reason, and what to do.
"""

from __future__ import annotations

from typing import Any


class EdgefleetError(Exception):
    """Anything the client cannot do; ``str(error)`` is the message for the user."""


class ConfigError(EdgefleetError):
    """No plane URL or token, or an unreadable config file."""


class Unreachable(EdgefleetError):
    """No answer from the plane: wrong URL, server down, network or TLS trouble."""


class ApiError(EdgefleetError):
    """The plane answered with an error status; ``reason`` is its own message."""

    def __init__(self, method: str, path: str, status: int, reason: str, body: Any = None) -> None:
        self.method = method
        self.path = path
        self.status = status
        self.reason = reason
        self.body = body
        super().__init__(self.message())

    def message(self) -> str:
        return f"{self.method} {self.path} failed ({self.status}): {self.reason}"


class AuthenticationFailed(ApiError):
    """401: no token, or one the plane does not know (revoked, or from another plane)."""

    def message(self) -> str:
        return (
            f"the plane refused the token ({self.status}: {self.reason}). "
            "Run `edgefleet login`, or set EDGEFLEET_TOKEN to a valid token."
        )


class PermissionDenied(ApiError):
    """403: the token's user lacks the permission."""

    def message(self) -> str:
        return f"{self.method} {self.path} is not allowed for this user ({self.status}): {self.reason}"


class NotFound(ApiError):
    """404."""

    def message(self) -> str:
        return f"not found: {self.method} {self.path} ({self.status}): {self.reason}"


class Conflict(ApiError):
    """409: the object's state does not allow the change (e.g. publishing a published version)."""


class ValidationFailed(ApiError):
    """400: the request was refused; ``reason`` lists each field's problem."""


class ServerError(ApiError):
    """5xx: the plane failed; retrying may help."""


_BY_STATUS: dict[int, type[ApiError]] = {
    400: ValidationFailed,
    401: AuthenticationFailed,
    403: PermissionDenied,
    404: NotFound,
    409: Conflict,
}


def api_error(method: str, path: str, status: int, body: Any) -> ApiError:
    """The exception for an error answer, with the server's reason flattened to one line."""
    kind = _BY_STATUS.get(status, ServerError if status >= 500 else ApiError)
    return kind(method, path, status, reason_of(body) or f"HTTP {status}", body)


def reason_of(body: Any, where: str = "") -> str:
    """DRF's error bodies as text: ``{"stages": [{}, {"percent": ["..."]}]}`` → ``stages 2, percent: ...``."""
    if isinstance(body, list):
        if any(isinstance(item, dict) for item in body):
            parts = [reason_of(item, f"{where} {index + 1}".strip()) for index, item in enumerate(body)]
        else:
            parts = [reason_of(item, where) for item in body]
        return "; ".join(part for part in parts if part)
    if isinstance(body, dict):
        parts = []
        for key, value in body.items():
            inner = where if key in ("non_field_errors", "detail") else (f"{where}, {key}" if where else str(key))
            parts.append(reason_of(value, inner))
        return "; ".join(part for part in parts if part)
    if body is None or body == "":
        return ""
    text = str(body).strip()[:500]
    return f"{where}: {text}" if where else text
