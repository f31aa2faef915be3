"""One suite, two drivers: Network, Router and SecurityGroup on the memory driver and on
the netlink driver (real bridges, namespaces, dnsmasq and nftables on this kernel).

Each case acts through the driver and asserts on what `observe` reads back: the spec
and the derived host facts equal to the target, and no drift. On the netlink harness
the host is also checked with tools that are not ours (`ip -d link`, `ip netns`, `nft
list`, /proc). Packets (DHCP, ping, TCP) are the integration tests' business.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from reconciler.drivers.netlink import _host
from reconciler.errors import Conflict, PermanentError
from reconciler.models import Key
from reconciler.naming import mac_address, tap_name
from reconciler.state import Observed, Target

from .conftest import target

NET = "10.248"


def dhcp_namespace_of(bridge: str) -> str:
    from reconciler.drivers.netlink._names import dhcp_namespace

    return dhcp_namespace(bridge)


def observed(driver: Any, key: Key) -> list[Observed]:
    return [o for o in driver.observe().owned if o.key == key]


def only(driver: Any, key: Key) -> Observed:
    found = observed(driver, key)
    assert len(found) == 1, found
    return found[0]


def with_derived(t: Target, derived: dict[str, Any], related: dict[Key, Observed] | None = None) -> Target:
    return dataclasses.replace(t, derived=derived, related=related or {})


def port(tenant: str, instance: str, network: str, ip: str | None, groups: tuple[str, ...] = ()) -> dict[str, Any]:
    """A port as the planner derives it for an instance NIC."""
    return {"owner": f"{tenant}/{instance}", "hostname": instance, "mac": mac_address(tenant, instance, network),
            "ip": ip, "tap": tap_name(tenant, instance, network), "groups": sorted(groups)}


def network(h: Any, name: str, third: int, ports: list[dict[str, Any]] | None = None, **fields: Any) -> Target:
    fields.setdefault("vni", 7000 + third)
    fields.setdefault("subnets", [{"cidr": f"{NET}.{third}.0/24"}])
    return with_derived(target("Network", h.tenant, name, **fields), {"ports": ports or []})


def assert_realised(h: Any, t: Target) -> Observed:
    seen = only(h.driver, t.key)
    assert dict(seen.spec) == dict(t.spec)
    assert dict(seen.derived) == dict(t.derived)
    assert seen.drift == ()
    assert seen.mark.spec_hash == t.mark.spec_hash and not seen.mark.orphaned
    return seen


def is_netlink(h: Any) -> bool:
    return h.name == "netlink"


# --- networks -------------------------------------------------------------------------


def test_vxlan_network_with_a_subnet_is_observed_as_created(net_harness: Any) -> None:
    h = net_harness
    ports = [port(h.tenant, "web-1", "net", f"{NET}.1.20", ("ssh",)), port(h.tenant, "web-2", "net", None)]
    t = network(h, "net", 1, ports, mtu=1400)
    created = h.driver.create(t)
    assert dict(created.spec) == dict(t.spec) and dict(created.derived) == dict(t.derived)
    seen = assert_realised(h, t)
    assert seen.host["bridge"] == h.driver.host_name(t.key)
    if is_netlink(h):
        bridge = h.link(seen.host["bridge"])
        assert bridge and bridge["linkinfo"]["info_kind"] == "bridge" and bridge["mtu"] == 1400
        assert f"home={h.home} key=Network/{h.tenant}/net " in bridge["ifalias"]
        assert bridge["linkinfo"]["info_data"]["nf_call_iptables"] == 1
        vxlan = h.link("rv-" + seen.host["bridge"][3:])
        assert vxlan["linkinfo"]["info_data"]["id"] == 7001 and vxlan["master"] == seen.host["bridge"]
        assert vxlan["linkinfo"]["info_data"]["learning"] is False
        assert seen.host["namespace"] in h.namespaces()
        assert len(h.dnsmasq_pids()) == 1
        chains = h.nft()
        in_chain = "in-" + seen.host["bridge"][3:]
        assert any(f"ip daddr {NET}.1.20 jump pi-" in r for r in chains[in_chain])
        assert not any("ip daddr" in r for r in chains[in_chain] if "web-2" in r)
        spoof = h.nft("bridge")["spoof-" + seen.host["bridge"][3:]]
        assert any(ports[1]["mac"] in r for r in spoof)  # a port without an address: MAC only


def test_a_null_mtu_reads_back_null(net_harness: Any) -> None:
    h = net_harness
    t = network(h, "net", 2, type="flat", vni=None, subnets=[])
    h.driver.create(t)
    seen = assert_realised(h, t)
    assert seen.spec["mtu"] is None
    if is_netlink(h):
        assert h.link(seen.host["bridge"])["mtu"] == 1500
        assert "namespace" not in seen.host  # no subnet, no DHCP namespace
        assert dhcp_namespace_of(seen.host["bridge"]) not in h.namespaces()


def test_mtu_changes_in_place(net_harness: Any) -> None:
    h = net_harness
    t = network(h, "net", 3, mtu=1450)
    h.driver.create(t)
    before = only(h.driver, t.key)
    new = network(h, "net", 3, mtu=1400)
    h.driver.update(new, before, ())
    seen = assert_realised(h, new)
    if is_netlink(h):
        assert before.identity == seen.identity  # the same bridge, changed in place
        assert h.link(seen.host["bridge"])["mtu"] == 1400
        assert h.link("rv-" + seen.host["bridge"][3:])["mtu"] == 1400
        assert seen.host["mtu"] == "1400"


def test_ports_follow_the_derived_facts(net_harness: Any) -> None:
    h = net_harness
    a = port(h.tenant, "a", "net", f"{NET}.4.21", ("web",))
    b = port(h.tenant, "b", "net", f"{NET}.4.22")
    t = network(h, "net", 4, [a])
    h.driver.create(t)
    pid = h.dnsmasq_pids() if is_netlink(h) else []
    for ports in ([a, b], [{**a, "groups": ["db", "web"]}, b], [b], []):
        new = network(h, "net", 4, ports)
        h.driver.update(new, only(h.driver, t.key), ())
        seen = assert_realised(h, new)
        if is_netlink(h):
            hosts = (h.root / "netlink" / "dhcp" / seen.identity / f"{NET}.4.0_24" / "hosts").read_text()
            assert hosts.splitlines() == [f"{p['mac']},{p['ip']},{p['hostname']}" for p in ports]
            filtered = [p for p in ports if p["groups"]]
            chains = h.nft()
            assert sorted(c for c in chains if c.startswith("pi-")) == sorted("pi-" + p["tap"][3:] for p in filtered)
            for p in filtered:
                jumps = [r.split()[1] for r in chains["pi-" + p["tap"][3:]] if r.startswith("jump")]
                assert jumps == [f"{h.driver.host_name(Key('SecurityGroup', h.tenant, g))}-in" for g in p["groups"]]
            assert h.dnsmasq_pids() == pid  # reservations reload by SIGHUP, no restart


def test_a_bridge_without_our_mark_is_a_conflict_and_untouched(net_harness: Any) -> None:
    h = net_harness
    t = network(h, "net", 5)
    name = h.unowned(t.key)
    assert any(u.kind == "Network" and u.host_name == name for u in h.driver.observe().unowned)
    with pytest.raises(Conflict):
        h.driver.create(t)
    assert any(u.host_name == name for u in h.driver.observe().unowned)
    assert observed(h.driver, t.key) == []
    if is_netlink(h):
        link = h.link(name)
        assert link is not None and not link.get("ifalias") and link.get("mtu") == 1500
        assert not [x for x in h.leftovers() if not x.startswith("table")]


def test_delete_removes_everything_and_is_idempotent(net_harness: Any) -> None:
    h = net_harness
    t = network(h, "net", 6, [port(h.tenant, "a", "net", f"{NET}.6.20", ("web",))])
    h.driver.create(t)
    seen = only(h.driver, t.key)
    h.driver.delete(seen)
    h.driver.delete(seen)  # already gone: fine
    assert observed(h.driver, t.key) == []
    if is_netlink(h):
        assert h.link(seen.identity) is None and h.link("rv-" + seen.identity[3:]) is None
        assert dhcp_namespace_of(seen.identity) not in h.namespaces()
        assert h.leftovers() == []
        assert not (h.root / "netlink" / "dhcp" / seen.identity).exists()


def test_adoption_marks_an_unmarked_bridge(net_harness: Any) -> None:
    h = net_harness
    t = network(h, "net", 7)
    name = h.unowned(t.key)
    adopted = h.driver.adopt(name, t)
    seen = only(h.driver, t.key)
    assert adopted.key == t.key and seen.mark.spec_hash == t.mark.spec_hash
    assert not any(u.host_name == name for u in h.driver.observe().unowned)
    with pytest.raises(Conflict):
        h.driver.adopt(name, t)  # already ours
    if is_netlink(h):
        assert f"key=Network/{h.tenant}/net " in h.link(name)["ifalias"]
        assert seen.spec["type"] == "flat" and seen.spec["subnets"] == []  # what the bridge is


# --- routers --------------------------------------------------------------------------


def _three_networks(h: Any) -> tuple[Observed, Observed, Observed]:
    a = h.driver.create(network(h, "a", 10))
    b = h.driver.create(network(h, "b", 11, subnets=[{"cidr": f"{NET}.11.0/24"}, {"cidr": f"{NET}.12.0/24"}]))
    ext = h.driver.create(network(h, "ext", 13, type="flat", vni=None, external=True,
                                  subnets=[{"cidr": f"{NET}.13.0/24", "dhcp": {"enabled": False}}]))
    return a, b, ext


def test_router_with_two_networks_and_an_external_one(net_harness: Any) -> None:
    h = net_harness
    a, b, ext = _three_networks(h)
    t = with_derived(target("Router", h.tenant, "r", networks=["a", "b"], external="ext"),
                     {"externalAddress": f"{NET}.13.7/24"}, h.related(a, b, ext))
    h.driver.create(t)
    seen = assert_realised(h, t)
    if is_netlink(h):
        ns = seen.host["namespace"]
        assert ns == seen.identity and ns in h.namespaces()
        addrs = json.loads(_ip("-n", ns, "-j", "addr", "show"))
        held = sorted(f"{x['local']}/{x['prefixlen']}" for i in addrs for x in i.get("addr_info", [])
                      if x["family"] == "inet" and i["ifname"] != "lo")
        assert held == sorted([f"{NET}.10.1/24", f"{NET}.11.1/24", f"{NET}.12.1/24", f"{NET}.13.7/24"])
        assert "default via " + f"{NET}.13.1" in _ip("-n", ns, "route")
        nat = " ".join(_run_text("ip", "netns", "exec", ns, "nft", "list", "chain", "inet", "reconciler",
                                 "postrouting").split())
        # the three tenant subnets, which nft lists merged into one range
        assert f'oifname "qg-' in nat and f"ip saddr {{ {NET}.10.0-{NET}.12.255 }} masquerade" in nat
        assert "policy drop" in _run_text("ip", "netns", "exec", ns, "nft", "list", "chain", "inet", "reconciler",
                                          "forward")
        lo = json.loads(_ip("-n", ns, "-j", "-d", "link", "show", "dev", "lo"))[0]
        assert f"key=Router/{h.tenant}/r " in lo["ifalias"]
        for net in (a, b, ext):  # each leg's host end is on its network's bridge
            legs = [x for x in json.loads(_ip("-j", "link", "show", "master", net.host["bridge"]))
                    if x["ifname"].startswith(("rr-", "rg-"))]
            assert len(legs) == 1, legs


def test_router_legs_and_snat_change_in_place(net_harness: Any) -> None:
    h = net_harness
    a, b, ext = _three_networks(h)
    related = h.related(a, b, ext)
    t = with_derived(target("Router", h.tenant, "r", networks=["a", "b"], external="ext"),
                     {"externalAddress": f"{NET}.13.7/24"}, related)
    h.driver.create(t)
    before = only(h.driver, t.key)
    new = with_derived(target("Router", h.tenant, "r", networks=["b"], external="ext", snat=False),
                       {"externalAddress": f"{NET}.13.7/24"}, related)
    h.driver.update(new, before, ())
    seen = assert_realised(h, new)
    internal = with_derived(target("Router", h.tenant, "r", networks=["a"]), {}, related)
    h.driver.update(internal, seen, ())
    seen = assert_realised(h, internal)
    if is_netlink(h):
        ns = seen.host["namespace"]
        assert "postrouting" not in h.nft(namespace=ns, table="reconciler")
        assert "default" not in _ip("-n", ns, "route")
        names = [x["ifname"] for x in json.loads(_ip("-n", ns, "-j", "link", "show"))]
        assert sorted(n[:3] for n in names) == ["lo", "qr-"]


@pytest.mark.parametrize("net_harness", ["netlink"], indirect=True)
def test_a_router_needs_its_networks_on_the_host(net_harness: Any) -> None:
    """Real driver only: the memory driver does not look at related networks."""
    h = net_harness
    from reconciler.errors import TransientError

    t = target("Router", h.tenant, "r", networks=["missing"])
    with pytest.raises(TransientError, match="not on this host"):
        h.driver.create(t)


# --- security groups ------------------------------------------------------------------


def test_security_group_rules_update(net_harness: Any) -> None:
    h = net_harness
    rules = [{"protocol": "tcp", "ports": "22"}, {"protocol": "icmp", "remote": "web"}]
    t = with_derived(target("SecurityGroup", h.tenant, "ssh", rules=rules),
                     {"remotes": {"web": [f"{NET}.20.5", f"{NET}.20.6"]}})
    h.driver.create(t)
    seen = assert_realised(h, t)
    rules2 = [{"protocol": "tcp", "ports": "8000-8080", "remote": f"{NET}.0.0/16"},
              {"direction": "egress", "protocol": "udp", "ports": "53"}, {"protocol": "icmp", "remote": "web"}]
    new = with_derived(target("SecurityGroup", h.tenant, "ssh", rules=rules2), {"remotes": {"web": []}})
    h.driver.update(new, seen, ())
    seen = assert_realised(h, new)
    if is_netlink(h):
        chains = h.nft()
        prefix = seen.identity
        assert [r.split(" comment")[0] for r in chains[prefix + "-in"]] == \
            [f"ip saddr {NET}.0.0/16 tcp dport 8000-8080 accept"]  # the remote group has no members
        assert [r.split(" comment")[0] for r in chains[prefix + "-out"]] == ["udp dport 53 accept"]
        assert seen.host["table"] == f"inet {h.table}"
    h.driver.delete(seen)
    h.driver.delete(seen)
    assert observed(h.driver, t.key) == []
    if is_netlink(h):
        assert h.leftovers() == []


# --- the real host only ---------------------------------------------------------------


@pytest.mark.parametrize("net_harness", ["netlink"], indirect=True)
def test_drift_is_reported_and_repaired(net_harness: Any) -> None:
    import os
    import signal
    import time

    h = net_harness
    ports = [port(h.tenant, "a", "net", f"{NET}.30.20", ("web",))]
    t = network(h, "net", 30, ports)
    h.driver.create(t)
    group = with_derived(target("SecurityGroup", h.tenant, "web", rules=[{"protocol": "tcp", "ports": "22"}]),
                         {"remotes": {}})
    h.driver.create(group)
    seen = assert_realised(h, t)
    bridge = seen.identity

    def repaired() -> None:
        h.driver.update(t, only(h.driver, t.key), ())
        assert_realised(h, t)

    _run_text("ip", "link", "del", bridge)
    drift = only(h.driver, t.key).drift
    assert f"bridge {bridge} is missing" in drift
    repaired()
    assert h.link("rv-" + bridge[3:])["master"] == bridge

    (pid,) = h.dnsmasq_pids()
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while pid in h.dnsmasq_pids() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert any("dnsmasq" in d and "not running" in d for d in only(h.driver, t.key).drift)
    repaired()
    assert len(h.dnsmasq_pids()) == 1 and h.dnsmasq_pids() != [pid]

    chain = "pi-" + ports[0]["tap"][3:]
    listing = _run_text("nft", "-a", "list", "chain", "inet", h.table, chain)
    handle = [line.split("# handle ")[1] for line in listing.splitlines() if "jump sg-" in line][0]
    _run_text("nft", "delete", "rule", "inet", h.table, chain, "handle", handle)
    seen = only(h.driver, t.key)
    assert any("missing" in d and chain in d for d in seen.drift)
    assert seen.derived["ports"] == []  # the port's rules are not all there
    repaired()

    sg_in = h.driver.host_name(group.key) + "-in"
    listing = _run_text("nft", "-a", "list", "chain", "inet", h.table, sg_in)
    line = [x for x in listing.splitlines() if "dport 22" in x][0]
    handle, comment = line.split("# handle ")[1], line.split('comment "')[1].split('"')[0]
    _run_text("nft", "replace", "rule", "inet", h.table, sg_in, "handle", handle, "tcp", "dport", "23", "accept",
              "comment", f'"{comment}"')
    assert any("altered" in d for d in only(h.driver, group.key).drift)
    h.driver.update(group, only(h.driver, group.key), ())
    assert_realised(h, group)
    assert any("dport 22" in r for r in h.nft()[sg_in])


@pytest.mark.parametrize("net_harness", ["netlink"], indirect=True)
def test_another_installation_is_not_touched(net_harness: Any) -> None:
    from reconciler.drivers.netlink import NetlinkDriver

    h = net_harness
    t = network(h, "net", 31)
    h.driver.create(t)
    other = NetlinkDriver(dataclasses.replace(h.driver.settings, home="0badc0de",
                                              state_dir=h.root / "elsewhere"))
    seen = other.observe()
    assert not [o for o in seen.owned if o.key == t.key]
    name = h.driver.host_name(t.key)
    assert any(u.host_name == name and "another reconciler installation" in u.detail for u in seen.unowned)
    with pytest.raises(Conflict, match="another reconciler installation"):
        other.create(t)
    assert_realised(h, t)


@pytest.mark.parametrize("net_harness", ["netlink"], indirect=True)
def test_orphaning_is_refused(net_harness: Any) -> None:
    h = net_harness
    t = network(h, "net", 32, type="flat", vni=None, subnets=[])
    h.driver.create(t)
    with pytest.raises(PermanentError, match="never orphaned"):
        h.driver.orphan(only(h.driver, t.key))


@pytest.mark.parametrize("net_harness", ["netlink"], indirect=True)
def test_changes_of_several_networks_run_in_parallel(net_harness: Any) -> None:
    from concurrent.futures import ThreadPoolExecutor

    h = net_harness
    targets = [network(h, f"n{i}", 40 + i, [port(h.tenant, f"vm{i}", f"n{i}", f"{NET}.{40 + i}.20", ("web",))])
               for i in range(6)]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(h.driver.create, targets))
    for t in targets:
        assert_realised(h, t)
    assert len(h.dnsmasq_pids()) == 6
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(h.driver.delete, [only(h.driver, t.key) for t in targets]))
    assert h.leftovers() == []


def _ip(*args: str) -> str:
    return _run_text("ip", *args)


def _run_text(*argv: str) -> str:
    import subprocess

    result = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    assert result.returncode == 0, (argv, result.stderr)
    return result.stdout


@pytest.mark.parametrize("net_harness", ["netlink"], indirect=True)
def test_flat_uplink_is_enslaved_and_released_never_deleted(net_harness: Any) -> None:
    import secrets

    from reconciler.drivers.netlink import NetlinkDriver

    h = net_harness
    uplink = "rctu" + secrets.token_hex(4)  # a veth standing in for a host NIC
    _run_text("ip", "link", "add", uplink, "type", "veth", "peer", "name", uplink + "p")
    h.unmarked.append(("link", uplink))
    t = network(h, "prov", 33, type="flat", vni=None, external=True, subnets=[])
    driver = NetlinkDriver(dataclasses.replace(h.driver.settings, uplinks={f"{h.tenant}/prov": uplink}))
    assert driver.problems("Network", h.tenant, "prov", t.spec) == []
    driver.create(t)
    seen = assert_realised(_with(h, driver), t)
    assert h.link(uplink)["master"] == seen.identity
    driver.delete(seen)
    link = h.link(uplink)
    assert link is not None and "master" not in link  # released, still there


@pytest.mark.parametrize("net_harness", ["netlink"], indirect=True)
def test_vlan_is_refused_where_the_kernel_has_no_8021q(net_harness: Any) -> None:
    """Plan-time refusal exactly where the kernel lacks 8021q (this one does; a kernel
    with it must not be told so)."""
    h = net_harness
    t = network(h, "v", 34, type="vlan", vni=None, vlanId=100)
    expected = "type vlan needs VLAN (8021q) support, which this host's kernel lacks; use vxlan or flat"
    problems = h.driver.problems("Network", h.tenant, "v", t.spec)
    if _host.has_8021q():
        assert (("type",), expected) not in problems
        return
    assert (("type",), expected) in problems
    with pytest.raises(PermanentError, match=r"needs VLAN \(8021q\) support"):
        h.driver.create(t)
    assert h.link(h.driver.host_name(t.key)) is None


@pytest.mark.parametrize("net_harness", ["netlink"], indirect=True)
def test_vxlan_floods_to_the_configured_peers(net_harness: Any) -> None:
    from reconciler.drivers.netlink import NetlinkDriver

    h = net_harness
    driver = NetlinkDriver(dataclasses.replace(h.driver.settings, vxlan_peers=("192.0.2.10", "192.0.2.11")))
    t = network(h, "net", 35, subnets=[])
    seen = driver.create(t)
    assert seen.drift == ()
    fdb = _run_text("bridge", "fdb", "show", "dev", "rv-" + seen.identity[3:])
    assert "00:00:00:00:00:00 dst 192.0.2.10" in fdb and "00:00:00:00:00:00 dst 192.0.2.11" in fdb
    _run_text("bridge", "fdb", "del", "00:00:00:00:00:00", "dev", "rv-" + seen.identity[3:], "dst", "192.0.2.11")
    assert any("192.0.2.11" in d for d in only(driver, t.key).drift)
    driver.update(t, only(driver, t.key), ())
    assert only(driver, t.key).drift == ()


class _with:
    """A harness seen through another driver of the same installation."""

    def __init__(self, h: Any, driver: Any):
        self.__dict__.update(h.__dict__)
        self.driver = driver
