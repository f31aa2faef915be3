"""The daemon as a process: signals, the loop's thread, the metrics server.

Signals are taken synchronously by the main thread (`sigwait`), after being blocked
before any other thread starts, so no handler ever runs inside a lock: SIGTERM and
SIGINT stop (changes in flight finish and are recorded), SIGHUP reloads the host
config, SIGUSR1 (sent by `reconciler suspend/resume`) re-reads the suspensions.
"""

from __future__ import annotations

import signal
import threading
from typing import Callable

import structlog

from reconciler.daemon._daemon import Daemon
from reconciler.daemon._metrics import MetricsServer

log = structlog.get_logger("reconciler.daemon")

SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1}


def block_signals() -> None:
    """Call first, before any thread starts: threads inherit the mask, so the signals
    reach only `serve`'s sigwait."""
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)


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

    if server is not None:
        server.start()
        daemon.journal.set_daemon(metricsUrl=server.url)
    thread = threading.Thread(target=loop, name="reconcile")
    thread.start()
    if on_ready:
        on_ready()
    try:
        while thread.is_alive():
            info = signal.sigtimedwait(SIGNALS, 1.0)
            if info is None:
                continue
            sig = info.si_signo
            if sig in (signal.SIGTERM, signal.SIGINT):
                log.info("stopping", signal=signal.Signals(sig).name)
                daemon.request_stop()
            elif sig == signal.SIGHUP:
                daemon.request_reload()
            elif sig == signal.SIGUSR1:
                daemon.request_refresh()
        thread.join()
    finally:
        if server is not None:
            server.close()
            daemon.journal.set_daemon(metricsUrl=None)
    return 1 if failure else 0
