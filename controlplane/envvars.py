"""Small typed readers for settings from the environment.

A bad value raises ImproperlyConfigured naming the variable, so a typo in a
deployment fails at start-up with a message that says what to fix.
"""

import os
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def env_str(name: str, default: str) -> str:
    return os.environ.get(name, default)


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ImproperlyConfigured(f"{name}={raw!r} is not a boolean: use true or false")


def env_int(name: str, default: int, *, minimum: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={raw!r} is not a whole number") from None
    if minimum is not None and value < minimum:
        raise ImproperlyConfigured(f"{name}={value} must be at least {minimum}")
    return value


def env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    value = os.environ.get(name, default).strip()
    if value not in choices:
        raise ImproperlyConfigured(f"{name}={value!r} is not one of {', '.join(choices)}")
    return value


def env_list(name: str, default: list[str]) -> list[str]:
    raw = os.environ.get(name)
    if raw is None:
        return default
    return [item.strip() for item in raw.split(",") if item.strip()]


def env_urls(name: str) -> list[str]:
    """A comma-separated list of http(s) URLs; empty when unset."""
    urls = env_list(name, [])
    for url in urls:
        if not url.startswith(("http://", "https://")):
            raise ImproperlyConfigured(f"{name}: {url!r} is not an http:// or https:// URL")
    return urls


def env_secret(name: str, default: str | None = None) -> str:
    """Read ``NAME``, or the file that ``NAME_FILE`` points to (Docker and k8s secrets)."""
    path = os.environ.get(f"{name}_FILE")
    if path:
        try:
            return Path(path).read_text().strip()
        except OSError as exc:
            raise ImproperlyConfigured(f"{name}_FILE={path!r} cannot be read: {exc.strerror}") from None
    value = os.environ.get(name, default)
    if value is None:
        raise ImproperlyConfigured(f"{name} (or {name}_FILE) must be set")
    return value
