"""The MQTT bridge: consumes what agents send, serves their chunk requests.

paho's network thread only routes each message into a bounded queue. One thread
applies JSON messages to the database, batching heartbeats; a small pool serves
chunks from the artifact store. A full queue blocks paho's thread, so the broker
holds the backlog (QoS 1) instead of the bridge dropping it.

A bad message is counted, logged and dropped on its own; nothing an agent sends
can stop the process.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

import paho.mqtt.client as mqtt
from django.db import InterfaceError, OperationalError, connection

from agent import wire
from fleet import tasks
from fleet.choices import SETTLED_DEPLOYMENT_STATES
from fleet.mqtt.chunks import ChunkLimits, ChunkServer
from fleet.mqtt.client import connect
from fleet.services import deployments, devices, enrollment, telemetry
from fleet.storage import FilesystemStore

log = logging.getLogger("fleet.bridge")

T = TypeVar("T")
R = TypeVar("R")
# What a lost or restarting database raises. Anything else a batch raises is about what it holds.
TRANSIENT_DB_ERRORS = (OperationalError, InterfaceError)
# Retries while the database is down back off up to this; nothing is taken from the broker meanwhile.
MAX_DB_BACKOFF_S = 5.0
# On SIGTERM with the database down, how long the bridge keeps trying before it gives up.
STOP_GRACE_S = 10.0


@dataclass(frozen=True, slots=True)
class Inbound:
    topic: str
    payload: bytes
    received_at: float


class Stats:
    """Thread-safe counters: what came in, what was stored, what was refused and why."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        # Counted for every message by paho's network thread alone: one writer needs no lock,
        # and taking one per message was 4% of a saturated bridge's samples.
        self.received = 0

    def add(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            counts = dict(self._counts)
        if self.received:
            counts["received"] = self.received
        return counts


class Bridge:
    """Built from a paho client and a store, so tests can hand it either."""

    def __init__(
        self,
        client: mqtt.Client,
        store: FilesystemStore,
        *,
        shared: bool = True,
        queue_size: int = 20_000,
        batch_size: int = 500,
        flush_seconds: float = 0.2,
        chunk_workers: int = 2,
        clock: Callable[[], float] = time.time,
        chunk_limits: ChunkLimits | None = None,
    ) -> None:
        self.client = client
        self.store = store
        self.shared = shared
        self.batch_size = batch_size
        self.flush_seconds = flush_seconds
        self.chunk_workers = chunk_workers
        self.clock = clock
        self.stats = Stats()
        self.chunks = ChunkServer(client, store, self.stats, chunk_limits or ChunkLimits())
        self.stopping = threading.Event()
        self.connected = threading.Event()
        self.inbox: queue.Queue[Inbound] = queue.Queue(maxsize=queue_size)
        self.chunk_inbox: queue.Queue[Inbound] = queue.Queue(maxsize=queue_size)
        # device_id -> its newest hello not yet applied: applied in one transaction a flush.
        self._hellos: dict[str, wire.Hello] = {}
        # device id -> online, the latest presence of each since the last flush
        self._presences: dict[str, bool] = {}
        self._heartbeats: list[telemetry.ReceivedHeartbeat] = []
        self._states: list[deployments.ReceivedState] = []
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
        self._stop_deadline = float("inf")
        self._threads: list[threading.Thread] = []
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message

    # --- paho's thread: route only -------------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("broker refused the bridge: %s", reason_code)
            return
        subscriptions = wire.plane_subscriptions(shared=self.shared)
        client.subscribe([(s, 1) for s in subscriptions])
        self.connected.set()
        log.info("bridge connected; subscribed to %s", ", ".join(subscriptions))

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        if not self.stopping.is_set():
            log.warning("bridge lost the broker (%s); paho reconnects", reason_code)

    def _on_message(self, client, userdata, message: mqtt.MQTTMessage) -> None:
        item = Inbound(message.topic, message.payload, self.clock())
        target = self.chunk_inbox if message.topic.endswith("/" + wire.Channel.CHUNK_REQUEST) else self.inbox
        self.stats.received += 1
        while not self.stopping.is_set():
            try:
                target.put(item, timeout=0.5)
                return
            except queue.Full:
                self.stats.add("backpressure_waits")

    # --- the database thread --------------------------------------------------------

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
        except deployments.StaleReport as exc:
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
        self._states.append(deployments.ReceivedState(pk, device_id, report))
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
        try:
            return [(items, apply(items))], []
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
        done, held = self._apply_split("state_reports", batch, deployments.record_states)
        self._states = held + self._states
        for items, outcomes in done:
            for item, outcome in zip(items, outcomes, strict=True):
                if isinstance(outcome, deployments.StaleReport):
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
        for items, _ in done:
            # Their rollouts' health gates may judge now, not at the next 15 s beat.
            self._settled_deployments |= telemetry.judged_deployments(items)

    def _answer_hellos(self) -> None:
        """Publish the desired state of every device greeted since the last flush; their hellos are committed."""
        if not self._greeted:
            return
        greeted, self._greeted = sorted(self._greeted), set()
        try:
            deployments.enqueue_desired(greeted)
        except Exception:
            self.stats.add("enqueue_failures")
            log.exception("queueing the desired state of %d greeted device(s) failed", len(greeted))

    def _enqueue_rollout_evaluations(self) -> None:
        """One task for every deployment that settled since the last flush; its report is committed."""
        if not self._settled_deployments:
            return
        settled, self._settled_deployments = sorted(self._settled_deployments), set()
        try:
            tasks.evaluate_rollouts_of_deployments.delay(settled)
        except Exception:
            self.stats.add("enqueue_failures")
            log.exception("queueing the rollout evaluation of %d deployment(s) failed", len(settled))

    def _refuse(self, reason: str, where: str, detail: str) -> None:
        self.stats.add(reason)
        log.warning("refused (%s) on %s: %s", reason, where, detail)

    def _tick(self) -> None:
        self.flush()
        if self.database_down:
            return
        # Once a flush interval, not per message: thousands of devices stay a few tasks a tick.
        self._answer_hellos()
        self._enqueue_rollout_evaluations()

    def _db_loop(self) -> None:
        while not (self.stopping.is_set() and self.inbox.empty() and not self._retry):
            if self.database_down:
                # Take nothing more: the inbox fills, paho waits, and the broker holds the backlog.
                if self.stopping.is_set() and time.monotonic() >= self._stop_deadline:
                    log.error("stopping with the database unreachable; %d message(s) not applied", self.held())
                    break
                time.sleep(0.05)
                continue
            if self._db_failures:
                # Back from an outage: what was held goes in before anything new.
                self._tick()
                if self.database_down:
                    continue
            if self._retry:
                self.handle(self._retry.popleft())
            else:
                try:
                    self.handle(self.inbox.get(timeout=self.flush_seconds))
                except queue.Empty:
                    pass
            if time.monotonic() - self._last_flush >= self.flush_seconds:
                self._tick()
        if not self.database_down:
            self._tick()
        connection.close()

    def held(self) -> int:
        """Messages taken but not yet applied (the database thread's view)."""
        pending = len(self._hellos) + len(self._presences) + len(self._heartbeats) + len(self._states)
        return pending + len(self._retry)

    # --- chunk serving ----------------------------------------------------------------

    def serve_chunk_request(self, item: Inbound) -> None:
        self.chunks.serve(item.topic, item.payload, self.stopping)

    def _chunk_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                item = self.chunk_inbox.get(timeout=0.5)
            except queue.Empty:
                continue
            self.serve_chunk_request(item)
        connection.close()

    # --- lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        connect(self.client)
        self.client.loop_start()
        self._threads = [threading.Thread(target=self._db_loop, name="bridge-db", daemon=True)]
        self._threads += [
            threading.Thread(target=self._chunk_loop, name=f"bridge-chunks-{n}", daemon=True)
            for n in range(self.chunk_workers)
        ]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Stop taking messages, apply what is queued, store what is batched, disconnect."""
        self._stop_deadline = time.monotonic() + STOP_GRACE_S
        self.stopping.set()
        self.client.disconnect()
        self.client.loop_stop()
        for thread in self._threads:
            thread.join(timeout=30)
        log.info("bridge stopped: %s", self.stats.snapshot())
