"""Network: a bridge (with its VXLAN, VLAN or flat uplink), DHCP per subnet, and the
nftables chains of its ports (security groups and anti-spoofing).

The bridge holds no address in the host namespace (the host must not route between
tenants) and passes its IPv4 traffic to nftables (`nf_call_iptables`, per bridge), where
its own conntrack zone keeps tenants with equal addresses apart. DHCP runs in a
namespace of the network's own (``rc-dhcp-H``), so dnsmasq never listens on the host.
"""

from __future__ import annotations

import shutil
from ipaddress import IPv4Address
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from reconciler import faults
from reconciler.drivers.netlink import _dnsmasq, _host, _names, _nft
from reconciler.drivers.netlink._sidecar import GROUPS, NETWORKS
from reconciler.errors import Conflict, NotFound, PermanentError
from reconciler.models import Key
from reconciler.models.network import NetworkSpec, default_mtu, dhcp_range_of, dhcp_server_of, gateway_of
from reconciler.procs import is_alive
from reconciler.state import Mark, Observation, Observed, Target, Unowned

if TYPE_CHECKING:
    from reconciler.drivers.netlink._driver import Facts, NetlinkDriver

ZONES = 65535


class Networks:
    def __init__(self, driver: "NetlinkDriver"):
        self.d = driver
        self.settings = driver.settings

    # --- names and configuration ------------------------------------------------------

    def uplink(self, key: Key) -> str | None:
        name = self.settings.uplinks.get(f"{key.tenant}/{key.name}")
        return _names.check_uplink(name) if name else None

    def dhcp_dir(self, bridge: str) -> Path:
        return self.settings.state_dir / "dhcp" / _names.check_ifname(bridge)

    def dhcp_configs(self, key: Key, bridge: str, spec: NetworkSpec) -> list[_dnsmasq.SubnetDhcp]:
        """One dnsmasq per subnet with DHCP on."""
        out = []
        mtu = default_mtu(spec)
        for index, subnet in enumerate(spec.subnets):
            server = dhcp_server_of(subnet)
            if server is None:
                continue
            start, end = dhcp_range_of(subnet)
            _host_leg, inside = _names.dhcp_legs(bridge, subnet.cidr)
            out.append(_dnsmasq.SubnetDhcp(
                program=self.settings.dnsmasq,
                namespace=_names.dhcp_namespace(bridge),
                interface=inside,
                cidr=subnet.cidr,
                server=server,
                start=start,
                end=end,
                gateway=gateway_of(subnet),
                dns_servers=tuple(str(s) for s in subnet.dnsServers),
                mtu=mtu,
                lease_seconds=self.settings.lease_seconds,
                tenant=key.tenant,
                first=index == 0,
                directory=self.dhcp_dir(bridge) / _names.dhcp_dir_name(subnet.cidr),
            ))
        return out

    # --- observe ----------------------------------------------------------------------

    def observe(self, facts: "Facts", result: Observation) -> None:
        for bridge, data in facts.networks.items():
            try:
                result.owned.append(self.observed(facts, bridge, data))
            except (KeyError, TypeError, ValueError) as exc:
                result.unowned.append(Unowned("Network", bridge, f"unreadable sidecar: {exc}"))
        for link in facts.snap.links.values():
            if link.kind != "bridge" or not _names.OUR_NAME.fullmatch(link.name):
                continue
            mark = link.mark
            if mark is not None and mark.home == self.d.home and mark.key.kind == "Network":
                if link.name not in facts.networks:
                    result.owned.append(self._without_sidecar(facts, link, mark))
                continue
            if mark is None and not link.alias and link.name in facts.networks:
                continue  # ours, made by a run killed before it marked it: drift of that network
            if mark is None:
                detail = f"bridge {link.name} has no reconciler mark"
            else:
                detail = (f"bridge {link.name} is managed by another reconciler installation "
                          f"(home {mark.home})")
            result.unowned.append(Unowned("Network", link.name, detail))
        self._parts_in_the_way(facts, result)

    def _parts_in_the_way(self, facts: "Facts", result: Observation) -> None:
        """A VXLAN or VLAN device, or a DHCP namespace, with the name a part of a network
        gets while this installation has no such network: in the way of that network,
        reported under its bridge's name (the one plan looks for). Namespaces are not
        entered: one of ours always has our network (its sidecar goes last on delete)."""
        mine = set(facts.networks)
        mine.update(link.name for link in facts.snap.links.values()
                    if link.kind == "bridge" and link.mark is not None and link.mark.home == self.d.home)
        for link in facts.snap.links.values():
            if not _names.OUR_SEGMENT.fullmatch(link.name):
                continue
            bridge, mark = "rc-" + link.name[3:], link.mark
            if bridge in mine or (mark is not None and mark.home == self.d.home):
                continue
            what = "VXLAN" if link.name.startswith("rv-") else "VLAN"
            why = ("has no reconciler mark" if mark is None
                   else f"is managed by another reconciler installation (home {mark.home})")
            result.unowned.append(Unowned("Network", bridge, f"{what} device {link.name} {why}"))
        for ns in sorted(facts.snap.namespaces):
            bridge = "rc-" + ns[len("rc-dhcp-"):]
            if (_names.OUR_DHCP_NAMESPACE.fullmatch(ns) and bridge not in mine
                    and not _host.namespace_stub(ns)):  # a stub holds nothing: creating remakes it
                result.unowned.append(Unowned("Network", bridge, f"DHCP namespace {ns} exists and is not "
                                              "one of this installation's networks'"))

    def observe_one(self, bridge: str) -> Observed:
        facts = self.d.facts(sidecars=False)
        data = self.d.sidecars.read(NETWORKS, bridge)
        if not data:
            raise NotFound(f"network sidecar for {bridge} is gone")
        return self.observed(facts, bridge, data)

    def observed(self, facts: "Facts", bridge: str, data: Mapping[str, Any]) -> Observed:
        """The network as the host has it: spec from the kernel where it holds the truth
        (VNI, VLAN id, MTU), else from the sidecar; drift for whatever is missing."""
        mark = Mark.from_dict(data["mark"])
        key = mark.key
        stored = dict(data["spec"])
        model = NetworkSpec.model_validate(stored)
        spec = dict(stored)
        derived = dict(data.get("derived") or {})
        ports = [_nft.Port.from_dict(p) for p in derived.get("ports") or []]
        snap = facts.snap
        drift: list[str] = []
        mtu = default_mtu(model)
        link = snap.links.get(bridge)
        kernel_mtu = mtu
        if link is None:
            drift.append(f"bridge {bridge} is missing")
        elif link.kind != "bridge" or not self.d.owns(link.alias, key):
            drift.append(f"bridge {bridge} exists without our mark")
        else:
            kernel_mtu = link.mtu
            if link.mtu != mtu:
                drift.append(f"bridge {bridge} has MTU {link.mtu}, not {mtu}")
            # a null MTU means the type's default: report it so while the kernel agrees
            spec["mtu"] = None if stored.get("mtu") is None and link.mtu == mtu else link.mtu
            if not link.up:
                drift.append(f"bridge {bridge} is down")
            if link.data.get("IFLA_BR_NF_CALL_IPTABLES") != 1:
                drift.append(f"bridge {bridge} does not pass IPv4 to nftables (nf_call_iptables)")
            held = [a for a in snap.addresses.get(link.index, []) if not a.startswith("fe80:")]
            if held:
                drift.append(f"bridge {bridge} has addresses in the host namespace: {', '.join(held)}")
            drift.extend(self._segment_drift(facts, key, bridge, model, spec, link.index, mtu))
        dhcp_drift, dhcp_ok = self._dhcp_drift(facts, key, bridge, model, ports, link)
        drift.extend(dhcp_drift)
        zone = int(data.get("zone") or 0)
        recorded = dict(data.get("rules") or {})
        inet = _nft.network_inet(bridge, zone, ports)
        br = _nft.network_bridge(bridge, ports)
        nft_drift = (_nft.drift(facts.inet, inet, recorded, _nft.INET)
                     + _nft.drift(facts.bridge, br, recorded, _nft.BRIDGE)
                     + _nft.base_drift(facts.inet, _nft.INET, recorded)
                     + _nft.base_drift(facts.bridge, _nft.BRIDGE, recorded))
        drift.extend(nft_drift)
        if (nft_drift or not dhcp_ok) and "ports" in derived:  # say which ports are still realised
            derived["ports"] = [raw for raw, port in zip(derived.get("ports") or [], ports)
                                if self._port_realised(facts, bridge, zone, port, recorded, dhcp_ok)]
        host = {"bridge": bridge, "driver": "netlink", "mtu": str(kernel_mtu)}
        if any(s.dhcp.enabled for s in model.subnets):
            host["namespace"] = _names.dhcp_namespace(bridge)
        return Observed(key, bridge, spec, mark, host, derived=derived, drift=tuple(drift))

    def _segment_drift(self, facts: "Facts", key: Key, bridge: str, model: NetworkSpec, spec: dict[str, Any],
                       bridge_index: int, mtu: int) -> list[str]:
        snap = facts.snap
        drift: list[str] = []
        if model.type in ("vxlan", "vlan"):
            name = _names.vxlan_device(bridge) if model.type == "vxlan" else _names.vlan_device(bridge)
            what = "VXLAN" if model.type == "vxlan" else "VLAN"
            dev = snap.links.get(name)
            if dev is None:
                return [f"{what} device {name} is missing"]
            if not self.d.owns(dev.alias, key):
                return [f"{what} device {name} exists without our mark"]
            if model.type == "vxlan":
                spec["vni"] = dev.data.get("IFLA_VXLAN_ID", spec.get("vni"))
                if dev.data.get("IFLA_VXLAN_PORT", self.settings.vxlan_port) != self.settings.vxlan_port:
                    drift.append(f"VXLAN device {name} uses UDP port {dev.data.get('IFLA_VXLAN_PORT')}")
                missing = [p for p in self.settings.vxlan_peers if p not in snap.fdb.get(dev.index, set())]
                if missing:
                    drift.append(f"VXLAN device {name} does not flood to {', '.join(missing)}")
            else:
                spec["vlanId"] = dev.data.get("IFLA_VLAN_ID", spec.get("vlanId"))
            if dev.master != bridge_index:
                drift.append(f"{what} device {name} is not in bridge {bridge}")
            if dev.mtu != mtu:
                drift.append(f"{what} device {name} has MTU {dev.mtu}, not {mtu}")
            if not dev.up:
                drift.append(f"{what} device {name} is down")
        else:
            uplink = self.uplink(key)
            if uplink:
                dev = snap.links.get(uplink)
                if dev is None:
                    drift.append(f"uplink {uplink} does not exist")
                elif dev.master != bridge_index:
                    drift.append(f"uplink {uplink} is not in bridge {bridge}")
        return drift

    def _dhcp_drift(self, facts: "Facts", key: Key, bridge: str, model: NetworkSpec,
                    ports: list[_nft.Port], link: _host.Link | None) -> tuple[list[str], bool]:
        """(drift, whether the reservations in the hosts files are all there)."""
        configs = self.dhcp_configs(key, bridge, model)
        if not configs:
            return [], True
        drift = []
        ns = _names.dhcp_namespace(bridge)
        files_ok = True
        if ns not in facts.snap.namespaces:
            drift.append(f"DHCP namespace {ns} is missing")
        for config in configs:
            host_leg, _inside = _names.dhcp_legs(bridge, config.cidr)
            leg = facts.snap.links.get(host_leg)
            if leg is None:
                drift.append(f"DHCP leg {host_leg} for {config.cidr} is missing")
            elif link is None or leg.master != link.index or not leg.up:
                drift.append(f"DHCP leg {host_leg} for {config.cidr} is not up in bridge {bridge}")
            process = _dnsmasq.running(config)
            if process is None:
                drift.append(f"dnsmasq for {config.cidr} is not running")
            elif not _dnsmasq.up_to_date(config, process):
                drift.append(f"dnsmasq for {config.cidr} runs with another configuration")
            stale = _dnsmasq.files_differ(config.files(ports))
            if stale:
                files_ok = files_ok and config.hosts not in stale
                drift.append(f"dnsmasq files for {config.cidr} differ: {', '.join(p.name for p in stale)}")
        return drift, files_ok

    def _port_realised(self, facts: "Facts", bridge: str, zone: int, port: _nft.Port,
                       recorded: Mapping[str, str], hosts_ok: bool) -> bool:
        """Whether one port's rules (and reservation) are on the host."""
        if not hosts_ok:
            return False
        inet = _nft.network_inet(bridge, zone, [port])
        in_chain, out_chain, _spoof = _names.network_chains(bridge)
        listed_in = {x.comment for x in facts.inet.chains.get(in_chain, [])}
        listed_out = {x.comment for x in facts.inet.chains.get(out_chain, [])}
        for chain, listed in ((in_chain, listed_in), (out_chain, listed_out)):
            if any(r.comment not in listed for r in inet.chains.get(chain, [])):
                return False
        port_chains = {c: r for c, r in inet.chains.items() if c not in (in_chain, out_chain)}
        own = _nft.Owned(inet.owner, chains=port_chains, needed=inet.needed)
        if _nft.drift(facts.inet, own, recorded, _nft.INET):
            return False
        spoof = _nft.network_bridge(bridge, [port])
        _in, _out, spoof_chain = _names.network_chains(bridge)
        listed_spoof = {x.comment for x in facts.bridge.chains.get(spoof_chain, [])}
        if any(r.comment not in listed_spoof for r in spoof.chains[spoof_chain]):
            return False
        return facts.bridge.map_targets(_nft.PORTS_MAP).get(port.tap) == spoof_chain

    def _without_sidecar(self, facts: "Facts", link: _host.Link, mark: _names.AliasMark) -> Observed:
        """A bridge with our mark whose sidecar is gone: what the kernel still says."""
        spec: dict[str, Any] = {"type": "flat", "vni": None, "vlanId": None, "mtu": link.mtu,
                                "external": False, "subnets": []}
        for port in facts.snap.ports(link.name):
            if port.kind == "vxlan":
                spec.update(type="vxlan", vni=port.data.get("IFLA_VXLAN_ID"))
            elif port.kind == "vlan":
                spec.update(type="vlan", vlanId=port.data.get("IFLA_VLAN_ID"))
        host = {"bridge": link.name, "driver": "netlink", "mtu": str(link.mtu)}
        sidecar = self.d.sidecars.path(NETWORKS, link.name)
        return Observed(mark.key, link.name, spec, Mark(mark.key, mark.spec_hash, {}), host,
                        drift=(f"sidecar {sidecar} is missing",))

    # --- ensure -----------------------------------------------------------------------

    def ensure(self, target: Target) -> Observed:
        """Create or repair the network to match `target` (idempotent)."""
        key = target.key
        spec = NetworkSpec.model_validate(dict(target.spec))
        bridge = _names.bridge(key)
        mtu = default_mtu(spec)
        uplink = self.uplink(key)
        if spec.type == "vlan":
            if not self.d.vlan_supported():
                raise PermanentError(f"{key.display}: {_host.VLAN_UNSUPPORTED}")
            if not uplink:
                raise PermanentError(f"{key.display}: type vlan needs an uplink (host config netlink.uplinks)")
            if spec.vlanId is None:
                raise PermanentError(f"{key.display}: a vlan network needs a vlanId")
        if spec.type == "vxlan" and spec.vni is None:
            raise PermanentError(f"{key.display}: a vxlan network needs a vni")
        ports = [_nft.Port.from_dict(p) for p in target.derived.get("ports") or []]
        alias = self.d.alias(target)
        snap = _host.dump()
        link = snap.links.get(bridge)
        # our sidecar is written before any device is made: with it, an unmarked device
        # with one of this network's names is ours, from a run killed before marking it
        half_made = self.d.sidecars.read(NETWORKS, bridge) is not None
        if link is not None:
            problem = "is not a bridge" if link.kind != "bridge" else self.d.foreign(link.alias, key, half_made)
            if problem:
                raise Conflict(f"{key.display}: {link.name} {problem}; not touching it")
        self._check_parts(key, bridge, spec, snap, ours=half_made)
        with self.d.lock:
            old = self.d.sidecars.read(NETWORKS, bridge) or {}
            zone = int(old.get("zone") or 0) or self._free_zone(bridge)
            sidecar = {"mark": target.mark.to_dict(), "spec": dict(target.spec),
                       "derived": dict(target.derived), "zone": zone, "uplink": uplink,
                       "rules": old.get("rules") or {}}
            self.d.sidecars.write(NETWORKS, bridge, sidecar)
        faults.point("netlink.network-after-sidecar")
        if link is None:
            _host.add_bridge(bridge, mtu, alias)
        else:
            _host.configure_bridge(bridge, mtu, alias)
            if any(not a.startswith("fe80:") for a in snap.addresses.get(link.index, [])):
                _host.flush_addresses(bridge)
        self._ensure_segment(key, bridge, spec, mtu, alias, uplink, old.get("uplink"), snap, half_made)
        for port in ports:
            # the instance driver attaches its taps; a bridge made again (after someone
            # deleted it) takes back the ones left without a bridge
            tap = snap.links.get(port.tap)
            if tap is not None and not tap.master and link is None:
                _host.set_port(port.tap, bridge, tap.mtu, None)
        faults.point("netlink.network-after-bridge")
        self._ensure_dhcp(key, bridge, spec, ports, alias, snap, half_made)
        self._routers_follow_mtu(bridge, mtu, snap)
        with self.d.lock:
            self._ensure_rules(bridge, zone, ports, old, sidecar["rules"])
        # one read of the host for both: the rules' fingerprints to record, and the result
        facts = self.d.facts(sidecars=False)
        with self.d.lock:
            sidecar["rules"] = self._fingerprints(facts, bridge)
            self.d.sidecars.write(NETWORKS, bridge, sidecar)
        return self.observed(facts, bridge, sidecar)

    def _check_parts(self, key: Key, bridge: str, spec: NetworkSpec, snap: _host.Snapshot, ours: bool) -> None:
        """Before anything is made or changed: the devices the network will have and its
        DHCP namespace, where they exist, must be ours. A namespace without a mark is
        ours only when the network already is (`ours`: its sidecar exists; a crash can
        come between creating the namespace and marking it)."""
        names = [_names.dhcp_legs(bridge, c.cidr)[0] for c in self.dhcp_configs(key, bridge, spec)]
        if spec.type in ("vxlan", "vlan"):
            names.append(_names.vxlan_device(bridge) if spec.type == "vxlan" else _names.vlan_device(bridge))
        for name in names:
            dev = snap.links.get(name)
            problem = self.d.foreign(dev.alias, key, half_made=ours) if dev is not None else None
            if problem:
                raise Conflict(f"{key.display}: device {name} {problem}; not touching it")
        ns = _names.dhcp_namespace(bridge)
        if ns in snap.namespaces and not ours and not _host.namespace_stub(ns):
            with _host.Namespace(ns) as inside:
                lo = inside.links().get("lo")
            problem = self.d.foreign(lo.alias if lo else None, key)
            if problem:
                raise Conflict(f"{key.display}: namespace {ns} {problem}; not touching it")

    def _routers_follow_mtu(self, bridge: str, mtu: int, snap: _host.Snapshot) -> None:
        """The network owns its MTU: our routers' legs on it follow in the same change,
        both ends (the router's own update would otherwise only come with the next plan)."""
        link = snap.links.get(bridge)
        if link is None:
            return
        for leg in snap.ports(bridge):
            mark = leg.mark
            if (mark is None or mark.home != self.d.home or mark.key.kind != "Router" or leg.mtu == mtu
                    or not leg.name.startswith(("rr-", "rg-"))):
                continue
            _host.set_port(leg.name, bridge, mtu, None)
            inside = ("qr-" if leg.name.startswith("rr-") else "qg-") + leg.name[3:]
            try:
                with _host.Namespace(_names.router_namespace(mark.key)) as ns:
                    ns.set_link(inside, mtu=mtu)
            except NotFound:
                pass  # the router is being made again or removed: its own change sets it

    def _free_zone(self, bridge: str) -> int:
        """A conntrack zone no other network of ours has; the first candidate comes from
        the bridge's hash, so installations sharing a kernel rarely pick the same."""
        used = {int(d.get("zone") or 0) for d in self.d.sidecars.all(NETWORKS).values()}
        start = int(_names.net_hash(bridge), 16) % (ZONES - 1)
        for step in range(ZONES - 1):
            zone = 1 + (start + step) % (ZONES - 1)
            if zone not in used:
                return zone
        raise PermanentError("no free conntrack zone left")

    def _ensure_segment(self, key: Key, bridge: str, spec: NetworkSpec, mtu: int, alias: str,
                        uplink: str | None, old_uplink: str | None, snap: _host.Snapshot,
                        half_made: bool = False) -> None:
        """The bridge's way out: a VXLAN device, a VLAN device on the uplink, or the uplink."""
        if spec.type in ("vxlan", "vlan"):
            name = _names.vxlan_device(bridge) if spec.type == "vxlan" else _names.vlan_device(bridge)
            dev = snap.links.get(name)
            if dev is not None:
                problem = self.d.foreign(dev.alias, key, half_made)
                if problem:
                    raise Conflict(f"{key.display}: device {name} {problem}; not touching it")
                same = (dev.data.get("IFLA_VXLAN_ID") == spec.vni
                        and dev.data.get("IFLA_VXLAN_PORT") == self.settings.vxlan_port
                        if spec.type == "vxlan" else dev.data.get("IFLA_VLAN_ID") == spec.vlanId)
                if not same:  # ids cannot change in place: make it again
                    _host.delete_link(name)
                    dev = None
            if dev is None:
                if spec.type == "vxlan":
                    assert spec.vni is not None
                    _host.add_vxlan(name, spec.vni, self.settings.vxlan_port, self.settings.vxlan_local, mtu,
                                    alias, bridge)
                else:
                    assert uplink is not None and spec.vlanId is not None
                    _host.add_vlan(name, uplink, spec.vlanId, mtu, alias, bridge)
            else:
                _host.set_port(name, bridge, mtu, alias)
            if spec.type == "vxlan":
                for peer in self.settings.vxlan_peers:
                    _host.fdb_append(name, str(IPv4Address(peer)))
        if old_uplink and old_uplink != uplink:
            self._release_uplink(old_uplink, bridge)
        if spec.type == "flat" and uplink:
            dev = snap.links.get(uplink)
            if dev is None:
                raise PermanentError(f"{key.display}: uplink {uplink} does not exist on this host")
            bridge_link = _host.dump().links.get(bridge)
            if bridge_link is None or dev.master != bridge_link.index:
                _host.set_port(uplink, bridge, dev.mtu, None)

    def _release_uplink(self, uplink: str, bridge: str) -> None:
        snap = _host.dump()
        dev, br = snap.links.get(uplink), snap.links.get(bridge)
        if dev is not None and br is not None and dev.master == br.index:
            _host.set_nomaster(uplink)

    def _ensure_dhcp(self, key: Key, bridge: str, spec: NetworkSpec, ports: list[_nft.Port], alias: str,
                     snap: _host.Snapshot, half_made: bool = False) -> None:
        """The DHCP namespace, one leg and one dnsmasq per subnet with DHCP; what is no
        longer wanted (a subnet removed, DHCP turned off) is stopped and removed."""
        configs = self.dhcp_configs(key, bridge, spec)
        ns = _names.dhcp_namespace(bridge)
        base = self.dhcp_dir(bridge)
        wanted_dirs = {c.directory.name for c in configs}
        wanted_legs = {_names.dhcp_legs(bridge, c.cidr)[0] for c in configs}
        if base.is_dir():
            for folder in sorted(base.iterdir()):
                if folder.is_dir() and folder.name not in wanted_dirs:
                    _stop_in(folder, self.settings.dnsmasq, self.d.sleep, self.d.clock)
                    shutil.rmtree(folder, ignore_errors=True)
        for link in snap.links.values():
            if link.name.startswith("rd-") and link.name not in wanted_legs and self.d.owns(link.alias, key):
                _host.delete_link(link.name)
        if not configs:
            if ns in snap.namespaces:
                self._remove_namespace(ns, key)
            shutil.rmtree(base, ignore_errors=True)
            return
        blocked = _dnsmasq.unreachable_parent(self.settings.state_dir)
        if blocked is not None:
            raise PermanentError(
                f"dnsmasq runs as user nobody and cannot reach its files: {blocked} is not "
                "traversable by others (chmod o+x it, or choose another netlink state dir)")
        _dnsmasq.make_dirs(base)
        created = _host.create_namespace(ns)
        if created:
            _host.namespace_sysctls(ns, forwarding=False)
        mtu = default_mtu(spec)
        with _host.Namespace(ns) as inside:
            links = inside.links()
            if not created:
                lo = links.get("lo")
                mark = _names.parse_alias(lo.alias if lo else None)
                if mark is not None and (mark.home != self.d.home or mark.key != key):
                    raise Conflict(f"{key.display}: namespace {ns} belongs to someone else; not touching it")
            inside.set_link("lo", alias=alias)
            for config in configs:
                host_leg, inner = _names.dhcp_legs(bridge, config.cidr)
                current = snap.links.get(host_leg)
                if current is not None and not self.d.owns(current.alias, key, half_made):
                    problem = self.d.foreign(current.alias, key, half_made)
                    raise Conflict(f"{key.display}: device {host_leg} {problem}; not touching it")
                if current is None or inner not in links:
                    if current is not None:
                        _host.delete_link(host_leg)
                    _host.add_veth(host_leg, inner, ns, mtu)
                    faults.point("netlink.dhcp-leg-unmarked")
                _host.set_port(host_leg, bridge, mtu, alias)
                inside.set_link(inner, mtu=mtu, alias=alias, address=_names.leg_mac(inner))
                inside.set_addresses(inner, [f"{config.server}/{config.cidr.prefixlen}"])
        for config in configs:
            _dnsmasq.make_dirs(config.directory)
            changed = _dnsmasq.write_files(config.files(ports))
            process = _dnsmasq.running(config)
            if process is not None and not _dnsmasq.up_to_date(config, process):
                _dnsmasq.stop(process.pid, self.d.sleep, self.d.clock)
                process = None
            if process is None:
                _dnsmasq.start(config)
                faults.point("netlink.dnsmasq-started")
            elif changed:
                _dnsmasq.reload(process.pid)

    def _remove_namespace(self, ns: str, key: Key) -> None:
        """Remove a DHCP namespace of ours: its `lo` carries our mark (or none, when a
        crash came between creating and marking it; the name holds our hash)."""
        if _host.namespace_stub(ns):
            _host.remove_namespace(ns)  # only its mount point: nothing of anyone's is in it
            return
        try:
            with _host.Namespace(ns) as inside:
                lo = inside.links().get("lo")
        except NotFound:
            return
        mark = _names.parse_alias(lo.alias if lo else None)
        if mark is not None and (mark.home != self.d.home or mark.key != key):
            raise Conflict(f"{key.display}: namespace {ns} belongs to someone else; not touching it")
        _host.remove_namespace(ns)

    def _ensure_rules(self, bridge: str, zone: int, ports: list[_nft.Port], old: Mapping[str, Any],
                      recorded: Mapping[str, str]) -> None:
        """Both tables in one transaction (call under the lock)."""
        inet = _nft.network_inet(bridge, zone, ports)
        br = _nft.network_bridge(bridge, ports)
        before_inet = self.d.nft.list_table(_nft.INET, self.d.table)
        before_bridge = self.d.nft.list_table(_nft.BRIDGE, self.d.table)
        self.d.check_table(_nft.INET, before_inet)
        self.d.check_table(_nft.BRIDGE, before_bridge)
        old_ports = [_nft.Port.from_dict(p) for p in (old.get("derived") or {}).get("ports") or []]
        owner = _names.net_hash(bridge)
        stale = set(_port_chains_of(before_inet, owner))
        for port in old_ports:
            stale.update(_names.port_chains(port.tap))
        stale_taps = {p.tap for p in old_ports}
        stale_taps.update(k for k, t in before_bridge.map_targets(_nft.PORTS_MAP).items()
                          if t == _names.network_chains(bridge)[2])
        self.d.nft.apply(_nft.ensure_commands(_nft.INET, self.d.table, before_inet, inet, recorded, stale)
                         + _nft.ensure_commands(_nft.BRIDGE, self.d.table, before_bridge, br, recorded,
                                                stale_elements=stale_taps))
        faults.point("netlink.network-after-rules")

    def _fingerprints(self, facts: "Facts", bridge: str) -> dict[str, str]:
        """comment -> fingerprint of this network's rules and of the base rules, as the
        kernel lists them now (observe compares against these)."""
        owner = _names.net_hash(bridge)
        out = facts.inet.fingerprints(owner)
        out.update(facts.bridge.fingerprints(owner))
        base = {r.comment for b in (*_nft.INET_BASE, *_nft.BRIDGE_BASE) for r in b.rules}
        for listing in (facts.inet, facts.bridge):
            out.update({c: r.fingerprint for c, r in listing.rules_of(_nft.BASE_OWNER).items() if c in base})
        return out

    # --- delete -----------------------------------------------------------------------

    def delete(self, observed: Observed) -> None:
        """Everything we made for the network, each piece after checking its mark."""
        key = observed.key
        bridge = observed.identity
        if bridge != _names.bridge(key):
            raise PermanentError(f"{key.display}: unexpected bridge name {bridge!r}")
        snap = _host.dump()
        link = snap.links.get(bridge)
        data = self.d.sidecars.read(NETWORKS, bridge)
        half_made = data is not None  # see ensure: unmarked devices with our names are ours
        if link is not None:
            problem = "is not a bridge" if link.kind != "bridge" else self.d.foreign(link.alias, key, half_made)
            if problem:
                raise Conflict(f"{key.display}: {bridge} {problem}; not touching it")
        base = self.dhcp_dir(bridge)
        if base.is_dir():
            for folder in sorted(base.iterdir()):
                if folder.is_dir():
                    _stop_in(folder, self.settings.dnsmasq, self.d.sleep, self.d.clock)
        ns = _names.dhcp_namespace(bridge)
        if ns in snap.namespaces:
            self._remove_namespace(ns, key)
        parts = {_names.vxlan_device(bridge), _names.vlan_device(bridge)}
        if data is not None:
            parts.update(_names.dhcp_legs(bridge, s.get("cidr", ""))[0]
                         for s in (data.get("spec") or {}).get("subnets") or [])
        for dev in snap.links.values():
            if dev.name != bridge and (self.d.owns(dev.alias, key)
                                       or (dev.name in parts and self.d.owns(dev.alias, key, half_made))):
                _host.delete_link(dev.name)  # VXLAN, VLAN, DHCP legs
        data = data or {}
        for uplink in {data.get("uplink"), self.uplink(key)} - {None}:
            self._release_uplink(str(uplink), bridge)
        if link is not None:
            _host.delete_link(bridge)
        faults.point("netlink.network-after-bridge-deleted")
        with self.d.lock:
            self._remove_rules(bridge)
            shutil.rmtree(base, ignore_errors=True)
            self.d.drop_tables_if_unused(leaving=(NETWORKS, bridge))
            self.d.sidecars.remove(NETWORKS, bridge)  # last: until then, the next run finds it

    def _remove_rules(self, bridge: str) -> None:
        owner = _names.net_hash(bridge)
        in_chain, out_chain, spoof = _names.network_chains(bridge)
        inet = self.d.nft.list_table(_nft.INET, self.d.table)
        chains = [in_chain, out_chain]
        chains += _port_chains_of(inet, owner)
        self.d.nft.apply(_nft.remove_commands(_nft.INET, self.d.table, inet, owner, chains))
        br = self.d.nft.list_table(_nft.BRIDGE, self.d.table)
        taps = [k for k, t in br.map_targets(_nft.PORTS_MAP).items() if t == spoof]
        self.d.nft.apply(_nft.remove_commands(_nft.BRIDGE, self.d.table, br, owner, [spoof], taps))
        self._remove_unclaimed_group_chains()

    def _remove_unclaimed_group_chains(self) -> None:
        """Empty group chains a network made for a group never realised, once nothing
        jumps to them any more."""
        inet = self.d.nft.list_table(_nft.INET, self.d.table)
        groups = set(self.d.sidecars.all(GROUPS))
        unclaimed = [c for c, rules in inet.chains.items()
                     if c.startswith("sg-") and not rules and c.rsplit("-", 1)[0] not in groups]
        jumped = {stmt["jump"].get("target") for _chain, listed in inet.jumps_to(unclaimed)
                  for stmt in listed.expr or ()
                  if isinstance(stmt, dict) and isinstance(stmt.get("jump"), dict)}
        doomed = [c for c in unclaimed if c not in jumped]
        if doomed:
            self.d.nft.apply([{"delete": {"chain": {"family": _nft.INET, "table": self.d.table, "name": c}}}
                              for c in doomed])

    # --- adopt ------------------------------------------------------------------------

    def adopt(self, host_name: str, target: Target) -> Observed:
        """Mark an unmarked bridge as this network's; record what the kernel has (its
        type, VNI, MTU) and change nothing else: the next apply adds what is missing."""
        key = target.key
        bridge = _names.bridge(key)
        if host_name != bridge:
            raise PermanentError(f"{key.display} must be bridge {bridge}, not {host_name!r}")
        snap = _host.dump()
        link = snap.links.get(bridge)
        if link is None:
            raise NotFound(f"bridge {bridge} does not exist")
        if link.kind != "bridge":
            raise PermanentError(f"{bridge} is not a bridge")
        if link.mark is not None:
            raise Conflict(f"bridge {bridge} already carries a reconciler mark")
        facts = self._without_sidecar(self.d.facts(), link, _names.AliasMark(self.d.home, key, ""))
        spec = {**dict(target.spec), **{k: facts.spec[k] for k in ("type", "vni", "vlanId", "mtu")},
                "subnets": []}
        with self.d.lock:
            sidecar = {"mark": target.mark.to_dict(), "spec": spec, "derived": {},
                       "zone": self._free_zone(bridge), "uplink": None, "rules": {}}
            self.d.sidecars.write(NETWORKS, bridge, sidecar)
        _host.set_alias(bridge, self.d.alias(target))
        return self.observe_one(bridge)


def _port_chains_of(listing: _nft.Listing, owner: str) -> list[str]:
    """The port chains (pi-/po-) holding rules of network `owner`."""
    return [c for c, rules in listing.chains.items()
            if c.startswith(("pi-", "po-")) and any(_names.comment_owner(r.comment) == owner for r in rules)]


def _stop_in(folder: Path, program: str, sleep: Any, clock: Any) -> None:
    """Stop the dnsmasq whose files are in `folder`, if it is running and ours."""
    pid = _dnsmasq.read_pid(folder / "pid")
    if pid is None or not is_alive(pid):
        return
    argv = _dnsmasq.cmdline(pid) or []
    if argv and f"--dhcp-hostsfile={folder / 'hosts'}" in argv:
        _dnsmasq.stop(pid, sleep, clock)
