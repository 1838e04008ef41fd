"""A real Prometheus (Debian's package) scrapes the plane, a bridge, a Celery worker and an agent.

Each runs as its own process, as in production; Prometheus loads docker/prometheus/alerts.yml
and scrapes every second, and the test asks it for one series from each.
"""

import json
import os
import shutil
import sys
import urllib.parse
import urllib.request

import pytest

from fleet import tasks
from tests.e2e.helpers import Process, database_url
from tests.support import REDIS_URL, REPO, celery_on_redis, free_port, wait_for_port, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def prometheus_config(targets: dict[str, int]) -> str:
    jobs = "".join(
        f"  - job_name: {job}\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
        for job, port in targets.items()
    )
    rules = REPO / "docker" / "prometheus" / "alerts.yml"
    return (
        f"global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {rules}\nscrape_configs:\n{jobs}"
    )


def query(port: int, promql: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]["result"]


def first_value(port: int, promql: str) -> float | None:
    result = query(port, promql)
    return float(result[0]["value"][1]) if result else None


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def targets(port: int) -> list[dict]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/targets", timeout=5) as response:
        return [
            {k: t[k] for k in ("scrapeUrl", "health", "lastError")}
            for t in json.load(response)["data"]["activeTargets"]
        ]


@pytest.fixture
def prometheus(tmp_path):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is missing: `make services` installs Debian's prometheus package")

    def start(targets: dict[str, int]) -> tuple[int, Process]:
        port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(prometheus_config(targets))
        cmd = [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
               f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]  # fmt: skip
        started.append(Process("prometheus", cmd, dict(os.environ), tmp_path))
        wait_for_port(port, timeout=30)
        wait_until(lambda: ready(port), timeout=30, what="Prometheus ready")
        return port, started[-1]

    started: list[Process] = []
    yield start
    for proc in started:
        proc.stop()


def test_it_is_scraped_by_a_real_prometheus_from_the_plane_a_bridge_a_worker_and_an_agent(
    settings, broker_port, prometheus, tmp_path
):
    settings.ARTIFACT_ROOT = tmp_path / "artifacts"
    ports = {job: free_port() for job in ("edgefleet-plane", "edgefleet-bridge", "edgefleet-worker", "edgefleet-agent")}
    env = {**os.environ, "DATABASE_URL": database_url(), "ARTIFACT_ROOT": str(settings.ARTIFACT_ROOT),
           "MQTT_URL": f"mqtt://127.0.0.1:{broker_port}", "REDIS_URL": REDIS_URL, "BRIDGE_FLUSH_MS": "50"}  # fmt: skip
    worker_env = {**env, "WORKER_METRICS_PORT": str(ports["edgefleet-worker"]),
                  "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "worker-metrics")}  # fmt: skip
    config = tmp_path / "agent.toml"
    config.write_text(
        f'device_id = "edge-prom"\nbroker_url = "mqtt://127.0.0.1:{broker_port}"\n'
        f'data_dir = "{tmp_path / "agent"}"\nheartbeat_interval = 1.0\n\n[http]\nport = 0\n\n'
        f"[metrics]\nenabled = true\nport = {ports['edgefleet-agent']}\n"
    )
    procs = []
    with celery_on_redis():
        try:
            py = sys.executable
            plane = [py, "-m", "gunicorn", "controlplane.wsgi:application", "-w", "2",
                     "-b", f"127.0.0.1:{ports['edgefleet-plane']}"]  # fmt: skip
            bridge = [py, "manage.py", "run_bridge", "--metrics-port", str(ports["edgefleet-bridge"])]
            worker = [py, "-m", "celery", "-A", "controlplane", "worker", "--pool", "prefork", "--concurrency", "2"]
            procs.append(Process("plane", plane, env, tmp_path))
            procs.append(Process("bridge", bridge, env, tmp_path))
            procs.append(Process("worker", worker, worker_env, tmp_path))
            procs.append(Process("agent", [py, "-m", "agent", "--config", str(config)], env, tmp_path))
            for port in ports.values():
                wait_for_port(port, timeout=60)
            tasks.mark_offline_devices.delay()  # run by one of the worker's pool children
            port, _ = prometheus(ports)
            series = {
                "edgefleet-plane": 'edgefleet_devices{enrollment="accepted", status="online"}',
                "edgefleet-bridge": 'edgefleet_bridge_messages_total{kind="heartbeat"}',
                "edgefleet-worker": 'edgefleet_worker_tasks_total{task="fleet.mark_offline_devices",outcome="success"}',
                "edgefleet-agent": "edgefleet_inference_requests_total",
            }
            for job, promql in series.items():
                wait_until(lambda q=f'{promql} and on () up{{job="{job}"}} == 1': query(port, q),
                           timeout=60, what=f"Prometheus reading {promql} from {job}")  # fmt: skip
            assert first_value(port, series["edgefleet-plane"]) == 1
            assert first_value(port, series["edgefleet-bridge"]) >= 1
            assert first_value(port, series["edgefleet-worker"]) == 1
            assert {r["metric"]["job"] for r in query(port, "up == 1")} == set(ports)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/rules", timeout=5) as response:
                groups = json.load(response)["data"]["groups"]
            assert sum(len(g["rules"]) for g in groups) >= 9
        except Exception:
            if "port" in locals():
                print("targets:", targets(port))
            for proc in procs:
                print(f"--- {proc.name} ---\n{proc.output()[-3000:]}")
            raise
        finally:
            for proc in procs:
                proc.stop()
