"""Celery tasks: they take ids, re-read what they need, call a service, and are idempotent."""

from __future__ import annotations

from datetime import timedelta

from celery import shared_task
from django.conf import settings

from agent import wire
from fleet.models import Device
from fleet.mqtt.publisher import get_publisher
from fleet.services import devices, registry
from fleet.services.deployments import desired_message


@shared_task(name="fleet.process_artifact", autoretry_for=(OSError,), retry_backoff=True, max_retries=5)
def process_artifact(artifact_id: int) -> str | None:
    artifact = registry.process_artifact(artifact_id)
    return artifact.status if artifact else None


@shared_task(name="fleet.publish_desired", autoretry_for=(Exception,), retry_backoff=True, max_retries=10)
def publish_desired(device_pks: list[int]) -> int:
    """Publish each device's current desired state, retained. Safe to repeat."""
    devices_ = Device.objects.filter(pk__in=device_pks)
    messages = [
        (wire.topic(d.device_id, wire.Channel.DESIRED), wire.encode(desired_message(d)), True) for d in devices_
    ]
    return get_publisher().publish_many(messages)


@shared_task(name="fleet.mark_offline_devices")
def mark_offline_devices() -> int:
    return devices.mark_offline_devices(older_than=timedelta(seconds=settings.DEVICE_OFFLINE_AFTER))
