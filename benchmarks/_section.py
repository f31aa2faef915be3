"""What every benchmark shares: rewriting its own marked section of docs/benchmarks.md,
the command block and machine table, progress lines, running a tool, and medians."""

from __future__ import annotations

import hashlib
import os
import signal
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


URI = "qemu:///system"
VIRSH = ["virsh", "-q", "-c", URI]


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


def timed_cli(config: Path, *args: str, log_level: str = "warning", timeout: float = 3600,
              check: bool = False) -> tuple[float, subprocess.CompletedProcess[str]]:
    """A whole `reconciler` process with host config `config`: (wall seconds, result).
    With `check`, a non-zero exit or a traceback raises with the output."""
    env = {k: v for k, v in ENV.items() if k != "RECONCILER_FAULTS"}
    env.update({"RECONCILER_HOST_CONFIG": str(config), "RECONCILER_LOG_LEVEL": log_level,
                "NO_COLOR": "1", "COLUMNS": "250", "TERM": "dumb"})
    started = time.perf_counter()
    result = subprocess.run([str(RECONCILER), *args], capture_output=True, text=True, env=env,
                            stdin=subprocess.DEVNULL, timeout=timeout)
    elapsed = time.perf_counter() - started
    if check and (result.returncode != 0 or "Traceback" in result.stdout + result.stderr):
        raise RuntimeError(f"reconciler {' '.join(args)} exited {result.returncode}\n--- stdout\n"
                           f"{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}")
    return elapsed, result


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


def home_of(state_dir: Path) -> str:
    """The netlink driver's installation id of a state dir: sha256 of its resolved path, 8 hex."""
    return hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:8]


class EnvPaths:
    """What every benchmark environment has under its `root` (a dataclass field of the
    class that mixes this in): state dir, host config, manifests folder, installation id."""

    root: Path

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def host_config(self) -> Path:
        return self.root / "host.yaml"

    @property
    def manifests(self) -> Path:
        return self.root / "manifests"

    @property
    def home(self) -> str:
        return home_of(self.state_dir)

    def cli(self, *args: str, log_level: str = "warning", timeout: float = 1800
            ) -> tuple[float, subprocess.CompletedProcess[str]]:
        """(wall seconds, result) of one reconciler command with this host config; raises
        unless it exits 0 without a traceback."""
        return timed_cli(self.host_config, *args, log_level=log_level, timeout=timeout, check=True)


def processes_mentioning(text: str) -> dict[int, str]:
    """Live processes (not zombies) whose command line holds `text`: pid -> command line."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if text in cmd and state not in ("Z", "X"):
            found[int(entry)] = cmd.strip()
    return found


class Interference:
    """Other work on the host while a benchmark runs (test runs, other benchmarks,
    reconciler commands and daemons not of this benchmark), and the load average."""

    def __init__(self, module: str, marker: str) -> None:
        self.module = module  # this benchmark's module, e.g. "benchmarks.networks"
        self.marker = marker  # in the command lines of this benchmark's own reconciler processes
        self.others: set[str] = set()
        self.load: list[float] = []

    def sample(self) -> None:
        self.load.append(os.getloadavg()[0])
        me = os.getpid()
        for pid, cmd in processes_mentioning("").items():
            if pid == me:
                continue
            if "pytest" in cmd:
                self.others.add("pytest")
            elif "benchmarks." in cmd and self.module not in cmd:
                self.others.add("another benchmark")
            elif "reconciler" in cmd and " daemon " in cmd and self.marker not in cmd:
                self.others.add("another reconciler daemon")
            elif ".venv/bin/reconciler" in cmd and self.marker not in cmd:
                self.others.add("another reconciler command")


def remove_host_objects(left: Sequence[tuple[str, str]]) -> None:
    """Remove leftovers found by a benchmark's sweep: ("link", name), ("namespace", name),
    ("nft table", "FAMILY NAME"), ("process", "PID ...") (a dnsmasq of the environment:
    ours to end, by PID); other kinds are the caller's."""
    for what, name in left:
        if what == "link":
            run("ip", "link", "del", "dev", name, check=False)
        elif what == "namespace":
            run("ip", "netns", "del", name, check=False)
        elif what == "nft table":
            run("nft", "delete", "table", *name.split(), check=False)
        elif what == "process":
            try:
                os.kill(int(name.split()[0]), signal.SIGKILL)
            except ProcessLookupError:
                pass


def virsh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(*VIRSH, *args, check=check)


def domain_names(running_only: bool = False) -> set[str]:
    args = ("list", "--name") if running_only else ("list", "--all", "--name")
    return {n for n in virsh(*args).stdout.split() if n}


def domain_titles() -> dict[str, str]:
    """Every domain on the host: name -> title ('' when none)."""
    titles = {}
    for name in sorted(domain_names()):
        result = virsh("desc", "--title", name, check=False)
        if result.returncode == 0:  # else: undefined meanwhile
            titles[name] = result.stdout.strip()
    return titles


def make_dir(path: Path) -> None:
    """A folder others can traverse (libvirt's QEMU runs as libvirt-qemu)."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o755)


def fmt_s(x: float | None) -> str:
    """A duration for a table: 4.2 ms, 420 ms, 4.20 s, 42.0 s; "–" for none."""
    if x is None:
        return "–"
    if x < 0.01:
        return f"{x * 1000:.1f} ms"
    if x < 1:
        return f"{x * 1000:.0f} ms"
    return f"{x:.2f} s" if x < 10 else f"{x:.1f} s"
