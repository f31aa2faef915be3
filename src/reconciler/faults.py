"""Fault points: named places where a test can make the process die on purpose.

`RECONCILER_FAULTS=libvirt.after-define` (a comma-separated list) makes the process
kill itself with SIGKILL when it reaches that point, so crash-safety tests can stop an
apply between two host calls deterministically. Unset (always, outside tests), a point
costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

ENV_VAR = "RECONCILER_FAULTS"


def point(name: str) -> None:
    """Die here (SIGKILL, no cleanup) when the environment names this point."""
    wanted = os.environ.get(ENV_VAR)
    if wanted and name in wanted.split(","):
        os.kill(os.getpid(), signal.SIGKILL)
