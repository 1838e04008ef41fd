"""``edgefleet-agent [run|status] --config agent.toml`` (or ``python -m agent``).

``run`` (the default) runs the device agent; ``status`` prints what a running agent
is doing: slot versions, a download's progress, the outbox's depth.

Exit codes: 0 after a clean stop (or a status shown), 1 when the agent cannot
start or has never written a status, 2 for a bad config file or command line.
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

import msgspec

from agent import enrollment, status
from agent.clock import SystemClock
from agent.config import Config, ConfigError, load_config
from agent.contract import wire
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
    parser.add_argument(
        "command",
        nargs="?",
        default="run",
        choices=["run", "status"],
        help="run the agent (default), or show what the running agent is doing",
    )
    parser.add_argument("--json", action="store_true", help="status: print the raw status.json")
    parser.add_argument("--config", required=True, type=Path, help="path to the agent's TOML config file")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser.parse_args(argv)


def build_link(config: Config, broker: wire.BrokerUrl | None = None) -> MqttLink:
    goodbye = wire.Presence(device_id=config.device_id, online=False, reason="lost")
    return MqttLink(
        broker or config.broker,
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
    if args.command == "status":
        return show_status(config, as_json=args.json)
    return run(config)


def show_status(config: Config, *, as_json: bool) -> int:
    try:
        snapshot = status.load(config.data_path)
    except OSError:
        print(f"no status in {config.data_path}: the agent has not run with this config yet", file=sys.stderr)
        return EXIT_FAILED
    except msgspec.DecodeError as exc:
        print(f"{config.data_path / status.FILENAME} is damaged ({exc}); it is rewritten every second", file=sys.stderr)
        return EXIT_FAILED
    print(msgspec.json.encode(snapshot).decode() if as_json else status.describe(snapshot))
    return EXIT_OK


def run(config: Config) -> int:
    stop = threading.Event()
    _on_signals(stop)
    broker = config.broker
    if config.enrollment.plane_url:
        try:
            credentials = enrollment.enroll(
                plane_url=config.enrollment.plane_url,
                token=config.enrollment.secret(),
                device_id=config.device_id,
                name=config.name,
                data_path=config.data_path,
                stop=stop,
                poll_interval=config.enrollment.poll_interval,
                allow_insecure=config.enrollment.allow_insecure,
            )
            if credentials is None:
                return EXIT_OK
            broker = enrollment.broker_with(
                broker,
                credentials,
                allowed_hosts=config.broker_hosts,
                allow_insecure=config.enrollment.allow_insecure,
            )
        except (enrollment.EnrollmentError, OSError) as exc:
            log.error("agent.enrollment_failed error=%r", str(exc))
            return EXIT_FAILED
    try:
        agent = Agent(config, build_link(config, broker), Runner(), SystemClock())
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
