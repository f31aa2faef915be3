"""reconciler and kcli side by side on the same workload, in the same run; writes a section
of docs/benchmarks.md.

    python -m benchmarks.kcli --repeat 3 --write docs/benchmarks.md

A command, never a test. Needs root, a running libvirtd (scripts/setup-libvirt.sh), the
network tools (scripts/setup-network.sh), qemu-utils and the test guest
(scripts/build-test-image.sh). kcli is installed, if missing, into its own virtualenv
/var/lib/reconciler/bench/kcli-venv (`python -m venv` + `pip install kcli`; its
libvirt-python comes from PyPI, built against libvirt-dev with pkg-config when no wheel
is cached, which `make setup` installs); the virtualenv is kept for the next run.

One cloud description (`Cloud`, Python data) gives both inputs: reconciler manifests (a
tenant `rcbk<hex>`, two flat networks with DHCP on the netlink driver, 10 instances of the
test guest, 128 MiB, 1 vCPU, 1 GiB root overlay, each with a 1 GiB Volume on the storage
driver's file backend, 5 per network, fixed addresses) and a kcli plan (the same two
networks as kcli networks: isolated libvirt networks with DHCP whose bridges kcli names,
the same 10 VMs with a 1 GiB extra disk, `reserveip` for the same fixed addresses).
Each repeat makes a fresh environment under /var/lib/reconciler/bench/rcbk<hex> (the
reconciler state dir, host config, manifests and volume pool; kcli's HOME with `client:
local` and a libvirt dir pool `rcbk<hex>` on a directory there) and runs, in a rotating
order, the full cycle with reconciler, with `kcli create plan` and with `kcli create plan
-t`: apply from scratch until every domain runs, wait until the guests have booted and
gone idle, a no-op re-run (whole processes), teardown until nothing of it is left.
Afterwards nothing of the environment may be left (domains, bridges, libvirt networks,
the pool, namespaces, dnsmasq processes, nftables table, iptables rules, files).

Figures are medians with min and max. With `--write FILE` only the part of FILE between
`<!-- kcli:begin -->` and `<!-- kcli:end -->` is replaced (the section is appended when
the markers are absent); nothing else in the file changes.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import ipaddress
import json
import os
import platform
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from benchmarks import _section
from benchmarks._section import (
    ENV, URI, EnvPaths, Interference, domain_names, domain_titles, fmt_s, home_of, log,
    make_dir, processes_mentioning, remove_host_objects, run, timed_cli, virsh,
)

from reconciler.models import Key
from reconciler.naming import host_name

REPO = Path(__file__).resolve().parent.parent
RECONCILER = REPO / ".venv" / "bin" / "reconciler"
IMAGE = Path(os.environ.get("RECONCILER_TEST_IMAGE", "/var/lib/reconciler/images/tiny.qcow2"))
BENCH_ROOT = Path("/var/lib/reconciler/bench")
KCLI_VENV = BENCH_ROOT / "kcli-venv"
KCLI = KCLI_VENV / "bin" / "kcli"
PREFIX = "rcbk"  # not rcbench / rcbnet / rcbvol / rcbd: the other benchmarks sweep those
SUBNET_BASE = "10.243"  # 10.243.X.0/24 per network (tests 10.249/251/253/254, benchmarks 10.244-252)
LIBVIRT_DNSMASQ = Path("/var/lib/libvirt/dnsmasq")
LIBVIRT_NETWORK_RUN = Path("/run/libvirt/network")
LIBVIRT_QEMU_LOGS = Path("/var/log/libvirt/qemu")
BEGIN = "<!-- kcli:begin -->"
END = "<!-- kcli:end -->"

MEMORY_MIB = 128
VCPUS = 1
ROOT_GIB = 1
DISK_GIB = 1
SHUTDOWN_TIMEOUT_S = 10
RUNNING_TIMEOUT_S = 120.0
GONE_TIMEOUT_S = 120.0
SETTLE_TIMEOUT_S = 150.0
SETTLE_WINDOW_S = 3.0
SETTLE_CORES = 0.5  # the guests' QEMU processes together below half a core: booted and idle

#: the three ways of running the workload, in the order of the first repeat
TOOLS = ("reconciler", "kcli", "kcli-t")
LABEL = {"reconciler": "reconciler", "kcli": "kcli (sequential)", "kcli-t": "kcli `-t` (threaded)"}


def libvirt_networks() -> set[str]:
    return {n for n in virsh("net-list", "--all", "--name").stdout.split() if n}


def libvirt_pools() -> set[str]:
    return {n for n in virsh("pool-list", "--all", "--name").stdout.split() if n}


def _free_subnets(count: int) -> list[ipaddress.IPv4Network]:
    used = run("ip", "-4", "-o", "addr", "show").stdout
    routes = run("ip", "-4", "route", "show").stdout.splitlines()
    libvirt_nets = " ".join(virsh("net-dumpxml", n, check=False).stdout for n in libvirt_networks())
    found: list[ipaddress.IPv4Network] = []
    for x in range(1, 255):
        prefix = f"{SUBNET_BASE}.{x}."
        if f" {prefix}" in used or prefix in libvirt_nets or any(line.startswith(prefix) for line in routes):
            continue
        found.append(ipaddress.IPv4Network(f"{prefix}0/24"))
        if len(found) == count:
            return found
    raise RuntimeError(f"no {count} free {SUBNET_BASE}.X.0/24 subnets on this host")


# --- the one cloud description, and what each tool gets from it ----------------------------------


@dataclass(frozen=True)
class Net:
    name: str  # reconciler Network name; kcli network (and bridge) `<id>-<suffix>`
    suffix: str
    cidr: ipaddress.IPv4Network


@dataclass(frozen=True)
class Vm:
    name: str
    network: str
    ip: str
    volume: str


@dataclass
class Cloud:
    """The workload, once: both the manifests and the kcli plan are derived from it."""

    id: str  # the tenant, the kcli plan name and the prefix of every kcli object
    networks: list[Net]
    vms: list[Vm]
    image: Path = IMAGE
    memory_mib: int = MEMORY_MIB
    vcpus: int = VCPUS
    root_gib: int = ROOT_GIB
    disk_gib: int = DISK_GIB

    @classmethod
    def make(cls, cloud_id: str, subnets: Sequence[ipaddress.IPv4Network], count: int) -> "Cloud":
        nets = [Net(f"net-{chr(ord('a') + i)}", chr(ord("a") + i), s) for i, s in enumerate(subnets)]
        per_net = -(-count // len(nets))
        vms = []
        for i in range(count):
            net = nets[i // per_net]
            vms.append(Vm(f"vm-{i:02d}", net.name, str(net.cidr.network_address + 10 + i % per_net), f"data-{i:02d}"))
        return cls(cloud_id, nets, vms)

    # reconciler --------------------------------------------------------------------------------

    def manifests(self) -> list[dict[str, Any]]:
        t = self.id
        meta = lambda name: {"name": name, "tenant": t}  # noqa: E731
        docs: list[dict[str, Any]] = [
            {"apiVersion": "reconciler/v1", "kind": "Tenant", "metadata": {"name": t}, "spec": {}},
            {"apiVersion": "reconciler/v1", "kind": "Image", "metadata": meta("tiny"), "spec": {"source": str(self.image)}},
        ]
        for net in self.networks:  # flat, no uplink: a bridge of its own; DHCP on (the default)
            docs.append({"apiVersion": "reconciler/v1", "kind": "Network", "metadata": meta(net.name),
                         "spec": {"type": "flat", "subnets": [{"cidr": str(net.cidr)}]}})
        for vm in self.vms:
            docs.append({"apiVersion": "reconciler/v1", "kind": "Volume", "metadata": meta(vm.volume),
                         "spec": {"sizeGiB": self.disk_gib, "deletionPolicy": "Delete"}})
            docs.append({"apiVersion": "reconciler/v1", "kind": "Instance", "metadata": meta(vm.name),
                         "spec": {"image": "tiny", "vcpus": self.vcpus, "memoryMiB": self.memory_mib,
                                  "rootDiskGiB": self.root_gib, "powerState": "running",
                                  "networks": [{"network": vm.network, "ip": vm.ip}],
                                  "volumes": [{"volume": vm.volume}]}})
        return docs

    def domain(self, vm: Vm) -> str:
        return host_name(Key("Instance", self.id, vm.name))

    def bridge(self, net: Net) -> str:
        return host_name(Key("Network", self.id, net.name))

    # kcli ----------------------------------------------------------------------------------------

    def kcli_network(self, net: Net) -> str:
        return f"{self.id}-{net.suffix}"  # also its bridge: at most 15 characters

    def kcli_vm(self, vm: Vm) -> str:
        return f"{self.id}-{vm.name}"

    def kcli_plan(self, pool: str) -> dict[str, Any]:
        by_name = {n.name: n for n in self.networks}
        plan: dict[str, Any] = {}
        for net in self.networks:  # an isolated libvirt network: bridge, host .1, libvirt's dnsmasq
            plan[self.kcli_network(net)] = {"type": "network", "cidr": str(net.cidr), "dhcp": True, "nat": False}
        for vm in self.vms:
            plan[self.kcli_vm(vm)] = {
                "image": str(self.image),  # an absolute path: used as the backing file, no pool lookup
                "numcpus": self.vcpus, "memory": self.memory_mib, "pool": pool,
                "disks": [self.root_gib, self.disk_gib],  # the root overlay on the image, the extra disk
                "nets": [{"name": self.kcli_network(by_name[vm.network]), "ip": vm.ip, "reserveip": True}],
                "virttype": "qemu", "cpumodel": "qemu64", "cloudinit": False, "vnc": False,
            }
        return plan


# --- one environment: both tools' inputs for one cloud ------------------------------------------


@dataclass
class Env(EnvPaths):
    id: str
    root: Path
    cloud: Cloud = field(init=False)

    @classmethod
    def create(cls, count: int) -> "Env":
        env_id = f"{PREFIX}{secrets.token_hex(4)}"
        make_dir(BENCH_ROOT.parent)
        make_dir(BENCH_ROOT)
        env = cls(env_id, BENCH_ROOT / env_id)
        make_dir(env.root)
        env.record(id=env_id)  # a sweep finds the environment from here on
        make_dir(env.state_dir)
        make_dir(env.volumes)
        env.cloud = Cloud.make(env_id, _free_subnets(2), count)
        env.record(cloud={"networks": [[n.name, n.suffix, str(n.cidr)] for n in env.cloud.networks],
                          "vms": [[v.name, v.network, v.ip, v.volume] for v in env.cloud.vms]})
        drivers = {"Tenant": "memory", "Bucket": "memory", "Network": "netlink", "Router": "netlink",
                   "SecurityGroup": "netlink", "Image": "libvirt", "Instance": "libvirt", "Volume": "storage"}
        env.host_config.write_text(json.dumps({  # JSON is YAML
            "stateDir": str(env.state_dir),
            "drivers": drivers,
            "libvirt": {"uri": URI, "domainType": "qemu", "shutdownTimeoutSeconds": SHUTDOWN_TIMEOUT_S},
            "netlink": {"uplinks": {}, "vxlanPeers": []},
            "volumeBackends": {"local": {"driver": "file", "path": str(env.volumes), "default": True}},
        }, indent=2) + "\n")
        make_dir(env.manifests)
        (env.manifests / "cloud.yaml").write_text(yaml.safe_dump_all(env.cloud.manifests(), sort_keys=False))
        # kcli: its own HOME (config, last-vm file), a dir pool named like the environment
        make_dir(env.kcli_home / ".kcli")
        make_dir(env.kcli_pool)
        (env.kcli_home / ".kcli" / "config.yml").write_text(yaml.safe_dump({
            "default": {"client": "local"},
            "local": {"type": "kvm", "host": "127.0.0.1", "pool": env_id},
        }, sort_keys=False))
        env.plan_file.write_text(yaml.safe_dump(env.cloud.kcli_plan(env_id), sort_keys=False))
        took, result = env.kcli("create", "pool", "-p", str(env.kcli_pool), env_id)
        if result.returncode != 0 or env_id not in libvirt_pools():
            raise RuntimeError(f"kcli create pool failed:\n{result.stdout}\n{result.stderr}")
        return env

    def record(self, **info: Any) -> None:
        path = self.root / "env.json"
        data = json.loads(path.read_text()) if path.exists() else {}
        data.update(info)
        path.write_text(json.dumps(data, indent=2) + "\n")

    @property
    def volumes(self) -> Path:
        return self.root / "volumes"

    @property
    def kcli_dir(self) -> Path:
        return self.root / "kcli"

    @property
    def kcli_home(self) -> Path:
        return self.kcli_dir / "home"

    @property
    def kcli_pool(self) -> Path:
        return self.kcli_dir / "pool"

    @property
    def plan_file(self) -> Path:
        return self.kcli_dir / "plan.yml"

    def kcli(self, *args: str, timeout: float = 1800) -> tuple[float, subprocess.CompletedProcess[str]]:
        """(wall seconds, result) of one whole kcli process, with this environment's HOME."""
        env = {**ENV, "HOME": str(self.kcli_home), "NO_COLOR": "1", "TERM": "dumb"}
        started = time.perf_counter()
        result = subprocess.run([str(KCLI), *args], capture_output=True, text=True, env=env, cwd=self.kcli_dir,
                                stdin=subprocess.DEVNULL, timeout=timeout)
        return time.perf_counter() - started, result

    def rcli(self, *args: str) -> tuple[float, subprocess.CompletedProcess[str]]:
        return timed_cli(self.host_config, *args, check=True)

    # what each tool has on the host ------------------------------------------------------------

    def domains(self, tool: str) -> list[str]:
        c = self.cloud
        return [c.domain(v) if tool == "reconciler" else c.kcli_vm(v) for v in c.vms]

    def left_reconciler(self, quick: bool = False) -> list[str]:
        """What of reconciler's realisation of the cloud is on the host."""
        c = self.cloud
        found = [f"domain {n}" for n in sorted(domain_names() & set(self.domains("reconciler")))]
        found += [f"volume file {p.name}" for p in self.volumes.iterdir()]
        lv = self.state_dir / "libvirt"
        for sub in ("instances", "images"):
            if (lv / sub).exists():
                found += [f"{sub[:-1]} file {p.name}" for p in (lv / sub).iterdir()]
        if quick:
            return found
        home = home_of(self.state_dir)
        found += [f"domain {n} titled {t!r}" for n, t in domain_titles().items()
                  if t.startswith(c.id + "/") and n not in set(self.domains("reconciler"))]
        hashes = {c.bridge(n)[3:] for n in c.networks}
        for entry in json.loads(run("ip", "-j", "link", "show").stdout or "[]"):
            name, alias = entry["ifname"], entry.get("ifalias") or ""
            if f"home={home}" in alias or (name[:3] in ("rc-", "rv-", "rl-") and name[3:] in hashes):
                found.append(f"link {name}")
        for entry in json.loads(run("ip", "-j", "netns", "list").stdout or "[]"):
            if entry["name"].startswith("rc-dhcp-") and entry["name"][8:] in hashes:
                found.append(f"namespace {entry['name']}")
        for obj in json.loads(run("nft", "-j", "list", "tables").stdout)["nftables"]:
            table = obj.get("table")
            if table and table["name"] == f"reconciler_{home}":
                found.append(f"nft table {table['family']} {table['name']}")
        found += [f"process {pid} {cmd[:60]}" for pid, cmd in processes_mentioning(str(self.state_dir)).items()]
        return found

    def left_kcli(self, quick: bool = False) -> list[str]:
        """What of kcli's realisation of the cloud is on the host (the pool itself stays)."""
        c = self.cloud
        found = [f"domain {n}" for n in sorted(domain_names() & set(self.domains("kcli")))]
        found += [f"disk file {p.name}" for p in self.kcli_pool.iterdir()]
        if quick:
            return found
        found += [f"libvirt network {n}" for n in sorted(libvirt_networks()) if n.startswith(c.id)]
        found += [f"link {n}" for n in (c.kcli_network(net) for net in c.networks) if Path("/sys/class/net", n).exists()]
        found += [f"libvirt dnsmasq {pid}" for pid in processes_mentioning(f"{LIBVIRT_DNSMASQ}/{c.id}")]
        found += [f"libvirt dnsmasq file {p.name}" for p in LIBVIRT_DNSMASQ.glob(f"{c.id}*")] \
            if LIBVIRT_DNSMASQ.exists() else []
        return found

    def left(self, tool: str, quick: bool = False) -> list[str]:
        return self.left_reconciler(quick) if tool == "reconciler" else self.left_kcli(quick)

    def qemu_pids(self, tool: str) -> list[int]:
        pids = []
        for name in self.domains(tool):
            try:
                pids.append(int(Path(f"/run/libvirt/qemu/{name}.pid").read_text().strip()))
            except (OSError, ValueError):
                pass
        return pids

    def consoles_ready(self) -> int:
        """How many of reconciler's guests have printed their `ready` marker."""
        ready = 0
        for name in self.domains("reconciler"):
            try:
                text = (self.state_dir / "libvirt" / "instances" / name / "console.log").read_text(errors="replace")
            except OSError:
                continue
            ready += "reconciler-guest: ready" in text
        return ready


# --- sweeping --------------------------------------------------------------------------------------


def _remove_domain(name: str) -> None:
    virsh("destroy", name, check=False)
    if virsh("undefine", "--nvram", name, check=False).returncode != 0:
        virsh("undefine", name, check=False)


def iptables_mentions(text: str) -> list[str]:
    """iptables/ip6tables rules (any table) naming `text` (a bridge of ours)."""
    found = []
    for tool in ("iptables-save", "ip6tables-save"):
        if shutil.which(tool) or Path("/usr/sbin", tool).exists():
            out = run(tool, check=False).stdout
            found += [f"{tool}: {line}" for line in out.splitlines() if text in line]
    return found


#: what libvirt left in its run dir after an undefined network, removed by this run
LITTER_REMOVED: list[str] = []


def libvirt_litter(prefix: str) -> list[Path]:
    """What libvirt 9.0 leaves in /run/libvirt/network after destroying and undefining a
    network: its dnsmasq's pid file (the process gone) and an empty `NAME/ports` folder.
    Only for networks named `prefix...` that libvirt no longer knows."""
    if not LIBVIRT_NETWORK_RUN.exists():
        return []
    known = libvirt_networks()
    found = []
    for p in sorted(LIBVIRT_NETWORK_RUN.glob(f"{prefix}*")):
        name = p.name.removesuffix(".pid")
        if name in known:
            continue
        if p.is_dir():
            if not any(files for _, _, files in os.walk(p)):
                found.append(p)
        elif p.name.endswith(".pid"):
            try:
                pid = int(p.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid <= 0 or "dnsmasq" not in processes_mentioning("dnsmasq").get(pid, ""):
                found.append(p)
    return found


def remove_libvirt_litter(prefix: str) -> None:
    for p in libvirt_litter(prefix):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        LITTER_REMOVED.append(p.name)


def sweep_root(root: Path) -> list[str]:
    """Remove everything of one environment (by its id: domains, libvirt networks, the
    pool, bridges, namespaces, dnsmasq processes, nftables table), then its folder."""
    env_id = root.name
    state = root / "state"
    home = home_of(state)
    problems: list[str] = []
    info = json.loads((root / "env.json").read_text()) if (root / "env.json").exists() else {}
    mine = [n for n, t in domain_titles().items() if t.startswith(env_id + "/") or n.startswith(env_id + "-")]
    for name in mine:
        _remove_domain(name)
    for net in sorted(libvirt_networks()):
        if net.startswith(env_id):
            virsh("net-destroy", net, check=False)
            virsh("net-undefine", net, check=False)
    if env_id in libvirt_pools():
        virsh("pool-destroy", env_id, check=False)
        virsh("pool-undefine", env_id, check=False)
    remove_libvirt_litter(env_id)
    vms = [v[0] for v in info.get("cloud", {}).get("vms", [])]
    defined = domain_names()
    for name in [host_name(Key("Instance", env_id, v)) for v in vms] + [f"{env_id}-{v}" for v in vms]:
        if name not in defined:  # libvirt's log of the (gone) domain
            (LIBVIRT_QEMU_LOGS / f"{name}.log").unlink(missing_ok=True)
    hashes = {host_name(Key("Network", env_id, n[0]))[3:] for n in info.get("cloud", {}).get("networks", [])}
    left: list[tuple[str, str]] = []
    for entry in json.loads(run("ip", "-j", "link", "show").stdout or "[]"):
        name, alias = entry["ifname"], entry.get("ifalias") or ""
        if f"home={home}" in alias or name.startswith(env_id) or (name[:3] in ("rc-", "rv-") and name[3:] in hashes):
            left.append(("link", name))
    for entry in json.loads(run("ip", "-j", "netns", "list").stdout or "[]"):
        if entry["name"].startswith("rc-dhcp-") and entry["name"][8:] in hashes:
            left.append(("namespace", entry["name"]))
    for obj in json.loads(run("nft", "-j", "list", "tables").stdout)["nftables"]:
        table = obj.get("table")
        if table and table["name"] == f"reconciler_{home}":
            left.append(("nft table", f"{table['family']} {table['name']}"))
    for pid, cmd in processes_mentioning(str(root)).items():
        if pid != os.getpid() and "dnsmasq" in cmd:
            left.append(("process", f"{pid} {cmd[:60]}"))
    remove_host_objects(left)
    time.sleep(0.5 if left else 0)
    if any(n.startswith(env_id) for n in libvirt_networks()) or env_id in libvirt_pools():
        problems.append(f"libvirt network or pool of {env_id} still defined")
    if any(t.startswith(env_id + "/") or n.startswith(env_id + "-") for n, t in domain_titles().items()):
        problems.append(f"domains of {env_id} still defined")
    shutil.rmtree(root, ignore_errors=True)
    return problems


def sweep_all() -> list[str]:
    """Everything an interrupted run of this command left: rcbk* environments only."""
    problems: list[str] = []
    if BENCH_ROOT.exists():
        for root in sorted(BENCH_ROOT.glob(f"{PREFIX}*")):
            if root.is_dir():
                log(f"removing leftovers of {root.name}")
                problems += sweep_root(root)
    stray = [n for n in domain_names() if n.startswith(PREFIX)]
    stray += [n for n, t in domain_titles().items() if t.startswith(PREFIX) and n not in stray]
    for name in stray:
        _remove_domain(name)
    for net in sorted(libvirt_networks()):
        if net.startswith(PREFIX):
            virsh("net-destroy", net, check=False)
            virsh("net-undefine", net, check=False)
    for pool in sorted(libvirt_pools()):
        if pool.startswith(PREFIX):
            virsh("pool-destroy", pool, check=False)
            virsh("pool-undefine", pool, check=False)
    remove_libvirt_litter(PREFIX)
    for log_file in LIBVIRT_QEMU_LOGS.glob(f"{PREFIX}*.log") if LIBVIRT_QEMU_LOGS.exists() else []:
        if log_file.name.removesuffix(".log") not in domain_names():
            log_file.unlink(missing_ok=True)
    return problems


def final_check() -> list[str]:
    """Anything with this benchmark's prefix still on the host (after sweep_all)."""
    found = [f"domain {n}" for n in domain_names() if n.startswith(PREFIX)]
    found += [f"domain {n} titled {t!r}" for n, t in domain_titles().items() if t.startswith(PREFIX)]
    found += [f"libvirt network {n}" for n in libvirt_networks() if n.startswith(PREFIX)]
    found += [f"libvirt pool {n}" for n in libvirt_pools() if n.startswith(PREFIX)]
    found += [f"link {e['ifname']}" for e in json.loads(run("ip", "-j", "link", "show").stdout or "[]")
              if e["ifname"].startswith(PREFIX)]
    found += iptables_mentions(PREFIX)
    found += [f"process {pid} {cmd[:60]}" for pid, cmd in processes_mentioning(f"/{PREFIX}").items()
              if pid != os.getpid() and "benchmarks.kcli" not in cmd]
    if BENCH_ROOT.exists():
        found += [f"folder {p}" for p in BENCH_ROOT.glob(f"{PREFIX}*")]
    for folder in (LIBVIRT_DNSMASQ, Path("/etc/libvirt/qemu/networks"), Path("/etc/libvirt/storage"),
                   Path("/etc/libvirt/qemu"), LIBVIRT_NETWORK_RUN, Path("/run/libvirt/qemu"), LIBVIRT_QEMU_LOGS):
        if folder.exists():
            found += [f"file {p}" for p in folder.glob(f"{PREFIX}*")]
    return found


# --- interference ------------------------------------------------------------------------------


WATCH = Interference("benchmarks.kcli", f"/{PREFIX}")


@dataclass
class Seen:
    """Foreign running domains and other work during one cycle (besides WATCH's sets)."""

    foreign_domains: int = 0
    load: list[float] = field(default_factory=list)

    def sample(self, ours: set[str]) -> None:
        try:
            running = domain_names(running_only=True)
        except (RuntimeError, subprocess.TimeoutExpired):
            running = set()
        self.foreign_domains = max(self.foreign_domains, len({n for n in running - ours if not n.startswith(PREFIX)}))
        self.load.append(os.getloadavg()[0])
        WATCH.sample()


def wait_for_quiet(limit_s: float) -> float:
    """Wait (up to `limit_s`) until no other domain runs and no test run or other benchmark
    is going on; the seconds waited. The repeat runs either way; the notes say what ran."""
    started = time.perf_counter()
    said = False
    while time.perf_counter() - started < limit_s:
        probe = Interference("benchmarks.kcli", f"/{PREFIX}")
        probe.sample()
        running = {n for n in domain_names(running_only=True) if not n.startswith(PREFIX)}
        if not running and not probe.others:
            break
        if not said:
            log(f"  waiting (up to {limit_s:.0f} s) for other work to finish: {len(running)} domain(s), "
                f"{sorted(probe.others)}")
            said = True
        time.sleep(2)
    return time.perf_counter() - started


# --- the measurements ---------------------------------------------------------------------------


def wait_running(names: Sequence[str], t0: float, timeout: float = RUNNING_TIMEOUT_S) -> float:
    """Seconds from `t0` until every domain in `names` is running (`virsh list`)."""
    want = set(names)
    deadline = time.perf_counter() + timeout
    while True:
        running = domain_names(running_only=True)
        if want <= running:
            return time.perf_counter() - t0
        if time.perf_counter() > deadline:
            states = {n: virsh("domstate", n, check=False).stdout.strip() or "undefined" for n in sorted(want - running)}
            raise RuntimeError(f"not running after {timeout:.0f} s: {states}")
        time.sleep(0.05)


def wait_gone(env: Env, tool: str, t0: float, timeout: float = GONE_TIMEOUT_S) -> float:
    """Seconds from `t0` until nothing of `tool`'s realisation is left: first the quick
    check (domains, disk files) polled, then the full one (links, networks, processes...)."""
    deadline = time.perf_counter() + timeout
    while True:
        if not env.left(tool, quick=True):
            at = time.perf_counter() - t0
            left = env.left(tool)
            if not left:
                return at
        else:
            left = None
        if time.perf_counter() > deadline:
            raise RuntimeError(f"{tool}: after teardown, left: {left or env.left(tool)}")
        time.sleep(0.05)


def settle(env: Env, tool: str, t0: float) -> dict[str, Any]:
    """Wait until the guests have booted and gone idle: their QEMU processes together use
    under SETTLE_CORES of a core over SETTLE_WINDOW_S (and, for reconciler's guests, whose
    consoles are files, every console says `ready`). Both tools' guests get the same wait."""
    tick = os.sysconf("SC_CLK_TCK")
    deadline = time.perf_counter() + SETTLE_TIMEOUT_S

    def cpu(pids: Sequence[int]) -> float:
        total = 0
        for pid in pids:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
            except (OSError, IndexError, ValueError):
                pass
        return total / tick

    cores = None
    while time.perf_counter() < deadline:
        pids = env.qemu_pids(tool)
        a, ta = cpu(pids), time.perf_counter()
        time.sleep(SETTLE_WINDOW_S)
        cores = (cpu(pids) - a) / (time.perf_counter() - ta)
        ready = env.consoles_ready() if tool == "reconciler" else len(pids)
        if cores < SETTLE_CORES and ready == len(env.cloud.vms):
            return {"settled": time.perf_counter() - t0, "cores": cores}
    return {"settled": None, "cores": cores}


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _kcli_ok(result: subprocess.CompletedProcess[str], what: str, deployed: int = 0) -> list[str]:
    """Raise unless kcli exited 0 without a traceback or an error (red) line and, for a
    create, deployed `deployed` VMs; its warnings (yellow), without colours."""
    text = result.stdout + result.stderr
    errors = [ANSI.sub("", line) for line in text.splitlines() if "\x1b[31m" in line or "Traceback" in line]
    done = ANSI.sub("", text).count(" deployed on ")
    if result.returncode != 0 or errors or done < deployed:
        raise RuntimeError(f"kcli {what} exited {result.returncode}, deployed {done} VMs: {errors[:5]}\n"
                           f"{ANSI.sub('', text)[-3000:]}")
    return [ANSI.sub("", line).strip() for line in text.splitlines() if "\x1b[33m" in line]


def nft_objects(home: str) -> dict[str, int]:
    """Chains and rules in the netlink driver's nftables table(s) of installation `home`."""
    chains = rules = 0
    for obj in json.loads(run("nft", "-j", "list", "tables").stdout)["nftables"]:
        table = obj.get("table")
        if table and table["name"] == f"reconciler_{home}":
            listing = json.loads(run("nft", "-j", "list", "table", table["family"], table["name"]).stdout)
            chains += sum(1 for o in listing["nftables"] if "chain" in o)
            rules += sum(1 for o in listing["nftables"] if "rule" in o)
    return {"nft_chains": chains, "nft_rules": rules}


def cycle_reconciler(env: Env, seen: Seen) -> dict[str, Any]:
    manifests = str(env.manifests)
    ours = set(env.domains("reconciler"))
    seen.sample(ours)
    t0 = time.perf_counter()
    apply_s, _ = env.rcli("apply", manifests, "--yes", "--parallelism", "8")
    running_s = wait_running(env.domains("reconciler"), t0)
    files = list(env.volumes.glob("*.qcow2"))  # and a .json ownership sidecar each
    if len(files) != len(env.cloud.vms):
        raise RuntimeError(f"after apply, {len(files)} volume files, not {len(env.cloud.vms)}")
    disks = virsh("domblklist", env.domains("reconciler")[0]).stdout
    if str(env.volumes) not in disks:
        raise RuntimeError(f"the volume is not attached to the domain:\n{disks}")
    firewall = nft_objects(home_of(env.state_dir))
    seen.sample(ours)
    st = settle(env, "reconciler", t0)
    seen.sample(ours)
    plan_s, result = timed_cli(env.host_config, "plan", "--detailed-exitcode", manifests)
    if result.returncode != 0:
        raise RuntimeError(f"the plan after apply is not empty (exit {result.returncode}):\n{result.stdout[-3000:]}"
                           f"\n{result.stderr[-2000:]}")
    startup_s, _ = env.rcli("version")
    noop_s, result = env.rcli("apply", manifests, "--yes", "--parallelism", "8")
    if "No changes" not in result.stdout:
        raise RuntimeError(f"the re-run of apply changed something:\n{result.stdout[-3000:]}")
    seen.sample(ours)
    t1 = time.perf_counter()
    destroy_s, _ = env.rcli("destroy", manifests, "--yes", "--parallelism", "8")
    gone_s = wait_gone(env, "reconciler", t1)
    seen.sample(ours)
    return {"apply": apply_s, "running": running_s, **st, "noop": noop_s, "plan": plan_s, "startup": startup_s,
            "teardown_cmd": destroy_s, "teardown": gone_s, **firewall}


def cycle_kcli(env: Env, seen: Seen, threaded: bool) -> dict[str, Any]:
    """kcli's cycle. With `threaded` (`-t`) only the apply is measured: `-t` changes nothing
    in the skip path of a re-run (existing VMs are skipped before any thread starts) and
    `kcli delete plan` has no threaded mode, so those are the sequential cycle's figures;
    the plan is then deleted untimed, at once."""
    plan = env.id
    create = ["create", "plan", "-f", str(env.plan_file)] + (["-t"] if threaded else []) + [plan]
    ours = set(env.domains("kcli"))
    seen.sample(ours)
    t0 = time.perf_counter()
    apply_s, result = env.kcli(*create)
    warnings = _kcli_ok(result, " ".join(create[:2]), deployed=len(env.cloud.vms))
    running_s = wait_running(env.domains("kcli"), t0)
    files = list(env.kcli_pool.glob("*"))
    if len(files) != 2 * len(env.cloud.vms):
        raise RuntimeError(f"after kcli create plan, {len(files)} disk files, not {2 * len(env.cloud.vms)}")
    seen.sample(ours)
    out: dict[str, Any] = {"apply": apply_s, "running": running_s,
                           "pool_busy_warnings": sum("asynchronous jobs running" in w for w in warnings)}
    if not threaded:
        out.update(settle(env, "kcli", t0))
        seen.sample(ours)
        noop_s, result = env.kcli(*create)
        _kcli_ok(result, "create plan (again)")
        skipped = result.stdout.count("skipped")
        if skipped != len(env.cloud.vms) + len(env.cloud.networks) or "deployed" in result.stdout:
            raise RuntimeError(f"the re-run of kcli create plan did not skip everything:\n{result.stdout[-3000:]}")
        out["noop"] = noop_s
        seen.sample(ours)
    t1 = time.perf_counter()
    delete_s, result = env.kcli("delete", "plan", "--yes", plan)
    _kcli_ok(result, "delete plan")
    gone_s = wait_gone(env, "kcli", t1)
    seen.sample(ours)
    if not threaded:
        out.update(teardown_cmd=delete_s, teardown=gone_s)
    return out


def run_repeat(index: int, count: int, results: dict[str, list[dict[str, Any]]],
               failures: list[dict[str, Any]]) -> None:
    order = TOOLS[index % len(TOOLS):] + TOOLS[:index % len(TOOLS)]
    env = Env.create(count)
    try:
        log(f"repeat {index + 1}: environment {env.id} ({', '.join(str(n.cidr) for n in env.cloud.networks)}); "
            f"order {', '.join(order)}")
        for tool in order:
            seen = Seen()
            for attempt in (1, 2):
                try:
                    if tool == "reconciler":
                        r = cycle_reconciler(env, seen)
                    else:
                        r = cycle_kcli(env, seen, threaded=(tool == "kcli-t"))
                    break
                except RuntimeError as exc:
                    log(f"  {tool} FAILED (attempt {attempt}): {str(exc)[:2000]}")
                    failures.append({"tool": tool, "repeat": index + 1, "attempt": attempt,
                                     "error": str(exc).splitlines()[0][:300]})
                    _clear(env, tool)
                    if attempt == 2:
                        raise
            r.update(order=order.index(tool) + 1, foreign_domains=seen.foreign_domains,
                     load=[round(x, 2) for x in seen.load])
            results[tool].append(r)
            log(f"  {tool}: apply {fmt_s(r['apply'])}, all running {fmt_s(r['running'])}"
                + (f", settled {fmt_s(r.get('settled'))}; no-op {fmt_s(r['noop'])}" if "noop" in r else "")
                + (f" (plan {fmt_s(r['plan'])}, version {fmt_s(r['startup'])})" if "plan" in r else "")
                + (f"; teardown {fmt_s(r['teardown_cmd'])}, all gone {fmt_s(r['teardown'])}" if "teardown" in r else ""))
    finally:
        problems = sweep_root(env.root)
        if problems:
            raise RuntimeError("cleanup failed: " + "; ".join(problems))


def _clear(env: Env, tool: str) -> None:
    """After a failed cycle: remove what that tool left, so the next attempt starts clean."""
    if tool == "reconciler":
        timed_cli(env.host_config, "destroy", str(env.manifests), "--yes")
    else:
        env.kcli("delete", "plan", "--yes", env.id)
    for name in env.domains(tool):
        if name in domain_names():
            _remove_domain(name)
    if tool != "reconciler":
        for net in libvirt_networks():
            if net.startswith(env.id):
                virsh("net-destroy", net, check=False)
                virsh("net-undefine", net, check=False)
        for p in env.kcli_pool.iterdir():
            p.unlink(missing_ok=True)


# --- installing kcli ------------------------------------------------------------------------------


def ensure_kcli() -> dict[str, Any]:
    """kcli in its own virtualenv; installed when missing. What was done, and the versions."""
    info: dict[str, Any] = {"installed_now": False}
    probe = [str(KCLI_VENV / "bin" / "python"), "-c",
             "import importlib.metadata as m; print(m.version('kcli'), m.version('libvirt-python'))"]
    if not KCLI.exists() or run(*probe, check=False).returncode != 0:
        log(f"installing kcli into {KCLI_VENV} (python -m venv, pip install kcli)...")
        make_dir(BENCH_ROOT.parent)
        make_dir(BENCH_ROOT)
        started = time.perf_counter()
        shutil.rmtree(KCLI_VENV, ignore_errors=True)
        run(sys.executable, "-m", "venv", str(KCLI_VENV))
        result = run(str(KCLI_VENV / "bin" / "pip"), "install", "--quiet", "kcli", check=False, timeout=1200)
        if result.returncode != 0:
            raise SystemExit("cannot install kcli (pip install kcli into a virtualenv failed; its libvirt-python "
                             "needs libvirt-dev and pkg-config to build, which `make setup` installs):\n"
                             + (result.stdout + result.stderr)[-3000:])
        info.update(installed_now=True, install_s=time.perf_counter() - started)
    kcli_version, pyvirt = run(*probe).stdout.split()
    info.update(kcli=kcli_version, libvirt_python=pyvirt)
    return info


# --- the report ---------------------------------------------------------------------------------------


def machine(kcli: Mapping[str, Any]) -> dict[str, str]:
    from benchmarks.instances import machine as instances_machine

    info = instances_machine()
    size = IMAGE.stat().st_size if IMAGE.exists() else 0
    info["guest"] = (f"`{IMAGE}` ({size / 1024 / 1024:.0f} MiB qcow2, built by scripts/build-test-image.sh), "
                     f"{MEMORY_MIB} MiB, {VCPUS} vCPU, {ROOT_GIB} GiB root overlay, a {DISK_GIB} GiB qcow2 data disk")
    how = ("installed by this run" if kcli.get("installed_now") else "found installed")
    info["kcli"] = (f"kcli {kcli['kcli']} (PyPI) with libvirt-python {kcli['libvirt_python']}, in its own "
                    f"virtualenv `{KCLI_VENV}` ({how}; `python -m venv` + `pip install kcli`)")
    return info


def report(results: Mapping[str, list[dict[str, Any]]], repeat: int, count: int, command: str,
           kcli: Mapping[str, Any], failures: Sequence[dict[str, Any]], wall_s: float,
           leftovers: Sequence[str]) -> str:
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    rc, ks, kt = results["reconciler"], results["kcli"], results["kcli-t"]
    half = count // 2

    def med(rows: Sequence[dict[str, Any]], key: str) -> float | None:
        values = [r[key] for r in rows if r.get(key) is not None]
        return statistics.median(values) if values else None

    def cell(rows: Sequence[dict[str, Any]], key: str) -> str:
        values = [r[key] for r in rows if r.get(key) is not None]
        if not values:
            return "–"
        return f"{fmt_s(statistics.median(values))} ({fmt_s(min(values))}–{fmt_s(max(values))})"

    def ratio(a: float | None, b: float | None) -> str:
        return f"{a / b:.2f}x" if a is not None and b else "–"

    def row(label: str, rkey: str, kkey: str) -> str:
        return (f"| {label} | {cell(rc, rkey)} | {cell(ks, kkey)} | {cell(kt, kkey)} | "
                f"{ratio(med(rc, rkey), med(ks, kkey))} | {ratio(med(rc, rkey), med(kt, kkey))} |")

    lines = [
        BEGIN,
        "## Side by side with kcli (same workload, same run)",
        "",
        "Generated by `benchmarks/kcli.py`; a measurement, never a test. It rewrites only the part of "
        "this file between its markers.",
        "",
        "### How to reproduce",
        "",
        "From the project root, as root, with libvirtd running, the network tools and the test guest "
        "(`make services`); kcli is installed by the command itself if missing (below):",
        "",
        *_section.reproduce(command, now, machine(kcli)),
        "",
        "### The workload, once, for both",
        "",
        "One cloud description (Python data in `benchmarks/kcli.py`) gives both inputs, so the two "
        "tools get the same guests, networks, addresses and disks:",
        "",
        f"- **{count} guests** of the test image, {MEMORY_MIB} MiB, {VCPUS} vCPU, a {ROOT_GIB} GiB "
        f"qcow2 root overlay on the image and a {DISK_GIB} GiB qcow2 data disk each, {half} on each of "
        "**2 networks** with DHCP, each guest with a fixed address reserved in its network's DHCP server.",
        f"- **reconciler**: a tenant `{PREFIX}<hex>`, an Image (the test guest), 2 `flat` Networks (no "
        f"uplink: a bridge each, a DHCP namespace and dnsmasq), {count} Volumes (`deletionPolicy: Delete`, "
        f"the storage driver's file backend in the environment's folder) and {count} Instances "
        "(`ip` fixed, the volume attached). Host config of its own: a fresh state dir under "
        f"`{BENCH_ROOT}/{PREFIX}<hex>`, Tenant and Bucket in memory, the rest the real drivers (netlink, "
        f"storage, libvirt with `domainType: qemu`, `shutdownTimeoutSeconds: {SHUTDOWN_TIMEOUT_S}`).",
        f"- **kcli**: a plan file with 2 `type: network` entries (`cidr`, `dhcp: true`, `nat: false`: "
        "isolated libvirt networks; kcli names the bridge after the network, `<id>-a`/`<id>-b`, and "
        f"libvirt runs its dnsmasq for it) and {count} VMs (`numcpus: 1`, `memory: 128`, `image:` the test "
        f"guest by absolute path, `disks: [{ROOT_GIB}, {DISK_GIB}]`, `nets: [{{name, ip, reserveip: true}}]`, "
        "`virttype: qemu`, `cpumodel: qemu64`, `cloudinit: false`, `vnc: false`), in a libvirt dir pool "
        "`<id>` on a folder of the environment; kcli's config isolated with `HOME=<env>/kcli/home` "
        "(`client: local`).",
        "",
        "**Why kcli makes its own networks** rather than `bridge=true` networks pointing at bridges made "
        "beforehand (the host notes' recipe): reconciler's apply creates its bridges and DHCP servers and "
        "its destroy removes them, so the fair counterpart is kcli doing the same, which it can for "
        "libvirt networks: they are created by `kcli create plan` and, carrying the plan's name, deleted by "
        "`kcli delete plan`. A `bridge=true` network is neither (it has no DHCP, is not in the plan's "
        "metadata and survives `delete plan`), so kcli would skip work that reconciler's figures include.",
        "",
        "### What is measured",
        "",
        f"Each repeat makes a fresh environment (`{PREFIX}<hex>`: state dir, kcli HOME and pool, two free "
        f"`{SUBNET_BASE}.X.0/24` subnets) and runs three cycles in it, one after another: reconciler, kcli "
        "sequential, kcli `-t`, the order rotating from repeat to repeat (reconciler first in one, second "
        "in the next...). Every figure is the wall time of whole processes (interpreter start-up "
        "included):",
        "",
        "- **apply from scratch until all running**: from the start of `reconciler apply --yes "
        "--parallelism 8` / `kcli create plan -f plan.yml <id>` / the same with `-t` until every one of the "
        f"{count} domains is `running` in `virsh list` (polled every 50 ms after the command returned; both "
        "tools start the domains before they return).",
        "- then the benchmark waits until the guests have **booted and gone idle** (their QEMU processes "
        f"together under {SETTLE_CORES:g} of a core over {SETTLE_WINDOW_S:g} s; reconciler's consoles also "
        "say `ready`), so that the re-run and the teardown do not compete with ten booting TCG guests.",
        "- **no-op re-run**: the same command again with nothing to do: `reconciler apply --yes` "
        "(observes the host, plans, prints \"No changes\"), and `reconciler plan --detailed-exitcode` "
        "(exit 0); `kcli create plan`, which prints \"skipped\" for each network and VM.",
        "- **teardown until nothing is left**: from the start of `reconciler destroy --yes --parallelism "
        "8` / `kcli delete plan --yes <id>` until none of the domains is in `virsh list --all` and no "
        "disk file is left (reconciler: volume files, instance folders, the registered image; kcli: the "
        "pool's folder), polled every 50 ms; that moment counts once a full check right after it finds no "
        "bridge, libvirt network, DHCP namespace, dnsmasq or nftables table of it either (else the "
        "polling goes on).",
        "- The `-t` cycle measures the apply only, then deletes the plan untimed: `-t` changes nothing in "
        "a re-run (kcli skips existing VMs before it starts any thread) and `kcli delete plan` has no "
        "threaded mode, so its re-run and teardown are the sequential cycle's (hence the dashes).",
        "",
        f"Medians of {repeat} repeats, with the fastest and slowest in brackets. Ratios are reconciler's "
        "median over kcli's: below 1 reconciler is faster.",
        "",
        "### Results",
        "",
        f"| {count} guests with a disk each on 2 networks | reconciler | kcli (sequential) | kcli `-t` "
        "| reconciler / kcli | reconciler / kcli `-t` |",
        "|---|---:|---:|---:|---:|---:|",
        row("apply from scratch, until all domains run", "running", "running"),
        row("… the command alone (until it returned)", "apply", "apply"),
        row("no-op re-run, whole process (`apply --yes` / `create plan`)", "noop", "noop"),
        row("no-op dry run `reconciler plan` / re-run `create plan`", "plan", "noop"),
        row("teardown, until nothing is left (reconciler: ACPI shutdown; kcli: forced off)", "teardown", "teardown"),
        "",
    ]
    lines += _reading(rc, ks, kt, count, med)
    lines += [
        "",
        "### What kcli cannot express, and what differs (not compared)",
        "",
        "- **Volumes as resources of their own**: kcli's extra disk belongs to its VM (created with it, "
        "deleted with it); reconciler's Volume has its own lifecycle (`deletionPolicy: Retain` keeps it "
        "after a destroy, it can be detached, re-attached or grown). Compared here: one 1 GiB qcow2 per "
        "guest, created with the guest and deleted at teardown (`deletionPolicy: Delete`).",
        "- **Security groups and per-port firewalling**: reconciler puts every port (the guest's tap) "
        "under nftables anti-spoofing rules in its own table, even with no security group, as this "
        "workload has; kcli on libvirt has no security groups (its `securitygroups` is for clouds) and "
        "libvirt's isolated network only adds its iptables rules for the bridge. That work is in "
        "reconciler's figures and has no counterpart in kcli's.",
        "- **VXLAN and VLAN networks, routers, SNAT, external networks**: not in this workload "
        "(reconciler's networks here are `flat` without uplink). kcli's libvirt networks are one host's "
        "bridges (NAT, isolated or routed by libvirt); it has no VXLAN segments between hosts and no "
        "router between two networks of a tenant.",
        "- **Tenants** (and their quotas) are a grouping kcli does not have; a kcli plan is the nearest "
        "(here: the plan name is the tenant's). The Tenant is in reconciler's in-memory driver.",
        "- **The image**: reconciler's Image resource registers the image (a checksummed copy into its "
        "state dir) and removes it at destroy; kcli uses the file in place as the backing file (\"Using "
        "image path although it's not in a pool\").",
        "- **The seed**: reconciler writes a NoCloud seed ISO per guest (hostname, network config); with "
        "`cloudinit: false` kcli writes none (its cloud-init ISO needs genisoimage, mkisofs or xorrisofs on the "
        "host, and kcli attaches CD-ROMs on a SATA bus, for which the test guest has no driver), so its "
        "guests get no network configuration. Only \"running\" is compared, not \"answers on the "
        "network\" (for that, see the instances section above).",
        "- **DHCP**: both reserve each guest's fixed address in the network's DHCP server (reconciler: "
        "its dnsmasq per subnet in a namespace; kcli: `reserveip`, a `<host>` in the libvirt network). "
        "libvirt also gives the host the subnet's `.1` on the bridge; reconciler's bridges have no host "
        "address.",
        "- **The teardown is not the same act**: reconciler shuts each guest down gracefully (ACPI power "
        f"button, pressed every 2 s, forced off after {SHUTDOWN_TIMEOUT_S} s) before undefining it; kcli "
        "pulls the plug (`virsh destroy`) and deletes, one VM after another (it has no threaded delete).",
        "- **No-op**: reconciler's re-run observes every host object of the cloud (domains, volumes, "
        "bridges, DHCP, nftables) and compares it to the manifests, so it would also repair drift; kcli's "
        "re-run checks that each VM and network exists by name and skips it (it remediates only some "
        "properties: memory, CPUs, disks, NICs).",
        "",
        "For the planning cost of reconciler alone see [1,000 and 10,000 resources](#1000-resources) "
        "(the planner) and the instances, networks and volumes sections above (observe and plan on the "
        "real drivers).",
        "",
        "### Notes",
        "",
    ]
    lines += _notes(results, failures, kcli, wall_s, repeat, leftovers)
    lines += ["", END]
    return "\n".join(lines) + "\n"


def _reading(rc: Sequence[dict[str, Any]], ks: Sequence[dict[str, Any]], kt: Sequence[dict[str, Any]], count: int,
             med: Callable[[Sequence[dict[str, Any]], str], float | None]) -> list[str]:
    r_run, k_run, t_run = med(rc, "running"), med(ks, "running"), med(kt, "running")
    r_down, k_down = med(rc, "teardown"), med(ks, "teardown")
    r_noop, r_plan, r_start, k_noop = med(rc, "noop"), med(rc, "plan"), med(rc, "startup"), med(ks, "noop")
    out = []
    if None not in (r_run, k_run, t_run):
        best = min(k_run, t_run)
        out.append(f"Apply from scratch: reconciler {fmt_s(r_run)} against kcli {fmt_s(k_run)} sequential and "
                   f"{fmt_s(t_run)} threaded ({r_run / best:.2f}x kcli's faster way); reconciler's includes "
                   f"registering the image (a copy), writing {count} seed ISOs and the per-port nftables "
                   "rules, which kcli does not do (below).")
    if None not in (r_noop, k_noop, r_start):
        out.append(f"A re-run with nothing to do: {fmt_s(r_noop)} for `reconciler apply` (`plan`: {fmt_s(r_plan)}) "
                   f"against {fmt_s(k_noop)} for `kcli create plan`; of reconciler's, {fmt_s(r_start)} is starting "
                   "the interpreter and the CLI (`reconciler version`, measured in the same cycles), the rest "
                   f"loading the manifests and observing every host object of the cloud.")
    if None not in (r_down, k_down):
        out.append(f"Teardown: {fmt_s(r_down)} against {fmt_s(k_down)} ({r_down / k_down:.2f}x): kcli deletes one "
                   f"VM after another, about {k_down / count:.1f} s each, most of it the forced stop (host "
                   "notes: a killed QEMU is reaped by PID 1 only every ~1.4 s); reconciler works on eight at "
                   "once and shuts each guest down gracefully.")
    return [" ".join(out)] if out else []


def _notes(results: Mapping[str, list[dict[str, Any]]], failures: Sequence[dict[str, Any]],
           kcli: Mapping[str, Any], wall_s: float, repeat: int, leftovers: Sequence[str]) -> list[str]:
    notes = []
    settled = {t: [r["settled"] for r in rows if r.get("settled") is not None] for t, rows in results.items()}
    unsettled = sum(1 for rows in results.values() for r in rows if "settled" in r and r["settled"] is None)
    notes.append("- Booted and idle, from the start of the apply (the wait before the re-run; not compared): "
                 + ", ".join(
                     f"{LABEL[t]} {fmt_s(statistics.median(v))}" for t, v in settled.items() if v)
                 + (f"; {unsettled} cycle(s) did not settle within {SETTLE_TIMEOUT_S:.0f} s and went on "
                    "anyway" if unsettled else "")
                 + ". kcli's guests take longer because they have no seed: the test guest's init then probes "
                 "every block device for a `cidata` volume 100 times before it goes on, which under TCG with "
                 "ten guests on two cores takes about a minute of CPU-bound work.")
    fw = [(r["nft_chains"], r["nft_rules"]) for r in results["reconciler"] if r.get("nft_chains") is not None]
    if fw:
        notes.append(f"- After reconciler's apply its nftables table held {fw[0][0]} chains and {fw[0][1]} rules "
                     "(anti-spoofing and port chains of the guests' taps, no security group); kcli's libvirt "
                     "networks add iptables rules for DHCP, DNS and forwarding on their bridges only.")
    busy = [r.get("pool_busy_warnings", 0) for r in results["kcli-t"]]
    if any(busy):
        notes.append(f"- `kcli create plan -t` printed \"pool ... has asynchronous jobs running\" warnings "
                     f"({', '.join(str(b) for b in busy)} per run): its threads refresh the pool at once while "
                     "looking the image up there; with the image given by absolute path kcli then uses the file "
                     "directly, and every VM was deployed (checked), so these runs count.")
    for f in failures:
        notes.append(f"- A {LABEL[f['tool']]} cycle of repeat {f['repeat']} failed (attempt {f['attempt']}) "
                     f"and was run again after a cleanup: {f['error']}")
    foreign = [(t, i + 1, r["foreign_domains"]) for t, rows in results.items() for i, r in enumerate(rows)
               if r.get("foreign_domains")]
    loads = [x for rows in results.values() for r in rows for x in r.get("load", [])]
    if foreign or WATCH.others:
        what = [f"{n} other running domain(s) during {LABEL[t]} in repeat {i}" for t, i, n in foreign]
        what += sorted(WATCH.others)
        notes.append("- Interference observed: " + "; ".join(what) + ". It competes for the two cores; the "
                     "min figures are the least disturbed runs.")
    else:
        notes.append("- No other running domains, test runs or other benchmarks were seen during the run.")
    if loads:
        notes.append(f"- 1-minute load average seen: {min(loads):.1f} to {max(loads):.1f} (mostly the "
                     "benchmark's own guests).")
    install = (f"kcli was installed by this run in {kcli['install_s']:.0f} s" if kcli.get("installed_now")
               else "kcli was already installed in its virtualenv")
    notes.append(f"- {install}: the project's interpreter (Python {platform.python_version()}), "
                 "`python -m venv` (no system site packages) and `pip install kcli`, which "
                 "pulls libvirt-python from PyPI (built against libvirt-dev with pkg-config when pip has "
                 "no wheel of it cached). `--system-site-packages` is not needed: Debian's python3-libvirt "
                 "is for the system Python, not this one.")
    notes.append("- libvirt's network driver creates its `LIBVIRT_*` iptables chains (filter, nat, mangle; "
                 "IPv4 and IPv6) the first time libvirtd starts any network, once per libvirtd process, and "
                 "never removes them. After the run they are empty (the check below finds no rule naming a "
                 "bridge of the benchmark); removing them would break libvirt's networks until libvirtd "
                 "restarts, so they stay.")
    if LITTER_REMOVED:
        nets = sorted({n.removesuffix(".pid") for n in LITTER_REMOVED})
        notes.append(f"- libvirt 9.0 leaves, for each network it destroyed and undefined, the pid file of the "
                     f"network's (exited) dnsmasq and an empty `NAME/ports` folder in `{LIBVIRT_NETWORK_RUN}`; "
                     f"the benchmark removed those of its kcli networks ({len(nets)} network names) after checking "
                     "that libvirt no longer knows the network and that the process is gone.")
    tail = ("nothing with the prefix was left on the host (domains, libvirt networks and pools, links, "
            "iptables rules, processes, libvirt's dnsmasq and config files, folders)" if not leftovers
            else "LEFT on the host: " + "; ".join(leftovers[:20]))
    notes.append(f"- Whole run: {wall_s / 60:.1f} min for {repeat} repeats. At the end, {tail}. The kcli "
                 f"virtualenv `{KCLI_VENV}` is kept for the next run.")
    return notes


def write_section(path: Path, section: str) -> None:
    _section.write_section(path, section, BEGIN, END)


def preflight() -> None:
    reasons = []
    if os.geteuid() != 0:
        reasons.append("needs root (bridges, libvirt system domains and networks)")
    if shutil.which("virsh") is None or virsh("version", check=False).returncode != 0:
        reasons.append(f"libvirtd does not answer at {URI}: run scripts/setup-libvirt.sh")
    if not IMAGE.exists():
        reasons.append(f"{IMAGE} missing: run scripts/build-test-image.sh")
    if not RECONCILER.exists():
        reasons.append(f"{RECONCILER} missing: install the project into .venv (make setup)")
    for tool in ("nft", "dnsmasq", "qemu-img"):
        if shutil.which(tool, path=ENV["PATH"]) is None:
            reasons.append(f"{tool} missing: run scripts/setup-network.sh / setup-storage.sh")
    if reasons:
        raise SystemExit("cannot run: " + "; ".join(reasons))


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kcli", description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="Repeats of the three cycles (default: 3).")
    parser.add_argument("--write", type=Path, default=None,
                        help="Write the Markdown section into this file (between its markers).")
    parser.add_argument("--instances", type=int, default=10, help="Guests (default: 10), half on each network.")
    parser.add_argument("--quiet-wait", type=float, default=180,
                        help="Seconds to wait before each repeat for other domains and test runs to finish "
                             "(default: 180; it runs anyway after that).")
    parser.add_argument("--json", type=Path, default=None, help="Also dump the raw results as JSON here.")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if not 2 <= args.instances <= 200 or args.instances % 2:
        parser.error("--instances: an even number between 2 and 200")
    preflight()
    signal.signal(signal.SIGTERM, _sigterm)
    started = time.perf_counter()
    kcli = ensure_kcli()
    log(f"kcli {kcli['kcli']}, libvirt-python {kcli['libvirt_python']} in {KCLI_VENV}")
    results: dict[str, list[dict[str, Any]]] = {t: [] for t in TOOLS}
    failures: list[dict[str, Any]] = []
    try:
        problems = sweep_all()
        if problems:
            raise SystemExit("leftovers of an earlier run could not be removed: " + "; ".join(problems))
        for i in range(args.repeat):
            wait_for_quiet(args.quiet_wait)
            run_repeat(i, args.instances, results, failures)
    finally:
        problems = sweep_all()
        if problems:
            log("cleanup problems: " + "; ".join(problems))
    time.sleep(1)  # a killed dnsmasq is reaped by PID 1 within ~1.5 s
    leftovers = final_check()
    if leftovers:
        log("LEFT on the host: " + "; ".join(leftovers))
    wall_s = time.perf_counter() - started
    if args.json:
        args.json.write_text(json.dumps({"results": results, "failures": failures, "kcli": kcli}, indent=2) + "\n")
    command = f".venv/bin/python -m benchmarks.kcli --repeat {args.repeat}"
    if args.instances != 10:
        command += f" --instances {args.instances}"
    if args.write:
        command += f" --write {args.write}"
    section = report(results, args.repeat, args.instances, command, kcli, failures, wall_s, leftovers)
    if args.write:
        write_section(args.write, section)
        log(f"wrote the kcli section of {args.write} ({wall_s / 60:.1f} min)")
    else:
        sys.stdout.write(section)
    return 1 if leftovers else 0


if __name__ == "__main__":
    sys.exit(main())
