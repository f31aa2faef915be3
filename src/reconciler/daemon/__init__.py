"""`reconciler daemon`: the continuous, level-based reconcile loop (see _daemon)."""

from reconciler.daemon._clock import Clock, FakeClock, SystemClock
from reconciler.daemon._daemon import Daemon, DaemonOptions, PassReport
from reconciler.daemon._metrics import Metrics, MetricsServer
from reconciler.daemon._queue import Backoff, WorkQueue
from reconciler.daemon._sources import FolderSource, GitSource, Snapshot, Source, SourceError

__all__ = [
    "Backoff", "Clock", "Daemon", "DaemonOptions", "FakeClock", "FolderSource", "GitSource", "Metrics",
    "MetricsServer", "PassReport", "Snapshot", "Source", "SourceError", "SystemClock", "WorkQueue",
]
