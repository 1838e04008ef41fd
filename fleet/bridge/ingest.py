"""The bridge's database side: every agent message applied, each kind in batches.

One thread runs ``Ingest.run``: it decodes each message against the wire contract,
keeps hellos, heartbeats, presences and state reports in batches, and applies each
batch in one transaction through the services (devices, telemetry, reports). A
batch that fails for what it holds is applied again as batches of one, and the item
that fails alone is dropped and counted; a database that cannot be reached holds
everything and stops the thread taking more, so the broker keeps the backlog.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import NamedTuple, TypeVar

from django.db import connection

from agent.contract import wire
from fleet import jobs
from fleet.bridge.inbox import Inbox
from fleet.bridge.stats import Stats
from fleet.bridge.writer import TRANSIENT_DB_ERRORS, HeartbeatWriter, Stored, apply_split, store_heartbeats
from fleet.choices import SETTLED_DEPLOYMENT_STATES
from fleet.services import desired, devices, enrollment, reports, telemetry

log = logging.getLogger("fleet.bridge")

T = TypeVar("T")
R = TypeVar("R")
# Retries while the database is down back off up to this; nothing is taken from the broker meanwhile.
MAX_DB_BACKOFF_S = 5.0
# While the writer stores one batch, the next may grow to this many batch sizes before the
# database thread waits for it.
MAX_BATCHES_WAITING = 4
# How often the heartbeats a health gate judges may wake the evaluator (settled deployments: every flush).
JUDGE_EVERY_S = 1.0


class Inbound(NamedTuple):
    """One message as paho's thread hands it over: a tuple, since a frozen dataclass costs a
    microsecond to build, once a message (docs/benchmarks.md)."""

    topic: str
    payload: bytes
    received_at: float
    # The broker's packet id of a QoS 1 message (0: none to acknowledge), and which of the
    # bridge's connections it came on: an id means nothing on a later connection.
    mid: int = 0
    connection: int = 0


class Ingest:
    """The database thread: applies agent messages, each kind in batches, and queues their follow-ups."""

    def __init__(self, stats: Stats, *, batch_size: int = 500, flush_seconds: float = 0.2) -> None:
        self.stats = stats
        self.batch_size = batch_size
        self.flush_seconds = flush_seconds
        # device_id -> its newest hello not yet applied: applied in one transaction a flush.
        self._hellos: dict[str, wire.Hello] = {}
        # device id -> online, the latest presence of each since the last flush
        self._presences: dict[str, bool] = {}
        self._heartbeats: list[telemetry.ReceivedHeartbeat] = []
        # Heartbeats (with their arrival time) and state reports (None) of devices this bridge has
        # not looked up yet: looked up together at the next flush.
        self._unresolved: list[tuple[str, wire.Heartbeat | wire.StateReport, datetime | None]] = []
        self._unresolved_ids: set[str] = set()
        self._states: list[reports.ReceivedState] = []
        self._last_flush = time.monotonic()
        self._device_pks: dict[str, int] = {}
        self._unknown_until: dict[str, float] = {}
        self._accepted_checked_at = time.monotonic()
        # Deployments that settled since the last flush: their rollouts are judged once a flush.
        self._settled_deployments: set[int] = set()
        # Deployments whose heartbeats a health gate judges: their rollouts are judged at most
        # once every JUDGE_EVERY_S, since a gated stage of thousands of devices sends in every flush.
        self._judged_deployments: set[int] = set()
        self._judged_at = 0.0
        # Devices that said hello since the last flush: answered with their desired state in one batch,
        # so a fleet reconnecting after a broker restart is a few tasks, not one per device.
        self._greeted: set[int] = set()
        # Messages taken while the database was unreachable: applied first once it answers.
        self._retry: deque[Inbound] = deque()
        self._db_failures = 0
        self._db_retry_at = 0.0
        # Set by the transport on SIGTERM: how long to keep trying a database that is down.
        self.stop_deadline = float("inf")
        # Messages taken from the inbox and not yet acknowledged to the broker; acknowledged through
        # ``acknowledge`` once a flush leaves nothing held, so a bridge killed before its commit
        # leaves them with the broker, which delivers them again (docs/scaling.md).
        self._taken: list[Inbound] = []
        # Taken messages whose heartbeats are in the writer's batch: acknowledged once it is stored.
        self._taken_in_flight: list[Inbound] = []
        self.acknowledge: Callable[[list[Inbound]], None] | None = None
        # Started by ``run``: a bridge driven by hand (the tests) stores on the calling thread.
        self._writer: HeartbeatWriter | None = None

    def handle(self, item: Inbound) -> None:
        """Apply one agent message. Never raises: a failure is counted and logged."""
        try:
            device_id, channel, message = wire.decode_from(item.topic, item.payload)
        except wire.WireError as exc:
            self._refuse("bad_message", item.topic, str(exc))
            return
        try:
            self._apply(device_id, channel, message, item.received_at)
        except TRANSIENT_DB_ERRORS as exc:
            self._database_down("messages", exc)
            self._retry.append(item)
        except reports.StaleReport as exc:
            self._refuse("stale_report", item.topic, str(exc))
        except enrollment.NotAccepted as exc:
            self._refuse("not_accepted", item.topic, str(exc))
        except Exception:
            self.stats.add("errors")
            log.exception("failed to apply a message on %s", item.topic)

    def _apply(self, device_id: str, channel: wire.Channel, message: wire.Message, received_at: float) -> None:
        if channel is wire.Channel.HELLO:
            if device_id in self._unresolved_ids:
                # What the device sent before this hello is judged as it stood before it.
                self._resolve_devices()
            self._hellos[device_id] = message  # type: ignore[assignment]  # the channel fixes the type
            # A device back after its last will: the hello, later, marks it online.
            self._presences.pop(device_id, None)
            if len(self._hellos) >= self.batch_size:
                self._flush_hellos()
            return
        if device_id in self._hellos:
            if channel is wire.Channel.PRESENCE and message.online:  # type: ignore[attr-defined]
                # The agent sends it right behind its hello, which marks the device online anyway
                # (and is refused with it if the device is not accepted). Flushing for it would
                # make a connect storm one transaction a hello again.
                self.stats.add("presence")
                return
            # The device's hello first: its heartbeat or report may be the first of a new device.
            self._flush_hellos()
        if channel is wire.Channel.HEARTBEAT:
            self._queue_heartbeat(device_id, message, received_at)  # type: ignore[arg-type]
        elif channel is wire.Channel.STATE:
            self._apply_state(device_id, message)  # type: ignore[arg-type]
        elif channel is wire.Channel.PRESENCE:
            # The latest of each device's, applied with the flush: a mass disconnect is a batch.
            self._presences[device_id] = message.online  # type: ignore[attr-defined]
            self.stats.add("presence")
            if len(self._presences) >= self.batch_size:
                self._flush()

    # Under ENROLLMENT_REQUIRED, how stale the cache of accepted devices may get: a device
    # decommissioned while the bridge runs is refused within this many seconds.
    enrollment_recheck_seconds = 5.0

    def _known_pk(self, device_id: str) -> int | None:
        """The device's pk if this bridge knows it may speak; None when it must be looked up."""
        self._recheck_accepted()
        return self._device_pks.get(device_id)

    def _recheck_accepted(self) -> None:
        """Forget cached devices that are no longer accepted; one query per interval, not per device."""
        now = time.monotonic()
        if now - self._accepted_checked_at < self.enrollment_recheck_seconds or not self._device_pks:
            return
        self._accepted_checked_at = now
        refused = enrollment.refused_device_pks(self._device_pks.values())  # under ENROLLMENT_REQUIRED only
        if refused:
            self._device_pks = {d: pk for d, pk in self._device_pks.items() if pk not in refused}

    def _recently_unknown(self, device_id: str, what: str) -> bool:
        """A device looked up and not found within the last second: refused without a query."""
        if self._unknown_until.get(device_id, 0) <= time.monotonic():
            return False
        self._refuse("unknown_device", device_id, f"{what} from a device that never said hello")
        return True

    def _queue_heartbeat(self, device_id: str, beat: wire.Heartbeat, received_at: float) -> None:
        at = datetime.fromtimestamp(received_at, tz=UTC)
        pk = self._known_pk(device_id)
        if pk is not None:
            self._heartbeats.append(telemetry.ReceivedHeartbeat(pk, beat, at))
        elif not self._recently_unknown(device_id, "heartbeat"):
            # Looked up with the others at the flush: a bridge that starts (or restarts) under a
            # fleet of 10,000 would otherwise spend its first minute on two queries a device.
            self._unresolved.append((device_id, beat, at))
            self._unresolved_ids.add(device_id)
        if len(self._heartbeats) + len(self._unresolved) >= self.batch_size:
            self._flush()

    def _apply_state(self, device_id: str, report: wire.StateReport) -> None:
        # Batched like heartbeats: a fan-out to thousands of devices is thousands of reports a
        # second, and one transaction each cost six queries (docs/benchmarks.md).
        pk = self._known_pk(device_id)
        if pk is not None:
            self._states.append(reports.ReceivedState(pk, device_id, report))
        elif not self._recently_unknown(device_id, "state report"):
            self._unresolved.append((device_id, report, None))
            self._unresolved_ids.add(device_id)
        if len(self._states) + len(self._unresolved) >= self.batch_size:
            self._flush()

    def _resolve_devices(self) -> None:
        """Look up, in one query, the devices of the messages queued since the last flush that this
        bridge did not know, and queue their messages or refuse them. Held while the database is down."""
        if not self._unresolved:
            return
        try:
            speaking, refused = enrollment.speaking_devices(self._unresolved_ids)
        except TRANSIENT_DB_ERRORS as exc:
            self._database_down("device lookups", exc)
            return
        self._device_pks.update(speaking)
        pending, self._unresolved, self._unresolved_ids = self._unresolved, [], set()
        for device_id, message, at in pending:
            pk = speaking.get(device_id)
            what = "heartbeat" if at is not None else "state report"
            if device_id in refused:
                self._refuse("not_accepted", device_id, f"{device_id} is {refused[device_id]}")
            elif pk is None:
                self._unknown_until[device_id] = time.monotonic() + 1.0
                self._refuse("unknown_device", device_id, f"{what} from a device that never said hello")
            elif at is not None:
                self._heartbeats.append(telemetry.ReceivedHeartbeat(pk, message, at))  # type: ignore[arg-type]
            else:
                self._states.append(reports.ReceivedState(pk, device_id, message))  # type: ignore[arg-type]

    def flush(self) -> None:
        """Apply everything pending and wait until it is stored (or held, with the database down)."""
        self._flush(wait=True)

    def _flush(self, *, wait: bool = False) -> None:
        """Apply pending hellos, store pending heartbeats, then apply pending presences and state
        reports, each kind in one transaction. While the database is down, everything is held.

        Heartbeats go to the writer thread when the bridge runs one; unless ``wait``, or
        presences or reports must follow them, the flush does not wait for them to be stored.
        """
        self._last_flush = time.monotonic()
        failures = self._db_failures
        self._take_stored(wait=False)
        # Heartbeats before reports, so the stored series stays in the order the device sent it;
        # before presences, since storing a heartbeat marks its device online.
        steps = (self._flush_hellos, self._resolve_devices, lambda: self._flush_heartbeats(wait=wait),
                 self._flush_presences, self._flush_states)  # fmt: skip
        for step in steps:
            if self.database_down:
                return
            step()
        if self._db_failures == failures:
            self._db_failures = 0
        if self._taken and not self._pending():
            # All they carry is applied, or in the writer's batch: acknowledged once that is stored.
            taken, self._taken = self._taken, []
            if self._writer is not None and self._writer.busy:
                self._taken_in_flight += taken
            else:
                self._acknowledge(taken)

    def _acknowledge(self, taken: list[Inbound]) -> None:
        if taken and self.acknowledge is not None:
            self.acknowledge(taken)

    # --- applying batches: one path for every kind ------------------------------------

    def _apply_split(
        self, kind: str, items: list[T], apply: Callable[[list[T]], R]
    ) -> tuple[list[tuple[list[T], R]], list[T]]:
        """``writer.apply_split`` on this thread: the batches applied with their results, and the items held."""
        split = apply_split(kind, items, apply, self.stats)
        if split.down is not None:
            self._database_down(kind, split.down)
        return split.done, split.held

    def _database_down(self, kind: str, exc: Exception) -> None:
        """Hold what is pending and stop taking messages until the database answers again."""
        self.stats.add("flush_failures")
        self._db_failures += 1
        delay = min(self.flush_seconds * 2**self._db_failures, MAX_DB_BACKOFF_S)
        self._db_retry_at = time.monotonic() + delay
        log.warning("the database is unreachable while applying %s (%s); retrying in %.1f s", kind, exc, delay)
        # The connection is broken; the next query opens a new one.
        connection.close()

    @property
    def database_down(self) -> bool:
        return self._db_retry_at > time.monotonic()

    def _flush_presences(self) -> None:
        """Each device's latest presence at once."""
        if not self._presences:
            return
        batch, self._presences = self._presences, {}
        done, held = self._apply_split(
            "presences", list(batch.items()), lambda items: devices.record_presences(dict(items))
        )
        self._presences = {**dict(held), **self._presences}
        for items, (applied, refused) in done:
            for device_id in sorted(refused):
                topic = wire.topic(device_id, wire.Channel.PRESENCE)
                self._refuse("not_accepted", topic, f"{device_id} is not accepted")
            for device_id in sorted({d for d, _ in items} - applied - refused):
                self._refuse("unknown_device", device_id, "presence from a device that never said hello")

    def _flush_hellos(self) -> None:
        """Register or refresh the greeted devices at once."""
        if not self._hellos:
            return
        batch, self._hellos = list(self._hellos.values()), {}
        done, held = self._apply_split("hellos", batch, devices.record_hellos)
        self._hellos = {**{h.device_id: h for h in held}, **self._hellos}
        for _, outcomes in done:
            for device_id, outcome in outcomes.items():
                if isinstance(outcome, enrollment.NotAccepted):
                    self._refuse("not_accepted", wire.topic(device_id, wire.Channel.HELLO), str(outcome))
                else:
                    self._greeted.add(outcome)
                    self._device_pks[device_id] = outcome
                    self._unknown_until.pop(device_id, None)
                    self.stats.add("hellos")

    def _flush_states(self) -> None:
        """Apply the pending state reports at once."""
        if not self._states:
            return
        batch, self._states = self._states, []
        done, held = self._apply_split("state_reports", batch, reports.record_states)
        self._states = held + self._states
        for items, outcomes in done:
            for item, outcome in zip(items, outcomes, strict=True):
                if isinstance(outcome, reports.StaleReport):
                    self._refuse("stale_report", wire.topic(item.device_id, wire.Channel.STATE), str(outcome))
                    continue
                # By the state reported: two reports on one deployment in a batch (downloading,
                # then active) share one outcome, which holds only the state the batch left.
                self.stats.add(f"state_{item.report.state}")
                if outcome.state in SETTLED_DEPLOYMENT_STATES:
                    self._settled_deployments.add(outcome.pk)

    def _flush_heartbeats(self, *, wait: bool) -> None:
        """Store the pending heartbeats in one transaction: on the writer thread when there is one."""
        writer = self._writer
        if writer is None:  # not running (a test drives the bridge): store them here and now
            if self._heartbeats:
                batch, self._heartbeats = self._heartbeats, []
                self._heartbeats_stored(store_heartbeats(batch, self.stats))
            return
        wait = wait or bool(self._presences or self._states)
        if writer.busy:
            if not wait and len(self._heartbeats) < self.batch_size * MAX_BATCHES_WAITING:
                return  # the next batch grows meanwhile: the busier the database, the larger its batches
            self._take_stored(wait=True)
            if self.database_down:
                return
        if self._heartbeats:
            batch, self._heartbeats = self._heartbeats, []
            writer.submit(batch)
            if wait:
                self._take_stored(wait=True)

    def _take_stored(self, *, wait: bool) -> None:
        """Take back the writer's outcome, if it has one: acknowledge what it stored, hold what it could not."""
        stored = self._writer.result(wait=wait) if self._writer is not None else None
        if stored is None:
            return
        taken, self._taken_in_flight = self._taken_in_flight, []
        if stored.split.down is None:
            self._acknowledge(taken)
        else:
            self._taken = taken + self._taken
        self._heartbeats_stored(stored)

    def _heartbeats_stored(self, stored: Stored) -> None:
        if stored.split.down is not None:
            self._database_down("heartbeats", stored.split.down)
        self._heartbeats = stored.split.held + self._heartbeats
        self._judged_deployments |= stored.judged

    def _answer_hellos(self) -> None:
        """Publish the desired state of every device greeted since the last flush; their hellos are committed."""
        if not self._greeted:
            return
        greeted, self._greeted = sorted(self._greeted), set()
        try:
            desired.enqueue_desired(greeted)
        except Exception:
            self.stats.add("enqueue_failures")
            log.exception("queueing the desired state of %d greeted device(s) failed", len(greeted))

    def _enqueue_rollout_evaluations(self) -> None:
        """One task for the deployments that settled since the last flush (their reports are
        committed), and those whose stored heartbeats a health gate judges, at most once every
        JUDGE_EVERY_S."""
        deployment_ids = self._settled_deployments
        if self._judged_deployments and time.monotonic() - self._judged_at >= JUDGE_EVERY_S:
            deployment_ids |= self._judged_deployments
            self._judged_deployments, self._judged_at = set(), time.monotonic()
        if not deployment_ids:
            return
        settled, self._settled_deployments = sorted(deployment_ids), set()
        try:
            jobs.enqueue("fleet.evaluate_rollouts_of_deployments", settled)
        except Exception:
            self.stats.add("enqueue_failures")
            log.exception("queueing the rollout evaluation of %d deployment(s) failed", len(settled))

    def _refuse(self, reason: str, where: str, detail: str) -> None:
        self.stats.add(reason)
        log.warning("refused (%s) on %s: %s", reason, where, detail)

    def tick(self, *, wait: bool = False) -> None:
        self._flush(wait=wait)
        if self.database_down:
            return
        # Once a flush interval, not per message: thousands of devices stay a few tasks a tick.
        self._answer_hellos()
        self._enqueue_rollout_evaluations()

    def run(self, inbox: Inbox[Inbound], stopping: threading.Event) -> None:
        """The database thread's loop, until ``stopping`` is set and the inbox is drained."""
        self._writer = HeartbeatWriter(self.stats)
        try:
            self._loop(inbox, stopping)
        finally:
            self._take_stored(wait=True)
            self._writer.stop()
            self._writer = None
            connection.close()

    def _loop(self, inbox: Inbox[Inbound], stopping: threading.Event) -> None:
        while not (stopping.is_set() and inbox.empty() and not self._retry):
            if self.database_down:
                # Take nothing more: the inbox fills, paho waits, and the broker holds the backlog.
                if stopping.is_set() and time.monotonic() >= self.stop_deadline:
                    log.error("stopping with the database unreachable; %d message(s) not applied", self.held())
                    return
                time.sleep(0.05)
                continue
            if self._db_failures:
                # Back from an outage: what was held goes in before anything new.
                self.tick(wait=True)
                if self.database_down:
                    continue
            if self._retry:
                self.handle(self._retry.popleft())
            else:
                self._handle_all(inbox.take(timeout=self.flush_seconds))
            if time.monotonic() - self._last_flush >= self.flush_seconds:
                self.tick()
            else:
                self._take_stored(wait=False)
        if not self.database_down:
            self.tick(wait=True)

    def _handle_all(self, items: list[Inbound]) -> None:
        """Apply what the inbox held, in order; from the first failure on the database, hold the rest."""
        for n, item in enumerate(items):
            if self.database_down:
                # Taken, and applied first once the database answers.
                held = items[n:]
                self._taken += [i for i in held if i.mid]
                self._retry.extend(held)
                return
            if item.mid:
                self._taken.append(item)
            self.handle(item)

    def _pending(self) -> int:
        """Messages taken and not yet applied, on this thread (the writer's batch aside)."""
        pending = len(self._hellos) + len(self._presences) + len(self._heartbeats) + len(self._states)
        return pending + len(self._unresolved) + len(self._retry)

    def held(self) -> int:
        """Messages taken but not yet applied."""
        return self._pending() + (self._writer.in_flight if self._writer is not None else 0)

    # --- chunk serving ----------------------------------------------------------------
