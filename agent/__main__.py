"""``python -m agent --config agent.toml`` (or ``edgefleet-agent``): run the device agent.

Exit codes: 0 after a clean stop, 2 for a bad config file or command line.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from agent import wire
from agent.clock import SystemClock
from agent.config import Config, ConfigError, load_config
from agent.core import Agent
from agent.logs import setup_logging
from agent.mqtt import LinkError, MqttLink, Will
from agent.runtime import Runner

log = logging.getLogger("agent")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_CONFIG = 2


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="edgefleet-agent", description="Run the Edgefleet device agent.")
    parser.add_argument("--config", required=True, type=Path, help="path to the agent's TOML config file")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser.parse_args(argv)


def build_link(config: Config) -> MqttLink:
    goodbye = wire.Presence(device_id=config.device_id, online=False, reason="lost")
    return MqttLink(
        config.broker,
        client_id=f"edgefleet-agent-{config.device_id}",
        will=Will(wire.topic(config.device_id, wire.Channel.PRESENCE), wire.encode(goodbye)),
        tls=config.tls,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level)
    try:
        config = load_config(args.config)
        config.data_path.mkdir(parents=True, exist_ok=True)
    except ConfigError as exc:
        log.error("agent.bad_config error=%r", str(exc))
        return EXIT_BAD_CONFIG
    except OSError as exc:
        log.error("agent.bad_config error=%r", f"data_dir: cannot create {exc.filename}: {exc.strerror}")
        return EXIT_BAD_CONFIG
    return run(config)


def run(config: Config) -> int:
    stop = threading.Event()
    _on_signals(stop)
    try:
        agent = Agent(config, build_link(config), Runner(), SystemClock())
        agent.start()
    except (LinkError, OSError) as exc:
        log.error("agent.start_failed error=%r", str(exc))
        return EXIT_FAILED
    stop.wait()
    agent.stop("shutdown")
    return EXIT_OK


def _on_signals(stop: threading.Event) -> None:
    def handle(signum: int, frame: FrameType | None) -> None:
        log.info("agent.signal signal=%s", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)


if __name__ == "__main__":
    sys.exit(main())
