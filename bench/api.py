"""API latency: the device list and a rollout's progress, N devices in the database, C clients at once.

The API is served by gunicorn (sync workers, 2 × cores + 1 of them, as gunicorn advises)
from this run's database; the clients authenticate with an API token as a script would
and keep C requests in flight (threads over a few processes, so the clients' own GIL is
not what is measured). The ceiling in the same run: the same clients against the API
root, a view that touches no table, on the same gunicorn.
"""

from __future__ import annotations

import http.client
import multiprocessing
import os
import statistics
import sys
import threading
import time

from bench import harness
from bench.context import Context
from bench.report import Figure, Section
from tests.support import free_port, wait_for_port

CLIENT_PROCESSES = 4
WARMUP_PER_CLIENT = 2


def workers() -> int:
    return 2 * (os.cpu_count() or 1) + 1


def populate(count: int) -> tuple[str, int]:
    """``count`` devices in one tag, each running a version, a running rollout of another over them,
    and an operator's API token."""
    from django.contrib.auth import get_user_model
    from django.utils import timezone

    from bench.fanout import tag_devices, tiny_release
    from fleet.auth import create_api_token
    from fleet.choices import DeploymentState
    from fleet.models import Deployment, Device
    from fleet.services import rollouts

    prefix = "api"
    Device.objects.bulk_create(
        [Device(device_id=f"{prefix}-{n:06d}", name=f"{prefix}-{n:06d}", arch="x86_64", os="linux",
                hardware_class="linux-x86_64", cpu_count=4, ram_bytes=8 << 30, disk_free_bytes=32 << 30,
                providers=["CPUExecutionProvider"], online=True) for n in range(count)],
        batch_size=2000,
    )  # fmt: skip
    tag = tag_devices(prefix)
    # What each device runs already, so that a page shows a current version and deployment per device.
    running = tiny_release(f"{prefix}-running")
    artifact = running.artifacts.get()
    Deployment.objects.bulk_create(
        [Deployment(device_id=pk, version=running, artifact=artifact, state=DeploymentState.ACTIVE,
                    bytes_done=artifact.size, bytes_total=artifact.size, active_at=timezone.now())
         for pk in Device.objects.filter(device_id__startswith=f"{prefix}-").values_list("pk", flat=True)],
        batch_size=2000,
    )  # fmt: skip
    Device.objects.filter(device_id__startswith=f"{prefix}-").update(current_version=running, current_artifact=artifact)
    version = tiny_release(f"{prefix}-model")
    stages = [{"percent": 10, "min_soak_seconds": 3600}, {"percent": 100, "min_soak_seconds": 0}]
    rollout = rollouts.create_rollout(version, stages=stages, actor="system", tags=[tag], max_per_minute=count,
                                      name="api benchmark")  # fmt: skip
    rollouts.start_rollout(rollout, actor="system", reason="api benchmark")
    user = get_user_model().objects.create_superuser("bench-api", "bench@example.invalid", None)
    return create_api_token(user, reason="api benchmark"), rollout.pk


def _client(port: int, path: str, token: str, requests: int, results) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Authorization": f"Token {token}", "Accept": "application/json"}
    times, errors = [], 0
    for n in range(requests + WARMUP_PER_CLIENT):
        t0 = time.perf_counter()
        try:
            conn.request("GET", path, headers=headers)
            response = conn.getresponse()
            response.read()
            ok = response.status == 200
        except (OSError, http.client.HTTPException):
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            ok = False
        if n >= WARMUP_PER_CLIENT:
            if ok:
                times.append(time.perf_counter() - t0)
            errors += not ok
    conn.close()
    results.put((times, errors))


def _client_process(port: int, path: str, token: str, clients: int, requests: int, out) -> None:
    import queue

    results: queue.Queue = queue.Queue()
    threads = [threading.Thread(target=_client, args=(port, path, token, requests, results)) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    times, errors = [], 0
    while not results.empty():
        t, e = results.get()
        times += t
        errors += e
    out.put((times, errors))


def load(port: int, path: str, token: str, *, clients: int, requests: int) -> tuple[list[float], int, float]:
    """``requests`` GETs of ``path`` by ``clients`` concurrent clients: latencies (s), errors, requests/s served."""
    context = multiprocessing.get_context("fork")
    out = context.Queue()
    processes = min(CLIENT_PROCESSES, clients)
    split = [clients // processes + (1 if p < clients % processes else 0) for p in range(processes)]
    per_client = max(1, requests // clients)
    procs = [context.Process(target=_client_process, args=(port, path, token, c, per_client, out)) for c in split]
    for proc in procs:
        proc.start()
    times, errors = [], 0
    for _ in procs:
        t, e = out.get(timeout=600)
        times += t
        errors += e
    for proc in procs:
        proc.join(timeout=10)
    # From the latencies, not the wall clock: that would count the processes starting and the warm-up.
    return times, errors, clients * len(times) / sum(times) if times else 0.0


def _ms(times: list[float], q: int) -> float | None:
    if len(times) < 2:
        return None
    return statistics.quantiles(times, n=100, method="inclusive")[q - 1] * 1000


def run(ctx: Context) -> Section:
    from django.db import connections

    sizes = ctx.sizes
    section = Section(
        "API latency",
        "python -m bench.run --only api",
        notes=[
            f"{sizes.api_devices:,} devices in PostgreSQL, each running a version (an active deployment), and a "
            "running two-stage rollout of another over them; gunicorn with "
            f"{workers()} sync workers; {sizes.api_clients} concurrent clients (token auth, keep-alive asked for) "
            f"make about {sizes.api_requests:,} GETs per endpoint after {WARMUP_PER_CLIENT} warm-up requests each. "
            "The device list is the first page (100 devices, with the total count). The database is vacuumed and "
            "analysed after loading, as autovacuum would have done."
        ],
    )
    token, rollout_pk = populate(sizes.api_devices)
    with connections["default"].cursor() as cursor:
        # Statistics for the rows just loaded, as autovacuum keeps them in a running plane: without
        # them PostgreSQL plans a tag's devices as if there were 50.
        cursor.execute("VACUUM ANALYZE")
    connections.close_all()
    port = free_port()
    cmd = [sys.executable, "-m", "gunicorn", "controlplane.wsgi:application", "--bind", f"127.0.0.1:{port}",
           "--workers", str(workers()), "--log-level", "warning"]  # fmt: skip
    server = harness.PlaneProcess("gunicorn", cmd, {**ctx.env, "DATABASE_CONN_MAX_AGE": "60"}, ctx.workdir)
    try:
        wait_for_port(port, timeout=30)
        endpoints = [
            ("device list", "/api/v1/devices/"),
            ("rollout progress", f"/api/v1/rollouts/{rollout_pk}/progress/"),
        ]
        base, base_errors, base_rate = load(port, "/api/v1/", token, clients=sizes.api_clients,
                                            requests=sizes.api_requests)  # fmt: skip
        ceiling = (f"API root, same clients and server: p50 {_ms(base, 50) or 0:.1f} ms, p99 {_ms(base, 99) or 0:.1f} "
                   f"ms, {base_rate:,.0f} req/s")  # fmt: skip
        for label, path in endpoints:
            times, errors, rate = load(port, path, token, clients=sizes.api_clients, requests=sizes.api_requests)
            if errors or not times:
                raise RuntimeError(f"{label}: {errors} failed requests:\n{server.output()[-2000:]}")
            ctx.log(f"api {label}: p50 {_ms(times, 50)} ms, p99 {_ms(times, 99)} ms, {rate:.0f} req/s")
            section.figures.append(
                Figure(section.title, f"{label}, p50", _ms(times, 50), "ms", ceiling=ceiling,
                       note=f"{sizes.api_devices:,} devices, {sizes.api_clients} clients")
            )  # fmt: skip
            section.figures.append(
                Figure(section.title, f"{label}, p99", _ms(times, 99), "ms", ceiling=f"{rate:,.0f} req/s served",
                       note=f"{len(times):,} requests")
            )  # fmt: skip
        if base_errors:
            section.notes.append(f"{base_errors} requests to the API root failed.")
    finally:
        server.stop()
    return section
