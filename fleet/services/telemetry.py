"""Heartbeats: stored in batches, because a fleet sends thousands a second."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from django.db import transaction
from django.db.models import Max

from agent import wire
from fleet.models import Device, Heartbeat


@dataclass(frozen=True, slots=True)
class ReceivedHeartbeat:
    device_pk: int
    message: wire.Heartbeat
    received_at: datetime


def device_pks(device_ids: Iterable[str]) -> dict[str, int]:
    return dict(Device.objects.filter(device_id__in=set(device_ids)).values_list("device_id", "pk"))


def heartbeat_row(item: ReceivedHeartbeat) -> Heartbeat:
    beat = item.message
    latency = beat.latency
    return Heartbeat(
        device_id=item.device_pk,
        received_at=item.received_at,
        sent_at=datetime.fromtimestamp(beat.sent_at, tz=UTC),
        seq=beat.seq,
        uptime_s=beat.uptime_s,
        cpu_percent=beat.cpu_percent,
        mem_rss_bytes=beat.mem_rss_bytes,
        mem_available_bytes=beat.mem_available_bytes,
        deployment_id_reported=beat.active.deployment_id if beat.active else None,
        active_sha256=beat.active.sha256 if beat.active else "",
        requests=beat.requests,
        errors=beat.errors,
        latency_count=latency.count if latency else 0,
        p50_ms=latency.p50_ms if latency else None,
        p95_ms=latency.p95_ms if latency else None,
        p99_ms=latency.p99_ms if latency else None,
        max_ms=latency.max_ms if latency else None,
    )


def store_heartbeats(batch: Sequence[ReceivedHeartbeat]) -> int:
    """Store a batch in one transaction and bring each device's last-seen forward."""
    if not batch:
        return 0
    with transaction.atomic():
        Heartbeat.objects.bulk_create([heartbeat_row(item) for item in batch], batch_size=1000)
        newest = max(item.received_at for item in batch)
        # One UPDATE for the batch: a device's last_seen is at most a batch window late.
        Device.objects.filter(pk__in={item.device_pk for item in batch}).update(online=True, last_seen=newest)
    return len(batch)


def latest_heartbeat_at(device: Device) -> datetime | None:
    return device.heartbeats.aggregate(at=Max("received_at"))["at"]
