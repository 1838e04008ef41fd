"""Error reports (Django's debug 500 page) that never show a secret.

DEBUG is off by default, but the demo and a careless deployment turn it on, and its 500
page then lists every setting, the request's environment (under runserver, the whole
process environment: DATABASE_URL, MQTT_URL…) and each frame's local variables.
Three layers, so a secret that slips past one is caught by the next:

- settings and request variables whose names look secret are masked, URLs included,
  as a URL may carry a password;
- frame variables whose names look secret are masked even without
  ``@sensitive_variables``, and even with DEBUG on (Django masks them only with it off);
- finally the page's text is scrubbed of the value of every secret setting, wherever it
  shows: inside an object's repr, an exception's message or a URL.
"""

from __future__ import annotations

import html
import re
from urllib.parse import unquote, urlsplit

from django.conf import settings
from django.views.debug import ExceptionReporter, SafeExceptionReporterFilter

SUBSTITUTE = "********************"
# Django's list, plus names of settings and variables that hold or may embed a secret.
HIDDEN_NAMES = re.compile(
    r"API|AUTH|TOKEN|KEY|SECRET|PASS|SIGNATURE|HTTP_COOKIE|URL|BROKER|DATABASE|LOCATION|DSN|CREDENTIAL|SIGNED",
    flags=re.IGNORECASE,
)


def _url_password(url: str) -> str:
    try:
        password = urlsplit(url).password
    except ValueError:
        return ""
    return unquote(password) if password else ""


def secret_values() -> set[str]:
    """The value of every secret setting, as they would appear on a page."""
    found = {
        settings.SECRET_KEY,
        settings.SIGNING_KEY,
        settings.MQTT_PASSWORD,
        settings.MQTT_ADMIN_PASSWORD,
        getattr(settings.MQTT_BROKER, "password", None) or "",
    }
    for database in settings.DATABASES.values():
        found.add(database.get("PASSWORD") or "")
    for name in ("MQTT_URL", "MQTT_ADMIN_URL", "MQTT_DEVICE_URL", "REDIS_URL", "CACHE_URL", "CELERY_BROKER_URL"):
        found.add(_url_password(str(getattr(settings, name, "") or "")))
    # Too short a value would blank out ordinary text; no real secret is that short.
    return {value for value in found if isinstance(value, str) and len(value) >= 6}


def scrub(text: str) -> str:
    for value in sorted(secret_values(), key=len, reverse=True):
        for form in {value, html.escape(value), html.escape(value, quote=False)}:
            text = text.replace(form, SUBSTITUTE)
    return text


class SecretsFilter(SafeExceptionReporterFilter):
    """Masks secret-looking settings, request variables and frame variables, DEBUG on or off."""

    hidden_settings = HIDDEN_NAMES

    def is_active(self, request) -> bool:
        # Django's filter steps aside with DEBUG on, the very case in which the page is shown.
        return True

    def get_traceback_frame_variables(self, request, tb_frame):
        return [
            (name, SUBSTITUTE if isinstance(name, str) and HIDDEN_NAMES.search(name) else value)
            for name, value in super().get_traceback_frame_variables(request, tb_frame)
        ]


class SecretsReporter(ExceptionReporter):
    """Django's report, scrubbed of every secret setting's value as the last line of defence."""

    def get_traceback_html(self):
        return scrub(super().get_traceback_html())

    def get_traceback_text(self):
        return scrub(super().get_traceback_text())
