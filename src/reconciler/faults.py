"""Fault points: places where a test can make the process die on purpose.

`RECONCILER_FAULTS` (a comma-separated list) makes the process kill itself with
SIGKILL, no cleanup, when it reaches one of the points it names, so crash-safety tests
can stop an apply or a destroy at a chosen place deterministically:

- `NAME` (e.g. `libvirt.after-define`): a named point inside a driver (mid-operation),
  the first time it is reached; `NAME@K`: the K-th time (K from 1);
- `call:N`: just before the N-th driver call that changes the host (create, update,
  delete, orphan; N from 1, counted in the order the calls start, over all threads)
  starts; `call:N:after`: just after it returns (or raises).

With `RECONCILER_FAULTS_LOG=FILE` too, every numbered call and every named point
reached is appended to FILE as one JSON line (`{"t": monotonic seconds, "event":
"before"|"after"|"point", "call": N, "what": ...}`) before the process acts on it, so
a dry run (any value of RECONCILER_FAULTS that names nothing, e.g. `trace`) tells a
harness every boundary it can stop the process at.

Unset (always, outside tests), a point or a call costs one dictionary lookup.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter

ENV_VAR = "RECONCILER_FAULTS"
LOG_VAR = "RECONCILER_FAULTS_LOG"

_lock = threading.Lock()
_calls = 0
_reached: Counter[str] = Counter()


def point(name: str) -> None:
    """Die here (SIGKILL, no cleanup) when the environment names this point."""
    wanted = os.environ.get(ENV_VAR)
    if not wanted:
        return
    with _lock:
        _reached[name] += 1
        times = _reached[name]
    _log("point", None, name)
    names = wanted.split(",")
    if name in names or f"{name}@{times}" in names:
        _die()


def call_started(what: str) -> int:
    """A driver call that changes the host is about to start: its number (0 when no
    fault is set). Dies first when the environment names `call:N` for it."""
    wanted = os.environ.get(ENV_VAR)
    if not wanted:
        return 0
    global _calls
    with _lock:
        _calls += 1
        number = _calls
    _log("before", number, what)
    if f"call:{number}" in wanted.split(","):
        _die()
    return number


def call_returned(number: int, what: str) -> None:
    """The call `number` (from `call_started`) returned or raised; dies when the
    environment names `call:N:after` for it."""
    if not number:
        return
    wanted = os.environ.get(ENV_VAR)
    if not wanted:
        return
    _log("after", number, what)
    if f"call:{number}:after" in wanted.split(","):
        _die()


def _log(event: str, number: int | None, what: str) -> None:
    path = os.environ.get(LOG_VAR)
    if not path:
        return
    line = json.dumps({"t": time.monotonic(), "event": event, "call": number, "what": what}) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, line.encode())  # one write per line: whole lines even across threads
    finally:
        os.close(fd)


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
