"""Console render time: the fleet overview and a rollout's page, beside the API root, in the same run.

10,000 devices (the API benchmark's size) in PostgreSQL, each running a version and with
heartbeats in the last hour; 100 rollouts of 100 devices each, 90 running with a canary of
five (one failed with its error, four reporting latency on the new version) and 10 rolled
back. One signed-in operator (a session cookie, as a browser sends) GETs each page in turn
from gunicorn; render time is the time to the whole answer. The API root, a view that reads
no table, on the same server and client, is the floor.
"""

from __future__ import annotations

import http.client
import statistics
import sys
import time
from datetime import timedelta

from bench import harness
from bench.api import workers
from bench.context import Context
from bench.report import Figure, Section
from fleet.lib.humanize import plural
from tests.support import free_port, wait_for_port

GROUP = 100
TARGET_MS = 300.0
WARMUP = 5


def populate(count: int) -> tuple[str, str, list[int]]:
    """The fleet, its rollouts and an operator; the session cookie, the API token and the rollout ids."""
    from django.conf import settings
    from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY, get_user_model
    from django.contrib.sessions.backends.db import SessionStore
    from django.utils import timezone

    from bench.fanout import tiny_release
    from fleet.auth import create_api_token
    from fleet.choices import DeploymentState, EnrollmentState
    from fleet.models import Deployment, Device, Heartbeat, Tag
    from fleet.services import rollouts

    now = timezone.now()
    classes = ("linux-x86_64", "linux-aarch64")
    Device.objects.bulk_create(
        [Device(device_id=f"con-{n:06d}", arch="x86_64" if n % 3 else "aarch64", os="linux",
                hardware_class=classes[0] if n % 3 else classes[1], cpu_count=4, ram_bytes=8 << 30,
                disk_free_bytes=32 << 30, providers=["CPUExecutionProvider"], online=n % 10 != 0,
                enrollment=EnrollmentState.PENDING if n % 50 == 49 else EnrollmentState.ACCEPTED,
                last_seen=now) for n in range(count)],
        batch_size=2000,
    )  # fmt: skip
    pks = list(Device.objects.filter(device_id__startswith="con-").order_by("pk").values_list("pk", flat=True))
    running = tiny_release("con-running")
    artifact = running.artifacts.get()
    Deployment.objects.bulk_create(
        [Deployment(device_id=pk, version=running, artifact=artifact, state=DeploymentState.ACTIVE,
                    bytes_done=artifact.size, bytes_total=artifact.size, active_at=now - timedelta(hours=2))
         for pk in pks],
        batch_size=2000,
    )  # fmt: skip
    Device.objects.filter(pk__in=pks).update(current_version=running, current_artifact=artifact)
    _heartbeats(pks, now, Heartbeat)
    through = Device.tags.through
    groups = [pks[i : i + GROUP] for i in range(0, len(pks), GROUP)]
    tags = Tag.objects.bulk_create([Tag(name=f"con-g{i:03d}") for i in range(len(groups))])
    through.objects.bulk_create(
        [through(device_id=pk, tag_id=tag.pk) for tag, group in zip(tags, groups, strict=True) for pk in group],
        batch_size=5000,
    )
    version = tiny_release("con-model")
    stages = [{"device_count": 5, "min_soak_seconds": 3600, "health_p95_ratio": "1.5", "health_min_samples": 1000},
              {"percent": 25, "min_soak_seconds": 3600}, {"percent": 100}]  # fmt: skip
    ids = []
    for n, tag in enumerate(tags):
        rollout = rollouts.create_rollout(version, stages=stages, tags=[tag.name], actor="system",
                                          name=f"console benchmark {n}")  # fmt: skip
        rollout = rollouts.start_rollout(rollout, actor="system")
        _canaries_report(rollout, now)
        if n % 10 == 9:
            rollouts.rollback_rollout(rollout, actor="system", reason="console benchmark: a rollback to list")
        ids.append(rollout.pk)
    user = get_user_model().objects.create_superuser("bench-console", "bench@example.invalid", None)
    session = SessionStore()
    session[SESSION_KEY] = str(user.pk)
    session[BACKEND_SESSION_KEY] = settings.AUTHENTICATION_BACKENDS[0]
    session[HASH_SESSION_KEY] = user.get_session_auth_hash()
    session.create()
    return f"{settings.SESSION_COOKIE_NAME}={session.session_key}", create_api_token(user, reason="bench"), ids


def _heartbeats(pks: list[int], now, heartbeat_model) -> None:
    """Five heartbeats per device over the last hour, the newest in the last minute."""
    rows = [
        heartbeat_model(device_id=pk, received_at=now - timedelta(seconds=30 + 900 * k), sent_at=now, seq=k,
                        uptime_s=3600, cpu_percent=12.5, mem_rss_bytes=180 << 20, mem_available_bytes=3 << 30,
                        requests=60, errors=0, latency_count=60, p50_ms=9.0, p95_ms=15.5 + k % 2, p99_ms=21.0,
                        max_ms=30.0)
        for pk in pks
        for k in range(5)
    ]  # fmt: skip
    heartbeat_model.objects.bulk_create(rows, batch_size=5000)


def _canaries_report(rollout, now) -> None:
    """One canary failed with its error; the others are active and report a p95 a little up."""
    from fleet.choices import DeploymentState
    from fleet.models import Deployment, Heartbeat

    members = list(rollout.members.order_by("pk").values_list("device_id", "deployment_id"))
    failed, active = members[:1], members[1:]
    Deployment.objects.filter(pk__in=[d for _, d in failed]).update(
        state=DeploymentState.FAILED, failed_at=now, error="self-test failed: output is NaN"
    )
    Deployment.objects.filter(pk__in=[d for _, d in active]).update(state=DeploymentState.ACTIVE, active_at=now)
    Heartbeat.objects.bulk_create(
        [Heartbeat(device_id=pk, received_at=now - timedelta(seconds=20 * k), sent_at=now, seq=100 + k, uptime_s=60,
                   cpu_percent=14.0, mem_rss_bytes=190 << 20, mem_available_bytes=3 << 30, requests=60, errors=0,
                   latency_count=60, p50_ms=10.0, p95_ms=19.0, p99_ms=25.0, max_ms=31.0, deployment_id_reported=dep)
         for pk, dep in active for k in range(6)]
    )  # fmt: skip


def timed_gets(port: int, paths: list[str], headers: dict[str, str], requests: int) -> list[float]:
    """``requests`` GETs, one at a time, cycling over ``paths``: each one's seconds to the whole answer."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    times = []
    for n in range(requests + WARMUP):
        path = paths[n % len(paths)]
        t0 = time.perf_counter()
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"GET {path}: {response.status} {body[:300]!r}")
        if n >= WARMUP:
            times.append(time.perf_counter() - t0)
    conn.close()
    return times


def _ms(times: list[float], q: int) -> float:
    return statistics.quantiles(times, n=100, method="inclusive")[q - 1] * 1000


def run(ctx: Context) -> Section:
    from django.db import connections

    devices = ctx.sizes.api_devices
    requests = max(40, ctx.sizes.api_requests // 5)
    cookie, token, ids = populate(devices)
    with connections["default"].cursor() as cursor:
        cursor.execute("VACUUM ANALYZE")
    connections.close_all()
    section = Section(
        "Console render time",
        "python -m bench.run --only console",
        notes=[
            f"{plural(devices, 'device')}, {plural(len(ids), 'rollout')} of up to {GROUP} devices each "
            f"({len(ids) - len(ids) // 10} running with a five-device canary, {len(ids) // 10} rolled back), "
            f"{plural(5 * devices, 'heartbeat')} and more from the canaries; gunicorn with "
            f"{workers()} sync workers; one signed-in operator GETs each page {requests} times in turn after "
            f"{WARMUP} warm-up requests; a rollout's page cycles over the rollouts. The query counts do not grow "
            "with the fleet (tests/fleet/test_console.py)."
        ],
    )
    port = free_port()
    cmd = [sys.executable, "-m", "gunicorn", "controlplane.wsgi:application", "--bind", f"127.0.0.1:{port}",
           "--workers", str(workers()), "--log-level", "warning"]  # fmt: skip
    server = harness.PlaneProcess("gunicorn-console", cmd, {**ctx.env, "DATABASE_CONN_MAX_AGE": "60"}, ctx.workdir)
    try:
        wait_for_port(port, timeout=30)
        root = timed_gets(port, ["/api/v1/"], {"Authorization": f"Token {token}"}, requests)
        floor = f"API root, same run and server: p50 {_ms(root, 50):.1f} ms, p95 {_ms(root, 95):.1f} ms"
        browser = {"Cookie": cookie, "Accept": "text/html"}
        pages = [("fleet overview", ["/"]), ("rollout page", [f"/rollouts/{pk}/" for pk in ids])]
        for label, paths in pages:
            times = timed_gets(port, paths, browser, requests)
            ctx.log(f"console {label}: p50 {_ms(times, 50):.1f} ms, p95 {_ms(times, 95):.1f} ms")
            section.figures.append(
                Figure(section.title, f"{label}, p95", _ms(times, 95), "ms", ceiling=floor,
                       target=f"≤ {TARGET_MS:.0f} ms", met=_ms(times, 95) <= TARGET_MS,
                       note=f"{plural(devices, 'device')}, {plural(len(ids), 'rollout')}; p50 {_ms(times, 50):.1f} ms")
            )  # fmt: skip
    finally:
        server.stop()
    return section
