"""The benchmarks run: the CI smoke test. It checks that every benchmark finishes, never how fast.

It runs the smallest sizes (``--tiny``, about two minutes here): ``--quick`` (make bench-quick)
took five of make test's fifteen minutes, for the same check.
"""

import os
import re
import subprocess
import sys
from urllib.parse import urlsplit

import pytest

from bench import report
from tests.support import REPO

pytestmark = pytest.mark.bench


@pytest.mark.timeout(480)
def test_it_runs_the_benchmarks_and_writes_their_section(tmp_path):
    out = tmp_path / "benchmarks.md"
    out.write_text("# Benchmarks\n\n## Agent\n\nkept as it is\n")
    env = {
        **os.environ,
        "BENCH_ADMIN_DATABASE_URL": os.environ.get(
            "BENCH_ADMIN_DATABASE_URL", "postgres://postgres:postgres@127.0.0.1:5432/postgres"
        ),
        # Suites run side by side set a Redis index of their own (the benchmarks flush theirs).
        "BENCH_REDIS_URL": os.environ.get("BENCH_SMOKE_REDIS_URL", "redis://127.0.0.1:6379/13"),
    }
    # Named after this run's own database, so that suites run side by side (worktrees) do not drop each other's.
    database = urlsplit(os.environ.get("DATABASE_URL", "")).path.strip("/") or "edgefleet"
    run = subprocess.run(
        [sys.executable, "-m", "bench.run", "--tiny", "--out", str(out), "--database", f"{database}_bench_smoke"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=420,
    )  # fmt: skip

    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    text = out.read_text()
    assert "## Agent\n\nkept as it is" in text
    assert report.BEGIN in text and report.END in text
    assert "### Telemetry ingestion" in text and "### Artifact transfer" in text
    assert "### Connections held" in text and "### API latency" in text
    assert "secure broker, one bridge" in text
    # The bridge drained the whole backlog: nothing the broker took is lost on the way to PostgreSQL.
    assert re.search(r"draining a backlog, 1 bridge[^\n]*stored ([\d,]+) of \1\b", text), "backlog not all stored"
    assert "did not complete" not in text
