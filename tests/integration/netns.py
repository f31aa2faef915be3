"""Test hosts in network namespaces, for the integration tests of the netlink driver.

A `NetEnv` is one test's share of the host, like conftest's `HostEnv` (whose CLI helpers
it inherits), but with several tenants (`rctest<hex>` each) and the network kinds on the
real netlink driver. Instances stay on the in-memory driver (or libvirt, for the guest
test): for each instance NIC the test creates a "host" itself, a namespace `rct-<hex>`
holding `eth0`, the peer of a veth whose host-side end has the port's tap name and is
enslaved to the network's bridge, as the instance driver's tap would be. Everything the
tests check is read with `ip`, `nft` and /proc, and proven with real packets (DHCP by
busybox udhcpc, ping, TCP) from inside those namespaces, each bounded in time.

Teardown: `reconciler destroy --yes` of the last applied manifest, then the test's own
servers (by PID), namespaces and veths; then a sweep for anything of this test's
installation (its `home`) still on the host: links marked with it or named after its
networks, its namespaces, nftables tables and dnsmasq processes. Leftovers are removed
and listed in a failure, so a broken destroy never passes silently nor dirties the host.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import secrets
import signal
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from conftest import IMAGE, RECONCILER, REPO, TENANT_PREFIX, TEST_TMP, URI, HostEnv, _make_dir, run, wait_for
from hostcheck import require_host, require_network
from reconciler.models import Key
from reconciler.naming import host_name, short_hash

PYTHON = REPO / ".venv" / "bin" / "python"
PROBE = Path(__file__).with_name("_netprobe.py")
#: 10.251.X.0/24 for the tenant subnets of these tests (the instance tests use 10.253, the
#: instance benchmark 10.252, the network benchmark 10.250); everything lives in namespaces
SUBNET_BASE = "10.251"
UDHCPC_SCRIPT = """#!/bin/sh
# busybox udhcpc event script of the network tests: apply the lease ($mask is a prefix)
case "$1" in
  deconfig)
    ip -4 addr flush dev "$interface"
    ip link set "$interface" up
    ;;
  bound|renew)
    ip -4 addr flush dev "$interface"
    ip addr add "$ip/$mask" dev "$interface"
    if [ -n "$router" ]; then
      ip route replace default via "${router%% *}" dev "$interface"
    fi
    ;;
esac
exit 0
"""


def require_network_host(compute: str = "memory") -> None:
    """The netlink driver's tools; with `compute="libvirt"` libvirtd and the test guest too."""
    require_network()
    if compute == "libvirt":
        require_host()


def home_of(state_dir: Path) -> str:
    """The installation id the netlink driver derives from its state dir (its spec: the
    first 8 hex digits of sha256 of the resolved path)."""
    return hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:8]


def bridge_of(tenant: str, network: str) -> str:
    return host_name(Key("Network", tenant, network))


def net_hash(tenant: str, network: str) -> str:
    return bridge_of(tenant, network)[3:]


def vxlan_of(tenant: str, network: str) -> str:
    return "rv-" + net_hash(tenant, network)


def dhcp_ns_of(tenant: str, network: str) -> str:
    return "rc-dhcp-" + net_hash(tenant, network)


def router_ns_of(tenant: str, router: str) -> str:
    return host_name(Key("Router", tenant, router))


def free_subnets(count: int) -> list[str]:
    """`count` distinct 10.251.X.0/24 (random X): tenant subnets live in namespaces, so
    they only have to differ within one test."""
    return [f"{SUBNET_BASE}.{x}.0/24" for x in random.sample(range(1, 255), count)]


def ip_json(*args: str, namespace: str | None = None) -> list[dict[str, Any]]:
    prefix = ("ip", "-n", namespace) if namespace else ("ip",)
    out = run(*prefix, "-j", *args).stdout.strip()
    return json.loads(out) if out else []


def link(name: str, namespace: str | None = None) -> dict[str, Any] | None:
    """`ip -d -j link show dev NAME` (None when there is no such device)."""
    prefix = ("ip", "-n", namespace) if namespace else ("ip",)
    result = run(*prefix, "-d", "-j", "link", "show", "dev", name, check=False)
    if result.returncode != 0:
        return None
    found = json.loads(result.stdout)
    return found[0] if found else None


def all_links(namespace: str | None = None) -> list[dict[str, Any]]:
    return ip_json("-d", "link", "show", namespace=namespace)


def ipv4_addresses(dev: str | None = None, namespace: str | None = None) -> dict[str, list[str]]:
    """device -> ["a.b.c.d/p", ...] (IPv4 only)."""
    args = ("-4", "addr", "show") + (("dev", dev) if dev else ())
    out: dict[str, list[str]] = {}
    for entry in ip_json(*args, namespace=namespace):
        for a in entry.get("addr_info", []):
            if a.get("family") == "inet":
                out.setdefault(entry["ifname"], []).append(f"{a['local']}/{a['prefixlen']}")
    return out


def namespaces() -> set[str]:
    return {n["name"] for n in ip_json("netns", "list")}


def nft_json(*args: str, namespace: str | None = None) -> list[dict[str, Any]]:
    """`nft -j ARGS` (in `namespace` with ip netns exec): the nftables objects listed."""
    prefix = ("ip", "netns", "exec", namespace) if namespace else ()
    return json.loads(run(*prefix, "nft", "-j", *args).stdout)["nftables"]


def nft_tables(namespace: str | None = None) -> set[tuple[str, str]]:
    """(family, name) of every nftables table."""
    return {(o["table"]["family"], o["table"]["name"]) for o in nft_json("list", "tables", namespace=namespace)
            if "table" in o}


# Process checks read /proc here on purpose instead of calling reconciler.procs: the
# tests verify what the driver did with their own reading of the host.
def proc_state(pid: int) -> str | None:
    """The state letter in /proc/PID/stat (Z: a zombie), None when the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def alive(pid: int) -> bool:
    return proc_state(pid) not in (None, "Z", "X")


def processes_mentioning(text: str) -> dict[int, str]:
    """pid -> command line of every live process whose command line contains `text`."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        line = cmd.replace(b"\0", b" ").decode(errors="replace").strip()
        if text in line and alive(int(entry)):
            found[int(entry)] = line
    return found


def netns_inode(pid: int | None = None, name: str | None = None) -> int:
    """The inode of a process's or a named namespace's network namespace."""
    path = f"/proc/{pid}/ns/net" if pid is not None else f"/run/netns/{name}"
    return os.stat(path).st_ino


@dataclass
class TestHost:
    """A namespace with eth0, the peer of a veth `tap` on `bridge` (an instance stand-in)."""

    __test__ = False  # not a pytest class

    label: str
    ns: str
    tap: str
    bridge: str
    mac: str | None
    expected_ip: str | None = None  # what the plan reserved (address only)
    address: str | None = None  # "a.b.c.d/p" once configured
    dhcp_output: str = ""

    @property
    def ip(self) -> str:
        assert self.address, f"{self.label} ({self.ns}) has no address"
        return self.address.split("/")[0]


@dataclass
class Probe:
    what: str
    ok: bool
    output: str

    def __str__(self) -> str:
        return f"{self.what}: {'ok' if self.ok else 'failed'} ({self.output.strip()[-300:]})"


@dataclass
class NetEnv(HostEnv):
    """One test's tenants, state dir and host config, with the netlink driver."""

    others: dict[str, str] = field(default_factory=dict)  # label -> tenant, besides `tenant`
    hosts: dict[str, TestHost] = field(default_factory=dict)
    servers: list[subprocess.Popen] = field(default_factory=list)
    #: (tenant, network, "tenant/instance") -> the port as the last plan that held it says
    ports: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)
    #: router key -> its external address "a.b.c.d/p" as planned
    external_addresses: dict[str, str] = field(default_factory=dict)
    #: every Network and Router this test ever planned: (kind, tenant, name)
    declared: set[tuple[str, str, str]] = field(default_factory=set)
    last_manifest: Path | None = None
    last_plan: dict[str, Any] | None = None

    @property
    def tenants(self) -> set[str]:
        return {self.tenant, *self.others.values()}

    @property
    def home(self) -> str:
        return home_of(self.state_dir)

    @property
    def table(self) -> str:
        return f"reconciler_{self.home}"

    # --- the CLI ---------------------------------------------------------------------

    def plan_file(self, manifest: Path) -> tuple[subprocess.CompletedProcess[str], dict[str, Any] | None]:
        """`reconciler plan --json --out FILE manifest`: (result, the saved plan or None)."""
        self._plans += 1
        path = self.root / f"plan-{self._plans}.json"
        result = self.cli("plan", "--json", "--out", str(path), str(manifest))
        if result.returncode != 0 or not path.exists():
            return result, None
        data = json.loads(path.read_text())
        data["_path"] = str(path)
        return result, data

    def apply(self, manifest: Path, env: Mapping[str, str] | None = None,
              timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Like HostEnv.apply (plan --out, refuse foreign changes, apply that plan), for
        all of this test's tenants; remembers the planned ports and addresses."""
        result, data = self.plan_file(manifest)
        if data is None:
            return result
        changes = data["changes"]
        foreign = [f"{c['action']} {c['kind']} {c['tenant']}/{c['name']}" for c in changes
                   if c["action"] != "noop" and c["tenant"] not in self.tenants]
        if foreign:
            pytest.fail(f"refusing to apply {manifest}: its plan would change resources outside the "
                        f"test tenants {sorted(self.tenants)}: {', '.join(foreign)}", pytrace=False)
        self.remember(data)
        self.last_manifest, self.last_plan = manifest, data
        return self.cli("apply", data["_path"], env=env, timeout=timeout)

    def remember(self, plan: Mapping[str, Any]) -> None:
        for c in plan["changes"]:
            if c["kind"] in ("Network", "Router"):
                self.declared.add((c["kind"], c["tenant"], c["name"]))
            target = c.get("target") or {}
            derived = target.get("derived") or {}
            if c["kind"] == "Network":
                for port in derived.get("ports") or []:
                    self.ports[(c["tenant"], c["name"], port["owner"])] = port
            if c["kind"] == "Router" and derived.get("externalAddress"):
                self.external_addresses[f"{c['tenant']}/{c['name']}"] = derived["externalAddress"]

    def port(self, tenant: str, network: str, instance: str) -> dict[str, Any]:
        found = self.ports.get((tenant, network, f"{tenant}/{instance}"))
        assert found, f"no port of {tenant}/{instance} on {network} in the plans: {sorted(self.ports)}"
        return found

    # --- test hosts ------------------------------------------------------------------

    def _record(self, what: str, value: object) -> None:
        with open(self.root / f"{what}.txt", "a") as f:  # recorded first: teardown finds it
            f.write(f"{value}\n")

    def _recorded(self, what: str) -> list[str]:
        path = self.root / f"{what}.txt"
        return path.read_text().split() if path.exists() else []

    def add_host(self, label: str, bridge: str, tap: str | None = None, mac: str | None = None) -> TestHost:
        """Namespace `rct-<hex>` with eth0 (MAC `mac`), the peer of veth `tap` (default
        `rct<hex>`) enslaved to `bridge`, both ends at the bridge's MTU, up."""
        h = short_hash(self.tenant, label)
        ns, tap = f"rct-{h}", tap or f"rct{h}"
        self._record("namespaces", ns)
        run("ip", "netns", "add", ns)
        run("ip", "-n", ns, "link", "set", "lo", "up")
        run("ip", "link", "add", tap, "type", "veth", "peer", "name", "eth0", "netns", ns)
        mtu = Path("/sys/class/net", bridge, "mtu").read_text().strip()
        if mac:
            run("ip", "-n", ns, "link", "set", "eth0", "address", mac)
        run("ip", "-n", ns, "link", "set", "eth0", "mtu", mtu)
        run("ip", "link", "set", tap, "mtu", mtu)
        run("ip", "link", "set", tap, "master", bridge, "up")
        run("ip", "-n", ns, "link", "set", "eth0", "up")
        self.hosts[label] = host = TestHost(label, ns, tap, bridge, mac)
        return host

    def add_port_host(self, tenant: str, network: str, instance: str) -> TestHost:
        """The stand-in of an instance NIC: the tap and MAC the plan gave the port."""
        port = self.port(tenant, network, instance)
        host = self.add_host(f"{tenant}/{instance}/{network}", bridge_of(tenant, network),
                             tap=port["tap"], mac=port["mac"])
        host.expected_ip = port["ip"]
        return host

    def dhcp(self, host: TestHost, tries: int = 5) -> str | None:
        """busybox udhcpc in the host's namespace (`tries` discovers, 1 s apart); the
        address it configured ("a.b.c.d/p") or None."""
        script = self.root / "udhcpc.sh"
        if not script.exists():
            script.write_text(UDHCPC_SCRIPT)
            script.chmod(0o755)
        result = run("ip", "netns", "exec", host.ns, "busybox", "udhcpc", "-i", "eth0", "-n", "-q", "-f",
                     "-t", str(tries), "-T", "1", "-s", str(script), check=False, timeout=tries * 3 + 10)
        host.dhcp_output = (result.stdout + result.stderr).strip()
        found = ipv4_addresses("eth0", namespace=host.ns).get("eth0", [])
        host.address = found[0] if found else None
        return host.address

    def dhcp_all(self, hosts: Sequence[TestHost]) -> dict[str, str | None]:
        with ThreadPoolExecutor(max_workers=max(1, len(hosts))) as pool:
            return dict(zip((h.label for h in hosts), pool.map(self.dhcp, hosts)))

    def set_static(self, host: TestHost, address: str, gateway: str | None = None) -> None:
        run("ip", "-n", host.ns, "addr", "add", address, "dev", "eth0")
        if gateway:
            run("ip", "-n", host.ns, "route", "replace", "default", "via", gateway)
        host.address = address

    def serve(self, host: TestHost, *ports: int) -> Path:
        """A TCP server in the host's namespace answering "PEER PORT" on each port; its log."""
        log = self.root / f"serve-{host.ns}.log"
        err = open(self.root / f"serve-{host.ns}.err", "a")
        proc = subprocess.Popen(["ip", "netns", "exec", host.ns, str(PYTHON), str(PROBE), "serve", str(log),
                                 *map(str, ports)], stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        err.close()
        self.servers.append(proc)
        self._record("pids", proc.pid)
        try:
            wait_for(lambda: log.exists() and "ready" in log.read_text() or proc.poll() is not None, 10,
                     interval=0.05, what=f"the server in {host.ns} to listen")
        except AssertionError:
            raise AssertionError(f"server in {host.ns} not ready: "
                                 f"{(self.root / f'serve-{host.ns}.err').read_text()}") from None
        if proc.poll() is not None:
            raise AssertionError(f"server in {host.ns} exited {proc.returncode}: "
                                 f"{(self.root / f'serve-{host.ns}.err').read_text()}")
        return log

    def connect(self, host: TestHost, ip: str, port: int, timeout: float = 2.0) -> Probe:
        """One TCP connect from the host's namespace (at most `timeout` s)."""
        result = run("ip", "netns", "exec", host.ns, str(PYTHON), str(PROBE), "connect", ip, str(port),
                     str(timeout), check=False, timeout=2 * timeout + 10)
        return Probe(f"tcp {host.label} -> {ip}:{port}", result.returncode == 0,
                     (result.stdout + result.stderr).strip())

    def ping(self, host: TestHost, ip: str, source: str | None = None) -> Probe:
        """One ICMP echo from the host's namespace (1 s timeout), from `source` if given."""
        args = ("-I", source) if source else ()
        result = run("ip", "netns", "exec", host.ns, "ping", "-n", "-c1", "-W1", *args, ip, check=False, timeout=10)
        lines = (result.stdout + result.stderr).strip().splitlines()
        return Probe(f"ping {host.label} -> {ip}" + (f" from {source}" if source else ""),
                     result.returncode == 0, lines[-1] if lines else "")

    def http(self, host: TestHost, url: str, deadline_s: float) -> Probe:
        result = run("ip", "netns", "exec", host.ns, str(PYTHON), str(PROBE), "http", url, str(deadline_s),
                     check=False, timeout=deadline_s + 20)
        return Probe(f"http {host.label} -> {url}", result.returncode == 0, result.stdout + result.stderr)

    # --- teardown --------------------------------------------------------------------

    def stop_servers(self) -> list[str]:
        problems = []
        for proc in self.servers:
            if proc.poll() is None:
                try:
                    os.kill(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                proc.wait(timeout=10)  # ours: wait() reaps it
            except subprocess.TimeoutExpired:
                if alive(proc.pid):
                    problems.append(f"server pid {proc.pid} still running ({proc_state(proc.pid)})")
        self.servers.clear()
        return problems

    def remove_host(self, host: TestHost) -> None:
        """The namespace goes, and with it both ends of its veth."""
        run("ip", "netns", "del", host.ns, check=False)
        self.hosts.pop(host.label, None)

    def remove_hosts(self) -> list[str]:
        problems = []
        present = namespaces()
        for ns in dict.fromkeys(self._recorded("namespaces")):
            if ns in present:
                result = run("ip", "netns", "del", ns, check=False)
                if result.returncode != 0:
                    problems.append(f"ip netns del {ns}: {result.stderr.strip()}")
        self.hosts.clear()
        return problems

    def expected_names(self) -> tuple[set[str], set[str]]:
        """(links, namespaces) the driver creates for this test's networks and routers."""
        links, spaces = set(), set()
        for kind, tenant, name in self.declared:
            if kind == "Network":
                links |= {bridge_of(tenant, name), vxlan_of(tenant, name), "rl-" + net_hash(tenant, name)}
                spaces.add(dhcp_ns_of(tenant, name))
            else:
                spaces.add(router_ns_of(tenant, name))
        return links, spaces

    def leftovers(self) -> list[tuple[str, str, str]]:
        """(what, name, detail) of everything of this installation still on the host."""
        found: list[tuple[str, str, str]] = []
        names, spaces = self.expected_names()
        for entry in all_links():
            alias = entry.get("ifalias") or ""
            if f"home={self.home}" in alias or entry["ifname"] in names:
                found.append(("link", entry["ifname"], alias))
        for ns in sorted(namespaces() & spaces):
            found.append(("namespace", ns, ""))
        for family, name in sorted(nft_tables()):
            if name == self.table:
                found.append(("nft table", f"{family} {name}", ""))
        for pid, cmd in sorted(processes_mentioning(str(self.state_dir)).items()):
            found.append(("process", str(pid), cmd))
        return found

    def force_remove(self, leftovers: Iterable[tuple[str, str, str]]) -> None:
        for what, name, _ in leftovers:
            if what == "link":
                run("ip", "link", "del", "dev", name, check=False)
            elif what == "namespace":
                run("ip", "netns", "del", name, check=False)
            elif what == "nft table":
                run("nft", "delete", "table", *name.split(), check=False)
            elif what == "process":
                try:
                    os.kill(int(name), signal.SIGKILL)  # a dnsmasq of this test's state dir
                except ProcessLookupError:
                    pass

    def cleanup(self) -> list[str]:
        problems: list[str] = []
        if self.last_manifest is not None and self.state_dir.exists():
            result = self.cli("destroy", "--yes", str(self.last_manifest))
            if result.returncode != 0:
                problems.append(f"reconciler destroy exited {result.returncode}:\n{result.stdout[-3000:]}"
                                f"\n{result.stderr[-3000:]}")
        problems += self.stop_servers()
        problems += self.remove_hosts()
        left = self.leftovers()
        if left:
            problems.append("left on the host after destroy (removed now by the test): "
                            + "; ".join(f"{w} {n}" + (f" ({d})" if d else "") for w, n, d in left))
            self.force_remove(left)
            time.sleep(0.5)
            still = self.leftovers()
            if still:
                problems.append(f"could not remove: {still}")
        for pid in self._recorded("pids"):
            if alive(int(pid)):
                problems.append(f"test server pid {pid} still running")
        problems += super().cleanup()  # domains titled <tenant>/..., the state dir
        return problems


def host_config(env: NetEnv, compute: str = "memory", domain_type: str = "qemu") -> None:
    drivers = {"Tenant": "memory", "Volume": "memory", "Bucket": "memory",
               "Network": "netlink", "Router": "netlink", "SecurityGroup": "netlink",
               "Image": compute, "Instance": compute}
    config: dict[str, Any] = {"stateDir": str(env.state_dir), "drivers": drivers, "lockTimeoutSeconds": 60}
    if compute == "libvirt":
        config["libvirt"] = {"uri": URI, "domainType": domain_type, "shutdownTimeoutSeconds": 10,
                             "probeImage": str(IMAGE)}
    env.host_config.write_text(json.dumps(config, indent=2) + "\n")  # JSON is YAML


@contextmanager
def net_env(others: Sequence[str] = (), compute: str = "memory") -> Iterator[NetEnv]:
    """A NetEnv with a main tenant and one more `rctest<hex>` tenant per label in `others`;
    Network, Router and SecurityGroup on netlink, Image and Instance on `compute`."""
    require_network_host(compute)
    if not RECONCILER.exists():
        pytest.fail(f"{RECONCILER} missing: install the project into .venv", pytrace=False)
    tenant = f"{TENANT_PREFIX}{secrets.token_hex(4)}"
    _make_dir(TEST_TMP.parent)
    _make_dir(TEST_TMP)
    env = NetEnv(tenant=tenant, root=TEST_TMP / tenant,
                 others={label: f"{TENANT_PREFIX}{secrets.token_hex(4)}" for label in others})
    _make_dir(env.root)
    _make_dir(env.state_dir)
    host_config(env, compute)
    try:
        yield env
    finally:
        problems = env.cleanup()
        if problems:
            raise AssertionError("teardown found problems:\n" + "\n".join(problems))
