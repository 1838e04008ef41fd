"""Time, passed in so tests can control it."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def time(self) -> float:
        """Wall-clock seconds since the epoch, for timestamps the plane reads."""
        ...

    def monotonic(self) -> float:
        """Seconds that never go backwards, for timeouts and intervals."""
        ...


class SystemClock:
    """The real clock."""

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()
