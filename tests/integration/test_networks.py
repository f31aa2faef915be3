"""Networks, routers and security groups on the real kernel (the netlink driver), proven
with real packets from inside network namespaces.

Host config: Network, Router and SecurityGroup on `netlink`; Tenant, Image, Instance,
Volume and Bucket in memory, so the memory instances stand in for VMs: for every instance
NIC the test creates a host itself (see netns.py), a namespace whose veth carries the
port's tap name on the host side and the port's MAC inside, enslaved to the network's
bridge, as libvirt's tap would be. The last test runs a real guest on libvirt instead.

Everything is checked with `ip`, `ip netns`, `nft`, /proc and packets (busybox udhcpc,
ping -c1 -W1, TCP connects with a 2 s timeout), never through the reconciler's own code.

The tests run in file order. All but 6, 6c and 8 share one applied cloud (module fixture
`cloud`; the later ones change it: rules, members, a new port, an MTU, a deleted router
namespace, then its destroy):

- provider tenant P: network `ext` (flat, `external: true`, no DHCP) and, on it, a
  namespace "outside" holding the subnet's gateway address, forwarding, with routes to
  the tenant subnets via the routers' external addresses (an upstream that would carry
  traffic between tenants if the routers let it);
- tenant A: `front` (vxlan, fixed VNI, DHCP) with a1, a2 (no groups), srv (fixed address
  outside the DHCP range; groups web: tcp/22, db: tcp/5432 from group ops) and cli
  (group ops); `back` (vxlan, MTU 1400, DHCP) with b1; router `r` on both, external P/ext;
- tenant B: `front` (the same name as A's) with h1 and h2; router `r`, external P/ext.

Test 6 (drift: bridge, nftables rule, dnsmasq), 6c (a foreign bridge in the way; vlan
without 8021q) and 8 (a real libvirt guest) have small clouds of their own.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import pytest

from conftest import IMAGE, domstate, wait_for
from netns import (
    NetEnv,
    Probe,
    TestHost,
    alive,
    all_links,
    bridge_of,
    dhcp_ns_of,
    free_subnets,
    ipv4_addresses,
    link,
    namespaces,
    net_env,
    net_hash,
    netns_inode,
    nft_json,
    nft_tables,
    processes_mentioning,
    require_network_host,
    router_ns_of,
    run,
    vxlan_of,
)
from reconciler.models import Key
from reconciler.naming import host_name

pytestmark = [pytest.mark.slow]

SERVER_PORT = 7000


@pytest.fixture(autouse=True)
def _real_host() -> None:
    require_network_host()


def ok(result, code: int = 0):
    assert result.returncode == code, (
        f"exit {result.returncode}, expected {code}\n--- stdout\n{result.stdout[-6000:]}\n"
        f"--- stderr\n{result.stderr[-6000:]}"
    )
    assert "Traceback" not in result.stdout + result.stderr, result.stdout + result.stderr
    return result


def probe_all(calls: Sequence[Callable[[], Probe]]) -> list[Probe]:
    """Run probes at once (each bounded in time): a failing probe costs its timeout, and
    these run in parallel so the negative checks do not add up."""
    with ThreadPoolExecutor(max_workers=min(16, max(1, len(calls)))) as pool:
        return list(pool.map(lambda c: c(), calls))


def retry(call: Callable[[], Probe], attempts: int = 3) -> Probe:
    """A positive probe, tried up to `attempts` times (the first packet of a flow may wait
    for ARP on a freshly plugged port); a negative probe is never retried."""
    result = call()
    for _ in range(attempts - 1):
        if result.ok:
            break
        time.sleep(0.3)
        result = call()
    return result


def expect(reachable: Sequence[Callable[[], Probe]], unreachable: Sequence[Callable[[], Probe]]) -> list[Probe]:
    """Every probe of `reachable` succeeds and every one of `unreachable` fails; the
    results of `reachable` in order."""
    results = probe_all([lambda c=c: retry(c) for c in reachable] + list(unreachable))
    good, bad = results[: len(reachable)], results[len(reachable):]
    wrong = [str(p) for p in good if not p.ok] + [f"{p} (should have failed)" for p in bad if p.ok]
    assert not wrong, "\n".join(wrong)
    return good


def plan_json(env: NetEnv, manifest: Path) -> tuple[int, dict[str, Any]]:
    """(exit code of `plan --detailed-exitcode --json`, the plan)."""
    result = env.cli("plan", "--detailed-exitcode", "--json", str(manifest))
    assert result.returncode in (0, 2), f"plan exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.returncode, json.loads(result.stdout)


def plan_is_zero(env: NetEnv, manifest: Path) -> None:
    code, data = plan_json(env, manifest)
    acting = [f"{c['action']} {c['kind']} {c['tenant']}/{c['name']}: {c['reason']}" for c in data["changes"]
              if c["action"] != "noop"]
    assert code == 0 and not acting, "the plan after apply is not empty:\n" + "\n".join(acting)


def drift_changes(data: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in data["changes"] if c["action"] != "noop" and "drift" in c["reason"].lower()]


def mark_re(env: NetEnv, kind: str, tenant: str, name: str) -> re.Pattern[str]:
    return re.compile(rf"^reconciler:v1 home={env.home} key={kind}/{tenant}/{name} hash=\S*$")


# --- manifests ---------------------------------------------------------------------------


def doc(kind: str, tenant: str | None, name: str, spec: dict[str, Any]) -> str:
    meta = {"name": name} if tenant is None else {"name": name, "tenant": tenant}
    return ("---\napiVersion: reconciler/v1\n"
            f"kind: {kind}\nmetadata: {json.dumps(meta)}\nspec: {json.dumps(spec)}\n")


def tenant_docs(*tenants: str) -> str:
    text = "".join(doc("Tenant", None, t, {}) for t in tenants)
    return text + "".join(doc("Image", t, "tiny", {"source": str(IMAGE)}) for t in tenants)


def instance(tenant: str, name: str, network: str, ip: str | None = None,
             groups: Sequence[str] = (), **spec: Any) -> str:
    nic: dict[str, Any] = {"network": network}
    if ip:
        nic["ip"] = ip
    if groups:
        nic["securityGroups"] = list(groups)
    return doc("Instance", tenant, name, {"image": "tiny", "memoryMiB": 128, "rootDiskGiB": 1,
                                          **spec, "networks": [nic]})


# --- the shared cloud --------------------------------------------------------------------


@dataclass
class Cloud:
    env: NetEnv
    A: str
    B: str
    P: str
    subnets: dict[str, ipaddress.IPv4Network]  # "A/front" -> cidr
    vni: int
    hosts: dict[str, TestHost] = field(default_factory=dict)
    first_plan: dict[str, Any] = field(default_factory=dict)
    manifest: Path = Path()
    outside_log: Path = Path()
    # what the tests change, step by step
    web_ports: tuple[str, ...] = ("22",)
    web_icmp_from_ops: bool = False
    a2_groups: tuple[str, ...] = ()
    with_a3: bool = False
    back_mtu: int = 1400

    def write(self) -> Path:
        A, B, P, s = self.A, self.B, self.P, self.subnets
        text = tenant_docs(P, A, B)
        text += doc("Network", P, "ext", {"type": "flat", "external": True,
                                           "subnets": [{"cidr": str(s["P/ext"]), "dhcp": {"enabled": False}}]})
        text += doc("Network", A, "front", {"type": "vxlan", "vni": self.vni,
                                             "subnets": [{"cidr": str(s["A/front"])}]})
        text += doc("Network", A, "back", {"type": "vxlan", "mtu": self.back_mtu,
                                            "subnets": [{"cidr": str(s["A/back"])}]})
        text += doc("Router", A, "r", {"networks": ["front", "back"], "external": f"{P}/ext"})
        web = [{"protocol": "tcp", "ports": p} for p in self.web_ports]
        if self.web_icmp_from_ops:
            web.append({"protocol": "icmp", "remote": "ops"})
        text += doc("SecurityGroup", A, "web", {"rules": web})
        text += doc("SecurityGroup", A, "db", {"rules": [{"protocol": "tcp", "ports": "5432", "remote": "ops"}]})
        text += doc("SecurityGroup", A, "ops", {"rules": []})
        text += instance(A, "a1", "front")
        text += instance(A, "a2", "front", groups=self.a2_groups)
        text += instance(A, "srv", "front", ip=self.fixed("srv"), groups=["web", "db"])
        text += instance(A, "cli", "front", groups=["ops"])
        text += instance(A, "b1", "back")
        if self.with_a3:  # egress only to a1's server
            a1 = self.hosts["a1"].expected_ip
            text += doc("SecurityGroup", A, "narrow", {"rules": [
                {"direction": "egress", "protocol": "tcp", "ports": str(SERVER_PORT), "remote": f"{a1}/32"}]})
            text += instance(A, "a3", "front", ip=self.fixed("a3"), groups=["narrow"])
        text += doc("Network", B, "front", {"subnets": [{"cidr": str(s["B/front"])}]})
        text += doc("Router", B, "r", {"networks": ["front"], "external": f"{P}/ext"})
        text += instance(B, "h1", "front")
        text += instance(B, "h2", "front")
        self.manifest = self.env.write_manifest(text)
        return self.manifest

    def fixed(self, label: str) -> str:
        """The fixed addresses of the manifest: outside the DHCP range (.10-.254)."""
        return str(self.subnets["A/front"].network_address + {"srv": 5, "a3": 6}[label])

    def target(self, kind: str, tenant: str, name: str) -> dict[str, Any]:
        for c in self.first_plan["changes"]:
            if (c["kind"], c["tenant"], c["name"]) == (kind, tenant, name):
                return c["target"]
        raise AssertionError(f"no {kind} {tenant}/{name} in the first plan")

    def external_ip(self, tenant: str) -> str:
        return self.env.external_addresses[f"{tenant}/r"].split("/")[0]

    def gateway(self, net: str) -> str:
        return str(self.subnets[net].network_address + 1)


#: (label, tenant label, network, port servers)
PORT_HOSTS = [
    ("a1", "A", "front", (SERVER_PORT,)),
    ("a2", "A", "front", (SERVER_PORT,)),
    ("srv", "A", "front", (22, 80, 5432)),
    ("cli", "A", "front", (SERVER_PORT,)),
    ("b1", "A", "back", (SERVER_PORT,)),
    ("h1", "B", "front", (SERVER_PORT,)),
    ("h2", "B", "front", ()),
]


@pytest.fixture(scope="module")
def net_env_module() -> Iterator[NetEnv]:
    with net_env(others=("b", "p")) as env:
        yield env


@pytest.fixture(scope="module")
def cloud(net_env_module: NetEnv) -> Cloud:
    env = net_env_module
    used_vnis = {int(l["linkinfo"]["info_data"]["id"]) for l in all_links()
                 if l.get("linkinfo", {}).get("info_kind") == "vxlan"}
    vni = 16_000_000 + int.from_bytes(os.urandom(3), "big") % 700_000  # a fixed VNI, free here
    while vni in used_vnis:
        vni += 1
    nets = ("P/ext", "A/front", "A/back", "B/front")
    c = Cloud(env, env.tenant, env.others["b"], env.others["p"],
              {n: ipaddress.IPv4Network(s) for n, s in zip(nets, free_subnets(len(nets)))}, vni)
    c.write()
    started = time.monotonic()
    ok(env.apply(c.manifest))
    print(f"apply of the shared cloud: {time.monotonic() - started:.1f} s")
    c.first_plan = env.last_plan or {}
    tenants = {"A": c.A, "B": c.B}
    for label, t, net, _ in PORT_HOSTS:
        c.hosts[label] = env.add_port_host(tenants[t], net, label)
    c.hosts["outside"] = outside = env.add_host("outside", bridge_of(c.P, "ext"))
    started = time.monotonic()
    env.dhcp_all([c.hosts[label] for label, *_ in PORT_HOSTS])
    print(f"DHCP of {len(PORT_HOSTS)} hosts: {time.monotonic() - started:.1f} s")
    # the outside: the external subnet's gateway, an upstream router for both tenants
    ext = c.subnets["P/ext"]
    env.set_static(outside, f"{c.gateway('P/ext')}/{ext.prefixlen}")
    run("ip", "netns", "exec", outside.ns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
    for net, tenant in (("A/front", c.A), ("A/back", c.A), ("B/front", c.B)):
        run("ip", "-n", outside.ns, "route", "add", str(c.subnets[net]), "via", c.external_ip(tenant))
    for label, _, _, ports in PORT_HOSTS:
        if ports and c.hosts[label].address:
            env.serve(c.hosts[label], *ports)
    c.outside_log = env.serve(outside, SERVER_PORT)
    return c


def addressed(cloud: Cloud, *labels: str) -> list[TestHost]:
    hosts = [cloud.hosts[label] for label in labels]
    missing = [f"{h.label}: {h.dhcp_output[-500:]}" for h in hosts if not h.address]
    assert not missing, "hosts without an address (see test_2):\n" + "\n".join(missing)
    return hosts


# --- 1. kernel objects ----------------------------------------------------------------------


def test_1_networks_routers_and_groups_are_on_the_host(cloud: Cloud) -> None:
    env, A, B, P = cloud.env, cloud.A, cloud.B, cloud.P
    networks = {  # (tenant, name) -> (type, MTU, subnet label, DHCP)
        (P, "ext"): ("flat", 1500, "P/ext", False),
        (A, "front"): ("vxlan", 1450, "A/front", True),
        (A, "back"): ("vxlan", 1400, "A/back", True),
        (B, "front"): ("vxlan", 1450, "B/front", True),
    }
    ours_test = {h.tap for h in cloud.hosts.values()}
    spaces = namespaces()
    dhcp_inodes = set()
    for (tenant, name), (kind, mtu, label, dhcp) in networks.items():
        br = bridge_of(tenant, name)
        dev = link(br)
        assert dev is not None, f"no bridge {br} for Network {tenant}/{name} (ip -d link)"
        assert dev["linkinfo"]["info_kind"] == "bridge", dev
        assert mark_re(env, "Network", tenant, name).match(dev.get("ifalias", "")), dev.get("ifalias")
        assert "UP" in dev["flags"], dev["flags"]
        assert dev["mtu"] == mtu, (br, dev["mtu"], mtu)
        assert ipv4_addresses(br) == {}, f"the host has an address on tenant bridge {br}"
        vx = link(vxlan_of(tenant, name))
        if kind == "vxlan":
            assert vx is not None, f"no VXLAN device {vxlan_of(tenant, name)} for {tenant}/{name}"
            assert vx["linkinfo"]["info_kind"] == "vxlan", vx
            want_vni = cloud.vni if (tenant, name) == (A, "front") else cloud.target("Network", tenant, name)["spec"]["vni"]
            assert vx["linkinfo"]["info_data"]["id"] == want_vni, (vx["linkinfo"], want_vni)
            assert vx.get("master") == br, vx
            assert vx["mtu"] == mtu, (vx["ifname"], vx["mtu"], mtu)
            assert mark_re(env, "Network", tenant, name).match(vx.get("ifalias", "")), vx.get("ifalias")
        else:
            assert vx is None, vx
        # every device on the bridge is the test's tap or one of ours, with our mark
        ports = [l for l in all_links() if l.get("master") == br]
        foreign = [p["ifname"] for p in ports
                   if p["ifname"] not in ours_test and f"home={env.home}" not in (p.get("ifalias") or "")]
        assert not foreign, f"unmarked devices on {br}: {foreign}"
        subnet = cloud.subnets[label]
        ns = dhcp_ns_of(tenant, name)
        if dhcp:
            assert ns in spaces, f"no DHCP namespace {ns} for {tenant}/{name}: {sorted(spaces)}"
            assert [p for p in ports if p["ifname"].startswith("rd-")], f"no DHCP leg on {br}: {ports}"
            server = f"{subnet.network_address + 9}/{subnet.prefixlen}"  # just below .10, the range's start
            held = [a for addrs in ipv4_addresses(namespace=ns).values() for a in addrs]
            assert server in held, f"the DHCP namespace {ns} holds {held}, not {server}"
            dhcp_inodes.add(netns_inode(name=ns))
    # one dnsmasq per subnet with DHCP, each inside its network's DHCP namespace
    dnsmasqs = {pid: cmd for pid, cmd in processes_mentioning(str(env.state_dir)).items() if "dnsmasq" in cmd}
    assert len(dnsmasqs) == 3, dnsmasqs
    assert {netns_inode(pid=pid) for pid in dnsmasqs} == dhcp_inodes, dnsmasqs

    # routers: a namespace with the subnet gateways on qr-, the external address on qg-
    for tenant, nets in ((A, ("A/front", "A/back")), (B, ("B/front",))):
        rns = router_ns_of(tenant, "r")
        assert rns in spaces, f"no router namespace {rns}: {sorted(spaces)}"
        addrs = ipv4_addresses(namespace=rns)
        qr = sorted(a for dev, a_ in addrs.items() if dev.startswith("qr-") for a in a_)
        assert qr == sorted(f"{cloud.gateway(n)}/24" for n in nets), addrs
        qg = [a for dev, a_ in addrs.items() if dev.startswith("qg-") for a in a_]
        assert qg == [env.external_addresses[f"{tenant}/r"]], addrs
        ext_ip = ipaddress.IPv4Address(cloud.external_ip(tenant))
        assert ext_ip in cloud.subnets["P/ext"] and ext_ip != cloud.subnets["P/ext"].network_address + 1
        for n in nets:  # the host side of each leg is a marked port of the network's bridge
            br = bridge_of(tenant, n.split("/")[1])
            legs = [l for l in all_links() if l.get("master") == br and l["ifname"].startswith("rr-")]
            assert len(legs) == 1 and mark_re(env, "Router", tenant, "r").match(legs[0].get("ifalias", "")), legs
        ruleset = nft_json("list", "ruleset", namespace=rns)
        text = json.dumps(ruleset)
        assert any(c.get("chain", {}).get("hook") == "forward" for c in ruleset), text[:2000]
        masq = [o["rule"] for o in ruleset if "rule" in o and "masquerade" in json.dumps(o["rule"]["expr"])]
        assert masq and all('"qg-' in json.dumps(r["expr"]) for r in masq), masq or text[:2000]
    gw_legs = [l for l in all_links() if l.get("master") == bridge_of(P, "ext") and l["ifname"].startswith("rg-")]
    assert len(gw_legs) == 2, gw_legs

    # security groups: our tables, base chains on the forward hook, chains per network,
    # per filtered port (srv, cli: with groups) and per group; none for unfiltered ports
    assert {("inet", env.table), ("bridge", env.table)} <= nft_tables()
    inet = nft_json("list", "table", "inet", env.table)
    chains = {o["chain"]["name"]: o["chain"] for o in inet if "chain" in o}
    for base in ("egress", "ingress"):
        assert chains.get(base, {}).get("hook") == "forward", chains.get(base)
        assert chains[base].get("type") == "filter", chains[base]
    for tenant, name in ((A, "front"), (A, "back"), (B, "front")):
        h = net_hash(tenant, name)
        assert {f"in-{h}", f"out-{h}"} <= set(chains), (h, sorted(chains))
    for label in ("srv", "cli"):
        t = cloud.hosts[label].tap[3:]
        assert {f"pi-{t}", f"po-{t}"} <= set(chains), (label, sorted(chains))
    for label in ("a1", "a2", "b1", "h1", "h2"):
        t = cloud.hosts[label].tap[3:]
        assert not {f"pi-{t}", f"po-{t}"} & set(chains), f"{label} has no groups, but chains: {sorted(chains)}"
    for group in ("web", "db", "ops"):
        g = host_name(Key("SecurityGroup", A, group), prefix="sg-")
        assert {f"{g}-in", f"{g}-out"} <= set(chains), (group, sorted(chains))
    bridge_text = run("nft", "list", "table", "bridge", env.table).stdout
    for label in ("srv", "cli"):
        host = cloud.hosts[label]
        assert host.tap in bridge_text and host.mac in bridge_text, (label, bridge_text)
        assert host.expected_ip in bridge_text, (label, bridge_text)


# --- 2. DHCP ------------------------------------------------------------------------------


def test_2_hosts_get_their_reserved_addresses_by_dhcp(cloud: Cloud) -> None:
    wrong = []
    for label, t, net, _ in PORT_HOSTS:
        host = cloud.hosts[label]
        subnet = cloud.subnets[f"{t}/{net}"]
        want = f"{host.expected_ip}/{subnet.prefixlen}"
        if host.address != want:
            wrong.append(f"{label} ({host.ns}, MAC {host.mac}): got {host.address}, reserved {want}; "
                         f"udhcpc said: {host.dhcp_output[-400:]}")
            continue
        routes = run("ip", "-n", host.ns, "route", "show", "default").stdout
        if f"via {cloud.gateway(f'{t}/{net}')} " not in routes:
            wrong.append(f"{label}: default route {routes.strip()!r}, not via the subnet gateway")
    assert not wrong, "\n".join(wrong)
    front = cloud.subnets["A/front"]
    assert cloud.hosts["srv"].expected_ip == str(front.network_address + 5)  # fixed, outside the range
    for label in ("a1", "a2", "cli"):  # allocated inside the DHCP range .10-.254, all distinct
        assert 10 <= int(ipaddress.IPv4Address(cloud.hosts[label].expected_ip)) - int(front.network_address) <= 254
    assert len({cloud.hosts[l].expected_ip for l in ("a1", "a2", "srv", "cli")}) == 4


# --- 3. reachability within a tenant, through the router, to the outside --------------------


def test_3_a_tenant_reaches_itself_its_other_network_and_the_outside(cloud: Cloud) -> None:
    env = cloud.env
    a1, a2, b1, h1, h2 = addressed(cloud, "a1", "a2", "b1", "h1", "h2")
    outside = cloud.hosts["outside"]
    out_ip = outside.ip
    results = expect([
        lambda: env.ping(a1, a2.ip), lambda: env.ping(a2, a1.ip),               # 0 1 same network
        lambda: env.connect(a1, a2.ip, SERVER_PORT), lambda: env.connect(a2, a1.ip, SERVER_PORT),
        lambda: env.ping(a1, b1.ip), lambda: env.ping(b1, a1.ip),               # 4 5 via the router
        lambda: env.connect(a1, b1.ip, SERVER_PORT), lambda: env.connect(b1, a1.ip, SERVER_PORT),
        lambda: env.ping(h2, h1.ip), lambda: env.connect(h2, h1.ip, SERVER_PORT),  # 8 9 tenant B
        lambda: env.ping(a1, out_ip), lambda: env.connect(a1, out_ip, SERVER_PORT),  # 10 11 outside
        lambda: env.connect(b1, out_ip, SERVER_PORT), lambda: env.connect(h1, out_ip, SERVER_PORT),
    ], [])
    # what each server saw as the peer: the client itself inside a tenant (routed, not
    # translated), the router's external address from the outside (SNAT)
    assert results[2].output == f"{a1.ip} {SERVER_PORT}", results[2]
    assert results[3].output == f"{a2.ip} {SERVER_PORT}", results[3]
    assert results[6].output == f"{a1.ip} {SERVER_PORT}", results[6]
    assert results[7].output == f"{b1.ip} {SERVER_PORT}", results[7]
    assert results[9].output == f"{h2.ip} {SERVER_PORT}", results[9]
    a_ext, b_ext = cloud.external_ip(cloud.A), cloud.external_ip(cloud.B)
    assert results[11].output == f"{a_ext} {SERVER_PORT}", results[11]
    assert results[12].output == f"{a_ext} {SERVER_PORT}", results[12]
    assert results[13].output == f"{b_ext} {SERVER_PORT}", results[13]
    seen = cloud.outside_log.read_text().split("\n")
    assert f"{a_ext} {SERVER_PORT}" in seen and f"{b_ext} {SERVER_PORT}" in seen, seen
    assert not {f"{h.ip} {SERVER_PORT}" for h in (a1, b1, h1)} & set(seen), seen


# --- 4. isolation across tenants ------------------------------------------------------------


def test_4_tenants_do_not_reach_each_other(cloud: Cloud) -> None:
    env = cloud.env
    a1, a2, b1, h1, h2 = addressed(cloud, "a1", "a2", "b1", "h1", "h2")
    outside = cloud.hosts["outside"]
    # the outside forwards and routes both tenants' subnets to their routers: the only
    # thing between the tenants is the routers' refusal of new connections from outside
    routes = run("ip", "-n", outside.ns, "route").stdout
    assert f"{cloud.subnets['B/front']} via {cloud.external_ip(cloud.B)}" in routes, routes
    expect([
        lambda: env.connect(h2, h1.ip, SERVER_PORT),  # controls: the servers are up
        lambda: env.connect(a2, a1.ip, SERVER_PORT),
        lambda: env.connect(a1, b1.ip, SERVER_PORT),
    ], [
        lambda: env.ping(a1, h1.ip), lambda: env.connect(a1, h1.ip, SERVER_PORT),
        lambda: env.ping(b1, h1.ip), lambda: env.connect(b1, h1.ip, SERVER_PORT),
        lambda: env.ping(h1, a1.ip), lambda: env.connect(h1, a1.ip, SERVER_PORT),
        lambda: env.ping(h2, b1.ip), lambda: env.connect(h2, b1.ip, SERVER_PORT),
        # and the outside cannot open connections into a tenant network either
        lambda: env.connect(outside, a1.ip, SERVER_PORT), lambda: env.connect(outside, h1.ip, SERVER_PORT),
        lambda: env.ping(outside, a1.ip),
    ])


def test_4b_ports_cannot_spoof_addresses_or_macs(cloud: Cloud) -> None:
    env = cloud.env
    a1, a2, h1, h2 = addressed(cloud, "a1", "a2", "h1", "h2")
    spoofed_ip = str(cloud.subnets["A/front"].network_address + 7)  # nobody's
    run("ip", "-n", a1.ns, "addr", "add", f"{spoofed_ip}/32", "dev", "eth0")
    real_mac = h2.mac
    run("ip", "-n", h2.ns, "link", "set", "eth0", "address", "52:54:00:00:00:42")
    try:
        expect([lambda: env.ping(a1, a2.ip)], [
            lambda: env.ping(a1, a2.ip, source=spoofed_ip),  # another source address
            lambda: env.ping(h2, h1.ip),  # another source MAC
        ])
    finally:
        run("ip", "-n", a1.ns, "addr", "del", f"{spoofed_ip}/32", "dev", "eth0")
        run("ip", "-n", h2.ns, "link", "set", "eth0", "address", real_mac)
    expect([lambda: env.ping(h2, h1.ip)], [])


# --- 5. security groups ----------------------------------------------------------------------


def test_5_security_groups_let_exactly_their_rules_through(cloud: Cloud) -> None:
    env = cloud.env
    a1, a2, srv, cli = addressed(cloud, "a1", "a2", "srv", "cli")
    s = srv.ip
    # web: tcp/22 from anywhere; db: tcp/5432 from members of ops (cli); nothing else,
    # not even ICMP; srv's egress is not restricted (its groups have no egress rules)
    expect([
        lambda: env.connect(a2, s, 22), lambda: env.connect(cli, s, 22), lambda: env.connect(a1, s, 22),
        lambda: env.connect(cli, s, 5432),
        lambda: env.connect(srv, a1.ip, SERVER_PORT),
        lambda: env.ping(cli, a1.ip),  # cli's own group (ops) has no rules: egress is free
    ], [
        lambda: env.connect(a2, s, 80), lambda: env.connect(cli, s, 80),
        lambda: env.connect(a2, s, 5432), lambda: env.connect(a1, s, 5432),
        lambda: env.ping(a2, s), lambda: env.ping(cli, s),
        lambda: env.connect(a1, cli.ip, SERVER_PORT),  # ops has no ingress rule: cli takes nothing new
    ])

    # tcp/80 and ICMP from ops added to web, a2 joins ops, and a new port a3 (a fixed
    # address, a group that allows egress only to a1's server): all by one apply
    cloud.web_ports, cloud.web_icmp_from_ops, cloud.a2_groups, cloud.with_a3 = ("22", "80"), True, ("ops",), True
    manifest = cloud.write()
    code, data = plan_json(env, manifest)
    assert code == 2
    acting = {(c["kind"], c["name"]): c["action"] for c in data["changes"] if c["action"] != "noop"}
    assert acting.get(("SecurityGroup", "web")) == "update", acting
    assert acting.get(("Network", "front")) == "update", acting  # its ports changed, in place
    ok(env.apply(manifest))
    a3 = env.add_port_host(cloud.A, "front", "a3")
    cloud.hosts["a3"] = a3
    assert env.dhcp(a3) == f"{cloud.fixed('a3')}/24", f"a3 (a new reservation): {a3.dhcp_output}"
    b1, outside = addressed(cloud, "b1", "outside")
    expect([
        lambda: env.connect(a2, s, 80), lambda: env.connect(a1, s, 80), lambda: env.connect(a2, s, 22),
        lambda: env.connect(a2, s, 5432),  # now a member of ops
        lambda: env.connect(cli, s, 5432),
        lambda: env.connect(a3, a1.ip, SERVER_PORT),  # the one egress a3's group allows
        lambda: env.ping(cli, s), lambda: env.ping(a2, s),  # ICMP from members of ops
    ], [
        lambda: env.connect(a1, s, 5432),  # still not a member
        lambda: env.ping(a1, s),
        lambda: env.connect(a3, b1.ip, SERVER_PORT), lambda: env.connect(a3, outside.ip, SERVER_PORT),
        lambda: env.ping(a3, a1.ip),
        lambda: env.connect(a1, a2.ip, SERVER_PORT),  # a2 is filtered now: ops has no ingress rule
    ])
    plan_is_zero(env, manifest)


def test_5c_mtu_changes_in_place(cloud: Cloud) -> None:
    env = cloud.env
    a1, b1 = addressed(cloud, "a1", "b1")
    br = bridge_of(cloud.A, "back")
    cloud.back_mtu = 1300
    manifest = cloud.write()
    code, data = plan_json(env, manifest)
    acting = {(c["kind"], c["tenant"], c["name"]): c["action"] for c in data["changes"] if c["action"] != "noop"}
    assert code == 2 and acting == {("Network", cloud.A, "back"): "update"}, acting
    ok(env.apply(manifest))
    wrong = {l["ifname"]: l["mtu"] for l in all_links()
             if (l["ifname"] in (br, vxlan_of(cloud.A, "back")) or l.get("master") == br)
             and l["ifname"] != b1.tap and l["mtu"] != 1300}
    rns = router_ns_of(cloud.A, "r")
    legs = {l["ifname"]: l["mtu"] for l in all_links(namespace=rns) if l["ifname"].startswith("qr-")}
    code, data = plan_json(env, manifest)
    after = [f"{c['action']} {c['kind']} {c['tenant']}/{c['name']}: {c['reason']}" for c in data["changes"]
             if c["action"] != "noop"]
    # one apply converges: every device on the network follows, the router's legs too
    # (back's leg inside the router namespace at 1300, front's at 1450), nothing left to plan
    assert not wrong and sorted(legs.values()) == [1300, 1450] and code == 0, (
        f"after one apply of the MTU change: devices on {br} not at 1300: {wrong}; router legs "
        f"in {rns}: {legs}; the next plan (exit {code}): {after}")
    run("ip", "link", "set", b1.tap, "mtu", "1300")  # as the guest's NIC would, at its restart
    run("ip", "-n", b1.ns, "link", "set", "eth0", "mtu", "1300")
    expect([lambda: env.connect(a1, b1.ip, SERVER_PORT), lambda: env.connect(b1, a1.ip, SERVER_PORT)], [])
    plan_is_zero(env, manifest)


# --- 6. drift -------------------------------------------------------------------------------------


def test_6_drift_on_the_host_is_planned_and_repaired() -> None:
    with net_env() as env:
        t = env.tenant
        (cidr,) = free_subnets(1)
        text = tenant_docs(t)
        text += doc("Network", t, "net", {"subnets": [{"cidr": cidr}]})
        text += doc("SecurityGroup", t, "web", {"rules": [{"protocol": "tcp", "ports": "22"}]})
        text += instance(t, "vm", "net", groups=["web"])
        text += instance(t, "client", "net")
        manifest = env.write_manifest(text)
        ok(env.apply(manifest))
        br = bridge_of(t, "net")
        vm, client = env.add_port_host(t, "net", "vm"), env.add_port_host(t, "net", "client")
        env.dhcp_all([vm, client])
        assert vm.address and vm.address.split("/")[0] == vm.expected_ip, vm.dhcp_output
        assert client.address and client.address.split("/")[0] == client.expected_ip, client.dhcp_output
        env.serve(vm, 22)
        expect([lambda: env.connect(client, vm.ip, 22)], [])

        # a. the bridge deleted by hand
        before = link(br)
        run("ip", "link", "del", "dev", br)
        code, data = plan_json(env, manifest)
        drifted = drift_changes(data)
        assert code == 2 and [(c["kind"], c["name"]) for c in drifted] == [("Network", "net")], data["changes"]
        ok(env.apply(manifest))
        after = link(br)
        assert after is not None, "apply did not restore the bridge"
        assert after["ifalias"] == before["ifalias"] and after["mtu"] == before["mtu"], (before, after)
        assert link(vxlan_of(t, "net")).get("master") == br
        legs = [l["ifname"] for l in all_links() if l.get("master") == br and l["ifname"].startswith("rd-")]
        assert legs, "the DHCP leg is not on the restored bridge"
        # the ports' taps (detached with the bridge, as a guest's would be) are plugged back
        assert {h.tap: link(h.tap).get("master") for h in (vm, client)} == {vm.tap: br, client.tap: br}
        plan_is_zero(env, manifest)
        run("ip", "-n", client.ns, "addr", "flush", "dev", "eth0")
        prefix = ipaddress.IPv4Network(cidr).prefixlen
        assert env.dhcp(client) == f"{client.expected_ip}/{prefix}", client.dhcp_output
        expect([lambda: env.connect(client, vm.ip, 22)], [])

        # b. one nftables rule deleted by handle: the group's tcp/22 accept
        chain = host_name(Key("SecurityGroup", t, "web"), prefix="sg-") + "-in"
        listing = run("nft", "-a", "list", "chain", "inet", env.table, chain).stdout
        rule_lines = [l for l in listing.splitlines() if "dport 22" in l]
        assert len(rule_lines) == 1, listing
        handle = re.search(r"# handle (\d+)", rule_lines[0]).group(1)
        run("nft", "delete", "rule", "inet", env.table, chain, "handle", handle)
        assert "dport 22" not in run("nft", "list", "chain", "inet", env.table, chain).stdout
        expect([], [lambda: env.connect(client, vm.ip, 22)])  # the deletion matters
        code, data = plan_json(env, manifest)
        drifted = drift_changes(data)
        assert code == 2 and [(c["kind"], c["name"]) for c in drifted] == [("SecurityGroup", "web")], data["changes"]
        # and the plan says why: only the host drifted, no other resource changed (checked
        # at the end, so that the dnsmasq case below runs either way)
        rule_reason = drifted[0]["reason"]
        ok(env.apply(manifest))
        restored = run("nft", "list", "chain", "inet", env.table, chain).stdout
        assert [l.strip() for l in restored.splitlines() if "dport 22" in l] == \
            [re.sub(r"\s*# handle \d+", "", rule_lines[0]).strip()], restored
        expect([lambda: env.connect(client, vm.ip, 22)], [])
        plan_is_zero(env, manifest)

        # c. the subnet's dnsmasq killed
        pid_files = list((env.state_dir / "netlink").rglob("pid"))
        assert len(pid_files) == 1, pid_files
        pid = int(pid_files[0].read_text().strip())
        assert alive(pid) and "dnsmasq" in Path(f"/proc/{pid}/cmdline").read_text(), pid
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not alive(pid), 10, interval=0.1, what=f"dnsmasq {pid} to die")
        code, data = plan_json(env, manifest)
        drifted = drift_changes(data)
        assert code == 2 and [(c["kind"], c["name"]) for c in drifted] == [("Network", "net")], data["changes"]
        ok(env.apply(manifest))
        new_pid = int(pid_files[0].read_text().strip())
        assert new_pid != pid and alive(new_pid), (pid, new_pid)
        assert "dnsmasq" in Path(f"/proc/{new_pid}/cmdline").read_text()
        assert netns_inode(pid=new_pid) == netns_inode(name=dhcp_ns_of(t, "net"))
        run("ip", "-n", vm.ns, "addr", "flush", "dev", "eth0")
        assert env.dhcp(vm) == f"{vm.expected_ip}/{prefix}", vm.dhcp_output
        plan_is_zero(env, manifest)
        assert "other resources changed" not in rule_reason, (
            f"the plan's reason for the deleted rule claims other resources changed: {rule_reason!r}")


def kernel_has_vlan() -> bool:
    """Whether this kernel can make a VLAN device (tried on a veth of the test's own)."""
    parent = f"rctvl{os.getpid() % 100000}"
    run("ip", "link", "add", parent, "type", "veth", "peer", "name", parent + "p")
    try:
        return run("ip", "link", "add", "link", parent, "name", parent + ".5", "type", "vlan", "id", "5",
                   check=False).returncode == 0
    finally:
        run("ip", "link", "del", parent)


def test_6c_a_foreign_bridge_is_a_conflict_and_vlan_without_8021q_a_plan_error() -> None:
    with net_env() as env:
        t = env.tenant
        cidr_a, cidr_b = free_subnets(2)
        base = tenant_docs(t) + doc("Network", t, "net", {"subnets": [{"cidr": cidr_a}]})
        # an unmarked bridge with the name our network would get: reported, never touched
        br = bridge_of(t, "net")
        run("ip", "link", "add", br, "type", "bridge")
        try:
            manifest = env.write_manifest(base)
            for args in (("plan", str(manifest)), ("apply", "--yes", str(manifest))):
                result = env.cli(*args)
                output = result.stdout + result.stderr
                assert result.returncode == 1 and "conflict" in output.lower() and br in output, output
                assert "Traceback" not in output, output
            ok(env.cli("destroy", "--yes", str(manifest)))
            dev = link(br)
            assert dev is not None and not dev.get("ifalias"), dev
            assert not [l for l in all_links() if l.get("master") == br], "something was plugged into it"
            assert not {vxlan_of(t, "net")} & {l["ifname"] for l in all_links()}
        finally:
            run("ip", "link", "del", br)
        # a vlan network where the kernel has no 8021q: an error of plan, on that field
        if not kernel_has_vlan():
            manifest = env.write_manifest(base + doc(
                "Network", t, "vl", {"type": "vlan", "vlanId": 100, "subnets": [{"cidr": cidr_b}]}))
            result = env.cli("plan", str(manifest))
            output = result.stdout + result.stderr
            assert result.returncode == 1 and "Traceback" not in output, output
            assert f"Network {t}/vl" in output and "vlan" in output.lower() and "spec.type" in output, output
            assert link(bridge_of(t, "vl")) is None


def test_6b_a_deleted_router_namespace_is_drift_and_restored(cloud: Cloud) -> None:
    env = cloud.env
    a1, b1, outside = addressed(cloud, "a1", "b1", "outside")
    rns = router_ns_of(cloud.A, "r")
    expect([lambda: env.connect(a1, b1.ip, SERVER_PORT)], [])  # the hosts know the router now
    run("ip", "netns", "del", rns)
    expect([], [lambda: env.connect(a1, b1.ip, SERVER_PORT)])
    code, data = plan_json(env, cloud.manifest)
    drifted = [(c["kind"], c["tenant"], c["name"]) for c in drift_changes(data)]
    assert code == 2 and drifted == [("Router", cloud.A, "r")], data["changes"]
    ok(env.apply(cloud.manifest))
    assert rns in namespaces()
    # restored means carrying traffic again, for hosts that talked to the old router too
    # (their ARP caches hold its legs' MACs: a real guest's would): within a few seconds
    deadline = time.monotonic() + 6
    while True:
        results = probe_all([lambda: env.connect(a1, b1.ip, SERVER_PORT),
                             lambda: env.connect(a1, outside.ip, SERVER_PORT)])
        if all(r.ok for r in results) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if not all(r.ok for r in results):
        neigh = run("ip", "-n", a1.ns, "neigh").stdout.strip()
        legs = {l["ifname"]: l.get("address") for l in all_links(namespace=rns) if l["ifname"] != "lo"}
        raise AssertionError(
            "the restored router carries no traffic 6 s after apply: "
            + "; ".join(str(r) for r in results if not r.ok)
            + f"\na1's neighbours: {neigh}\nthe new router legs: {legs}")
    assert results[1].output == f"{cloud.external_ip(cloud.A)} {SERVER_PORT}", results[1]  # SNAT again
    plan_is_zero(env, cloud.manifest)


# --- 7. destroy --------------------------------------------------------------------------------


def test_7_destroy_removes_everything_and_nothing_else(cloud: Cloud) -> None:
    env = cloud.env
    bridges = {bridge_of(t, n) for k, t, n in env.declared if k == "Network"}
    before = all_links()
    driver_links = {l["ifname"] for l in before
                    if (l.get("master") in bridges or l["ifname"] in bridges)
                    and l["ifname"] not in {h.tap for h in cloud.hosts.values()}}
    assert len(driver_links) >= 4 + 3 + 3 + 3 + 2, sorted(driver_links)  # bridges, vxlans, DHCP/router legs
    dnsmasqs = [pid for pid, cmd in processes_mentioning(str(env.state_dir)).items() if "dnsmasq" in cmd]
    test_spaces = {h.ns for h in cloud.hosts.values()}

    started = time.monotonic()
    ok(env.cli("destroy", "--yes", str(cloud.manifest)))
    print(f"destroy of the shared cloud: {time.monotonic() - started:.1f} s")

    names = {l["ifname"] for l in all_links()}
    assert not driver_links & names, f"left after destroy: {sorted(driver_links & names)}"
    wait_for(lambda: not [p for p in dnsmasqs if alive(p)], 5, interval=0.1, what="dnsmasq to exit")
    left = env.leftovers()
    assert not left, f"left after destroy: {left}"
    files = [str(f.relative_to(env.state_dir)) for f in (env.state_dir / "netlink").rglob("*") if not f.is_dir()]
    assert not files, f"the driver's files of the destroyed resources are left: {files}"
    # nothing else: the test's namespaces and taps (an instance driver's devices) remain
    assert test_spaces <= namespaces()
    assert all(h.tap in names for h in cloud.hosts.values())
    plan_code, data = plan_json(env, cloud.manifest)
    assert plan_code == 2 and all(c["action"] == "create" for c in data["changes"]
                                  if c["kind"] in ("Network", "Router", "SecurityGroup"))


# --- 8. a real guest ---------------------------------------------------------------------------


def test_8_a_guest_gets_its_reservation_and_only_what_its_groups_allow() -> None:
    with net_env(compute="libvirt") as env:
        t = env.tenant
        (cidr,) = free_subnets(1)
        net = ipaddress.IPv4Network(cidr)
        allowed_ip, other_ip = str(net.network_address + 3), str(net.network_address + 4)

        def manifest(rules: list[dict[str, Any]]) -> Path:
            text = tenant_docs(t)
            text += doc("Network", t, "net", {"subnets": [{"cidr": cidr}]})
            text += doc("SecurityGroup", t, "web", {"rules": rules})
            text += instance(t, "vm", "net", groups=["web"], vcpus=1, restartPolicy="Never")
            return env.write_manifest(text)

        first = manifest([{"protocol": "tcp", "ports": "80", "remote": f"{allowed_ip}/32"}])
        started = time.monotonic()
        ok(env.apply(first))
        print(f"apply with a guest: {time.monotonic() - started:.1f} s")
        guest_ip = env.port(t, "net", "vm")["ip"]
        br = bridge_of(t, "net")
        allowed, other = env.add_host("allowed", br), env.add_host("other", br)
        env.set_static(allowed, f"{allowed_ip}/{net.prefixlen}")
        env.set_static(other, f"{other_ip}/{net.prefixlen}")

        name = env.domain_name("vm")
        page = env.http(allowed, f"http://{guest_ip}/cgi-bin/info", 150)
        console = env.instance_dir / name / "console.log"
        assert page.ok, (f"{page}\n{name}: {domstate(name, reason=True)}\nconsole:\n"
                         f"{console.read_text(errors='replace')[-3000:] if console.exists() else '(none)'}")
        info = [l for l in page.output.splitlines() if l.startswith("ip=")]
        assert info == [f"ip=eth0,{guest_ip}/{net.prefixlen}"], page.output
        assert f"reconciler-guest: ip eth0 {guest_ip}/{net.prefixlen} (dhcp)" in console.read_text(errors="replace")
        expect([lambda: env.connect(allowed, guest_ip, 80)],
               [lambda: env.connect(other, guest_ip, 80), lambda: env.ping(allowed, guest_ip)])

        ok(env.apply(manifest([])))
        assert domstate(name) == "running"
        expect([], [lambda: env.connect(allowed, guest_ip, 80), lambda: env.connect(other, guest_ip, 80)])
