"""Instances on the real libvirt driver: create, boot, plan and destroy; writes a section of
docs/benchmarks.md.

    python -m benchmarks.instances --repeat 3 --write docs/benchmarks.md

A command, never a test. Needs root, a running libvirtd (scripts/setup-libvirt.sh) and the
test guest (scripts/build-test-image.sh). Image and Instance go through the libvirt driver,
the other kinds through the in-memory drivers (the network driver is a later issue), so
this command creates the Linux bridges itself, named as the network driver will name
them, with the subnet's first address on the host side.

Each repeat runs three scenarios, each from a clean host state (a new `rcbench<hex>`
tenant, state dir and bridges; afterwards `virsh list --all` must hold nothing of it):

- `started-1`, `started-8`: 10 instances (128 MiB, the tiny image, 5 on each of two
  bridges, fixed IPs) created and started by `reconciler apply --parallelism N`: the wall
  time of the command; the time, from the same start, until every guest answers HTTP on
  http://IP/ (polled from the host); then `reconciler destroy --parallelism N` of the
  running guests (graceful shutdown, then undefine).
- `defined`: 100 instances with `powerState: stopped` defined by one apply; then a no-op
  `reconciler plan` (whole process; observe and plan parts from its `planned` log line);
  then their destroy.

Figures are medians of the repeats, with min and max. With `--write FILE` only the part
of FILE between `<!-- instances:begin -->` and `<!-- instances:end -->` is replaced (the
section is appended when the markers are absent); nothing else in the file changes.
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
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import _section
from benchmarks._section import (
    URI, EnvPaths, domain_names, domain_titles, fmt_s, log, make_dir, run, virsh,
)

from reconciler.models import Key
from reconciler.naming import host_name

REPO = Path(__file__).resolve().parent.parent
RECONCILER = REPO / ".venv" / "bin" / "reconciler"
IMAGE = Path(os.environ.get("RECONCILER_TEST_IMAGE", "/var/lib/reconciler/images/tiny.qcow2"))
BENCH_ROOT = Path("/var/lib/reconciler/bench")
PREFIX = "rcbench"
SUBNET_BASE = "10.252"  # 10.252.X.0/24 per bridge; the integration tests use 10.253
NETWORKS = ("net-a", "net-b")
MEMORY_MIB = 128
HTTP_TIMEOUT_S = 300.0
POLL_INTERVAL_S = 0.2
POLL_ATTEMPT_TIMEOUT_S = 1.0
BEGIN = "<!-- instances:begin -->"
END = "<!-- instances:end -->"


def _free_subnets(count: int) -> list[ipaddress.IPv4Network]:
    used = run("ip", "-4", "-o", "addr", "show").stdout
    routes = run("ip", "-4", "route", "show").stdout.splitlines()
    found: list[ipaddress.IPv4Network] = []
    for x in range(1, 255):
        prefix = f"{SUBNET_BASE}.{x}."
        if f" {prefix}" in used or any(line.startswith(prefix) for line in routes):
            continue
        found.append(ipaddress.IPv4Network(f"{prefix}0/24"))
        if len(found) == count:
            return found
    raise RuntimeError(f"no {count} free {SUBNET_BASE}.X.0/24 subnets on this host")


# --- one benchmark environment: tenant, state dir, bridges ---------------------------------


@dataclass
class Vm:
    name: str
    network: str
    ip: str


@dataclass
class Env(EnvPaths):
    tenant: str
    root: Path
    subnets: dict[str, ipaddress.IPv4Network] = field(default_factory=dict)
    bridges: list[str] = field(default_factory=list)

    @classmethod
    def create(cls) -> Env:
        tenant = f"{PREFIX}{secrets.token_hex(4)}"
        make_dir(BENCH_ROOT.parent)
        make_dir(BENCH_ROOT)
        env = cls(tenant=tenant, root=BENCH_ROOT / tenant)
        make_dir(env.root)
        make_dir(env.state_dir)
        drivers = {k: "memory" for k in ("Tenant", "Network", "Router", "SecurityGroup", "Volume", "Bucket")}
        drivers.update(Image="libvirt", Instance="libvirt")
        env.host_config.write_text(json.dumps({  # JSON is YAML
            "stateDir": str(env.state_dir),
            "drivers": drivers,
            "libvirt": {"uri": URI, "domainType": "qemu", "shutdownTimeoutSeconds": 10},
        }, indent=2) + "\n")
        for net, subnet in zip(NETWORKS, _free_subnets(len(NETWORKS))):
            env.add_bridge(net, subnet)
        return env

    def add_bridge(self, network: str, subnet: ipaddress.IPv4Network) -> None:
        name = host_name(Key("Network", self.tenant, network))
        with open(self.root / "bridges.txt", "a") as f:  # recorded first: a sweep finds it
            f.write(name + "\n")
        self.bridges.append(name)
        run("ip", "link", "add", "name", name, "type", "bridge")
        run("ip", "addr", "add", f"{subnet.network_address + 1}/{subnet.prefixlen}", "dev", name)
        run("ip", "link", "set", "dev", name, "up")
        self.subnets[network] = subnet

    def vms(self, count: int) -> list[Vm]:
        """`count` instances, half on each bridge, fixed IPs from .10 on."""
        per_net = -(-count // len(NETWORKS))
        out = []
        for i in range(count):
            net = NETWORKS[i // per_net]
            out.append(Vm(f"vm-{i:03d}", net, str(self.subnets[net].network_address + 10 + i % per_net)))
        return out

    def write_manifest(self, vms: Sequence[Vm], power_state: str) -> Path:
        t = self.tenant
        docs = [
            f"apiVersion: reconciler/v1\nkind: Tenant\nmetadata: {{name: {t}}}\nspec: {{}}\n",
            f"apiVersion: reconciler/v1\nkind: Image\nmetadata: {{name: tiny, tenant: {t}}}\n"
            f"spec: {{source: {IMAGE}}}\n",
        ]
        for net, subnet in self.subnets.items():
            docs.append(f"apiVersion: reconciler/v1\nkind: Network\nmetadata: {{name: {net}, tenant: {t}}}\n"
                        f"spec: {{type: flat, subnets: [{{cidr: {subnet}}}]}}\n")
        for vm in vms:
            docs.append(
                f"apiVersion: reconciler/v1\nkind: Instance\nmetadata: {{name: {vm.name}, tenant: {t}}}\n"
                f"spec:\n  image: tiny\n  vcpus: 1\n  memoryMiB: {MEMORY_MIB}\n  rootDiskGiB: 1\n"
                f"  powerState: {power_state}\n  networks: [{{network: {vm.network}, ip: {vm.ip}}}]\n"
            )
        make_dir(self.manifests)
        path = self.manifests / "cloud.yaml"
        path.write_text("---\n".join(docs))
        return path

    def domain_name(self, vm: Vm) -> str:
        return host_name(Key("Instance", self.tenant, vm.name))

    def leftovers(self, vms: Sequence[Vm]) -> list[str]:
        """What of this environment's instances is still on the host (after a destroy)."""
        found = []
        names = domain_names()
        expected = {self.domain_name(vm) for vm in vms}
        found += [f"domain {n}" for n in sorted(names & expected)]
        found += [f"domain {n} titled {t!r}" for n, t in domain_titles().items()
                  if t.startswith(self.tenant + "/") and n not in expected]
        instance_dir = self.state_dir / "libvirt" / "instances"
        if instance_dir.exists():
            found += [f"instance files {p}" for p in instance_dir.iterdir()]
        image_dir = self.state_dir / "libvirt" / "images"
        if image_dir.exists():
            found += [f"image file {p}" for p in image_dir.iterdir() if p.name.startswith("rc-")]
        return found

    def cleanup(self) -> list[str]:
        return sweep_root(self.root, self.tenant)

    def diagnose(self, vms: Sequence[Vm]) -> str:
        """What the host says about some (silent) guests: state, console tail, neighbours."""
        out = []
        neigh = run("ip", "neigh", "show", check=False).stdout.splitlines()
        for vm in vms:
            name = self.domain_name(vm)
            state = virsh("domstate", "--reason", name, check=False)
            console = self.state_dir / "libvirt" / "instances" / name / "console.log"
            try:
                tail = console.read_text(errors="replace").splitlines()[-12:]
            except OSError as exc:
                tail = [f"(no console log: {exc})"]
            out.append(f"{vm.name} ({name}, {vm.ip}): {(state.stdout or state.stderr).strip()}; "
                       f"neighbour: {[n for n in neigh if n.startswith(vm.ip + ' ')]}\n    "
                       + "\n    ".join(tail))
        return "\n".join(out)


def _remove_domain(name: str) -> str | None:
    virsh("destroy", name, check=False)
    result = virsh("undefine", "--nvram", name, check=False)
    if result.returncode != 0:
        result = virsh("undefine", name, check=False)
    if result.returncode != 0 and name in domain_names():
        return f"undefine {name}: {result.stderr.strip()}"
    return None


def sweep_root(root: Path, tenant: str) -> list[str]:
    """Remove a benchmark environment: its domains (by title), bridges, state dir."""
    problems: list[str] = []
    mine = [n for n, t in domain_titles().items() if t.startswith(tenant + "/")]
    if mine:
        with ThreadPoolExecutor(max_workers=len(mine)) as pool:  # ~1.5 s each here
            problems += [p for p in pool.map(_remove_domain, mine) if p]
    bridges_file = root / "bridges.txt"
    if bridges_file.exists():
        for bridge in bridges_file.read_text().split():
            if Path("/sys/class/net", bridge).exists():
                result = run("ip", "link", "del", "dev", bridge, check=False)
                if result.returncode != 0:
                    problems.append(f"ip link del {bridge}: {result.stderr.strip()}")
    shutil.rmtree(root, ignore_errors=True)
    return problems


def sweep_all() -> list[str]:
    """Everything a previous (interrupted) run of this command left: rcbench* only."""
    problems: list[str] = []
    if BENCH_ROOT.exists():
        for root in sorted(BENCH_ROOT.glob(f"{PREFIX}*")):
            log(f"removing leftovers of {root.name}")
            problems += sweep_root(root, root.name)
    stray = [n for n, t in domain_titles().items() if t.startswith(PREFIX)]
    if stray:
        with ThreadPoolExecutor(max_workers=len(stray)) as pool:
            problems += [p for p in pool.map(_remove_domain, stray) if p]
    return problems


# --- interference -------------------------------------------------------------------------


class Watch:
    """Other work on the host during a scenario: foreign running domains, test runs, load."""

    def __init__(self, tenant: str) -> None:
        self.tenant = tenant
        self.foreign_domains = 0
        self.foreign_runs: set[str] = set()
        self.load = [os.getloadavg()[0]]
        self.ours = {host_name(Key("Instance", tenant, f"vm-{i:03d}")) for i in range(1000)}
        self.sample()

    def sample(self) -> None:
        try:
            running = domain_names(running_only=True)
        except (RuntimeError, subprocess.TimeoutExpired):
            running = set()
        self.foreign_domains = max(self.foreign_domains, len(running - self.ours))
        me = os.getpid()
        for pid in os.listdir("/proc"):
            if not pid.isdigit() or int(pid) == me:
                continue
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            text = " ".join(c.decode(errors="replace") for c in cmd)
            if "pytest" in text:
                self.foreign_runs.add("pytest")
            elif "benchmarks.plan" in text:
                self.foreign_runs.add("planner benchmark")
            elif "reconciler" in text and self.tenant not in text and "benchmarks.instances" not in text \
                    and PREFIX not in text and ".venv/bin/reconciler" in text:
                self.foreign_runs.add("another reconciler command")
        self.load.append(os.getloadavg()[0])

    def as_dict(self) -> dict[str, Any]:
        return {"foreign_domains": self.foreign_domains, "foreign_runs": sorted(self.foreign_runs),
                "load": [round(x, 2) for x in self.load]}


class ScenarioFailed(RuntimeError):
    def __init__(self, message: str, details: str = "") -> None:
        super().__init__(message + ("\n" + details if details else ""))
        self.message = message


# --- the scenarios --------------------------------------------------------------------------


def _http_poll(ip: str, expect: str, t0: float, stop: threading.Event, out: dict[str, float]) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy
    while not stop.is_set():
        try:
            with opener.open(f"http://{ip}/", timeout=POLL_ATTEMPT_TIMEOUT_S) as response:
                body = response.read().decode(errors="replace")
            if response.status == 200 and expect in body:
                out[ip] = time.perf_counter() - t0
                return
        except OSError:
            pass
        stop.wait(POLL_INTERVAL_S)


def scenario_started(parallelism: int, count: int) -> dict[str, Any]:
    env = Env.create()
    try:
        watch = Watch(env.tenant)
        vms = env.vms(count)
        manifest = env.write_manifest(vms, "running")
        answered: dict[str, float] = {}
        stop = threading.Event()
        t0 = time.perf_counter()
        pollers = [threading.Thread(target=_http_poll, args=(vm.ip, vm.name, t0, stop, answered), daemon=True)
                   for vm in vms]
        for p in pollers:
            p.start()
        try:
            apply_s, _ = env.cli("apply", str(manifest), "--yes", "--parallelism", str(parallelism))
            running = domain_names(running_only=True)
            missing = [vm.name for vm in vms if env.domain_name(vm) not in running]
            if missing:
                raise RuntimeError(f"after apply, not running: {missing}")
            deadline = time.perf_counter() + HTTP_TIMEOUT_S
            next_sample = time.perf_counter() + 5
            while any(p.is_alive() for p in pollers) and time.perf_counter() < deadline:
                time.sleep(0.1)
                if time.perf_counter() >= next_sample:
                    watch.sample()
                    next_sample += 5
        finally:
            stop.set()
            for p in pollers:
                p.join(timeout=5)
        if len(answered) != len(vms):
            silent = [vm for vm in vms if vm.ip not in answered]
            raise ScenarioFailed(f"no HTTP answer within {HTTP_TIMEOUT_S:.0f} s from "
                                 f"{[vm.name for vm in silent]}", env.diagnose(silent))
        watch.sample()
        destroy_s, _ = env.cli("destroy", str(manifest), "--yes", "--parallelism", str(parallelism))
        left = env.leftovers(vms)
        if left:
            raise RuntimeError("destroy left: " + "; ".join(left))
        watch.sample()
        times = sorted(answered.values())
        return {"apply": apply_s, "http_all": times[-1], "http_first": times[0],
                "http_median": statistics.median(times), "destroy": destroy_s, "watch": watch.as_dict()}
    finally:
        problems = env.cleanup()
        if problems:
            raise RuntimeError("cleanup failed: " + "; ".join(problems))


def _planned_line(stderr: str) -> dict[str, Any] | None:
    for line in stderr.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            data = json.loads(line)
        except ValueError:
            continue
        if data.get("event") == "planned":
            return data
    return None


def scenario_defined(count: int) -> dict[str, Any]:
    env = Env.create()
    try:
        watch = Watch(env.tenant)
        vms = env.vms(count)
        manifest = env.write_manifest(vms, "stopped")
        apply_s, _ = env.cli("apply", str(manifest), "--yes", "--parallelism", "8")
        defined = domain_names()
        missing = [vm.name for vm in vms if env.domain_name(vm) not in defined]
        if missing:
            raise RuntimeError(f"after apply, not defined: {missing[:10]}")
        running = domain_names(running_only=True) & {env.domain_name(vm) for vm in vms}
        if running:
            raise RuntimeError(f"stopped instances are running: {sorted(running)[:5]}")
        watch.sample()
        startup_s, _ = env.cli("version")
        plan_s, result = env.cli("plan", str(manifest), log_level="info")
        if "No changes" not in result.stdout:
            raise RuntimeError(f"the plan after apply is not empty:\n{result.stdout[-4000:]}")
        planned = _planned_line(result.stderr)
        if planned is None:
            raise RuntimeError(f"no `planned` log line in:\n{result.stderr[-2000:]}")
        watch.sample()
        destroy_s, _ = env.cli("destroy", str(manifest), "--yes", "--parallelism", "8")
        left = env.leftovers(vms)
        if left:
            raise RuntimeError("destroy left: " + "; ".join(left[:10]))
        watch.sample()
        return {"apply": apply_s, "startup": startup_s, "plan": plan_s, "observe": planned.get("observe_s"),
                "plan_part": planned.get("plan_s"), "owned": planned.get("owned"),
                "resources": planned.get("resources"), "destroy": destroy_s, "watch": watch.as_dict()}
    finally:
        problems = env.cleanup()
        if problems:
            raise RuntimeError("cleanup failed: " + "; ".join(problems))


# --- the report -------------------------------------------------------------------------------


def _stats(values: Sequence[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def machine() -> dict[str, str]:
    from benchmarks.plan import machine as planner_machine

    info = planner_machine()
    info.pop("libraries", None)
    versions = virsh("version", check=False).stdout
    lib = re.search(r"Using library: libvirt ([\d.]+)", versions)
    hyp = re.search(r"Running hypervisor: QEMU ([\d.]+)", versions)
    try:
        import importlib.metadata as md

        pyvirt = md.version("libvirt-python")
    except Exception:  # pragma: no cover - reported as unknown
        pyvirt = "unknown"
    info["virtualisation"] = (f"libvirt {lib.group(1) if lib else '?'}, QEMU {hyp.group(1) if hyp else '?'}, "
                              f"libvirt-python {pyvirt}; domain type `qemu` (TCG, CPU model qemu64): "
                              "`/dev/kvm` here cannot boot a Linux guest")
    size = IMAGE.stat().st_size if IMAGE.exists() else 0
    info["guest"] = (f"`{IMAGE}` ({size / 1024 / 1024:.0f} MiB qcow2, Debian cloud kernel and a busybox "
                     "initramfs, built by scripts/build-test-image.sh), "
                     f"{MEMORY_MIB} MiB, 1 vCPU, 1 GiB root overlay, NoCloud seed ISO")
    return info


def report(results: dict[str, list[dict[str, Any]]], repeat: int, count: int, defined: int,
           command: str, failures: Sequence[dict[str, Any]] = ()) -> str:
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    s1, s8, d = results["started-1"], results["started-8"], results["defined"]

    def col(rows: list[dict[str, Any]], key: str) -> list[float]:
        return [r[key] for r in rows if r.get(key) is not None]

    def row(label: str, values: Sequence[float]) -> str:
        med, lo, hi = _stats(values)
        return f"| {label} | {fmt_s(med)} | {fmt_s(lo)} | {fmt_s(hi)} |"

    half = count // len(NETWORKS)
    lines = [
        BEGIN,
        "## Instances on libvirt (real driver)",
        "",
        "Generated by `benchmarks/instances.py`; a measurement, never a test. It rewrites only the "
        "part of this file between its markers (`make bench` runs the planner benchmark first, which "
        "rewrites the rest, then this one).",
        "",
        "### How to reproduce",
        "",
        "From the project root, as root, with libvirtd running (`scripts/setup-libvirt.sh`) and the "
        "test guest built (`scripts/build-test-image.sh`; `make services` does both):",
        "",
        *_section.reproduce(command, now, machine()),
    ]
    lines += [
        "",
        "### What is measured",
        "",
        "Image and Instance are realised by the libvirt driver; the other kinds stay in the in-memory "
        "drivers (the network driver is a later issue), so the benchmark creates the two Linux bridges "
        "itself, named as the network driver will name them, with the subnet's `.1` on the host. "
        f"Every scenario starts from a clean host: a new tenant `{PREFIX}<hex>` with its own state dir "
        f"under `{BENCH_ROOT}` and its own bridges; after its destroy, `virsh list --all` (by name and "
        "by title), the instance directories and the registered image are checked to be gone, then the "
        "bridges and state dir are removed. Each figure is the wall time of a whole `reconciler` "
        "process (Python start-up, loading the manifests, observing the host, planning, acting).",
        "",
        f"- **create and start {count} instances**: one manifest (a Tenant, the Image with the test guest "
        f"as source, two flat networks, {count} Instances of {MEMORY_MIB} MiB, {half} on each bridge, "
        "fixed IPs) applied from scratch by `reconciler apply --yes --parallelism 1` and "
        "`--parallelism 8`, until the command returns: the image registered (a verbatim copy), each "
        "instance's qcow2 overlay and seed ISO written, domain defined and started.",
        "- **until all answer HTTP**: from the same start, the time until every guest has answered "
        "`GET http://IP/` with its own hostname, polled from the host (one thread per guest, every "
        f"{POLL_INTERVAL_S:g} s, {POLL_ATTEMPT_TIMEOUT_S:g} s timeout per attempt). This is CPU-bound: "
        f"{count} TCG guests booting on {os.cpu_count()} cores.",
        f"- **destroy {count} running instances**: `reconciler destroy --yes` with the same parallelism, "
        "right after they all answered: an ACPI shutdown per guest (pressed again every 2 s, forced off "
        "after 10 s), undefine, removal of the overlay and seed, then the image.",
        f"- **{defined} defined instances**: the same manifest with {defined} instances "
        f"({defined // len(NETWORKS)} per bridge) and `powerState: stopped`, created by one "
        "`reconciler apply --yes` (parallelism 8); then a no-op `reconciler plan` (it must print "
        "\"No changes\"): the whole process, and the observe and plan parts from its `planned` log "
        "line (`observe_s`, `plan_s`; the rest is start-up and loading the manifests); then the destroy.",
        "",
        f"Medians of {repeat} repeats, with the fastest and slowest; within a repeat the scenarios run "
        "one after another (parallelism 1, parallelism 8, the defined instances). Before each scenario "
        "the benchmark waits (a few minutes at most) until no other domain runs and no test run is "
        "going on on the host; what it still saw during the scenarios is in the notes.",
        "",
        "### Results",
        "",
        "| step | median | min | max |",
        "|---|---:|---:|---:|",
        row(f"create and start {count} instances, `apply --parallelism 1`", col(s1, "apply")),
        row(f"create and start {count} instances, `apply --parallelism 8`", col(s8, "apply")),
        row(f"until all {count} answer HTTP, parallelism 1 (from the start of apply)", col(s1, "http_all")),
        row(f"until all {count} answer HTTP, parallelism 8 (from the start of apply)", col(s8, "http_all")),
        row("until the first answers HTTP, parallelism 8", col(s8, "http_first")),
        row(f"destroy {count} running instances, `destroy --parallelism 1`", col(s1, "destroy")),
        row(f"destroy {count} running instances, `destroy --parallelism 8`", col(s8, "destroy")),
        row(f"define {defined} stopped instances, `apply --parallelism 8`", col(d, "apply")),
        row(f"no-op `reconciler plan` with {defined} defined instances, whole process", col(d, "plan")),
        row("… of which observing the host (`observe_s`)", col(d, "observe")),
        row("… of which planning (`plan_s`)", col(d, "plan_part")),
        row("`reconciler version`, for reference (interpreter and CLI start-up)", col(d, "startup")),
        row(f"destroy {defined} stopped instances, `destroy --parallelism 8`", col(d, "destroy")),
        "",
    ]
    owned = sorted({r.get("owned") for r in d})
    lines += [
        f"The no-op plans saw {', '.join(str(o) for o in owned)} owned host objects "
        f"({defined} domains, the image, the tenant and the networks) and planned no change.",
        "",
    ]
    lines += ["### Against kcli", "", _kcli_paragraph(), ""]
    lines += ["### Notes", ""] + _notes(results, count, failures) + ["", END]
    return "\n".join(lines) + "\n"


def _kcli_paragraph() -> str:
    return (
        "kcli is measured side by side with reconciler, in the same run and on the same workload (10 guests "
        "of this image, 128 MiB, each with a 1 GiB data disk, 5 on each of two networks with DHCP, with "
        "reconciler's real network and storage drivers): apply from scratch, a no-op re-run and teardown, "
        "in [Side by side with kcli](#side-by-side-with-kcli-same-workload-same-run) "
        "(`benchmarks/kcli.py`). The figures the host notes recorded for kcli on another machine are no "
        "longer quoted here."
    )


def _notes(results: dict[str, list[dict[str, Any]]], count: int,
           failures: Sequence[dict[str, Any]] = ()) -> list[str]:
    notes = []
    for f in failures:
        w = f["watch"]
        other = []
        if w["foreign_domains"]:
            other.append(f"{w['foreign_domains']} other running domain(s)")
        other += w["foreign_runs"]
        notes.append(f"- A run of `{f['scenario']}` (repeat {f['repeat']}) failed and was run again from a "
                     f"clean host: {f['error']}" + (f" (other work on the host then: {', '.join(other)})"
                                                  if other else "") + ".")
    loads = [x for rows in results.values() for r in rows for x in r["watch"]["load"]]
    hit = []
    for name, rows in results.items():
        for i, r in enumerate(rows, 1):
            w = r["watch"]
            what = []
            if w["foreign_domains"]:
                what.append(f"{w['foreign_domains']} other running domain(s)")
            what += w["foreign_runs"]
            if what:
                hit.append(f"`{name}` repeat {i} ({', '.join(what)})")
    if hit:
        notes.append("- Interference observed: other work ran on this host during " + "; ".join(hit)
                     + ". It competes with the guests and the commands for the two cores, so those "
                     "figures (the boot times above all) are likely high; the min columns are the "
                     f"least disturbed runs. 1-minute load average seen: {min(loads):.1f} to {max(loads):.1f}.")
    else:
        notes.append("- No other running domains and no test runs were seen on the host during the run "
                     f"(1-minute load average between {min(loads):.1f} and {max(loads):.1f}, "
                     "most of it this benchmark's own guests).")
    s8 = results["started-8"]
    spread = [r["http_all"] - r["http_first"] for r in s8]
    notes += [
        f"- At parallelism 8 the first guest answered after {fmt_s(statistics.median(r['http_first'] for r in s8))} "
        f"and the last {fmt_s(statistics.median(spread))} later (medians); one guest alone boots in about "
        f"4 s under TCG (host notes), {count} at once share the two cores.",
        f"- The apply includes registering the image (a {_image_mib():.0f} MiB copy, checksummed) and writing a seed ISO per "
        "instance; the destroy waits for each guest to power off after an ACPI press (the test guest runs "
        "acpid) rather than pulling the plug, which is what a graceful delete costs.",
        f"- After every destroy the check found nothing left ({sum(len(v) for v in results.values())} "
        "scenarios); all domains, bridges and state dirs of the benchmark were removed at the end.",
    ]
    return notes


def _image_mib() -> float:
    return IMAGE.stat().st_size / 1024 / 1024 if IMAGE.exists() else 0.0


def write_section(path: Path, section: str) -> None:
    _section.write_section(path, section, BEGIN, END)


def preflight() -> None:
    reasons = []
    if os.geteuid() != 0:
        reasons.append("needs root (bridges, libvirt system domains)")
    if shutil.which("virsh") is None or virsh("version", check=False).returncode != 0:
        reasons.append(f"libvirtd does not answer at {URI}: run scripts/setup-libvirt.sh")
    if not IMAGE.exists():
        reasons.append(f"{IMAGE} missing: run scripts/build-test-image.sh")
    if not RECONCILER.exists():
        reasons.append(f"{RECONCILER} missing: install the project into .venv (make setup)")
    if reasons:
        raise SystemExit("cannot run: " + "; ".join(reasons))


def wait_for_quiet(limit_s: float) -> float:
    """Wait (up to `limit_s`) until no other domain runs and no test run is going on; the
    seconds waited. The scenario then runs either way; its Watch records what it saw."""
    started = time.perf_counter()
    said = False
    while time.perf_counter() - started < limit_s:
        watch = Watch(PREFIX + "-none")
        if not watch.foreign_domains and not watch.foreign_runs:
            break
        if not said:
            log(f"  waiting (up to {limit_s:.0f} s) for other work to finish: {watch.as_dict()}")
            said = True
        time.sleep(2)
    return time.perf_counter() - started


def attempt(name: str, repeat: int, failures: list[dict[str, Any]], quiet_wait: float, what: str,
            fn: Callable[[], dict[str, Any]], tries: int = 2) -> dict[str, Any]:
    """Run one scenario; a failed one is recorded (for the notes) and run again once."""
    for n in range(1, tries + 1):
        wait_for_quiet(quiet_wait)
        log(f"repeat {repeat + 1}: {what}" + (f" (attempt {n})" if n > 1 else "") + "...")
        watch = Watch(PREFIX + "-none")
        try:
            return fn()
        except RuntimeError as exc:
            watch.sample()
            log(f"  FAILED: {exc}")
            failures.append({"scenario": name, "repeat": repeat + 1, "attempt": n,
                             "error": getattr(exc, "message", str(exc).splitlines()[0]),
                             "details": str(exc), "watch": watch.as_dict()})
            if n == tries:
                raise
    raise AssertionError("unreachable")


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.instances", description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="Runs of each scenario (default: 3).")
    parser.add_argument("--write", type=Path, default=None,
                        help="Write the Markdown section into this file (between its markers).")
    parser.add_argument("--instances", type=int, default=10, help="Running instances (default: 10).")
    parser.add_argument("--defined", type=int, default=100, help="Defined, stopped instances (default: 100).")
    parser.add_argument("--quiet-wait", type=float, default=300,
                        help="Seconds to wait before each scenario for other domains and test runs "
                             "to finish (default: 300; it runs anyway after that).")
    parser.add_argument("--json", type=Path, default=None, help="Also dump the raw results as JSON here.")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if not 2 <= args.instances <= 200 or not 2 <= args.defined <= 200:
        parser.error("--instances and --defined: between 2 and 200 (one /24 per bridge)")
    preflight()
    signal.signal(signal.SIGTERM, _sigterm)
    results: dict[str, list[dict[str, Any]]] = {"started-1": [], "started-8": [], "defined": []}
    failures: list[dict[str, Any]] = []
    try:
        problems = sweep_all()
        if problems:
            raise SystemExit("leftovers of an earlier run could not be removed: " + "; ".join(problems))
        for i in range(args.repeat):
            for p in (1, 8):
                r = attempt(f"started-{p}", i, failures, args.quiet_wait,
                            f"{args.instances} instances at parallelism {p}",
                            lambda: scenario_started(p, args.instances))
                results[f"started-{p}"].append(r)
                log(f"  apply {fmt_s(r['apply'])}, all answer HTTP {fmt_s(r['http_all'])} "
                    f"(first {fmt_s(r['http_first'])}), destroy {fmt_s(r['destroy'])}; {r['watch']}")
            r = attempt("defined", i, failures, args.quiet_wait, f"{args.defined} defined instances",
                        lambda: scenario_defined(args.defined))
            results["defined"].append(r)
            log(f"  apply {fmt_s(r['apply'])}, no-op plan {fmt_s(r['plan'])} (observe {r['observe']} s, "
                f"plan {r['plan_part']} s, owned {r['owned']}), destroy {fmt_s(r['destroy'])}; {r['watch']}")
    finally:
        problems = sweep_all()
        if problems:
            log("cleanup problems: " + "; ".join(problems))
        try:
            if BENCH_ROOT.exists() and not any(BENCH_ROOT.iterdir()):
                BENCH_ROOT.rmdir()
        except OSError:
            pass
    if args.json:
        args.json.write_text(json.dumps({"results": results, "failures": failures}, indent=2) + "\n")
    command = f".venv/bin/python -m benchmarks.instances --repeat {args.repeat}"
    if args.instances != 10:
        command += f" --instances {args.instances}"
    if args.defined != 100:
        command += f" --defined {args.defined}"
    if args.write:
        command += f" --write {args.write}"
    section = report(results, args.repeat, args.instances, args.defined, command, failures)
    if args.write:
        write_section(args.write, section)
        log(f"wrote the instances section of {args.write}")
    else:
        sys.stdout.write(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
