"""The agent's footprint: idle RSS, RSS with MiniLM loaded, and what its local HTTP path adds.

    .venv/bin/python -m bench.agent_footprint [--requests 400]

One run, one broker of its own. It starts the real agent (``python -m agent``) twice:
with no model, then with the cached int8 MiniLM installed in its slot, and reads
each process's RSS once it has said hello and sent heartbeats. Then, side by side
and interleaved call by call, it times the same sentence three ways:

- ``session.run`` on pre-tokenized inputs, in this process (the reference);
- ``LoadedModel.embed``: tokenize, run, pool, normalise, in this process;
- ``POST /v1/infer`` to the agent's InferenceServer serving that same session in
  this process, over a kept-alive connection;
- ``POST /v1/infer`` to the running agent process (its own session);
- ``GET /v1/health`` to the running agent: the HTTP round trip with no inference.

The HTTP path's cost is p50(HTTP, same session) - p50(session.run).
Prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import psutil

from agent import status
from agent.active import ActiveDeployment
from agent.contract import manifest, wire
from agent.runtime import ModelInfo, Runner, load_model
from agent.server import InferenceServer
from agent.slots import Slots, save_slots
from agent.telemetry import LatencyRecorder
from tests import support

SPEC = wire.InferenceSpec(task="embedding", pooling="mean", normalize=True)
TEXT = "A man is eating a piece of bread."
MIB = 1024 * 1024


def start_agent(tmp: Path, name: str, port: int) -> tuple[subprocess.Popen[bytes], Path]:
    data_dir = tmp / name
    data_dir.mkdir(exist_ok=True)
    config = tmp / f"{name}.toml"
    config.write_text(
        f'device_id = "{name}"\nbroker_url = "mqtt://127.0.0.1:{port}"\ndata_dir = "{data_dir}"\n'
        "heartbeat_interval = 0.5\n[http]\nport = 0\n"
    )
    log = (tmp / f"{name}.log").open("wb")
    agent = subprocess.Popen([sys.executable, "-m", "agent", "--config", str(config)], stderr=log)
    return agent, data_dir


def settled_rss(agent: subprocess.Popen[bytes], data_dir: Path, *, model: bool) -> int:
    """RSS once the agent runs (a status with its pid), has said hello and sent a few heartbeats."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            snapshot = status.load(data_dir)
            if snapshot.pid == agent.pid and snapshot.connected and (snapshot.current is not None) == model:
                break
        except (OSError, msgspec.DecodeError):
            pass
        time.sleep(0.1)
    else:
        raise RuntimeError(f"agent in {data_dir} did not come up; see its log")
    time.sleep(3.0)
    return int(psutil.Process(agent.pid).memory_info().rss)


def install_minilm(data_dir: Path, model: Path, tokenizer: Path) -> None:
    """Put MiniLM in slot a, healthy, as a finished deployment would have left it."""
    (data_dir / "artifacts").mkdir(parents=True, exist_ok=True)
    shas = {}
    for path in (model, tokenizer):
        sha = manifest.file_sha256(path)
        shutil.copyfile(path, data_dir / "artifacts" / sha)
        shas[path] = sha
    active = ActiveDeployment(
        deployment_id=1,
        sha256=shas[model],
        tokenizer_sha256=shas[tokenizer],
        inference=SPEC,
        model="minilm",
        version="int8",
    )
    save_slots(data_dir, Slots(a=active, current="a", healthy=True))


def p50(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400)
    args = parser.parse_args()
    files = support.minilm_files()
    with tempfile.TemporaryDirectory() as tmp_name, support.broker(Path(tmp_name) / "broker") as mosquitto:
        tmp = Path(tmp_name)
        idle, idle_dir = start_agent(tmp, "idle", mosquitto.port)
        try:
            idle_rss = settled_rss(idle, idle_dir, model=False)
        finally:
            idle.terminate()
            idle.wait(10)

        loaded_dir = tmp / "minilm"
        install_minilm(loaded_dir, files["model"], files["tokenizer"])
        agent, _ = start_agent(tmp, "minilm", mosquitto.port)
        try:
            loaded_rss = settled_rss(agent, loaded_dir, model=True)
            port = int((loaded_dir / "http.port").read_text())
            timings = side_by_side(files, port, args.requests)
            after_rss = int(psutil.Process(agent.pid).memory_info().rss)
        finally:
            agent.terminate()
            agent.wait(10)
    report(idle_rss, loaded_rss, after_rss, timings, args.requests)


def side_by_side(files: dict[str, Path], port: int, requests: int) -> dict[str, list[float]]:
    info = ModelInfo(deployment_id=0, sha256="0" * 64)
    model = load_model(files["model"], spec=SPEC, info=info, tokenizer_path=files["tokenizer"])
    feed = model._encode([TEXT])  # the exact inputs embed() builds, tokenized once, outside the timing
    runner = Runner()
    runner.install(model)
    server = InferenceServer(runner, LatencyRecorder(), port=0)
    server.start()
    local = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    remote = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    body = json.dumps({"text": TEXT}).encode()

    def call(connection: http.client.HTTPConnection, method: str, path: str, data: bytes | None) -> None:
        connection.request(method, path, body=data, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200, response.read()
        response.read()

    ways: dict[str, Callable[[], object]] = {
        "session.run": lambda: model.session.run(model.output_names[:1], feed),
        "embed": lambda: model.embed([TEXT]),
        "http": lambda: call(local, "POST", "/v1/infer", body),
        "agent": lambda: call(remote, "POST", "/v1/infer", body),
        "health": lambda: call(remote, "GET", "/v1/health", None),
    }
    timings: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(20):  # warm up every path
        for way in ways.values():
            way()
    for _ in range(requests):
        for name, way in ways.items():
            started = time.perf_counter()
            way()
            timings[name].append(time.perf_counter() - started)
    local.close()
    remote.close()
    server.stop()
    return timings


def report(idle_rss: int, loaded_rss: int, after_rss: int, timings: dict[str, list[float]], requests: int) -> None:
    run, embed, local = p50(timings["session.run"]), p50(timings["embed"]), p50(timings["http"])
    agent, health = p50(timings["agent"]), p50(timings["health"])
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, {requests} calls each")
    print()
    print("| measure | value |")
    print("|---|---|")
    print(f"| idle RSS, no model (target <= 60 MB) | {idle_rss / MIB:.1f} MiB |")
    after = f"after {requests} requests: {after_rss / MIB:.1f}"
    print(f"| RSS with int8 MiniLM loaded | {loaded_rss / MIB:.1f} MiB ({after}) |")
    print(f"| p50 `session.run`, pre-tokenized (reference) | {run:.3f} ms |")
    print(f"| p50 `LoadedModel.embed` (tokenize + run + pool + normalise) | {embed:.3f} ms |")
    print(f"| p50 `POST /v1/infer`, agent's server on that same session | {local:.3f} ms |")
    print(f"| **HTTP path adds over session.run** (target <= 1 ms) | **{local - run:.3f} ms** |")
    print(f"| of which the server and HTTP (p50 HTTP - p50 embed) | {local - embed:.3f} ms |")
    print(f"| p50 `POST /v1/infer` to the agent process | {agent:.3f} ms |")
    print(f"| p50 `GET /v1/health` to the agent process (round trip, no inference) | {health:.3f} ms |")


if __name__ == "__main__":
    main()
