"""nftables in JSON: the rules each object owns (pure builders), reading a table back
(`nft -j list table`), and changing it in one transaction (`nft -j -f -`).

Layout of an installation's tables (both named ``reconciler_HOME``)::

    table inet reconciler_HOME
      chain zones    prerouting raw      iifname BR ct zone set Z          (per network)
      chain egress   forward, prio -10   ct state established,related accept
                                         iifname BR jump out-H             (per network)
      chain ingress  forward, prio 0     ct state established,related accept
                                         iifname BR jump in-H              (per network)
      chain input    input, prio 0       iifname BR drop                   (per network)
      chain in-H / out-H                 ip daddr/saddr IP jump pi-T/po-T  (per filtered port)
      chain pi-T / po-T                  DHCP; jump sg-G-in/out per group; drop
      chain sg-G-in / sg-G-out           the group's rules                 (per group)
    table bridge reconciler_HOME
      map ports { ifname : verdict }     TAP : jump spoof-H                (per port)
      chain forward  forward, prio -200  iifname vmap @ports
      chain spoof-H                      MAC, IP, ARP and DHCP-server anti-spoofing

Why so: bridged IPv4 reaches the inet forward hook (the bridge has nf_call_iptables),
where conntrack works, so the stateful group rules live there, matched by the port's
address; `iifname` is the bridge there, not the tap. The host has no address on a
tenant bridge, but would still take a packet sent to the bridge's MAC for one of its
own addresses: the input hook drops whatever arrives by our bridges (and the bridges
answer no ARP, see `_host.add_bridge`). Conntrack is not available in the
bridge family, so anti-spoofing there is stateless, matched by the tap (`meta ibrname`
is not in this kernel, so a verdict map by tap dispatches to the network's chain). Two
base chains at one hook: an accept ends only its own chain, so a packet must pass the
sender port's egress and the receiver port's ingress; a drop anywhere is final. Each
network gets its own conntrack zone, so equal addresses of two tenants never share a
connection entry.

Every rule carries the comment ``rc:OWNER:SHA8`` (see `_names.rule_comment`); after a
change the driver records a fingerprint of each rule as the kernel lists it, so observe
tells a missing or rewritten rule (drift) from an intact one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any, Iterable, Mapping, Sequence

from reconciler.drivers.netlink import _host, _names
from reconciler.errors import PermanentError
from reconciler.models import Key
from reconciler.models._resource import canonical_json
from reconciler.models.security_group import remote_is_cidr

INET = "inet"
BRIDGE = "bridge"
PORTS_MAP = "ports"
BASE_OWNER = "base"

ACCEPT: dict[str, Any] = {"accept": None}
DROP: dict[str, Any] = {"drop": None}


# --- expressions ----------------------------------------------------------------------


def match(left: Any, right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def meta(key: str) -> dict[str, Any]:
    return {"meta": {"key": key}}


def payload(protocol: str, field_name: str) -> dict[str, Any]:
    return {"payload": {"protocol": protocol, "field": field_name}}


def jump(chain: str) -> dict[str, Any]:
    return {"jump": {"target": _names.check_chain(chain)}}


def udp(sport: int, dport: int) -> tuple[dict[str, Any], dict[str, Any]]:
    return match(payload("udp", "sport"), sport), match(payload("udp", "dport"), dport)


def ct_state(*states: str) -> dict[str, Any]:
    return match({"ct": {"key": "state"}}, list(states), op="in")


def iifname(name: str) -> dict[str, Any]:
    return match(meta("iifname"), name)


def address(value: str) -> Any:
    """An address or a CIDR as nft's JSON writes it (a /32 is a plain address)."""
    if "/" in value:
        net = IPv4Network(value, strict=False)
        if net.prefixlen == 32:
            return str(net.network_address)
        return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}
    return str(IPv4Address(value))


def addresses(values: Sequence[str]) -> Any:
    """One address, or an anonymous set of them."""
    items = [address(v) for v in values]
    return items[0] if len(items) == 1 else {"set": items}


def ports_right(ports: str) -> Any:
    lo, _, hi = ports.partition("-")
    if hi and hi != lo:
        return {"range": [int(lo), int(hi)]}
    return int(lo)


# --- rules ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule we write: its chain, expression, and the comment naming its owner."""

    chain: str
    expr: tuple[Any, ...]
    owner: str

    @property
    def comment(self) -> str:
        return _names.rule_comment(self.owner, self.chain, list(self.expr))

    def command(self, verb: str, family: str, table: str) -> dict[str, Any]:
        return {verb: {"rule": {"family": family, "table": table, "chain": self.chain,
                                "expr": list(self.expr), "comment": self.comment}}}


def rule(chain: str, owner: str, *expr: Any) -> Rule:
    return Rule(_names.check_chain(chain), tuple(expr), owner)


@dataclass(frozen=True, slots=True)
class BaseChain:
    name: str
    hook: str
    prio: int
    rules: tuple[Rule, ...] = ()

    def command(self, family: str, table: str) -> dict[str, Any]:
        return {"add": {"chain": {"family": family, "table": table, "name": self.name, "type": "filter",
                                  "hook": self.hook, "prio": self.prio, "policy": "accept"}}}


REPLIES = ct_state("established", "related")
INET_BASE = (
    BaseChain("zones", "prerouting", -300),
    BaseChain("egress", "forward", -10, (rule("egress", BASE_OWNER, REPLIES, ACCEPT),)),
    BaseChain("ingress", "forward", 0, (rule("ingress", BASE_OWNER, REPLIES, ACCEPT),)),
    BaseChain("input", "input", 0),
)
BRIDGE_BASE = (
    BaseChain("forward", "forward", -200,
              (rule("forward", BASE_OWNER, {"vmap": {"key": meta("iifname"), "data": "@" + PORTS_MAP}}),)),
)


@dataclass(slots=True)
class Owned:
    """Everything one object (a network, a group) has in one table.

    - `chains`: chains it owns wholly, with their rules in order (rewritten when they differ);
    - `shared`: its rules in the base chains (each found by its comment);
    - `needed`: chains that must exist but are another owner's (a group's, before it is realised);
    - `elements`: its entries in the `ports` verdict map (bridge table): tap -> chain.
    """

    owner: str
    chains: dict[str, list[Rule]] = field(default_factory=dict)
    shared: dict[str, list[Rule]] = field(default_factory=dict)
    needed: list[str] = field(default_factory=list)
    elements: dict[str, str] = field(default_factory=dict)

    def add(self, r: Rule) -> None:
        rules = self.chains.setdefault(r.chain, [])
        if all(x.comment != r.comment for x in rules):  # a rule written twice is one rule
            rules.append(r)

    def comments(self) -> set[str]:
        out = {r.comment for rules in self.chains.values() for r in rules}
        out.update(r.comment for rules in self.shared.values() for r in rules)
        return out


# --- what networks and groups own -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Port:
    """An instance NIC on a network (one entry of the network's derived ports)."""

    owner: str
    hostname: str
    mac: str
    ip: str | None
    tap: str
    groups: tuple[str, ...]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Port":
        ip = data.get("ip")
        return cls(
            owner=str(data["owner"]),
            hostname=_names.check_hostname(str(data["hostname"])),
            mac=_names.check_mac(str(data["mac"]).lower()),
            ip=str(IPv4Address(ip)) if ip else None,
            tap=_names.check_ifname(str(data["tap"])),
            groups=tuple(sorted(str(g) for g in data.get("groups") or ())),
        )

    @property
    def tenant(self) -> str:
        """The instance's tenant: its group names are that tenant's (an external network
        carries other tenants' instances)."""
        return self.owner.split("/", 1)[0]

    @property
    def filtered(self) -> bool:
        """Port security applies to a port with groups and an address (rules match by it)."""
        return bool(self.groups) and self.ip is not None


def network_inet(bridge: str, zone: int, ports: Sequence[Port]) -> Owned:
    """The inet-table part of a network: zone, base-chain jumps, its chains, port chains."""
    owner = _names.net_hash(bridge)
    in_chain, out_chain, _spoof = _names.network_chains(bridge)
    out = Owned(owner)
    out.shared = {
        "zones": [rule("zones", owner, iifname(bridge), {"mangle": {"key": {"ct": {"key": "zone"}},
                                                                     "value": zone}})],
        "egress": [rule("egress", owner, iifname(bridge), jump(out_chain))],
        "ingress": [rule("ingress", owner, iifname(bridge), jump(in_chain))],
        "input": [rule("input", owner, iifname(bridge), DROP)],  # the host is on no tenant network
    }
    out.chains[in_chain] = [rule(in_chain, owner, iifname(bridge), ct_state("invalid"), DROP)]
    out.chains[out_chain] = []
    for port in ports:
        if not port.filtered:
            continue
        assert port.ip is not None
        pi, po = _names.port_chains(port.tap)
        out.add(rule(in_chain, owner, match(payload("ip", "daddr"), port.ip), jump(pi)))
        out.add(rule(out_chain, owner, match(payload("ip", "saddr"), port.ip), jump(po)))
        out.chains[pi] = [rule(pi, owner, *udp(67, 68), ACCEPT)]  # DHCP replies to the port
        out.chains[po] = [rule(po, owner, *udp(68, 67), ACCEPT)]  # its DHCP requests and renewals
        for group in port.groups:
            sg_in, sg_out = _names.group_chains(Key("SecurityGroup", port.tenant, group))
            out.add(rule(pi, owner, jump(sg_in)))
            out.add(rule(po, owner, jump(sg_out)))
            for chain in (sg_in, sg_out):
                if chain not in out.needed:
                    out.needed.append(chain)
        out.add(rule(pi, owner, DROP))
        out.add(rule(po, owner, DROP))
    return out


def network_bridge(bridge: str, ports: Sequence[Port]) -> Owned:
    """The bridge-table part of a network: anti-spoofing per port, dispatched by tap."""
    owner = _names.net_hash(bridge)
    _in, _out, spoof = _names.network_chains(bridge)
    out = Owned(owner)
    out.chains[spoof] = []
    for port in ports:
        out.elements[port.tap] = spoof
        tap = iifname(port.tap)
        out.add(rule(spoof, owner, tap, match(payload("ether", "saddr"), port.mac, op="!="), DROP))
        out.add(rule(spoof, owner, tap, match(payload("arp", "saddr ether"), port.mac, op="!="), DROP))
        if port.ip is not None:
            allowed = {"set": [port.ip, "0.0.0.0"]}  # 0.0.0.0: DHCP requests and ARP probes
            out.add(rule(spoof, owner, tap, match(payload("ether", "type"), "ip"),
                         match(payload("ip", "saddr"), allowed, op="!="), DROP))
            out.add(rule(spoof, owner, tap, match(payload("arp", "saddr ip"), allowed, op="!="), DROP))
        out.add(rule(spoof, owner, tap, match(payload("udp", "sport"), 67), DROP))  # no rogue DHCP servers
        # tenant networks are IPv4: the groups' rules could not hold IPv6 back
        out.add(rule(spoof, owner, tap, match(payload("ether", "type"), "ip6"), DROP))
    return out


def group_inet(prefix: str, rules: Sequence[Mapping[str, Any]], remotes: Mapping[str, Sequence[str]]) -> Owned:
    """A security group's two chains from its spec rules; a remote group resolves to its
    members' addresses (none yet: the rule is left out until it has members)."""
    sg_in, sg_out = prefix + "-in", prefix + "-out"
    out = Owned(prefix[3:])
    out.chains = {sg_in: [], sg_out: []}
    for spec in rules:
        direction = spec.get("direction", "ingress")
        chain = sg_in if direction == "ingress" else sg_out
        side = "saddr" if direction == "ingress" else "daddr"
        expr: list[Any] = []
        remote = str(spec.get("remote", "0.0.0.0/0"))
        if remote_is_cidr(remote):
            if IPv4Network(remote, strict=False).prefixlen > 0:
                expr.append(match(payload("ip", side), address(remote)))
        else:
            members = sorted(set(remotes.get(remote) or ()), key=IPv4Address)
            if not members:
                continue
            expr.append(match(payload("ip", side), addresses(members)))
        protocol = spec.get("protocol", "any")
        if protocol in ("tcp", "udp"):
            expr.append(match(meta("l4proto"), protocol))
            if spec.get("ports"):
                expr.append(match(payload("th", "dport"), ports_right(str(spec["ports"]))))
        elif protocol == "icmp":
            expr.append(match(meta("l4proto"), "icmp"))
        expr.append(ACCEPT)
        out.add(rule(chain, out.owner, *expr))
    if not any(spec.get("direction", "ingress") == "egress" for spec in rules):
        out.add(rule(sg_out, out.owner, ACCEPT))  # no egress rules: egress is allowed
    return out


# --- reading a table back -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Listed:
    handle: int
    comment: str | None
    expr: Any

    @property
    def fingerprint(self) -> str:
        """A digest of the rule as the kernel holds it (nft's own normalised form)."""
        return hashlib.sha256(canonical_json(self.expr).encode()).hexdigest()[:12]


@dataclass(slots=True)
class Listing:
    """A table as `nft -j list table` shows it; empty when the table does not exist."""

    exists: bool = False
    chains: dict[str, list[Listed]] = field(default_factory=dict)
    maps: dict[str, dict[str, Any]] = field(default_factory=dict)  # map -> key -> verdict
    others: list[str] = field(default_factory=list)  # "set NAME", "counter NAME"...: never ours

    @classmethod
    def parse(cls, text: str) -> "Listing":
        out = cls(exists=True)
        for item in json.loads(text).get("nftables", []):
            if "chain" in item:
                out.chains.setdefault(item["chain"]["name"], [])
            elif "rule" in item:
                r = item["rule"]
                listed = Listed(r["handle"], r.get("comment"), r.get("expr"))
                out.chains.setdefault(r["chain"], []).append(listed)
            elif "map" in item:
                elements: dict[str, Any] = {}
                for elem in item["map"].get("elem") or []:
                    if isinstance(elem, list) and len(elem) == 2 and isinstance(elem[0], str):
                        elements[elem[0]] = elem[1]
                out.maps[item["map"]["name"]] = elements
            else:
                for what, obj in item.items():
                    if what not in ("metainfo", "table") and isinstance(obj, dict):
                        out.others.append(f"{what} {obj.get('name', '?')}")
        return out

    def rules_of(self, owner: str) -> dict[str, Listed]:
        """comment -> rule, for every rule of `owner` in the table."""
        out = {}
        for rules in self.chains.values():
            for listed in rules:
                if _names.comment_owner(listed.comment) == owner:
                    out[listed.comment] = listed  # type: ignore[index]
        return out

    def fingerprints(self, owner: str) -> dict[str, str]:
        return {c: r.fingerprint for c, r in self.rules_of(owner).items()}

    def jumps_to(self, chains: Iterable[str]) -> list[tuple[str, Listed]]:
        """Every rule (chain, rule) that jumps or goes to one of `chains`."""
        targets = set(chains)
        out = []
        for chain, rules in self.chains.items():
            for listed in rules:
                for stmt in listed.expr or ():
                    verdict = stmt.get("jump") or stmt.get("goto") if isinstance(stmt, dict) else None
                    if isinstance(verdict, dict) and verdict.get("target") in targets:
                        out.append((chain, listed))
                        break
        return out

    def map_targets(self, name: str) -> dict[str, str]:
        """key -> jump target of a verdict map."""
        out = {}
        for key, verdict in self.maps.get(name, {}).items():
            target = (verdict.get("jump") or {}).get("target") if isinstance(verdict, dict) else None
            if target:
                out[key] = target
        return out


#: what our chains are named, besides the base chains (see the module docstring)
OWN_CHAIN_PREFIXES = ("in-", "out-", "spoof-", "pi-", "po-", "sg-")


def foreign_table(listing: Listing, family: str) -> str | None:
    """Why a table with our name was made by someone else (None: ours, or absent). Ours
    get their base chains in the transaction that makes them and keep them; a table with
    none of them and no rule of ours is not ours."""
    if not listing.exists:
        return None
    if {b.name for b in (INET_BASE if family == INET else BRIDGE_BASE)} & listing.chains.keys():
        return None
    if any(_names.comment_owner(r.comment) for rules in listing.chains.values() for r in rules):
        return None
    return "was not made by this reconciler installation (none of its base chains or rules are in it)"


def foreign_content(listing: Listing, family: str) -> list[str]:
    """What a table of ours holds that is not ours: chains of names we never give, rules
    without our comment, maps and other objects we never make."""
    bases = {b.name for b in (INET_BASE if family == INET else BRIDGE_BASE)}
    out = []
    for chain, rules in listing.chains.items():
        if chain not in bases and not chain.startswith(OWN_CHAIN_PREFIXES):
            out.append(f"chain {chain}")
        elif any(_names.comment_owner(r.comment) is None for r in rules):
            out.append(f"rules of someone else in chain {chain}")
    out.extend(f"map {m}" for m in listing.maps if not (family == BRIDGE and m == PORTS_MAP))
    out.extend(listing.others)
    return out


def drift(listing: Listing, owned: Owned, recorded: Mapping[str, str], family: str) -> list[str]:
    """What of `owned` is missing or altered in `listing` (empty: intact).

    `recorded`: comment -> fingerprint noted when the rules were written (a rule whose
    comment is there but whose content changed is altered)."""
    problems: list[str] = []
    where = f"nftables {family}"
    if not listing.exists:
        return [f"{where} table is missing"]
    for chain, rules in owned.chains.items():
        if chain not in listing.chains:
            problems.append(f"{where} chain {chain} is missing")
            continue
        have = listing.chains[chain]
        if [r.comment for r in rules] != [x.comment for x in have]:
            missing = [r.comment for r in rules if r.comment not in {x.comment for x in have}]
            if missing:
                problems.append(f"{where} rule {missing[0]} in chain {chain} is missing"
                                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
            else:
                problems.append(f"{where} chain {chain} has rules that are not ours or out of order")
            continue
        problems.extend(_altered(where, chain, have, recorded))
    for chain, rules in owned.shared.items():
        have = [x for x in listing.chains.get(chain, []) if _names.comment_owner(x.comment) == owned.owner]
        if sorted(r.comment for r in rules) != sorted(x.comment or "" for x in have):
            problems.append(f"{where} rule in chain {chain} for this object is missing")
            continue
        problems.extend(_altered(where, chain, have, recorded))
    for chain in owned.needed:
        if chain not in listing.chains:
            problems.append(f"{where} chain {chain} is missing")
    if owned.elements:
        targets = listing.map_targets(PORTS_MAP)
        for key, chain in owned.elements.items():
            if targets.get(key) != chain:
                problems.append(f"{where} map entry {key} -> {chain} is missing")
    return problems


def base_drift(listing: Listing, family: str, recorded: Mapping[str, str]) -> list[str]:
    """Whether the base chains and their first rules (replies accepted, the port map) are
    there: every network depends on them."""
    if not listing.exists:
        return []  # reported as the table missing
    owned = Owned(BASE_OWNER)
    for base in INET_BASE if family == INET else BRIDGE_BASE:
        owned.shared[base.name] = list(base.rules)
    return drift(listing, owned, recorded, family)


def _altered(where: str, chain: str, have: Sequence[Listed], recorded: Mapping[str, str]) -> list[str]:
    for listed in have:
        want = recorded.get(listed.comment or "")
        if want is not None and want != listed.fingerprint:
            return [f"{where} rule {listed.comment} in chain {chain} was altered"]
    return []


# --- changing a table -----------------------------------------------------------------


def ensure_commands(family: str, table: str, listing: Listing, owned: Owned, recorded: Mapping[str, str],
                    stale_chains: Iterable[str] = (), stale_elements: Iterable[str] = ()
                    ) -> list[dict[str, Any]]:
    """One transaction bringing `owned` to the table: only chains that differ are
    flushed and rewritten; chains the object no longer owns are emptied and deleted."""
    t = {"family": family, "table": table}
    cmds: list[dict[str, Any]] = [{"add": {"table": {"family": family, "name": table}}}]
    bases = INET_BASE if family == INET else BRIDGE_BASE
    if family == BRIDGE:
        cmds.append({"add": {"map": {**_tname(t), "name": PORTS_MAP, "type": "ifname", "map": "verdict"}}})
    for base in bases:
        cmds.append(base.command(family, table))
        have = {x.comment: x for x in listing.chains.get(base.name, [])}
        for r in reversed(base.rules):
            listed = have.get(r.comment)
            if listed is not None and _altered("", base.name, [listed], recorded):
                cmds.append({"delete": {"rule": {**t, "chain": base.name, "handle": listed.handle}}})
                listed = None
            if listed is None:
                cmds.append(r.command("insert", family, table))  # first in the chain
    # every chain first: a rule may only jump to a chain that exists
    for chain in [*owned.needed, *owned.chains]:
        cmds.append({"add": {"chain": {**_tname(t), "name": chain}}})
    for chain, rules in owned.chains.items():
        have = listing.chains.get(chain)
        intact = (have is not None and [r.comment for r in rules] == [x.comment for x in have]
                  and not _altered("", chain, have, recorded))
        if intact:
            continue
        cmds.append({"flush": {"chain": {**_tname(t), "name": chain}}})
        cmds.extend(r.command("add", family, table) for r in rules)
    for chain, rules in owned.shared.items():
        mine = [x for x in listing.chains.get(chain, []) if _names.comment_owner(x.comment) == owned.owner]
        if (sorted(r.comment for r in rules) == sorted(x.comment or "" for x in mine)
                and not _altered("", chain, mine, recorded)):
            continue
        cmds.extend({"delete": {"rule": {**t, "chain": chain, "handle": x.handle}}} for x in mine)
        cmds.extend(r.command("add", family, table) for r in rules)
    targets = listing.map_targets(PORTS_MAP)
    for key in stale_elements:
        if key in targets and key not in owned.elements:
            cmds.append({"delete": {"element": {**_tname(t), "name": PORTS_MAP, "elem": [key]}}})
    for key, chain in owned.elements.items():
        if targets.get(key) != chain:
            if key in targets:
                cmds.append({"delete": {"element": {**_tname(t), "name": PORTS_MAP, "elem": [key]}}})
            cmds.append({"add": {"element": {**_tname(t), "name": PORTS_MAP,
                                             "elem": [[key, {"jump": {"target": chain}}]]}}})
    for chain in stale_chains:
        if chain in listing.chains and chain not in owned.chains:
            cmds.extend(_drop_chain(t, chain))
    return cmds


def remove_commands(family: str, table: str, listing: Listing, owner: str, chains: Iterable[str],
                    elements: Iterable[str] = ()) -> list[dict[str, Any]]:
    """One transaction removing an object: its rules in shared chains, its map entries,
    every jump to its chains (by handle), then the chains."""
    if not listing.exists:
        return []
    t = {"family": family, "table": table}
    cmds: list[dict[str, Any]] = []
    gone = [c for c in chains if c in listing.chains]
    doomed: set[int] = set()
    for chain, rules in listing.chains.items():
        if chain in gone:
            continue
        for listed in rules:
            if _names.comment_owner(listed.comment) == owner and listed.comment:
                doomed.add(listed.handle)
                cmds.append({"delete": {"rule": {**t, "chain": chain, "handle": listed.handle}}})
    for chain, listed in listing.jumps_to(gone):
        if chain not in gone and listed.handle not in doomed:
            doomed.add(listed.handle)
            cmds.append({"delete": {"rule": {**t, "chain": chain, "handle": listed.handle}}})
    targets = listing.map_targets(PORTS_MAP)
    for key in elements:
        if key in targets:
            cmds.append({"delete": {"element": {**_tname(t), "name": PORTS_MAP, "elem": [key]}}})
    for key, target in targets.items():
        if target in gone and key not in elements:
            cmds.append({"delete": {"element": {**_tname(t), "name": PORTS_MAP, "elem": [key]}}})
    for chain in gone:
        cmds.append({"flush": {"chain": {**_tname(t), "name": chain}}})
    for chain in gone:
        cmds.append({"delete": {"chain": {**_tname(t), "name": chain}}})
    return cmds


def _drop_chain(t: Mapping[str, str], chain: str) -> list[dict[str, Any]]:
    return [{"flush": {"chain": {**_tname(t), "name": chain}}},
            {"delete": {"chain": {**_tname(t), "name": chain}}}]


def _tname(t: Mapping[str, str]) -> dict[str, str]:
    return {"family": t["family"], "table": t["table"]}


def router_commands(snat_leg: str | None, subnets: Sequence[str]) -> list[dict[str, Any]]:
    """A router namespace's own table, rebuilt whole in one transaction: forwarding and
    input policy drop except replies and what comes from the internal legs (the router's
    own addresses, its gateways and external address, answer only the networks it
    joins); masquerade of the tenant subnets leaving by the external leg."""
    family, table = INET, "reconciler"
    t = {"family": family, "table": table}
    cmds: list[dict[str, Any]] = [
        {"add": {"table": {"family": family, "name": table}}},
        {"delete": {"table": {"family": family, "name": table}}},
        {"add": {"table": {"family": family, "name": table}}},
    ]
    for hook in ("forward", "input"):
        cmds += [
            {"add": {"chain": {**t, "name": hook, "type": "filter", "hook": hook, "prio": 0, "policy": "drop"}}},
            {"add": {"rule": {**t, "chain": hook, "expr": [ct_state("established", "related"), ACCEPT]}}},
            {"add": {"rule": {**t, "chain": hook, "expr": [iifname("qr-*"), ACCEPT]}}},
        ]
    cmds.append({"add": {"rule": {**t, "chain": "input", "expr": [iifname("lo"), ACCEPT]}}})
    if snat_leg and subnets:
        cmds.append({"add": {"chain": {**t, "name": "postrouting", "type": "nat", "hook": "postrouting",
                                       "prio": 100, "policy": "accept"}}})
        cmds.append({"add": {"rule": {**t, "chain": "postrouting", "expr": [
            match(meta("oifname"), _names.check_ifname(snat_leg)),
            match(payload("ip", "saddr"), {"set": [address(s) for s in subnets]}
                  if len(subnets) > 1 else address(subnets[0])),
            {"masquerade": None},
        ]}}})
    return cmds


class Nft:
    """`nft -j`, in the host namespace or inside one (for a router's own table)."""

    def __init__(self, program: str = "nft"):
        self.program = program

    def list_table(self, family: str, table: str, namespace: str | None = None) -> Listing:
        argv = _host.in_namespace(namespace, [self.program, "-j", "list", "table", family,
                                              _names.check_chain(table)])
        result = _host.run(argv, f"listing nftables table {family} {table}")
        if result.returncode != 0:
            if "No such file or directory" in result.stderr:
                return Listing()
            raise PermanentError(f"nft list table {family} {table}: {_host.first_lines(result.stderr)}")
        try:
            return Listing.parse(result.stdout)
        except (ValueError, KeyError, TypeError) as exc:
            raise PermanentError(f"nft list table {family} {table}: unreadable JSON: {exc}") from None

    def apply(self, commands: Sequence[Mapping[str, Any]], namespace: str | None = None) -> None:
        """All `commands` in one transaction: all or nothing."""
        if not commands:
            return
        text = json.dumps({"nftables": list(commands)})
        result = _host.run(_host.in_namespace(namespace, [self.program, "-j", "-f", "-"]),
                           "changing nftables", input=text)
        if result.returncode != 0:
            raise PermanentError(f"nft refused the change: {_host.first_lines(result.stderr)}")

    def delete_table(self, family: str, table: str) -> None:
        result = _host.run([self.program, "delete", "table", family, _names.check_chain(table)],
                           f"deleting nftables table {family} {table}")
        if result.returncode != 0 and "No such file or directory" not in result.stderr:
            raise PermanentError(f"nft delete table {family} {table}: {_host.first_lines(result.stderr)}")
