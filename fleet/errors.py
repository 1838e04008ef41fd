"""The one hierarchy of domain errors, and what each means to an API client.

A service that refuses a change raises a ``ServiceError`` whose text says why, and what to
do, in words safe to show the caller. ``status`` is the HTTP status the API answers with
(``fleet/api/exceptions.py`` maps every ServiceError, once); the admin shows the text as
an error message (``fleet/admin/base.py``, once). Framework-free: no Django import here.
"""

from __future__ import annotations


class ServiceError(Exception):
    """A change the current state does not allow: 409 Conflict unless a subclass says otherwise."""

    status = 409
    # The request field the error is about, if any: the API answers {field: [text]}.
    field: str | None = None


class NotFound(ServiceError):
    status = 404


class Invalid(ServiceError):
    """What the caller sent cannot be used as it is."""

    status = 400


class Forbidden(ServiceError):
    status = 403


class TooLarge(ServiceError, ValueError):
    status = 413


class Unavailable(ServiceError):
    """A service the plane depends on (the broker, say) did not answer; trying again may work."""

    status = 503
