"""`make demo`: the whole product on one machine, with a real model.

It uses the machine's PostgreSQL, Redis and Mosquitto where they answer on
127.0.0.1, and embedded stand-ins where they do not (SQLite, eager Celery, an
in-process MQTT broker). Then it does what an operator and an API client would:
registers all-MiniLM-L6-v2, publishes it, assigns it to the demo device, asks the
device's agent for embeddings, and waits for the agent's heartbeat in the plane.
Then the same for a small language model on a second device: SmolLM2-135M-Instruct's
GGUF is uploaded, converted into an onnxruntime-genai bundle (the lossless `repack`
variant), evaluated, published and deployed; its agent answers "What is the capital of
France?" through the OpenAI-compatible /v1/chat/completions, and its heartbeat carries
time to first token and decode tok/s.

    python scripts/demo.py            # keeps running until Ctrl-C
    python scripts/demo.py --once     # runs the scenario, stops everything, exits 0 on success
    python scripts/demo.py --embedded # ignores the machine's services
    python scripts/demo.py --no-slm   # MiniLM only (skips the SmolLM2 conversion, about a minute)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from edgefleet_client import Client, EdgefleetError, NotFound  # noqa: E402

from scripts.embedded_broker import EmbeddedBroker  # noqa: E402

CACHE = Path(os.environ.get("EDGEFLEET_CACHE", Path.home() / ".cache" / "edgefleet"))
MODEL_DIR = CACHE / "models" / "minilm"
SLM_GGUF = CACHE / "models" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
SLM_MODEL = "smollm2"
# The variant to ship: the GGUF's Q4_1 weights repacked without loss (docs/models.md).
SLM_VARIANT = "repack"
# Greedy answers flip on near-ties; a short-answer system message keeps this one on "Paris".
QUESTION = [
    {"role": "system", "content": "You are a helpful assistant. Answer in one short sentence."},
    {"role": "user", "content": "What is the capital of France?"},
]
PYTHON = sys.executable
SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.", "The new movie is awful."]


class DemoFailed(Exception):
    pass


def say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, *, timeout: float, what: str, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise DemoFailed(f"{what} did not happen within {timeout:.0f}s")


# --- Services ---------------------------------------------------------------------


def postgres_database(name: str) -> str | None:
    """A DATABASE_URL for ``name`` on the local PostgreSQL, creating it if needed; None if unreachable."""
    if not port_open(5432):
        return None
    import psycopg

    try:
        with psycopg.connect("postgresql://postgres:postgres@127.0.0.1:5432/postgres", autocommit=True) as conn:
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone():
                conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.Error as exc:
        say(f"PostgreSQL answers but refused us ({exc.__class__.__name__}); using SQLite")
        return None
    return f"postgres://postgres:postgres@127.0.0.1:5432/{name}"


@dataclass
class Services:
    env: dict[str, str]
    broker: EmbeddedBroker | None = None
    summary: list[str] = field(default_factory=list)


def choose_services(args: argparse.Namespace, var: Path) -> Services:
    env = {
        "DEBUG": "true",
        "EDGEFLEET_VAR_DIR": str(var),
        "ARTIFACT_ROOT": str(var / "artifacts"),
        "PYTHONUNBUFFERED": "1",
    }
    services = Services(env)
    db = None if args.embedded else postgres_database(args.db_name)
    env["DATABASE_URL"] = db or f"sqlite:///{var / 'edgefleet.sqlite3'}"
    services.summary.append(f"database: {'PostgreSQL ' + args.db_name if db else 'SQLite (embedded)'}")
    redis = not args.embedded and port_open(6379)
    env["REDIS_URL"] = args.redis_url if redis else ""
    services.summary.append("celery: " + ("Redis with a worker" if redis else "eager, in-process (embedded)"))
    if not args.embedded and port_open(1883):
        env["MQTT_URL"] = "mqtt://127.0.0.1:1883"
        services.summary.append("mqtt: Mosquitto on 127.0.0.1:1883")
    else:
        services.broker = EmbeddedBroker(free_port())
        services.broker.start()
        env["MQTT_URL"] = services.broker.url
        services.summary.append(f"mqtt: in-process broker on 127.0.0.1:{services.broker.port} (embedded)")
    return services


# --- Processes ----------------------------------------------------------------------


class Processes:
    """Every process the demo starts, each logging to var/logs/<name>.log."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = {**os.environ, **env}
        self.logs = logs
        self.procs: dict[str, subprocess.Popen] = {}
        logs.mkdir(parents=True, exist_ok=True)

    def run(self, name: str, *cmd: str) -> None:
        result = subprocess.run(cmd, cwd=REPO, env=self.env, capture_output=True, text=True)
        if result.returncode != 0:
            raise DemoFailed(f"{name} failed:\n{result.stdout}{result.stderr}")

    def start(self, name: str, *cmd: str) -> None:
        log = (self.logs / f"{name}.log").open("w")
        self.procs[name] = subprocess.Popen(
            cmd, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def check(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise DemoFailed(f"{name} exited with {proc.returncode}; see {self.logs / name}.log")

    def tail(self, name: str, lines: int = 20) -> str:
        path = self.logs / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for name, proc in self.procs.items():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                say(f"{name} did not stop on SIGTERM; killing it")
                os.killpg(proc.pid, signal.SIGKILL)


# --- The scenario ---------------------------------------------------------------------


def register_model(api: Client) -> dict:
    """What an API client does to release a model: model, version, files, publish."""
    if not api.list_models(name="minilm-embedder"):
        api.create_model("minilm-embedder", "all-MiniLM-L6-v2 sentence embeddings")
    version = api.create_version(
        "minilm-embedder",
        notes="all-MiniLM-L6-v2, int8 ONNX, registered by make demo",
        task="embedding",
        pooling="mean",
        normalize=True,
        max_length=256,
    )
    say(f"created version {version['label']}; uploading the int8 ONNX model (22 MB) and its tokenizer")
    uploads = [
        ({"role": "model", "precision": "int8", "hardware_class": "any"}, MODEL_DIR / "model.int8.onnx"),
        ({"role": "tokenizer", "format": "tokenizer.json"}, MODEL_DIR / "tokenizer.json"),
    ]
    for fields, path in uploads:
        artifact = api.wait_artifact(api.upload_artifact(version["id"], path, **fields)["id"], timeout=120)
        say(f"  {path.name}: {artifact['size']:,} bytes, sha256 {artifact['sha256'][:16]}…, ready")
    return api.publish_version(version["id"])


def deploy(api: Client, version: dict, device_id: str, *, timeout: float = 180) -> dict:
    result = api.assign_version(version["id"], devices=[device_id])
    if result["skipped"]:
        raise DemoFailed(f"assignment skipped: {result['skipped']}")
    deployment_id = result["deployments"][0]["id"]
    say(f"assigned {version['label']} to {device_id} (deployment {deployment_id}); the agent pulls it over MQTT")
    last = [""]

    def active():
        deployment = api.get_deployment(deployment_id)
        if deployment["state"] != last[0]:
            say(f"  deployment {deployment_id}: {deployment['state']}")
            last[0] = deployment["state"]
        if deployment["state"] == "failed":
            raise DemoFailed(f"deployment failed: {deployment['error']}")
        return deployment if deployment["state"] == "active" else None

    return wait_until(active, timeout=timeout, what="the deployment becoming active", interval=0.5)


def infer(agent_port: int) -> None:
    body = json.dumps({"texts": SENTENCES}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{agent_port}/v1/infer", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        answer = json.loads(response.read())
    vectors = answer["embeddings"]
    cosine = [sum(a * b for a, b in zip(vectors[0], v, strict=True)) for v in vectors[1:]]
    dims, ms = len(vectors[0]), answer["latency_ms"]
    say(f"the agent answered: {len(vectors)} embeddings of {dims} dimensions in {ms:.1f} ms")
    say(f"  cosine({SENTENCES[0]!r}, {SENTENCES[1]!r}) = {cosine[0]:.3f}")
    say(f"  cosine({SENTENCES[0]!r}, {SENTENCES[2]!r}) = {cosine[1]:.3f}")
    if not cosine[0] > cosine[1]:
        raise DemoFailed("the embeddings do not rank the similar sentence first")


def heartbeat_with_latency(api: Client, device_id: str) -> dict:
    def found():
        beats = api.list_heartbeats(device=device_id, limit=20)
        return next((b for b in beats if b["latency_count"]), None)

    beat = wait_until(found, timeout=60, what="a heartbeat with inference latency")
    say(
        f"heartbeat #{beat['seq']} stored in the plane: {beat['requests']} requests, "
        f"p50 {beat['p50_ms']:.1f} ms, p95 {beat['p95_ms']:.1f} ms, p99 {beat['p99_ms']:.1f} ms"
    )
    return beat


def register_slm(api: Client, slow_api: Client, procs: Processes) -> dict:
    """What an API client does to release a GGUF: a generate version, the GGUF as its source,
    the pipeline that converts and evaluates the variant to ship, then publish."""
    if not api.list_models(name=SLM_MODEL):
        api.create_model(SLM_MODEL, "SmolLM2-135M-Instruct, a small language model from a GGUF")
    version = api.create_version(
        SLM_MODEL,
        notes=f"{SLM_GGUF.name}, registered by make demo",
        task="generate",
        max_length=2048,
        quality_threshold=0.9,
    )
    size_mb = SLM_GGUF.stat().st_size / 1e6
    say(f"created version {version['label']}; uploading {SLM_GGUF.name} ({size_mb:.0f} MB) as its source")
    artifact = api.upload_artifact(version["id"], SLM_GGUF, role="source", format="gguf")
    artifact = api.wait_artifact(artifact["id"], timeout=300)
    say(f"  {SLM_GGUF.name}: {artifact['size']:,} bytes, sha256 {artifact['sha256'][:16]}…, ready")
    say(f"converting it without torch into onnxruntime-genai bundles: the fp32 reference, then {SLM_VARIANT!r}")
    # With eager Celery (--embedded) the request itself runs the pipeline: call it aside and
    # follow the pipeline's steps from here either way.
    started: dict = {}

    def optimize() -> None:
        try:
            started["pipeline"] = slow_api.optimize_version(version["id"], variants=[SLM_VARIANT])
        except Exception as exc:  # noqa: BLE001 - shown below, in the main thread
            started["error"] = exc

    caller = threading.Thread(target=optimize, name="optimize", daemon=True)
    caller.start()
    pipeline = follow_pipeline(api, version["id"], caller, started, procs)
    if pipeline["state"] != "succeeded":
        raise DemoFailed(f"the conversion pipeline {pipeline['state']}: {pipeline.get('error') or pipeline}")
    version = api.get_version(version["id"])
    artifacts = version["artifacts"]
    for brief in (a for a in artifacts if a["role"] == "model"):
        found = api.get(f"/artifacts/{brief['id']}/")
        evaluation = found.get("evaluation") or {}
        variant = (found.get("recipe") or {}).get("parameters", {}).get("variant", found["precision"])
        size = found["size"] + sum(a["size"] for a in artifacts if a["part_of"] == found["id"])
        say(
            f"  {variant} ({found['quality']}): {size / 1e6:.0f} MB, "
            f"token agreement {fmt(evaluation.get('token_agreement'), '.1%')}, "
            f"perplexity {fmt(evaluation.get('perplexity'), '.2f')}, "
            f"{fmt(evaluation.get('decode_tokens_per_s'), '.1f')} tok/s as the plane measured it"
        )
    return api.publish_version(version["id"])


def fmt(value, spec: str) -> str:
    return "?" if value is None else format(value, spec)


def follow_pipeline(api: Client, version_id: int, caller: threading.Thread, started: dict, procs: Processes) -> dict:
    """Print each step's progress as it changes until the pipeline ends."""
    shown: dict[str, str] = {}
    deadline = time.monotonic() + 1200
    while time.monotonic() < deadline:
        procs.check()  # a worker that died would leave the pipeline running forever
        if "error" in started:
            raise DemoFailed(f"optimize was refused: {started['error']}")
        found = api.get("/pipelines/", version=version_id)["results"]
        if found:
            pipeline = found[0]
            for step in pipeline["steps"]:
                line = f"{step['state']}" + (f": {step['progress']}" if step.get("progress") else "")
                if shown.get(step["kind"]) != line:
                    say(f"  {step['kind']}: {line}")
                    shown[step["kind"]] = line
            if pipeline["state"] in ("succeeded", "failed") and not caller.is_alive():
                return pipeline
        time.sleep(1)
    raise DemoFailed("the conversion pipeline did not finish within 1200s")


def ask_slm(agent_port: int) -> None:
    """The official openai client, pointed at the agent: the answer, its TTFT and decode tok/s."""
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{agent_port}/v1", api_key="unused", max_retries=0, timeout=120)
    say(f"asking the agent (openai client, base_url http://127.0.0.1:{agent_port}/v1): {QUESTION[-1]['content']!r}")
    begin = time.perf_counter()
    first = end = None
    pieces: list[str] = []
    tokens = 0
    stream = client.chat.completions.create(
        model=SLM_MODEL,
        messages=QUESTION,
        temperature=0,
        max_tokens=32,
        stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        for choice in chunk.choices:
            if choice.delta.content:
                first = first or time.perf_counter()
                pieces.append(choice.delta.content)
    end = time.perf_counter()
    answer = "".join(pieces).strip()
    if first is None:
        raise DemoFailed("the agent streamed no text")
    ttft_ms = (first - begin) * 1000
    tps = (tokens - 1) / (end - first) if tokens > 1 and end > first else float("nan")
    say(f"the agent answered: {answer!r}")
    say(f"  time to first token {ttft_ms:.0f} ms, {tokens} tokens, decode {tps:.1f} tok/s (seen by the client)")
    if "Paris" not in answer:
        raise DemoFailed(f"the answer does not name Paris: {answer!r}")


def heartbeat_with_generation(api: Client, device_id: str) -> dict:
    def found():
        beats = api.list_heartbeats(device=device_id, limit=20)
        return next((b for b in beats if b["gen_requests"]), None)

    beat = wait_until(found, timeout=60, what="a heartbeat with generation figures")
    say(
        f"heartbeat #{beat['seq']} stored in the plane: {beat['gen_requests']} generations, "
        f"{beat['gen_tokens']} tokens, TTFT p50 {fmt(beat['ttft_p50_ms'], '.0f')} ms, "
        f"p95 {fmt(beat['ttft_p95_ms'], '.0f')} ms, decode {fmt(beat['decode_tps_p50'], '.1f')} tok/s (p50)"
    )
    return beat


def write_agent_config(
    path: Path, *, device_id: str, name: str, mqtt_url: str, data_dir: Path, port: int, key: str
) -> None:
    path.write_text(
        f'device_id = "{device_id}"\n'
        f'name = "{name}"\n'
        f'broker_url = "{mqtt_url}"\n'
        f'data_dir = "{data_dir}"\n'
        "heartbeat_interval = 2.0\n\n"
        f'[http]\nhost = "127.0.0.1"\nport = {port}\n\n'
        # The agent refuses any file whose manifest the plane did not sign with this key.
        f'[security]\nplane_public_key = "{key}"\n'
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--once", action="store_true", help="run the scenario, then stop everything and exit")
    parser.add_argument("--embedded", action="store_true", help="use SQLite, eager Celery and an in-process broker")
    parser.add_argument("--web-port", type=int, default=8000)
    parser.add_argument("--agent-port", type=int, default=8471)
    parser.add_argument("--var-dir", type=Path, default=REPO / "var" / "demo")
    parser.add_argument("--db-name", default="edgefleet_demo", help="PostgreSQL database to use (created if missing)")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14", help="Celery's Redis, if it answers")
    parser.add_argument("--device-id", default="demo-device", help="the demo agent's device id")
    parser.add_argument("--slm-agent-port", type=int, default=8472, help="the SmolLM2 device's agent port")
    parser.add_argument("--no-slm", action="store_true", help="skip SmolLM2: MiniLM on one device only")
    args = parser.parse_args()

    if not (MODEL_DIR / "model.int8.onnx").exists():
        say(f"the model is not in {MODEL_DIR}: run `make models` (or `make demo`, which fetches it)")
        return 2
    if not args.no_slm and not SLM_GGUF.exists():
        say(f"SmolLM2 is not in {SLM_GGUF.parent}: run `make models` (or pass --no-slm)")
        return 2
    ports = [(args.web_port, "--web-port"), (args.agent_port, "--agent-port")]
    if not args.no_slm:
        ports.append((args.slm_agent_port, "--slm-agent-port"))
    for port, what in ports:
        if port_open(port):
            say(f"port {port} is taken: stop what uses it or pick another with {what}")
            return 2
    var = args.var_dir.resolve()
    var.mkdir(parents=True, exist_ok=True)
    services = choose_services(args, var)
    for line in services.summary:
        say(line)
    procs = Processes(services.env, var / "logs")
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    try:
        run_scenario(args, services, procs, var)
        if not args.once:
            say("running; press Ctrl-C to stop every process the demo started")
            while not stop["now"]:
                procs.check()
                time.sleep(1)
        return 0
    except (DemoFailed, EdgefleetError) as exc:
        say(f"FAILED: {exc}")
        for name in procs.procs:
            say(f"--- last lines of {name}.log ---\n{procs.tail(name)}")
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        say(f"stopping {', '.join(procs.procs) or 'nothing'}")
        procs.stop()
        if services.broker:
            services.broker.stop()


def run_scenario(args: argparse.Namespace, services: Services, procs: Processes, var: Path) -> None:
    manage = [PYTHON, "manage.py"]
    say("migrating the database")
    procs.run("migrate", *manage, "migrate", "--noinput")
    password = "edgefleet-demo"
    procs.env |= {"DJANGO_SUPERUSER_PASSWORD": password, "DJANGO_SUPERUSER_EMAIL": "admin@example.com"}
    subprocess.run([*manage, "createsuperuser", "--noinput", "--username", "admin"], cwd=REPO, env=procs.env,
                   capture_output=True)  # fmt: skip
    token_out = subprocess.run(
        [*manage, "create_api_token", "admin"], cwd=REPO, env=procs.env, capture_output=True, text=True, check=True
    )
    token = token_out.stdout.split()[2]

    say("starting the plane (web), the MQTT bridge" + (", a Celery worker" if procs.env["REDIS_URL"] else ""))
    procs.start("web", *manage, "runserver", f"127.0.0.1:{args.web_port}", "--noreload")
    procs.start("bridge", *manage, "run_bridge", "--stats-every", "30")
    if procs.env["REDIS_URL"]:
        procs.start("worker", PYTHON, "-m", "celery", "-A", "controlplane", "worker", "-B", "--pool", "solo",
                    "-l", "info", "-s", str(var / "celerybeat-schedule"))  # fmt: skip
    api = Client(f"http://127.0.0.1:{args.web_port}", token, timeout=60)
    wait_until(lambda: (procs.check(), port_open(args.web_port))[1], timeout=60, what="the plane answering")
    key = api.signing_key()["public_key"]
    say(f"the plane signs every published file's manifest; the agent trusts its key {key[:12]}…")
    device_id = args.device_id
    config = var / "agent.toml"
    write_agent_config(
        config,
        device_id=device_id,
        name="Demo device",
        mqtt_url=procs.env["MQTT_URL"],
        data_dir=var / "agent",
        port=args.agent_port,
        key=key,
    )
    procs.start("agent", PYTHON, "-m", "agent", "--config", str(config))
    version = register_model(api)
    say(f"published {version['label']}")
    wait_until(lambda: (procs.check(), device_seen(api, device_id))[1], timeout=60, what=f"{device_id} saying hello")
    say(f"{device_id} said hello")
    deploy(api, version, device_id)
    infer(args.agent_port)
    heartbeat_with_latency(api, device_id)
    slm_device = f"{device_id}-slm"
    if not args.no_slm:
        # One agent serves one model: SmolLM2 goes to a second device.
        write_agent_config(
            var / "agent-slm.toml",
            device_id=slm_device,
            name="Demo device (SmolLM2)",
            mqtt_url=procs.env["MQTT_URL"],
            data_dir=var / "agent-slm",
            port=args.slm_agent_port,
            key=key,
        )
        procs.start("agent-slm", PYTHON, "-m", "agent", "--config", str(var / "agent-slm.toml"))
        slm_version = register_slm(api, Client(f"http://127.0.0.1:{args.web_port}", token, timeout=1200), procs)
        say(f"published {slm_version['label']}")
        wait_until(lambda: (procs.check(), device_seen(api, slm_device))[1], timeout=60,
                   what=f"{slm_device} saying hello")  # fmt: skip
        say(f"{slm_device} said hello")
        deploy(api, slm_version, slm_device, timeout=300)
        ask_slm(args.slm_agent_port)
        heartbeat_with_generation(api, slm_device)
    base = f"http://127.0.0.1:{args.web_port}"
    say("")
    say(f"admin:    {base}/admin/   user admin, password {password}")
    say(f"API:      {base}/api/v1/  (Authorization: Token {token})   docs: {base}/api/docs/")
    say(f'agent:    curl -s -XPOST 127.0.0.1:{args.agent_port}/v1/infer -d \'{{"text": "hello edge"}}\'')
    if not args.no_slm:
        say(f"chat:     OpenAI(base_url='http://127.0.0.1:{args.slm_agent_port}/v1', api_key='unused')"
            f"  ({slm_device}, SmolLM2)")  # fmt: skip
    say(f"logs:     {var / 'logs'}")


def device_seen(api: Client, device_id: str) -> bool:
    try:
        api.get_device(device_id)
        return True
    except NotFound:
        return False


if __name__ == "__main__":
    sys.exit(main())
