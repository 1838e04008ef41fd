"""Where the CLI finds its plane and token: flags, then EDGEFLEET_URL/EDGEFLEET_TOKEN, then a profile.

Profiles live in ``~/.config/edgefleet/config.toml`` (``$XDG_CONFIG_HOME`` moves it;
``EDGEFLEET_CONFIG`` names the file itself)::

    default_profile = "prod"

    [profiles.prod]
    url = "https://fleet.example.com"
    token = "..."
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from edgefleet_client.errors import ConfigError


@dataclass(frozen=True)
class Target:
    """The plane to talk to, and how the CLI learnt of it (for error messages)."""

    url: str
    token: str | None
    profile: str
    source: str


def config_path() -> Path:
    if named := os.environ.get("EDGEFLEET_CONFIG"):
        return Path(named)
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "edgefleet" / "config.toml"


def read_config(path: Path | None = None) -> dict[str, Any]:
    path = path or config_path()
    if not path.exists():
        return {}
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}. Fix it, or delete it and run `edgefleet login` again.") from None


def resolve(url: str | None, token: str | None, profile: str | None, *, new_profile: bool = False) -> Target:
    """Flags win over the environment, which wins over the profile's settings.

    A profile named but not saved is an error, unless ``new_profile`` (``login`` creates it).
    """
    config = read_config()
    name = profile or os.environ.get("EDGEFLEET_PROFILE") or config.get("default_profile") or "default"
    profiles = config.get("profiles", {})
    if profile and profile not in profiles and not new_profile:
        raise ConfigError(f"no profile '{profile}' in {config_path()}: run `edgefleet login --profile {profile}`")
    saved = profiles.get(name, {})
    found_url = url or os.environ.get("EDGEFLEET_URL") or saved.get("url")
    found_token = token or os.environ.get("EDGEFLEET_TOKEN") or saved.get("token")
    if not found_url:
        raise ConfigError(
            "no plane to talk to: pass --url, set EDGEFLEET_URL, or run `edgefleet login --url URL` to save a profile"
        )
    source = "--url" if url else "EDGEFLEET_URL" if os.environ.get("EDGEFLEET_URL") else f"profile '{name}'"
    return Target(url=str(found_url), token=found_token, profile=name, source=source)


def save_profile(name: str, url: str, token: str, *, make_default: bool = False) -> Path:
    """Store a profile's URL and token; the file is readable by its owner only."""
    path = config_path()
    config = read_config(path)
    config.setdefault("profiles", {})[name] = {"url": url, "token": token}
    if make_default or "default_profile" not in config:
        config["default_profile"] = name
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        tomli_w.dump(config, file)
    os.chmod(path, 0o600)
    return path
