"""Cross-resource checks of a desired state: references, addresses, quotas, cycles.

Each check is a small function over the whole :class:`~reconciler.models.Desired` that
yields :class:`~reconciler.errors.Problem`s; :func:`check_desired` runs them all and
collects every problem (never stopping at the first).
"""

from __future__ import annotations

import difflib
from collections import defaultdict
from ipaddress import IPv4Address, IPv4Network
from typing import Callable, Iterable, Iterator

from reconciler.dependencies import build_graph, parse_depends_on
from reconciler.errors import Problem, format_path
from reconciler.graph import find_cycles
from reconciler.models import KINDS, Desired, Key, Resource
from reconciler.models.instance import InstanceSpec
from reconciler.models.network import NetworkSpec, dhcp_range_of, dhcp_server_of, gateway_of
from reconciler.models.router import RouterSpec
from reconciler.models.tenant import TenantSpec
from reconciler.models.volume import VolumeSpec

Check = Callable[[Desired], Iterable[Problem]]


def problem(res: Resource, path: tuple[str | int, ...], message: str) -> Problem:
    return Problem(res.source.file, res.line_of(path), message, res.key.display, format_path(path))


def _where(res: Resource, path: tuple[str | int, ...] = ()) -> str:
    return f"{res.source.file}:{res.line_of(path)}"


# --- one resource at a time ---------------------------------------------------------


def check_subnets(desired: Desired) -> Iterator[Problem]:
    """Gateways and DHCP ranges inside their subnet; subnets big enough to serve."""
    for res in desired.of_kind("Network"):
        spec: NetworkSpec = res.spec  # type: ignore[assignment]
        if spec.vni is not None and spec.type != "vxlan":
            yield problem(res, ("spec", "vni"), f"vni is only valid with type vxlan, not {spec.type}")
        if spec.vlanId is not None and spec.type != "vlan":
            yield problem(res, ("spec", "vlanId"), f"vlanId is only valid with type vlan, not {spec.type}")
        for i, subnet in enumerate(spec.subnets):
            base = ("spec", "subnets", i)
            net = subnet.cidr
            if net.prefixlen > 30:
                yield problem(res, base + ("cidr",), f"{net} is too small: a subnet needs at least a /30")
                continue
            gw = gateway_of(subnet)
            if gw not in net:
                yield problem(res, base + ("gateway",), f"gateway {gw} is outside the subnet {net}")
            elif gw in (net.network_address, net.broadcast_address):
                yield problem(res, base + ("gateway",), f"gateway {gw} is the network or broadcast address of {net}")
            if not subnet.dhcp.enabled:
                continue
            start, end = dhcp_range_of(subnet)
            for name, addr in (("start", start), ("end", end)):
                if addr not in net or addr in (net.network_address, net.broadcast_address):
                    yield problem(
                        res, base + ("dhcp", name),
                        f"DHCP range {name} {addr} is outside the usable addresses of {net}",
                    )
            if start > end:
                yield problem(res, base + ("dhcp", "start"), f"DHCP range starts at {start}, after its end {end}")
            elif start <= gw <= end and gw in net:
                yield problem(res, base + ("gateway",), f"gateway {gw} is inside the DHCP range {start}-{end}")
            elif start in net and end in net and dhcp_server_of(subnet) is None:
                yield problem(
                    res, base + ("dhcp", "start"),
                    f"no address is left for the DHCP server: it takes an address just below "
                    f"the range {start}-{end} or just above it (not the gateway), and none is free",
                )


# --- across resources -----------------------------------------------------------------


def check_tenants_declared(desired: Desired) -> Iterator[Problem]:
    for res in desired:
        tenant = Key("Tenant", res.key.tenant, res.key.tenant)
        if res.key.kind != "Tenant" and tenant not in desired and tenant not in desired.unloaded:
            yield problem(
                res, ("metadata", "tenant"),
                f"tenant {res.key.tenant!r} is not declared: add a Tenant named {res.key.tenant!r}",
            )


def _names(desired: Desired, kind: str, tenant: str) -> list[str]:
    return sorted(r.key.name for r in desired.of_kind(kind) if r.key.tenant == tenant)


def _dangling(desired: Desired, kind: str, tenant: str, name: str) -> str:
    close = difflib.get_close_matches(name, _names(desired, kind, tenant), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    elsewhere = sorted(
        r.key.tenant for r in desired.of_kind(kind) if r.key.name == name and r.key.tenant != tenant
    )
    if elsewhere and not hint:  # the user may think references can cross tenants
        other = elsewhere[0]
        hint = f" ({kind} {other}/{name} exists, but in tenant {other!r}: references cannot cross tenants)"
    return f"no {kind} named {name!r} in tenant {tenant!r}{hint}"


def check_references(desired: Desired) -> Iterator[Problem]:
    """Every named resource exists, in the same tenant unless it is an external network."""
    for res in desired:
        tenant = res.key.tenant
        for ref in res.spec.references(tenant):
            path = ("spec",) + ref.path
            target = desired.get(ref.key)
            if ref.key in desired.unloaded:
                continue  # its own document has errors, reported there
            if ref.tenant != tenant:
                if target is None:
                    yield problem(res, path, _dangling(desired, ref.kind, ref.tenant, ref.name))
                elif not (ref.kind == "Network" and target.spec.external):  # type: ignore[attr-defined]
                    yield problem(
                        res, path,
                        f"reference across tenants: {target.key.display} belongs to tenant "
                        f"{ref.tenant!r}; only networks with external: true can be shared",
                    )
            elif target is None:
                yield problem(res, path, _dangling(desired, ref.kind, ref.tenant, ref.name))
        for i, entry in enumerate(res.metadata.dependsOn):
            path = ("metadata", "dependsOn", i)
            dep = parse_depends_on(entry, tenant)
            if dep is None:
                yield problem(res, path, f"{entry!r} must be Kind/name with a kind among {', '.join(KINDS)}")
            elif dep not in desired and dep not in desired.unloaded:
                yield problem(res, path, _dangling(desired, dep.kind, dep.tenant, dep.name))


def check_overlapping_subnets(desired: Desired) -> Iterator[Problem]:
    by_tenant: dict[str, list[tuple[IPv4Network, Resource, int]]] = defaultdict(list)
    for res in desired.of_kind("Network"):
        for i, subnet in enumerate(res.spec.subnets):  # type: ignore[attr-defined]
            by_tenant[res.key.tenant].append((subnet.cidr, res, i))
    for entries in by_tenant.values():
        entries.sort(key=lambda e: (e[0].network_address, -e[0].num_addresses, str(e[1].key), e[2]))
        widest: tuple[IPv4Network, Resource, int] | None = None
        for entry in entries:
            net, res, i = entry
            if widest is not None and net.subnet_of(widest[0]):
                other, ores, oi = widest
                yield problem(
                    res, ("spec", "subnets", i, "cidr"),
                    f"{net} overlaps {other} of {ores.key.display} "
                    f"({_where(ores, ('spec', 'subnets', oi, 'cidr'))}); subnets of a tenant must not overlap",
                )
                continue
            if widest is None or net.broadcast_address > widest[0].broadcast_address:
                widest = entry


def check_segment_ids(desired: Desired) -> Iterator[Problem]:
    """Explicit VNIs and VLAN ids are unique on the host."""
    for field in ("vni", "vlanId"):
        seen: dict[int, Resource] = {}
        for res in sorted(desired.of_kind("Network"), key=lambda r: str(r.key)):
            value = getattr(res.spec, field)
            if value is None:
                continue
            if value in seen:
                other = seen[value]
                yield problem(res, ("spec", field), f"{field} {value} is already used by {other.key.display} ({_where(other, ('spec', field))})")
            else:
                seen[value] = res


def check_instance_ports(desired: Desired) -> Iterator[Problem]:
    """Fixed IPs inside a subnet of their network, not reserved, not taken twice."""
    taken: dict[tuple[str, str, IPv4Address], tuple[Resource, int]] = {}
    for res in sorted(desired.of_kind("Instance"), key=lambda r: str(r.key)):
        spec: InstanceSpec = res.spec  # type: ignore[assignment]
        for i, nic in enumerate(spec.networks):
            if nic.ip is None:
                continue
            path = ("spec", "networks", i, "ip")
            net_res = desired.get(Key("Network", res.key.tenant, nic.network))
            if net_res is None:
                continue  # reported as a dangling reference
            subnets = net_res.spec.subnets  # type: ignore[attr-defined]
            inside = [s for s in subnets if nic.ip in s.cidr]
            if not inside:
                cidrs = ", ".join(str(s.cidr) for s in subnets) or "none"
                yield problem(res, path, f"{nic.ip} is in no subnet of network {nic.network!r} (subnets: {cidrs})")
                continue
            subnet = inside[0]
            if nic.ip in (subnet.cidr.network_address, subnet.cidr.broadcast_address):
                yield problem(res, path, f"{nic.ip} is the network or broadcast address of {subnet.cidr}")
            elif nic.ip == gateway_of(subnet):
                yield problem(res, path, f"{nic.ip} is the gateway of {subnet.cidr}")
            elif nic.ip == dhcp_server_of(subnet):
                yield problem(res, path, f"{nic.ip} is the DHCP server's address in {subnet.cidr}")
            slot = (res.key.tenant, nic.network, nic.ip)
            if slot in taken:
                other, oi = taken[slot]
                yield problem(res, path, f"{nic.ip} is already used by {other.key.display} ({_where(other, ('spec', 'networks', oi, 'ip'))})")
            else:
                taken[slot] = (res, i)


def check_volume_attachments(desired: Desired) -> Iterator[Problem]:
    """A volume is attached once, unless it says multiattach: true."""
    users: dict[Key, tuple[Resource, int]] = {}
    for res in sorted(desired.of_kind("Instance"), key=lambda r: str(r.key)):
        spec: InstanceSpec = res.spec  # type: ignore[assignment]
        devices: dict[str, int] = {}
        mine: set[str] = set()
        for i, att in enumerate(spec.volumes):
            path = ("spec", "volumes", i)
            if att.volume in mine:
                yield problem(res, path + ("volume",), f"volume {att.volume!r} is attached twice to this instance")
                continue
            mine.add(att.volume)
            if att.device is not None:
                if att.device in devices:
                    yield problem(res, path + ("device",), f"device {att.device} is already used by volumes[{devices[att.device]}]")
                devices[att.device] = i
            vkey = Key("Volume", res.key.tenant, att.volume)
            vol = desired.get(vkey)
            if vol is None:
                continue
            if vkey in users and not vol.spec.multiattach:  # type: ignore[attr-defined]
                other, _ = users[vkey]
                yield problem(
                    res, path + ("volume",),
                    f"volume {att.volume!r} is already attached to {other.key.display}; "
                    "set multiattach: true on the volume to share it",
                )
            users.setdefault(vkey, (res, i))


def check_routers(desired: Desired) -> Iterator[Problem]:
    """A network is joined by one router at most (it holds the gateway address)."""
    joined: dict[Key, Resource] = {}
    for res in sorted(desired.of_kind("Router"), key=lambda r: str(r.key)):
        spec: RouterSpec = res.spec  # type: ignore[assignment]
        seen: set[str] = set()
        for i, name in enumerate(spec.networks):
            path = ("spec", "networks", i)
            if name in seen:
                yield problem(res, path, f"network {name!r} is listed twice")
                continue
            seen.add(name)
            nkey = Key("Network", res.key.tenant, name)
            net = desired.get(nkey)
            if net is None:
                continue
            if not net.spec.subnets:  # type: ignore[attr-defined]
                yield problem(res, path, f"network {name!r} has no subnet to route")
            if nkey in joined:
                yield problem(res, path, f"network {name!r} is already joined by {joined[nkey].key.display}; a subnet has one gateway")
            else:
                joined[nkey] = res
        if spec.external is not None and spec.external in seen:
            yield problem(res, ("spec", "external"), f"network {spec.external!r} cannot be both external and internal")


def check_quotas(desired: Desired) -> Iterator[Problem]:
    usage: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for res in desired:
        use = usage[res.key.tenant]
        if res.key.kind == "Instance":
            spec: InstanceSpec = res.spec  # type: ignore[assignment]
            use["instances"] += 1
            use["vcpus"] += spec.vcpus
            use["memoryMiB"] += spec.memoryMiB
        elif res.key.kind == "Volume":
            vspec: VolumeSpec = res.spec  # type: ignore[assignment]
            use["volumeGiB"] += vspec.sizeGiB
        elif res.key.kind == "Bucket":
            use["buckets"] += 1
    units = {"instances": "instances", "vcpus": "vcpus", "memoryMiB": "MiB of memory",
             "volumeGiB": "GiB of volumes", "buckets": "buckets"}
    incomplete = {key.tenant for key in desired.unloaded}
    for res in desired.of_kind("Tenant"):
        if res.key.tenant in incomplete:
            continue  # some of its documents did not load: the sums would be wrong
        quota = res.spec.quota  # type: ignore[attr-defined]
        use = usage[res.key.tenant]
        for field, unit in units.items():
            limit = getattr(quota, field)
            if limit is not None and use[field] > limit:
                yield problem(
                    res, ("spec", "quota", field),
                    f"quota exceeded: the manifests declare {use[field]} {unit}, the quota is "
                    f"{limit} ({use[field] - limit} over)",
                )


def check_cycles(desired: Desired) -> Iterator[Problem]:
    graph = build_graph(desired)
    for cycle in find_cycles(graph):
        first = next((desired.get(k) for k in cycle if k in desired), None)
        if first is None:
            continue
        # graph edges point from a dependency to its dependent: list each resource, then
        # what it depends on, as a user reads dependsOn
        order = [cycle[0]] + cycle[:0:-1] + [cycle[0]]
        names = " -> ".join(k.display for k in order)
        path = ("metadata", "dependsOn") if first.metadata.dependsOn else ("metadata", "name")
        yield problem(first, path, f"dependency cycle: {names} (each depends on the next)")


PER_RESOURCE: tuple[Check, ...] = (check_subnets,)
ACROSS: tuple[Check, ...] = (
    check_tenants_declared,
    check_references,
    check_overlapping_subnets,
    check_segment_ids,
    check_instance_ports,
    check_volume_attachments,
    check_routers,
    check_quotas,
    check_cycles,
)


def check_desired(desired: Desired) -> list[Problem]:
    """Every problem of a desired state.

    Keys in `desired.unloaded` (documents that had errors of their own) are treated as
    present for references, so one bad document does not cascade into many errors.
    """
    problems: list[Problem] = []
    for check in PER_RESOURCE + ACROSS:
        problems.extend(check(desired))
    return problems


__all__ = ["check_desired", "TenantSpec"]
