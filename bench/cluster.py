"""The plane scaled out on one machine, without Docker: gunicorn, three bridges, two Celery workers.

Every process is started as production starts it (``make cluster`` runs this benchmark alone):

- gunicorn serving the API and ``/metrics`` (2 workers);
- three ``run_bridge`` processes, each named (a persistent broker session) and serving
  ``/metrics`` on its own port;
- two Celery workers (prefork, 2 children each) in prometheus_client's multiprocess mode;

and the simulator (bench/simulate.py) as the fleet: devices connect, say hello (each hello
queues the device's desired state to a worker) and heartbeat. The figures are read back from
the processes' own ``/metrics``: how the broker split the heartbeats between the bridges, the
heartbeat lag, and the tasks the workers ran.
"""

from __future__ import annotations

import re
import sys
import time
import urllib.request

from bench import harness
from bench.context import Context, Sampler
from bench.ingestion import _max_heartbeat_id
from bench.report import Figure, Section
from bench.simulate import Options, simulate

BRIDGES = 3
WORKERS = 2


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def total(text: str, name: str, **labels: str) -> float:
    """The sum of a series' samples whose labels include ``labels``."""
    found = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", line)
        if match and all(f'{k}="{v}"' in (match.group(1) or "") for k, v in labels.items()):
            found += float(match.group(2))
    return found


def lag_p99(texts: list[str]) -> float | None:
    """The p99 heartbeat lag over every bridge, from their histogram buckets (an upper bound)."""
    buckets: dict[float, float] = {}
    for text in texts:
        for le, count in re.findall(r'^edgefleet_bridge_heartbeat_lag_seconds_bucket\{le="([^"]+)"\} (\S+)$', text,
                                    re.MULTILINE):  # fmt: skip
            bound = float("inf") if le == "+Inf" else float(le)
            buckets[bound] = buckets.get(bound, 0.0) + float(count)
    if not buckets or not buckets[float("inf")]:
        return None
    target = 0.99 * buckets[float("inf")]
    return next(bound for bound in sorted(buckets) if buckets[bound] >= target)


def start(ctx: Context) -> tuple[list[harness.PlaneProcess], dict[str, list[int]]]:
    ports = {"web": [harness.free_port()], "bridge": [harness.free_port() for _ in range(BRIDGES)],
             "worker": [harness.free_port() for _ in range(WORKERS)]}  # fmt: skip
    web = [sys.executable, "-m", "gunicorn", "controlplane.wsgi:application", "-w", "2",
           "-b", f"127.0.0.1:{ports['web'][0]}"]  # fmt: skip
    procs = [harness.PlaneProcess("web", web, ctx.env, ctx.workdir)]
    for n, port in enumerate(ports["bridge"]):
        cmd = [sys.executable, "manage.py", "run_bridge", "--name", f"cluster-{n}", "--metrics-port", str(port),
               "--stats-every", "5"]  # fmt: skip
        procs.append(harness.PlaneProcess(f"bridge-{n}", cmd, ctx.env, ctx.workdir))
    for n, port in enumerate(ports["worker"]):
        directory = ctx.workdir / f"worker-{n}-metrics"
        env = {**ctx.env, "WORKER_METRICS_PORT": str(port), "PROMETHEUS_MULTIPROC_DIR": str(directory)}
        cmd = [sys.executable, "-m", "celery", "-A", "controlplane", "worker", "--concurrency", "2",
               "-n", f"cluster-{n}@%h", "-l", "info"]  # fmt: skip
        procs.append(harness.PlaneProcess(f"worker-{n}", cmd, env, ctx.workdir))
    for port in [p for group in ports.values() for p in group]:
        harness.wait_for_port(port, timeout=60)
    return procs, ports


def run(ctx: Context) -> Section:
    sizes = ctx.sizes
    section = Section("Scale-out on one machine", "python -m bench.run --only cluster (make cluster)", notes=[
        f"gunicorn (2 workers), {BRIDGES} named bridges and {WORKERS} Celery workers (prefork, 2 children each, "
        f"multiprocess metrics), started as processes; {sizes.cluster_devices:,} simulated devices heartbeating "
        f"every {sizes.cluster_interval:g} s for {sizes.cluster_seconds:g} s. Per-bridge figures come from each "
        "bridge's /metrics.",
    ])  # fmt: skip
    procs, ports = start(ctx)
    try:
        with Sampler(_max_heartbeat_id, every=0.5) as sampler:
            started = time.monotonic()
            totals = simulate(Options(broker_url=ctx.broker.url, devices=sizes.cluster_devices, prefix="cluster",
                                      heartbeat_interval=sizes.cluster_interval, connect_rate=1000,
                                      duration=sizes.cluster_seconds), processes=2)  # fmt: skip
            ended = time.monotonic()
            time.sleep(1.0)
        bridges = [scrape(p) for p in ports["bridge"]]
        workers = [scrape(p) for p in ports["worker"]]
        web = scrape(ports["web"][0])
    finally:
        for proc in procs:
            proc.stop()
    stored = sampler.rate(started + sizes.cluster_seconds / 3, ended)
    offered = sizes.cluster_devices / sizes.cluster_interval
    per_bridge = [total(t, "edgefleet_bridge_heartbeats_stored_total") for t in bridges]
    tasks = [total(t, "edgefleet_worker_tasks_total", outcome="success") for t in workers]
    lag = lag_p99(bridges)
    smallest = 100 * min(per_bridge) / max(sum(per_bridge), 1)
    ctx.log(
        f"cluster: stored {stored:,.0f}/s of {offered:,.0f}/s; per bridge {per_bridge}; tasks {tasks}; p99 lag {lag}"
    )
    section.figures += [
        Figure(section.title, "heartbeats stored/s, steady state", stored, "/s",
               ceiling=f"offered by the simulator: {offered:,.0f}/s ({totals.heartbeats:,} sent in all)",
               target="all that is offered", met=stored >= 0.95 * offered),
        Figure(section.title, "smallest bridge's share of the heartbeats stored", smallest, "%",
               note=", ".join(f"{n:,.0f}" for n in per_bridge),
               ceiling=f"an even split: {100 / BRIDGES:.0f}% ({sum(per_bridge):,.0f} stored in all)",
               target="≥ 25%", met=min(per_bridge) >= 0.25 * sum(per_bridge)),
        Figure(section.title, "heartbeat lag p99 (bridge arrival to commit, histogram bucket)", lag, "s",
               target="≤ 1 s", met=lag is not None and lag <= 1.0),
        Figure(section.title, "Celery tasks run", sum(tasks), "tasks",
               note="by worker: " + ", ".join(f"{n:,.0f}" for n in tasks),
               ceiling=f"devices online on the plane's /metrics: "
                       f"{total(web, 'edgefleet_devices', status='online'):,.0f}"),
    ]  # fmt: skip
    return section
