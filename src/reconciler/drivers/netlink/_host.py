"""The kernel boundary: pyroute2 (netlink), namespaces and the external commands (nft,
dnsmasq, sysctl), with their errors translated into ours here and nowhere else.

Only this package imports pyroute2. Netlink's errno decides the kind of error: EEXIST is a
Conflict (something is in the way), ENODEV/ENOENT NotFound, EBUSY/EAGAIN/ENOBUFS
transient (retry), EPERM/EACCES permanent with a hint to run as root, anything else
permanent. Every call opens its own socket (about 0.1 ms; 8 ms inside a namespace), so
changes of different networks run in parallel threads without sharing one.
"""

from __future__ import annotations

import errno
import os
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from reconciler import faults
from reconciler.drivers.netlink import _names
from reconciler.errors import Conflict, NotFound, PermanentError, TransientError

try:  # pyroute2 is pure Python; the driver says so clearly when it is missing
    from pyroute2 import IPRoute, NetlinkError, netns
except ImportError:  # pragma: no cover - only on machines without the dependency
    IPRoute = None  # type: ignore[assignment,misc]
    NetlinkError = OSError  # type: ignore[assignment,misc]
    netns = None  # type: ignore[assignment]

_TRANSIENT = {errno.EBUSY, errno.EAGAIN, errno.ENOBUFS, errno.EINTR, errno.ETIMEDOUT}
_NOT_FOUND = {errno.ENODEV, errno.ENOENT, errno.ESRCH}
_DENIED = {errno.EPERM, errno.EACCES}
ZERO_MAC = "00:00:00:00:00:00"
VLAN_UNSUPPORTED = ("type vlan needs VLAN (8021q) support, which this host's kernel lacks; "
                    "use vxlan or flat")
COMMAND_TIMEOUT_S = 30.0


def translate(exc: BaseException, doing: str) -> BaseException:
    """Our error for a netlink or OS error raised while `doing` something."""
    if isinstance(exc, NetlinkError):
        code = exc.code
        message = os.strerror(code) if code else str(exc)
    elif isinstance(exc, OSError):
        code = exc.errno or 0
        message = exc.strerror or str(exc)
    else:
        return exc
    text = f"{doing}: {message}"
    if code == errno.EEXIST:
        return Conflict(text)
    if code in _NOT_FOUND:
        return NotFound(text)
    if code in _TRANSIENT:
        return TransientError(text)
    if code in _DENIED:
        return PermanentError(f"{text} (run as root: the netlink driver changes the host's network)")
    return PermanentError(text)


@contextmanager
def translated(doing: str) -> Iterator[None]:
    """Run a block of netlink or namespace calls; re-raise their errors as ours."""
    try:
        yield
    except (NetlinkError, OSError) as exc:
        raise translate(exc, doing) from None


def _ipr(namespace: str | None = None) -> Any:
    if IPRoute is None:
        raise PermanentError("pyroute2 is not installed: run `make setup`")
    if namespace is None:
        return IPRoute()
    # flags=0: never create the namespace by opening it (pyroute2's default does)
    return IPRoute(netns=_names.check_netns(namespace), flags=0)


# --- reading --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Link:
    """One network device as the host-namespace dump shows it."""

    index: int
    name: str
    kind: str | None  # bridge, vxlan, vlan, veth, tun... (None: a physical device)
    alias: str | None
    master: int | None
    mtu: int
    up: bool
    #: set on a veth whose peer lives in another namespace
    peer_netnsid: int | None = None
    data: dict[str, Any] = field(default_factory=dict)  # IFLA_INFO_DATA, decoded

    @property
    def mark(self) -> _names.AliasMark | None:
        return _names.parse_alias(self.alias)


@dataclass(slots=True)
class Snapshot:
    """One read of the host namespace: links, addresses, routes (and FDB when asked)."""

    links: dict[str, Link] = field(default_factory=dict)
    by_index: dict[int, Link] = field(default_factory=dict)
    addresses: dict[int, list[str]] = field(default_factory=dict)  # index -> ["a.b.c.d/p", ...]
    routes: list[dict[str, Any]] = field(default_factory=list)
    fdb: dict[int, set[str]] = field(default_factory=dict)  # index -> flood destinations
    namespaces: frozenset[str] = frozenset()

    def ports(self, bridge: str) -> list[Link]:
        """The devices enslaved to `bridge`."""
        br = self.links.get(bridge)
        if br is None:
            return []
        return [link for link in self.links.values() if link.master == br.index]


def _decode_link(msg: Any) -> Link:
    info = msg.get("IFLA_LINKINFO")
    kind = info.get("IFLA_INFO_KIND") if info else None
    data: dict[str, Any] = {}
    if info:
        raw = info.get("IFLA_INFO_DATA")
        if raw is not None and hasattr(raw, "get"):
            for name in ("IFLA_VXLAN_ID", "IFLA_VXLAN_PORT", "IFLA_VXLAN_LEARNING", "IFLA_VXLAN_LOCAL",
                         "IFLA_VLAN_ID", "IFLA_BR_NF_CALL_IPTABLES"):
                value = raw.get(name)
                if value is not None:
                    data[name] = value
    return Link(
        index=msg["index"],
        name=msg.get("IFLA_IFNAME"),
        kind=kind,
        alias=msg.get("IFLA_IFALIAS"),
        master=msg.get("IFLA_MASTER"),
        mtu=msg.get("IFLA_MTU") or 0,
        up=bool(msg["flags"] & 1),
        peer_netnsid=msg.get("IFLA_LINK_NETNSID"),
        data=data,
    )


def dump(with_fdb: bool = False) -> Snapshot:
    """The host namespace in one go: about 3 ms for a few hundred devices."""
    snap = Snapshot()
    with translated("reading the host's network devices"), _ipr() as ipr:
        for msg in ipr.get_links():
            link = _decode_link(msg)
            snap.links[link.name] = link
            snap.by_index[link.index] = link
        for msg in ipr.get_addr():
            address = msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS")
            if address:
                snap.addresses.setdefault(msg["index"], []).append(f"{address}/{msg['prefixlen']}")
        for msg in ipr.get_routes():
            snap.routes.append({"dst": msg.get("RTA_DST"), "dst_len": msg["dst_len"], "oif": msg.get("RTA_OIF"),
                                "gateway": msg.get("RTA_GATEWAY")})
        if with_fdb:
            for msg in ipr.fdb("dump"):
                if msg.get("NDA_LLADDR") == ZERO_MAC and msg.get("NDA_DST"):
                    snap.fdb.setdefault(msg["ifindex"], set()).add(msg.get("NDA_DST"))
    snap.namespaces = frozenset(list_namespaces())
    return snap


def list_namespaces() -> list[str]:
    if netns is None:
        raise PermanentError("pyroute2 is not installed: run `make setup`")
    with translated("listing network namespaces"):
        return list(netns.listnetns())


# --- host namespace changes ------------------------------------------------------------


def _index(ipr: Any, name: str) -> int:
    found = ipr.link_lookup(ifname=name)
    if not found:
        raise NotFound(f"device {name} does not exist")
    return found[0]


def add_bridge(name: str, mtu: int, alias: str) -> None:
    """A bridge with conntrack for its IPv4 traffic (nf_call_iptables, per bridge: the
    inet table's stateful rules see bridged packets), no IPv6 address of its own, and no
    ARP answers for the host's addresses."""
    _names.check_ifname(name)
    with translated(f"creating bridge {name}"), _ipr() as ipr:
        ipr.link("add", ifname=name, kind="bridge", br_nf_call_iptables=1, mtu=mtu)
    faults.point("netlink.bridge-unmarked")  # made, not marked yet (see NetlinkDriver.owns)
    disable_ipv6(name)
    ignore_arp(name)
    with translated(f"configuring bridge {name}"), _ipr() as ipr:
        ipr.link("set", index=_index(ipr, name), ifalias=alias, state="up")


def configure_bridge(name: str, mtu: int, alias: str) -> None:
    """Bring an existing bridge of ours to what `add_bridge` makes (repairs drift)."""
    disable_ipv6(name)
    ignore_arp(name)
    with translated(f"configuring bridge {name}"), _ipr() as ipr:
        index = _index(ipr, name)
        ipr.link("set", index=index, kind="bridge", br_nf_call_iptables=1)
        ipr.link("set", index=index, mtu=mtu, ifalias=alias, state="up")


def add_vxlan(name: str, vni: int, port: int, local: str | None, mtu: int, alias: str, master: str) -> None:
    """A VXLAN device without learning (the FDB says where to flood), on `master`."""
    _names.check_ifname(name)
    options: dict[str, Any] = {"vxlan_id": vni, "vxlan_port": port, "vxlan_learning": 0}
    if local:
        options["vxlan_local"] = local
    with translated(f"creating VXLAN device {name}"), _ipr() as ipr:
        ipr.link("add", ifname=name, kind="vxlan", mtu=mtu, **options)
    faults.point("netlink.vxlan-unmarked")
    disable_ipv6(name)
    set_port(name, master, mtu, alias)


def add_vlan(name: str, uplink: str, vlan_id: int, mtu: int, alias: str, master: str) -> None:
    _names.check_ifname(name)
    with translated(f"creating VLAN device {name} on {uplink}"), _ipr() as ipr:
        ipr.link("add", ifname=name, kind="vlan", link=_index(ipr, _names.check_uplink(uplink)),
                 vlan_id=vlan_id, mtu=mtu)
    disable_ipv6(name)
    set_port(name, master, mtu, alias)


def add_veth(host: str, inside: str, namespace: str, mtu: int) -> None:
    """A veth pair with one end already in `namespace` (it never appears in ours), that
    end with its stable MAC (`_names.leg_mac`)."""
    _names.check_ifname(host)
    with translated(f"creating veth {host}"), _ipr() as ipr:
        ipr.link("add", ifname=host, kind="veth", mtu=mtu,
                 peer={"ifname": inside, "net_ns_fd": _names.check_netns(namespace), "mtu": mtu,
                       "address": _names.leg_mac(inside)})
    disable_ipv6(host)


def set_port(name: str, master: str, mtu: int, alias: str | None) -> None:
    """Enslave `name` to bridge `master`, with MTU, alias and link up."""
    with translated(f"attaching {name} to {master}"), _ipr() as ipr:
        index = _index(ipr, name)
        options: dict[str, Any] = {"master": _index(ipr, master), "mtu": mtu, "state": "up"}
        if alias is not None:
            options["ifalias"] = alias
        ipr.link("set", index=index, **options)


def set_nomaster(name: str) -> None:
    """Take a device (an uplink) out of its bridge; never deletes it."""
    try:
        with translated(f"detaching {name}"), _ipr() as ipr:
            ipr.link("set", index=_index(ipr, _names.check_uplink(name)), master=0)
    except NotFound:
        pass


def set_alias(name: str, alias: str) -> None:
    with translated(f"marking {name}"), _ipr() as ipr:
        ipr.link("set", index=_index(ipr, name), ifalias=alias)


def delete_link(name: str) -> None:
    """Delete a device; already gone is fine."""
    _names.check_ifname(name)
    try:
        with translated(f"deleting {name}"), _ipr() as ipr:
            ipr.link("del", index=_index(ipr, name))
    except NotFound:
        pass


def flush_addresses(name: str) -> None:
    """Remove every address from a device (our bridges hold none in the host namespace)."""
    with translated(f"removing addresses from {name}"), _ipr() as ipr:
        index = _index(ipr, name)
        for msg in ipr.get_addr(index=index):
            address = msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS")
            if address and not address.startswith("fe80:"):
                ipr.addr("del", index=index, address=address, prefixlen=msg["prefixlen"])


def fdb_append(name: str, destination: str) -> None:
    """Flood unknown destinations to `destination` too (VXLAN head-end replication)."""
    try:
        with translated(f"adding VXLAN peer {destination} to {name}"), _ipr() as ipr:
            ipr.fdb("append", ifindex=_index(ipr, name), lladdr=ZERO_MAC, dst=destination)
    except Conflict:
        pass  # already there


def disable_ipv6(name: str) -> None:
    """No IPv6 link-local address on our host-side devices: the host must not be reachable
    from tenant networks. A per-device setting (the host's global sysctls stay untouched)."""
    path = Path("/proc/sys/net/ipv6/conf") / _names.check_ifname(name) / "disable_ipv6"
    try:
        path.write_text("1\n")
    except FileNotFoundError:
        pass  # no IPv6 in this kernel, or the device just vanished
    except OSError as exc:
        raise translate(exc, f"disabling IPv6 on {name}") from None


def ignore_arp(name: str) -> None:
    """No ARP answers on a bridge of ours (arp_ignore 8, per device): by default Linux
    answers an ARP request for any of the host's addresses on any interface, so a tenant
    could find the host's addresses and MAC on its network (the inet table's input chain
    drops the packets that would follow)."""
    path = Path("/proc/sys/net/ipv4/conf") / _names.check_ifname(name) / "arp_ignore"
    try:
        path.write_text("8\n")
    except FileNotFoundError:
        pass  # the device just vanished
    except OSError as exc:
        raise translate(exc, f"turning off ARP answers on {name}") from None


# --- namespaces -----------------------------------------------------------------------


NETNS_DIR = Path("/run/netns")


def namespace_stub(name: str) -> bool:
    """Whether /run/netns/NAME is only the mount point that creating a namespace makes
    first (a creation, or a removal, killed half way): no namespace is bound to it, so
    nothing can be in it, and it can neither be entered nor created again as it is."""
    path = NETNS_DIR / _names.check_netns(name)
    try:
        return os.stat(path).st_dev == os.stat(NETNS_DIR).st_dev  # a bound one is on nsfs
    except OSError:
        return False


def create_namespace(name: str) -> bool:
    """Create `name`; False when it already existed. A stub (see `namespace_stub`) is
    made again."""
    if netns is None:
        raise PermanentError("pyroute2 is not installed: run `make setup`")
    if namespace_stub(name):
        remove_namespace(name)
    try:
        with translated(f"creating namespace {name}"):
            netns.create(_names.check_netns(name))
    except Conflict:
        return False
    return True


def remove_namespace(name: str) -> None:
    """Remove `name` (its devices go with it); already gone is fine."""
    if netns is None:
        raise PermanentError("pyroute2 is not installed: run `make setup`")
    try:
        with translated(f"removing namespace {name}"):
            netns.remove(_names.check_netns(name))
    except NotFound:
        pass


class Namespace:
    """Changes inside one namespace over one socket (opening one costs about 8 ms)."""

    def __init__(self, name: str):
        self.name = _names.check_netns(name)
        self._ipr: Any = None

    def __enter__(self) -> "Namespace":
        if namespace_stub(self.name):
            raise NotFound(f"namespace {self.name} is only a mount point (its creation or removal "
                           "was cut short): there is nothing in it")
        with translated(f"entering namespace {self.name}"):
            self._ipr = _ipr(self.name)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._ipr is not None:
            self._ipr.close()

    def links(self) -> dict[str, Link]:
        with translated(f"reading devices in {self.name}"):
            return {link.name: link for link in map(_decode_link, self._ipr.get_links())}

    def set_link(self, ifname: str, mtu: int | None = None, alias: str | None = None,
                 address: str | None = None) -> None:
        """Link up, with MTU, alias and MAC when given."""
        options: dict[str, Any] = {"state": "up"}
        if mtu is not None:
            options["mtu"] = mtu
        if alias is not None:
            options["ifalias"] = alias
        if address is not None:
            options["address"] = address
        with translated(f"configuring {ifname} in {self.name}"):
            self._ipr.link("set", index=_index(self._ipr, ifname), **options)

    def addresses(self, ifname: str) -> list[str]:
        with translated(f"reading addresses in {self.name}"):
            index = _index(self._ipr, ifname)
            return [f"{m.get('IFA_LOCAL') or m.get('IFA_ADDRESS')}/{m['prefixlen']}"
                    for m in self._ipr.get_addr(index=index, family=2)]

    def set_addresses(self, ifname: str, wanted: Sequence[str]) -> None:
        """Exactly these IPv4 addresses ("a.b.c.d/p") on `ifname`."""
        have = set(self.addresses(ifname))
        with translated(f"setting addresses of {ifname} in {self.name}"):
            index = _index(self._ipr, ifname)
            for cidr in sorted(have - set(wanted)):
                address, prefix = cidr.split("/")
                self._ipr.addr("del", index=index, address=address, prefixlen=int(prefix))
            for cidr in wanted:
                if cidr not in have:
                    address, prefix = cidr.split("/")
                    self._ipr.addr("add", index=index, address=address, prefixlen=int(prefix))

    def default_route(self, gateway: str | None, ifname: str | None) -> None:
        """The namespace's IPv4 default route via `gateway` (None: no default route)."""
        with translated(f"setting the default route in {self.name}"):
            if gateway is None or ifname is None:
                try:
                    self._ipr.route("del", dst="0.0.0.0/0")
                except NetlinkError as exc:
                    if exc.code not in (errno.ESRCH, errno.ENOENT):
                        raise
                return
            self._ipr.route("replace", dst="0.0.0.0/0", gateway=gateway, oif=_index(self._ipr, ifname))


# --- commands -------------------------------------------------------------------------


def run(argv: Sequence[str], doing: str, input: str | None = None,
        timeout: float = COMMAND_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """Run a program (an argument list, never a shell string); exit status is the
    caller's to judge. A missing program or a timeout are our errors."""
    try:
        return subprocess.run(list(argv), input=input, capture_output=True, text=True,
                              timeout=timeout, check=False)
    except FileNotFoundError:
        raise PermanentError(f"{doing}: {argv[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise TransientError(f"{doing}: {argv[0]} did not finish in {timeout:.0f} s") from None
    except OSError as exc:
        raise translate(exc, doing) from None


def first_lines(text: str, n: int = 4) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[:n]) or "(no message)"


def in_namespace(namespace: str | None, argv: Sequence[str]) -> list[str]:
    """`argv` run inside `namespace` (`ip netns exec`), or as is for the host namespace."""
    if namespace is None:
        return list(argv)
    return ["ip", "netns", "exec", _names.check_netns(namespace), *argv]


def namespace_sysctls(namespace: str, forwarding: bool) -> None:
    """Settings inside one of our namespaces (the host's own stay as they are): IPv4
    forwarding for a router; no IPv6 on the legs (tenant networks are IPv4, and nothing
    of ours should answer or send IPv6 there)."""
    settings = ["net.ipv4.ip_forward=1"] if forwarding else []
    if Path("/proc/sys/net/ipv6").exists():
        settings += ["net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"]
    if not settings:
        return
    result = run(in_namespace(namespace, ["sysctl", "-qw", *settings]), f"setting up namespace {namespace}")
    if result.returncode != 0:
        raise PermanentError(f"setting up namespace {namespace}: {first_lines(result.stderr)}")


# --- capabilities ---------------------------------------------------------------------


def has_8021q(release: str | None = None, modules: Path = Path("/lib/modules"),
              proc: Path = Path("/proc")) -> bool:
    """Whether this kernel can make VLAN devices, found without side effects (no module
    loading, no probe device): /proc/net/vlan exists when 8021q is loaded or built in;
    otherwise look for it among the kernel's modules."""
    if (proc / "net" / "vlan").exists():
        return True
    release = release or os.uname().release
    base = modules / release
    try:
        if "8021q" in (base / "modules.builtin").read_text():
            return True
    except OSError:
        pass
    for suffix in ("", ".xz", ".zst", ".gz"):
        if (base / "kernel/net/8021q" / f"8021q.ko{suffix}").exists():
            return True
    return False
