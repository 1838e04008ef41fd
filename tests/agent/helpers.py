"""Building agents for tests: config, fakes, and waiting for what they publish."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from agent.config import Config, HttpConfig, SecurityConfig, TransferConfig
from agent.contract import wire
from agent.core import Agent
from agent.runtime import Runner
from tests.agent.fakes import FakeClock, FakeLink, FakePlane

DEVICE = "dev-1"
T = TypeVar("T")


def make_config(data_dir: Path, **overrides: object) -> Config:
    fields: dict[str, object] = {
        "device_id": DEVICE,
        "name": "Lab box 1",
        "data_dir": str(data_dir),
        "heartbeat_interval": 30.0,
        "http": HttpConfig(port=0),
        "transfer": TransferConfig(window=4, stall_timeout=0.3, max_attempts=3),
        # Unsigned desired messages and files, so tests of everything else need no plane key;
        # tests/agent/test_signing.py covers the agent that requires them (the default).
        "security": SecurityConfig(allow_unsigned=True),
    }
    fields.update(overrides)
    return Config(**fields)  # type: ignore[arg-type]  # test overrides are checked by Config itself


def make_agent(data_dir: Path, link: FakeLink | None = None, **overrides: object) -> Agent:
    return Agent(make_config(data_dir, **overrides), link or FakeLink(), Runner(), FakeClock())


def wait_for(predicate: Callable[[], T | None], timeout: float = 5.0, what: str = "condition") -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"{what} not reached within {timeout}s")


def desired(deployment_id: int | None, files: list[wire.FileManifest], **fields: object) -> wire.Desired:
    return wire.Desired(
        device_id=DEVICE,
        deployment_id=deployment_id,
        model=str(fields.pop("model", "tiny")),
        version=str(fields.pop("version", "1.0.0")),
        files=files,
        issued_at=1_700_000_000.0,
        **fields,  # type: ignore[arg-type]  # inference=...
    )


def send_desired(link: FakeLink, message: wire.Desired) -> None:
    link.inject(wire.topic(message.device_id, wire.Channel.DESIRED), wire.encode(message))


def states(link: FakeLink, deployment_id: int) -> list[str]:
    return [r.state for r in link.sent(wire.Channel.STATE) if r.deployment_id == deployment_id]


def final_state(link: FakeLink, deployment_id: int, timeout: float = 10.0) -> wire.StateReport:
    def done() -> wire.StateReport | None:
        reports = [r for r in link.sent(wire.Channel.STATE) if r.deployment_id == deployment_id]
        return next((r for r in reports if r.state in ("active", "failed", "ineligible", "rolled_back")), None)

    return wait_for(done, timeout, what=f"deployment {deployment_id} to settle")


__all__ = ["FakePlane"]
