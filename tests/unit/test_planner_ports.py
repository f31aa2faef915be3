"""Addresses and ports, through the public planner API.

Every instance NIC on a network with a subnet gets an address in the plan: the one the
manifest fixes, else the one the host already has while it still fits, else one
allocated stably. The network's target carries its ports (the DHCP reservations and the
per-port firewall rules of the network driver), a security group's target the member
addresses of the groups its rules name, a router's target its external address.
"""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from reconciler.loader import load
from reconciler.models import Key
from reconciler.naming import mac_address, tap_name
from reconciler.planner import Action, Plan, plan
from reconciler.state import Observation, Observed


def _doc(kind: str, name: str, spec: dict | None = None, tenant: str = "acme") -> dict:
    metadata: dict[str, Any] = {"name": name}
    if kind != "Tenant":
        metadata["tenant"] = tenant
    return {"apiVersion": "reconciler/v1", "kind": kind, "metadata": metadata, "spec": spec or {}}


def _vm(name: str, *nics: dict, tenant: str = "acme") -> dict:
    return _doc("Instance", name, {"image": "tiny", "networks": list(nics)}, tenant)


BASE = [
    _doc("Tenant", "acme"),
    _doc("Image", "tiny", {"source": "/images/tiny.qcow2"}),
    _doc("Network", "web", {"subnets": [{"cidr": "10.1.0.0/24"}]}),
    _doc("Network", "db", {"subnets": [{"cidr": "10.2.0.0/24", "dhcp": {"start": "10.2.0.100", "end": "10.2.0.110"}}]}),
    _doc("SecurityGroup", "web", {"rules": [{"protocol": "tcp", "ports": "80"}]}),
    _doc("SecurityGroup", "db", {"rules": [{"protocol": "tcp", "ports": "5432", "remote": "web"}]}),
]


@pytest.fixture
def planned(write_manifests: Callable[..., Path]):
    """planned(docs, host=None) -> Plan against `host` (an Observation; empty by default)."""

    def run(docs: list[dict], host: Observation | None = None) -> Plan:
        files = {f"{i}.yaml": yaml.safe_dump(d, sort_keys=False) for i, d in enumerate(docs)}
        desired, problems = load([write_manifests(files)])
        assert problems == [], [str(p) for p in problems]
        return plan(desired, host or Observation())

    return run


def applied(p: Plan) -> Observation:
    """The host after a successful apply of `p` (every target realised as planned)."""
    return Observation(owned=[
        Observed(c.key, f"host:{c.id}", json.loads(json.dumps(dict(c.target.spec))), c.target.mark, {},
                 derived=json.loads(json.dumps(dict(c.target.derived))))
        for c in p.changes if c.target is not None
    ])


def target(p: Plan, key: str):
    (change,) = [c for c in p.changes if str(c.key) == key]
    return change


def ip_of(p: Plan, vm: str, index: int = 0) -> str | None:
    change = target(p, f"Instance/acme/{vm}")
    spec = change.target.spec if change.target is not None else change.observed[0].spec  # a noop
    return spec["networks"][index]["ip"]


def test_every_nic_gets_an_address_in_its_dhcp_range_and_the_network_its_port(planned) -> None:
    p = planned(BASE + [_vm("a", {"network": "web", "securityGroups": ["web"]}),
                        _vm("b", {"network": "db", "ip": "10.2.0.5"})])
    a = IPv4Address(ip_of(p, "a"))
    assert IPv4Address("10.1.0.10") <= a <= IPv4Address("10.1.0.254")
    assert ip_of(p, "b") == "10.2.0.5"  # fixed in the manifest
    ports = target(p, "Network/acme/web").target.derived["ports"]
    assert ports == [{
        "owner": "acme/a", "hostname": "a", "mac": mac_address("acme", "a", "web"), "ip": str(a),
        "tap": tap_name("acme", "a", "web"), "groups": ["web"],
    }]
    assert [x["ip"] for x in target(p, "Network/acme/db").target.derived["ports"]] == ["10.2.0.5"]


def test_allocation_is_stable_and_unique(planned) -> None:
    vms = [_vm(f"vm-{i}", {"network": "db"}) for i in range(11)]  # the range holds exactly 11
    first = planned(BASE + vms)
    again = planned(list(reversed(BASE + vms)))
    ips = [ip_of(first, f"vm-{i}") for i in range(11)]
    assert ips == [ip_of(again, f"vm-{i}") for i in range(11)]  # independent of file order
    assert sorted(ips, key=IPv4Address) == [f"10.2.0.{n}" for n in range(100, 111)]


def test_past_the_range_the_rest_of_the_subnet_is_used_then_it_is_a_plan_error(planned) -> None:
    # a /29: .1 gateway, .2 the DHCP server, .3-.6 the range; nothing else is left
    tiny = _doc("Network", "tiny", {"subnets": [{"cidr": "10.3.0.0/29"}]})
    vms = [_vm(f"vm-{i}", {"network": "tiny"}) for i in range(4)]
    p = planned(BASE + [tiny] + vms)
    assert p.errors == []
    assert sorted(ip_of(p, f"vm-{i}") for i in range(4)) == [f"10.3.0.{n}" for n in range(3, 7)]
    host = applied(p)
    p = planned(BASE + [tiny] + vms + [_vm("one-too-many", {"network": "tiny"})], host)
    # the instances on the host keep theirs: the new one is refused, naming its NIC
    assert [(e.resource, e.path) for e in p.errors] == [("Instance acme/one-too-many", "spec.networks[0]")]
    assert "no free address left on network acme/tiny" in p.errors[0].message


def test_addresses_are_kept_when_other_instances_come_and_go(planned) -> None:
    p1 = planned(BASE + [_vm("a", {"network": "web"}), _vm("b", {"network": "web"})])
    host = applied(p1)
    p2 = planned(BASE + [_vm("b", {"network": "web"}), _vm("c", {"network": "web"})], host)
    assert ip_of(p2, "b") == ip_of(p1, "b")
    assert target(p2, "Instance/acme/b").action is Action.NOOP
    assert ip_of(p2, "c") not in (ip_of(p1, "b"),)
    # the network's plan shows exactly the ports that come and go
    net = target(p2, "Network/acme/web")
    assert net.action is Action.UPDATE
    assert sorted(d.path for d in net.diffs) == [("ports", "acme/a"), ("ports", "acme/c")]
    assert net.reason == "other resources changed: ports.acme/a, ports.acme/c"


def test_plan_after_apply_is_empty(planned) -> None:
    docs = BASE + [
        _vm("a", {"network": "web", "securityGroups": ["web"]}),
        _vm("b", {"network": "db", "securityGroups": ["db"]}, {"network": "web"}),
        _doc("Network", "ext", {"external": True, "subnets": [{"cidr": "192.0.2.0/24"}]}),
        _doc("Router", "r", {"networks": ["web", "db"], "external": "ext"}),
    ]
    p = planned(docs)
    assert not planned(docs, applied(p)).has_changes


def test_a_fixed_address_takes_precedence_over_a_kept_one(planned) -> None:
    p1 = planned(BASE + [_vm("a", {"network": "web"})])
    taken = ip_of(p1, "a")
    p2 = planned(BASE + [_vm("a", {"network": "web"}), _vm("b", {"network": "web", "ip": taken})], applied(p1))
    assert ip_of(p2, "b") == taken
    moved = target(p2, "Instance/acme/a")
    assert ip_of(p2, "a") != taken
    assert [(d.path, d.cause) for d in moved.diffs] == [(("networks", 0, "ip"), "derived")]


def test_group_remotes_resolve_to_member_addresses(planned) -> None:
    p = planned(BASE + [_vm("a", {"network": "web", "securityGroups": ["web"]}),
                        _vm("b", {"network": "db", "ip": "10.2.0.7", "securityGroups": ["web", "db"]}),
                        _vm("c", {"network": "web"})])
    remotes = target(p, "SecurityGroup/acme/db").target.derived["remotes"]
    assert remotes == {"web": sorted([ip_of(p, "a"), "10.2.0.7"], key=IPv4Address)}
    assert target(p, "SecurityGroup/acme/web").target.derived == {"remotes": {}}


def test_router_external_address_avoids_the_dhcp_range_and_is_kept(planned) -> None:
    docs = BASE + [
        _doc("Network", "ext", {"external": True, "subnets": [{"cidr": "192.0.2.0/24"}]}),
        _doc("Router", "r", {"networks": ["web"], "external": "ext"}),
    ]
    p = planned(docs)
    address = target(p, "Router/acme/r").target.derived["externalAddress"]
    ip, prefix = address.split("/")
    assert prefix == "24"
    assert IPv4Address(ip) in IPv4Network("192.0.2.0/24")
    # outside the DHCP range (192.0.2.10-254) and not the gateway (.1) or DHCP server (.9)
    assert IPv4Address("192.0.2.2") <= IPv4Address(ip) <= IPv4Address("192.0.2.8")
    p2 = planned(docs + [_vm("x", {"network": "web"})], applied(p))
    assert target(p2, "Router/acme/r").action is Action.NOOP


def test_a_nic_on_a_network_without_subnets_has_no_address(planned) -> None:
    docs = BASE + [_doc("Network", "l2"), _vm("a", {"network": "l2"})]
    p = planned(docs)
    assert ip_of(p, "a") is None
    assert target(p, "Network/acme/l2").target.derived["ports"][0]["ip"] is None


def test_host_drift_plans_a_repair_without_spec_changes(planned) -> None:
    docs = BASE + [_vm("a", {"network": "web"})]
    host = applied(planned(docs))
    net = next(o for o in host.owned if o.key == Key("Network", "acme", "web"))
    host.owned[host.owned.index(net)] = Observed(net.key, net.identity, net.spec, net.mark, net.host,
                                                 derived=net.derived, drift=("bridge rc-x is missing",))
    change = target(planned(docs, host), "Network/acme/web")
    assert change.action is Action.UPDATE
    assert change.reason == "drift on the host: bridge rc-x is missing"
    assert change.target is not None and change.target.derived == net.derived
