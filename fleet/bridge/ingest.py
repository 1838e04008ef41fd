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
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

from django.db import InterfaceError, OperationalError, connection

from agent.contract import wire
from fleet import jobs
from fleet.bridge.stats import Stats
from fleet.choices import SETTLED_DEPLOYMENT_STATES
from fleet.services import desired, devices, enrollment, reports, telemetry

log = logging.getLogger("fleet.bridge")

T = TypeVar("T")
R = TypeVar("R")
# What a lost or restarting database raises. Anything else a batch raises is about what it holds.
TRANSIENT_DB_ERRORS = (OperationalError, InterfaceError)
# Retries while the database is down back off up to this; nothing is taken from the broker meanwhile.
MAX_DB_BACKOFF_S = 5.0


@dataclass(frozen=True, slots=True)
class Inbound:
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
        self._states: list[reports.ReceivedState] = []
        self._last_flush = time.monotonic()
        self._device_pks: dict[str, int] = {}
        self._unknown_until: dict[str, float] = {}
        self._accepted_checked_at = time.monotonic()
        # Deployments that settled since the last flush: their rollouts are judged once a flush.
        self._settled_deployments: set[int] = set()
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
        self.acknowledge: Callable[[list[Inbound]], None] | None = None

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
                self.flush()

    # Under ENROLLMENT_REQUIRED, how stale the cache of accepted devices may get: a device
    # decommissioned while the bridge runs is refused within this many seconds.
    enrollment_recheck_seconds = 5.0

    def _device_pk(self, device_id: str) -> int | None:
        self._recheck_accepted()
        pk = self._device_pks.get(device_id)
        if pk is not None:
            return pk
        # Cache a miss briefly, so a flood from an unknown id costs one query a second.
        if self._unknown_until.get(device_id, 0) > time.monotonic():
            return None
        enrollment.require_accepted(device_id)  # under ENROLLMENT_REQUIRED only
        pk = telemetry.device_pks([device_id]).get(device_id)
        if pk is None:
            self._unknown_until[device_id] = time.monotonic() + 1.0
        else:
            self._device_pks[device_id] = pk
        return pk

    def _recheck_accepted(self) -> None:
        """Forget cached devices that are no longer accepted; one query per interval, not per device."""
        now = time.monotonic()
        if now - self._accepted_checked_at < self.enrollment_recheck_seconds or not self._device_pks:
            return
        self._accepted_checked_at = now
        refused = enrollment.refused_device_pks(self._device_pks.values())  # under ENROLLMENT_REQUIRED only
        if refused:
            self._device_pks = {d: pk for d, pk in self._device_pks.items() if pk not in refused}

    def _queue_heartbeat(self, device_id: str, beat: wire.Heartbeat, received_at: float) -> None:
        pk = self._device_pk(device_id)
        if pk is None:
            self._refuse("unknown_device", device_id, "heartbeat from a device that never said hello")
            return
        at = datetime.fromtimestamp(received_at, tz=UTC)
        self._heartbeats.append(telemetry.ReceivedHeartbeat(pk, beat, at))
        if len(self._heartbeats) >= self.batch_size:
            self.flush()

    def _apply_state(self, device_id: str, report: wire.StateReport) -> None:
        pk = self._device_pk(device_id)
        if pk is None:
            self._refuse("unknown_device", device_id, "state report from a device that never said hello")
            return
        # Batched like heartbeats: a fan-out to thousands of devices is thousands of reports a
        # second, and one transaction each cost six queries (docs/benchmarks.md).
        self._states.append(reports.ReceivedState(pk, device_id, report))
        if len(self._states) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        """Apply pending hellos, store pending heartbeats, then apply pending presences and state
        reports, each kind in one transaction. While the database is down, everything is held."""
        self._last_flush = time.monotonic()
        failures = self._db_failures
        # Heartbeats before reports, so the stored series stays in the order the device sent it;
        # before presences, since storing a heartbeat marks its device online.
        for step in (self._flush_hellos, self._flush_heartbeats, self._flush_presences, self._flush_states):
            if self.database_down:
                return
            step()
        if self._db_failures == failures:
            self._db_failures = 0
        if self._taken and not self.held():
            taken, self._taken = self._taken, []
            if self.acknowledge is not None:
                self.acknowledge(taken)

    # --- applying batches: one path for every kind ------------------------------------

    def _apply_split(
        self, kind: str, items: list[T], apply: Callable[[list[T]], R]
    ) -> tuple[list[tuple[list[T], R]], list[T]]:
        """Apply ``items`` as one batch; if the batch fails for what it holds, as batches of one.

        An item that fails alone is dropped, counted as ``bad_<kind>`` and logged: one bad row
        can never stop a kind of message for the whole fleet. If the database cannot be
        reached, nothing is dropped: the items not applied come back as the second value,
        to be tried again once the database answers. Returns the batches applied with their
        results, and the items held.
        """
        started = time.perf_counter()
        try:
            result = apply(items)
            self.stats.batch_applied(kind, len(items), time.perf_counter() - started)
            return [(items, result)], []
        except TRANSIENT_DB_ERRORS as exc:
            self._database_down(kind, exc)
            return [], items
        except Exception:
            if len(items) > 1:
                log.warning("applying %d %s in one batch failed; applying them one by one", len(items), kind)
        applied: list[tuple[list[T], R]] = []
        for n, item in enumerate(items):
            try:
                applied.append(([item], apply([item])))
            except TRANSIENT_DB_ERRORS as exc:
                self._database_down(kind, exc)
                return applied, items[n:]
            except Exception:
                self.stats.add(f"bad_{kind}")
                log.exception("dropped one of %s that cannot be applied: %r", kind, item)
        return applied, []

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

    def _flush_heartbeats(self) -> None:
        """Store the pending heartbeats in one transaction."""
        if not self._heartbeats:
            return
        batch, self._heartbeats = self._heartbeats, []
        done, held = self._apply_split("heartbeats", batch, telemetry.store_heartbeats)
        self._heartbeats = held + self._heartbeats
        self.stats.add("heartbeats_stored", sum(stored for _, stored in done))
        if done:  # in arrival order: the first is the one that waited longest
            self.stats.heartbeats_committed(done[0][0][0].received_at)
        try:
            for items, _ in done:
                # Their rollouts' health gates may judge now, not at the next 15 s beat.
                self._settled_deployments |= telemetry.judged_deployments(items)
        except Exception:
            # Only a shortcut: the evaluator's beat judges them anyway.
            log.exception("finding the rollouts these heartbeats decide failed")

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
        """One task for every deployment that settled since the last flush; its report is committed."""
        if not self._settled_deployments:
            return
        settled, self._settled_deployments = sorted(self._settled_deployments), set()
        try:
            jobs.enqueue("fleet.evaluate_rollouts_of_deployments", settled)
        except Exception:
            self.stats.add("enqueue_failures")
            log.exception("queueing the rollout evaluation of %d deployment(s) failed", len(settled))

    def _refuse(self, reason: str, where: str, detail: str) -> None:
        self.stats.add(reason)
        log.warning("refused (%s) on %s: %s", reason, where, detail)

    def tick(self) -> None:
        self.flush()
        if self.database_down:
            return
        # Once a flush interval, not per message: thousands of devices stay a few tasks a tick.
        self._answer_hellos()
        self._enqueue_rollout_evaluations()

    def run(self, inbox: queue.Queue[Inbound], stopping: threading.Event) -> None:
        """The database thread's loop, until ``stopping`` is set and the inbox is drained."""
        while not (stopping.is_set() and inbox.empty() and not self._retry):
            if self.database_down:
                # Take nothing more: the inbox fills, paho waits, and the broker holds the backlog.
                if stopping.is_set() and time.monotonic() >= self.stop_deadline:
                    log.error("stopping with the database unreachable; %d message(s) not applied", self.held())
                    break
                time.sleep(0.05)
                continue
            if self._db_failures:
                # Back from an outage: what was held goes in before anything new.
                self.tick()
                if self.database_down:
                    continue
            if self._retry:
                self.handle(self._retry.popleft())
            else:
                try:
                    item = inbox.get(timeout=self.flush_seconds)
                except queue.Empty:
                    pass
                else:
                    if item.mid:
                        self._taken.append(item)
                    self.handle(item)
            if time.monotonic() - self._last_flush >= self.flush_seconds:
                self.tick()
        if not self.database_down:
            self.tick()
        connection.close()

    def held(self) -> int:
        """Messages taken but not yet applied (the database thread's view)."""
        pending = len(self._hellos) + len(self._presences) + len(self._heartbeats) + len(self._states)
        return pending + len(self._retry)

    # --- chunk serving ----------------------------------------------------------------
