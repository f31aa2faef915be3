"""The daemon's clock: time and waiting, injected so backoff and interval tests are
instant and exact (kopf's fake clock)."""

from __future__ import annotations

import threading
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Monotonic seconds (never goes back; not wall time)."""
        ...

    def wait(self, wake: threading.Event, timeout: float | None) -> bool:
        """Wait until `wake` is set or `timeout` seconds passed; True when woken."""
        ...


class SystemClock:
    def now(self) -> float:
        return time.monotonic()

    def wait(self, wake: threading.Event, timeout: float | None) -> bool:
        return wake.wait(timeout)


class FakeClock:
    """A clock that only moves when told to, or when something waits on it: waiting
    advances it by the timeout at once (unless already woken)."""

    def __init__(self, start: float = 1000.0):
        self._now = start
        self._lock = threading.Lock()
        self.waits: list[float | None] = []

    def now(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds

    def wait(self, wake: threading.Event, timeout: float | None) -> bool:
        self.waits.append(timeout)
        if wake.is_set():
            return True
        if timeout is not None:
            self.advance(timeout)
        return wake.is_set()
