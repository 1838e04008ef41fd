"""What the import commands share: waiting for the pipeline they queued."""

from __future__ import annotations

import time

from django.core.management.base import CommandError, OutputWrapper

from fleet.choices import OPEN_PIPELINE_STATES
from fleet.models import Pipeline


def wait_for_pipeline(stdout: OutputWrapper, pipeline_pk: int, wait: float) -> None:
    """Poll the pipeline until it ends or ``wait`` seconds pass (a CommandError); 0 returns at once."""
    deadline = time.monotonic() + wait
    while wait and time.monotonic() < deadline:
        state = Pipeline.objects.get(pk=pipeline_pk).state
        if state not in OPEN_PIPELINE_STATES:
            stdout.write(f"Pipeline {pipeline_pk} {state}.")
            return
        time.sleep(1)
    if wait:
        raise CommandError(f"pipeline {pipeline_pk} still running after {wait:.0f} s")
