"""The netlink driver: Network, Router and SecurityGroup on Linux, as Neutron's Linux
bridge, DHCP and L3 agents realise them (pyroute2 for devices and namespaces, dnsmasq
for DHCP and DNS, nftables for security groups and anti-spoofing).

What is where (H, R, G: hashes of the resource's key; see `_names`)::

    Network   bridge rc-H (+ VXLAN rv-H, VLAN rl-H or a flat uplink), DHCP namespace
              rc-dhcp-H with one leg and one dnsmasq per subnet, nftables chains
              in-H/out-H/spoof-H and the port chains, sidecar networks/rc-H.json
    Router    namespace rc-R with a leg per network (the subnets' gateways), an
              external leg with SNAT, its own nftables table; sidecar routers/rc-R.json
    SecurityGroup  chains sg-G-in/sg-G-out in our inet table; sidecar groups/sg-G.json

Observe is one netlink dump of the host namespace, one namespace listing, one `nft -j
list table` per family, the sidecars and dnsmasq's pid files; router and DHCP namespaces
are not entered. Create and update are the same idempotent "ensure", which also repairs
drift (a deleted bridge, rule or dnsmasq). Only objects carrying our mark are changed or
deleted; a bridge or namespace in the way without it is reported and left alone.
"""

from __future__ import annotations

import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import structlog

from reconciler.drivers.netlink import _dnsmasq, _host, _names, _nft
from reconciler.drivers.netlink._sidecar import GROUPS, NETWORKS, ROUTERS, Sidecars
from reconciler.drivers.netlink._nftwatch import NftWatch
from reconciler.drivers.netlink._watch import NetlinkWatch, start_watch
from reconciler.errors import Conflict, PermanentError
from reconciler.models import Key
from reconciler.state import FieldDiff, HostEvent, Observation, Observed, Target

VLAN_UNSUPPORTED = _host.VLAN_UNSUPPORTED
log = structlog.get_logger("reconciler.drivers.netlink")


@dataclass(frozen=True, slots=True)
class NetlinkSettings:
    state_dir: Path
    home: str
    uplinks: Mapping[str, str] = field(default_factory=dict)
    vxlan_local: str | None = None
    vxlan_peers: tuple[str, ...] = ()
    vxlan_port: int = 4789
    dnsmasq: str = "dnsmasq"
    lease_seconds: int = 3600
    max_parallel: int = 8


@dataclass(slots=True)
class Facts:
    """One read of everything the driver owns (see the module docstring)."""

    snap: _host.Snapshot
    inet: _nft.Listing
    bridge: _nft.Listing
    networks: dict[str, dict[str, Any]]
    routers: dict[str, dict[str, Any]]
    groups: dict[str, dict[str, Any]]


class NetlinkDriver:
    """Realises Network, Router and SecurityGroup on this host (see the module docstring)."""

    name = "netlink"
    kinds = ("Network", "Router", "SecurityGroup")

    def __init__(self, settings: NetlinkSettings, *, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic):
        from reconciler.drivers.netlink._group import Groups
        from reconciler.drivers.netlink._network import Networks
        from reconciler.drivers.netlink._router import Routers

        self.settings = settings
        self.max_parallel = settings.max_parallel
        self.home = _names.check_home(settings.home)
        self.table = _names.table(settings.home)
        self.sleep = sleep
        self.clock = clock
        self.nft = _nft.Nft()
        self.sidecars = Sidecars(settings.state_dir)
        #: nftables transactions (read, compute, apply) and sidecar writes, one at a time
        self.lock = threading.RLock()
        self._vlan: bool | None = None
        #: our two tables as the last read of the host found them (for `problems`)
        self._tables: tuple[_nft.Listing, _nft.Listing] | None = None
        self._snap: _host.Snapshot | None = None
        self.networks = Networks(self)
        self.routers = Routers(self)
        self.groups = Groups(self)

    # --- reading ---------------------------------------------------------------------

    def facts(self, sidecars: bool = True) -> Facts:
        """The host as this driver sees it; `sidecars=False` for one object's result after
        a change (its own sidecar is at hand: reading every other one would make applying
        N objects cost N² file reads)."""
        facts = Facts(
            snap=_host.dump(with_fdb=bool(self.settings.vxlan_peers)),
            inet=self.nft.list_table(_nft.INET, self.table),
            bridge=self.nft.list_table(_nft.BRIDGE, self.table),
            networks=self.sidecars.all(NETWORKS) if sidecars else {},
            routers=self.sidecars.all(ROUTERS) if sidecars else {},
            groups=self.sidecars.all(GROUPS) if sidecars else {},
        )
        self._tables = (facts.inet, facts.bridge)
        self._snap = facts.snap
        return facts

    def observe(self) -> Observation:
        facts = self.facts()
        result = Observation()
        self.networks.observe(facts, result)
        self.routers.observe(facts, result)
        self.groups.observe(facts, result)
        return result

    def host_name(self, key: Key) -> str:
        if key.kind == "SecurityGroup":
            return _names.group_prefix(key)
        if key.kind == "Router":
            return _names.router_namespace(key)
        return _names.bridge(key)

    def describe(self) -> dict[str, str]:
        """For `reconciler status`: our table, VLAN support, the dnsmasq in use."""
        return {
            "table": f"inet {self.table}",
            "vlan": "available" if self.vlan_supported() else "unavailable (no 8021q in this kernel)",
            "dnsmasq": f"{shutil.which(self.settings.dnsmasq) or self.settings.dnsmasq} "
                       f"({_dnsmasq.version(self.settings.dnsmasq)})",
        }

    def problems(self, kind: str, tenant: str, name: str, spec: Mapping[str, Any]
                 ) -> list[tuple[tuple[str | int, ...], str]]:
        """What this host cannot realise, for `plan` to say before anything is changed."""
        out: list[tuple[tuple[str | int, ...], str]] = []
        if kind in ("Network", "SecurityGroup"):
            out.extend(((), message) for message in self.table_conflicts())
        if kind in ("Network", "Router"):
            out.extend(((), message) for message in self.legs_in_the_way(Key(kind, tenant, name), spec))
        if kind != "Network":
            return out
        kind_of = spec.get("type", "vxlan")
        uplink = self.settings.uplinks.get(f"{tenant}/{name}")
        if kind_of == "vlan":
            if not self.vlan_supported():
                out.append((("type",), VLAN_UNSUPPORTED))
            if not uplink:
                out.append((("type",), f"type vlan needs an uplink: set netlink.uplinks[\"{tenant}/{name}\"] "
                                       "in the host config"))
        if uplink and kind_of in ("flat", "vlan") and not Path("/sys/class/net", uplink).exists():
            out.append((("type",), f"uplink {uplink} (host config netlink.uplinks) does not exist on "
                                   "this host"))
        return out

    def watch(self, notify: Callable[[HostEvent], None]) -> "_Watches":
        """Report changes to our devices in the host namespace (see `_watch`) and to our
        nftables tables (see `_nftwatch`) as they happen: from daemon threads, until the
        returned watch's `close()`."""
        links = start_watch(self.name, notify)
        try:
            rules = NftWatch(self.name, self.table, notify, self.nft.program).start()
        except BaseException:
            links.close()
            raise
        return _Watches((links, rules))

    def vlan_supported(self) -> bool:
        if self._vlan is None:
            self._vlan = _host.has_8021q()
        return self._vlan

    # --- acting ----------------------------------------------------------------------

    def create(self, target: Target) -> Observed:
        return self._kind(target.key).ensure(target)

    def update(self, target: Target, observed: Observed, diffs: Sequence[FieldDiff]) -> Observed:
        # one idempotent ensure: it compares with the host itself (and repairs drift)
        return self._kind(target.key).ensure(target)

    def delete(self, observed: Observed) -> None:
        self._kind(observed.key).delete(observed)

    def orphan(self, observed: Observed) -> Observed:
        raise PermanentError(f"{observed.key.kind} holds no data: it is deleted, never orphaned")

    def adopt(self, host_name: str, target: Target) -> Observed:
        """Put our mark on an existing unmarked bridge (``reconciler import``)."""
        if target.key.kind != "Network":
            raise PermanentError(f"{target.key.kind} cannot be imported by the netlink driver: "
                                 "there is no host object to adopt")
        return self.networks.adopt(host_name, target)

    def _kind(self, key: Key) -> Any:
        if key.kind == "Network":
            return self.networks
        if key.kind == "Router":
            return self.routers
        if key.kind == "SecurityGroup":
            return self.groups
        raise PermanentError(f"the netlink driver does not realise {key.kind}")

    # --- shared by the kinds ---------------------------------------------------------

    def alias(self, target: Target) -> str:
        return _names.format_alias(self.home, target.key, target.mark.spec_hash)

    def owns(self, alias: str | None, key: Key, half_made: bool = False) -> bool:
        """Whether a device carrying `alias` is `key`'s. `half_made`: our sidecar of `key`
        exists, and it is written before its devices are made, so a device with one of
        their names and no alias at all is ours too: a run killed between creating and
        marking it (the kernel ignores an alias given with the creation)."""
        mark = _names.parse_alias(alias)
        if mark is None:
            return half_made and not alias
        return mark.home == self.home and mark.key == key

    def foreign(self, alias: str | None, key: Key, half_made: bool = False) -> str | None:
        """Why a device carrying `alias` is not `key`'s (None: it is; `half_made` as in
        `owns`)."""
        mark = _names.parse_alias(alias)
        if mark is None:
            return None if half_made and not alias else "has no reconciler mark"
        if mark.home != self.home:
            return f"is managed by another reconciler installation (home {mark.home})"
        if mark.key != key:
            return f"belongs to {mark.key.display}"
        return None

    def _last_read(self) -> tuple[_host.Snapshot, _nft.Listing, _nft.Listing] | None:
        """The host as the last observe found it (plan asks `problems` right after it);
        None before any."""
        if self._snap is None or self._tables is None:
            return None
        return self._snap, self._tables[0], self._tables[1]

    def table_conflicts(self) -> list[str]:
        """Why our nftables tables cannot be used: a table with their name that someone
        else made (every network and group needs them), as the last observe found them."""
        seen = self._last_read()
        if seen is None:
            return []
        _snap, inet, bridge = seen
        out = []
        for family, listing in ((_nft.INET, inet), (_nft.BRIDGE, bridge)):
            why = _nft.foreign_table(listing, family)
            if why:
                out.append(f"conflict: nftables table {family} {self.table} {why}; it is left untouched. "
                           "Remove or rename it on the host: every network and security group needs it")
        return out

    def legs_in_the_way(self, key: Key, spec: Mapping[str, Any]) -> list[str]:
        """The veths a network (one per DHCP subnet) or a router (one per network) will
        have, where the last observe found a device of that name without the resource's
        mark: their names hash what they join, so observe cannot tell whose way they are
        in; plan can."""
        from reconciler.drivers.netlink._router import external_key
        from reconciler.models.network import NetworkSpec

        seen = self._last_read()
        if seen is None:
            return []
        snap = seen[0]
        wanted: list[tuple[str, str]] = []
        # devices our sidecar names were made by us, maybe killed before marking them
        # (see `owns`): the network's sidecar, written first; the legs the router's lists
        half_made: set[str] = set()
        try:
            if key.kind == "Network":
                bridge = _names.bridge(key)
                if self.sidecars.read(NETWORKS, bridge) is not None:
                    half_made.update(_names.dhcp_legs(bridge, s.get("cidr", ""))[0]
                                     for s in spec.get("subnets") or [] if isinstance(s, dict))
                for config in self.networks.dhcp_configs(key, bridge, NetworkSpec.model_validate(dict(spec))):
                    wanted.append((_names.dhcp_legs(bridge, config.cidr)[0], f"DHCP leg of {config.cidr}"))
            else:
                half_made.update((self.sidecars.read(ROUTERS, _names.router_namespace(key)) or {}).get("legs") or {})
                for net in spec.get("networks") or []:
                    wanted.append((_names.router_leg(key, Key("Network", key.tenant, net))[0], f"leg on {net}"))
                if spec.get("external"):
                    ext = external_key(key.tenant, spec["external"])
                    wanted.append((_names.gateway_leg(key, ext)[0], f"leg on {ext.tenant}/{ext.name}"))
        except (ValueError, TypeError, PermanentError):
            return []  # the model's own checks say what is wrong with the spec
        out = []
        for name, what in wanted:
            dev = snap.links.get(name)
            why = self.foreign(dev.alias, key, name in half_made) if dev is not None else None
            if why:
                out.append(f"conflict: device {name} (the {what}) {why}; it is left untouched. Remove or rename "
                           "it on the host")
        return out

    def check_table(self, family: str, listing: _nft.Listing) -> None:
        """Refuse to change a table with our name that someone else made."""
        why = _nft.foreign_table(listing, family)
        if why:
            raise Conflict(f"nftables table {family} {self.table} {why}; not touching it")

    def drop_tables_if_unused(self, leaving: tuple[str, str] | None = None) -> None:
        """Our tables go when no network or group of ours is left (call under the lock),
        unless they hold something that is not ours (a chain or rule someone added).
        `leaving` (folder, name): the sidecar of the object being deleted, which its
        caller removes after this: a delete killed in between still finds its object, so
        the next one drops the tables (removed first, nothing would ever drop them)."""
        if not self.sidecars.any(NETWORKS, GROUPS, but=leaving):
            for family in (_nft.INET, _nft.BRIDGE):
                listing = self.nft.list_table(family, self.table)
                if not listing.exists:
                    continue
                why = _nft.foreign_table(listing, family)
                foreign = [why] if why else _nft.foreign_content(listing, family)
                if foreign:
                    log.warning("nftables table kept: it holds what is not ours", table=f"{family} {self.table}",
                                foreign=", ".join(foreign[:5]))
                    continue
                self.nft.delete_table(family, self.table)



class _Watches:
    """Several watches closed as one."""

    def __init__(self, watches: tuple[NetlinkWatch | NftWatch, ...]):
        self.watches = watches

    def close(self) -> None:
        for w in self.watches:
            w.close()
