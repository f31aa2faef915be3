"""Isolation: a matrix of real probes between the ports of four tenants, each cell's
expected result computed from the manifests' rules, never written per cell.

The cloud (Network, Router and SecurityGroup on the netlink driver; instances in memory,
each NIC stood in for by a namespace with the port's tap and MAC, see netns.py):

- provider P: `ext` (flat, external, no DHCP) and on it the namespace `outside`, holding
  the subnet's gateway, forwarding, with routes to every routed tenant subnet via the
  routers' external addresses: an upstream that would carry traffic between tenants (and
  to the routers' inner addresses) if the routers let it;
- tenant A: `front` and `back` (DHCP), router `r` on both (external P/ext); groups `ssh`
  (tcp/22 from anywhere), `app` (tcp/8080 only from members of app, ICMP only from
  back's CIDR, tcp/7000-7010 only from front's CIDR), `locked` (egress only tcp/8080 to
  front's CIDR, no ingress rule); ports a1 (no groups), a2 (ssh, app), a3 (app), a4
  (locked) on front, b1 (app) and b2 (ssh) on back;
- tenant B: `net`, router `r` (external P/ext); groups named like A's: `ssh` (tcp/22 and
  ICMP from anywhere: A's addresses included) and `app` (tcp/8080 from members of B's
  app); ports h1 (ssh, app), h2 (app), h3 (no groups);
- tenant C: `net` without a router; group `all` (anything from anywhere); ports c1 (no
  groups), c2 (all).

Tests 1-4 share that cloud (ICMP/TCP matrix, the host, ARP, DHCP); test 5 has a cloud of
its own with a real libvirt guest (its tap made by libvirt, not a stand-in) behind a
group, probed from plain hosts on its network, another tenant's network and the outside.

Expected (the model below, from the same data the manifests are written from): a probe
between two ports is allowed iff they are of one tenant, on one network or on two
networks of a common router, the sender's groups allow it out and the receiver's groups
allow it in (docs/networking.md: no groups = unfiltered; a group without egress rules
allows all egress; ingress is denied unless a rule allows it). A router's addresses
(gateways, external address) answer only the ports of the networks it joins; a DHCP
server only its own network; the outside only through a router's SNAT; nothing accepts
new traffic from the external network; the host (its own addresses, the bridges) answers
no one; ports send no IPv6, claim no other address by ARP and serve no DHCP.

Probes, each a real packet from inside a namespace: `ping -c1 -W1`; TCP connects (one
process per source namespace connecting to all its targets at once, 2 s each: open,
refused (RST: reachable) or silent); `ping -6` to link-local neighbours; to the host's
addresses with a route and a permanent neighbour entry to the bridge's MAC (the way
round the missing ARP answer), the host's answers counted, and dropped, by a table of
the test's own at the host's input and output hooks, plus `busybox arping` for the ARP
answer itself; ARP claims crafted with a raw socket, then the victims' `ip neigh`;
busybox udhcpc and udhcpd (a rogue server in a port's namespace), with a raw-socket
sniffer in the victims' namespaces. A leak is a denied probe that gets through, a block
an allowed one that does not (retried twice: the first packet of a flow may wait for
ARP); either fails the test with the whole table. Where a probe could pass unseen (an
ARP claim, a rogue offer), a control proves it works: the same frames from a namespace
that is no port do take a neighbour entry over, the rogue server's log shows its offers,
and the sniffers hear the real server's.

Found by this suite and fixed (the matrix is their regression test, besides unit tests
in tests/unit/test_netlink_nft.py): a router answered on every address it holds from the
external network, so the outside and, through it, another tenant's ports reached its
gateways and external address (now: its table's input chain, policy drop but replies,
the internal legs and lo); the host took packets a port sent to the bridge's MAC for one
of the host's own addresses, and answered its ARP (now: an input rule per network in the
inet table, and arp_ignore 8 on our bridges).

Figures (tests/figures.py, suite "isolation"): probes, allowed, denied, leaks,
wrongly_blocked. The release count (RECONCILER_RELIABILITY=release) probes more TCP
port numbers per pair.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import pytest

import figures
from conftest import IMAGE, domstate, ok, wait_for
from netns import (
    PYTHON,
    NetEnv,
    TestHost,
    bridge_of,
    dhcp_ns_of,
    free_subnets,
    ip_json,
    link,
    net_env,
    netns_inode,
    processes_mentioning,
    require_network_host,
    router_ns_of,
    run,
)

pytestmark = [pytest.mark.reliability]

#: (port number, a server listens on it); the CI run probes the first three per pair
TCP_PORTS = [(22, True), (8080, True), (7001, False), (7005, True), (23, False), (443, True),
             (8081, False), (5432, False)]
PROBED_TCP = TCP_PORTS[:figures.count(ci=3, release=len(TCP_PORTS))]
LISTENING = [p for p, listening in PROBED_TCP if listening]
#: TCP port probed on routers, DHCP servers and the host: nothing listens there, so a
#: reachable address answers with a RST (8080: allowed by `locked` within front's CIDR)
INFRA_TCP = 8080
CONNECT_TIMEOUT = 2.0
ATTEMPTS = 3  # an allowed probe that fails is tried again twice; a denied one never


@pytest.fixture(autouse=True)
def _real_host() -> None:
    require_network_host()


# --- the cloud as data: the manifests are written from it, the expectations computed --------


@dataclass(frozen=True)
class Port:
    label: str
    net: str  # "A/front"
    groups: tuple[str, ...] = ()
    #: port: an instance NIC stood in for by a namespace with its tap and MAC; guest: an
    #: instance on libvirt; plain: a namespace with a fixed address that is no port
    kind: str = "port"

    @property
    def tenant(self) -> str:
        return self.net.split("/")[0]


Rules = dict[tuple[str, str], list[dict[str, str]]]


@dataclass(frozen=True)
class Design:
    """A cloud: its networks (the first is the provider's external one), routers (each
    with external P/ext), ports, and its groups' rules (from the subnets)."""

    nets: tuple[str, ...]
    routers: dict[str, tuple[str, ...]]
    ports: tuple[Port, ...]
    rules: Callable[[dict[str, IPv4Network]], Rules]


OUTSIDE = "outside"


def group_rules(subnets: dict[str, IPv4Network]) -> Rules:
    """(tenant label, group) -> the group's rules as the manifest writes them."""
    return {
        ("A", "ssh"): [{"protocol": "tcp", "ports": "22"}],
        ("A", "app"): [{"protocol": "tcp", "ports": "8080", "remote": "app"},
                       {"protocol": "icmp", "remote": str(subnets["A/back"])},
                       {"protocol": "tcp", "ports": "7000-7010", "remote": str(subnets["A/front"])}],
        ("A", "locked"): [{"direction": "egress", "protocol": "tcp", "ports": "8080",
                           "remote": str(subnets["A/front"])}],
        ("B", "ssh"): [{"protocol": "tcp", "ports": "22", "remote": "0.0.0.0/0"},
                       {"protocol": "icmp", "remote": "0.0.0.0/0"}],
        ("B", "app"): [{"protocol": "tcp", "ports": "8080", "remote": "app"}],
        ("C", "all"): [{"protocol": "any", "remote": "0.0.0.0/0"}],
    }


MATRIX = Design(
    nets=("P/ext", "A/front", "A/back", "B/net", "C/net"),
    routers={"A/r": ("A/front", "A/back"), "B/r": ("B/net",)},
    ports=(Port("a1", "A/front"), Port("a2", "A/front", ("ssh", "app")), Port("a3", "A/front", ("app",)),
           Port("a4", "A/front", ("locked",)), Port("b1", "A/back", ("app",)), Port("b2", "A/back", ("ssh",)),
           Port("h1", "B/net", ("ssh", "app")), Port("h2", "B/net", ("app",)), Port("h3", "B/net"),
           Port("c1", "C/net"), Port("c2", "C/net", ("all",))),
    rules=group_rules,
)


def guest_rules(subnets: dict[str, IPv4Network]) -> Rules:
    allowed = f"{subnets['G/net'].network_address + 3}/32"  # g-allowed, the first plain host
    return {("G", "web"): [{"protocol": "tcp", "ports": "80", "remote": allowed},
                           {"protocol": "icmp", "remote": allowed},
                           {"protocol": "tcp", "ports": "81-89", "remote": str(subnets["G/net"])}]}


#: a real guest (its tap made by libvirt) behind the same rules: tenant G's `vm` with
#: `web` (tcp/80 and ICMP from g-allowed only, tcp/81-89 from G's subnet; 80 is its HTTP
#: server, 81 closed), plain hosts on G's network and on tenant H's
GUEST = Design(
    nets=("P/ext", "G/net", "H/net"),
    routers={"G/r": ("G/net",), "H/r": ("H/net",)},
    ports=(Port("vm", "G/net", ("web",), "guest"), Port("g-allowed", "G/net", kind="plain"),
           Port("g-other", "G/net", kind="plain"), Port("h-any", "H/net", kind="plain")),
    rules=guest_rules,
)
GUEST_TCP = [(80, True), (81, False)]


def doc(kind: str, tenant: str | None, name: str, spec: dict[str, Any]) -> str:
    meta = {"name": name} if tenant is None else {"name": name, "tenant": tenant}
    return ("---\napiVersion: reconciler/v1\n"
            f"kind: {kind}\nmetadata: {json.dumps(meta)}\nspec: {json.dumps(spec)}\n")


@dataclass
class Node:
    """A probe source or target: a port, the outside, or an address of the cloud itself."""

    label: str
    kind: str  # port | outside | gateway | external | dhcp | host
    ip: str
    net: str | None = None  # the network it is on (a port's, a gateway's, a DHCP server's)
    router: str | None = None  # a gateway's or external address's router
    port: Port | None = None
    host: TestHost | None = None
    tcp: Sequence[tuple[int, bool]] = ()  # (port, something listens) probed on a port or host


@dataclass
class Cloud:
    env: NetEnv
    design: Design
    tenants: dict[str, str]  # label -> tenant name
    subnets: dict[str, IPv4Network]
    manifest: Path = Path()
    nodes: dict[str, Node] = field(default_factory=dict)  # ports and the outside
    infra: list[Node] = field(default_factory=list)  # gateways, external addresses, DHCP servers
    ranges: dict[str, tuple[IPv4Address, IPv4Address]] = field(default_factory=dict)  # net -> DHCP range
    servers: dict[str, str] = field(default_factory=dict)  # net -> DHCP server address
    strangers: dict[str, TestHost] = field(default_factory=dict)
    dhcp_cells: list["Cell"] = field(default_factory=list)  # the ports' own leases, at setup

    def net_key(self, net: str) -> tuple[str, str]:
        tenant, name = net.split("/")
        return self.tenants[tenant], name

    @property
    def rules(self) -> Rules:
        return self.design.rules(self.subnets)

    @property
    def instances(self) -> list[Port]:
        return [p for p in self.design.ports if p.kind != "plain"]

    def bridge(self, net: str) -> str:
        return bridge_of(*self.net_key(net))

    def net_of(self, host: TestHost) -> str:
        return next(n for n in self.design.nets if self.bridge(n) == host.bridge)

    def plain_address(self, port: Port) -> IPv4Address:
        """A plain host's fixed address: .3, .4... of its subnet (below the DHCP range)."""
        same = [p for p in self.design.ports if p.kind == "plain" and p.net == port.net]
        return self.subnets[port.net].network_address + 3 + same.index(port)

    def write(self) -> Path:
        t, s = self.tenants, self.subnets
        text = "".join(doc("Tenant", None, name, {}) for name in t.values())
        text += "".join(doc("Image", t[x], "tiny", {"source": str(IMAGE)}) for x in {p.tenant for p in self.instances})
        text += doc("Network", t["P"], "ext", {"type": "flat", "external": True,
                                               "subnets": [{"cidr": str(s["P/ext"]), "dhcp": {"enabled": False}}]})
        for net in self.design.nets[1:]:
            tenant, name = self.net_key(net)
            text += doc("Network", tenant, name, {"subnets": [{"cidr": str(s[net])}]})
        for router, nets in self.design.routers.items():
            tenant, name = self.net_key(router)
            text += doc("Router", tenant, name, {"networks": [n.split("/")[1] for n in nets],
                                                 "external": f"{t['P']}/ext"})
        for (tenant, group), rules in self.rules.items():
            text += doc("SecurityGroup", t[tenant], group, {"rules": rules})
        for port in self.instances:
            nic: dict[str, Any] = {"network": port.net.split("/")[1]}
            if port.groups:
                nic["securityGroups"] = list(port.groups)
            spec: dict[str, Any] = {"image": "tiny", "memoryMiB": 128, "rootDiskGiB": 1, "networks": [nic]}
            if port.kind == "guest":
                spec.update(vcpus=1, restartPolicy="Never")
            text += doc("Instance", t[port.tenant], port.label, spec)
        self.manifest = self.env.write_manifest(text)
        return self.manifest

    # --- the model: what the manifests allow ---------------------------------------------

    def members(self, tenant: str, group: str) -> set[str]:
        return {n.ip for n in self.nodes.values() if n.port and n.port.kind != "plain" and n.port.tenant == tenant
                and group in n.port.groups}

    def matches(self, tenant: str, rule: dict[str, str], proto: str, dport: int | None, peer: str) -> bool:
        if rule.get("protocol", "any") not in ("any", proto):
            return False
        if rule.get("ports"):
            lo, _, hi = rule["ports"].partition("-")
            if dport is None or not int(lo) <= dport <= int(hi or lo):
                return False
        remote = rule.get("remote", "0.0.0.0/0")
        if remote[0].isdigit():
            return IPv4Address(peer) in IPv4Network(remote)
        return peer in self.members(tenant, remote)

    def egress(self, port: Port, peer: str, proto: str, dport: int | None) -> tuple[bool, str]:
        if not port.groups:
            return True, f"{port.label} has no groups"
        for group in port.groups:
            out = [r for r in self.rules[(port.tenant, group)] if r.get("direction") == "egress"]
            if not out:
                return True, f"{group} has no egress rule"
            for rule in out:
                if self.matches(port.tenant, rule, proto, dport, peer):
                    return True, f"egress {group} {rule}"
        return False, f"no egress rule of {port.label}'s groups {list(port.groups)} allows it"

    def ingress(self, port: Port, peer: str, proto: str, dport: int | None) -> tuple[bool, str]:
        if not port.groups:
            return True, f"{port.label} has no groups"
        for group in port.groups:
            for rule in self.rules[(port.tenant, group)]:
                if rule.get("direction", "ingress") == "ingress" and self.matches(port.tenant, rule, proto, dport, peer):
                    return True, f"ingress {group} {rule}"
        return False, f"no ingress rule of {port.label}'s groups {list(port.groups)} allows it"

    def routers_of(self, net: str) -> set[str]:
        return {r for r, nets in self.design.routers.items() if net in nets}

    def expected(self, src: Node, dst: Node, proto: str, dport: int | None) -> tuple[bool, str]:
        """(allowed, why) for one probe, from the manifests' networks, routers and groups."""
        if src.port is None:
            return False, "new traffic from the external network"
        port = src.port
        if dst.kind == "host":
            return False, "the host is on no tenant network"
        if dst.kind == OUTSIDE:
            if not self.routers_of(port.net):
                return False, f"{port.net} has no router"
            allowed, why = self.egress(port, dst.ip, proto, dport)
            return allowed, "through the router's SNAT; " + why
        if dst.kind in ("gateway", "external"):
            assert dst.router
            if dst.router not in self.routers_of(port.net):
                return False, f"{dst.router} is not a router of {port.net}"
            return self.egress(port, dst.ip, proto, dport)
        if dst.kind == "dhcp":
            if dst.net != port.net:
                return False, f"the DHCP server of {dst.net}"
            return self.egress(port, dst.ip, proto, dport)
        assert dst.port is not None
        if dst.port.tenant != port.tenant:
            return False, "another tenant"
        if dst.port.net != port.net and not self.routers_of(port.net) & self.routers_of(dst.port.net):
            return False, "no router joins the two networks"
        allowed, why = self.egress(port, dst.ip, proto, dport)
        if not allowed:
            return False, why
        return self.ingress(dst.port, src.ip, proto, dport)


# --- cells and the table ----------------------------------------------------------------


@dataclass
class Cell:
    kind: str
    src: str
    dst: str
    what: str  # the address, port or claim probed
    allowed: bool
    why: str
    got: bool | None = None
    output: str = ""

    @property
    def verdict(self) -> str:
        if self.got is None:
            return "NOT RUN"
        if self.got == self.allowed:
            return "ok"
        return "LEAK" if self.got else "BLOCKED"

    def line(self) -> str:
        got = "-" if self.got is None else ("through" if self.got else "stopped")
        return (f"{self.verdict:8} {self.kind:9} {self.src:8} -> {self.dst:12} {self.what:24} "
                f"expected {'allowed' if self.allowed else 'denied ':7} got {got:8} "
                f"[{self.why}] {self.output.strip()[-160:]}")


def judge(title: str, cells: Sequence[Cell], controls: Sequence[str] = ()) -> None:
    """Record the figures; fail with the whole table on any leak, block or failed control."""
    leaks = [c for c in cells if c.verdict == "LEAK"]
    blocked = [c for c in cells if c.verdict in ("BLOCKED", "NOT RUN")]
    figures.record("isolation", probes=len(cells), allowed=sum(c.allowed for c in cells),
                   denied=sum(not c.allowed for c in cells), leaks=len(leaks), wrongly_blocked=len(blocked))
    table = "\n".join(c.line() for c in cells)
    print(f"{title}: {len(cells)} probes, {len(leaks)} leaks, {len(blocked)} wrongly blocked\n{table}")
    if leaks or blocked or controls:
        raise AssertionError(
            f"{title}: {len(leaks)} leaks, {len(blocked)} allowed probes blocked"
            + "".join(f"\ncontrol failed: {c}" for c in controls) + "\n"
            + "\n".join(c.line() for c in leaks + blocked)
            + f"\n\nthe whole table ({len(cells)} probes):\n{table}")


def parallel(calls: Sequence[Callable[[], Any]], workers: int = 48) -> list[Any]:
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(calls)))) as pool:
        return list(pool.map(lambda c: c(), calls))


# --- probes run inside the namespaces (stdlib Python, passed with -c) ---------------------

#: connect to every (ip, port) of argv[1] at once; per target "open LINE", "ECONNREFUSED",
#: "timeout" or another errno name, as a JSON list in order
TCP_PROBER = r"""
import errno, json, selectors, socket, sys, time
targets, timeout = json.loads(sys.argv[1]), float(sys.argv[2])
sel, out, connected = selectors.DefaultSelector(), {}, {}
for i, (ip, port) in enumerate(targets):
    s = socket.socket()
    s.setblocking(False)
    code = s.connect_ex((ip, port))
    if code in (0, errno.EINPROGRESS):
        sel.register(s, selectors.EVENT_WRITE, i)
    else:
        out[i] = errno.errorcode.get(code, str(code))
        s.close()
deadline = time.monotonic() + timeout
while sel.get_map() and (left := deadline - time.monotonic()) > 0:
    for key, _ in sel.select(left):
        s, i = key.fileobj, key.data
        sel.unregister(s)
        code = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            out[i] = errno.errorcode.get(code, str(code))
            s.close()
        else:
            connected[i] = s
for key in list(sel.get_map().values()):
    out[key.data] = "timeout"
    key.fileobj.close()
for i, s in connected.items():
    s.settimeout(1.0)
    data = b""
    try:
        while not data.endswith(b"\n"):
            chunk = s.recv(256)
            if not chunk:
                break
            data += chunk
    except OSError:
        pass
    s.close()
    out[i] = "open " + data.decode(errors="replace").strip()
print(json.dumps([out[i] for i in range(len(targets))]))
"""

#: every frame received on eth0 for argv[1] seconds, one JSON object per line ("ready" first)
SNIFFER = r"""
import json, socket, struct, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.bind(("eth0", 0))
s.settimeout(0.1)
print("ready", flush=True)
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    try:
        data, addr = s.recvfrom(65535)
    except socket.timeout:
        continue
    if addr[2] == socket.PACKET_OUTGOING or len(data) < 14:
        continue
    kind = struct.unpack("!H", data[12:14])[0]
    rec = {"dst": data[0:6].hex(":"), "src": data[6:12].hex(":"), "type": kind}
    if kind == 0x0800 and len(data) >= 34:
        ihl, proto = (data[14] & 15) * 4, data[23]
        rec.update(ipsrc=socket.inet_ntoa(data[26:30]), ipdst=socket.inet_ntoa(data[30:34]), proto=proto)
        if proto in (6, 17) and len(data) >= 14 + ihl + 4:
            rec.update(zip(("sport", "dport"), struct.unpack("!HH", data[14 + ihl:18 + ihl])))
    elif kind == 0x0806 and len(data) >= 42:
        rec.update(op=struct.unpack("!H", data[20:22])[0], sha=data[22:28].hex(":"),
                   spa=socket.inet_ntoa(data[28:32]), tpa=socket.inet_ntoa(data[38:42]))
    print(json.dumps(rec), flush=True)
"""

#: send ARP frames from eth0: argv[1] a JSON list of [op, eth dst, sender MAC, sender IP,
#: target MAC, target IP], argv[2] rounds, argv[3] seconds between rounds
ARP_SENDER = r"""
import json, socket, struct, sys, time
frames = []
mac = lambda m: bytes.fromhex(m.replace(":", ""))
for op, dst, sha, spa, tha, tpa in json.loads(sys.argv[1]):
    frames.append(mac(dst) + mac(sha) + struct.pack("!HHHBBH", 0x0806, 1, 0x0800, 6, 4, op)
                  + mac(sha) + socket.inet_aton(spa) + mac(tha) + socket.inet_aton(tpa))
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth0", 0))
for i in range(int(sys.argv[2])):
    for frame in frames:
        s.send(frame)
    time.sleep(float(sys.argv[3]))
"""


def netns_python(ns: str, code: str, *args: str) -> list[str]:
    return ["ip", "netns", "exec", ns, str(PYTHON), "-c", code, *args]


def tcp_probe(ns: str, targets: Sequence[tuple[str, int]]) -> list[str]:
    if not targets:
        return []
    result = run(*netns_python(ns, TCP_PROBER, json.dumps(list(targets)), str(CONNECT_TIMEOUT)),
                 timeout=CONNECT_TIMEOUT + len(targets) + 30)
    return json.loads(result.stdout)


def tcp_reached(outcome: str) -> bool:
    """Connected, or refused by the peer's RST: either way the packet got there."""
    return outcome.startswith("open") or outcome == "ECONNREFUSED"


def ping(ns: str, ip: str, v6: bool = False) -> tuple[bool, str]:
    result = run("ip", "netns", "exec", ns, "ping", *(("-6",) if v6 else ()), "-n", "-c1", "-W1", ip,
                 check=False, timeout=15)
    lines = (result.stdout + result.stderr).strip().splitlines()
    return result.returncode == 0, lines[-1] if lines else ""


class Sniffer:
    """The raw-socket sniffer in a namespace, for `seconds`; `frames()` once it ended."""

    def __init__(self, ns: str, seconds: float):
        self.proc = subprocess.Popen(netns_python(ns, SNIFFER, str(seconds)), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline().strip()
        if first != "ready":
            self.proc.kill()
            raise AssertionError(f"sniffer in {ns}: {first} {self.proc.stderr.read() if self.proc.stderr else ''}")

    def frames(self) -> list[dict[str, Any]]:
        out, err = self.proc.communicate(timeout=60)
        assert self.proc.returncode == 0, err
        return [json.loads(line) for line in out.splitlines() if line.strip()]


# --- the clouds -----------------------------------------------------------------------------


def make_cloud(env: NetEnv, design: Design) -> Cloud:
    """Apply `design` (tenant labels: the first of its networks' after P is the env's own
    tenant, then env.others in order) and set up its hosts, servers and the outside."""
    labels = list(dict.fromkeys(n.split("/")[0] for n in design.nets[1:]))
    tenants = {"P": env.others["p"], labels[0]: env.tenant,
               **{x: env.others[x.lower()] for x in labels[1:]}}
    subnets = {n: IPv4Network(s) for n, s in zip(design.nets, free_subnets(len(design.nets)))}
    c = Cloud(env, design, tenants, subnets)
    started = time.monotonic()
    ok(env.apply(c.write()))
    print(f"apply of the cloud: {time.monotonic() - started:.1f} s")
    setup(c)
    return c


@pytest.fixture(scope="module")
def cloud() -> Iterator[Cloud]:
    with net_env(others=("b", "c", "p")) as env:
        yield make_cloud(env, MATRIX)


def setup(c: Cloud) -> None:
    env = c.env
    ports = [p for p in c.design.ports if p.kind == "port"]
    hosts = {p.label: env.add_port_host(*c.net_key(p.net), p.label) for p in ports}
    env.dhcp_all(list(hosts.values()))
    for p in ports:  # the ports' own leases: their reservations, in their own subnets
        h = hosts[p.label]
        want = f"{h.expected_ip}/{c.subnets[p.net].prefixlen}"
        gateway = str(c.subnets[p.net].network_address + 1)
        route = run("ip", "-n", h.ns, "route", "show", "default").stdout.strip() if h.address else ""
        good = h.address == want and (f"via {gateway} " in route or not c.routers_of(p.net))
        c.dhcp_cells.append(Cell("dhcp", p.label, p.net, f"lease {want}", True, "its reservation", good,
                                 f"got {h.address}, {route!r}"))
        c.nodes[p.label] = Node(p.label, "port", h.expected_ip or "", p.net, port=p, host=h, tcp=PROBED_TCP)
    for p in c.design.ports:
        if p.kind == "plain":
            h = env.add_host(p.label, c.bridge(p.net))
            gateway = str(c.subnets[p.net].network_address + 1) if c.routers_of(p.net) else None
            env.set_static(h, f"{c.plain_address(p)}/{c.subnets[p.net].prefixlen}", gateway)
            c.nodes[p.label] = Node(p.label, "port", h.ip, p.net, port=p, host=h, tcp=PROBED_TCP)
        elif p.kind == "guest":
            ip = env.port(*c.net_key(p.net), p.label)["ip"]
            c.nodes[p.label] = Node(p.label, "port", ip, p.net, port=p, tcp=GUEST_TCP)
    # the outside: the external subnet's gateway, an upstream router for every tenant
    ext = c.subnets["P/ext"]
    outside = env.add_host(OUTSIDE, c.bridge("P/ext"))
    env.set_static(outside, f"{ext.network_address + 1}/{ext.prefixlen}")
    run("ip", "netns", "exec", outside.ns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
    c.nodes[OUTSIDE] = Node(OUTSIDE, OUTSIDE, outside.ip, "P/ext", host=outside, tcp=PROBED_TCP)
    # the cloud's own addresses, read from the host: router legs and DHCP legs
    for router, nets in c.design.routers.items():
        ns = router_ns_of(*c.net_key(router))
        for entry in ip_json("-4", "addr", "show", namespace=ns):
            for a in entry.get("addr_info", []):
                addr = IPv4Address(a["local"])
                if entry["ifname"].startswith("qg-"):
                    c.infra.append(Node(f"ext:{router}", "external", str(addr), "P/ext", router=router))
                    continue
                for net in nets:
                    if addr in c.subnets[net]:
                        c.infra.append(Node(f"gw:{net}", "gateway", str(addr), net, router=router))
    for net in c.design.nets[1:]:
        ns = dhcp_ns_of(*c.net_key(net))
        held = [a["local"] for e in ip_json("-4", "addr", "show", namespace=ns) for a in e.get("addr_info", [])
                if IPv4Address(a["local"]) in c.subnets[net]]
        assert len(held) == 1, f"DHCP namespace {ns} of {net} holds {held}"
        c.servers[net] = held[0]
        c.infra.append(Node(f"dhcp:{net}", "dhcp", held[0], net))
        inode = netns_inode(name=ns)
        for pid, cmd in processes_mentioning(str(env.state_dir)).items():
            if "dnsmasq" in cmd and netns_inode(pid=pid) == inode:
                spec = [a for a in cmd.split() if a.startswith("--dhcp-range=")][0].split("=", 1)[1].split(",")
                c.ranges[net] = (IPv4Address(spec[0]), IPv4Address(spec[1]))
    gateways = sorted(n.label for n in c.infra if n.kind == "gateway")
    assert gateways == sorted(f"gw:{n}" for nets in c.design.routers.values() for n in nets), c.infra
    assert set(c.ranges) == set(c.design.nets[1:]), c.ranges
    for router, nets in c.design.routers.items():
        external = [n for n in c.infra if n.label == f"ext:{router}"]
        assert len(external) == 1, c.infra
        for net in nets:
            run("ip", "-n", outside.ns, "route", "add", str(c.subnets[net]), "via", external[0].ip)
    for node in c.nodes.values():
        if node.host is not None and node.host.address:
            env.serve(node.host, *LISTENING)


def sources(c: Cloud) -> list[Node]:
    """The ports and plain hosts that got an address, and the outside."""
    return [n for n in c.nodes.values() if n.host is not None and n.host.address]


def run_cells(cells: list[Cell], attempt: Callable[[list[Cell]], None]) -> None:
    """`attempt` sets got/output of the cells it is given; the allowed cells that failed are
    tried again (up to ATTEMPTS in all), the denied ones never."""
    attempt(cells)
    for _ in range(ATTEMPTS - 1):
        again = [x for x in cells if x.allowed and not x.got]
        if not again:
            break
        time.sleep(0.3)
        attempt(again)


def probe_matrix(c: Cloud) -> list[Cell]:
    """ICMP and TCP from every source to every port, plain host, the outside and every
    address of the cloud itself; the cells, run."""
    srcs = sources(c)
    missing = [f"{n.label}: {n.host.dhcp_output[-300:]}" for n in c.nodes.values() if n.host and not n.host.address]
    assert not missing, "hosts without an address:\n" + "\n".join(missing)
    cells: list[Cell] = []
    plan: list[tuple[Node, Node, str, int | None]] = []
    for src in srcs:
        for dst in [*c.nodes.values(), *c.infra]:
            if dst is src:
                continue
            infra = dst.kind not in ("port", OUTSIDE)
            probes = [("icmp", None)] + [("tcp", p) for p, _ in ([(INFRA_TCP, False)] if infra else dst.tcp)]
            for proto, dport in probes:
                allowed, why = c.expected(src, dst, proto, dport)
                what = dst.ip + (f":{dport}" if dport else "")
                if proto == "tcp" and not infra:
                    what += " (open)" if dict(dst.tcp)[dport] else " (closed)"  # type: ignore[index]
                plan.append((src, dst, proto, dport))
                cells.append(Cell(proto, src.label, dst.label, what, allowed, why))
    index = {id(x): i for i, x in enumerate(cells)}

    def attempt(todo: list[Cell]) -> None:
        by_src: dict[str, list[Cell]] = {}
        pings = []
        for cell in todo:
            src, _, proto, _ = plan[index[id(cell)]]
            if proto == "icmp":
                pings.append(cell)
            else:
                by_src.setdefault(src.label, []).append(cell)

        def tcp(label: str) -> None:
            group = by_src[label]
            outcomes = tcp_probe(c.nodes[label].host.ns,  # type: ignore[union-attr]
                                 [(plan[index[id(x)]][1].ip, plan[index[id(x)]][3]) for x in group])
            for cell, outcome in zip(group, outcomes):
                cell.got, cell.output = tcp_reached(outcome), outcome

        def icmp(cell: Cell) -> None:
            src, dst, _, _ = plan[index[id(cell)]]
            cell.got, cell.output = ping(src.host.ns, dst.ip)  # type: ignore[union-attr]

        parallel([lambda label=label: tcp(label) for label in by_src] + [lambda x=x: icmp(x) for x in pings])

    started = time.monotonic()
    run_cells(cells, attempt)
    print(f"{len(cells)} probes in {time.monotonic() - started:.1f} s")
    return cells


# --- 1. ICMP and TCP between every pair, to the routers and DHCP servers -------------------


def test_1_icmp_and_tcp_between_every_pair_and_to_every_router_and_dhcp_server(cloud: Cloud) -> None:
    c = cloud
    cells = probe_matrix(c)
    # IPv6: ports send none (link-local between neighbours of one network)
    v6: list[tuple[Cell, str, str]] = []
    for src in sources(c):
        for dst in sources(c):
            if src is dst or src.port is None or dst.net != src.net:
                continue
            local = [a["local"] for e in ip_json("-6", "addr", "show", "dev", "eth0", namespace=dst.host.ns)  # type: ignore[union-attr]
                     for a in e.get("addr_info", []) if a["local"].startswith("fe80:")]
            if local:
                v6.append((Cell("icmp6", src.label, dst.label, f"{local[0]}%eth0", False,
                                "ports send no IPv6 (anti-spoofing)"), src.host.ns, f"{local[0]}%eth0"))  # type: ignore[union-attr]
    assert v6, "no IPv6 link-local address in the port namespaces to probe"

    def icmp6(item: tuple[Cell, str, str]) -> None:
        cell, ns, ip = item
        cell.got, cell.output = ping(ns, ip, v6=True)

    parallel([lambda item=item: icmp6(item) for item in v6])
    judge("ICMP and TCP", c.dhcp_cells + cells + [cell for cell, _, _ in v6])


# --- 2. the host ---------------------------------------------------------------------------


@dataclass
class HostTable:
    """A table of the test's own in the host namespace: counts per source what arrives at
    the host's input from the cloud's bridges (after every filter: priority 200), and
    counts and drops what the host sends towards the cloud's subnets (so that no answer of
    the host leaves by its uplink)."""

    name: str
    sources: list[Node]

    def create(self, bridges: Sequence[str], subnets: Sequence[IPv4Network]) -> None:
        lines = [f"table inet {self.name} {{",
                 "  chain in { type filter hook input priority 200; policy accept; }",
                 "  chain out { type filter hook output priority -200; policy accept; }", "}"]
        names = ", ".join(f'"{b}"' for b in bridges)
        for i, src in enumerate(self.sources):
            for proto in ("icmp", "tcp"):
                lines.append(f'add rule inet {self.name} in iifname {{ {names} }} ip saddr {src.ip} '
                             f'meta l4proto {proto} counter comment "in-{i}-{proto}"')
                lines.append(f'add rule inet {self.name} out ip daddr {src.ip} meta l4proto {proto} '
                             f'counter drop comment "out-{i}-{proto}"')
        lines.append(f"add rule inet {self.name} out ip daddr {{ {', '.join(map(str, subnets))} }} counter drop")
        subprocess.run(["nft", "-f", "-"], input="\n".join(lines) + "\n", text=True, check=True,
                       capture_output=True)

    def counts(self) -> dict[str, int]:
        """comment -> packets."""
        out = {}
        for item in json.loads(run("nft", "-j", "list", "table", "inet", self.name).stdout)["nftables"]:
            rule = item.get("rule")
            if rule and rule.get("comment"):
                out[rule["comment"]] = sum(e["counter"]["packets"] for e in rule["expr"] if "counter" in e)
        return out

    def delete(self) -> None:
        run("nft", "delete", "table", "inet", self.name, check=False)


def host_addresses() -> list[str]:
    """The host's IPv4 addresses on the device of its default route (its own address)."""
    routes = ip_json("-4", "route", "show", "default")
    out = []
    for dev in {r["dev"] for r in routes if r.get("dev")}:
        out += [a["local"] for e in ip_json("-4", "addr", "show", "dev", dev) for a in e.get("addr_info", [])]
    return out


def test_2_the_host_answers_no_tenant(cloud: Cloud) -> None:
    c = cloud
    srcs = sources(c)
    bridges = [c.bridge(n) for n in c.design.nets]
    # the bridges' own addresses: none (else they are targets too); the host's own
    on_bridges = [a["local"] for b in bridges for e in ip_json("addr", "show", "dev", b) for a in e.get("addr_info", [])]
    addresses = host_addresses() + on_bridges
    assert addresses, "no host address to probe"
    table = HostTable(f"rctest_iso_{secrets.token_hex(4)}", srcs)
    table.create(bridges, list(c.subnets.values()))
    try:
        arp_cells, ip_cells = [], []
        for i, src in enumerate(srcs):
            for address in addresses:
                why = "the host is on no tenant network"
                arp_cells.append((Cell("host-arp", src.label, "host", f"who-has {address}", False, why), src, address))
                ip_cells.append((Cell("host-icmp", src.label, "host", address, False, why), src, address, i))
                ip_cells.append((Cell("host-tcp", src.label, "host", f"{address}:7001", False, why), src, address, i))

        def arping(item: tuple[Cell, Node, str]) -> None:
            cell, src, address = item
            result = run("ip", "netns", "exec", src.host.ns, "busybox", "arping", "-c", "1", "-w", "2",  # type: ignore[union-attr]
                         "-I", "eth0", address, check=False, timeout=20)
            cell.got, cell.output = result.returncode == 0, (result.stdout + result.stderr).strip()[-200:]

        parallel([lambda item=item: arping(item) for item in arp_cells])
        # the way round a refused ARP: an on-link route and a permanent neighbour entry
        # with the MAC of the bridge the source is on
        for src in srcs:
            mac = link(c.bridge(src.net))["address"]  # type: ignore[arg-type, index]
            for address in addresses:
                run("ip", "-n", src.host.ns, "route", "replace", f"{address}/32", "dev", "eth0")  # type: ignore[union-attr]
                run("ip", "-n", src.host.ns, "neigh", "replace", address, "lladdr", mac, "dev", "eth0",  # type: ignore[union-attr]
                    "nud", "permanent")

        def probe(item: tuple[Cell, Node, str, int]) -> None:
            cell, src, address, _ = item
            if cell.kind == "host-icmp":
                _, cell.output = ping(src.host.ns, address)  # type: ignore[union-attr]
            else:
                (cell.output,) = tcp_probe(src.host.ns, [(address, 7001)])  # type: ignore[union-attr]

        parallel([lambda item=item: probe(item) for item in ip_cells])
        time.sleep(0.2)
        counts = table.counts()
        # the replies never come back (the host routes them to its uplink, where the
        # table drops them): what the host received and what it answered say it
        for cell, src, _, i in ip_cells:
            proto = cell.kind.split("-")[1]
            seen, answered = counts.get(f"in-{i}-{proto}", 0), counts.get(f"out-{i}-{proto}", 0)
            cell.got = bool(seen or answered)
            cell.output += f" (host: {seen} packets in from {src.ip}, {answered} answers)"
    finally:
        table.delete()
        for src in srcs:
            for address in addresses:
                run("ip", "-n", src.host.ns, "neigh", "del", address, "dev", "eth0", check=False)  # type: ignore[union-attr]
                run("ip", "-n", src.host.ns, "route", "del", f"{address}/32", check=False)  # type: ignore[union-attr]
    judge("the host", [x[0] for x in arp_cells] + [x[0] for x in ip_cells])


# --- 3. ARP: a port claims the gateways, DHCP servers and other ports of every tenant -------


def stranger(c: Cloud, label: str, net: str, mac: str | None = None) -> TestHost:
    """A namespace on `net`'s bridge whose tap is no port of the cloud (nothing filters it):
    the controls that prove a probe works, and DHCP clients with chosen MACs."""
    if label not in c.strangers:
        c.strangers[label] = c.env.add_host(label, c.bridge(net), mac=mac)
    return c.strangers[label]


def neighbours(ns: str) -> dict[str, str]:
    """ip -> lladdr of the namespace's IPv4 neighbour entries that have one."""
    return {e["dst"]: e["lladdr"].lower() for e in ip_json("-4", "neigh", "show", "dev", "eth0", namespace=ns)
            if e.get("lladdr")}


def macs_in(ns: str) -> dict[str, str]:
    """address -> MAC of the device holding it, inside namespace `ns`."""
    return {a["local"]: e["address"].lower() for e in ip_json("addr", "show", namespace=ns)
            if e.get("address") for a in e.get("addr_info", []) if a.get("family") == "inet"}


def send_arp(ns: str, frames: list[list[Any]], rounds: int = 3, gap: float = 0.3) -> None:
    run(*netns_python(ns, ARP_SENDER, json.dumps(frames), str(rounds), str(gap)), timeout=60)


BROADCAST, ZERO = "ff:ff:ff:ff:ff:ff", "00:00:00:00:00:00"


def test_3_ports_cannot_claim_other_addresses_by_arp(cloud: Cloud) -> None:
    c = cloud
    ports = {n.label: n for n in sources(c) if n.port}
    attackers = [ports[x] for x in ("a1", "b2", "h3", "c1")]
    real: dict[str, str] = {}  # address -> the MAC that really holds it
    for router in c.design.routers:
        real.update(macs_in(router_ns_of(*c.net_key(router))))
    for net in c.design.nets[1:]:
        real.update(macs_in(dhcp_ns_of(*c.net_key(net))))
    real.update({n.ip: n.host.mac.lower() for n in ports.values()})  # type: ignore[union-attr]
    claims = [(n.label, n.ip) for n in c.infra if n.kind in ("gateway", "dhcp")]
    claims += [(x, ports[x].ip) for x in ("a2", "b1", "h1", "c2")]
    # victims: the ports with the claimed address in their subnet; they know its MAC first
    # (Linux only updates a neighbour entry it has, and 1 s after its last update)
    targets = {v.label: [(label, ip) for label, ip in claims if ip != v.ip and IPv4Address(ip) in c.subnets[v.net]]
               for v in ports.values()}
    unknown = [(v, label, ip) for v, items in targets.items() for label, ip in items]
    for _ in range(ATTEMPTS):
        parallel([lambda v=v, ip=ip: ping(ports[v].host.ns, ip) for v, _, ip in unknown])  # type: ignore[union-attr]
        before = {v: neighbours(ports[v].host.ns) for v in {v for v, _, _ in unknown}}  # type: ignore[union-attr]
        unknown = [(v, label, ip) for v, label, ip in unknown if before[v].get(ip) != real[ip]]
        if not unknown:
            break
    assert not unknown, "the victims must know the real MACs before the claims: " + ", ".join(
        f"{v} has no entry for {label} {ip}" for v, label, ip in unknown)
    # control: a stranger (no port, unfiltered) claiming A/front's gateway to another
    # stranger does take it over, so the frames below would work if nothing stopped them
    gw = next(n for n in c.infra if n.label == "gw:A/front")
    victim, thief = stranger(c, "arp-victim", "A/front"), stranger(c, "arp-thief", "A/front")
    c.env.set_static(victim, f"{c.subnets['A/front'].network_address + 3}/{c.subnets['A/front'].prefixlen}")
    thief_mac = link("eth0", namespace=thief.ns)["address"]  # type: ignore[index]
    victim_mac = link("eth0", namespace=victim.ns)["address"]  # type: ignore[index]
    ping(victim.ns, gw.ip)
    time.sleep(1.2)

    frames: dict[str, list[list[Any]]] = {}
    for a in attackers:
        mac = a.host.mac.lower()  # type: ignore[union-attr]
        items = []
        for label, ip in claims:
            if ip == a.ip:
                continue
            items.append([1, BROADCAST, mac, ip, ZERO, ip])  # gratuitous ARP
            for v in ports.values():  # and an answer to each victim nobody asked
                if v is not a and v.net == a.net and v.ip != ip:
                    items.append([2, v.host.mac.lower(), mac, ip, v.host.mac.lower(), v.ip])  # type: ignore[union-attr]
        frames[a.label] = items
    parallel([lambda a=a: send_arp(a.host.ns, frames[a.label]) for a in attackers]  # type: ignore[union-attr]
             + [lambda: send_arp(thief.ns, [[2, victim_mac, thief_mac, gw.ip, victim_mac,
                                            str(c.subnets["A/front"].network_address + 3)]])])
    time.sleep(0.3)
    after = {v: neighbours(ports[v].host.ns) for v in ports}  # type: ignore[union-attr]
    controls = []
    if neighbours(victim.ns).get(gw.ip) != thief_mac.lower():
        controls.append(f"a stranger's ARP answer claiming {gw.ip} did not reach the victim stranger "
                        f"({neighbours(victim.ns)}): the claims of the ports prove nothing")
    cells = []
    for a in attackers:
        mac = a.host.mac.lower()  # type: ignore[union-attr]
        for v, items in targets.items():
            for label, ip in items:
                if ip == a.ip or v == a.label:
                    continue
                why = ("a port may claim only its own address" if ports[v].net == a.net
                       else "another network's bridge: the claim never gets there")
                cells.append(Cell("arp-claim", a.label, v, f"{label} {ip}", False, why, after[v].get(ip) == mac,
                                  f"{v}'s entry: {after[v].get(ip)} (real {real[ip]})"))
    # traffic to the gateways and DHCP servers still goes to the real ones: the victims
    # talk to them again while the attackers listen for frames sent to their MAC
    sniffers = {a.label: Sniffer(a.host.ns, 3.0) for a in attackers}  # type: ignore[union-attr]
    parallel([lambda v=v, ip=ip: ping(ports[v].host.ns, ip) for v, items in targets.items()  # type: ignore[union-attr]
              for label, ip in items if label.startswith(("gw:", "dhcp:"))])
    for a in attackers:
        mac = a.host.mac.lower()  # type: ignore[union-attr]
        stray = [f for f in sniffers[a.label].frames() if f["dst"] == mac and f.get("ipdst") not in (None, a.ip)]
        cells.append(Cell("arp-path", "victims", a.label, "frames for others", False,
                          "traffic for a claimed address goes to its owner", bool(stray), json.dumps(stray[:3])))
    final = {v: neighbours(ports[v].host.ns) for v in ports}  # type: ignore[union-attr]
    for v, items in targets.items():
        for label, ip in items:
            if label.startswith("gw:"):
                cells.append(Cell("arp-gw", v, label, ip, True, "the gateway is the router's leg",
                                  final[v].get(ip) == real[ip], f"entry {final[v].get(ip)}, real {real[ip]}"))
    judge("ARP", cells, controls)


# --- 4. DHCP: only the own network's range and reservations, no rogue server ----------------


def short(host: TestHost) -> str:
    """A port host's instance name (its label is TENANT/INSTANCE/NETWORK), else its label."""
    return host.label.split("/")[1] if host.label.count("/") == 2 else host.label


def lease_line(host: TestHost) -> str:
    """What udhcpc said it got ("lease of IP obtained from SERVER, ..."), else its last words."""
    found = [line for line in host.dhcp_output.splitlines() if "obtained from" in line]
    return found[-1].strip() if found else host.dhcp_output[-120:]


def in_range(c: Cloud, net: str, address: str | None) -> bool:
    if not address:
        return False
    start, end = c.ranges[net]
    return start <= IPv4Address(address.split("/")[0]) <= end


def test_4_dhcp_serves_only_the_own_network_and_no_port_serves_it(cloud: Cloud) -> None:
    c = cloud
    env = c.env
    ports = {n.label: n for n in sources(c) if n.port}
    reserved = {n.ip: label for label, n in ports.items()}
    cells: list[Cell] = []
    controls: list[str] = []

    # a. clients that are no port: a new MAC, and the MACs of the other tenant's ports
    clients = [
        ("fresh", "A/front", None, None),
        ("mac-of-h1", "A/front", ports["h1"].host.mac, "h1"),  # type: ignore[union-attr]
        ("mac-of-a2", "B/net", ports["a2"].host.mac, "a2"),  # type: ignore[union-attr]
    ]
    hosts = [stranger(c, label, net, mac) for label, net, mac, _ in clients]
    env.dhcp_all(hosts)
    for (label, net, mac, owner), h in zip(clients, hosts):
        got = h.address.split("/")[0] if h.address else None
        cells.append(Cell("dhcp", label, net, f"a lease in {net}'s range", True,
                          "a client without a reservation is leased from its network's range",
                          in_range(c, net, got), lease_line(h)))
        foreign = owner or "any port"
        cells.append(Cell("dhcp", label, net, f"a lease of {foreign}", False,
                          "reservations and ranges are the network's own",
                          bool(got) and (got in reserved or not in_range(c, net, got)), f"got {h.address}"))

    # b. ports with another port's MAC (of their tenant, of another): no lease at all
    spoofers = [("a1", "a3"), ("h3", "a2")]
    for label, other in spoofers:
        h = ports[label].host
        run("ip", "-n", h.ns, "addr", "flush", "dev", "eth0")  # type: ignore[union-attr]
        run("ip", "-n", h.ns, "link", "set", "eth0", "address", ports[other].host.mac)  # type: ignore[union-attr]
    try:
        leases = parallel([lambda h=ports[label].host: env.dhcp(h, tries=2) for label, _ in spoofers])
        for (label, other), got in zip(spoofers, leases):
            cells.append(Cell("dhcp", label, ports[label].net, f"a lease as {other}", False,
                              "a port sends only from its own MAC (anti-spoofing)", bool(got),
                              f"got {got}"))
    finally:
        for label, _ in spoofers:
            h = ports[label].host
            run("ip", "-n", h.ns, "link", "set", "eth0", "address", h.mac)  # type: ignore[union-attr, arg-type]
            run("ip", "-n", h.ns, "addr", "flush", "dev", "eth0")  # type: ignore[union-attr]
        restored = parallel([lambda h=ports[label].host: env.dhcp(h) for label, _ in spoofers])
    for (label, _), got in zip(spoofers, restored):
        if got != f"{ports[label].ip}/{c.subnets[ports[label].net].prefixlen}":
            controls.append(f"{label} did not get its reservation back with its own MAC: {got}")

    # c. a rogue DHCP server in a2's namespace, offering addresses and itself as router
    rogue = ports["a2"]
    front = c.subnets["A/front"]
    conf = env.root / "rogue-udhcpd.conf"
    conf.write_text("\n".join([
        f"start {front.network_address + 200}", f"end {front.network_address + 209}", "interface eth0",
        f"lease_file {env.root / 'rogue.leases'}", f"pidfile {env.root / 'rogue.pid'}",
        f"option subnet {front.netmask}", f"option router {rogue.ip}", "option lease 60", ""]))
    log = env.root / "rogue-udhcpd.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(["ip", "netns", "exec", rogue.host.ns, "busybox", "udhcpd", "-f", str(conf)],  # type: ignore[union-attr]
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    env.servers.append(proc)  # stopped (by PID) in the teardown, at the latest
    env._record("pids", proc.pid)
    try:
        wait_for(lambda: "started" in log.read_text() or proc.poll() is not None, 10, interval=0.05,
                 what="the rogue udhcpd to start")
        assert proc.poll() is None, f"rogue udhcpd exited {proc.returncode}: {log.read_text()}"
        victims = [ports["a3"].host, stranger(c, "rogue-victim", "A/front"), stranger(c, "rogue-victim-b", "B/net")]
        listeners = [ports[x].host for x in ("a1", "a4", "b1", "h1", "c1")] + victims
        run("ip", "-n", ports["a3"].host.ns, "addr", "flush", "dev", "eth0")  # type: ignore[union-attr]
        sniffers = [Sniffer(h.ns, 6.0) for h in listeners]  # type: ignore[union-attr]
        leases = parallel([lambda h=h: env.dhcp(h, tries=3) for h in victims])
        heard = [s.frames() for s in sniffers]
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    rogue_log = log.read_text()
    if "sending OFFER" not in rogue_log:
        controls.append(f"the rogue server offered nothing (it never heard a client): {rogue_log[-500:]}")
    for h, frames in zip(listeners, heard):
        offers = [f for f in frames if f.get("sport") == 67 and f.get("proto") == 17]
        from_rogue = [f for f in offers if f["src"] == rogue.host.mac.lower() or f.get("ipsrc") == rogue.ip]  # type: ignore[union-attr]
        tenant_net = c.net_of(h)
        cells.append(Cell("dhcp-rogue", "a2", short(h),
                          "a DHCP answer from a2", False, "a port may not act as a DHCP server",
                          bool(from_rogue), json.dumps(from_rogue[:2])))
        if h in victims:
            server = c.servers[tenant_net]
            if not [f for f in offers if f.get("ipsrc") == server]:
                controls.append(f"{h.label} heard no answer of its real DHCP server {server} either: the "
                                f"sniffer proves nothing ({len(frames)} frames)")
    for h, got in zip(victims, leases):
        tenant_net = c.net_of(h)
        server = c.servers[tenant_net]
        want_ok = in_range(c, tenant_net, got) if h.expected_ip is None else \
            got == f"{h.expected_ip}/{c.subnets[tenant_net].prefixlen}"
        route = run("ip", "-n", h.ns, "route", "show", "default").stdout.strip()
        gateway = str(c.subnets[tenant_net].network_address + 1)
        cells.append(Cell("dhcp", short(h), tenant_net,
                          "its lease from its own server", True, "the network's dnsmasq answers",
                          bool(want_ok and f"obtained from {server}" in h.dhcp_output
                               and route.startswith(f"default via {gateway} ")),
                          f"{route!r}; {lease_line(h)}"))
    judge("DHCP", cells, controls)


# --- 5. a real guest ----------------------------------------------------------------------


def test_5_a_real_guest_takes_only_what_its_groups_allow() -> None:
    with net_env(others=("h", "p"), compute="libvirt") as env:
        c = make_cloud(env, GUEST)
        vm, allowed = c.nodes["vm"], c.nodes["g-allowed"].host
        assert allowed is not None
        name = env.domain_name("vm")
        started = time.monotonic()
        page = env.http(allowed, f"http://{vm.ip}/cgi-bin/info", 150)
        console = env.instance_dir / name / "console.log"
        log = console.read_text(errors="replace") if console.exists() else "(no console log)"
        assert page.ok, f"{page}\n{name}: {domstate(name, reason=True)}\nconsole:\n{log[-3000:]}"
        print(f"the guest answered after {time.monotonic() - started:.1f} s")
        prefix = c.subnets["G/net"].prefixlen
        lease = Cell("dhcp", "vm", "G/net", f"lease {vm.ip}/{prefix}", True, "its reservation",
                     f"reconciler-guest: ip eth0 {vm.ip}/{prefix} (dhcp)" in log,
                     next((line for line in log.splitlines() if "ip eth0" in line), "no address in the console"))
        judge("a real guest", [lease] + probe_matrix(c))
