"""The Celery workers' ``/metrics``: tasks finished by name and outcome, and how long they ran.

Counted from Celery's signals in the process that runs the task. A prefork worker runs
tasks in child processes, so their figures reach the parent's ``/metrics`` through
prometheus_client's multiprocess mode: start each worker with its own empty
``PROMETHEUS_MULTIPROC_DIR`` (docs/metrics.md). A ``--pool solo`` or ``threads`` worker
needs none. ``WORKER_METRICS_PORT`` (0: off) is the port; one per worker on a machine.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from celery import signals
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, multiprocess, start_http_server

log = logging.getLogger(__name__)

TASKS = Counter(
    "edgefleet_worker_tasks", "Celery tasks finished, by task name and outcome (Celery's state).", ["task", "outcome"]
)
TASK_SECONDS = Histogram(
    "edgefleet_worker_task_duration_seconds", "How long each Celery task ran, by task name.", ["task"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0),
)  # fmt: skip
_started: dict[str, float] = {}


def task_started(task_id: str | None = None, **_: Any) -> None:
    if task_id:
        _started[task_id] = time.perf_counter()


def task_finished(task_id: str | None = None, task: Any = None, state: str | None = None, **_: Any) -> None:
    started = _started.pop(task_id or "", None)
    name = getattr(task, "name", None) or "unknown"
    TASKS.labels(name, (state or "unknown").lower()).inc()
    if started is not None:
        TASK_SECONDS.labels(name).observe(time.perf_counter() - started)


def serve(port: int, addr: str = "127.0.0.1") -> int:
    """Serve /metrics from this process; with a multiprocess directory, every pool child's figures."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    registry: CollectorRegistry = REGISTRY
    if directory:
        Path(directory).mkdir(parents=True, exist_ok=True)
        # Files a previous run of this worker left would add its counts to this run's.
        for stale in Path(directory).glob("*.db"):
            stale.unlink()
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    server, _ = start_http_server(port, addr=addr, registry=registry)
    return int(server.server_address[1])


def worker_init(sender: Any = None, **_: Any) -> None:
    from django.conf import settings

    if not settings.WORKER_METRICS_PORT:
        return
    port = serve(settings.WORKER_METRICS_PORT, settings.METRICS_ADDR)
    pool = getattr(getattr(sender, "pool_cls", None), "__module__", "")
    if "prefork" in pool and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        log.warning("worker metrics: a prefork pool without PROMETHEUS_MULTIPROC_DIR shows no task of its children")
    log.info("worker metrics on http://%s:%d/metrics", settings.METRICS_ADDR, port)


def child_exited(pid: int | None = None, **_: Any) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(pid or os.getpid())


def connect() -> None:
    """Hook the counters to Celery's signals (controlplane/celery.py calls this once)."""
    signals.task_prerun.connect(task_started, weak=False)
    signals.task_postrun.connect(task_finished, weak=False)
    signals.worker_init.connect(worker_init, weak=False)
    signals.worker_process_shutdown.connect(child_exited, weak=False)
