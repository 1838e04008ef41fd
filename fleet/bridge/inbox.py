"""The hand-off from paho's network thread to the database thread: put one, take them all.

``queue.Queue`` takes a lock and notifies a condition for every message in and out: on a
bridge draining a backlog that was the largest cost it adds to receiving (docs/benchmarks.md).
Here paho's thread appends to a deque (atomic under the GIL) and wakes the database thread
only when that thread said it would sleep; the database thread takes everything queued
at once. It is bounded like the queue it replaces: a full inbox blocks paho's thread, so
the broker holds the backlog (QoS 1) instead of the bridge dropping it.

One thread puts and one thread takes.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class Inbox(Generic[T]):
    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError("an inbox holds at least one message")
        self.maxsize = maxsize
        self._items: deque[T] = deque()
        # Set while the taker may be asleep (or about to be): the putter sets ``_ready`` then.
        self._ready = threading.Event()
        self._taker_waiting = False
        # Set by the taker after each take, so a putter blocked on a full inbox wakes.
        self._room = threading.Event()

    def put(self, item: T, stopping: threading.Event, *, poll: float = 0.5) -> int:
        """Queue ``item``, waiting while the inbox is full (until ``stopping``); returns how many waits it took."""
        waits = 0
        while len(self._items) >= self.maxsize and not stopping.is_set():
            self._room.clear()
            if len(self._items) >= self.maxsize and not self._room.wait(poll):
                waits += 1
        self._items.append(item)
        if self._taker_waiting:
            # Once a wake-up: until the taker runs, the next puts need not signal again.
            self._taker_waiting = False
            self._ready.set()
        return waits

    def take(self, timeout: float) -> list[T]:
        """Everything queued, in order; waits up to ``timeout`` seconds for something if it is empty."""
        if not self._items:
            self._ready.clear()
            self._taker_waiting = True
            # Checked again after saying so: an item put in between has either been seen here
            # or has set ``_ready``.
            if not self._items:
                self._ready.wait(timeout)
            self._taker_waiting = False
        items = self._items
        taken = [items.popleft() for _ in range(len(items))]
        if taken:
            self._room.set()
        return taken

    def qsize(self) -> int:
        return len(self._items)

    def empty(self) -> bool:
        return not self._items

    def get_nowait(self) -> T:
        """One message (tests and tools); raises IndexError when empty."""
        item = self._items.popleft()
        self._room.set()
        return item
