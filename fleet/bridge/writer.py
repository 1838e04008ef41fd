"""Applying batches: the rule every kind of message follows, and the heartbeat writer thread.

A batch that fails for what it holds is applied again as batches of one (``apply_split``).
Heartbeats, nearly all of what a fleet sends, are stored by a thread of their own with its
own database connection (``HeartbeatWriter``): while it waits on PostgreSQL for one batch,
the database thread decodes the next, instead of the broker's messages queueing behind the
round trips (docs/benchmarks.md has the profile and the figures).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from django.db import InterfaceError, OperationalError, connection

from fleet.bridge.stats import Stats
from fleet.services import telemetry

log = logging.getLogger("fleet.bridge")

T = TypeVar("T")
R = TypeVar("R")
# What a lost or restarting database raises. Anything else a batch raises is about what it holds.
TRANSIENT_DB_ERRORS = (OperationalError, InterfaceError)


@dataclass
class Split(Generic[T, R]):
    """What became of a batch: the parts applied with their results, the items held, and why."""

    done: list[tuple[list[T], R]] = field(default_factory=list)
    held: list[T] = field(default_factory=list)
    # The database error that stopped it, when the rest is held.
    down: Exception | None = None


def apply_split(kind: str, items: list[T], apply: Callable[[list[T]], R], stats: Stats) -> Split[T, R]:
    """Apply ``items`` as one batch; if the batch fails for what it holds, as batches of one.

    An item that fails alone is dropped, counted as ``bad_<kind>`` and logged: one bad row can
    never stop a kind of message for the whole fleet. If the database cannot be reached,
    nothing is dropped: the items not applied are held, to be tried again once it answers.
    """
    started = time.perf_counter()
    try:
        result = apply(items)
        stats.batch_applied(kind, len(items), time.perf_counter() - started)
        return Split([(items, result)])
    except TRANSIENT_DB_ERRORS as exc:
        return Split(held=items, down=exc)
    except Exception:
        if len(items) > 1:
            log.warning("applying %d %s in one batch failed; applying them one by one", len(items), kind)
    split: Split[T, R] = Split()
    for n, item in enumerate(items):
        try:
            split.done.append(([item], apply([item])))
        except TRANSIENT_DB_ERRORS as exc:
            split.held, split.down = items[n:], exc
            return split
        except Exception:
            stats.add(f"bad_{kind}")
            log.exception("dropped one of %s that cannot be applied: %r", kind, item)
    return split


@dataclass
class Stored:
    """A heartbeat batch's outcome, handed back to the database thread."""

    split: Split[telemetry.ReceivedHeartbeat, int]
    # The deployments whose rollouts these heartbeats may decide now.
    judged: set[int]


def store_heartbeats(batch: list[telemetry.ReceivedHeartbeat], stats: Stats) -> Stored:
    """Store a batch (split on failure) and find the rollouts it decides, on this thread's connection."""
    split = apply_split("heartbeats", batch, telemetry.store_heartbeats, stats)
    stored = sum(n for _, n in split.done)
    stats.add("heartbeats_stored", stored)
    if split.done:  # in arrival order: the first is the one that waited longest
        stats.heartbeats_committed(split.done[0][0][0].received_at)
    judged: set[int] = set()
    try:
        for items, _ in split.done:
            # Their rollouts' health gates may judge now, not at the next 15 s beat.
            judged |= telemetry.judged_deployments(items)
    except Exception:
        # Only a shortcut: the evaluator's beat judges them anyway.
        log.exception("finding the rollouts these heartbeats decide failed")
    return Stored(split, judged)


class HeartbeatWriter:
    """One thread and one database connection storing heartbeat batches, one batch at a time.

    Only the database thread calls ``submit`` and ``result``: it submits a batch when the
    writer is idle, and takes the outcome back before it submits the next or applies anything
    that must come after the heartbeats (presences, state reports). Nothing else is shared.
    """

    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self._batches: queue.Queue[list[telemetry.ReceivedHeartbeat] | None] = queue.Queue(maxsize=1)
        self._results: queue.Queue[Stored] = queue.Queue(maxsize=1)
        # The size of the batch submitted and not yet taken back (0: idle).
        self.in_flight = 0
        # Set by the writer once its outcome waits: checked before every message, it spares the
        # database thread a locked queue operation each time (9% of its samples).
        self._finished = False
        self._thread = threading.Thread(target=self._run, name="bridge-writer", daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        return self.in_flight > 0

    def submit(self, batch: Sequence[telemetry.ReceivedHeartbeat]) -> None:
        assert not self.busy, "one batch at a time: take the last one's result first"
        self.in_flight = len(batch)
        self._finished = False
        self._batches.put(list(batch))

    def result(self, *, wait: bool) -> Stored | None:
        """The outcome of the batch in flight: None if there is none, or (not waiting) it is not done."""
        if not self.busy or not (wait or self._finished):
            return None
        try:
            stored = self._results.get(timeout=None) if wait else self._results.get_nowait()
        except queue.Empty:
            return None
        self.in_flight = 0
        return stored

    def stop(self) -> None:
        """After the last result is taken: end the thread, which closes its connection."""
        self._batches.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        try:
            while (batch := self._batches.get()) is not None:
                try:
                    stored = store_heartbeats(batch, self.stats)
                except Exception as exc:  # a bug, not the batch's: hold it, as for a database down
                    log.exception("storing %d heartbeats failed", len(batch))
                    stored = Stored(Split(held=batch, down=exc), set())
                if stored.split.down is not None:
                    connection.close()  # broken; the next batch opens a new one
                self._results.put(stored)
                self._finished = True
        finally:
            connection.close()
