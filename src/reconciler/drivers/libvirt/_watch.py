"""libvirt domain events, as `HostEvent`s for the daemon.

libvirt delivers events through an event loop the client runs: `libvirt.
virEventRegisterDefaultImpl()` once per process (before the connection that wants events
is opened) and a thread calling `virEventRunDefaultImpl()` forever. That thread is
process-wide and never stops (libvirt has no way to unregister the loop); it runs our
callbacks, which only filter by name and call `notify`.

Each watch has its own read-only connection with callbacks for lifecycle events (a
domain defined, started, stopped, undefined...) and device events (a disk or NIC
attached or detached by hand), and a supervisor thread that notices when the connection
goes away (libvirt's close callback, or `isAlive()` false), opens a new one every
`RETRY_S` until it succeeds, and then reports ``HostEvent(subject="*", what="libvirt
reconnected")`` so the daemon resyncs everything it may have missed. Only domains named
with our prefix (`rc-`) are reported; the subject is the domain's name.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

import structlog

from reconciler.drivers.libvirt._host import libvirt
from reconciler.errors import PermanentError
from reconciler.naming import PREFIX
from reconciler.state import HostEvent

log = structlog.get_logger("reconciler.drivers.libvirt")

#: the subject that asks the daemon to resync everything
EVERYTHING = "*"
RECONNECTED = "libvirt reconnected"
DEVICE_ADDED = "domain device added"
DEVICE_REMOVED = "domain device removed"
#: between two attempts to open a connection after it was lost
RETRY_S = 2.0
#: how often the supervisor also asks `isAlive()` (the close callback is the fast path)
ALIVE_CHECK_S = 5.0
#: how long `close()` waits for the supervisor (it may be inside a connection attempt)
STOP_TIMEOUT_S = 10.0

#: lifecycle event code -> what (libvirt's VIR_DOMAIN_EVENT_* names, in words)
_LIFECYCLE = {
    "VIR_DOMAIN_EVENT_DEFINED": "domain defined",
    "VIR_DOMAIN_EVENT_UNDEFINED": "domain undefined",
    "VIR_DOMAIN_EVENT_STARTED": "domain started",
    "VIR_DOMAIN_EVENT_SUSPENDED": "domain suspended",
    "VIR_DOMAIN_EVENT_RESUMED": "domain resumed",
    "VIR_DOMAIN_EVENT_STOPPED": "domain stopped",
    "VIR_DOMAIN_EVENT_SHUTDOWN": "domain shutdown",
    "VIR_DOMAIN_EVENT_PMSUSPENDED": "domain pmsuspended",
    "VIR_DOMAIN_EVENT_CRASHED": "domain crashed",
}


def lifecycle_what(event: int) -> str:
    """The `what` of a lifecycle event code ("domain stopped", ...)."""
    for name, what in _LIFECYCLE.items():
        if getattr(libvirt, name, None) == event:
            return what
    return f"domain event {event}"


# --- the process-wide event loop ------------------------------------------------------

_loop_lock = threading.Lock()
_loop_thread: threading.Thread | None = None


def ensure_event_loop() -> None:
    """Register libvirt's default event implementation and start the thread that runs
    it, once per process (later calls return at once)."""
    global _loop_thread
    with _loop_lock:
        if _loop_thread is not None:
            return
        libvirt.virEventRegisterDefaultImpl()
        _loop_thread = threading.Thread(target=_run_event_loop, name="reconciler-libvirt-events",
                                        daemon=True)
        _loop_thread.start()


def _run_event_loop() -> None:
    while True:
        try:
            if libvirt.virEventRunDefaultImpl() < 0:
                log.warning("libvirt event loop: one iteration failed")
                time.sleep(0.1)
        except Exception:  # noqa: BLE001 - never raise from the thread
            log.warning("libvirt event loop: one iteration failed", exc_info=True)
            time.sleep(0.1)


def _message(exc: Exception) -> str:
    if libvirt is not None and isinstance(exc, libvirt.libvirtError):
        return (exc.get_error_message() or str(exc)).strip()
    return repr(exc)


# --- one watch ------------------------------------------------------------------------


def start_watch(uri: str, driver: str, notify: Callable[[HostEvent], None]) -> "LibvirtWatch":
    """A started `LibvirtWatch` of `uri` reporting as `driver` to `notify`."""
    if libvirt is None:
        raise PermanentError(
            "libvirt-python is not installed: run `make setup` (needs libvirt-dev and pkg-config)")
    return LibvirtWatch(uri, driver, notify).start()


class LibvirtWatch:
    """A running watcher of libvirt's domain events (see the module docstring);
    `close()` stops it."""

    def __init__(self, uri: str, driver: str, notify: Callable[[HostEvent], None]):
        self.uri = uri
        self._driver = driver
        self._notify = notify
        #: held while notifying and while closing: no notify after close() returned
        self._lock = threading.RLock()
        self._closed = False
        self._wake = threading.Event()  # close() or a lost connection
        self._lost = False
        self._conn: Any = None
        self._callbacks: list[int] = []
        self._thread = threading.Thread(target=self._supervise, name="reconciler-libvirt-watch",
                                        daemon=True)

    def start(self) -> "LibvirtWatch":
        """Connect and register (once, here: so events after this returns are reported
        when libvirtd is up), then let the supervisor keep the connection."""
        ensure_event_loop()
        self._connect()
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop (idempotent): no notify is called once this returned; the supervisor
        deregisters the callbacks and closes the connection before it ends."""
        with self._lock:
            self._closed = True
        self._wake.set()
        if threading.current_thread() is not self._thread and self._thread.is_alive():
            self._thread.join(STOP_TIMEOUT_S)
            if self._thread.is_alive():
                log.warning("libvirt watch: the supervisor did not stop in time",
                            timeout_s=STOP_TIMEOUT_S)

    # --- the connection ---------------------------------------------------------------

    def _connect(self, quiet: bool = False) -> bool:
        """Open a connection and register our callbacks; False when it fails (logged as
        a warning unless `quiet`: once per outage is enough)."""
        self._lost = False
        try:
            conn = libvirt.openReadOnly(self.uri)
        except Exception as exc:  # noqa: BLE001 - libvirtd not up (yet): retried
            (log.debug if quiet else log.warning)(
                "libvirt watch: cannot connect; retrying", uri=self.uri, error=_message(exc),
                retry_s=RETRY_S)
            return False
        callbacks: list[int] = []
        try:
            conn.registerCloseCallback(self._on_close, None)
            callbacks.append(conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None))
            callbacks.append(conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_ADDED, self._on_device_added, None))
            callbacks.append(conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED, self._on_device_removed, None))
        except Exception as exc:  # noqa: BLE001 - lost while registering: retried
            log.warning("libvirt watch: cannot register for events", uri=self.uri,
                        error=_message(exc))
            self._release(conn, callbacks)
            return False
        self._conn, self._callbacks = conn, callbacks
        return True

    def _release(self, conn: Any, callbacks: list[int]) -> None:
        """Deregister and close, ignoring errors (the connection may be dead already)."""
        for callback in callbacks:
            try:
                conn.domainEventDeregisterAny(callback)
            except Exception:  # noqa: BLE001
                pass
        try:
            conn.unregisterCloseCallback()
        except Exception:  # noqa: BLE001
            pass
        try:
            conn.close()
        except Exception:  # noqa: BLE001
            pass

    def _drop(self) -> None:
        if self._conn is not None:
            conn, callbacks = self._conn, self._callbacks
            self._conn, self._callbacks = None, []
            self._release(conn, callbacks)

    def _alive(self) -> bool:
        try:
            return bool(self._conn.isAlive())
        except Exception:  # noqa: BLE001
            return False

    def _supervise(self) -> None:
        """Keep a connection until close(); report a reconnect (never raises)."""
        try:
            missed = self._conn is None  # the first attempt (in start) failed
            failures = 1 if missed else 0  # attempts that failed since the last success
            while not self._closed:
                if self._conn is None:
                    if failures:  # the first attempt after a loss is at once
                        self._wake.wait(RETRY_S)
                        self._wake.clear()
                        if self._closed:
                            break
                    if self._connect(quiet=failures > 0):
                        if missed:
                            log.info("libvirt watch: reconnected", uri=self.uri)
                            self._emit(EVERYTHING, RECONNECTED)
                        missed, failures = False, 0
                    else:
                        missed = True
                        failures += 1
                    continue
                self._wake.wait(ALIVE_CHECK_S)
                self._wake.clear()
                if self._closed:
                    break
                if self._lost or not self._alive():
                    log.warning("libvirt watch: connection lost; reconnecting", uri=self.uri)
                    self._drop()
                    missed = True  # and try again at once: it may be back already
        except Exception:  # noqa: BLE001 - never raise from the thread
            log.error("libvirt watch: the supervisor failed; no more events", exc_info=True)
        finally:
            self._drop()

    # --- callbacks (run on the event loop thread: cheap, never raise) ------------------

    def _on_close(self, _conn: Any, reason: int, _opaque: Any) -> None:
        if reason != getattr(libvirt, "VIR_CONNECT_CLOSE_REASON_CLIENT", 3):
            self._lost = True
            self._wake.set()

    def _on_lifecycle(self, _conn: Any, dom: Any, event: int, _detail: int, _opaque: Any) -> None:
        self._domain_event(dom, event)

    def _on_device_added(self, _conn: Any, dom: Any, _device: str, _opaque: Any) -> None:
        self._domain_event(dom, DEVICE_ADDED)

    def _on_device_removed(self, _conn: Any, dom: Any, _device: str, _opaque: Any) -> None:
        self._domain_event(dom, DEVICE_REMOVED)

    def _domain_event(self, dom: Any, what: str | int) -> None:
        """Report `what` (a lifecycle event code, or words) when `dom` is named as ours."""
        try:
            name = dom.name()  # held by the event: no call to libvirtd
            if name.startswith(PREFIX):
                self._emit(name, lifecycle_what(what) if isinstance(what, int) else what)
        except Exception:  # noqa: BLE001 - never raise into libvirt's loop
            log.warning("libvirt watch: cannot handle an event", exc_info=True)

    def _emit(self, subject: str, what: str) -> None:
        with self._lock:
            if self._closed:
                return
            try:
                self._notify(HostEvent(driver=self._driver, subject=subject, what=what))
            except Exception:  # noqa: BLE001 - the daemon's bug must not stop the watch
                log.warning("libvirt watch: notify failed", subject=subject, what=what,
                            exc_info=True)
