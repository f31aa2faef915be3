"""nftables JSON of the netlink driver: what each object owns, reading a table back,
drift, and the transactions: pure, no kernel (the listing below is a real capture of
nft 1.0.6 for one network with one port)."""

from __future__ import annotations

import json
from typing import Any

from reconciler.drivers.netlink import _names, _nft
from reconciler.models import Key

BRIDGE = "rc-abcdefabcd"
TABLE = "reconciler_0a1b2c3d"
WEB1 = {"owner": "acme/web-1", "hostname": "web-1", "mac": "52:54:00:00:00:01", "ip": "10.0.0.12",
        "tap": "rt-0123456789", "groups": ["ssh"]}
WEB2 = {"owner": "acme/web-2", "hostname": "web-2", "mac": "52:54:00:00:00:02", "ip": None,
        "tap": "rt-1111111111", "groups": []}
SSH_IN, SSH_OUT = _names.group_chains(Key("SecurityGroup", "acme", "ssh"))

#: `nft -j list table bridge T` after the driver wrote WEB1 (nft 1.0.6)
CAPTURED_BRIDGE = {"nftables": [
    {"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}},
    {"table": {"family": "bridge", "name": TABLE, "handle": 106}},
    {"map": {"family": "bridge", "name": "ports", "table": TABLE, "type": "ifname", "handle": 1, "map": "verdict",
             "elem": [["rt-0123456789", {"jump": {"target": "spoof-abcdefabcd"}}]]}},
    {"chain": {"family": "bridge", "table": TABLE, "name": "forward", "handle": 2, "type": "filter",
               "hook": "forward", "prio": -200, "policy": "accept"}},
    {"chain": {"family": "bridge", "table": TABLE, "name": "spoof-abcdefabcd", "handle": 4}},
    {"rule": {"family": "bridge", "table": TABLE, "chain": "forward", "handle": 3, "comment": "rc:base:fc97954f",
              "expr": [{"vmap": {"key": {"meta": {"key": "iifname"}}, "data": "@ports"}}]}},
    {"rule": {"family": "bridge", "table": TABLE, "chain": "spoof-abcdefabcd", "handle": 5,
              "comment": "rc:abcdefabcd:0ccc02fd",
              "expr": [{"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "rt-0123456789"}},
                       {"match": {"op": "!=", "left": {"payload": {"protocol": "ether", "field": "saddr"}},
                                  "right": "52:54:00:00:00:01"}}, {"drop": None}]}},
    {"rule": {"family": "bridge", "table": TABLE, "chain": "spoof-abcdefabcd", "handle": 8,
              "comment": "rc:abcdefabcd:477b7e88",
              "expr": [{"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "rt-0123456789"}},
                       {"match": {"op": "!=", "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                                  "right": {"set": ["0.0.0.0", "10.0.0.12"]}}}, {"drop": None}]}},
]}


def ports(*raw: dict[str, Any]) -> list[_nft.Port]:
    return [_nft.Port.from_dict(p) for p in raw]


def exprs(rules: list[_nft.Rule]) -> list[list[Any]]:
    return [list(r.expr) for r in rules]


# --- what a network owns --------------------------------------------------------------


def test_network_inet_filters_only_ports_with_groups_and_an_address() -> None:
    owned = _nft.network_inet(BRIDGE, 7, ports(WEB1, WEB2))
    h = BRIDGE[3:]
    assert set(owned.chains) == {f"in-{h}", f"out-{h}", "pi-0123456789", "po-0123456789"}
    assert exprs(owned.chains[f"in-{h}"]) == [
        [_nft.iifname(BRIDGE), _nft.ct_state("invalid"), _nft.DROP],
        [_nft.match(_nft.payload("ip", "daddr"), "10.0.0.12"), _nft.jump("pi-0123456789")],
    ]
    assert exprs(owned.chains[f"out-{h}"]) == [
        [_nft.match(_nft.payload("ip", "saddr"), "10.0.0.12"), _nft.jump("po-0123456789")]]
    pi = exprs(owned.chains["pi-0123456789"])
    assert pi[1:] == [[_nft.jump(SSH_IN)], [_nft.DROP]]  # after the DHCP replies: groups, then drop
    assert exprs(owned.chains["po-0123456789"])[1:] == [[_nft.jump(SSH_OUT)], [_nft.DROP]]
    assert owned.needed == [SSH_IN, SSH_OUT]  # made empty when the group is not there yet
    assert exprs(owned.shared["zones"]) == [[_nft.iifname(BRIDGE), {"mangle": {"key": {"ct": {"key": "zone"}},
                                                                                "value": 7}}]]
    assert exprs(owned.shared["egress"]) == [[_nft.iifname(BRIDGE), _nft.jump(f"out-{h}")]]
    assert exprs(owned.shared["ingress"]) == [[_nft.iifname(BRIDGE), _nft.jump(f"in-{h}")]]


def test_the_host_takes_nothing_from_a_network() -> None:
    """Regression (isolation suite): the host answered a port that sent to the bridge's MAC
    for the host's own address; the network's bridge is dropped at the input hook."""
    owned = _nft.network_inet(BRIDGE, 7, [])
    assert exprs(owned.shared["input"]) == [[_nft.iifname(BRIDGE), _nft.DROP]]
    cmds = _nft.ensure_commands("inet", TABLE, _nft.Listing(), owned, {})
    chains = [c["add"]["chain"] for c in cmds if "chain" in c.get("add", {})]
    assert {"name": "input", "hook": "input", "type": "filter", "policy": "accept"}.items() <= \
        next(c for c in chains if c["name"] == "input").items()
    listing, owned, recorded = _intact()
    listing.chains["input"] = []  # the rule deleted by hand: drift
    assert _nft.drift(listing, owned, recorded, "inet") == [
        "nftables inet rule in chain input for this object is missing"]


def test_a_ports_groups_are_its_own_tenants() -> None:
    other = {**WEB1, "owner": "globex/vm"}
    (owned,) = [_nft.network_inet(BRIDGE, 1, ports(other))]
    chain = _names.group_chains(Key("SecurityGroup", "globex", "ssh"))[0]
    assert [_nft.jump(chain)] in exprs(owned.chains["pi-0123456789"])


def test_network_bridge_anti_spoofing() -> None:
    owned = _nft.network_bridge(BRIDGE, ports(WEB1, WEB2))
    spoof = "spoof-" + BRIDGE[3:]
    assert owned.elements == {"rt-0123456789": spoof, "rt-1111111111": spoof}
    rules = [json.dumps(e) for e in exprs(owned.chains[spoof])]
    web1 = [r for r in rules if "rt-0123456789" in r]
    web2 = [r for r in rules if "rt-1111111111" in r]
    assert len(web1) == 6 and len(web2) == 4  # no address: no IP or ARP address rule
    assert any('"saddr ip"' in r and "10.0.0.12" in r and "0.0.0.0" in r for r in web1)
    assert any('"sport"' in r and "67" in r for r in web2)
    assert any('"ip6"' in r for r in web2)


# --- what a group owns ----------------------------------------------------------------


def test_group_rules() -> None:
    rules = [
        {"direction": "ingress", "protocol": "tcp", "ports": "22", "remote": "0.0.0.0/0"},
        {"direction": "ingress", "protocol": "udp", "ports": "8000-8080", "remote": "10.1.0.0/16"},
        {"direction": "ingress", "protocol": "icmp", "remote": "web"},
        {"direction": "ingress", "protocol": "any", "remote": "empty"},
        {"direction": "ingress", "protocol": "any", "remote": "10.9.9.9/32"},
    ]
    owned = _nft.group_inet("sg-0123456789", rules, {"web": ["10.0.0.13", "10.0.0.3"], "empty": []})
    ingress = exprs(owned.chains["sg-0123456789-in"])
    l4 = _nft.meta("l4proto")
    assert ingress == [
        [_nft.match(l4, "tcp"), _nft.match(_nft.payload("th", "dport"), 22), _nft.ACCEPT],
        [_nft.match(_nft.payload("ip", "saddr"), {"prefix": {"addr": "10.1.0.0", "len": 16}}),
         _nft.match(l4, "udp"), _nft.match(_nft.payload("th", "dport"), {"range": [8000, 8080]}), _nft.ACCEPT],
        [_nft.match(_nft.payload("ip", "saddr"), {"set": ["10.0.0.3", "10.0.0.13"]}), _nft.match(l4, "icmp"),
         _nft.ACCEPT],
        [_nft.match(_nft.payload("ip", "saddr"), "10.9.9.9"), _nft.ACCEPT],
    ]  # the remote group without members has no rule (yet)
    assert exprs(owned.chains["sg-0123456789-out"]) == [[_nft.ACCEPT]]  # no egress rules: all egress


def test_group_egress_rules_replace_the_default() -> None:
    rules = [{"direction": "egress", "protocol": "tcp", "ports": "443", "remote": "web"}]
    owned = _nft.group_inet("sg-0123456789", rules, {"web": ["10.0.0.3"]})
    assert owned.chains["sg-0123456789-in"] == []
    assert exprs(owned.chains["sg-0123456789-out"]) == [[
        _nft.match(_nft.payload("ip", "daddr"), "10.0.0.3"), _nft.match(_nft.meta("l4proto"), "tcp"),
        _nft.match(_nft.payload("th", "dport"), 443), _nft.ACCEPT]]


def test_the_same_rule_twice_is_one_rule() -> None:
    rule = {"direction": "ingress", "protocol": "tcp", "ports": "22", "remote": "0.0.0.0/0"}
    owned = _nft.group_inet("sg-0123456789", [rule, rule], {})
    assert len(owned.chains["sg-0123456789-in"]) == 1


# --- reading back and drift -----------------------------------------------------------


def test_listing_parses_chains_rules_and_the_port_map() -> None:
    listing = _nft.Listing.parse(json.dumps(CAPTURED_BRIDGE))
    assert listing.exists and set(listing.chains) == {"forward", "spoof-abcdefabcd"}
    assert [r.handle for r in listing.chains["spoof-abcdefabcd"]] == [5, 8]
    assert listing.map_targets("ports") == {"rt-0123456789": "spoof-abcdefabcd"}
    assert set(listing.rules_of("abcdefabcd")) == {"rc:abcdefabcd:0ccc02fd", "rc:abcdefabcd:477b7e88"}
    assert _nft.Listing().exists is False


def _intact() -> tuple[_nft.Listing, _nft.Owned, dict[str, str]]:
    """A table holding exactly what `owned` says, and the fingerprints recorded for it."""
    owned = _nft.network_inet(BRIDGE, 7, ports(WEB1))
    items: list[dict[str, Any]] = []
    handle = 1
    for chain, rules in owned.chains.items():
        items.append({"chain": {"name": chain}})
        for r in rules:
            items.append({"rule": {"chain": chain, "handle": handle, "comment": r.comment, "expr": list(r.expr)}})
            handle += 1
    for chain, rules in owned.shared.items():
        items.append({"chain": {"name": chain}})
        for r in rules:
            items.append({"rule": {"chain": chain, "handle": handle, "comment": r.comment, "expr": list(r.expr)}})
            handle += 1
    items += [{"chain": {"name": c}} for c in owned.needed]
    listing = _nft.Listing.parse(json.dumps({"nftables": items}))
    return listing, owned, listing.fingerprints(owned.owner)


def test_an_intact_table_has_no_drift() -> None:
    listing, owned, recorded = _intact()
    assert _nft.drift(listing, owned, recorded, "inet") == []


def test_a_missing_table_chain_or_rule_is_drift() -> None:
    listing, owned, recorded = _intact()
    assert _nft.drift(_nft.Listing(), owned, recorded, "inet") == ["nftables inet table is missing"]
    del listing.chains["po-0123456789"]
    listing.chains["pi-0123456789"].pop(1)
    problems = _nft.drift(listing, owned, recorded, "inet")
    assert "nftables inet chain po-0123456789 is missing" in problems
    assert any("in chain pi-0123456789 is missing" in p for p in problems)


def test_an_altered_rule_with_our_comment_is_drift() -> None:
    listing, owned, recorded = _intact()
    old = listing.chains["pi-0123456789"][2]
    listing.chains["pi-0123456789"][2] = _nft.Listed(old.handle, old.comment, [{"accept": None}])
    assert _nft.drift(listing, owned, recorded, "inet") == [
        f"nftables inet rule {old.comment} in chain pi-0123456789 was altered"]


def test_a_rule_someone_added_is_drift() -> None:
    listing, owned, recorded = _intact()
    listing.chains["pi-0123456789"].insert(0, _nft.Listed(99, None, [{"accept": None}]))
    assert _nft.drift(listing, owned, recorded, "inet") == [
        "nftables inet chain pi-0123456789 has rules that are not ours or out of order"]


def test_a_missing_port_map_entry_is_drift() -> None:
    listing = _nft.Listing.parse(json.dumps(CAPTURED_BRIDGE))
    owned = _nft.Owned("abcdefabcd", elements={"rt-2222222222": "spoof-abcdefabcd"})
    assert _nft.drift(listing, owned, {}, "bridge") == [
        "nftables bridge map entry rt-2222222222 -> spoof-abcdefabcd is missing"]


# --- transactions ---------------------------------------------------------------------


def verbs(cmds: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    out = []
    for cmd in cmds:
        ((verb, body),) = cmd.items()
        ((what, obj),) = body.items()
        out.append((verb, what, obj.get("chain") or obj.get("name") or ""))
    return out


def test_a_new_table_gets_base_chains_then_every_chain_then_the_rules() -> None:
    owned = _nft.network_inet(BRIDGE, 7, ports(WEB1))
    cmds = verbs(_nft.ensure_commands("inet", TABLE, _nft.Listing(), owned, {}))
    assert cmds[0] == ("add", "table", TABLE)
    assert ("insert", "rule", "egress") in cmds and ("insert", "rule", "ingress") in cmds
    first_rule = min(i for i, c in enumerate(cmds) if c[1] == "rule" and c[0] == "add")
    last_chain = max(i for i, c in enumerate(cmds) if c[:2] == ("add", "chain"))
    assert last_chain < first_rule  # a jump needs its target chain to exist already


def test_an_intact_table_gets_no_rewrite() -> None:
    listing, owned, recorded = _intact()
    cmds = verbs(_nft.ensure_commands("inet", TABLE, listing, owned, recorded))
    assert not [c for c in cmds if c[0] in ("flush", "delete") or c[:2] == ("add", "rule")]


def test_only_the_broken_chain_is_flushed_and_rewritten() -> None:
    listing, owned, recorded = _intact()
    listing.chains["pi-0123456789"].pop(1)
    cmds = verbs(_nft.ensure_commands("inet", TABLE, listing, owned, recorded))
    assert [c for c in cmds if c[0] == "flush"] == [("flush", "chain", "pi-0123456789")]
    assert len([c for c in cmds if c == ("add", "rule", "pi-0123456789")]) == 3


def test_chains_of_removed_ports_are_deleted_after_the_jumps_go() -> None:
    listing, _owned, recorded = _intact()
    now = _nft.network_inet(BRIDGE, 7, [])
    cmds = verbs(_nft.ensure_commands("inet", TABLE, listing, now, recorded, ["pi-0123456789", "po-0123456789"]))
    flush_in = cmds.index(("flush", "chain", "in-abcdefabcd"))
    assert cmds.index(("delete", "chain", "pi-0123456789")) > flush_in


def test_removal_deletes_jumps_by_handle_then_the_chains() -> None:
    listing, owned, _ = _intact()
    cmds = _nft.remove_commands("inet", TABLE, listing, SSH_IN.split("-")[1], [SSH_IN, SSH_OUT])
    kinds = verbs(cmds)
    deleted = [c["delete"]["rule"]["handle"] for c in cmds if "rule" in c.get("delete", {})]
    jumps = [x.handle for _c, x in listing.jumps_to([SSH_IN, SSH_OUT])]
    assert sorted(deleted) == sorted(jumps) and len(jumps) == 2
    assert kinds[-2:] == [("delete", "chain", SSH_IN), ("delete", "chain", SSH_OUT)]
    assert _nft.remove_commands("inet", TABLE, _nft.Listing(), "x", [SSH_IN]) == []


def test_router_table_is_rebuilt_whole() -> None:
    cmds = _nft.router_commands("qg-0123456789", ["10.0.0.0/24", "10.0.1.0/24"])
    assert verbs(cmds)[:3] == [("add", "table", "reconciler"), ("delete", "table", "reconciler"),
                               ("add", "table", "reconciler")]
    forward = [c for c in cmds if c.get("add", {}).get("chain", {}).get("name") == "forward"][0]
    assert forward["add"]["chain"]["policy"] == "drop"
    nat = json.dumps(cmds[-1])
    assert "masquerade" in nat and "qg-0123456789" in nat and "10.0.1.0" in nat
    assert "masquerade" not in json.dumps(_nft.router_commands(None, ["10.0.0.0/24"]))


def test_a_router_answers_only_its_internal_legs() -> None:
    """Regression (isolation suite): a router's gateways and external address answered the
    external network, and through it another tenant's ports."""
    cmds = _nft.router_commands("qg-0123456789", ["10.0.0.0/24"])
    chain = next(c["add"]["chain"] for c in cmds if c.get("add", {}).get("chain", {}).get("name") == "input")
    assert (chain["hook"], chain["policy"]) == ("input", "drop")
    rules = [c["add"]["rule"]["expr"] for c in cmds if c.get("add", {}).get("rule", {}).get("chain") == "input"]
    assert rules == [[_nft.ct_state("established", "related"), _nft.ACCEPT],
                     [_nft.iifname("qr-*"), _nft.ACCEPT], [_nft.iifname("lo"), _nft.ACCEPT]]


def test_address_forms() -> None:
    assert _nft.address("10.0.0.5") == "10.0.0.5"
    assert _nft.address("10.0.0.5/32") == "10.0.0.5"
    assert _nft.address("10.0.0.0/8") == {"prefix": {"addr": "10.0.0.0", "len": 8}}
    assert _nft.ports_right("22") == 22 and _nft.ports_right("22-22") == 22
    assert _nft.ports_right("1000-2000") == {"range": [1000, 2000]}
