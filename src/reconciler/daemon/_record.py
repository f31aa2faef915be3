"""The daemon's writes to the journal, which must never stop its loop.

A write the journal refuses (another process holds its lock, the disk is full) is kept
in memory and written, in order, with the first write that succeeds after it; while the
journal is unavailable, the facts still go to the log, and a write is tried at most
every `retry_s` (each try can wait for the lock). Reads go straight to the journal.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Iterable

import structlog

from reconciler.daemon._clock import Clock
from reconciler.errors import JournalError
from reconciler.journal import EVENTS_KEPT, Journal, ResourceState

log = structlog.get_logger("reconciler.daemon")


class Record:
    def __init__(self, journal: Journal, clock: Clock, retry_s: float = 5.0):
        self.journal = journal
        self.clock = clock
        self.retry_s = retry_s
        #: why the journal refused the last write (None: it is writable)
        self.error: str | None = None
        self._retry_at = 0.0
        self._daemon: dict[str, Any] = {}
        self._events: deque[tuple[Any, ...]] = deque(maxlen=EVENTS_KEPT)
        self._resources: list[tuple[bool, list[ResourceState]]] = []

    def __getattr__(self, name: str) -> Any:  # reads (and anything else) are the journal's
        return getattr(self.journal, name)

    def set_daemon(self, **values: Any) -> None:
        self._daemon.update(values)
        self.flush()

    def event(self, level: str, reason: str, message: str, resource: str | None = None,
              revision: str | None = None) -> None:
        self._events.append((level, reason, message, resource, revision))
        self.flush()

    def set_resources(self, states: Iterable[ResourceState], *, replace: bool = False) -> None:
        if replace:
            self._resources.clear()  # these are all there are: what was kept before is moot
        self._resources.append((replace, list(states)))
        self.flush()

    @property
    def pending(self) -> int:
        return bool(self._daemon) + len(self._events) + len(self._resources)

    def flush(self, force: bool = False) -> None:
        """Write what is kept (at most every `retry_s` while the journal refuses, unless
        `force`: the last chance, at shutdown)."""
        if self.error is not None and self.clock.now() < self._retry_at and not force:
            return
        try:
            if self._daemon:
                self.journal.set_daemon(**self._daemon)
                self._daemon.clear()
            while self._events:
                self.journal.event(*self._events[0])
                self._events.popleft()
            while self._resources:
                replace, states = self._resources[0]
                self.journal.set_resources(states, replace=replace)
                self._resources.pop(0)
        except JournalError as exc:
            if self.error != str(exc):
                log.warning("the journal cannot be written; the daemon goes on and writes it later",
                            error=str(exc), pending=self.pending)
            self.error = str(exc)
            self._retry_at = self.clock.now() + self.retry_s
            return
        if self.error is not None:
            log.info("the journal is writable again; what was kept is written")
            self.error = None
