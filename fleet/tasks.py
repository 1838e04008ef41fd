"""Celery tasks: they take ids, re-read what they need, call a service, and are idempotent."""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from pathlib import Path

from celery import shared_task
from django.conf import settings

from agent.contract import wire
from fleet.models import Device
from fleet.mqtt.publisher import get_publisher
from fleet.services import devices, heartbeat_retention, notifications, reconcile, registry, rollouts
from fleet.services.desired import desired_messages

log = logging.getLogger(__name__)


@shared_task(name="fleet.process_artifact", autoretry_for=(OSError,), retry_backoff=True, max_retries=5)
def process_artifact(artifact_id: int) -> str | None:
    artifact = registry.process_artifact(artifact_id)
    return artifact.status if artifact else None


@shared_task(name="fleet.retry_stale_artifacts")
def retry_stale_artifacts() -> int:
    """The beat: uploads whose worker died, or whose task was lost, are checked again."""
    return len(registry.retry_stale_artifacts())


@shared_task(name="fleet.publish_desired", autoretry_for=(Exception,), retry_backoff=True, max_retries=10)
def publish_desired(device_pks: list[int]) -> int:
    """Publish each device's current desired state, retained. Safe to repeat.

    The messages are built for the whole list at once (desired_messages: a few queries, each
    version's files and self-test read once) and sent before waiting for any acknowledgement.
    """
    started = time.monotonic()
    devices_ = list(Device.objects.filter(pk__in=device_pks).only("pk", "device_id"))
    messages = [
        (wire.topic(d.device_id, wire.Channel.DESIRED), wire.encode(desired), True)
        for d, desired in zip(devices_, desired_messages(devices_), strict=True)
    ]
    built = time.monotonic()
    sent = get_publisher().publish_many(messages)
    log.info("desired state of %d device(s): built in %.3f s, published and acknowledged in %.3f s",
             sent, built - started, time.monotonic() - built)  # fmt: skip
    return sent


@shared_task(name="fleet.mark_offline_devices")
def mark_offline_devices() -> int:
    return devices.mark_offline_devices(older_than=timedelta(seconds=settings.DEVICE_OFFLINE_AFTER))


@shared_task(name="fleet.maintain_heartbeats")
def maintain_heartbeats() -> dict[str, int]:
    """Roll up the hours that ended, make the next days' partitions, drop what is past the retention."""
    done = heartbeat_retention.maintain_heartbeats()
    return {
        "hours_rolled_up": len(done.hours_rolled_up),
        "partitions_created": len(done.partitions_created),
        "partitions_dropped": len(done.partitions_dropped),
        "rows_deleted": done.rows_deleted,
        "rollups_deleted": done.rollups_deleted,
    }


@shared_task(name="fleet.reconcile_deployments")
def reconcile_deployments() -> dict[str, int]:
    """Repair deployments from what devices report they run; republish lost desired messages."""
    done = reconcile.reconcile_deployments()
    return {"activated": len(done.activated), "republished": len(done.republished), "drifted": len(done.drifted)}


@shared_task(name="fleet.evaluate_rollout")
def evaluate_rollout(rollout_id: int) -> str | None:
    """Judge one rollout's gates now; a rollout that is not running is left alone."""
    rollout = rollouts.evaluate_rollout(rollout_id)
    return rollout.state if rollout else None


@shared_task(name="fleet.evaluate_rollouts")
def evaluate_rollouts() -> int:
    """The beat: every running rollout, so soak times end and rate-limited stages fill up."""
    ids = rollouts.running_rollout_ids()
    for rollout_id in ids:
        rollouts.evaluate_rollout(rollout_id)
    return len(ids)


@shared_task(name="fleet.evaluate_rollouts_of_deployments")
def evaluate_rollouts_of_deployments(deployment_ids: list[int]) -> int:
    """Devices reported on these deployments: judge the running rollouts they belong to."""
    ids = rollouts.rollout_ids_for_deployments(deployment_ids)
    for rollout_id in ids:
        rollouts.evaluate_rollout(rollout_id)
    return len(ids)


WEBHOOK_RETRIES = 5


@shared_task(name="fleet.deliver_webhook", bind=True, max_retries=WEBHOOK_RETRIES)
def deliver_webhook(self, url: str, body: dict) -> int | None:
    """POST one rollout event; retried with backoff, audited once delivered or given up."""
    attempts = self.request.retries + 1
    try:
        status = notifications.post_event(url, body)
    except notifications.DeliveryFailed as exc:
        if self.request.retries < WEBHOOK_RETRIES:
            raise self.retry(countdown=min(600, 5 * 2**self.request.retries), exc=exc) from exc
        notifications.record_delivery(url, body, attempts=attempts, error=str(exc))
        return None
    notifications.record_delivery(url, body, attempts=attempts, status=status)
    return status


# --- Model pipeline ---------------------------------------------------------------------


@shared_task(name="fleet.import_hf_model")
def import_hf_model(directory: str, model_name: str, optimize: bool = False) -> int:
    """Import a BERT-family checkpoint directory into a new draft; optionally start its pipeline.

    Not idempotent by nature (each run is a new version): it is never retried automatically.
    """
    from fleet.services import pipeline

    version = pipeline.import_hf_checkpoint(Path(directory), model_name=model_name, actor="system")
    if optimize:
        pipeline.start_pipeline(version, actor="system")
    return version.pk


@shared_task(name="fleet.run_pipeline", bind=True)
def run_pipeline(self, pipeline_id: int) -> str | None:
    from fleet.models import Pipeline
    from fleet.services import generative, pipeline

    if Pipeline.objects.filter(pk=pipeline_id, options__generate=True).exists():
        result = generative.run_pipeline(pipeline_id, progress=_progress(self, pipeline_id=pipeline_id))
    else:
        result = pipeline.run_pipeline(pipeline_id)
    return result.state if result else None


@shared_task(name="fleet.build_variant", bind=True)
def build_variant(self, step_id: int) -> str | None:
    from fleet.models import PipelineStep
    from fleet.services import generative, pipeline

    if PipelineStep.objects.filter(pk=step_id, pipeline__options__generate=True).exists():
        step = generative.build_variant(step_id, progress=_progress(self, step_id=step_id))
    else:
        step = pipeline.build_variant(step_id)
    return step.state if step else None


@shared_task(name="fleet.import_gguf")
def import_gguf(path: str, model_name: str) -> int:
    """Store a GGUF as a new generate draft's source and queue its conversion pipeline.

    Not idempotent by nature (each run is a new version): it is never retried automatically.
    """
    from fleet.services import generative

    return generative.import_gguf(Path(path), model_name=model_name, actor="system").pk


def _progress(task, **ids):
    """A callback that logs a long conversion's progress and shows it as the task's state."""

    def report(message: str) -> None:
        log.info("%s %s: %s", task.name, ids, message)
        if task.request.id and not task.request.is_eager:
            task.update_state(state="PROGRESS", meta={**ids, "message": message})

    return report
