"""What every benchmark shares: rewriting its own marked section of docs/benchmarks.md,
the command block and machine table, progress lines, running a tool, and medians."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

#: the project's CLI, as `make setup` installs it
RECONCILER = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "reconciler"
#: tools in /usr/sbin (lvm, ip) found, and their output in the C locale
ENV = {**os.environ, "PATH": os.environ.get("PATH", "/usr/bin:/bin") + ":/usr/sbin:/sbin", "LC_ALL": "C"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(*args: str, check: bool = True, timeout: float = 600,
        env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a tool (an argument list, never a shell); a failure raises with its output."""
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                            stdin=subprocess.DEVNULL, env=dict(env) if env is not None else ENV)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:3])} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def timed_cli(config: Path, *args: str, log_level: str = "warning") -> tuple[float, subprocess.CompletedProcess[str]]:
    """A whole `reconciler` process with host config `config`: (wall seconds, result)."""
    env = {**ENV, "RECONCILER_HOST_CONFIG": str(config), "RECONCILER_LOG_LEVEL": log_level, "NO_COLOR": "1"}
    started = time.perf_counter()
    result = subprocess.run([str(RECONCILER), *args], capture_output=True, text=True, env=env,
                            stdin=subprocess.DEVNULL, timeout=3600)
    return time.perf_counter() - started, result


def spread_ms(values: Sequence[float]) -> str:
    """`median | min | max` in milliseconds, for a table row."""
    return f"{statistics.median(values) * 1000:.0f} ms | {min(values) * 1000:.0f} ms | {max(values) * 1000:.0f} ms"


def write_section(path: Path, section: str, begin: str, end: str) -> None:
    """Replace the part of `path` from `begin` to `end` with `section` (which carries the
    markers), or append it; nothing else in the file changes."""
    text = path.read_text() if path.exists() else ""
    start, stop = text.find(begin), text.find(end)
    if start != -1 and stop != -1 and stop > start:
        text = text[:start] + section.rstrip("\n") + text[stop + len(end):]
        if not text.endswith("\n"):
            text += "\n"
    else:
        if text and not text.endswith("\n"):
            text += "\n"
        text += ("\n" if text else "") + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def reproduce(command: str, now: str, machine: Mapping[str, str]) -> list[str]:
    """The command block and the machine table every section starts with."""
    return ["```sh", command, "```", "", f"Run on {now}, on:", "", "| | |", "|---|---|",
            *(f"| {k} | {v} |" for k, v in machine.items())]
