"""The MQTT bridge's transport: paho's thread routes, worker threads apply and serve.

paho's network thread only routes each message into a bounded queue: agent messages
to the database thread (``fleet.bridge.ingest``), chunk requests to a small pool
(``fleet.bridge.chunks``). A full queue blocks paho's thread, so the broker holds the
backlog (QoS 1) instead of the bridge dropping it.

A bad message is counted, logged and dropped on its own; nothing an agent sends
can stop the process.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

import paho.mqtt.client as mqtt
from django.db import connection
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.contract import wire
from fleet.bridge.chunks import ChunkLimits, ChunkServer
from fleet.bridge.inbox import Inbox
from fleet.bridge.ingest import Inbound, Ingest
from fleet.bridge.stats import Stats
from fleet.mqtt.client import connect
from fleet.storage import ArtifactStore

log = logging.getLogger("fleet.bridge")

CHUNK_REQUEST_SUFFIX = "/" + wire.Channel.CHUNK_REQUEST
# On SIGTERM with the database down, how long the bridge keeps trying before it gives up.
STOP_GRACE_S = 10.0
# On SIGTERM: how long to wait for the broker to confirm the unsubscription, and for the
# messages already on their way to stop arriving (quiet for LEAVE_QUIET_S).
LEAVE_TIMEOUT_S = 5.0
LEAVE_QUIET_S = 0.3


class Bridge:
    """Built from a paho client and a store, so tests can hand it either."""

    def __init__(
        self,
        client: mqtt.Client,
        store: ArtifactStore,
        *,
        shared: bool = True,
        queue_size: int = 20_000,
        batch_size: int = 500,
        flush_seconds: float = 0.2,
        chunk_workers: int = 2,
        clock: Callable[[], float] = time.time,
        chunk_limits: ChunkLimits | None = None,
        session_expiry: int = 0,
    ) -> None:
        self.client = client
        self.store = store
        self.shared = shared
        self.chunk_workers = chunk_workers
        self.clock = clock
        self.stats = Stats()
        self.ingest = Ingest(self.stats, batch_size=batch_size, flush_seconds=flush_seconds)
        self.chunks = ChunkServer(client, store, self.stats, chunk_limits or ChunkLimits())
        self.stopping = threading.Event()
        self.connected = threading.Event()
        self.inbox: Inbox[Inbound] = Inbox(queue_size)
        self.chunk_inbox: queue.Queue[Inbound] = queue.Queue(maxsize=queue_size)
        self._threads: list[threading.Thread] = []
        # QoS 1 messages are acknowledged once stored, not on arrival (Ingest.flush): with a
        # persistent session (a named client and session_expiry), a bridge killed mid-batch
        # leaves what it had not stored with the broker, for the bridge that comes back.
        self.session_expiry = session_expiry
        self._connection = 0
        self._last_message_at = 0.0
        if hasattr(client, "manual_ack_set"):  # a test's fake client acknowledges nothing
            client.manual_ack_set(True)
        self.ingest.acknowledge = self._acknowledge
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message

    # --- paho's thread: route only -------------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("broker refused the bridge: %s", reason_code)
            return
        self._connection += 1
        subscriptions = wire.plane_subscriptions(shared=self.shared)
        client.subscribe([(s, 1) for s in subscriptions])
        self.connected.set()
        log.info("bridge connected; subscribed to %s", ", ".join(subscriptions))

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        if not self.stopping.is_set():
            log.warning("bridge lost the broker (%s); paho reconnects", reason_code)

    def _on_message(self, client, userdata, message: mqtt.MQTTMessage) -> None:
        # paho's thread, once per message: the topic is decoded once; agent messages go to the
        # inbox, chunk requests to the pool's queue, tried without a timeout first.
        self._last_message_at = time.monotonic()
        topic = message.topic
        chunk_request = topic.endswith(CHUNK_REQUEST_SUFFIX)
        if chunk_request and message.qos:
            client.ack(message.mid, message.qos)  # a request: the agent asks again after its stall timeout
        mid = message.mid if message.qos == 1 and not chunk_request else 0
        item = Inbound(topic, bytes(message.payload), self.clock(), mid, self._connection)
        self.stats.received += 1
        self.stats.count_kind(topic)
        if not chunk_request:
            if waits := self.inbox.put(item, self.stopping):
                self.stats.add("backpressure_waits", waits)
            return
        try:
            self.chunk_inbox.put_nowait(item)
            return
        except queue.Full:
            pass
        while not self.stopping.is_set():
            try:
                self.chunk_inbox.put(item, timeout=0.5)
                return
            except queue.Full:
                self.stats.add("backpressure_waits")

    def _leave_group(self) -> None:
        """Unsubscribe, then take what was already on its way, so that nothing is left unacknowledged.

        A named bridge stopped for good must not leave a session behind: the broker would go on
        routing a share of the fleet's messages to it, and drop them when the session expires.
        """
        if not self.connected.is_set():
            return
        left = threading.Event()
        self.client.on_unsubscribe = lambda *args: left.set()
        self.client.unsubscribe(wire.plane_subscriptions(shared=self.shared))
        left.wait(LEAVE_TIMEOUT_S)
        deadline = time.monotonic() + LEAVE_TIMEOUT_S
        while time.monotonic() - self._last_message_at < LEAVE_QUIET_S and time.monotonic() < deadline:
            time.sleep(0.05)

    def _end_session(self) -> Properties | None:
        """On a clean stop, the broker may forget a named bridge's session: it holds nothing unstored."""
        if not (self.session_expiry and self.shared):
            return None
        properties = Properties(PacketTypes.DISCONNECT)
        properties.SessionExpiryInterval = 0
        return properties

    def _acknowledge(self, items: list[Inbound]) -> None:
        """The database thread: PUBACK what it stored or refused; ids of an earlier connection are void."""
        mids = [item.mid for item in items if item.connection == self._connection]
        if not mids:
            return
        ack_many = getattr(self.client, "ack_many", None)
        if ack_many is not None:
            ack_many(mids)
        else:
            for mid in mids:
                self.client.ack(mid, 1)

    # --- the database thread and the chunk pool ---------------------------------------

    def handle(self, item: Inbound) -> None:
        """Apply one agent message (the database thread's job). Never raises."""
        self.ingest.handle(item)

    def flush(self) -> None:
        self.ingest.flush()

    def held(self) -> int:
        return self.ingest.held()

    def serve_chunk_request(self, item: Inbound) -> None:
        """Serve one chunk request (a chunk worker's job). Never raises."""
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
        connect(self.client, session_expiry=self.session_expiry)
        self.client.loop_start()
        self._threads = [
            threading.Thread(target=self.ingest.run, args=(self.inbox, self.stopping), name="bridge-db", daemon=True)
        ]
        self._threads += [
            threading.Thread(target=self._chunk_loop, name=f"bridge-chunks-{n}", daemon=True)
            for n in range(self.chunk_workers)
        ]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Leave the subscription, apply what is queued, store what is batched, disconnect."""
        self._leave_group()
        self.ingest.stop_deadline = time.monotonic() + STOP_GRACE_S
        self.stopping.set()
        # The database thread stores and acknowledges what it took before the connection closes.
        for thread in self._threads:
            thread.join(timeout=30)
        self.client.disconnect(properties=self._end_session())
        self.client.loop_stop()
        log.info("bridge stopped: %s", self.stats.snapshot())
