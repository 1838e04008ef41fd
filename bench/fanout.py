"""Rollout fan-out: from starting a single-stage 100% rollout until every device reports active.

The real pieces, end to end: ``start_rollout`` in this process assigns every selected
device and queues ``publish_desired`` after commit; a Celery worker builds and publishes
the desired messages; N simulated devices (bench.simulate) on the broker receive them
and report ``downloading`` then ``active`` (they fetch no chunks: the change is
metadata-sized, a tiny ONNX file); a ``run_bridge`` process applies the reports in
batches and queues the rollout's evaluation once a flush. The clock stops when the
database holds N active deployments; the rollout completing is timed too.

The gate evaluator's cost is timed on a second rollout of the same devices whose one
stage soaks for an hour, so each ``evaluate_rollout`` pass judges every gate (success,
failure, health against the previous-version baseline) over N members and holds.
The ceiling beside the figure: AWS IoT Jobs' documented 1,000 devices a minute.
"""

from __future__ import annotations

import multiprocessing
import statistics
import tempfile
import time
from pathlib import Path

from bench import harness
from bench.context import Context
from bench.report import Figure, Section
from bench.simulate import Options, simulate

AWS_IOT_JOBS_PER_S = 1000 / 60
EVALUATOR_PASSES = 5


def _simulate(options: Options) -> None:
    simulate(options)


def start_fleet(ctx: Context, prefix: str, count: int, seconds: float) -> list[multiprocessing.Process]:
    """N simulated devices in the background, heartbeating rarely: only the rollout's traffic counts.

    Each process runs to ``seconds`` at most; the caller terminates them as soon as it is done.
    """
    parts = 2 if count > 2000 else 1
    per = -(-count // parts)
    procs = []
    for p in range(parts):
        options = Options(broker_url=ctx.broker.url, devices=min(per, count - p * per), prefix=prefix, first=p * per,
                          heartbeat_interval=600, connect_rate=1500 / parts, duration=seconds)  # fmt: skip
        proc = multiprocessing.get_context("fork").Process(target=_simulate, args=(options,), daemon=True)
        proc.start()
        procs.append(proc)
    return procs


def wait_registered(prefix: str, count: int, timeout: float) -> None:
    from fleet.models import Device

    deadline = time.monotonic() + timeout
    while (n := Device.objects.filter(device_id__startswith=f"{prefix}-").count()) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {n} of {count} simulated devices said hello in {timeout:.0f} s")
        time.sleep(0.2)


def tag_devices(prefix: str) -> str:
    from fleet.models import Device, Tag

    tag = Tag.objects.create(name=prefix)
    through = Device.tags.through
    pks = Device.objects.filter(device_id__startswith=f"{prefix}-").values_list("pk", flat=True)
    through.objects.bulk_create([through(device_id=pk, tag_id=tag.pk) for pk in pks], batch_size=2000)
    return tag.name


def tiny_release(name: str):
    """A published version whose one model file is a few hundred bytes: a metadata-sized change."""
    from bench.transfer import release
    from tests.fleet.helpers import onnx_bytes

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        path.write_bytes(onnx_bytes(name))
        return release(path, name)


def wait_active(version, count: int, timeout: float, log=print) -> float | None:
    """Seconds until ``count`` deployments of the version are active; None on timeout."""
    from django.db.models import Count

    from fleet.choices import DeploymentState
    from fleet.models import Deployment

    started = time.monotonic()
    timeline = []
    while time.monotonic() - started < timeout:
        states = dict(
            Deployment.objects.filter(version=version).values_list("state").annotate(n=Count("id")).order_by()
        )
        timeline.append(f"{time.monotonic() - started:.1f}s {states}")
        if states.get(DeploymentState.ACTIVE, 0) >= count:
            log(" | ".join(timeline[:: max(1, len(timeline) // 12)]))
            return time.monotonic() - started
        time.sleep(0.05)
    log(" | ".join(timeline[:: max(1, len(timeline) // 12)]))
    return None


def wait_finished(rollout, timeout: float) -> str:
    from fleet.models import Rollout
    from fleet.services.rollouts import FINISHED_STATES

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = Rollout.objects.values_list("state", flat=True).get(pk=rollout.pk)
        if state in FINISHED_STATES:
            return state
        time.sleep(0.05)
    return Rollout.objects.values_list("state", flat=True).get(pk=rollout.pk)


def fan_out(ctx: Context, count: int) -> tuple[float | None, float | None, str, float]:
    """One rollout to ``count`` devices: (seconds to all active, to completed, final state, evaluator ms)."""
    from fleet.services import rollouts

    prefix = f"fan{count}"
    wait_registered(prefix, count, timeout=60 + count / 100)
    tag = tag_devices(prefix)
    stage = {"percent": 100, "min_soak_seconds": 0}
    version = tiny_release(f"{prefix}-a")
    rollout = rollouts.create_rollout(version, stages=[stage], actor="system", tags=[tag],
                                      max_per_minute=count * 10, name=f"fan-out to {count}")  # fmt: skip
    started = time.monotonic()
    rollouts.start_rollout(rollout, actor="system", reason="fan-out benchmark")
    assigned = time.monotonic() - started
    waited = wait_active(version, count, timeout=60 + count / 50, log=ctx.log)
    # From start_rollout, as the section says: assigning the devices is part of the fan-out.
    active = assigned + waited if waited is not None else None
    state = wait_finished(rollout, timeout=30)
    completed = time.monotonic() - started if state == "completed" else None
    ctx.log(f"fan-out x{count}: assigned in {assigned:.2f} s, all active {waited} s later, rollout {state}")
    return active, completed, state, evaluator_cost(ctx, count, prefix, tag)


def evaluator_cost(ctx: Context, count: int, prefix: str, tag: str) -> float:
    """Median ms of ``evaluate_rollout`` on a running rollout of ``count`` members that holds on its soak."""
    from fleet.services import rollouts

    version = tiny_release(f"{prefix}-b")
    stage = {"percent": 100, "min_soak_seconds": 3600, "health_p95_ratio": 1.5, "health_min_samples": 1}
    rollout = rollouts.create_rollout(version, stages=[stage], actor="system", tags=[tag], max_per_minute=count * 10)
    rollouts.start_rollout(rollout, actor="system", reason="evaluator benchmark")
    wait_active(version, count, timeout=60 + count / 50)
    times = []
    for _ in range(EVALUATOR_PASSES):
        t0 = time.perf_counter()
        result = rollouts.evaluate_rollout(rollout.pk)
        times.append((time.perf_counter() - t0) * 1000)
        if result is None or result.state != "running":
            raise RuntimeError(f"the soaking rollout should hold, it is {result and result.state}")
    rollouts.abort_rollout(rollout, actor="system", reason="benchmark done")
    return statistics.median(times)


def run(ctx: Context) -> Section:
    from django.db import connections

    sizes = ctx.sizes
    section = Section(
        "Rollout fan-out",
        "python -m bench.run --only fanout",
        notes=[
            "A single-stage rollout (100%, no soak) of a new version whose one file is a tiny ONNX graph, "
            "started with `start_rollout`; one Celery worker (solo pool) publishes the desired messages, one "
            "`run_bridge` applies the reports; simulated devices report downloading then active without fetching. "
            "Devices/s = N / (seconds from `start_rollout` to N active deployments in PostgreSQL). "
            f"Evaluator: median of {EVALUATOR_PASSES} `evaluate_rollout` passes on a running rollout of the same "
            "N devices that holds on its soak (success, failure and health gates judged)."
        ],
    )
    bridge = harness.bridges(1, ctx.env, ctx.workdir)[0]
    worker = harness.worker(ctx.env, ctx.workdir)
    try:
        harness.wait_for_log(bridge, "bridge connecting")
        harness.wait_for_log(worker, "ready", timeout=60)
        for count in sizes.fanout_devices:
            fleet = start_fleet(ctx, f"fan{count}", count, seconds=120 + count / 40)
            try:
                active, completed, state, evaluator_ms = fan_out(ctx, count)
            finally:
                for proc in fleet:
                    proc.terminate()
                    proc.join(timeout=30)
            rate = count / active if active else None
            section.figures.append(
                Figure(section.title, f"fan-out to {count:,} devices", rate, "devices/s",
                       ceiling=f"AWS IoT Jobs: {AWS_IOT_JOBS_PER_S:.1f} devices/s (1,000 a minute)",
                       target="≥ 1,000 devices/s", met=(rate or 0) >= 1000,
                       note=f"all active in {active:.2f} s; rollout {state}"
                            + (f" after {completed:.2f} s" if completed else "") if active else "timed out")
            )  # fmt: skip
            section.figures.append(
                Figure(section.title, f"gate evaluator, one pass over {count:,} members", evaluator_ms, "ms",
                       ceiling="", target="", note="median of evaluate_rollout")
            )  # fmt: skip
        connections.close_all()
    finally:
        import os

        if os.environ.get("BENCH_DEBUG"):
            print(bridge.output()[-4000:], worker.output()[-6000:])
        worker.stop()
        bridge.stop()
    return section
