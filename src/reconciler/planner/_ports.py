"""Addresses and ports: what the network driver needs to know about the instances on it.

Neutron keeps ports as objects of their own; here an instance NIC is the port, and the
planner derives, from the whole desired state, what each network-side object must hold:

- every instance NIC's address: the manifest's fixed one, else the one the host already
  has (kept while it still fits: inside a subnet of the network and not taken by a fixed
  one), else allocated stably (a hash of the instance and network picks the first
  candidate in the DHCP range, then the next free one);
- a router's external address, allocated the same way on the external network, from the
  addresses outside the DHCP range first (dnsmasq never leases those);
- a Network's `ports` (MAC, address, tap, security groups of every NIC on it: its DHCP
  reservations and per-port firewall rules), a SecurityGroup's `remotes` (the member
  addresses of every group its rules name), a Router's `externalAddress`.

Pure and deterministic like the rest of the planner: the same desired and observed state
always give the same addresses.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from ipaddress import IPv4Address, IPv4Network
from typing import Any, Iterable, Mapping

from reconciler.errors import Problem
from reconciler.models import Desired, Key, Resource
from reconciler.models.network import NetworkSpec, Subnet, dhcp_range_of, dhcp_server_of, gateway_of
from reconciler.models.security_group import remote_is_cidr
from reconciler.naming import mac_address, tap_name
from reconciler.state import Observed

NetKey = tuple[str, str]  # (tenant, network name)


class Ports:
    """Every address and port of the desired state, computed once per plan."""

    def __init__(self, desired: Desired, primaries: Mapping[Key, Observed]):
        self.problems: list[Problem] = []
        self._candidate_cache: dict[tuple[Any, ...], list[list[IPv4Address]]] = {}
        self._subnets: dict[NetKey, list[Subnet]] = {}
        self._used: dict[NetKey, set[IPv4Address]] = defaultdict(set)
        for res in desired.of_kind("Network"):
            spec: NetworkSpec = res.spec  # type: ignore[assignment]
            net = (res.key.tenant, res.key.name)
            self._subnets[net] = list(spec.subnets)
            for subnet in spec.subnets:
                self._used[net].add(gateway_of(subnet))
                server = dhcp_server_of(subnet)
                if server is not None:
                    self._used[net].add(server)
        instances = sorted(desired.of_kind("Instance"), key=lambda r: str(r.key))
        routers = sorted(desired.of_kind("Router"), key=lambda r: str(r.key))
        #: (instance key, NIC index) -> address (None: its network has no subnet)
        self.nic_ip: dict[tuple[Key, int], str | None] = {}
        #: router key -> "address/prefix" on its external network
        self.router_ip: dict[Key, str | None] = {}
        pending_nics: list[tuple[Resource, int, NetKey]] = []
        pending_routers: list[tuple[Resource, NetKey]] = []

        for res in instances:  # 1. fixed in the manifest
            for i, nic in enumerate(res.spec.networks):  # type: ignore[attr-defined]
                if nic.ip is not None:
                    self.nic_ip[(res.key, i)] = str(nic.ip)
                    self._used[(res.key.tenant, nic.network)].add(nic.ip)
        for res in instances:  # 2. kept from the host
            kept = _observed_nic_ips(primaries.get(res.key))
            for i, nic in enumerate(res.spec.networks):  # type: ignore[attr-defined]
                if nic.ip is not None:
                    continue
                net = (res.key.tenant, nic.network)
                ip = self._keep(net, kept.get(nic.network))
                if ip is not None:
                    self.nic_ip[(res.key, i)] = str(ip)
                else:
                    pending_nics.append((res, i, net))
        for res in routers:
            ext = _external(res)
            if ext is None:
                continue
            old = primaries.get(res.key)
            kept_ip = _interface_ip(old.derived.get("externalAddress")) if old is not None else None
            ip = self._keep(ext, kept_ip)
            if ip is not None:
                self.router_ip[res.key] = self._with_prefix(ext, ip)
            else:
                pending_routers.append((res, ext))
        for res, i, net in pending_nics:  # 3. allocated
            ip = self._allocate(net, f"{res.key}#{net[1]}", inside_range_first=True)
            if ip is None and self._subnets.get(net):
                self.problems.append(Problem(
                    res.source.file, res.line_of(("spec", "networks", i)),
                    f"no free address left on network {net[0]}/{net[1]} for this NIC: widen its "
                    "subnet, add a subnet, or remove an instance from it",
                    res.key.display, f"spec.networks[{i}]"))
            self.nic_ip[(res.key, i)] = None if ip is None else str(ip)
        for res, ext in pending_routers:
            ip = self._allocate(ext, str(res.key), inside_range_first=False)
            if ip is None and self._subnets.get(ext):
                self.problems.append(Problem(
                    res.source.file, res.line_of(("spec", "external")),
                    f"no free address left on the external network {ext[0]}/{ext[1]} for the "
                    "router's gateway: widen its subnet or remove an instance from it",
                    res.key.display, "spec.external"))
            self.router_ip[res.key] = None if ip is None else self._with_prefix(ext, ip)

        self._ports: dict[NetKey, list[dict[str, Any]]] = defaultdict(list)
        self._members: dict[tuple[str, str], set[IPv4Address]] = defaultdict(set)
        for res in instances:
            tenant, name = res.key.tenant, res.key.name
            for i, nic in enumerate(res.spec.networks):  # type: ignore[attr-defined]
                ip = self.nic_ip.get((res.key, i))
                groups = sorted(set(nic.securityGroups))
                self._ports[(tenant, nic.network)].append({
                    "owner": f"{tenant}/{name}",
                    "hostname": name,
                    "mac": mac_address(tenant, name, nic.network),
                    "ip": ip,
                    "tap": tap_name(tenant, name, nic.network),
                    "groups": groups,
                })
                if ip is not None:
                    for group in groups:
                        self._members[(tenant, group)].add(IPv4Address(ip))
        for ports in self._ports.values():
            ports.sort(key=lambda p: p["owner"])

    # --- what the targets get ------------------------------------------------------------

    def instance_spec(self, res: Resource, spec: Mapping[str, Any]) -> dict[str, Any]:
        """The instance's target spec with every NIC's address filled in."""
        nics = spec.get("networks")
        if not isinstance(nics, list):
            return dict(spec)
        out = []
        for i, nic in enumerate(nics):
            if isinstance(nic, dict) and (res.key, i) in self.nic_ip:
                nic = {**nic, "ip": self.nic_ip[(res.key, i)]}
            out.append(nic)
        return {**spec, "networks": out}

    def derived(self, res: Resource) -> dict[str, Any]:
        """The host facts of a network, security group or router derived from the others."""
        key = res.key
        if key.kind == "Network":
            return {"ports": list(self._ports.get((key.tenant, key.name), []))}
        if key.kind == "SecurityGroup":
            remotes = {}
            for rule in res.spec.rules:  # type: ignore[attr-defined]
                if not remote_is_cidr(rule.remote):
                    members = self._members.get((key.tenant, rule.remote), set())
                    remotes[rule.remote] = [str(a) for a in sorted(members)]
            return {"remotes": remotes}
        if key.kind == "Router":
            address = self.router_ip.get(key)
            return {"externalAddress": address} if address else {}
        return {}

    # --- allocation ----------------------------------------------------------------------

    def _keep(self, net: NetKey, ip: IPv4Address | None) -> IPv4Address | None:
        if ip is None or ip in self._used[net]:
            return None
        for subnet in self._subnets.get(net, ()):
            cidr = subnet.cidr
            if ip in cidr and ip not in (cidr.network_address, cidr.broadcast_address):
                self._used[net].add(ip)
                return ip
        return None

    def _allocate(self, net: NetKey, seed: str, *, inside_range_first: bool) -> IPv4Address | None:
        for subnet in self._subnets.get(net, ()):
            for candidates in self._candidates(subnet, inside_range_first):
                if not candidates:
                    continue
                start = int(hashlib.sha256(seed.encode()).hexdigest()[:8], 16) % len(candidates)
                for step in range(len(candidates)):
                    ip = candidates[(start + step) % len(candidates)]
                    if ip not in self._used[net]:
                        self._used[net].add(ip)
                        return ip
        return None

    def _candidates(self, subnet: Subnet, inside_range_first: bool) -> list[list[IPv4Address]]:
        """A subnet's candidate lists, built once per plan (a /16 has 64Ki of them)."""
        key = (subnet.cidr, dhcp_range_of(subnet), inside_range_first)
        if key not in self._candidate_cache:
            self._candidate_cache[key] = _candidates(subnet, inside_range_first)
        return self._candidate_cache[key]

    def _with_prefix(self, net: NetKey, ip: IPv4Address) -> str:
        for subnet in self._subnets.get(net, ()):
            if ip in subnet.cidr:
                return f"{ip}/{subnet.cidr.prefixlen}"
        return f"{ip}/32"  # pragma: no cover - kept and allocated addresses are inside a subnet


def _candidates(subnet: Subnet, inside_range_first: bool) -> list[list[IPv4Address]]:
    """Usable addresses of a subnet, split into the DHCP range and the rest."""
    cidr: IPv4Network = subnet.cidr
    lo, hi = int(cidr.network_address) + 1, int(cidr.broadcast_address) - 1
    if hi - lo > 65535:  # a /16 or larger: allocation stays within the first 64Ki addresses
        hi = lo + 65535
    start, end = dhcp_range_of(subnet)
    in_range = [IPv4Address(n) for n in range(max(lo, int(start)), min(hi, int(end)) + 1)]
    outside = [IPv4Address(n) for n in range(lo, hi + 1) if not int(start) <= n <= int(end)]
    return [in_range, outside] if inside_range_first else [outside, in_range]


def _observed_nic_ips(obs: Observed | None) -> dict[str, IPv4Address]:
    out: dict[str, IPv4Address] = {}
    if obs is None:
        return out
    for nic in obs.spec.get("networks") or ():
        if isinstance(nic, dict) and nic.get("ip") and isinstance(nic.get("network"), str):
            try:
                out.setdefault(nic["network"], IPv4Address(nic["ip"]))
            except ValueError:
                continue
    return out


def _interface_ip(value: object) -> IPv4Address | None:
    if not isinstance(value, str):
        return None
    try:
        return IPv4Address(value.split("/", 1)[0])
    except ValueError:
        return None


def _external(res: Resource) -> NetKey | None:
    external = res.spec.external  # type: ignore[attr-defined]
    if not external:
        return None
    other, _, name = external.rpartition("/")
    return (other or res.key.tenant, name)


def derived_diffs(new: Mapping[str, Any], old: Mapping[str, Any]) -> Iterable[tuple[tuple[str, ...], Any, Any]]:
    """(path, old, new) for every derived entry that differs: ports by owner, maps by key."""
    for name in sorted(set(new) | set(old)):
        a, b = old.get(name), new.get(name)
        if a == b:
            continue
        if _by_owner(a) is not None and _by_owner(b) is not None:
            olds, news = _by_owner(a) or {}, _by_owner(b) or {}
            for owner in sorted(set(olds) | set(news)):
                was, now = olds.get(owner), news.get(owner)
                if was == now:
                    continue
                if isinstance(was, dict) and isinstance(now, dict):  # the same port: what changed in it
                    for sub in sorted(set(was) | set(now)):
                        if was.get(sub) != now.get(sub):
                            yield (name, owner, sub), was.get(sub), now.get(sub)
                else:
                    yield (name, owner), was, now
        elif isinstance(a, dict | None) and isinstance(b, dict | None):
            a, b = a or {}, b or {}
            for sub in sorted(set(a) | set(b)):
                if a.get(sub) != b.get(sub):
                    yield (name, sub), a.get(sub), b.get(sub)
        else:
            yield (name,), a, b


def _by_owner(value: object) -> dict[str, Any] | None:
    if value is None:
        return {}
    if isinstance(value, list) and all(isinstance(v, dict) and "owner" in v for v in value):
        return {str(v["owner"]): v for v in value}
    return None
