"""Real services for tests: a Mosquitto started from the shipped config, the cached model."""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
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
    return "\n".join(lines) + _run_as_me()


def _run_as_me() -> str:
    # Started as root, Mosquitto drops to user "mosquitto", which cannot read a test's private tmp dir.
    return f"\nuser {getpass.getuser()}\n"


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


DYNSEC_PLUGIN = Path("/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so")


def secure_broker_config(port: int, data_dir: Path) -> str:
    """docker/mosquitto/secure.conf for this machine and this test run."""
    replacements = {
        "listener ": f"listener {port} 127.0.0.1",
        "plugin ": f"plugin {DYNSEC_PLUGIN}",
        "plugin_opt_config_file ": f"plugin_opt_config_file {data_dir}/dynamic-security.json",
        "persistence_location ": f"persistence_location {data_dir}/",
    }
    lines = []
    for line in (REPO / "docker" / "mosquitto" / "secure.conf").read_text().splitlines():
        for prefix, replacement in replacements.items():
            if line.startswith(prefix):
                line = replacement
        lines.append(line)
    return "\n".join(lines) + _run_as_me()


@contextmanager
def secure_mosquitto(tmp: Path, admin_password: str) -> Iterator[int]:
    """A Mosquitto with the dynamic-security plugin, anonymous access off, and an ``admin`` login."""
    subprocess.run(
        ["mosquitto_ctrl", "dynsec", "init", str(tmp / "dynamic-security.json"), "admin", admin_password],
        check=True,
        capture_output=True,
    )
    with broker(tmp, config=secure_broker_config) as running:
        yield running.port


class Broker:
    """A Mosquitto of a test's own on a free port, which it can stop and start again (same persistence).

    ``config`` writes the configuration for a port and data directory; by default the
    shipped docker/mosquitto/mosquitto.conf. The broker logs to ``mosquitto.log`` there,
    never to a pipe nobody reads, which would block it once full.
    """

    def __init__(self, tmp: Path, config: Callable[[int, Path], str] = broker_config) -> None:
        self.binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        tmp.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.conf = tmp / "mosquitto.conf"
        self.conf.write_text(config(self.port, tmp))
        self.log = tmp / "mosquitto.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT)
        wait_for_port(self.port)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None

    def restart(self, down_for: float = 0.0) -> None:
        self.stop()
        time.sleep(down_for)
        self.start()


@contextmanager
def broker(tmp: Path, config: Callable[[int, Path], str] = broker_config) -> Iterator[Broker]:
    running = Broker(tmp, config)
    running.start()
    try:
        yield running
    finally:
        running.stop()


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target; ``cut`` drops every connection and refuses new ones until ``mend``.

    A network outage for one client (the agent) while others (a watcher) stay connected.
    ``delivered`` counts the bytes the target sent to clients: what a client was served, as a
    user would measure it on the wire.
    """

    def __init__(self, target_port: int) -> None:
        import threading

        self.target_port = target_port
        self.port = free_port()
        self._up = threading.Event()
        self._up.set()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._server = socket.create_server(("127.0.0.1", self.port))
        self._server.settimeout(0.1)
        self._closing = False
        self.delivered = 0
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def cut(self) -> None:
        self._up.clear()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def mend(self) -> None:
        self._up.set()

    def close(self) -> None:
        self._closing = True
        self.cut()
        self._thread.join(2)
        self._server.close()

    def _accept(self) -> None:
        import threading

        while not self._closing:
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if not self._up.is_set():
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._sockets += [client, upstream]
            for source, sink, counted in ((client, upstream, False), (upstream, client, True)):
                threading.Thread(target=self._pipe, args=(source, sink, counted), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, counted: bool) -> None:
        try:
            while block := source.recv(65536):
                sink.sendall(block)
                if counted:
                    with self._lock:
                        self.delivered += len(block)
        except OSError:
            pass
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
