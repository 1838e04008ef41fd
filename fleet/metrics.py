"""The plane's ``/metrics`` for Prometheus: the fleet's state, read from the database when scraped.

Every figure here is a count or a timestamp the database holds, so each gunicorn worker
answers the same and no multiprocess registry is needed. The bridges and the Celery
workers serve their own (``fleet.bridge.metrics``, ``fleet.worker_metrics``); docs/metrics.md
lists every series.
"""

from __future__ import annotations

import hmac
import shutil
from collections.abc import Iterator
from pathlib import Path

from django.conf import settings
from django.db.models import Count, Max
from django.http import HttpRequest, HttpResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fleet.choices import DeploymentState, RolloutState
from fleet.models import Deployment, Device, Heartbeat, Rollout

LOOPBACK = ("127.0.0.1", "::1")


class FleetCollector(Collector):
    """Devices online and offline, deployments and rollouts by state, the artifact store's disk."""

    def collect(self) -> Iterator[Metric]:
        devices = GaugeMetricFamily(
            "edgefleet_devices", "Devices, by enrollment state and whether they are online.",
            labels=["enrollment", "status"],
        )  # fmt: skip
        rows = Device.objects.values("enrollment", "online").annotate(n=Count("id")).order_by()
        for row in rows:
            devices.add_metric([row["enrollment"] or "", "online" if row["online"] else "offline"], row["n"])
        yield devices
        yield _by_state("edgefleet_deployments", "Deployments, by state.", Deployment, DeploymentState)
        yield _by_state("edgefleet_rollouts", "Rollouts, by state.", Rollout, RolloutState)
        newest = Heartbeat.objects.aggregate(at=Max("received_at"))["at"]
        yield GaugeMetricFamily(
            "edgefleet_heartbeat_last_received_timestamp_seconds",
            "When the newest stored heartbeat reached a bridge (Unix time; 0 before the first).",
            value=newest.timestamp() if newest else 0.0,
        )
        usage = _disk_usage(Path(settings.ARTIFACT_ROOT))
        if usage is not None:
            yield GaugeMetricFamily("edgefleet_artifact_store_size_bytes",
                                    "Size of the artifact store's file system.", value=usage.total)  # fmt: skip
            yield GaugeMetricFamily("edgefleet_artifact_store_free_bytes",
                                    "Free bytes on the artifact store's file system.", value=usage.free)  # fmt: skip


def _by_state(name: str, documentation: str, model, states) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=["state"])
    counts = dict(model.objects.values_list("state").annotate(n=Count("id")).order_by())
    # Every state, zeros too: an alert on a state's change needs the series before it first moves.
    for state in states.values:
        family.add_metric([state], counts.get(state, 0))
    return family


def _disk_usage(root: Path):
    # The store may not exist yet on a fresh install: its nearest existing parent is the same disk.
    for path in (root, *root.parents):
        if path.exists():
            return shutil.disk_usage(path)
    return None


REGISTRY = CollectorRegistry(auto_describe=False)
REGISTRY.register(FleetCollector())


def metrics_view(request: HttpRequest) -> HttpResponse:
    """Prometheus' scrape: for loopback clients, or for any client with the METRICS_TOKEN bearer token."""
    if not _may_scrape(request):
        return HttpResponse(
            "metrics are served to 127.0.0.1, or with 'Authorization: Bearer <METRICS_TOKEN>'\n",
            status=403, content_type="text/plain",
        )  # fmt: skip
    return HttpResponse(generate_latest(REGISTRY), content_type=CONTENT_TYPE_LATEST)


def _may_scrape(request: HttpRequest) -> bool:
    token = settings.METRICS_TOKEN
    sent = request.headers.get("Authorization", "")
    if token and hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
        return True
    # Behind a reverse proxy every client looks local: set METRICS_TOKEN there (docs/metrics.md).
    return request.META.get("REMOTE_ADDR") in LOOPBACK
