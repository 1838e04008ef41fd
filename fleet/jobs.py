"""The one way to queue background work: by the task's name, never by importing the task.

Services queue work only once their transaction commits (``transaction.on_commit``), and
only through ``enqueue``. The tasks live in ``fleet/tasks.py``, which the app config
imports so that Celery knows them; nothing else imports it, so no service imports upward.
"""

from __future__ import annotations

from celery import current_app


class UnknownJob(LookupError):
    """A job named no task: a typo in the caller, not a runtime condition."""


def enqueue(name: str, *args: object) -> None:
    """Queue the task registered as ``name`` (its ``@shared_task(name=...)``) with ``args``."""
    try:
        task = current_app.tasks[name]
    except KeyError:
        raise UnknownJob(f"no task is registered as {name!r}; see fleet/tasks.py") from None
    task.delay(*args)
