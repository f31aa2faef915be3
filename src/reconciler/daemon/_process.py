"""The daemon as a process: signals, the loop's thread, the metrics server.

Signal handlers only pass the request on (no I/O): SIGTERM and SIGINT stop (changes in
flight finish and are recorded), SIGHUP reloads the host config, SIGUSR1 (sent by
`reconciler suspend/resume`) re-reads the suspensions. Python runs handlers in the main
thread, which does nothing but wait for the loop's thread, so a handler never runs
inside a lock it would need.

Signals are not blocked (`pthread_sigmask`) to be taken with `sigwait`: a blocked mask
is inherited by every process the drivers start (dnsmasq, nft, ip), which then could
not be stopped with SIGTERM.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Callable

import structlog

from reconciler.daemon._daemon import Daemon
from reconciler.daemon._metrics import MetricsServer

log = structlog.get_logger("reconciler.daemon")

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)

_pending: list[int] = []
_target: list[Daemon] = []


def catch_signals() -> None:
    """Call first: signals that come before the daemon exists (while it is built) are
    kept and passed on when it serves, instead of killing the process (SIGHUP's default)."""
    for sig in SIGNALS:
        signal.signal(sig, _handler)


def _handler(signum: int, frame: FrameType | None) -> None:
    if _target:
        _dispatch(_target[0], signum)
    else:
        _pending.append(signum)


def _dispatch(daemon: Daemon, signum: int) -> None:
    if signum in (signal.SIGTERM, signal.SIGINT):
        log.info("stopping", signal=signal.Signals(signum).name)
        daemon.request_stop()
    elif signum == signal.SIGHUP:
        daemon.request_reload()
    elif signum == signal.SIGUSR1:
        daemon.request_refresh()


def serve(daemon: Daemon, server: MetricsServer | None = None,
          on_ready: Callable[[], None] | None = None) -> int:
    """Run the daemon until SIGTERM/SIGINT (exit code 0) or until its loop fails (1)."""
    failure: list[BaseException] = []

    def loop() -> None:
        try:
            daemon.run()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            failure.append(exc)
            log.exception("the daemon loop failed")

    _target[:] = [daemon]
    for signum in _pending:
        _dispatch(daemon, signum)
    _pending.clear()
    if server is not None:
        server.start()
        daemon.journal.set_daemon(metricsUrl=server.url)
    thread = threading.Thread(target=loop, name="reconcile")
    thread.start()
    if on_ready:
        on_ready()
    try:
        while thread.is_alive():
            thread.join(0.5)  # signal handlers run here, in the main thread
    finally:
        _target.clear()
        if server is not None:
            server.close()
            daemon.journal.set_daemon(metricsUrl=None)
    return 1 if failure else 0
