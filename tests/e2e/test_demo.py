"""`make demo ARGS=--once` as a smoke test, with the machine's services and with the embedded fallbacks.

The embedded run registers both models: MiniLM on one device, and SmolLM2 converted from its
GGUF on a second one (about 90 s here, most of it the conversion and evaluation, against 10 s for
MiniLM alone). The run on the machine's services skips SmolLM2 (--no-slm): the demo's SmolLM2
steps are the same code in both modes, and tests/e2e/test_generate.py already takes SmolLM2
through the same API calls on PostgreSQL, a Redis worker and Mosquitto. The embedded run is the
one path nothing else covers: the pipeline run inside the optimize request by eager Celery, on
SQLite, and the bundle carried by the in-process broker.
"""

import os
import subprocess
import sys
import uuid
from urllib.parse import urlsplit

import psycopg
import pytest

from tests.support import REDIS_URL, REPO, free_port

pytestmark = pytest.mark.e2e


# Named after the suite's database, so suites on other databases do not drop each other's.
DB_NAME = f"{urlsplit(os.environ.get('DATABASE_URL') or '/edgefleet').path.lstrip('/')}_demo_test"


def drop_demo_database() -> None:
    with psycopg.connect("postgresql://postgres:postgres@127.0.0.1:5432/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)')


def run_demo(tmp_path, *extra: str) -> subprocess.CompletedProcess:
    # A device id of its own: the machine's broker keeps retained messages between runs.
    device_id = f"demo-{uuid.uuid4().hex[:8]}"
    cmd = [
        sys.executable, "scripts/demo.py", "--once",
        "--web-port", str(free_port()), "--agent-port", str(free_port()), "--slm-agent-port", str(free_port()),
        "--var-dir", str(tmp_path / "var"), "--db-name", DB_NAME, "--device-id", device_id,
        "--redis-url", REDIS_URL, *extra,
    ]  # fmt: skip
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def assert_smollm2_answered(stdout: str) -> None:
    assert "repack (accepted)" in stdout
    answer = next(line for line in stdout.splitlines() if "the agent answered: '" in line)
    assert "Paris" in answer
    assert "time to first token" in stdout
    assert "generations," in stdout and "tok/s (p50)" in stdout


def test_it_runs_the_demo_scenario_on_the_machines_services(tmp_path):
    drop_demo_database()
    result = run_demo(tmp_path, "--no-slm")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "database: PostgreSQL" in result.stdout
    assert "mqtt: Mosquitto" in result.stdout
    assert "the agent answered: 3 embeddings of 384 dimensions" in result.stdout
    assert "stored in the plane" in result.stdout


def test_it_runs_the_demo_with_smollm2_on_embedded_defaults(tmp_path):
    result = run_demo(tmp_path, "--embedded")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "database: SQLite (embedded)" in result.stdout
    assert "celery: eager" in result.stdout
    assert "in-process broker" in result.stdout
    assert "stored in the plane" in result.stdout
    assert_smollm2_answered(result.stdout)
