"""Heartbeats and state reports, kept on disk until the broker has them.

Every message goes into ``<data_dir>/outbox.sqlite3`` first. A sender thread hands
the oldest ones to the broker link with QoS 1 while it is connected, a bounded
window at a time, and deletes a row only once the broker acknowledged it (PUBACK).
So an outage, a broker restart or a kill -9 loses nothing: what was not
acknowledged is sent again, oldest first, once the link is back. Delivery is at
least once; a heartbeat's ``seq`` lets the plane drop a duplicate.

Disk use is bounded by ``telemetry.max_queued`` messages. Past it the oldest
heartbeats are dropped first (a state report only when nothing else is left),
and the running total of drops goes out in every heartbeat as ``dropped``.
"""

from __future__ import annotations

import functools
import logging
import sqlite3
import threading
from pathlib import Path
from typing import Final

from agent.contract import wire
from agent.mqtt import Link, LinkError

log = logging.getLogger(__name__)

FILENAME: Final = "outbox.sqlite3"
POLL_S: Final = 0.2
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS message (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    channel TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS counter (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class Outbox:
    """The on-disk queue and its sender thread. ``put`` is safe from any thread."""

    def __init__(self, path: Path, link: Link, *, max_queued: int, window: int) -> None:
        self.path = path
        self.link = link
        self.max_queued = max_queued
        self.window = window
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()  # one connection, used by callers, the sender and paho's acks
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._handed: set[int] = set()  # row ids the link holds and the broker has not acknowledged
        self._last_handed = 0
        self._acked: list[int] = []
        self._acked_lock = threading.Lock()
        self._depth = 0
        self._dropped = 0
        self._thread = threading.Thread(target=self._run, name="agent-outbox", daemon=True)

    @property
    def depth(self) -> int:
        """Messages waiting for the broker's acknowledgement, on disk."""
        return self._depth

    @property
    def dropped(self) -> int:
        """Messages dropped to stay within the bound, since this data_dir was created."""
        return self._dropped

    def open(self) -> None:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(
            "PRAGMA synchronous=NORMAL"
        )  # WAL + NORMAL survives a process crash; a power cut may lose the last rows
        db.executescript(_SCHEMA)
        self._db = db
        self._depth = db.execute("SELECT COUNT(*) FROM message").fetchone()[0]
        row = db.execute("SELECT value FROM counter WHERE name = 'dropped'").fetchone()
        self._dropped = row[0] if row else 0
        if self._depth:
            log.info("outbox.restored depth=%d dropped=%d", self._depth, self._dropped)

    def start(self) -> None:
        if self._db is None:
            self.open()
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        with self._lock:
            if self._db is not None:
                self._delete_acked()
                self._db.close()
                self._db = None

    def put(self, channel: wire.Channel, topic: str, payload: bytes) -> None:
        with self._lock:
            db = self._db
            if db is None:
                raise LinkError("the outbox is closed")
            db.execute("INSERT INTO message (channel, topic, payload) VALUES (?, ?, ?)", (channel, topic, payload))
            self._depth += 1
            if self._depth > self.max_queued:
                self._drop_oldest(db, self._depth - self.max_queued)
        self._wake.set()

    # --- bound ------------------------------------------------------------------

    def _drop_oldest(self, db: sqlite3.Connection, excess: int) -> None:
        # Rows already handed to the link are in flight; they go when the broker acknowledges them.
        dropped = 0
        for only_heartbeats in (True, False):
            if dropped >= excess:
                break
            where = "id > ?" + (" AND channel = ?" if only_heartbeats else "")
            args: tuple[object, ...] = (
                (self._last_handed, wire.Channel.HEARTBEAT) if only_heartbeats else (self._last_handed,)
            )
            cursor = db.execute(
                f"DELETE FROM message WHERE id IN (SELECT id FROM message WHERE {where} ORDER BY id LIMIT ?)",
                (*args, excess - dropped),
            )
            dropped += cursor.rowcount
        self._depth -= dropped
        self._dropped += dropped
        db.execute(
            "INSERT INTO counter (name, value) VALUES ('dropped', ?) "
            "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            (self._dropped,),
        )
        log.warning("outbox.dropped count=%d dropped_total=%d bound=%d", dropped, self._dropped, self.max_queued)

    # --- sending ----------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(POLL_S)
            self._wake.clear()
            try:
                with self._lock:
                    self._delete_acked()
                if self.link.connected:
                    self._hand_over()
            except sqlite3.Error as exc:
                log.error("outbox.failed path=%s error=%r", self.path, str(exc))

    def _hand_over(self) -> None:
        with self._lock:
            if self._db is None:
                return
            room = self.window - len(self._handed)
            if room <= 0:
                return
            rows = self._db.execute(
                "SELECT id, topic, payload FROM message WHERE id > ? ORDER BY id LIMIT ?", (self._last_handed, room)
            ).fetchall()
        for row_id, topic, payload in rows:
            with self._lock:
                self._handed.add(row_id)
            try:
                self.link.deliver(topic, payload, on_acked=functools.partial(self._on_acked, row_id))
            except LinkError as exc:
                log.warning("outbox.deliver_failed topic=%s error=%r", topic, str(exc))
                with self._lock:
                    self._handed.discard(row_id)
                return
            with self._lock:
                self._last_handed = row_id

    def _on_acked(self, row_id: int) -> None:
        # On paho's thread: no disk work here.
        with self._acked_lock:
            self._acked.append(row_id)
        self._wake.set()

    def _delete_acked(self) -> None:
        with self._acked_lock:
            acked, self._acked = self._acked, []
        if not acked or self._db is None:
            return
        self._db.executemany("DELETE FROM message WHERE id = ?", [(row_id,) for row_id in acked])
        self._handed.difference_update(acked)
        self._depth = max(0, self._depth - len(acked))
