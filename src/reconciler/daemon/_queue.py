"""The work queue of the daemon: level-based, one entry per resource.

An event only marks a resource dirty (``add``); the reconcile that pops it reads the
whole state. Duplicates merge into one entry. A failure re-queues the resource after an
exponential delay with a cap (``failed``), so one broken resource is retried ever more
rarely while the rest go on; an edit of its manifest (``reset``) retries it at once. A
full resync on an interval is the safety net for changes no event reported. As
controller-runtime's rate-limited workqueue, minus the threads: the daemon's loop asks
what is due.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, Hashable, Iterable, TypeVar

from reconciler.daemon._clock import Clock

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True, slots=True)
class Backoff:
    base_s: float = 1.0
    cap_s: float = 300.0

    def delay(self, failures: int) -> float:
        """Seconds to wait after the `failures`-th failure in a row (1, 2, 4, ... cap)."""
        if failures <= 0:
            return 0.0
        return min(self.cap_s, self.base_s * 2.0 ** min(failures - 1, 62))


class WorkQueue(Generic[K]):
    def __init__(self, clock: Clock, *, backoff: Backoff = Backoff(), resync_s: float = 600.0):
        if resync_s <= 0:
            raise ValueError("resync interval must be positive")
        self.clock = clock
        self.backoff = backoff
        self.resync_s = resync_s
        self._due: dict[K, float] = {}
        self._failures: dict[K, int] = {}
        self._next_resync = clock.now() + resync_s

    # --- marking --------------------------------------------------------------------

    def add(self, key: K, *, after: float = 0.0) -> None:
        """Mark `key` dirty, due in `after` seconds. Merged with an entry already queued:
        the earlier time wins, except that a resource backing off after a failure keeps
        its retry time (events about a broken resource must not retry it in a hot loop)."""
        when = self.clock.now() + after
        queued = self._due.get(key)
        if queued is None:
            self._due[key] = when
        elif self._failures.get(key, 0) == 0:
            self._due[key] = min(queued, when)

    def add_all(self, keys: Iterable[K], *, after: float = 0.0) -> None:
        for key in keys:
            self.add(key, after=after)

    def reset(self, key: K) -> None:
        """The resource's intent changed (its manifest, a resume): forget its failures
        and reconcile it now."""
        self._failures.pop(key, None)
        self._due[key] = self.clock.now()

    def failed(self, key: K) -> float:
        """Count a failure; queue the resource again after the backoff delay (seconds)."""
        n = self._failures.get(key, 0) + 1
        self._failures[key] = n
        delay = self.backoff.delay(n)
        self._due[key] = self.clock.now() + delay
        return delay

    def succeeded(self, key: K) -> None:
        self._failures.pop(key, None)

    def forget(self, key: K) -> None:
        """The resource is gone from the manifests and the host."""
        self._failures.pop(key, None)
        self._due.pop(key, None)

    # --- reading --------------------------------------------------------------------

    def pop_due(self) -> list[K]:
        """The resources due now, taken off the queue (in due order)."""
        now = self.clock.now()
        due = sorted((t, i, k) for i, (k, t) in enumerate(self._due.items()) if t <= now)
        for _, _, key in due:
            del self._due[key]
        return [k for _, _, k in due]

    def retry_at(self, key: K) -> float | None:
        """When a resource backing off after failures is retried (None: not backing off)."""
        if self._failures.get(key, 0) == 0:
            return None
        when = self._due.get(key)
        return when if when is not None and when > self.clock.now() else None

    def failures(self, key: K) -> int:
        return self._failures.get(key, 0)

    def due_in(self) -> float:
        """Seconds until something is due: the first queued resource or the resync."""
        now = self.clock.now()
        first = min(self._due.values(), default=self._next_resync)
        return max(0.0, min(first, self._next_resync) - now)

    def __len__(self) -> int:
        return len(self._due)

    def __contains__(self, key: object) -> bool:
        return key in self._due

    # --- resync ---------------------------------------------------------------------

    def resync_due(self) -> bool:
        return self.clock.now() >= self._next_resync

    def resynced(self) -> None:
        """A full resync was queued: the next one is an interval from now."""
        self._next_resync = self.clock.now() + self.resync_s

    @property
    def next_resync(self) -> float:
        return self._next_resync
