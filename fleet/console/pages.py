"""What each console page shows, read in a fixed number of queries whatever the size of the fleet.

Reads only: every change an operator makes from the console goes through fleet.services.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.db.models import Case, Count, F, FloatField, Q, QuerySet, Sum, When
from django.db.models.functions import TruncSecond

from fleet.choices import ACTIVE_ROLLOUT_STATES, DeploymentState, EnrollmentState, RolloutState
from fleet.lib import gates, hardware, humanize
from fleet.models import Deployment, Device, Heartbeat, Rollout
from fleet.services import rollouts

RECENT = 10
HEARTBEAT_RATE_WINDOW = timedelta(minutes=1)
# The chart reads at most this many points per page.
CHART_POINTS = 2000
DEVICE_HISTORY = timedelta(hours=24)
FAILED_STATES = (DeploymentState.FAILED, DeploymentState.ROLLED_BACK)

# --- The fleet overview ----------------------------------------------------------------


def overview(*, now: datetime) -> dict:
    """Devices by class and status, versions per model, active rollouts, recent trouble, heartbeat rate."""
    active = list(
        Rollout.objects.filter(state__in=ACTIVE_ROLLOUT_STATES)
        .select_related("version__model")
        .prefetch_related("stages")
        .order_by("-started_at", "-id")[:20]
    )
    counts = rollouts.stage_counts_of([r.pk for r in active])
    beats = Heartbeat.objects.filter(received_at__gte=now - HEARTBEAT_RATE_WINDOW).count()
    return {
        "classes": _devices_by_class(),
        "models": _versions_per_model(),
        "rollouts": [_rollout_bars(r, counts.get(r.pk, {})) for r in active],
        "failures": _recent_failures(),
        "rollbacks": list(
            Rollout.objects.filter(state=RolloutState.ROLLED_BACK)
            .select_related("version__model")
            .only("name", "reason", "finished_at", "version__number", "version__model__name")
            .order_by("-finished_at", "-id")[:RECENT]
        ),
        "heartbeats_per_minute": beats,
        "heartbeats_per_second": beats / HEARTBEAT_RATE_WINDOW.total_seconds(),
    }


def _devices_by_class() -> list[dict]:
    accepted = Q(enrollment=EnrollmentState.ACCEPTED)
    rows = (
        Device.objects.values("hardware_class")
        .annotate(
            # Not named after the fields they count: an annotation "online" would shadow the field.
            n_online=Count("pk", filter=accepted & Q(online=True)),
            n_offline=Count("pk", filter=accepted & Q(online=False)),
            n_pending=Count("pk", filter=Q(enrollment=EnrollmentState.PENDING)),
            n_total=Count("pk"),
        )
        .order_by("hardware_class")
    )
    return [{**row, "hardware_class": row["hardware_class"] or "unknown"} for row in rows]


def _versions_per_model() -> list[dict]:
    rows = (
        Device.objects.filter(current_version__isnull=False)
        .values("current_version__model__name", "current_version__number")
        .annotate(devices=Count("pk"))
        .order_by("current_version__model__name", "-current_version__number")
    )
    models: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        name = row["current_version__model__name"]
        models[name].append({"label": f"{name}:{row['current_version__number']}", "devices": row["devices"]})
    return [{"model": m, "versions": v, "devices": sum(x["devices"] for x in v)} for m, v in models.items()]


def _recent_failures() -> QuerySet[Deployment]:
    return (
        Deployment.objects.filter(state__in=FAILED_STATES)
        .select_related("device", "version__model")
        .only("state", "error", "failed_at", "device__device_id", "version__number", "version__model__name")
        .order_by("-failed_at", "-id")[:RECENT]
    )


@dataclass
class StageBar:
    """One stage as a bar: how much of what it reached is active, failed, still on its way."""

    name: str
    status: str
    counts: gates.StageCounts
    active_pct: float
    failed_pct: float
    moving_pct: float


def _rollout_bars(rollout: Rollout, counts: dict[int, gates.StageCounts]) -> dict:
    bars = []
    for stage in rollout.stages.all():
        c = counts.get(stage.index, gates.StageCounts())
        whole = c.targeted or 1
        status = "passed" if stage.passed_at else "current" if stage.index == rollout.current_stage else "pending"
        bars.append(
            StageBar(
                name=str(stage),
                status=status,
                counts=c,
                active_pct=100 * c.active / whole,
                failed_pct=100 * c.failures / whole,
                moving_pct=100 * (c.pending + c.downloading + c.verifying) / whole,
            )
        )
    return {"rollout": rollout, "stages": bars}


# --- A rollout -----------------------------------------------------------------------


ACTIONS = {
    # action -> (states it applies to, what it does, in the operator's words)
    "pause": ((RolloutState.RUNNING,), "No more assignments and no gate verdicts; devices keep what they run."),
    "resume": ((RolloutState.PAUSED,), "Assign and judge the gates again, at once."),
    "promote": (
        (RolloutState.RUNNING,),
        "End the current stage's soak now; its gates must still pass (refused while the stage is held).",
    ),
    "abort": (
        (RolloutState.DRAFT, RolloutState.RUNNING, RolloutState.PAUSED),
        "Stop for good; devices keep the version they run. Roll back afterwards to undo it.",
    ),
    "rollback": (
        (RolloutState.RUNNING, RolloutState.PAUSED, RolloutState.ABORTED),
        "Send every device this rollout reached back to the version it ran before.",
    ),
}


def rollout_page(rollout: Rollout, *, now: datetime) -> dict:
    progress = rollouts.rollout_progress(rollout, now=now)
    return {
        "progress": progress,
        "chart": canary_chart(rollout, progress),
        "actions": [
            {"name": name, "effect": effect} for name, (states, effect) in ACTIONS.items() if rollout.state in states
        ],
    }


def canary_chart(rollout: Rollout, progress: dict) -> dict:
    """The first stage's p95 over time: before the rollout reached each device (the baseline), and after."""
    first = progress["stages"][0]["stage"] if progress["stages"] else None
    health = first is not None and first.health_p95_ratio is not None
    rows = (
        Heartbeat.objects.filter(
            device__rollout_memberships__rollout=rollout,
            device__rollout_memberships__stage_index=0,
            received_at__gte=F("device__rollout_memberships__assigned_at") - rollouts.BASELINE_WINDOW,
            latency_count__gt=0,
        )
        .annotate(
            at=TruncSecond("received_at"),
            new=Case(
                When(deployment_id_reported=F("device__rollout_memberships__deployment_id"), then=True),
                default=False,
            ),
        )
        .values("at", "new")
        .annotate(weighted=Sum(F("p95_ms") * F("latency_count"), output_field=FloatField()), n=Sum("latency_count"))
        .order_by("-at")[:CHART_POINTS]
    )
    points = sorted((row["at"].timestamp(), row["new"], row["weighted"] / row["n"]) for row in rows)
    before = [p for t, new, p in points if not new]
    baseline = sum(before) / len(before) if before else None
    ratio = first.health_p95_ratio if first is not None else None
    limit = float(ratio) * baseline if health and ratio is not None and baseline is not None else None
    series: list[dict[str, Any]] = [
        {"label": "baseline p95", "key": "baseline", "stroke": "#7a8a9c"},
        {"label": f"{rollout.version.label} p95", "key": "candidate", "stroke": "#c62828"},
    ]
    if limit is not None:
        series.append({"label": "limit", "key": "limit", "stroke": "#b26a00", "dash": [6, 4]})
    data = {
        "t": [t for t, _, _ in points],
        "baseline": [None if new else round(p, 3) for _, new, p in points],
        "candidate": [round(p, 3) if new else None for _, new, p in points],
        "limit": [round(limit, 3) if limit is not None else None for _ in points],
    }
    empty = "No latency reported by the first stage's devices yet."
    return {"spec": {"series": series, "data": data, "unit": "ms", "empty": empty}, "baseline_p95": baseline,
            "limit_p95": limit}  # fmt: skip


# --- A device --------------------------------------------------------------------------


def device_page(device: Device, *, now: datetime) -> dict:
    beats = list(
        Heartbeat.objects.filter(device=device, received_at__gte=now - DEVICE_HISTORY)
        .order_by("-received_at")
        .values(
            "received_at",
            "p50_ms",
            "p95_ms",
            "p99_ms",
            "cpu_percent",
            "mem_rss_bytes",
            "mem_available_bytes",
            "requests",
            "errors",
            "gen_requests",
            "ttft_p50_ms",
            "ttft_p95_ms",
            "decode_tps_p50",
        )[:CHART_POINTS]  # fmt: skip
    )
    beats.reverse()
    history = list(
        device.deployments.select_related("version__model", "artifact")
        .only(
            "device",
            "state",
            "error",
            "created_at",
            "active_at",
            "failed_at",
            "bytes_done",
            "bytes_total",
            "version__number",
            "version__model__name",
            "artifact__precision",
            "artifact__hardware_class",
            "artifact__size",
            "artifact__sha256",
        )  # fmt: skip
        .order_by("-id")[:20]
    )
    latest = beats[-1] if beats else None
    return {
        "latest": latest,
        "history": history,
        "slots": _slots(device, history),
        "hardware": hardware_summary(device),
        "latency_chart": {
            "series": [
                {"label": "p50", "key": "p50", "stroke": "#4a7bd0"},
                {"label": "p95", "key": "p95", "stroke": "#c62828"},
                {"label": "p99", "key": "p99", "stroke": "#7a3fb0"},
            ],
            "data": {
                "t": [b["received_at"].timestamp() for b in beats],
                "p50": [b["p50_ms"] for b in beats],
                "p95": [b["p95_ms"] for b in beats],
                "p99": [b["p99_ms"] for b in beats],
            },
            "unit": "ms",
            "empty": "No latency reported in the last 24 hours.",
        },
        "resource_chart": {
            "series": [{"label": "CPU", "key": "cpu", "stroke": "#1a7f37"}],
            "data": {"t": [b["received_at"].timestamp() for b in beats], "cpu": [b["cpu_percent"] for b in beats]},
            "unit": "%",
            "empty": "No heartbeat in the last 24 hours.",
        },
        "memory_chart": {
            "series": [{"label": "agent memory (RSS)", "key": "rss", "stroke": "#4a7bd0"}],
            "data": {
                "t": [b["received_at"].timestamp() for b in beats],
                "rss": [round(b["mem_rss_bytes"] / 2**20, 1) for b in beats],
            },
            "unit": "MiB",
            "empty": "No heartbeat in the last 24 hours.",
        },
        # Generative models: shown only where the device answered chat completions.
        "generation_chart": _generation_chart(beats) if any(b["gen_requests"] for b in beats) else None,
        "requests": sum(b["requests"] for b in beats),
        "errors": sum(b["errors"] for b in beats),
    }


def _generation_chart(beats: list[Any]) -> dict:
    """Time to first token (ms) and decode rate (tok/s) of the heartbeats that carried chat completions."""
    chatted = [b for b in beats if b["gen_requests"]]
    return {
        "series": [
            {"label": "TTFT p50 (ms)", "key": "ttft50", "stroke": "#4a7bd0"},
            {"label": "TTFT p95 (ms)", "key": "ttft95", "stroke": "#c62828"},
            {"label": "decode tok/s", "key": "tps", "stroke": "#1a7f37"},
        ],
        "data": {
            "t": [b["received_at"].timestamp() for b in chatted],
            "ttft50": [b["ttft_p50_ms"] for b in chatted],
            "ttft95": [b["ttft_p95_ms"] for b in chatted],
            "tps": [b["decode_tps_p50"] for b in chatted],
        },
        "unit": "",
        "empty": "No chat completion in the last 24 hours.",
    }


def _slots(device: Device, history: list[Deployment]) -> list[dict]:
    """The agent's A/B slots as the plane knows them: what runs, and the previous model kept to go back to."""
    ran = [d for d in history if d.active_at is not None]
    current = next((d for d in ran if d.version_id == device.current_version_id), None)
    previous = next((d for d in ran if d is not current and d.version_id != device.current_version_id), None)
    return [
        {"slot": "active", "deployment": current, "note": "serving now"},
        {"slot": "previous", "deployment": previous, "note": "kept on disk for a rollback"},
    ]


def hardware_summary(device: Device) -> list[tuple[str, str]]:
    cpu = humanize.plural(device.cpu_count, "CPU") if device.cpu_count else "CPUs unknown"
    return [
        ("Hardware class", device.hardware_class or "unknown"),
        ("System", " · ".join(x for x in (device.arch, device.os, device.os_release) if x) or "unknown"),
        ("CPU", f"{cpu}{', ' + device.cpu_model if device.cpu_model else ''}"),
        ("CPU features", hardware.cpu_features(device.cpu_flags or [])),
        ("Memory", humanize.size(device.ram_bytes) if device.ram_bytes else "unknown"),
        ("Free disk", humanize.size(device.disk_free_bytes) if device.disk_free_bytes else "unknown"),
        ("Execution providers", ", ".join(p.removesuffix("ExecutionProvider") for p in device.providers) or "none"),
        ("Agent", device.agent_version or "unknown"),
    ]
