"""Rollout events sent to the operators' webhooks: a JSON POST per event and URL, from a Celery task.

Like Argo Rollouts' notifications and hawkBit's events: a rollout that rolls back, completes, or
holds past its deadline tells the configured URLs (settings.ROLLOUT_WEBHOOKS). Each delivery is
queued after the state change commits, retried with backoff, and ends in an audit row that names
the URL's host (never the whole URL: webhook URLs often carry a secret).
"""

from __future__ import annotations

import functools
import json
import logging
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from fleet import jobs
from fleet.choices import RolloutState
from fleet.models import Rollout
from fleet.services.audit import record

log = logging.getLogger(__name__)

TIMEOUT_S = 10
_FINISHED_EVENTS = {RolloutState.ROLLED_BACK: "rollout.rolled_back", RolloutState.COMPLETED: "rollout.completed"}


class DeliveryFailed(Exception):
    """The webhook did not answer 2xx; the text says what it answered."""


def event_body(rollout: Rollout, event: str, *, reason: str, **extra: Any) -> dict:
    return {
        "event": event,
        "rollout": rollout.pk,
        "name": str(rollout),
        "version": rollout.version.label,
        "stage": rollout.current_stage,
        "reason": reason,
        "at": timezone.now().isoformat(),
        **extra,
    }


def notify(rollout: Rollout, event: str, *, reason: str, **extra: Any) -> None:
    """Queue the event for every configured webhook once the caller's transaction commits."""
    urls = list(settings.ROLLOUT_WEBHOOKS)
    if not urls:
        return
    body = event_body(rollout, event, reason=reason, **extra)
    for url in urls:
        transaction.on_commit(functools.partial(_enqueue, url, body))


def _enqueue(url: str, body: dict) -> None:
    # After the commit: a broker that is down must not turn the committed change into an error.
    try:
        jobs.enqueue("fleet.deliver_webhook", url, body)
    except Exception:
        log.exception("queueing the %s webhook to %s failed", body["event"], urlsplit(url).netloc)


def notify_rollout_finished(rollout: Rollout, state: str, *, reason: str) -> None:
    event = _FINISHED_EVENTS.get(RolloutState(state))
    if event is not None:
        notify(rollout, event, reason=reason, state=str(state))


def post_event(url: str, body: dict) -> int:
    """POST the event as JSON; the status code, or DeliveryFailed for anything but 2xx."""
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "User-Agent": "edgefleet-webhook/1"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:  # noqa: S310  # http(s) only, checked in settings
            return response.status
    except urllib.error.HTTPError as exc:
        raise DeliveryFailed(f"HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise DeliveryFailed(f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}") from None


def record_delivery(url: str, body: dict, *, attempts: int, status: int | None = None, error: str = "") -> None:
    """The audit row of one delivery, delivered or given up."""
    rollout = Rollout.objects.select_related("version__model").filter(pk=int(body.get("rollout") or 0)).first()
    if rollout is None:
        return
    action = "rollout.webhook_delivered" if not error else "rollout.webhook_failed"
    after = {"event": body.get("event"), "host": urlsplit(url).netloc, "attempts": attempts, "status": status}
    record("system", action, rollout, after=after, reason=error)
    if error:
        log.warning("webhook to %s gave up after %d attempt(s): %s", urlsplit(url).netloc, attempts, error)
