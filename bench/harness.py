"""What every benchmark stands on: its own broker, its own database, the plane's processes.

Everything listens on and talks to 127.0.0.1 only. The broker is started from
docker/mosquitto/mosquitto.conf (what ships), with its file-descriptor limit
raised so it can hold ten thousand connections, and logs to a file: a pipe
nobody reads would fill and stall it.
"""

from __future__ import annotations

import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.support import REPO, broker_config, free_port, wait_for_port

FD_LIMIT = 65_536
DEFAULT_ADMIN_URL = "postgres://postgres:postgres@127.0.0.1:5432/postgres"


def raise_fd_limit(limit: int = FD_LIMIT) -> int:
    """Raise this process's open-file limit as far as the hard limit allows; return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = limit if hard == resource.RLIM_INFINITY else min(limit, hard)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return soft
        return target
    return soft


@dataclass
class Broker:
    port: int
    proc: subprocess.Popen
    log: Path

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def fd_limit(self) -> str:
        for line in Path(f"/proc/{self.proc.pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                return line.split()[3]
        return "?"


@contextmanager
def broker(workdir: Path, config: Callable[[int, Path], str] = broker_config) -> Iterator[Broker]:
    """Our own Mosquitto from a shipped config, on a free loopback port, with a raised fd limit.

    ``config`` writes the configuration for a port and a data directory: by default
    docker/mosquitto/mosquitto.conf's (tests.support.broker_config).
    """
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "mosquitto.conf"
    # Persistence writes every retained message to disk at shutdown; the benches need none of it.
    conf.write_text(config(port, workdir).replace("persistence true", "persistence false"))
    log = workdir / "mosquitto.log"
    with log.open("w") as out:
        proc = subprocess.Popen([binary, "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=raise_fd_limit)  # fmt: skip
    try:
        wait_for_port(port)
        yield Broker(port, proc, log)
    finally:
        stop_process(proc)


def stop_process(proc: subprocess.Popen, timeout: float = 20) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    return proc.returncode


# --- the database ----------------------------------------------------------------


def database_url(name: str) -> str:
    admin = os.environ.get("BENCH_ADMIN_DATABASE_URL", DEFAULT_ADMIN_URL)
    return admin.rsplit("/", 1)[0] + "/" + name


@contextmanager
def database(name: str = "edgefleet_bench") -> Iterator[str]:
    """A fresh PostgreSQL database with the plane's schema; dropped afterwards."""
    import psycopg

    admin = os.environ.get("BENCH_ADMIN_DATABASE_URL", DEFAULT_ADMIN_URL)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    url = database_url(name)
    subprocess.run([sys.executable, "manage.py", "migrate", "-v", "0"], cwd=REPO, env=plane_env(url, ""),
                   check=True)  # fmt: skip
    try:
        yield url
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def plane_env(database_url: str, broker_url: str, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "controlplane.settings",
        "DATABASE_URL": database_url,
        "REDIS_URL": os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14"),
        "DEBUG": "0",
        "SECRET_KEY": "bench-only-not-a-secret-" + "x" * 40,
        **extra,
    }
    if broker_url:
        env["MQTT_URL"] = broker_url
    return env


class PlaneProcess:
    """A plane process (bridge, worker, web server) with its output in a log file."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], workdir: Path) -> None:
        self.name = name
        self.log = workdir / f"{name}.log"
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         preexec_fn=raise_fd_limit)  # fmt: skip

    def stop(self) -> int | None:
        return stop_process(self.proc)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def bridges(count: int, env: dict[str, str], workdir: Path, *, names: Sequence[str] = ()) -> list[PlaneProcess]:
    """``count`` run_bridge processes; with ``names``, one per name (``--name``: a persistent session)."""
    cmd = [sys.executable, "manage.py", "run_bridge", "--stats-every", "5"]
    if names:
        return [PlaneProcess(f"bridge-{name}", [*cmd, "--name", name], env, workdir) for name in names]
    return [PlaneProcess(f"bridge-{n}", cmd, env, workdir) for n in range(count)]


def worker(env: dict[str, str], workdir: Path) -> PlaneProcess:
    cmd = [sys.executable, "-m", "celery", "-A", "controlplane", "worker", "--pool", "solo", "-l", "info"]
    return PlaneProcess("worker", cmd, env, workdir)


def wait_for_log(process: PlaneProcess, text: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in process.output():
            return
        if process.proc.poll() is not None:
            raise RuntimeError(f"{process.name} exited:\n{process.output()[-3000:]}")
        time.sleep(0.1)
    raise TimeoutError(f"{process.name} did not log {text!r} in {timeout}s:\n{process.output()[-3000:]}")


# --- the machine --------------------------------------------------------------------


def machine() -> str:
    """CPU model, cores, RAM and OS, for the report's header."""
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {ram:.0f} GiB RAM, {platform.system()} {platform.release()}"


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())
