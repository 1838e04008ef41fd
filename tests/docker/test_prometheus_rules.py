"""The alert rules pass promtool, fire on the cases they are for, and the dashboard names only real series."""

import json
import re
import shutil
import subprocess

import pytest

from tests.support import REPO

PROMETHEUS = REPO / "docker" / "prometheus"
DASHBOARD = REPO / "docker" / "grafana" / "edgefleet.json"
# A series name, without the suffixes Prometheus adds to counters and histograms.
SERIES = re.compile(r"\bedgefleet_[a-z0-9_]+")
SUFFIXES = ("_bucket", "_sum", "_count", "_total")


def promtool(*args: str) -> subprocess.CompletedProcess:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.fail("promtool is missing: `make services` installs Debian's prometheus package")
    return subprocess.run([tool, *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=60)


def exported_names() -> str:
    """The source that names every series the plane, the bridges, the workers and the agent export."""
    names = [
        "fleet/metrics.py",
        "fleet/worker_metrics.py",
        "fleet/bridge/metrics.py",
        "agent/metrics.py",
        "agent/core.py",
    ]
    files = [REPO / name for name in names]
    return "\n".join(f.read_text() for f in files)


def base_name(name: str) -> str:
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name


def test_it_passes_promtool_check_rules():
    result = promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_it_passes_promtool_check_config():
    # --syntax-only: the token file the config names exists only inside the compose stack.
    result = promtool("check", "config", "--syntax-only", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_it_fires_each_alert_on_the_case_it_is_for():
    result = promtool("test", "rules", "alerts.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_it_alerts_only_on_series_that_are_exported():
    source = exported_names()
    rules = (PROMETHEUS / "alerts.yml").read_text()
    missing = {base_name(n) for n in SERIES.findall(rules)} - {base_name(n) for n in SERIES.findall(source)}
    assert not missing, f"alerts.yml names series nothing exports: {sorted(missing)}"


def test_it_loads_the_dashboard_whose_panels_query_exported_series():
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert dashboard["uid"] == "edgefleet" and len(exprs) >= 10
    source = {base_name(n) for n in SERIES.findall(exported_names())}
    missing = {base_name(n) for e in exprs for n in SERIES.findall(e)} - source
    assert not missing, f"the dashboard queries series nothing exports: {sorted(missing)}"
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
