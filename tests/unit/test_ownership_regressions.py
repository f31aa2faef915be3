"""Regressions found by the ownership suite (tests/integration/test_ownership.py): objects
made by someone else, with the names our drivers derive, were adopted, changed or
deleted, or not reported by `plan`. Each case at the driver boundary, without the kernel
or libvirtd (the nftables boundary is a small recording stand-in; files are real)."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from reconciler.drivers.libvirt import LibvirtDriver, LibvirtSettings
from reconciler.drivers.libvirt._driver import OWNER_FILE, claim_folder, folder_owner
from reconciler.drivers.netlink import NetlinkDriver, NetlinkSettings, _host, _names, _nft
from reconciler.drivers.netlink._driver import Facts
from reconciler.errors import Conflict
from reconciler.models import Key
from reconciler.naming import host_name
from reconciler.state import Mark, Observation, Target

HOME = "0a1b2c3d"
TABLE = f"reconciler_{HOME}"
NET = Key("Network", "acme", "web")
BRIDGE = host_name(NET)
H = BRIDGE[3:]
GROUP = Key("SecurityGroup", "acme", "ssh")
SG_IN = _names.group_chains(GROUP)[0]


def listing(*items: dict[str, Any], family: str = "inet") -> _nft.Listing:
    """A table as `nft -j list table` shows it, holding `items` (chain and rule objects)."""
    head = [{"metainfo": {"version": "1.0.6"}}, {"table": {"family": family, "name": TABLE, "handle": 1}}]
    return _nft.Listing.parse(json.dumps({"nftables": head + list(items)}))


def chain(name: str, family: str = "inet", **hook: Any) -> dict[str, Any]:
    return {"chain": {"family": family, "table": TABLE, "name": name, "handle": 2, **hook}}


def rule(chain_name: str, comment: str | None, handle: int = 3, family: str = "inet") -> dict[str, Any]:
    r: dict[str, Any] = {"family": family, "table": TABLE, "chain": chain_name, "handle": handle,
                         "expr": [{"accept": None}]}
    if comment is not None:
        r["comment"] = comment
    return {"rule": r}


HANDMADE = listing(chain("handmade"), rule("handmade", "made by hand"))
OURS = listing(chain("ingress", type="filter", hook="forward", prio=0),
               rule("ingress", _names.rule_comment("base", "ingress", [])))


class RecordingNft:
    """The nftables boundary: fixed listings; what the driver asked to change."""

    def __init__(self, inet: _nft.Listing, bridge: _nft.Listing | None = None):
        self.tables = {"inet": inet, "bridge": bridge or _nft.Listing()}
        self.applied: list[Any] = []
        self.deleted: list[tuple[str, str]] = []

    def list_table(self, family: str, table: str, namespace: str | None = None) -> _nft.Listing:
        return self.tables[family]

    def apply(self, commands: Any, namespace: str | None = None) -> None:
        self.applied.append(commands)

    def delete_table(self, family: str, table: str) -> None:
        self.deleted.append((family, table))


def driver(tmp_path: Path, nft: RecordingNft | None = None) -> NetlinkDriver:
    d = NetlinkDriver(NetlinkSettings(state_dir=tmp_path, home=HOME))
    d._vlan = False
    if nft is not None:
        d.nft = nft  # type: ignore[assignment]
    return d


def facts(links: list[_host.Link] = (), namespaces: tuple[str, ...] = (), inet: _nft.Listing | None = None,
          networks: dict[str, Any] | None = None) -> Facts:
    snap = _host.Snapshot(links={link.name: link for link in links}, namespaces=frozenset(namespaces))
    return Facts(snap=snap, inet=inet or _nft.Listing(), bridge=_nft.Listing(), networks=networks or {},
                 routers={}, groups={})


def link(name: str, kind: str, alias: str | None = None) -> _host.Link:
    return _host.Link(index=7, name=name, kind=kind, alias=alias, master=None, mtu=1450, up=False)


def target(key: Key, spec: dict[str, Any]) -> Target:
    return Target(key, spec, Mark(key, "0" * 32, spec))


# --- netlink: the parts of a network --------------------------------------------------


def test_a_foreign_vxlan_device_or_dhcp_namespace_is_in_the_way_of_its_network(tmp_path: Path) -> None:
    """Was: not reported, so plan showed a create; apply made the bridge, then failed on
    the VXLAN device, and adopted a DHCP namespace (marked it, put legs and dnsmasq in
    it), which destroy then deleted."""
    d = driver(tmp_path)
    other = host_name(Key("Network", "acme", "db"))
    result = Observation()
    d.networks.observe(facts([link(f"rv-{H}", "vxlan")], namespaces=(f"rc-dhcp-{other[3:]}",)), result)
    found = {u.host_name: u.detail for u in result.unowned}
    assert found == {BRIDGE: f"VXLAN device rv-{H} has no reconciler mark",
                     other: f"DHCP namespace rc-dhcp-{other[3:]} exists and is not one of this "
                            "installation's networks'"}


def test_parts_of_our_own_networks_are_not_in_the_way(tmp_path: Path) -> None:
    d = driver(tmp_path)
    ours = _names.format_alias(HOME, NET, "h")
    result = Observation()
    d.networks.observe(facts([link(f"rv-{H}", "vxlan", ours), link(f"rl-{H}", "vlan", ours)]), result)
    assert result.unowned == []
    another = _names.format_alias("ffffffff", NET, "h")
    d.networks.observe(facts([link(f"rv-{H}", "vxlan", another)]), result)
    assert [u.detail for u in result.unowned] == [
        f"VXLAN device rv-{H} is managed by another reconciler installation (home ffffffff)"]


def test_create_refuses_a_foreign_vxlan_device_before_making_anything(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[str] = []
    snap = facts([link(f"rv-{H}", "vxlan")]).snap
    monkeypatch.setattr(_host, "dump", lambda with_fdb=False: snap)
    monkeypatch.setattr(_host, "add_bridge", lambda *a, **k: made.append("bridge"))
    d = driver(tmp_path, RecordingNft(_nft.Listing()))
    spec = {"type": "vxlan", "vni": 5, "subnets": [{"cidr": "10.0.0.0/24", "dhcp": {"enabled": False}}]}
    with pytest.raises(Conflict, match=f"device rv-{H} has no reconciler mark; not touching it"):
        d.create(target(NET, spec))
    assert made == [] and not d.sidecars.any("networks")


# --- netlink: nftables ----------------------------------------------------------------


def test_a_table_with_our_name_made_by_hand_is_not_ours() -> None:
    assert _nft.foreign_table(HANDMADE, "inet")
    assert _nft.foreign_table(listing(), "inet")  # empty: ours never are
    assert _nft.foreign_table(OURS, "inet") is None
    assert _nft.foreign_table(_nft.Listing(), "inet") is None  # absent
    assert _nft.foreign_content(HANDMADE, "inet") == ["chain handmade"]
    assert _nft.foreign_content(OURS, "inet") == []
    with_set = _nft.Listing.parse(json.dumps({"nftables": [
        {"table": {"family": "inet", "name": TABLE}}, {"set": {"family": "inet", "table": TABLE, "name": "x"}}]}))
    assert _nft.foreign_content(with_set, "inet") == ["set x"]


def test_plan_is_told_of_a_foreign_table_for_every_network_and_group(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Was: apply added our chains to the hand-made table, destroy deleted it."""
    monkeypatch.setattr(_host, "dump", lambda with_fdb=False: facts().snap)
    d = driver(tmp_path, RecordingNft(HANDMADE))
    assert d.problems("Network", "acme", "x", {}) == []  # nothing observed yet: nothing to say
    d.observe()
    for kind in ("Network", "SecurityGroup"):
        ((path, message),) = d.problems(kind, "acme", "x", {})
        assert path == () and message.startswith(f"conflict: nftables table inet {TABLE} was not made by")
    assert d.problems("Router", "acme", "r", {}) == []
    with pytest.raises(Conflict, match=f"table inet {TABLE}"):
        d.check_table("inet", HANDMADE)


def test_our_tables_are_dropped_only_when_nothing_foreign_is_in_them(tmp_path: Path) -> None:
    nft = RecordingNft(HANDMADE)
    driver(tmp_path, nft).drop_tables_if_unused()
    assert nft.deleted == []
    ours_plus = listing(chain("ingress"), rule("ingress", _names.rule_comment("base", "ingress", [])),
                        chain("mine"), rule("mine", None, handle=9))
    nft = RecordingNft(ours_plus)
    driver(tmp_path, nft).drop_tables_if_unused()
    assert nft.deleted == []
    nft = RecordingNft(OURS)
    driver(tmp_path, nft).drop_tables_if_unused()
    assert nft.deleted == [("inet", TABLE)]


def test_a_group_chain_with_foreign_rules_is_reported_and_never_rewritten(tmp_path: Path) -> None:
    """Was: the group's ensure flushed the chain and wrote its own rules into it."""
    table = listing(chain("ingress"), rule("ingress", _names.rule_comment("base", "ingress", [])),
                    chain(SG_IN), rule(SG_IN, "made by hand", handle=8))
    nft = RecordingNft(table)
    d = driver(tmp_path, nft)
    result = Observation()
    d.groups.observe(facts(inet=table), result)
    assert [(u.kind, u.host_name) for u in result.unowned] == [("SecurityGroup", SG_IN[: -len("-in")])]
    with pytest.raises(Conflict, match=f"chain {SG_IN} .* not ours"):
        d.create(target(GROUP, {"rules": []}))
    assert nft.applied == [] and not d.sidecars.any("groups")
    # an empty group chain is one a network made for a group to come: not in the way
    empty = listing(chain("ingress"), chain(SG_IN))
    result = Observation()
    driver(tmp_path, RecordingNft(empty)).groups.observe(facts(inet=empty), result)
    assert result.unowned == []


# --- libvirt: the instance folder and the image file ----------------------------------


def test_a_foreign_instance_folder_is_reported_and_never_removed(tmp_path: Path) -> None:
    """Was: the create removed the folder (a create's leftover, it assumed), and with it
    a disk someone had put there."""
    key = Key("Instance", "acme", "vm")
    home = str(tmp_path)
    folder = tmp_path / host_name(key)
    folder.mkdir()
    (folder / "root.qcow2").write_bytes(b"someone's disk")
    with pytest.raises(Conflict, match="exists and is not ours; not touching it"):
        claim_folder(folder, key, home)
    assert (folder / "root.qcow2").read_bytes() == b"someone's disk"
    d = LibvirtDriver(LibvirtSettings(instance_dir=tmp_path))
    ((unowned),) = d._folders_in_the_way(set())
    assert unowned.host_name == folder.name and str(folder) in unowned.detail
    assert d._folders_in_the_way({folder.name}) == []  # a domain has it: the domain decides


def test_our_own_leftover_folder_is_made_again(tmp_path: Path) -> None:
    key = Key("Instance", "acme", "vm")
    home = str(tmp_path)
    folder = tmp_path / host_name(key)
    claim_folder(folder, key, home)
    assert folder_owner(folder) == (str(key), home)
    (folder / "root.qcow2").write_bytes(b"half made")  # killed before define
    assert LibvirtDriver(LibvirtSettings(instance_dir=tmp_path))._folders_in_the_way(set()) == []
    claim_folder(folder, key, home)
    assert sorted(p.name for p in folder.iterdir()) == [OWNER_FILE]
    with pytest.raises(Conflict):  # another instance's leftover is not this one's
        claim_folder(folder, Key("Instance", "acme", "other"), home)


def test_an_image_file_in_the_way_is_never_replaced(tmp_path: Path) -> None:
    source = tmp_path / "source.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(source), "16M"], check=True)
    images = tmp_path / "images"
    d = LibvirtDriver(LibvirtSettings(image_dir=images, instance_dir=tmp_path / "instances"))
    key = Key("Image", "acme", "img")
    sha12 = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
    images.mkdir()
    theirs = images / f"{host_name(key)}-{sha12}.qcow2"
    theirs.write_bytes(b"someone's image")
    with pytest.raises(Conflict, match="exists and is not ours"):
        d.create(target(key, {"source": str(source), "format": "qcow2"}))
    assert theirs.read_bytes() == b"someone's image"
    assert sorted(p.name for p in images.iterdir()) == [theirs.name]


# --- objectstore: a container in an account the store never used ----------------------


def test_plan_is_told_of_a_foreign_container_in_an_account_never_used(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Was: observe lists only the accounts the store knows, so plan showed a create and
    only the apply found the container; now plan asks for the bucket's name there."""
    from reconciler.drivers.objectstore import Registry, SwiftStore
    from reconciler.drivers.objectstore._common import Found
    from reconciler.errors import TransientError

    store = SwiftStore("local", auth_url="http://127.0.0.1:1/auth/v1.0", user="admin:admin", key="k",
                       reseller_prefix="AUTH_", credentials={}, registry=Registry(tmp_path / "local.json"),
                       home=HOME)
    asked: list[tuple[str, str]] = []
    answer: dict[str, Any] = {"found": Found("acme", "logs", "AUTH_acme", None, "a container without our mark")}

    def head(tenant: str, name: str) -> Found | None:
        asked.append((tenant, name))
        if isinstance(answer["found"], Exception):
            raise answer["found"]
        return answer["found"]

    monkeypatch.setattr(store, "_head", head)
    ((path, message),) = store.problems("acme", "logs", {})
    assert path == () and message.startswith("conflict: a container without our mark named 'logs' is already "
                                             "in AUTH_acme; it is left untouched")
    answer["found"] = None  # no such container
    assert store.problems("acme", "logs", {}) == []
    answer["found"] = TransientError("down")  # the create will tell
    assert store.problems("acme", "logs", {}) == []
    store.registry.add("acme")  # an account observe lists: plan knows already, nothing asked
    asked.clear()
    assert store.problems("acme", "logs", {}) == [] and asked == []
    store._down = True  # the last scan failed: nothing asked of a store that is down
    assert store.problems("other", "logs", {}) == [] and asked == []


def test_plan_is_told_of_a_foreign_device_with_a_dhcp_or_router_leg_name(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Was: not seen by plan (a leg's name hashes what it joins); the create failed."""
    cidr = "10.9.0.0/24"
    leg = _names.dhcp_legs(BRIDGE, cidr)[0]
    router = Key("Router", "acme", "r")
    rleg = _names.router_leg(router, NET)[0]
    links = {"now": [link(leg, "veth"), link(rleg, "veth")]}
    monkeypatch.setattr(_host, "dump", lambda with_fdb=False: facts(links["now"]).snap)
    d = driver(tmp_path, RecordingNft(_nft.Listing()))
    d.observe()
    ((path, message),) = d.problems("Network", "acme", "web", {"type": "vxlan", "subnets": [{"cidr": cidr}]})
    assert path == () and message == (f"conflict: device {leg} (the DHCP leg of {cidr}) has no reconciler mark; "
                                      "it is left untouched. Remove or rename it on the host")
    assert d.problems("Network", "acme", "web", {"subnets": [{"cidr": cidr, "dhcp": {"enabled": False}}]}) == []
    ((path, message),) = d.problems("Router", "acme", "r", {"networks": ["web"]})
    assert message.startswith(f"conflict: device {rleg} (the leg on web) has no reconciler mark")
    links["now"] = [link(rleg, "veth", _names.format_alias(HOME, router, "h"))]  # its own
    d.observe()
    assert d.problems("Router", "acme", "r", {"networks": ["web"]}) == []
