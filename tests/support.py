"""Real services for tests: a Mosquitto started from the shipped config, the cached model."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("EDGEFLEET_CACHE", Path.home() / ".cache" / "edgefleet"))
MINILM_DIR = CACHE / "models" / "minilm"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def broker_config(port: int, data_dir: Path) -> str:
    """docker/mosquitto/mosquitto.conf with the listener and data dir of this test run."""
    lines = []
    for line in (REPO / "docker" / "mosquitto" / "mosquitto.conf").read_text().splitlines():
        if line.startswith("listener "):
            line = f"listener {port} 127.0.0.1"
        elif line.startswith("persistence_location "):
            line = f"persistence_location {data_dir}/"
        lines.append(line)
    return "\n".join(lines) + "\n"


@contextmanager
def mosquitto(tmp: Path) -> Iterator[tuple[int, subprocess.Popen]]:
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    conf = tmp / "mosquitto.conf"
    conf.write_text(broker_config(port, tmp))
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port)
        yield port, proc
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def minilm_files() -> dict[str, Path]:
    files = {"model": MINILM_DIR / "model.int8.onnx", "tokenizer": MINILM_DIR / "tokenizer.json"}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{', '.join(missing)} missing: run `make models` first")
    return files


def wait_until(predicate, *, timeout: float, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what} not reached within {timeout}s")


REDIS_URL = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/15"


@contextmanager
def celery_on_redis(url: str = REDIS_URL) -> Iterator[object]:
    """Send this process's Celery tasks to Redis instead of running them inline."""
    from controlplane.celery import app

    saved = {key: app.conf[key] for key in ("broker_url", "task_always_eager")}
    app.conf.update(broker_url=url, task_always_eager=False)
    _reset_producers(app)
    try:
        app.control.purge()  # tasks an earlier run left behind would run against this test's database
        yield app
    finally:
        app.conf.update(saved)
        _reset_producers(app)


def _reset_producers(app) -> None:
    # Producers are pooled per broker URL at first use; an earlier test may have built them.
    app._pool = None
    app.amqp._producer_pool = None
