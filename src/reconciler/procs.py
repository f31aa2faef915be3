"""Processes as /proc shows them.

On hosts where nothing reaps orphans promptly (containers without an init, or PID 1
that reaps every second or so), a killed process stays a zombie for a while, so
`kill -0 PID` keeps succeeding: whether a process still runs is read from the state
letter in /proc/PID/stat instead.
"""

from __future__ import annotations

from pathlib import Path

PROC = Path("/proc")


def process_state(pid: int, proc: Path = PROC) -> str | None:
    """The state letter of a process (R, S, Z...); None when there is none."""
    try:
        stat = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    _, _, rest = stat.rpartition(")")  # the command name may hold spaces and parentheses
    parts = rest.split()
    return parts[0] if parts else None


def is_alive(pid: int, proc: Path = PROC) -> bool:
    """Zombies (Z) and dead tasks (X) are dead."""
    return process_state(pid, proc) not in (None, "Z", "X", "x")
