"""Rollout events reach the operators' webhooks: a real local HTTP server receives the JSON POSTs."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from controlplane.celery import app as celery_app
from fleet.models import AuditEvent
from fleet.services import rollouts
from tests.fleet.helpers import make_device, make_published_version

pytestmark = pytest.mark.django_db


class Hook:
    """An HTTP server on a free port that answers each POST with the next status of ``answers``."""

    def __init__(self, answers: list[int]):
        self.answers = list(answers)
        self.received: list[dict] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                hook.received.append({"type": self.headers["Content-Type"], "body": json.loads(body)})
                self.send_response(hook.answers.pop(0) if len(hook.answers) > 1 else hook.answers[0])
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/edgefleet?token=s3cret"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hook_factory(settings):
    """Webhooks on local servers; eager tasks retry as a worker would (a propagated Retry would not)."""
    made = []
    propagates = celery_app.conf.task_eager_propagates
    celery_app.conf.task_eager_propagates = False

    def make(answers):
        hook = Hook(answers)
        made.append(hook)
        settings.ROLLOUT_WEBHOOKS = [*settings.ROLLOUT_WEBHOOKS, hook.url]
        return hook

    settings.ROLLOUT_WEBHOOKS = []
    yield make
    celery_app.conf.task_eager_propagates = propagates
    for hook in made:
        hook.close()


@pytest.fixture
def lab():
    return [make_device(f"dev-{i}", tags=["lab"]) for i in range(2)]


def completed_rollout(django_capture_on_commit_callbacks):
    version = make_published_version()
    rollout = rollouts.create_rollout(version, stages=[{"percent": 100, "success_percent": 0}], tags=["lab"],
                                      actor="system")  # fmt: skip
    with django_capture_on_commit_callbacks(execute=True):
        rollouts.start_rollout(rollout, actor="system")
    return rollout


def test_it_posts_the_completed_event_to_every_webhook(lab, hook_factory, django_capture_on_commit_callbacks):
    first, second = hook_factory([200]), hook_factory([204])

    rollout = completed_rollout(django_capture_on_commit_callbacks)

    assert [r["body"]["event"] for r in first.received + second.received] == ["rollout.completed"] * 2
    body = first.received[0]["body"]
    assert (body["rollout"], body["state"], first.received[0]["type"]) == (rollout.pk, "completed", "application/json")
    assert "every stage passed" in body["reason"]
    audits = AuditEvent.objects.filter(action="rollout.webhook_delivered", object_id=str(rollout.pk))
    assert sorted(a.after["status"] for a in audits) == [200, 204]
    # The host, never the URL with its secret.
    assert all(a.after["host"].startswith("127.0.0.1:") and "s3cret" not in str(a.after) for a in audits)


def test_it_retries_a_failing_webhook_and_audits_the_attempts(lab, hook_factory, django_capture_on_commit_callbacks):
    flaky = hook_factory([500, 503, 200])

    rollout = completed_rollout(django_capture_on_commit_callbacks)

    assert len(flaky.received) == 3
    audit = AuditEvent.objects.get(action="rollout.webhook_delivered", object_id=str(rollout.pk))
    assert (audit.after["attempts"], audit.after["status"]) == (3, 200)


def test_it_gives_up_after_its_retries_and_says_so(lab, hook_factory, django_capture_on_commit_callbacks):
    down = hook_factory([500])

    rollout = completed_rollout(django_capture_on_commit_callbacks)

    assert len(down.received) == 6  # the first try and 5 retries
    audit = AuditEvent.objects.get(action="rollout.webhook_failed", object_id=str(rollout.pk))
    assert (audit.after["attempts"], audit.reason) == (6, "HTTP 500")


def test_it_posts_the_rollback_event_with_its_reason(lab, hook_factory, django_capture_on_commit_callbacks):
    hook = hook_factory([200])
    version = make_published_version()
    rollout = rollouts.create_rollout(version, stages=[{"device_count": 1, "min_soak_seconds": 3600}], tags=["lab"],
                                      actor="system")  # fmt: skip
    rollouts.start_rollout(rollout, actor="system")

    with django_capture_on_commit_callbacks(execute=True):
        rollouts.rollback_rollout(rollout, actor="system", reason="canary looks wrong")

    assert [(r["body"]["event"], r["body"]["reason"]) for r in hook.received] == [
        ("rollout.rolled_back", "canary looks wrong")
    ]


def test_a_hold_past_its_deadline_posts_the_hold_expired_event_once(
    lab, hook_factory, django_capture_on_commit_callbacks
):
    from datetime import timedelta

    from django.utils import timezone

    from fleet.services.desired import current_deployment
    from tests.fleet.test_rollout_truth import report_state

    hook = hook_factory([200])
    version = make_published_version()
    stage = {"device_count": 1, "health_p95_ratio": "1.5", "inconclusive_timeout": 60, "inconclusive_action": "notify"}
    rollout = rollouts.create_rollout(version, stages=[stage, {"percent": 100}], tags=["lab"], actor="system")
    rollouts.start_rollout(rollout, actor="system")
    canary = rollout.members.select_related("device").get()
    report_state(canary.device, current_deployment(canary.device), "active")
    now = timezone.now()

    with django_capture_on_commit_callbacks(execute=True):
        for seconds in (0, 30, 61, 90):
            rollouts.evaluate_rollout(rollout.pk, now=now + timedelta(seconds=seconds))

    assert [r["body"]["event"] for r in hook.received] == ["rollout.hold_expired"]
    body = hook.received[0]["body"]
    assert (body["stage"], body["rollout"]) == (0, rollout.pk)
    assert "held past its deadline (60 s): health gate inconclusive: 0 samples" in body["reason"]
