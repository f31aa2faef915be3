"""The example cloud of manifests/ on the real drivers, for the crash-safety suite.

`crash_env()` gives one test its own copy of the example cloud: the tenants renamed
`rctest<hex>-<tenant>` (every cross reference follows), the images a blank disk (see
`blank_image`), globex's bucket `deletionPolicy: Delete` (see `copy_cloud`), and a host
config like hostconfig/demo.yaml (libvirt guests under TCG, netlink networks, qcow2
volumes, Swift buckets, tenants in memory) whose state dir, volume pool and Swift
accounts (`AUTH_rctest<hex>-<tenant>`) are the test's own. `run()` / `start()` run the
CLI as a process of its own, which can be killed: at a fault point (RECONCILER_FAULTS,
see reconciler.faults) or from here (SIGKILL).

`check_applied()` and `check_destroyed()` compare the host with the manifests using the
host's tools only: `virsh` (domains, their XML), `ip -j -d link` and `ip netns`, `nft
-j`, `qemu-img info`/`check`, /proc, and a plain swiftclient connection (what the
`swift` CLI is built on); never the reconciler's drivers. Each finding is classed:

- duplicate: two host objects for one resource (domains, dnsmasq, rules, images);
- leak: an object of this installation (its home) that no manifest names, or that a
  destroy should have removed;
- half: a declared object that is missing or not configured as declared.

Teardown destroys the cloud, removes what is left of this installation (links,
namespaces, nft tables, processes, domains, Swift containers, the state dir) and fails
the test when destroy left anything.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import time
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import swiftclient
import yaml

import objstore
from conftest import IMAGE, RECONCILER, REPO, TENANT_PREFIX, TEST_TMP, URI, VIRSH, _make_dir, run, wait_for
from netns import NetEnv, all_links, namespaces, processes_mentioning, require_network_host
from reconciler.models import Key
from reconciler.naming import host_name, mac_address, tap_name

EXAMPLE = REPO / "manifests"
#: the libvirt driver's XML namespace for its mark in <metadata> (its documented format)
MARK_NS = "https://reconciler.dev/xmlns/libvirt/1"
GIB = 1024**3
KINDS = ("Tenant", "Network", "Router", "SecurityGroup", "Image", "Instance", "Volume", "Bucket")


# --- the cloud ---------------------------------------------------------------------------


@dataclass
class Cloud:
    """The copied manifests, read back as plain YAML: (kind, tenant, name) -> document."""

    folder: Path
    tenants: dict[str, str]  # example tenant -> test tenant
    docs: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)

    def of(self, kind: str) -> dict[tuple[str, str], dict[str, Any]]:
        return {(t, n): d for (k, t, n), d in self.docs.items() if k == kind}

    def spec(self, kind: str, tenant: str, name: str) -> dict[str, Any]:
        return self.docs[(kind, tenant, name)].get("spec") or {}


def copy_cloud(dest: Path, prefix: str, source: Path = EXAMPLE, image: Path = IMAGE) -> Cloud:
    """manifests/ copied to `dest` with every tenant renamed `<prefix>-<tenant>`: the
    Tenant documents, `metadata.tenant`, and every `tenant/name` reference in a spec.
    Image sources point at the test image; globex's bucket says `deletionPolicy: Delete`
    (the example retains both buckets: this way destroy deletes one and keeps one)."""
    files = sorted(source.rglob("*.y*ml"))
    loaded = {f: [d for d in yaml.safe_load_all(f.read_text()) if d] for f in files}
    tenants = {d["metadata"]["name"]: f"{prefix}-{d['metadata']['name']}"
               for docs in loaded.values() for d in docs if d.get("kind") == "Tenant"}
    assert tenants, f"no Tenant in {source}"

    def rename(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: rename(v) for k, v in value.items()}
        if isinstance(value, list):
            return [rename(v) for v in value]
        if isinstance(value, str) and value.count("/") == 1 and value.split("/")[0] in tenants:
            tenant, name = value.split("/")
            return f"{tenants[tenant]}/{name}"
        return value

    cloud = Cloud(dest, tenants)
    for path, docs in loaded.items():
        for d in docs:
            meta = d["metadata"]
            if d["kind"] == "Tenant":
                meta["name"] = tenants[meta["name"]]
            else:
                meta["tenant"] = tenants[meta["tenant"]]
            if d.get("spec"):
                d["spec"] = rename(d["spec"])
            if d["kind"] == "Image":
                d["spec"]["source"] = str(image)
            if d["kind"] == "Bucket" and meta["tenant"] == tenants.get("globex"):
                d["spec"]["deletionPolicy"] = "Delete"
            tenant = meta["name"] if d["kind"] == "Tenant" else meta["tenant"]
            key = (d["kind"], "" if d["kind"] == "Tenant" else tenant, meta["name"])
            assert key not in cloud.docs, f"{key} twice in {source}"
            cloud.docs[key] = d
        out = dest / path.relative_to(source)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    kinds = {k for k, _, _ in cloud.docs}
    assert kinds == set(KINDS), f"the example cloud lacks {set(KINDS) - kinds}"
    return cloud


# --- the environment ---------------------------------------------------------------------


@dataclass
class Run:
    """One CLI process: how it ended."""

    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    duration_s: float
    killed_by_us: bool = False

    @property
    def killed(self) -> bool:
        return self.returncode == -signal.SIGKILL

    def text(self) -> str:
        return (f"reconciler {' '.join(self.args)}: exit {self.returncode} after {self.duration_s:.1f} s"
                f"\n--- stdout\n{self.stdout[-4000:]}\n--- stderr\n{self.stderr[-4000:]}")


@dataclass
class Running:
    """A CLI process started by CrashEnv.start."""

    args: tuple[str, ...]
    proc: subprocess.Popen[str]
    started: float
    killed_by_us: bool = False

    def kill(self) -> None:
        """SIGKILL, unless it has ended (a zombie until `finish` reaps it)."""
        if self.proc.poll() is None:
            self.proc.kill()  # Popen.kill: never a PID it has reaped already
            self.killed_by_us = True

    def finish(self, kill_after_s: float | None = None, timeout: float = 300) -> Run:
        """Its end: waited for (at most `timeout`: a hang fails the test), or SIGKILL
        after `kill_after_s` from its start."""
        proc, args = self.proc, self.args
        killed_by_us = self.killed_by_us
        wait = timeout if kill_after_s is None else max(0.0, self.started + kill_after_s - time.monotonic())
        try:
            out, err = proc.communicate(timeout=wait)
        except subprocess.TimeoutExpired:
            if kill_after_s is None:
                proc.kill()
                out, err = proc.communicate()
                raise AssertionError(f"reconciler {' '.join(args)} hung for {timeout:.0f} s:\n{out[-3000:]}\n"
                                     f"{err[-3000:]}") from None
            proc.kill()
            killed_by_us = True
            out, err = proc.communicate(timeout=60)  # our child: communicate() reaps it
        return Run(args, proc.returncode, out, err, time.monotonic() - self.started, killed_by_us)


@dataclass(frozen=True)
class Finding:
    what: str  # duplicate | leak | half
    detail: str

    def __str__(self) -> str:
        return f"{self.what}: {self.detail}"


@dataclass
class CrashEnv(NetEnv):
    """NetEnv (links, namespaces, nft, processes of this home; destroy at teardown) with
    the whole example cloud: libvirt, storage and objectstore as well."""

    cloud: Cloud | None = None
    shutdown_timeout_s: float = 0

    @property
    def pool(self) -> Path:
        return self.root / "volumes"

    @property
    def accounts(self) -> dict[str, str]:
        """test tenant -> its Swift account (reseller mode: no credentials configured)."""
        return {t: f"AUTH_{t}" for t in self.tenants}

    def write_host_config(self) -> None:
        _make_dir(self.pool)  # QEMU (another user) reaches the volumes
        config = {
            "stateDir": str(self.state_dir),
            "lockTimeoutSeconds": 60,
            "drivers": {"Tenant": "memory", "Volume": "storage", "Bucket": "objectstore",
                        "Network": "netlink", "Router": "netlink", "SecurityGroup": "netlink",
                        "Image": "libvirt", "Instance": "libvirt"},
            "libvirt": {"uri": URI, "domainType": "qemu", "shutdownTimeoutSeconds": self.shutdown_timeout_s,
                        "probeImage": str(IMAGE)},
            "volumeBackends": {"local": {"driver": "file", "path": str(self.pool), "default": True}},
            "objectStores": {"local": {"driver": "swift", "authUrl": objstore.AUTH_URL, "user": objstore.ADMIN[0],
                                       "key": objstore.ADMIN[1], "default": True}},
        }
        self.host_config.write_text(json.dumps(config, indent=2) + "\n")  # JSON is YAML
        self.host_config.chmod(0o600)

    def run(self, *args: str, faults: str | None = None, trace: Path | None = None,
            kill_after_s: float | None = None, timeout: float = 300) -> Run:
        """`reconciler ARGS` as a process of its own; with `faults` it may kill itself
        (RECONCILER_FAULTS), with `kill_after_s` it is killed (SIGKILL) after that long."""
        return self.start(*args, faults=faults, trace=trace).finish(kill_after_s, timeout)

    def start(self, *args: str, faults: str | None = None, trace: Path | None = None) -> "Running":
        """`reconciler ARGS` started; `.finish()` waits for it (see `run`)."""
        env = {k: v for k, v in os.environ.items() if k not in ("RECONCILER_FAULTS", "RECONCILER_FAULTS_LOG")}
        env.update({"RECONCILER_HOST_CONFIG": str(self.host_config), "NO_COLOR": "1", "COLUMNS": "250",
                    "TERM": "dumb"})
        if faults or trace:
            env["RECONCILER_FAULTS"] = faults or "trace"
        if trace:
            env["RECONCILER_FAULTS_LOG"] = str(trace)
        if args and args[0] in ("apply", "destroy"):
            self.last_manifest = self.cloud.folder if self.cloud else None
        started = time.monotonic()
        # our child: Running.finish reaps it (its PID is not recorded for the teardown's
        # check: after a thousand runs some other process may have it)
        proc = subprocess.Popen([str(RECONCILER), *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env, cwd=self.root)
        return Running(args, proc, started)

    # --- what is on the host -------------------------------------------------------------

    def domains(self) -> dict[str, str]:
        """Domains of this installation (our mark names its instance dir), or titled
        after one of its tenants: name -> title. (For the teardown: waits for libvirtd
        while it restarts.)"""
        wait_for(lambda: run(*VIRSH, "version", check=False).returncode == 0, 120, interval=2,
                 what="libvirtd to answer")
        found = {}
        for name, (home, title) in _marked_domains().items():
            if home == str(self.instance_dir) or any(title.startswith(t + "/") for t in self.tenants):
                found[name] = title
        return found

    def wait_for_services(self, timeout: float = 120) -> None:
        """Until libvirtd and Swift answer: the fault suite stops and restarts them, and
        a run that starts meanwhile fails for that reason, not its own."""
        wait_for(lambda: run(*VIRSH, "version", check=False).returncode == 0
                 and not objstore.swift_unready.__wrapped__(), timeout, interval=2,
                 what="libvirtd and Swift to answer")

    def cleanup(self) -> list[str]:
        # libvirtd or Swift may be restarting: without them the destroy and the removal
        # of the domains would fail and leave them behind
        problems = []
        try:
            self.wait_for_services()
        except AssertionError as exc:
            problems.append(f"before the teardown: {exc}")
        try:
            problems += super().cleanup()  # destroy, links, namespaces, nft, processes, domains, state dir
        except AssertionError as exc:  # a host tool failed (libvirtd still down): say so, go on
            problems.append(f"teardown: {exc}")
            shutil.rmtree(self.root, ignore_errors=True)
        for account in self.accounts.values():
            try:
                objstore.remove_account(account)
            except swiftclient.ClientException as exc:
                problems.append(f"cannot empty Swift account {account}: {exc}")
        return problems


def blank_image(path: Path) -> Path:
    """A 16 MiB qcow2 image with nothing on it: the guests made from it stay in their
    firmware (no bootable disk) and cost no CPU. What the drivers do (register it, make
    overlays, define and start domains) is the same as with the test guest image, whose
    four TCG boots per apply would take the two cores from the processes under test."""
    run("qemu-img", "create", "-q", "-f", "qcow2", str(path), "16M")
    path.chmod(0o644)  # QEMU (another user) reads it through the registered copy only
    return path


@contextmanager
def crash_env() -> Iterator[CrashEnv]:
    """A CrashEnv with its copy of the example cloud and its host config."""
    require_network_host("libvirt")
    objstore.require_swift()
    if not RECONCILER.exists():
        pytest.fail(f"{RECONCILER} missing: install the project into .venv", pytrace=False)
    prefix = f"{TENANT_PREFIX}{secrets.token_hex(4)}"
    _make_dir(TEST_TMP.parent)
    _make_dir(TEST_TMP)
    root = TEST_TMP / prefix
    _make_dir(root)
    cloud = copy_cloud(root / "cloud", prefix, image=blank_image(root / "blank.qcow2"))
    main = cloud.tenants["acme"]
    others = {orig: t for orig, t in cloud.tenants.items() if t != main}
    env = CrashEnv(tenant=main, root=root, others=others, cloud=cloud)
    _make_dir(env.state_dir)
    env.write_host_config()
    env.declared |= {(k, t, n) for (k, t, n) in cloud.docs if k in ("Network", "Router")}
    try:
        yield env
    finally:
        problems = env.cleanup()
        if problems:
            raise AssertionError("teardown found problems:\n" + "\n".join(problems))


# --- reading the host (independent tools) ------------------------------------------------


def _marked_domains() -> dict[str, tuple[str, str]]:
    """Every domain with our mark: name -> (home, title)."""
    out = {}
    for name in run(*VIRSH, "list", "--all", "--name", timeout=60).stdout.split():
        result = run(*VIRSH, "dumpxml", "--inactive", name, check=False)
        if result.returncode != 0:
            continue  # undefined meanwhile
        root = ET.fromstring(result.stdout)
        mark = root.find(f"metadata/{{{MARK_NS}}}instance")
        if mark is not None:
            out[name] = (mark.get("home") or "", root.findtext("title") or "")
    return out


def domain_facts(env: CrashEnv) -> dict[str, dict[str, Any]]:
    """This installation's domains (by the instance dir in their mark), from `virsh`."""
    out: dict[str, dict[str, Any]] = {}
    for name in run(*VIRSH, "list", "--all", "--name").stdout.split():
        result = run(*VIRSH, "dumpxml", name, check=False)
        if result.returncode != 0:
            continue
        root = ET.fromstring(result.stdout)
        mark = root.find(f"metadata/{{{MARK_NS}}}instance")
        title = root.findtext("title") or ""
        ours_by_title = any(title.startswith(t + "/") for t in env.tenants)
        if (mark is None or mark.get("home") != str(env.instance_dir)) and not ours_by_title:
            continue
        state = run(*VIRSH, "domstate", name, check=False).stdout.strip()
        disks = []
        for disk in root.findall("devices/disk"):
            source = disk.find("source")
            disks.append({
                "device": disk.get("device"),
                "target": disk.find("target").get("dev") if disk.find("target") is not None else None,
                "source": None if source is None else (source.get("file") or source.get("dev")),
                "serial": disk.findtext("serial"),
            })
        nics = []
        for iface in root.findall("devices/interface"):
            nics.append({
                "mac": iface.find("mac").get("address") if iface.find("mac") is not None else None,
                "bridge": iface.find("source").get("bridge") if iface.find("source") is not None else None,
                "tap": iface.find("target").get("dev") if iface.find("target") is not None else None,
            })
        out[name] = {"title": title, "state": state, "disks": disks, "nics": nics,
                     "mark": None if mark is None else dict(mark.attrib)}
    return out


def img_info(path: Path) -> dict[str, Any]:
    return json.loads(run("qemu-img", "info", "-U", "--output=json", str(path)).stdout)


def swift_conn(account: str) -> swiftclient.Connection:
    return objstore.conn(objstore.ADMIN, account)


def containers(account: str) -> dict[str, dict[str, str]]:
    """Container name -> its headers, for every container of `account` (none: {})."""
    c = swift_conn(account)
    try:
        _, listing = c.get_account(full_listing=True)
    except swiftclient.ClientException as exc:
        if exc.http_status == 404:
            return {}
        raise
    out = {}
    for entry in listing:
        try:
            out[entry["name"]] = c.head_container(entry["name"])
        except swiftclient.ClientException as exc:
            if exc.http_status != 404:
                raise
    return out


def dnsmasqs(env: CrashEnv) -> dict[int, str]:
    """pid -> command line of the live dnsmasq processes of this state dir."""
    return {pid: cmd for pid, cmd in processes_mentioning(str(env.state_dir)).items()
            if "dnsmasq" in cmd.split()[0]}


# --- the checks --------------------------------------------------------------------------


@dataclass
class Checked:
    findings: list[Finding] = field(default_factory=list)
    #: domain name -> inode of the retained volume etc., for later comparisons
    facts: dict[str, Any] = field(default_factory=dict)

    def add(self, what: str, detail: str) -> None:
        self.findings.append(Finding(what, detail))

    def count(self, what: str) -> int:
        return sum(1 for f in self.findings if f.what == what)

    def __str__(self) -> str:
        return "\n".join(f"  {f}" for f in self.findings) or "  (nothing)"


def _mtu(spec: Mapping[str, Any]) -> int:
    """The MTU the manifests' reference documents: as written, else 1450 on vxlan (its
    50-byte header), else 1500."""
    return int(spec.get("mtu") or (1450 if spec.get("type", "vxlan") == "vxlan" else 1500))


def _dhcp_subnets(spec: Mapping[str, Any]) -> list[str]:
    return [s["cidr"] for s in spec.get("subnets") or [] if (s.get("dhcp") or {}).get("enabled", True)]


def check_applied(env: CrashEnv) -> Checked:
    """The host holds exactly what the manifests declare (see the module docstring)."""
    cloud = env.cloud
    assert cloud is not None
    out = Checked()
    _check_domains(env, cloud, out)
    _check_network(env, cloud, out)
    _check_nft(env, cloud, out)
    _check_files(env, cloud, out)
    _check_buckets(env, cloud, out)
    return out


def _check_domains(env: CrashEnv, cloud: Cloud, out: Checked) -> None:
    found = domain_facts(env)
    by_title: dict[str, list[str]] = defaultdict(list)
    for name, d in found.items():
        by_title[d["title"]].append(name)
    instances = cloud.of("Instance")
    for (tenant, name), spec_doc in instances.items():
        spec = spec_doc.get("spec") or {}
        key = Key("Instance", tenant, name)
        title = f"{tenant}/{name}"
        names = by_title.pop(title, [])
        if len(names) > 1:
            out.add("duplicate", f"{len(names)} domains titled {title}: {names}")
        if not names:
            out.add("half", f"no domain for Instance {title}")
            continue
        dom_name = host_name(key)
        if dom_name not in names:
            out.add("half", f"Instance {title}: domain named {names}, expected {dom_name}")
            continue
        d = found[dom_name]
        mark = d["mark"] or {}
        if (mark.get("kind"), mark.get("tenant"), mark.get("name")) != ("Instance", tenant, name):
            out.add("half", f"domain {dom_name} ({title}) carries the mark {mark}")
        if d["state"] != "running":
            out.add("half", f"domain {dom_name} ({title}) is {d['state']!r}, not running")
        directory = env.instance_dir / dom_name
        disks = {x["target"]: x for x in d["disks"]}
        root = disks.pop("vda", None)
        if root is None or root["source"] != str(directory / "root.qcow2"):
            out.add("half", f"domain {dom_name} ({title}): root disk vda is {root}")
        seed = disks.pop("hdc", None)
        if seed is None or seed["device"] != "cdrom" or seed["source"] != str(directory / "seed.iso"):
            out.add("half", f"domain {dom_name} ({title}): seed CD-ROM hdc is {seed}")
        elif not Path(seed["source"]).is_file():
            out.add("half", f"domain {dom_name} ({title}): its seed {seed['source']} is missing")
        for att in spec.get("volumes") or []:
            vol = Key("Volume", tenant, att["volume"])
            serial = host_name(vol)
            match = [x for x in disks.values() if x["serial"] == serial]
            for x in match:
                disks.pop(x["target"])
            if len(match) != 1:
                out.add("duplicate" if match else "half",
                        f"domain {dom_name} ({title}): {len(match)} disks of volume {att['volume']}")
                continue
            if match[0]["source"] != str(env.pool / f"{serial}.qcow2"):
                out.add("half", f"domain {dom_name} ({title}): volume {att['volume']} from {match[0]['source']}")
            if att.get("device") and match[0]["target"] != att["device"]:
                out.add("half", f"domain {dom_name} ({title}): volume {att['volume']} on {match[0]['target']}, "
                        f"declared {att['device']}")
        for x in disks.values():
            out.add("leak", f"domain {dom_name} ({title}): a disk no manifest names: {x}")
        nics = list(d["nics"])
        for nic in spec.get("networks") or []:
            mac = mac_address(tenant, name, nic["network"])
            bridge = host_name(Key("Network", tenant, nic["network"]))
            match = [n for n in nics if n["mac"] == mac]
            for n in match:
                nics.remove(n)
            if len(match) != 1:
                out.add("duplicate" if match else "half",
                        f"domain {dom_name} ({title}): {len(match)} NICs on network {nic['network']}")
            elif match[0]["bridge"] != bridge or match[0]["tap"] != tap_name(tenant, name, nic["network"]):
                out.add("half", f"domain {dom_name} ({title}): NIC on {nic['network']} is {match[0]}")
        for n in nics:
            out.add("leak", f"domain {dom_name} ({title}): a NIC no manifest names: {n}")
    for title, names in by_title.items():
        out.add("leak", f"domain(s) {names} titled {title!r} of this installation: no manifest names them")


def _check_network(env: CrashEnv, cloud: Cloud, out: Checked) -> None:
    links = {entry["ifname"]: entry for entry in all_links()}
    spaces = namespaces()
    expected_links: set[str] = set()
    expected_spaces: set[str] = set()
    networks = cloud.of("Network")
    for (tenant, name), doc in networks.items():
        spec = doc.get("spec") or {}
        key = Key("Network", tenant, name)
        bridge = host_name(key)
        h = bridge[3:]
        expected_links.add(bridge)
        entry = links.get(bridge)
        if entry is None:
            out.add("half", f"Network {tenant}/{name}: bridge {bridge} is missing")
            continue
        info = entry.get("linkinfo", {})
        if info.get("info_kind") != "bridge":
            out.add("half", f"Network {tenant}/{name}: {bridge} is a {info.get('info_kind')}, not a bridge")
        if alias_home(entry) != env.home or f"key=Network/{tenant}/{name} " not in (entry.get("ifalias") or "") + " ":
            out.add("half", f"Network {tenant}/{name}: bridge {bridge} carries the alias {entry.get('ifalias')!r}")
        if int(entry.get("mtu", 0)) != _mtu(spec):
            out.add("half", f"Network {tenant}/{name}: bridge {bridge} MTU {entry.get('mtu')}, declared {_mtu(spec)}")
        if "UP" not in entry.get("flags", []):
            out.add("half", f"Network {tenant}/{name}: bridge {bridge} is down")
        if spec.get("type", "vxlan") == "vxlan":
            vx = links.get("rv-" + h)
            expected_links.add("rv-" + h)
            if vx is None or vx.get("master") != bridge:
                out.add("half", f"Network {tenant}/{name}: VXLAN rv-{h} is {'missing' if vx is None else 'not on ' + bridge}")
        dhcp = _dhcp_subnets(spec)
        ns = "rc-dhcp-" + h
        if dhcp:
            expected_spaces.add(ns)
            if ns not in spaces:
                out.add("half", f"Network {tenant}/{name}: DHCP namespace {ns} is missing")
            for cidr in dhcp:
                expected_links.add("rd-" + _short(bridge, cidr))  # the subnet's DHCP leg
                folder = env.state_dir / "netlink" / "dhcp" / bridge / cidr.replace("/", "_")
                running = [pid for pid, cmd in dnsmasqs(env).items() if str(folder) in cmd]
                if len(running) != 1:
                    out.add("duplicate" if running else "half",
                            f"Network {tenant}/{name} subnet {cidr}: {len(running)} dnsmasq running")
        # ports: the tap of every running instance NIC on this network is on the bridge
        for (itenant, iname), idoc in cloud.of("Instance").items():
            for nic in (idoc.get("spec") or {}).get("networks") or []:
                if itenant == tenant and nic["network"] == name:
                    tap = tap_name(tenant, iname, name)
                    expected_links.add(tap)
                    if links.get(tap, {}).get("master") != bridge:
                        out.add("half", f"Instance {tenant}/{iname}: tap {tap} is not on bridge {bridge}")
    for (tenant, name), doc in cloud.of("Router").items():
        spec = doc.get("spec") or {}
        ns = host_name(Key("Router", tenant, name))
        expected_spaces.add(ns)
        if ns not in spaces:
            out.add("half", f"Router {tenant}/{name}: namespace {ns} is missing")
            continue
        inside = {e["ifname"]: e for e in json.loads(run("ip", "-n", ns, "-j", "link", "show").stdout or "[]")}
        legs = {n for n in inside if n.startswith(("qr-", "qg-"))}
        want = set()
        for net in spec.get("networks") or []:
            want.add("qr-" + _short(f"Router/{tenant}/{name}", f"Network/{tenant}/{net}"))
        if spec.get("external"):
            ext_tenant, ext_name = spec["external"].split("/")
            want.add("qg-" + _short(f"Router/{tenant}/{name}", f"Network/{ext_tenant}/{ext_name}"))
        for leg in sorted(want - legs):
            out.add("half", f"Router {tenant}/{name}: leg {leg} is missing in {ns}")
        for leg in sorted(legs - want):
            out.add("leak", f"Router {tenant}/{name}: leg {leg} in {ns} that no manifest names")
        for leg in want:
            expected_links.add("rr-" + leg[3:] if leg.startswith("qr-") else "rg-" + leg[3:])
    # anything marked with this home, or a leg/device of ours, that is not expected
    for name, entry in links.items():
        if alias_home(entry) == env.home and name not in expected_links:
            out.add("leak", f"link {name} ({entry.get('ifalias')}) of this installation: no manifest names it")
    for ns in spaces:
        if ns in expected_spaces:
            continue
        # a DHCP namespace of a network this installation once had: its dnsmasq files
        h = ns[len("rc-dhcp-"):] if ns.startswith("rc-dhcp-") else None
        if h and (env.state_dir / "netlink" / "dhcp" / f"rc-{h}").exists():
            out.add("leak", f"namespace {ns} (DHCP of rc-{h}): no manifest names its network")
    expected_dirs = {str(env.state_dir / "netlink" / "dhcp" / host_name(Key("Network", t, n)) / c.replace("/", "_"))
                     for (t, n), doc in networks.items() for c in _dhcp_subnets(doc.get("spec") or {})}
    for pid, cmd in dnsmasqs(env).items():
        if not any(d + "/" in cmd or cmd.endswith(d) or d + " " in cmd for d in expected_dirs):
            out.add("leak", f"dnsmasq {pid} of this state dir serves nothing declared: {cmd}")


def _short(*parts: str) -> str:
    from reconciler.naming import short_hash

    return short_hash(*parts)


def _nft_objects(family: str, table: str, namespace: str | None = None) -> list[dict[str, Any]] | None:
    prefix = ("ip", "netns", "exec", namespace) if namespace else ()
    result = run(*prefix, "nft", "-j", "list", "table", family, table, check=False)
    if result.returncode != 0:
        return None
    return json.loads(result.stdout)["nftables"]


def _check_nft(env: CrashEnv, cloud: Cloud, out: Checked) -> None:
    inet = _nft_objects("inet", env.table)
    bridge = _nft_objects("bridge", env.table)
    if inet is None or bridge is None:
        out.add("half", f"nftables: table {'inet' if inet is None else 'bridge'} {env.table} is missing")
        return
    chains = {o["chain"]["name"] for o in inet if "chain" in o}
    bchains = {o["chain"]["name"] for o in bridge if "chain" in o}
    want, bwant = {"zones", "egress", "ingress", "input"}, {"forward"}
    taps = set()
    for (tenant, name) in cloud.of("Network"):
        h = host_name(Key("Network", tenant, name))[3:]
        want |= {f"in-{h}", f"out-{h}"}
        bwant.add(f"spoof-{h}")
    for (tenant, name), doc in cloud.of("SecurityGroup").items():
        g = host_name(Key("SecurityGroup", tenant, name), prefix="sg-")
        want |= {f"{g}-in", f"{g}-out"}
    for (tenant, name), doc in cloud.of("Instance").items():
        for nic in (doc.get("spec") or {}).get("networks") or []:
            tap = tap_name(tenant, name, nic["network"])
            taps.add(tap)
            if nic.get("securityGroups"):
                want |= {f"pi-{tap[3:]}", f"po-{tap[3:]}"}
    for c in sorted(want - chains):
        out.add("half", f"nftables: chain inet {env.table} {c} is missing")
    for c in sorted(chains - want):
        out.add("leak", f"nftables: chain inet {env.table} {c}: no manifest names it")
    for c in sorted(bwant - bchains):
        out.add("half", f"nftables: chain bridge {env.table} {c} is missing")
    for c in sorted(bchains - bwant):
        out.add("leak", f"nftables: chain bridge {env.table} {c}: no manifest names it")
    ports = next((o["map"] for o in bridge if "map" in o and o["map"]["name"] == "ports"), None)
    elems = set()
    if ports is None:
        out.add("half", f"nftables: map bridge {env.table} ports is missing")
    else:
        for e in ports.get("elem") or []:
            elems.add(e[0] if isinstance(e, list) else e)
        for tap in sorted(taps - elems):
            out.add("half", f"nftables: port {tap} is not in the ports map")
        for tap in sorted(elems - taps):
            out.add("leak", f"nftables: port {tap} in the ports map: no manifest names it")
    for listing in (inet, bridge):
        seen: Counter[tuple[str, str]] = Counter()
        for o in listing:
            if "rule" in o and o["rule"].get("comment"):
                seen[(o["rule"]["chain"], o["rule"]["comment"])] += 1
        for (chain, comment), n in seen.items():
            if n > 1:
                out.add("duplicate", f"nftables: rule {comment} {n} times in chain {chain}")
    for (tenant, name), doc in cloud.of("Router").items():
        if (doc.get("spec") or {}).get("snat") and doc["spec"].get("external"):
            ns = host_name(Key("Router", tenant, name))
            if ns in namespaces():
                listed = json.loads(run("ip", "netns", "exec", ns, "nft", "-j", "list", "ruleset").stdout)
                rules = [o for o in listed["nftables"] if "rule" in o]
                if not any("masquerade" in json.dumps(r) or "snat" in json.dumps(r) for r in rules):
                    out.add("half", f"Router {tenant}/{name}: no SNAT rule in namespace {ns}")


def _check_files(env: CrashEnv, cloud: Cloud, out: Checked) -> None:
    # volumes: one qcow2 + its sidecar per Volume, as big as declared; nothing else
    want = {}
    for (tenant, name), doc in cloud.of("Volume").items():
        want[host_name(Key("Volume", tenant, name))] = (tenant, name, int(doc["spec"]["sizeGiB"]))
    present = {p.name for p in env.pool.iterdir()} if env.pool.exists() else set()
    for stem, (tenant, name, size) in want.items():
        image = env.pool / f"{stem}.qcow2"
        if f"{stem}.qcow2" not in present or f"{stem}.json" not in present:
            out.add("half", f"Volume {tenant}/{name}: {stem}.qcow2 and its sidecar are not both in the pool")
            continue
        info = img_info(image)
        if info.get("format") != "qcow2" or info.get("virtual-size") != size * GIB or info.get("backing-filename"):
            out.add("half", f"Volume {tenant}/{name}: {image} is {info.get('format')} of {info.get('virtual-size')} "
                    f"bytes (backing {info.get('backing-filename')}), declared {size} GiB qcow2")
        present -= {f"{stem}.qcow2", f"{stem}.json"}
    for extra in sorted(present):
        out.add("leak", f"volume pool: {extra} (no manifest names it)")
    # images: one registered file + its mark per Image, nothing else (no temporary files)
    images: dict[str, list[str]] = defaultdict(list)
    files = {p.name for p in env.image_dir.iterdir()} if env.image_dir.exists() else set()
    for fname in files:
        if fname.startswith("rc-") and fname.endswith(".json"):
            images[fname[: len("rc-") + 10]].append(fname[:-5])
    image_files: dict[tuple[str, str], Path] = {}
    for (tenant, name) in cloud.of("Image"):
        base = host_name(Key("Image", tenant, name))
        stems = images.pop(base, [])
        if len(stems) != 1:
            out.add("duplicate" if stems else "half", f"Image {tenant}/{name}: {len(stems)} registered files {stems}")
        for stem in stems:
            files.discard(stem + ".json")
            if stem + ".qcow2" in files:
                files.discard(stem + ".qcow2")
                image_files[(tenant, name)] = env.image_dir / f"{stem}.qcow2"
            else:
                out.add("half", f"Image {tenant}/{name}: {stem}.json without its image file")
    for extra in sorted(files):
        out.add("leak", f"image dir: {extra} (no manifest names it)")
    # instance dirs: one per Instance, its root disk an overlay on its tenant's image
    dirs = {p.name for p in env.instance_dir.iterdir() if p.is_dir()} if env.instance_dir.exists() else set()
    for (tenant, name), doc in cloud.of("Instance").items():
        spec = doc.get("spec") or {}
        dom = host_name(Key("Instance", tenant, name))
        dirs.discard(dom)
        root = env.instance_dir / dom / "root.qcow2"
        if not root.exists():
            out.add("half", f"Instance {tenant}/{name}: {root} is missing")
            continue
        info = img_info(root)
        backing = image_files.get((tenant, spec["image"]))
        size = int(spec.get("rootDiskGiB", 0)) * GIB
        if info.get("backing-filename") != (str(backing) if backing else None) or \
                info.get("backing-filename-format", "qcow2") != "qcow2":
            out.add("half", f"Instance {tenant}/{name}: root disk backed by {info.get('backing-filename')}, "
                    f"expected {backing}")
        if info.get("virtual-size") != max(size, img_info(backing)["virtual-size"] if backing else 0):
            out.add("half", f"Instance {tenant}/{name}: root disk of {info.get('virtual-size')} bytes, "
                    f"declared {spec.get('rootDiskGiB')} GiB")
    for extra in sorted(dirs):
        out.add("leak", f"instance dir {env.instance_dir / extra}: no manifest names it")


def _check_buckets(env: CrashEnv, cloud: Cloud, out: Checked) -> None:
    buckets = cloud.of("Bucket")
    for tenant, account in env.accounts.items():
        found = containers(account)
        for (btenant, name), doc in buckets.items():
            if btenant != tenant:
                continue
            spec = doc.get("spec") or {}
            headers = found.pop(name, None)
            if headers is None:
                out.add("half", f"Bucket {tenant}/{name}: no container in {account}")
                continue
            problems = _bucket_differs(spec, headers, env.home)
            if problems:
                out.add("half", f"Bucket {tenant}/{name}: " + "; ".join(problems))
        for name, headers in found.items():
            what = "of this installation" if headers.get("x-container-meta-rc-home") == env.home else "unmarked"
            out.add("leak", f"container {name} in {account} ({what}): no manifest names it")


def _bucket_differs(spec: Mapping[str, Any], headers: Mapping[str, str], home: str) -> list[str]:
    problems = []
    read = {p.strip() for p in headers.get("x-container-read", "").split(",") if p.strip()}
    want = {".r:*", ".rlistings"} if spec.get("acl") == "public-read" else set()
    if read != want:
        problems.append(f"read ACL {sorted(read)}, declared {spec.get('acl', 'private')}")
    quota = spec.get("quota") or {}
    for field_name, header in (("bytes", "quota-bytes"), ("objects", "quota-count")):
        got = headers.get(f"x-container-meta-{header}")
        if (None if got is None else int(got)) != quota.get(field_name):
            problems.append(f"quota {field_name} {got}, declared {quota.get(field_name)}")
    versions = headers.get("x-versions-enabled", "false").lower() == "true"
    if versions != bool(spec.get("versioning")):
        problems.append(f"versioning {versions}, declared {bool(spec.get('versioning'))}")
    for k, v in (spec.get("metadata") or {}).items():
        if headers.get(f"x-container-meta-{k.lower()}") != v:
            problems.append(f"metadata {k}={headers.get(f'x-container-meta-{k.lower()}')!r}, declared {v!r}")
    if headers.get("x-container-meta-rc-home") != home:
        problems.append(f"mark home {headers.get('x-container-meta-rc-home')!r}, expected {home}")
    return problems


def check_destroyed(env: CrashEnv, retained: Mapping[str, Any]) -> Checked:
    """Nothing of this installation is left but the retained volumes and buckets, which
    are intact (`retained`: what `retained_facts` read after the apply)."""
    cloud = env.cloud
    assert cloud is not None
    out = Checked()
    for name, d in domain_facts(env).items():
        out.add("leak", f"domain {name} ({d['title']}, {d['state']}) is still defined")
    for entry in all_links():
        if alias_home(entry) == env.home:
            out.add("leak", f"link {entry['ifname']} ({entry.get('ifalias')}) is still there")
    names, spaces = env.expected_names()
    for entry in all_links():
        if entry["ifname"] in names and alias_home(entry) != env.home:
            out.add("leak", f"link {entry['ifname']} (a device name of this cloud) is still there")
    for ns in sorted(namespaces() & spaces):
        out.add("leak", f"namespace {ns} is still there")
    for family in ("inet", "bridge"):
        if _nft_objects(family, env.table) is not None:
            out.add("leak", f"nftables table {family} {env.table} is still there")
    for pid, cmd in processes_mentioning(str(env.state_dir)).items():
        out.add("leak", f"process {pid} of this state dir still runs: {cmd}")
    for folder in (env.instance_dir, env.image_dir):
        for p in sorted(folder.iterdir()) if folder.exists() else []:
            out.add("leak", f"{p} is still there")
    # the netlink driver's sidecars (a killed atomic write's `.tmp-` file is no object:
    # every reader skips it, see reconciler.fileio)
    netlink = env.state_dir / "netlink"
    for folder in (netlink / "networks", netlink / "routers", netlink / "groups", netlink / "dhcp"):
        for p in sorted(folder.iterdir()) if folder.exists() else []:
            if not p.name.startswith(".tmp-"):
                out.add("leak", f"{p} is still there")
    # volumes: the retained ones intact (the same file, as declared), nothing else
    present = {p.name for p in env.pool.iterdir()} if env.pool.exists() else set()
    for (tenant, name), doc in cloud.of("Volume").items():
        stem = host_name(Key("Volume", tenant, name))
        spec = doc.get("spec") or {}
        if spec.get("deletionPolicy", "Retain") == "Retain":
            image = env.pool / f"{stem}.qcow2"
            if f"{stem}.qcow2" not in present or f"{stem}.json" not in present:
                out.add("half", f"retained Volume {tenant}/{name}: {stem}.qcow2 or its sidecar is gone")
            else:
                before = retained.get(f"volume {stem}")
                if before is not None and before != _file_identity(image):
                    out.add("half", f"retained Volume {tenant}/{name}: {image} was replaced "
                            f"({before} -> {_file_identity(image)})")
                check = run("qemu-img", "check", "-U", str(image), check=False)
                info = img_info(image)
                if check.returncode != 0 or info.get("virtual-size") != int(spec["sizeGiB"]) * GIB:
                    out.add("half", f"retained Volume {tenant}/{name}: {image} damaged: {check.stdout}{check.stderr}"
                            f" size {info.get('virtual-size')}")
            present -= {f"{stem}.qcow2", f"{stem}.json"}
    for extra in sorted(present):
        out.add("leak", f"volume pool: {extra} is still there")
    # buckets: the retained ones with their settings and objects; the others gone
    for tenant, account in env.accounts.items():
        found = containers(account)
        for (btenant, name), doc in cloud.of("Bucket").items():
            if btenant != tenant:
                continue
            spec = doc.get("spec") or {}
            headers = found.pop(name, None)
            if spec.get("deletionPolicy", "Retain") != "Retain":
                if headers is not None:
                    out.add("leak", f"Bucket {tenant}/{name} (deletionPolicy Delete): container still in {account}")
                continue
            if headers is None:
                out.add("half", f"retained Bucket {tenant}/{name}: its container is gone from {account}")
                continue
            problems = _bucket_differs(spec, headers, env.home)
            if problems:
                out.add("half", f"retained Bucket {tenant}/{name}: " + "; ".join(problems))
            marker = retained.get(f"object {account}/{name}")
            if marker is not None:
                try:
                    _, body = swift_conn(account).get_object(name, "crash-marker")
                except swiftclient.ClientException as exc:
                    body = f"({exc.http_status})".encode()
                if body != marker:
                    out.add("half", f"retained Bucket {tenant}/{name}: its object crash-marker is {body[:40]!r}")
        for name in found:
            out.add("leak", f"container {name} in {account} is still there")
    return out


def _file_identity(path: Path) -> tuple[int, int]:
    """(device, inode): the same file, not one made again under its name."""
    st = path.stat()
    return st.st_dev, st.st_ino


def retained_facts(env: CrashEnv) -> dict[str, Any]:
    """After an apply: what the retained volumes and buckets are (file identity) and
    hold (an object put in each retained bucket here), for check_destroyed."""
    cloud = env.cloud
    assert cloud is not None
    facts: dict[str, Any] = {}
    for (tenant, name), doc in cloud.of("Volume").items():
        if (doc.get("spec") or {}).get("deletionPolicy", "Retain") == "Retain":
            stem = host_name(Key("Volume", tenant, name))
            image = env.pool / f"{stem}.qcow2"
            if image.exists():
                facts[f"volume {stem}"] = _file_identity(image)
    for (tenant, name), doc in cloud.of("Bucket").items():
        if (doc.get("spec") or {}).get("deletionPolicy", "Retain") == "Retain":
            account = env.accounts[tenant]
            body = f"{name} kept {secrets.token_hex(8)}".encode()
            try:
                swift_conn(account).put_object(name, "crash-marker", body)
            except swiftclient.ClientException:
                continue  # not there: check_applied says so
            facts[f"object {account}/{name}"] = body
    return facts


def alias_home(entry: Mapping[str, Any]) -> str | None:
    """The `home=` of a link's alias (`reconciler:v1 home=HOME key=... hash=...`)."""
    for part in (entry.get("ifalias") or "").split():
        if part.startswith("home="):
            return part[len("home="):]
    return None


def read_trace(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

