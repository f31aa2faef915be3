"""Router: a network namespace with a leg on each of its networks (holding the subnets'
gateway addresses) and, with `external`, a leg on the external network, a default route
and SNAT (Neutron's L3 agent: qrouter namespace, qr- and qg- devices).

Forwarding is on inside the namespace only. Its own nftables table drops forwarded
traffic and traffic to the router itself except replies and what comes from the internal
legs (its addresses answer only the networks it joins, never the external network or,
through it, another tenant), and masquerades the tenant subnets leaving by the external
leg. Observe checks the legs from the host side (each veth's host end is marked and
enslaved to its network's bridge) and never enters the namespace; the addresses and
rules inside are rewritten by every ensure.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Interface
from typing import TYPE_CHECKING, Any, Mapping

from reconciler import faults
from reconciler.drivers.netlink import _host, _names, _nft
from reconciler.drivers.netlink._sidecar import ROUTERS
from reconciler.errors import Conflict, NotFound, PermanentError, TransientError
from reconciler.models import Key
from reconciler.models.network import NetworkSpec, default_mtu, gateway_of
from reconciler.models.router import RouterSpec
from reconciler.state import Mark, Observation, Observed, Target, Unowned

if TYPE_CHECKING:
    from reconciler.drivers.netlink._driver import Facts, NetlinkDriver


@dataclass(frozen=True, slots=True)
class Leg:
    """One veth of the router: host end on a network's bridge, the other end inside."""

    host: str
    inside: str
    bridge: str
    network: Key
    mtu: int
    addresses: tuple[str, ...]  # "a.b.c.d/p" inside the namespace

    def record(self) -> dict[str, Any]:
        return {"inside": self.inside, "bridge": self.bridge, "network": str(self.network)}


def external_key(tenant: str, external: str) -> Key:
    other, _, name = external.rpartition("/")
    return Key("Network", other or tenant, name)


class Routers:
    def __init__(self, driver: "NetlinkDriver"):
        self.d = driver

    # --- observe ----------------------------------------------------------------------

    def observe(self, facts: "Facts", result: Observation) -> None:
        for ns, data in facts.routers.items():
            try:
                result.owned.append(self.observed(facts, ns, data))
            except (KeyError, TypeError, ValueError) as exc:
                result.unowned.append(Unowned("Router", ns, f"unreadable sidecar: {exc}"))
        for ns in sorted(facts.snap.namespaces):
            if _names.OUR_NAME.fullmatch(ns) and ns not in facts.routers:
                result.unowned.append(Unowned("Router", ns, f"namespace {ns} has no sidecar of this "
                                              "reconciler installation"))

    def observe_one(self, ns: str) -> Observed:
        facts = self.d.facts(sidecars=False)
        data = self.d.sidecars.read(ROUTERS, ns)
        if not data:
            raise NotFound(f"router sidecar for {ns} is gone")
        return self.observed(facts, ns, data)

    def observed(self, facts: "Facts", ns: str, data: Mapping[str, Any]) -> Observed:
        """The legs actually present make the spec's networks; the external network
        counts only while its leg is there."""
        mark = Mark.from_dict(data["mark"])
        key = mark.key
        spec = dict(data["spec"])
        derived = dict(data.get("derived") or {})
        legs: Mapping[str, Mapping[str, Any]] = data.get("legs") or {}
        snap = facts.snap
        drift: list[str] = []
        present = ns in snap.namespaces
        if not present:
            drift.append(f"namespace {ns} is missing")
        if not data.get("ensured", True):
            drift.append("its last change was cut short: the addresses, route and rules inside its "
                         "namespace may be missing")

        def leg_ok(host: str, network: Key) -> bool:
            if not present:
                return False
            link = snap.links.get(host)
            bridge = (legs.get(host) or {}).get("bridge") or _names.bridge(network)
            br = snap.links.get(bridge)
            if link is None or not self.d.owns(link.alias, key):
                drift.append(f"router leg {host} on network {network.tenant}/{network.name} is missing")
                return False
            if br is None or link.master != br.index or not link.up:
                drift.append(f"router leg {host} is not up in bridge {bridge}")
                return False
            if link.mtu != br.mtu:
                drift.append(f"router leg {host} has MTU {link.mtu}, its network {br.mtu}")
            return True

        spec["networks"] = [name for name in spec.get("networks") or []
                            if leg_ok(_names.router_leg(key, Key("Network", key.tenant, name))[0],
                                      Key("Network", key.tenant, name))]
        if spec.get("external"):
            ext = external_key(key.tenant, spec["external"])
            if not leg_ok(_names.gateway_leg(key, ext)[0], ext):
                spec["external"] = None
                derived.pop("externalAddress", None)
        host = {"namespace": ns, "driver": "netlink",
                "externalAddress": str(derived.get("externalAddress") or "")}
        return Observed(key, ns, spec, mark, host, derived=derived, drift=tuple(drift))

    # --- ensure -----------------------------------------------------------------------

    def legs(self, target: Target) -> tuple[list[Leg], Leg | None, str | None, list[str]]:
        """(internal legs, external leg, default gateway, tenant subnets) from the target
        and the observed networks it references."""
        key = target.key
        spec = RouterSpec.model_validate(dict(target.spec))
        internal = []
        subnets: list[str] = []
        for name in spec.networks:
            net_key = Key("Network", key.tenant, name)
            net, model, bridge, mtu = self._network(target, net_key)
            host, inside = _names.router_leg(key, net_key)
            addresses = tuple(f"{gateway_of(s)}/{s.cidr.prefixlen}" for s in model.subnets)
            subnets.extend(str(s.cidr) for s in model.subnets)
            internal.append(Leg(host, inside, bridge, net_key, mtu, addresses))
        external = None
        gateway = None
        if spec.external:
            ext_key = external_key(key.tenant, spec.external)
            _net, model, bridge, mtu = self._network(target, ext_key)
            address = target.derived.get("externalAddress")
            if not address:
                raise PermanentError(f"{key.display}: no external address was allocated on "
                                     f"{ext_key.tenant}/{ext_key.name}")
            iface = IPv4Interface(str(address))
            host, inside = _names.gateway_leg(key, ext_key)
            external = Leg(host, inside, bridge, ext_key, mtu, (str(iface),))
            for subnet in model.subnets:
                if iface.ip in subnet.cidr:
                    gw = gateway_of(subnet)
                    gateway = str(gw) if gw != iface.ip else None
                    break
        return internal, external, gateway, subnets

    def _network(self, target: Target, net_key: Key) -> tuple[Observed, NetworkSpec, str, int]:
        net = target.related.get(net_key)
        if net is None:
            raise TransientError(f"{target.key.display}: network {net_key.tenant}/{net_key.name} is not on "
                                 "this host (yet)")
        model = NetworkSpec.model_validate(dict(net.spec))
        bridge = net.host.get("bridge") or _names.bridge(net_key)
        mtu = int(net.host.get("mtu") or default_mtu(model))
        return net, model, _names.check_ifname(bridge), mtu

    def ensure(self, target: Target) -> Observed:
        key = target.key
        ns = _names.router_namespace(key)
        spec = RouterSpec.model_validate(dict(target.spec))
        internal, external, gateway, subnets = self.legs(target)
        wanted = internal + ([external] if external else [])
        snap = _host.dump()
        existing = self.d.sidecars.read(ROUTERS, ns)
        # the sidecar names the legs before they are made: an unmarked one of them is
        # ours, from a run killed between creating and marking it
        recorded = set((existing or {}).get("legs") or {})
        for leg in wanted:
            if leg.bridge not in snap.links:
                raise TransientError(f"{key.display}: bridge {leg.bridge} of network {leg.network.tenant}/"
                                     f"{leg.network.name} does not exist (yet)")
            current = snap.links.get(leg.host)
            half_made = leg.host in recorded
            if current is not None and not self.d.owns(current.alias, key, half_made):
                raise Conflict(f"{key.display}: device {leg.host} {self.d.foreign(current.alias, key, half_made)}; "
                               "not touching it")
        alias = self.d.alias(target)
        if ns in snap.namespaces:
            self._check_namespace(ns, key, has_sidecar=bool(existing))
        # `ensured` says when all of it is done: observe does not enter the namespace, so
        # without it a change cut short inside (addresses, route, rules) would look done
        sidecar = {"mark": target.mark.to_dict(), "spec": dict(target.spec), "derived": dict(target.derived),
                   "legs": {leg.host: leg.record() for leg in wanted}, "ensured": False}
        with self.d.lock:
            self.d.sidecars.write(ROUTERS, ns, sidecar)
        faults.point("netlink.router-after-sidecar")
        _host.create_namespace(ns)
        with _host.Namespace(ns) as inside:
            inside.set_link("lo", alias=alias)
            _host.namespace_sysctls(ns, forwarding=True)
            links = inside.links()
            for leg in wanted:
                if leg.host not in snap.links or leg.inside not in links:
                    _host.delete_link(leg.host)
                    _host.add_veth(leg.host, leg.inside, ns, leg.mtu)
                    faults.point("netlink.router-leg-unmarked")
                _host.set_port(leg.host, leg.bridge, leg.mtu, alias)
                inside.set_link(leg.inside, mtu=leg.mtu, alias=alias, address=_names.leg_mac(leg.inside))
                inside.set_addresses(leg.inside, list(leg.addresses))
            names = {leg.host for leg in wanted}
            for link in snap.links.values():
                stale = link.name.startswith(("rr-", "rg-")) and link.name not in names
                if stale and self.d.owns(link.alias, key):
                    _host.delete_link(link.name)
            inside.default_route(gateway, external.inside if external and gateway else None)
        snat = external.inside if external is not None and spec.snat else None
        faults.point("netlink.router-before-rules")
        self.d.nft.apply(_nft.router_commands(snat, subnets), namespace=ns)
        sidecar["ensured"] = True
        with self.d.lock:
            self.d.sidecars.write(ROUTERS, ns, sidecar)
        return self.observe_one(ns)

    def _check_namespace(self, ns: str, key: Key, has_sidecar: bool) -> None:
        """A namespace with our router's name is ours when its `lo` has our mark, or has
        none while our sidecar exists (a crash between creating and marking it, or a stub:
        see `_host.namespace_stub`)."""
        if _host.namespace_stub(ns):
            if has_sidecar:
                return
            raise Conflict(f"{key.display}: namespace {ns} exists without our mark; not touching it")
        with _host.Namespace(ns) as inside:
            lo = inside.links().get("lo")
        mark = _names.parse_alias(lo.alias if lo else None)
        if mark is None and has_sidecar:
            return
        if mark is None or mark.home != self.d.home or mark.key != key:
            why = self.d.foreign(lo.alias if lo else None, key)
            raise Conflict(f"{key.display}: namespace {ns} {why}; not touching it")

    # --- delete -----------------------------------------------------------------------

    def delete(self, observed: Observed) -> None:
        key = observed.key
        ns = observed.identity
        if ns != _names.router_namespace(key):
            raise PermanentError(f"{key.display}: unexpected namespace name {ns!r}")
        snap = _host.dump()
        data = self.d.sidecars.read(ROUTERS, ns)
        if ns in snap.namespaces:
            self._check_namespace(ns, key, has_sidecar=data is not None)
            _host.remove_namespace(ns)
        recorded = set((data or {}).get("legs") or {})
        for link in snap.links.values():  # the host ends go with the namespace, a moment later
            if link.name.startswith(("rr-", "rg-")) and self.d.owns(link.alias, key, link.name in recorded):
                _host.delete_link(link.name)
        with self.d.lock:
            self.d.sidecars.remove(ROUTERS, ns)
