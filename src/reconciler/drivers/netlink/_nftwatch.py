"""Changes to our nftables tables as `HostEvent`s: `nft -j monitor` as a child process.

Netlink link notifications do not cover nftables: a rule deleted by hand, or a
`flush ruleset` (Debian's nftables.service starts with one), would leave a security
group or the anti-spoofing chains broken until the daemon's resync. `nft monitor`
prints every ruleset change as a JSON line; changes to our tables (inet and bridge
`reconciler_<home>`) are reported with subject "*" (a rule does not name its resource;
one full pass finds what broke), at most once per burst (`BURST_S`), since one apply
changes many rules. The child is started again when it dies, and killed (it is ours,
by PID) on close().
"""

from __future__ import annotations

import json
import subprocess
import threading
from typing import Any, Callable

import structlog

from reconciler.state import HostEvent

log = structlog.get_logger("reconciler.drivers.netlink")

WHAT = "nftables changed"
RESTARTED = "nftables monitor restarted"
#: events of one burst (a transaction, an apply) are reported once, this long after the first
BURST_S = 0.1
RESTART_S = 2.0


def table_of(event: dict[str, Any]) -> str | None:
    """The table a monitor line is about: {"add": {"rule": {"table": "t", ...}}} -> "t"."""
    for body in event.values():
        if isinstance(body, dict):
            for kind, obj in body.items():
                if isinstance(obj, dict):
                    return obj.get("name") if kind == "table" else obj.get("table")
    return None


class NftWatch:
    def __init__(self, driver: str, table: str, notify: Callable[[HostEvent], None], program: str = "nft"):
        self._driver = driver
        self._table = table
        self._notify = notify
        self._program = program
        self._lock = threading.RLock()
        self._closed = False
        self._stop = threading.Event()
        self._proc: subprocess.Popen[str] | None = None
        self._pending: threading.Timer | None = None
        self._thread = threading.Thread(target=self._run, name="reconciler-nft-watch", daemon=True)

    def start(self) -> "NftWatch":
        self._thread.start()
        return self

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._pending is not None:
                self._pending.cancel()
        self._stop.set()
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if threading.current_thread() is not self._thread:
            self._thread.join(5)

    def _run(self) -> None:
        first = True
        while not self._stop.is_set():
            try:
                self._proc = subprocess.Popen([self._program, "-j", "monitor"], stdout=subprocess.PIPE,
                                              stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True)
            except OSError as exc:
                log.warning("nft monitor cannot start; nftables drift waits for the resync", error=str(exc))
                self._stop.wait(RESTART_S * 15)
                continue
            if not first:  # changes while it was down are unknown: a full pass
                self._emit(RESTARTED)
            first = False
            assert self._proc.stdout is not None
            for line in self._proc.stdout:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if isinstance(event, dict) and table_of(event) == self._table:
                    self._burst()
            self._proc.wait()
            if not self._stop.is_set():
                log.warning("nft monitor exited; starting it again", code=self._proc.returncode)
                self._stop.wait(RESTART_S)

    def _burst(self) -> None:
        with self._lock:
            if self._closed or self._pending is not None:
                return
            self._pending = threading.Timer(BURST_S, self._flush)
            self._pending.daemon = True
            self._pending.start()

    def _flush(self) -> None:
        with self._lock:
            self._pending = None
        self._emit(WHAT)

    def _emit(self, what: str) -> None:
        with self._lock:
            if self._closed:
                return
            try:
                self._notify(HostEvent(self._driver, "*", what))
            except Exception as exc:  # noqa: BLE001 - never from the thread
                log.warning("nft watch: notify failed", error=str(exc))
