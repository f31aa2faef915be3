"""The daemon (`reconciler daemon`) on real drivers: how fast a commit reaches the host, how
fast drift is healed, and what an idle daemon costs; writes a section of docs/benchmarks.md.

    python -m benchmarks.daemon --repeat 5 --write docs/benchmarks.md

A command, never a test: every figure comes from watching the host with independent tools
(sysfs, `virsh`, `/proc`) or from the daemon's journal, log and metrics, never from the
daemon's own word that it is done. Needs root, libvirtd (scripts/setup-libvirt.sh), the
network tools (scripts/setup-network.sh), the test guest (scripts/build-test-image.sh) and,
for the example cloud, the Swift all-in-one (scripts/setup-swift.sh).

Every scenario has its own environment `rcbd<hex>` under /var/lib/reconciler/bench: host
config, fresh state dir (so its own installation id), manifests, tenants named after it,
its own 10.247.X.0/24 subnets (the example cloud's addresses are moved to 10.244-10.246),
and one daemon started by this command (its child: stopped by PID with SIGTERM and
reaped). Afterwards `reconciler destroy` with the same manifests and host config, a check
that nothing of the environment is left on the host (domains, links, namespaces, nftables
table, processes, Swift containers), and the removal of the environment's folder.

- `folder`: Tenant + one vxlan Network (DHCP off) on the netlink driver, daemon on the
  folder (`--source`). `--repeat` times the Network's `mtu` is changed by writing a temp
  file and `os.replace`-ing the manifest; timed from that rename until
  `/sys/class/net/<bridge>/mtu` (polled every 10 ms) shows the new value. Then, on the
  same daemon, `--repeat` times `ip link del` of the bridge; timed from its return until
  the bridge exists and is up again (polled every 10 ms), and until it is whole again
  (MTU, VXLAN port, nf_call_iptables).
- `git`: the same cloud in a local non-bare repository (branch main), daemon with
  `--git REPO --branch main --interval 30s`; the `mtu` edited, `git add`, and timed from
  `git commit` returning until the MTU is on the bridge.
- `instance`: Tenant, Image (the tiny guest), a vxlan Network with DHCP, one Instance
  (128 MiB, 1 GiB root disk, one NIC) on the libvirt driver; `--repeat` times `virsh
  destroy` of the running domain, timed until `virsh domstate` (polled every 20 ms) says
  running again.
- `idle-memory`: ~1,000 resources (benchmarks.plan's generator) on the in-memory drivers;
  `idle-example`: the example cloud (manifests/) on the real drivers (netlink, libvirt,
  storage files, Swift; Tenant in memory). After convergence and 5 s, `--windows` (3)
  consecutive windows of `--window` (60) s of the daemon process: CPU from
  /proc/PID/stat utime+stime, VmRSS from /proc/PID/status. The daemon's full resync
  (every 10 min) falls outside the windows (checked).

With `--write FILE` only the part of FILE between `<!-- daemon:begin -->` and
`<!-- daemon:end -->` is replaced (appended when the markers are absent).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from benchmarks import _section
from benchmarks._section import (
    ENV, URI, VIRSH, EnvPaths, Interference, domain_titles, fmt_s, home_of, log, make_dir,
    processes_mentioning, remove_host_objects, run, virsh,
)

from reconciler.models import Key
from reconciler.naming import host_name, tap_name

REPO = Path(__file__).resolve().parent.parent
RECONCILER = REPO / ".venv" / "bin" / "reconciler"
BENCH_ROOT = Path("/var/lib/reconciler/bench")
IMAGE = Path(os.environ.get("RECONCILER_TEST_IMAGE", "/var/lib/reconciler/images/tiny.qcow2"))
PREFIX = "rcbd"  # not rcbench / rcbnet: the other benchmarks sweep those
SUBNET_BASE = "10.247"  # 10.247.X.0/24 per network (tests 10.249/251/253/254, benchmarks 10.250/252)
#: the example cloud's address blocks, moved off the shared 10.10/10.20/10.250
EXAMPLE_REMAP = {"10.10.": "10.246.", "10.20.": "10.245.", "10.250.": "10.244."}
PROXY = "http://127.0.0.1:8080"
CLK_TCK = os.sysconf("SC_CLK_TCK")
#: where to copy the daemons' logs before their environment is removed (--keep-logs)
KEEP_LOGS: Path | None = None
BEGIN = "<!-- daemon:begin -->"
END = "<!-- daemon:end -->"
MTU_POLL_S = 0.01
LINK_POLL_S = 0.01
DOMSTATE_POLL_S = 0.02
TOOLS = ("ip", "nft", "dnsmasq", "virsh", "git")


def _epoch(iso: str) -> float:
    return _dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def used_prefixes() -> str:
    """Every IPv4 address and route on the host, as text to search."""
    return run("ip", "-4", "-o", "addr", "show").stdout + "\n" + run("ip", "-4", "route", "show").stdout


def free_subnets(count: int) -> list[ipaddress.IPv4Network]:
    used = used_prefixes()
    found = []
    for x in range(1, 255):
        prefix = f"{SUBNET_BASE}.{x}."
        if prefix in used:
            continue
        found.append(ipaddress.IPv4Network(f"{prefix}0/24"))
        if len(found) == count:
            return found
    raise RuntimeError(f"no {count} free {SUBNET_BASE}.X.0/24 subnets on this host")


def doc(kind: str, tenant: str | None, name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if tenant is not None:
        meta["tenant"] = tenant
    return {"apiVersion": "reconciler/v1", "kind": kind, "metadata": meta, "spec": dict(spec)}


def dump_docs(path: Path, docs: Sequence[Mapping[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")  # hidden: the folder source ignores it
    tmp.write_text(yaml.safe_dump_all(list(docs), sort_keys=False, default_flow_style=None))
    os.replace(tmp, path)


# --- Swift (the example cloud's buckets) --------------------------------------------------


def swift_answers() -> bool:
    try:
        with urllib.request.urlopen(PROXY + "/healthcheck", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def swift_containers(account: str, purge: bool = False) -> list[str]:
    """Containers of a Swift account (as the reseller admin); with `purge`, delete them
    (objects first) and return what is left."""
    from benchmarks.buckets import Account

    acc = Account(account[len("AUTH_"):])
    return acc.empty() if purge else acc.containers()


# --- one environment ---------------------------------------------------------------------


@dataclass
class Env(EnvPaths):
    id: str
    root: Path
    drivers: dict[str, str]
    extra_config: dict[str, Any] = field(default_factory=dict)
    #: Swift accounts its buckets live in (checked and emptied at the end)
    accounts: list[str] = field(default_factory=list)

    @classmethod
    def create(cls, drivers: Mapping[str, str] | str, **extra: Any) -> "Env":
        env_id = f"{PREFIX}{secrets.token_hex(4)}"
        make_dir(BENCH_ROOT.parent)
        make_dir(BENCH_ROOT)
        env = cls(env_id, BENCH_ROOT / env_id, dict(drivers) if isinstance(drivers, Mapping) else {}, dict(extra))
        make_dir(env.root)
        make_dir(env.state_dir)
        config: dict[str, Any] = {"stateDir": str(env.state_dir), "drivers": drivers, **extra}
        env.host_config.write_text(json.dumps(config, indent=2) + "\n")  # JSON is YAML
        return env

    def record(self, **info: Any) -> None:
        """What a later sweep needs (manifests folder, accounts), written before it exists."""
        path = self.root / "env.json"
        data = json.loads(path.read_text()) if path.exists() else {}
        data.update(info)
        path.write_text(json.dumps(data, indent=2) + "\n")


def leftovers_of(root: Path) -> list[tuple[str, str]]:
    """(what, name) of everything of one environment still on the host."""
    env_id = root.name
    state = root / "state"
    home = home_of(state)
    info = json.loads((root / "env.json").read_text()) if (root / "env.json").exists() else {}
    found: list[tuple[str, str]] = []
    try:
        titles = domain_titles()
    except RuntimeError:
        titles = {}
    found += [("domain", n) for n, t in titles.items() if t.startswith(env_id)]
    expected_links = set(info.get("links", []))
    for entry in json.loads(run("ip", "-j", "link", "show").stdout or "[]"):
        name, alias = entry["ifname"], entry.get("ifalias") or ""
        if f"home={home}" in alias or name in expected_links:
            found.append(("link", name))
    expected_ns = set(info.get("namespaces", []))
    for entry in json.loads(run("ip", "-j", "netns", "list").stdout or "[]"):
        if entry["name"] in expected_ns:
            found.append(("namespace", entry["name"]))
    tables = json.loads(run("nft", "-j", "list", "tables").stdout)["nftables"]
    for obj in tables:
        table = obj.get("table")
        if table and table["name"] == f"reconciler_{home}":
            found.append(("nft table", f"{table['family']} {table['name']}"))
    for pid, cmd in processes_mentioning(str(root)).items():
        if pid != os.getpid():
            found.append(("process", f"{pid} {cmd[:80]}"))
    for account in info.get("accounts", []):
        try:
            found += [("container", f"{account}/{c}") for c in swift_containers(account)]
        except Exception as exc:  # noqa: BLE001 - reported, the sweep goes on
            found.append(("swift account unreadable", f"{account}: {exc}"))
    return found


def _remove_domain(name: str) -> None:
    virsh("destroy", name, check=False)
    if virsh("undefine", "--nvram", name, check=False).returncode != 0:
        virsh("undefine", name, check=False)


def _stop_foreign_daemon(root: Path) -> None:
    """A daemon of an interrupted run of this command (its PID file and its command line
    naming this environment): SIGTERM, then wait (it is not our child: read its state)."""
    pid_file = root / "daemon.pid"
    if not pid_file.exists():
        return
    pid = int(pid_file.read_text().strip() or 0)
    if pid <= 0 or str(root) not in processes_mentioning(str(root)).get(pid, ""):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and pid in processes_mentioning(str(root)):
        time.sleep(0.2)
    if pid in processes_mentioning(str(root)):
        os.kill(pid, signal.SIGKILL)


def sweep_root(root: Path) -> list[str]:
    """Remove what is left of an environment: first with `reconciler destroy` (its own host
    config and manifests), then by hand; then its folder. What could not be removed."""
    _stop_foreign_daemon(root)
    info = json.loads((root / "env.json").read_text()) if (root / "env.json").exists() else {}
    manifests = info.get("manifests")
    left = leftovers_of(root)
    if left and manifests and Path(manifests).exists() and (root / "host.yaml").exists():
        env = {**ENV, "RECONCILER_HOST_CONFIG": str(root / "host.yaml"), "RECONCILER_LOG_LEVEL": "warning"}
        subprocess.run([str(RECONCILER), "destroy", manifests, "--yes"], capture_output=True, text=True,
                       env=env, stdin=subprocess.DEVNULL, timeout=600)
        left = leftovers_of(root)
    domains = [n for w, n in left if w == "domain"]
    if domains:
        with ThreadPoolExecutor(max_workers=len(domains)) as pool:
            list(pool.map(_remove_domain, domains))
    remove_host_objects(left)
    for account in info.get("accounts", []):
        try:
            swift_containers(account, purge=True)
        except Exception:  # noqa: BLE001 - reported below as left
            pass
    problems = []
    if left:
        time.sleep(2)  # a killed process is reaped by PID 1 within ~1.5 s
        problems = [f"{w} {n}" for w, n in leftovers_of(root)]
    shutil.rmtree(root, ignore_errors=True)
    return problems


def sweep_all() -> list[str]:
    problems: list[str] = []
    if BENCH_ROOT.exists():
        for root in sorted(BENCH_ROOT.glob(f"{PREFIX}*")):
            log(f"removing leftovers of {root.name}")
            problems += sweep_root(root)
    return problems


# --- the daemon as a child process -----------------------------------------------------------


class DaemonProc:
    """One `reconciler daemon` started by this command, with its log, journal and metrics."""

    def __init__(self, env: Env, name: str, *source_args: str):
        self.env = env
        self.name = name
        self.log_path = env.root / f"daemon-{name}.log"
        self._log = open(self.log_path, "w")
        cmd = [str(RECONCILER), "--log-level", "info", "daemon", *source_args,
               "--metrics-address", "127.0.0.1:0"]
        penv = {k: v for k, v in ENV.items() if k != "RECONCILER_FAULTS"}
        penv.update({"RECONCILER_HOST_CONFIG": str(env.host_config), "NO_COLOR": "1", "TERM": "dumb"})
        self.started_wall = time.time()
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=penv, cwd=str(env.root))
        self.pid = self.proc.pid
        (env.root / "daemon.pid").write_text(f"{self.pid}\n")
        self.command = " ".join(["reconciler", "--log-level", "info", "daemon", *source_args,
                                 "--metrics-address", "127.0.0.1:0"])

    # journal ---------------------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{self.env.state_dir / 'journal.sqlite3'}?mode=ro", uri=True, timeout=10)

    def journal(self) -> dict[str, Any]:
        try:
            with self._db() as db:
                return {k: json.loads(v) if v is not None else None for k, v in db.execute("SELECT name, value FROM daemon")}
        except sqlite3.Error:
            return {}

    def resource_states(self) -> dict[str, tuple[str, str | None]]:
        try:
            with self._db() as db:
                return {f"{k}/{t}/{n}": (s, e) for k, t, n, s, e in
                        db.execute("SELECT kind, tenant, name, state, error FROM resources")}
        except sqlite3.Error:
            return {}

    def events(self, since: float = 0.0, reasons: Iterable[str] | None = None) -> list[dict[str, Any]]:
        try:
            with self._db() as db:
                rows = list(db.execute("SELECT at, level, reason, resource, message, revision FROM events ORDER BY id"))
        except sqlite3.Error:
            return []
        wanted = set(reasons) if reasons is not None else None
        out = []
        for at, level, reason, resource, message, revision in rows:
            t = _epoch(at)
            if t >= since and (wanted is None or reason in wanted):
                out.append({"t": t, "level": level, "reason": reason, "resource": resource,
                            "message": message, "revision": revision})
        return out

    # log ---------------------------------------------------------------------------------

    def log_lines(self, since: float = 0.0, until: float = float("inf")) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if not line.startswith("{"):
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            t = _epoch(entry["timestamp"]) if "timestamp" in entry else 0.0
            if since <= t < until:
                entry["t"] = t
                out.append(entry)
        return out

    def text_log(self) -> str:
        return self.log_path.read_text(errors="replace")

    # metrics -------------------------------------------------------------------------------

    def metrics(self) -> dict[str, float]:
        url = self.journal().get("metricsUrl")
        if not url:
            return {}
        with urllib.request.urlopen(url + "/metrics", timeout=5) as response:
            text = response.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                pass
        return out

    # /proc ----------------------------------------------------------------------------

    def cpu_ticks(self) -> int:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)

    def status(self) -> dict[str, str]:
        out = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            out[key] = value.strip()
        return out

    def rss_mib(self) -> float:
        return int(self.status()["VmRSS"].split()[0]) / 1024

    # life ----------------------------------------------------------------------------------

    def alive(self) -> bool:
        return self.proc.poll() is None

    def check_alive(self) -> None:
        if not self.alive():
            raise RuntimeError(f"the daemon exited {self.proc.returncode}:\n{self.text_log()[-3000:]}")

    def wait_converged(self, expected: int, timeout: float, quiet_s: float = 1.0) -> dict[str, Any]:
        """Until the revision is applied, `expected` resources are ready, and no pass ran
        for `quiet_s`. Returns what it saw (`ok` False on timeout, with the states)."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            info = self.journal()
            if info.get("attemptedErrors"):
                raise RuntimeError(f"the daemon rejected the revision: {info['attemptedErrors'][:5]}")
            states = self.resource_states()
            ready = sum(1 for s, _ in states.values() if s == "ready")
            applied = info.get("appliedRevision")
            if applied and applied == info.get("attemptedRevision") and ready >= expected:
                if self.quiet_for(quiet_s):
                    return {"ok": True, "at": time.time(), "states": states, "info": info}
            if time.monotonic() > deadline:
                return {"ok": False, "at": time.time(), "states": states, "info": info}
            time.sleep(0.2)

    def quiet_for(self, seconds: float) -> bool:
        """No pass started or ended in the last `seconds` (by the log)."""
        lines = self.log_lines(since=time.time() - seconds)
        return not any(e.get("event") in ("planned", "applied", "change", "new revision") for e in lines)

    def wait_quiet(self, seconds: float = 1.0, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            if self.quiet_for(seconds):
                return True
            time.sleep(0.1)
        return False

    def stop(self, timeout: float = 120.0) -> dict[str, Any]:
        """SIGTERM by PID, then reap it (Popen.wait); SIGKILL only if it does not stop."""
        out: dict[str, Any] = {"killed": False}
        if self.proc.poll() is None:
            t0 = time.perf_counter()
            wall = time.time()
            os.kill(self.pid, signal.SIGTERM)
            try:
                out["exit"] = self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                out["exit"] = self.proc.wait(timeout=30)
                out["killed"] = True
            out["stop_s"] = time.perf_counter() - t0
            lines = self.log_lines(since=wall - 0.01)
            stopping = next((e["t"] for e in lines if e.get("event") == "stopping"), None)
            stopped = next((e["t"] for e in lines if e.get("event") == "Stopped"), None)
            out["signal_seen_s"] = None if stopping is None else stopping - wall
            out["stopped_logged_s"] = None if stopped is None else stopped - wall
        else:
            out["exit"] = self.proc.returncode
        self._log.close()
        if KEEP_LOGS is not None:
            KEEP_LOGS.mkdir(parents=True, exist_ok=True)
            shutil.copy(self.log_path, KEEP_LOGS / f"{self.env.id}-{self.name}.log")
        (self.env.root / "daemon.pid").unlink(missing_ok=True)
        return out


# --- host observation ----------------------------------------------------------------------


def read_sys(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def poll_until(check: Callable[[], bool], interval: float, timeout: float) -> float | None:
    """Seconds (perf_counter) at which `check` first held, or None on timeout."""
    deadline = time.perf_counter() + timeout
    while True:
        if check():
            return time.perf_counter()
        if time.perf_counter() > deadline:
            return None
        time.sleep(interval)


def bridge_up(bridge: str) -> bool:
    flags = read_sys(f"/sys/class/net/{bridge}/flags")
    return flags is not None and int(flags, 16) & 0x1 == 1


def bridge_whole(bridge: str, mtu: int) -> bool:
    """Up, with its MTU, its VXLAN port enslaved and nf_call_iptables on (what the netlink
    driver checks of a bridge; it keeps no address on it in the host namespace)."""
    if not bridge_up(bridge) or read_sys(f"/sys/class/net/{bridge}/mtu") != str(mtu):
        return False
    if read_sys(f"/sys/class/net/{bridge}/bridge/nf_call_iptables") != "1":
        return False
    return os.path.exists(f"/sys/class/net/{bridge}/brif/rv-{bridge[3:]}")


def signal_masks(d: "DaemonProc", env: Env) -> list[dict[str, Any]]:
    """Which of SIGHUP, SIGINT, SIGUSR1, SIGTERM (the daemon's own) are blocked (`SigBlk`) in
    the daemon's children and in the environment's dnsmasq processes (detached: parent PID 1)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == d.pid:
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        words = cmd.split()
        name = Path(words[0]).name if words else "?"
        if int(fields.get("PPid", "0").strip() or 0) != d.pid and not (name == "dnsmasq" and str(env.state_dir) in cmd):
            continue
        mask = int(fields.get("SigBlk", "0").strip(), 16)
        blocked = []
        for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGUSR1, signal.SIGTERM):  # what the daemon takes
            if mask & (1 << (sig - 1)):
                blocked.append(sig.name)
        what = " ".join(words[:3]) if name == "nft" else name
        out.append({"pid": int(entry), "what": what, "blocked": blocked})
    return out


def domstate(name: str) -> str:
    result = subprocess.run([*VIRSH, "domstate", name], capture_output=True, text=True, env=ENV,
                            stdin=subprocess.DEVNULL, timeout=30)
    return result.stdout.strip()


# --- interference ------------------------------------------------------------------------------


WATCH = Interference("benchmarks.daemon", str(BENCH_ROOT / PREFIX))


def others_running() -> set[str]:
    watch = Interference("benchmarks.daemon", str(BENCH_ROOT / PREFIX))
    watch.sample()
    return watch.others


def wait_for_quiet(limit_s: float) -> float:
    """Wait (up to `limit_s`) until no test run, other benchmark or other reconciler command
    runs on this host (their host objects set off the daemon's watchers); the seconds
    waited. The scenario runs either way; what it saw is recorded."""
    started = time.perf_counter()
    said = False
    while time.perf_counter() - started < limit_s:
        others = others_running()
        if not others:
            break
        if not said:
            log(f"  waiting (up to {limit_s:.0f} s) for other work to finish: {', '.join(sorted(others))}")
            said = True
        time.sleep(2)
    return time.perf_counter() - started


def own_subjects(env: Env, keys: Iterable[Key], taps: Iterable[str] = ()) -> set[str]:
    """Host names the daemon's watchers may report that belong to this environment."""
    names = set(taps)
    for key in keys:
        name = host_name(key)
        names.add(name)
        if key.kind == "Network":
            names.update({"rv-" + name[3:], "rl-" + name[3:]})
    for entry in json.loads(run("ip", "-j", "link", "show").stdout or "[]"):
        if f"home={env.home}" in (entry.get("ifalias") or ""):
            names.add(entry["ifname"])
    return names


def event_stats(d: DaemonProc, since: float, until: float, own: set[str]) -> dict[str, Any]:
    """From the daemon's log between two times: passes, host events (own and foreign)."""
    lines = d.log_lines(since, until)
    host = [e for e in lines if e.get("event") == "host event"]
    foreign = [e for e in host if e.get("subject") not in own and e.get("subject") != "*"]
    return {
        "passes": sum(1 for e in lines if e.get("event") == "planned"),
        "applies": sum(1 for e in lines if e.get("event") == "applied"),
        "host_events": len(host),
        "foreign_events": len(foreign),
        "foreign_subjects": sorted({e.get("subject", "?") for e in foreign}),
        "errors": [e for e in lines if e.get("level") in ("error", "critical")
                   or e.get("event") in ("ApplyFailed", "ReconcileFailed", "CannotPlan", "WatchFailed")],
        "resyncs": sum(1 for e in lines if e.get("event") == "resync"),
    }


# --- the clouds --------------------------------------------------------------------------------


NETLINK_ONLY = {"Tenant": "memory", "Image": "memory", "Instance": "memory", "Volume": "memory",
                "Bucket": "memory", "Network": "netlink", "Router": "netlink", "SecurityGroup": "netlink"}
LIBVIRT_EXTRA = {"libvirt": {"uri": URI, "domainType": "qemu", "shutdownTimeoutSeconds": 10}}


def mtu_cloud(tenant: str, subnet: ipaddress.IPv4Network, mtu: int) -> list[dict[str, Any]]:
    return [doc("Tenant", None, tenant, {}),
            doc("Network", tenant, "net-a", {"type": "vxlan", "mtu": mtu, "subnets": [
                {"cidr": str(subnet), "gateway": str(subnet.network_address + 1), "dhcp": {"enabled": False}}]})]


def mtu_sequence(repeat: int) -> list[int]:
    return [1300 + 10 * (i % 10) for i in range(repeat)]


@dataclass
class Edit:
    t_write: float  # wall clock, just after the rename / commit
    mtu: int
    latency: float | None
    extra: dict[str, Any] = field(default_factory=dict)


def measure_mtu_edits(d: DaemonProc, bridge: str, repeat: int, write: Callable[[int], float],
                      start_mtu: int, what: str) -> list[dict[str, Any]]:
    """`repeat` MTU edits, each written by `write(mtu)` (returns the perf_counter time after
    which the change is in the source) and timed until sysfs shows it."""
    results = []
    current = start_mtu
    for i, mtu in enumerate(mtu_sequence(repeat)):
        if mtu == current:
            mtu += 5
        d.wait_quiet(1.0)
        time.sleep(0.5)
        WATCH.sample()
        perf0 = write(mtu)
        wall = time.time() - (time.perf_counter() - perf0)  # the same instant, on the log's clock
        seen = poll_until(lambda: read_sys(f"/sys/class/net/{bridge}/mtu") == str(mtu), MTU_POLL_S, 60.0)
        latency = None if seen is None else seen - perf0
        d.wait_quiet(1.0)
        lines = d.log_lines(since=wall - 0.001)
        noticed = next((e["t"] for e in lines if e.get("event") == "new revision"), None)
        change = next((e for e in lines if e.get("event") == "change" and e.get("change", "").startswith("Network/")), None)
        applied_ev = next((e for e in d.events(since=wall - 0.001, reasons=("RevisionApplied",))), None)
        results.append({
            "mtu": mtu, "latency": latency,
            "noticed": None if noticed is None else noticed - wall,
            "changed": None if change is None else change["t"] - wall,
            "change_s": None if change is None else change.get("duration_s"),
            "journal_applied": None if applied_ev is None else applied_ev["t"] - wall,
            "passes": sum(1 for e in lines if e.get("event") == "planned"),
            "host_events": sorted({f"{e.get('driver')} {e.get('what')}" + (" (subject *)" if e.get("subject") == "*" else "")
                                   for e in lines if e.get("event") == "host event"}),
        })
        log(f"  {what} {i + 1}: mtu {mtu} on the bridge after {fmt_s(latency)} (daemon noticed after "
            f"{fmt_s(results[-1]['noticed'])}; {results[-1]['passes']} passes)")
        if latency is None:
            raise RuntimeError(f"{what}: mtu {mtu} not on {bridge} within 60 s\n{d.text_log()[-3000:]}")
        current = mtu
    return results


def destroy_env(env: Env, manifests: Path) -> dict[str, Any]:
    """`reconciler destroy` with the environment's manifests and host config, then the
    leftover check and the removal of its folder."""
    destroy_s, _ = env.cli("destroy", str(manifests), "--yes", "--parallelism", "8")
    deadline = time.monotonic() + 10
    while True:
        left = leftovers_of(env.root)
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    problems = sweep_root(env.root) if left else (shutil.rmtree(env.root, ignore_errors=True) or [])
    return {"destroy_s": destroy_s, "left_after_destroy": [f"{w} {n}" for w, n in left], "left_at_end": problems}


# --- scenarios ----------------------------------------------------------------------------------


def scenario_folder(repeat: int) -> dict[str, Any]:
    """1a: folder edit -> MTU on the bridge; 2b: bridge deleted -> back."""
    env = Env.create(NETLINK_ONLY)
    tenant = env.id
    (subnet,) = free_subnets(1)
    key = Key("Network", tenant, "net-a")
    bridge = host_name(key)
    env.record(manifests=str(env.manifests), links=[bridge, "rv-" + bridge[3:]])
    start_mtu = 1400
    manifest = env.manifests / "cloud.yaml"
    dump_docs(manifest, mtu_cloud(tenant, subnet, start_mtu))
    out: dict[str, Any] = {}
    d = DaemonProc(env, "folder", "--source", str(env.manifests))
    try:
        conv = d.wait_converged(2, 60)
        if not conv["ok"]:
            raise RuntimeError(f"folder: not converged: {conv['states']}\n{d.text_log()[-3000:]}")
        out["first_apply"] = conv["at"] - d.started_wall
        out["command"] = d.command
        out["signal_masks"] = signal_masks(d, env)
        own = own_subjects(env, [key, Key("Tenant", tenant, tenant)])
        t_start = time.time()

        def write(mtu: int) -> float:
            docs = mtu_cloud(tenant, subnet, mtu)
            tmp = env.manifests / ".cloud.yaml.tmp"
            tmp.write_text(yaml.safe_dump_all(docs, sort_keys=False, default_flow_style=None))
            os.replace(tmp, manifest)
            return time.perf_counter()

        out["edits"] = measure_mtu_edits(d, bridge, repeat, write, start_mtu, "folder edit")
        current = out["edits"][-1]["mtu"]
        # 2b: the bridge deleted by hand
        heals = []
        for i in range(repeat):
            d.wait_quiet(1.0)
            time.sleep(0.5)
            WATCH.sample()
            t0 = time.perf_counter()
            run("ip", "link", "del", "dev", bridge)
            t_del = time.perf_counter()
            wall = time.time()
            up = poll_until(lambda: bridge_up(bridge), LINK_POLL_S, 30.0)
            whole = poll_until(lambda: bridge_whole(bridge, current), LINK_POLL_S, 30.0)
            d.wait_quiet(1.0)
            drift = d.events(since=wall - 1, reasons=("Drift",))
            healed = d.events(since=wall - 1, reasons=("DriftHealed",))
            lines = d.log_lines(since=wall - 1)
            heals.append({
                "del_s": t_del - t0,
                "up": None if up is None else up - t_del,
                "whole": None if whole is None else whole - t_del,
                "drift_event": drift[0]["t"] - wall if drift else None,
                "healed_event": healed[0]["t"] - wall if healed else None,
                "passes": sum(1 for e in lines if e.get("event") == "planned"),
                "host_events": sorted({f"{e.get('driver')} {e.get('what')}" + (" (subject *)" if e.get("subject") == "*" else "")
                                       for e in lines if e.get("event") == "host event"}),
                "message": drift[0]["message"] if drift else None,
            })
            log(f"  bridge del {i + 1}: up again after {fmt_s(heals[-1]['up'])}, whole after {fmt_s(heals[-1]['whole'])} "
                f"({heals[-1]['passes']} passes)")
            if up is None:
                raise RuntimeError(f"bridge {bridge} not back within 30 s\n{d.text_log()[-3000:]}")
        out["bridge_heals"] = heals
        out["stats"] = event_stats(d, t_start, time.time(), own)
    finally:
        out["stop"] = d.stop()
        out["cleanup"] = destroy_env(env, env.manifests)
    return out


def git(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**ENV, "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost",
           "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@localhost",
           "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_CONFIG_NOSYSTEM": "1"}
    return run("git", "-C", str(repo), *args, env=env)


def scenario_git(repeat: int) -> dict[str, Any]:
    """1b: git commit -> MTU on the bridge."""
    env = Env.create(NETLINK_ONLY)
    tenant = env.id
    (subnet,) = free_subnets(1)
    key = Key("Network", tenant, "net-a")
    bridge = host_name(key)
    repo = env.root / "repo"
    env.record(manifests=str(env.root / "final"), links=[bridge, "rv-" + bridge[3:]])
    make_dir(repo)
    git(repo, "init", "-q", "-b", "main")
    start_mtu = 1400
    manifest = repo / "cloud.yaml"
    manifest.write_text(yaml.safe_dump_all(mtu_cloud(tenant, subnet, start_mtu), sort_keys=False,
                                           default_flow_style=None))
    (env.root / "final").mkdir()
    shutil.copy(manifest, env.root / "final" / "cloud.yaml")  # what destroy reads
    git(repo, "add", "cloud.yaml")
    git(repo, "commit", "-q", "-m", "first")
    out: dict[str, Any] = {"git": run("git", "--version").stdout.strip()}
    d = DaemonProc(env, "git", "--git", str(repo), "--branch", "main", "--interval", "30s")
    try:
        conv = d.wait_converged(2, 90)
        if not conv["ok"]:
            raise RuntimeError(f"git: not converged: {conv['states']}\n{d.text_log()[-3000:]}")
        out["first_apply"] = conv["at"] - d.started_wall
        out["command"] = d.command
        own = own_subjects(env, [key, Key("Tenant", tenant, tenant)])
        t_start = time.time()
        commit_s: list[float] = []

        def write(mtu: int) -> float:
            manifest.write_text(yaml.safe_dump_all(mtu_cloud(tenant, subnet, mtu), sort_keys=False,
                                                   default_flow_style=None))
            shutil.copy(manifest, env.root / "final" / "cloud.yaml")
            git(repo, "add", "cloud.yaml")
            t = time.perf_counter()
            git(repo, "commit", "-q", "-m", f"mtu {mtu}")
            done = time.perf_counter()
            commit_s.append(done - t)
            return done

        out["edits"] = measure_mtu_edits(d, bridge, repeat, write, start_mtu, "git commit")
        for e, c in zip(out["edits"], commit_s):
            e["commit_s"] = c
        out["stats"] = event_stats(d, t_start, time.time(), own)
    finally:
        out["stop"] = d.stop()
        out["cleanup"] = destroy_env(env, env.root / "final")
    return out


def scenario_instance(repeat: int) -> dict[str, Any]:
    """2a: virsh destroy -> running again."""
    drivers = dict(NETLINK_ONLY, Image="libvirt", Instance="libvirt")
    env = Env.create(drivers, **LIBVIRT_EXTRA)
    tenant = env.id
    (subnet,) = free_subnets(1)
    net_key, vm_key = Key("Network", tenant, "net-i"), Key("Instance", tenant, "vm-1")
    domain = host_name(vm_key)
    bridge = host_name(net_key)
    tap = tap_name(tenant, "vm-1", "net-i")
    env.record(manifests=str(env.manifests), links=[bridge, "rv-" + bridge[3:], tap],
               namespaces=["rc-dhcp-" + bridge[3:]])
    docs = [doc("Tenant", None, tenant, {}),
            doc("Image", tenant, "tiny", {"source": str(IMAGE)}),
            doc("Network", tenant, "net-i", {"type": "vxlan", "subnets": [{"cidr": str(subnet)}]}),
            doc("Instance", tenant, "vm-1", {"image": "tiny", "memoryMiB": 128, "rootDiskGiB": 1,
                                             "networks": [{"network": "net-i"}]})]
    dump_docs(env.manifests / "cloud.yaml", docs)
    out: dict[str, Any] = {}
    d = DaemonProc(env, "instance", "--source", str(env.manifests))
    try:
        conv = d.wait_converged(4, 180)
        if not conv["ok"]:
            raise RuntimeError(f"instance: not converged: {conv['states']}\n{d.text_log()[-3000:]}")
        out["first_apply"] = conv["at"] - d.started_wall
        if domstate(domain) != "running":
            raise RuntimeError(f"{domain} is {domstate(domain)!r} after convergence")
        out["signal_masks"] = signal_masks(d, env)
        own = own_subjects(env, [net_key, vm_key, Key("Image", tenant, "tiny"), Key("Tenant", tenant, tenant)],
                           taps=[tap])
        t_start = time.time()
        heals = []
        for i in range(repeat):
            d.wait_quiet(1.0)
            time.sleep(3.0)  # the guest is well into its boot; the daemon quiet
            WATCH.sample()
            wall0 = time.time()
            t0 = time.perf_counter()
            virsh("destroy", domain)
            t_ret = time.perf_counter()
            polls = 0

            def running() -> bool:
                nonlocal polls
                polls += 1
                return domstate(domain) == "running"

            seen = poll_until(running, DOMSTATE_POLL_S, 120.0)
            d.wait_quiet(1.0)
            drift = d.events(since=wall0 - 0.001, reasons=("Drift",))
            healed = d.events(since=wall0 - 0.001, reasons=("DriftHealed",))
            lines = d.log_lines(since=wall0 - 0.001)
            first_event = next((e for e in lines if e.get("event") == "host event"
                                and e.get("subject") in (domain, tap)), None)
            libvirt_event = next((e for e in lines if e.get("event") == "host event"
                                  and e.get("driver") == "libvirt" and e.get("subject") == domain), None)
            planned = [e for e in lines if e.get("event") == "planned"]
            heals.append({
                "destroy_s": t_ret - t0,
                "after_return": None if seen is None else seen - t_ret,
                "after_start": None if seen is None else seen - t0,
                "poll_s": (seen - t_ret) / polls if seen is not None and polls else None,
                "first_event": None if first_event is None else (first_event["t"] - wall0, first_event.get("subject"),
                                                                 first_event.get("what")),
                "libvirt_event": None if libvirt_event is None else (libvirt_event["t"] - wall0,
                                                                     libvirt_event.get("what")),
                "drift_event": drift[0]["t"] - wall0 if drift else None,
                "healed_event": healed[0]["t"] - wall0 if healed else None,
                "observe_s": [p.get("observe_s") for p in planned],
                "passes": len(planned),
                "message": drift[0]["message"] if drift else None,
            })
            h = heals[-1]
            log(f"  virsh destroy {i + 1}: took {fmt_s(h['destroy_s'])}; running again {fmt_s(h['after_return'])} after "
                f"it returned ({fmt_s(h['after_start'])} after it started; {h['passes']} passes, observe "
                f"{h['observe_s']})")
            if seen is None:
                raise RuntimeError(f"{domain} not running again within 120 s\n{d.text_log()[-3000:]}")
        out["heals"] = heals
        out["stats"] = event_stats(d, t_start, time.time(), own)
    finally:
        out["stop"] = d.stop()
        out["cleanup"] = destroy_env(env, env.manifests)
    return out


def idle_windows(d: DaemonProc, windows: int, window_s: float, settle_s: float, resync_s: float,
                 own: set[str]) -> dict[str, Any]:
    """After `settle_s`, `windows` consecutive windows of CPU and memory of the daemon."""
    time.sleep(settle_s)
    resync_at = d.started_wall + resync_s
    out: dict[str, Any] = {"windows": [], "resync_at": resync_at}
    rss_start = d.rss_mib()
    out["rss_after_settle"] = rss_start
    for w in range(windows):
        if time.time() + window_s > resync_at - 2:
            log(f"  window {w + 1}: would reach the daemon's resync; stopping at {w} windows")
            break
        d.check_alive()
        WATCH.sample()
        m0 = d.metrics()
        wall0, t0, c0 = time.time(), time.perf_counter(), d.cpu_ticks()
        rss = []
        while time.perf_counter() - t0 < window_s:
            rss.append(d.rss_mib())
            time.sleep(min(1.0, max(0.0, window_s - (time.perf_counter() - t0))))
        c1, t1, wall1 = d.cpu_ticks(), time.perf_counter(), time.time()
        m1 = d.metrics()
        st = d.status()
        stats = event_stats(d, wall0, wall1, own)

        def delta(prefix: str) -> float:
            return sum(v for k, v in m1.items() if k.startswith(prefix)) - sum(
                v for k, v in m0.items() if k.startswith(prefix))

        row = {
            "cpu_pct": (c1 - c0) / CLK_TCK / (t1 - t0) * 100,
            "cpu_s": (c1 - c0) / CLK_TCK,
            "seconds": t1 - t0,
            "rss_end": rss[-1] if rss else d.rss_mib(),
            "rss_max": max(rss) if rss else d.rss_mib(),
            "hwm": int(st["VmHWM"].split()[0]) / 1024,
            "threads": int(st["Threads"]),
            "passes_metric": delta("reconciler_reconcile_duration_seconds_count"),
            "host_events_metric": delta("reconciler_host_events_total"),
            **stats,
        }
        out["windows"].append(row)
        log(f"  window {w + 1}: CPU {row['cpu_pct']:.2f} % of a core, RSS {row['rss_end']:.0f} MiB, "
            f"{row['passes']} passes, {row['host_events']} host events ({row['foreign_events']} foreign)")
    out["resync_in_windows"] = sum(r["resyncs"] for r in out["windows"])
    return out


def scenario_idle_memory(repeat: int, window_s: float, size: int) -> dict[str, Any]:
    """3a: ~size resources on the in-memory drivers."""
    from benchmarks.plan import write_cloud

    env = Env.create("memory")
    env.record(manifests=str(env.manifests))
    count, files = write_cloud(env.manifests, size)
    out: dict[str, Any] = {"resources": count, "files": files}
    d = DaemonProc(env, "idle-memory", "--source", str(env.manifests))
    try:
        conv = d.wait_converged(count, 300, quiet_s=2.0)
        if not conv["ok"]:
            raise RuntimeError(f"idle-memory: not converged: "
                               f"{sum(1 for s, _ in conv['states'].values() if s == 'ready')} of {count} ready\n"
                               f"{d.text_log()[-3000:]}")
        out["first_apply"] = conv["at"] - d.started_wall
        out["apply_log_s"] = next((e.get("duration_s") for e in d.log_lines() if e.get("event") == "applied"), None)
        out["command"] = d.command
        out.update(idle_windows(d, repeat, window_s, 5.0, conv["info"].get("resyncSeconds") or 600.0, set()))
    finally:
        out["stop"] = d.stop()
    try:
        # for comparison: `reconciler apply` of the same cloud into a state dir of its own
        other = env.root / "apply-state"
        config = env.root / "host-apply.yaml"
        config.write_text(json.dumps({"stateDir": str(other), "drivers": "memory"}) + "\n")
        whole, result = _section.timed_cli(config, "apply", str(env.manifests), "--yes", log_level="info")
        applied = [json.loads(line) for line in result.stderr.splitlines()
                   if line.startswith("{") and '"event": "applied"' in line]
        out["cli_apply"] = {"whole_s": whole, "exit": result.returncode,
                            "apply_log_s": applied[-1].get("duration_s") if applied else None}
        shutil.rmtree(other, ignore_errors=True)
    finally:
        t0 = time.perf_counter()
        out["cleanup"] = destroy_env(env, env.manifests)
        out["cleanup"]["wall_s"] = time.perf_counter() - t0
    return out


def example_cloud(env: Env) -> tuple[list[Key], list[str], dict[str, Any]]:
    """manifests/ copied into the environment: tenants renamed `<env>-<tenant>`, addresses
    moved (EXAMPLE_REMAP), every Volume and Bucket `deletionPolicy: Delete` (so the destroy
    removes them). (keys, swift accounts, what was changed)."""
    source = REPO / "manifests"
    keys: list[Key] = []
    accounts: set[str] = set()
    tenants: set[str] = set()
    changed = {"retain_to_delete": [], "files": 0}
    for path in sorted(source.rglob("*.yaml")):
        text = path.read_text()
        for old, new in EXAMPLE_REMAP.items():
            text = re.sub(r"(?<![\d.])" + re.escape(old), new, text)
        docs = [d for d in yaml.safe_load_all(text) if d]
        for d in docs:
            meta = d["metadata"]
            if d["kind"] == "Tenant":
                tenants.add(meta["name"])
                meta["name"] = f"{env.id}-{meta['name']}"
            else:
                tenants.add(meta["tenant"])
                meta["tenant"] = f"{env.id}-{meta['tenant']}"
            spec = d.setdefault("spec", {})
            if d["kind"] == "Router" and "/" in str(spec.get("external", "")):
                t, n = spec["external"].split("/", 1)
                spec["external"] = f"{env.id}-{t}/{n}"
            for nic in spec.get("networks", []) if d["kind"] == "Instance" else []:
                if isinstance(nic, dict) and "/" in str(nic.get("network", "")):
                    t, n = nic["network"].split("/", 1)
                    nic["network"] = f"{env.id}-{t}/{n}"
            if d["kind"] in ("Volume", "Bucket"):
                if spec.get("deletionPolicy", "Retain") != "Delete":
                    changed["retain_to_delete"].append(f"{d['kind']}/{meta['tenant'][len(env.id) + 1:]}/{meta['name']}")
                spec["deletionPolicy"] = "Delete"
                if d["kind"] == "Bucket":
                    spec["purgeOnDelete"] = True
                    accounts.add("AUTH_" + meta["tenant"])
            tenant = meta["name"] if d["kind"] == "Tenant" else meta["tenant"]
            keys.append(Key(d["kind"], tenant, meta["name"]))
        dump_docs(env.manifests / path.relative_to(source), docs)
        changed["files"] += 1
    changed["tenants"] = sorted(tenants)
    return keys, sorted(accounts), changed


def scenario_idle_example(repeat: int, window_s: float) -> dict[str, Any]:
    """3b: the example cloud on the real drivers."""
    drivers = {"Tenant": "memory", "Volume": "storage", "Bucket": "objectstore", "Network": "netlink",
               "Router": "netlink", "SecurityGroup": "netlink", "Image": "libvirt", "Instance": "libvirt"}
    env = Env.create(drivers, **LIBVIRT_EXTRA, netlink={"uplinks": {}, "vxlanPeers": []},
                     volumeBackends={"local": {"driver": "file", "path": "", "default": True}},
                     objectStores={"local": {"driver": "swift", "authUrl": PROXY + "/auth/v1.0",
                                             "user": "admin:admin", "key": "admin", "default": True}})
    volumes = env.root / "volumes"
    make_dir(volumes)
    config = json.loads(env.host_config.read_text())
    config["volumeBackends"]["local"]["path"] = str(volumes)
    env.host_config.write_text(json.dumps(config, indent=2) + "\n")
    keys, accounts, changed = example_cloud(env)
    nets = [k for k in keys if k.kind == "Network"]
    routers = [k for k in keys if k.kind == "Router"]
    links = [host_name(k) for k in nets] + ["rv-" + host_name(k)[3:] for k in nets]
    namespaces = ["rc-dhcp-" + host_name(k)[3:] for k in nets] + [host_name(k) for k in routers]
    env.record(manifests=str(env.manifests), accounts=accounts, links=links, namespaces=namespaces)
    for account in accounts:
        if swift_containers(account):
            raise RuntimeError(f"Swift account {account} already holds containers")
    out: dict[str, Any] = {"resources": len(keys), "changed": changed,
                           "kinds": dict(sorted(_count_kinds(keys).items()))}
    d = DaemonProc(env, "idle-example", "--source", str(env.manifests))
    try:
        conv = d.wait_converged(len(keys), 300, quiet_s=2.0)
        out["converged"] = conv["ok"]
        out["first_apply"] = conv["at"] - d.started_wall
        out["apply_log_s"] = next((e.get("duration_s") for e in d.log_lines() if e.get("event") == "applied"), None)
        out["not_ready"] = {k: v for k, v in conv["states"].items() if v[0] != "ready"}
        if not conv["ok"]:
            log(f"  the example cloud did not fully converge: {out['not_ready']}")
        running = [k for k in keys if k.kind == "Instance" and domstate(host_name(k)) == "running"]
        out["running_instances"] = len(running)
        out["instances"] = sum(1 for k in keys if k.kind == "Instance")
        taps = []
        for k in keys:
            if k.kind == "Instance":
                for other in nets:
                    if other.tenant == k.tenant:
                        taps.append(tap_name(k.tenant, k.name, other.name))
        own = own_subjects(env, keys, taps)
        out["command"] = d.command
        out["signal_masks"] = signal_masks(d, env)
        out["host"] = {
            "bridges": sum(1 for k in nets if os.path.exists(f"/sys/class/net/{host_name(k)}")),
            "dnsmasq": sum(1 for c in processes_mentioning(str(env.state_dir)).values() if "dnsmasq" in c),
            "containers": sum(len(swift_containers(a)) for a in accounts),
            "volume_files": sum(1 for p in volumes.rglob("*") if p.is_file()),
        }
        out.update(idle_windows(d, repeat, window_s, 5.0, conv["info"].get("resyncSeconds") or 600.0, own))
    finally:
        out["stop"] = d.stop()
        t0 = time.perf_counter()
        out["cleanup"] = destroy_env(env, env.manifests)
        out["cleanup"]["wall_s"] = time.perf_counter() - t0
    return out


def _count_kinds(keys: Iterable[Key]) -> dict[str, int]:
    out: dict[str, int] = {}
    for k in keys:
        out[k.kind] = out.get(k.kind, 0) + 1
    return out


# --- report ---------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    from benchmarks.instances import machine as instances_machine
    from benchmarks.networks import machine as networks_machine

    info = instances_machine()
    info["network tools"] = networks_machine()["network tools"]
    info["git"] = run("git", "--version", check=False).stdout.strip()
    head = run("git", "-C", str(REPO), "rev-parse", "--short", "HEAD", check=False).stdout.strip()
    dirty = run("git", "-C", str(REPO), "status", "--porcelain", "--", "src", check=False).stdout.strip()
    if head:
        info["reconciler"] = f"commit {head}" + (" with uncommitted changes in src/" if dirty else "")
    swift = run("dpkg-query", "-W", "-f=${Version}", "swift", check=False).stdout.strip()
    info["object store"] = f"OpenStack Swift {swift or '?'} all-in-one on 127.0.0.1:8080 (scripts/setup-swift.sh)"
    try:
        import importlib.metadata as md

        info["daemon libraries"] = (f"watchdog {md.version('watchdog')}, prometheus-client "
                                    f"{md.version('prometheus-client')}, pyroute2 {md.version('pyroute2')}")
    except Exception:  # pragma: no cover - reported as unknown
        pass
    return info


def _stats(values: Sequence[float | None]) -> tuple[float, float, float] | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return statistics.median(vals), min(vals), max(vals)


def _row(label: str, values: Sequence[float | None], how: str) -> str:
    st = _stats(values)
    if st is None:
        return f"| {label} | – | – | – | {how} |"
    n = sum(1 for v in values if v is not None)
    return f"| {label} | {fmt_s(st[0])} | {fmt_s(st[1])} | {fmt_s(st[2])} | {how}{'' if n == len(values) else f' ({n} of {len(values)} seen)'} |"


def _pct_row(label: str, values: Sequence[float], fmt: str, how: str, unit: str = "") -> str:
    return (f"| {label} | {format(statistics.median(values), fmt)}{unit} | {format(min(values), fmt)}{unit} | "
            f"{format(max(values), fmt)}{unit} | {how} |")


def report(results: Mapping[str, Any], args: argparse.Namespace, command: str, elapsed: float) -> str:
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        BEGIN,
        "## The daemon: commit to converged, drift to healed, idle cost",
        "",
        "Generated by `benchmarks/daemon.py`; a measurement, never a test. It rewrites only the part of "
        "this file between its markers.",
        "",
        "### How to reproduce",
        "",
        "From the project root, as root, with the host services running (`make services`: libvirtd, the "
        "network tools, the Swift all-in-one, the test guest):",
        "",
        *_section.reproduce(command, now, machine()),
        "",
        "### What is measured",
        "",
        "Each scenario has its own environment `rcbd<hex>` under `/var/lib/reconciler/bench` (host config, "
        "fresh state dir and so its own installation id, manifests, tenants named after it, its own "
        "`10.247.X.0/24` subnets) and one daemon started by the benchmark as a child process "
        "(`reconciler --log-level info daemon ... --metrics-address 127.0.0.1:0`; stopped with SIGTERM and "
        "reaped). Every time below is taken by the benchmark watching the host with independent tools "
        "(sysfs, `virsh`, `/proc`), from a `time.perf_counter()` taken right after the triggering action "
        "returned; the daemon's journal and log (timestamps of the same host clock) only split that time "
        "up. Afterwards `reconciler destroy` with the same manifests and host config, and a check that "
        "nothing of the environment is left (domains, links, namespaces, nftables table, processes, "
        "Swift containers); then its folder is removed.",
        "",
        "- **folder edit → MTU on the host**: Tenant + one vxlan Network (DHCP off) on the netlink "
        "driver; daemon with `--source DIR`. The Network's `mtu` is changed by writing a temp file "
        "(hidden name) and `os.replace`-ing the manifest; timed from the rename until "
        "`/sys/class/net/<bridge>/mtu` (read every 10 ms) shows the new value.",
        "- **git commit → MTU on the host**: the same cloud in a local non-bare repository; daemon with "
        "`--git REPO --branch main --interval 30s`; the manifest edited and `git add`-ed, timed from "
        "`git commit` returning until the MTU is on the bridge.",
        "- **`virsh destroy` → running again**: Tenant, Image (the tiny guest), a vxlan Network with "
        "DHCP and one Instance (128 MiB, 1 GiB root disk, one NIC; domain type `qemu`) on the libvirt "
        "and netlink drivers; the running domain destroyed with `virsh destroy`, timed from `virsh "
        "destroy` returning until `virsh domstate` (run every 20 ms; one run takes ~50 ms here, so the "
        "resolution is ~70 ms) says `running`. Between repeats the daemon is quiet and the guest 3 s "
        "into its boot.",
        "- **`ip link del` of a bridge → back**: on the folder scenario's daemon, the Network's bridge "
        "deleted with `ip link del`; timed from its return until the bridge exists with IFF_UP "
        "(sysfs, every 10 ms), and until it is whole again (its MTU, its VXLAN port enslaved, "
        "`nf_call_iptables` on).",
        f"- **idle CPU and memory**: after convergence (revision applied, every resource `ready` in the "
        f"journal, no pass for 2 s) and 5 s more, {args.windows} consecutive windows of {args.window:g} s "
        "of the daemon process: CPU = Δ(utime+stime) of `/proc/PID/stat` (all its threads; not its "
        "children, e.g. dnsmasq, which the netlink driver starts detached) over the wall time, in % of "
        "one core; memory = VmRSS of `/proc/PID/status` (at the window's end; its peak VmHWM since "
        "start also given). Passes and host events in a window are read from the daemon's metrics "
        "(`reconciler_reconcile_duration_seconds_count`, `reconciler_host_events_total`) and log. The daemon's "
        "full resync (every 10 min from its start) falls outside the windows (checked: no `resync` in "
        "its log during them). (a) ~1,000 resources of `benchmarks/plan.py`'s generator on the "
        "in-memory drivers (`drivers: memory`); (b) the example cloud `manifests/` on the real drivers "
        "(hostconfig/host-libvirt-netlink.yaml as the model, Tenant in memory; see below what was "
        "changed in the copy).",
        "",
        f"Medians of {args.repeat} runs ({args.windows} windows for the idle figures), with the fastest "
        "and slowest. The whole benchmark took "
        f"{elapsed / 60:.1f} min.",
        "",
        "### Results",
        "",
        "| what | median | min | max | how |",
        "|---|---:|---:|---:|---|",
    ]
    notes: list[str] = []
    f = results.get("folder")
    if f:
        e = f["edits"]
        lines += [
            _row("folder edit → new MTU on the bridge", [x["latency"] for x in e], "sysfs, 10 ms polls"),
            _row("… of which until the daemon read the new revision", [x["noticed"] for x in e],
                 "its log `new revision` − rename"),
            _row("… until the driver's change was done", [x["changed"] for x in e], "its log `change` − rename"),
        ]
    g = results.get("git")
    if g:
        e = g["edits"]
        lines += [
            _row("git commit → new MTU on the bridge", [x["latency"] for x in e], "sysfs, 10 ms polls"),
            _row("… of which until the daemon read the new revision", [x["noticed"] for x in e],
                 "its log `new revision` − commit returned"),
            _row("(`git commit` itself)", [x.get("commit_s") for x in e], "wall time of the command"),
        ]
    i = results.get("instance")
    if i:
        h = i["heals"]
        lines += [
            _row("`virsh destroy` returned → domain running again", [x["after_return"] for x in h],
                 "`virsh domstate` every 20 ms"),
            _row("`virsh destroy` started → domain running again", [x["after_start"] for x in h], "same"),
            _row("(`virsh destroy` itself)", [x["destroy_s"] for x in h], "wall time of the command"),
            _row("… `Drift` event in the journal, from the destroy's start", [x["drift_event"] for x in h],
                 "journal `events`"),
        ]
    if f:
        h = f["bridge_heals"]
        lines += [
            _row("`ip link del` bridge → bridge back and up", [x["up"] for x in h], "sysfs, 10 ms polls"),
            _row("`ip link del` bridge → bridge whole (MTU, VXLAN port, nf_call_iptables)", [x["whole"] for x in h],
                 "sysfs, 10 ms polls"),
            _row("… `Drift` event in the journal, from the deletion", [x["drift_event"] for x in h],
                 "journal `events`"),
        ]
    for key, label in (("idle-memory", "in-memory"), ("idle-example", "example cloud, real drivers")):
        r = results.get(key)
        if not r or not r.get("windows"):
            continue
        n = r["resources"]
        quiet = [x for x in r["windows"] if not x["host_events"] and not x["passes"]]
        busy = [x for x in r["windows"] if x["host_events"] or x["passes"]]
        w = quiet or busy
        which = (f"{len(quiet)} of {len(r['windows'])} windows: those without host events or passes"
                 if busy and quiet else f"{len(w)} windows")
        lines += [
            _pct_row(f"idle CPU, {n:,} resources, {label}", [x["cpu_pct"] for x in w], ".2f",
                     f"% of one core over {args.window:g} s (utime+stime); {which}", unit=" %"),
            _pct_row(f"idle RSS, {n:,} resources, {label}", [x["rss_end"] for x in w], ".0f",
                     f"VmRSS at the window's end; {which}", unit=" MiB"),
        ]
        if busy and quiet:
            lines.append(_pct_row(
                f"… CPU in windows with other installations' host events ({label})",
                [x["cpu_pct"] for x in busy], ".2f",
                f"{len(busy)} windows; host events {[int(x['host_events']) for x in busy]}, "
                f"passes {[int(x['passes']) for x in busy]}", unit=" %"))
    lines += [""]
    # notes
    if f:
        e = f["edits"]
        notes.append(
            f"- Folder source: the daemon read the new revision {fmt_s(_stats([x['noticed'] for x in e])[0])} after the "
            "rename (median), nearly all of it the folder watcher's 0.25 s debounce; loading, observing, "
            "planning and the driver's MTU change took the rest. "
            f"Passes per edit (until quiet): {[x['passes'] for x in e]}: the one that applies it, then no-op "
            "ones set off by the host events of the daemon's own change (the watchers cannot tell them from "
            f"someone else's): {sorted({h for x in e for h in x.get('host_events', [])})}.")
    if g:
        e = g["edits"]
        med = _stats([x["latency"] for x in e])[0]
        notes.append(
            f"- Git source with `--interval 30s`: a commit reached the host in {fmt_s(med)} (median), far under the "
            "interval: the source watches a local repository's refs (inotify, 0.2 s debounce) and fetches at "
            f"once. Passes per commit: {[x['passes'] for x in e]}. First apply after start: "
            f"{fmt_s(g.get('first_apply'))}.")
    if i:
        h = i["heals"]
        obs = [o for x in h for o in x["observe_s"] if o is not None]
        first = [x["first_event"] for x in h if x["first_event"]]
        notes.append(
            f"- `virsh destroy` takes {fmt_s(_stats([x['destroy_s'] for x in h])[0])} here (libvirt waits for PID 1 to reap "
            "QEMU). Host events are logged when the loop takes them, between passes: the first one logged, "
            + (f"{sorted({str(x[2]) for x in first})}, {fmt_s(statistics.median(x[0] for x in first))} after the "
               "destroy started. " if first else "none. ")
            + "A pass that starts while the destroy still runs (set off by the guest's port leaving its bridge) "
            "waits for libvirt in its observe (observe times in the passes: "
            f"{', '.join(fmt_s(o) for o in obs[:12])}), so the heal effectively starts when the "
            f"destroy is done. Passes per heal: {[x['passes'] for x in h]}. Drift messages: "
            f"{sorted({x['message'] for x in h if x['message']})}.")
    if f:
        h = f["bridge_heals"]
        notes.append(
            f"- Bridge deletion: the netlink watcher saw it and the daemon recreated the bridge in "
            f"{fmt_s(_stats([x['up'] for x in h])[0])} (median); passes per heal: {[x['passes'] for x in h]} (the heal, "
            "then no-op passes set off by the host events of its own change; host events seen: "
            f"{sorted({v for x in h for v in x.get('host_events', [])})}). "
            f"Drift messages: {sorted({x['message'] for x in h if x['message']})}.")
    for key, label in (("idle-memory", "(a) in-memory"), ("idle-example", "(b) example cloud")):
        r = results.get(key)
        if not r:
            continue
        w = r.get("windows", [])
        text = (f"- Idle {label}: {r['resources']} resources, first apply (daemon start → converged) "
                f"{fmt_s(r.get('first_apply'))}; RSS after settling {r.get('rss_after_settle', 0):.0f} MiB"
                + (f", peak (VmHWM) {max(x['hwm'] for x in w):.0f} MiB, {w[-1]['threads']} threads" if w else "")
                + f"; passes per window {[int(x['passes_metric']) for x in w]} (log: {[x['passes'] for x in w]}), host events per window "
                f"{[int(x['host_events_metric']) for x in w]}"
                + (f" (of which about other installations' objects: {[x['foreign_events'] for x in w]})"
                   if key == "idle-example" else "")
                + f"; resync in a window: {'yes' if r.get('resync_in_windows') else 'no'}"
                + f"; errors in the log during the windows: {sum(len(x['errors']) for x in w)}.")
        if key == "idle-memory":
            cli = r.get("cli_apply") or {}
            text += (f" {r.get('files')} files. The daemon's first apply (1,000 creates, its log's `applied`) took "
                     f"{fmt_s(r.get('apply_log_s'))}; `reconciler apply` of the same manifests on the same drivers "
                     f"(own state dir) {fmt_s(cli.get('apply_log_s'))} (whole process {fmt_s(cli.get('whole_s'))}). "
                     f"Destroy {fmt_s(r['cleanup']['destroy_s'])}.")
        if key == "idle-example":
            ch = r["changed"]
            text += (f" Kinds: {r['kinds']}. The copy of `manifests/` ({ch['files']} files) was changed so: tenants "
                     f"{ch['tenants']} renamed `rcbd<hex>-<tenant>`; addresses 10.10/10.20/10.250 moved to "
                     "10.246/10.245/10.244 (so nothing else on the host is touched); "
                     f"{', '.join(ch['retain_to_delete']) or 'no resource'} set to `deletionPolicy: Delete` "
                     "(buckets also `purgeOnDelete: true`) so that the destroy removes them. Host config as "
                     "hostconfig/host-libvirt-netlink.yaml, but its own state dir, volumes in the environment's "
                     "folder, `domainType: qemu` (no KVM probe). On the host after convergence: "
                     f"{r['host']['bridges']} bridges, {r['host']['dnsmasq']} dnsmasq, {r['running_instances']} of "
                     f"{r['instances']} domains running, {r['host']['containers']} Swift containers, "
                     f"{r['host']['volume_files']} files in the volume folder"
                     + ("" if r.get("converged") else f"; NOT fully converged: {r['not_ready']}")
                     + f". The daemon's first apply took {fmt_s(r.get('apply_log_s'))} (its log's `applied`)"
                     + f". Destroy {fmt_s(r['cleanup']['destroy_s'])}.")
        notes.append(text)
    odd = results.get("odd", [])
    notes += [f"- {o}" for o in odd]
    cleanup = [(k, v["cleanup"]) for k, v in results.items() if isinstance(v, dict) and "cleanup" in v]
    left = [(k, c["left_after_destroy"]) for k, c in cleanup if c["left_after_destroy"]]
    notes.append("- Cleanup: after each scenario's `reconciler destroy` "
                 + ("nothing of its environment was left on the host" if not left else
                    "these were left and removed by hand: " + "; ".join(f"{k}: {v}" for k, v in left))
                 + f" ({len(cleanup)} scenario{'s' if len(cleanup) != 1 else ''}); every environment folder was removed.")
    stops = [v["stop"] for v in results.values() if isinstance(v, dict) and "stop" in v]
    logged = [x.get("stopped_logged_s") for x in stops if x.get("stopped_logged_s") is not None]
    if stops:
        text = ("- Stopping: from SIGTERM until the process exited (reaped by `Popen.wait`): "
                + ", ".join(fmt_s(x.get("stop_s")) for x in stops) + " (scenarios in order)")
        if logged:
            after = [x["stop_s"] - x["stopped_logged_s"] for x in stops if x.get("stopped_logged_s") is not None]
            text += (f"; the loop had finished its shutdown (log `Stopped`, after closing the sources and watchers) "
                     f"{', '.join(fmt_s(v) for v in logged)} after the signal, and the process exited "
                     f"{fmt_s(statistics.median(after))} after that (median; up to 0.5 s of it is the metrics "
                     "server's `shutdown()` waiting for `serve_forever`'s poll interval)")
            slow = [v for v in logged if v > 1.0]
            if slow:
                text += (". A shutdown over 1 s: closing the netlink driver's `nft -j monitor` child, which ignores "
                         "`terminate()` (see the signal mask below), waits its 5 s timeout before SIGKILL")
        notes.append(text + ".")
    masks = {k: v.get("signal_masks") for k, v in results.items() if isinstance(v, dict) and v.get("signal_masks")}
    blocked = {k: [m for m in ms if m["blocked"]] for k, ms in masks.items()}
    if any(blocked.values()):
        seen = sorted({f"{m['what']} ({', '.join(m['blocked'])})" for ms in blocked.values() for m in ms})
        notes.append(
            "- Signal mask of the daemon's children (`SigBlk` in /proc/PID/status): " + "; ".join(seen)
            + " blocked. The daemon blocks SIGTERM, SIGINT, SIGHUP and SIGUSR1 in all its threads for its "
            "`sigwait`, and the processes it starts inherit that mask across exec"
            + (": a dnsmasq it started ignores the SIGHUP that should make it re-read its hosts file (DHCP "
               "reservations) and the SIGTERM that should stop it (stopping it waits for a SIGKILL)"
               if any(m["what"] == "dnsmasq" for ms in blocked.values() for m in ms) else "")
            + ("; `nft -j monitor` ignores `terminate()`"
               if any(m["what"].startswith("nft") for ms in blocked.values() for m in ms) else "")
            + ". (Checked once by hand: a dnsmasq started by `reconciler apply` has an empty mask, and its network is destroyed in 0.2 s instead of 5.2 s.)")
    elif masks:
        seen = sorted({m["what"] for ms in masks.values() for m in ms})
        notes.append(f"- Signal mask of the daemon's children and dnsmasq processes ({', '.join(seen)}; `SigBlk` "
                     "in /proc/PID/status): none of SIGHUP, SIGINT, SIGUSR1, SIGTERM blocked, so they can be "
                     "stopped and reloaded by signal.")
    notes.append("- Interference: " + (f"other work ran on this host meanwhile ({', '.join(sorted(WATCH.others))}); "
                                       "the min columns are the least disturbed runs. " if WATCH.others else
                                       "no other test run or reconciler command was seen. ")
                 + (f"1-minute load average seen: {min(WATCH.load):.1f} to {max(WATCH.load):.1f}. " if WATCH.load else "")
                 + ("Before each scenario the benchmark waits (up to `--quiet-wait`, "
                    f"{args.quiet_wait:g} s) for other test runs and reconciler commands to finish"
                    + (": it waited " + ", ".join(f"{k} {fmt_s(v)}" for k, v in results.get("waited", {}).items() if v >= 1)
                       if any(v >= 1 for v in results.get("waited", {}).values()) else "; it never had to")
                    + ". Host events about other installations' objects (their tests, their daemons) still set "
                    "off this daemon's watchers; windows and heals they touched are shown as such."))
    lines += ["### Notes", "", *notes, "", END]
    return "\n".join(lines) + "\n"


def odd_findings(results: Mapping[str, Any]) -> list[str]:
    """Things in the daemons' behaviour worth a look, from the stats gathered."""
    out = []
    for key in ("folder", "git", "instance"):
        r = results.get(key)
        if not r:
            continue
        st = r.get("stats", {})
        if st.get("errors"):
            out.append(f"{key}: {len(st['errors'])} error lines in the daemon's log: "
                       + "; ".join(str(e.get("message") or e.get("event"))[:160] for e in st["errors"][:3]))
        if st.get("foreign_events"):
            out.append(f"{key}: the daemon received {st['foreign_events']} host events about objects of other "
                       f"installations ({', '.join(st['foreign_subjects'][:6])}{'…' if len(st['foreign_subjects']) > 6 else ''}); "
                       "each one that names no resource of its own queues every resource of that driver for a pass.")
    return out


def preflight(only: set[str]) -> None:
    reasons = []
    if os.geteuid() != 0:
        reasons.append("needs root (bridges, libvirt system domains)")
    reasons += [f"{t} missing: run make services" for t in TOOLS if shutil.which(t) is None]
    if shutil.which("virsh") and virsh("version", check=False).returncode != 0:
        reasons.append(f"libvirtd does not answer at {URI}: run scripts/setup-libvirt.sh")
    if not IMAGE.exists():
        reasons.append(f"{IMAGE} missing: run scripts/build-test-image.sh")
    if "idle-example" in only and not swift_answers():
        reasons.append(f"the Swift all-in-one does not answer on {PROXY}: run scripts/setup-swift.sh")
    if not RECONCILER.exists():
        reasons.append(f"{RECONCILER} missing: make setup")
    used = used_prefixes()
    busy = [p for p in EXAMPLE_REMAP.values() if p in used]
    if "idle-example" in only and busy:
        reasons.append(f"addresses in {busy} are in use on this host; the example cloud is moved there")
    if reasons:
        raise SystemExit("cannot run: " + "; ".join(reasons))


SCENARIOS = ("folder", "git", "instance", "idle-memory", "idle-example")


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.daemon", description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="Runs of each measurement (default: 5).")
    parser.add_argument("--window", type=float, default=60.0, help="Seconds of each idle window (default: 60).")
    parser.add_argument("--windows", type=int, default=3,
                        help="Consecutive idle windows per idle scenario (default: 3; all must end before "
                             "the daemon's first resync, 10 min after its start).")
    parser.add_argument("--size", type=int, default=1000, help="Resources of the in-memory idle cloud (default: 1000).")
    parser.add_argument("--quiet-wait", type=float, default=120.0,
                        help="Seconds to wait before each scenario for other test runs and reconciler "
                             "commands to finish (default: 120; it runs anyway after that).")
    parser.add_argument("--only", nargs="+", choices=SCENARIOS, default=list(SCENARIOS),
                        help="Run only these scenarios (the section then holds only them).")
    parser.add_argument("--write", type=Path, default=None,
                        help="Write the Markdown section into this file (between its markers).")
    parser.add_argument("--json", type=Path, default=None, help="Also dump the raw results as JSON here.")
    parser.add_argument("--keep-logs", type=Path, default=None,
                        help="Copy each daemon's log into this folder before its environment is removed.")
    args = parser.parse_args(argv)
    global KEEP_LOGS
    KEEP_LOGS = args.keep_logs
    if args.repeat < 1 or args.windows < 1 or args.window <= 0:
        parser.error("--repeat and --windows must be at least 1, --window positive")
    if 30 + args.windows * args.window > 560:
        parser.error("--windows x --window must end before the daemon's resync (10 min after its start)")
    only = set(args.only)
    preflight(only)
    signal.signal(signal.SIGTERM, _sigterm)
    started = time.perf_counter()
    results: dict[str, Any] = {}
    waited: dict[str, float] = {}
    results["waited"] = waited
    try:
        problems = sweep_all()
        if problems:
            raise SystemExit("leftovers of an earlier run could not be removed: " + "; ".join(problems))
        WATCH.sample()
        if "folder" in only:
            waited["folder"] = wait_for_quiet(args.quiet_wait)
            log(f"folder source: {args.repeat} MTU edits, then {args.repeat} bridge deletions...")
            results["folder"] = scenario_folder(args.repeat)
        if "git" in only:
            waited["git"] = wait_for_quiet(args.quiet_wait)
            log(f"git source: {args.repeat} commits...")
            results["git"] = scenario_git(args.repeat)
        if "instance" in only:
            waited["instance"] = wait_for_quiet(args.quiet_wait)
            log(f"instance: {args.repeat} x virsh destroy...")
            results["instance"] = scenario_instance(args.repeat)
        if "idle-memory" in only:
            waited["idle-memory"] = wait_for_quiet(args.quiet_wait)
            log(f"idle, ~{args.size} resources in memory: {args.windows} windows of {args.window:g} s...")
            results["idle-memory"] = scenario_idle_memory(args.windows, args.window, args.size)
        if "idle-example" in only:
            waited["idle-example"] = wait_for_quiet(args.quiet_wait)
            log(f"idle, the example cloud on the real drivers: {args.windows} windows of {args.window:g} s...")
            results["idle-example"] = scenario_idle_example(args.windows, args.window)
        results["odd"] = odd_findings(results)
    finally:
        problems = sweep_all()
        if problems:
            log("cleanup problems: " + "; ".join(problems))
        try:
            if BENCH_ROOT.exists() and not any(BENCH_ROOT.iterdir()):
                BENCH_ROOT.rmdir()
        except OSError:
            pass
    elapsed = time.perf_counter() - started
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    command = ".venv/bin/python -m benchmarks.daemon"
    if args.repeat != 5:
        command += f" --repeat {args.repeat}"
    if args.window != 60:
        command += f" --window {args.window:g}"
    if args.windows != 3:
        command += f" --windows {args.windows}"
    if args.quiet_wait != 120:
        command += f" --quiet-wait {args.quiet_wait:g}"
    if args.size != 1000:
        command += f" --size {args.size}"
    if only != set(SCENARIOS):
        command += " --only " + " ".join(s for s in SCENARIOS if s in only)
    if args.write:
        command += f" --write {args.write}"
    section = report(results, args, command, elapsed)
    if args.write:
        _section.write_section(args.write, section, BEGIN, END)
        log(f"wrote the daemon section of {args.write} ({elapsed / 60:.1f} min)")
    else:
        sys.stdout.write(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
