"""Every host name the netlink driver uses, the ownership mark it writes, and the checks
that keep a name from reaching the kernel or nft unless it is one of ours.

Interface names have 15 characters at most; each name here is a prefix plus 10 hex
digits of a hash, so it is short, stable and says what the object is:

- network bridge ``rc-H`` (H: the network's hash), VXLAN device ``rv-H``, VLAN device
  ``rl-H``, DHCP namespace ``rc-dhcp-H`` and per subnet a veth ``rd-X`` / ``d-X``;
- router namespace ``rc-R``, a leg on each network ``rr-X`` / ``qr-X``, the external leg
  ``rg-X`` / ``qg-X`` (the ``q`` names live inside the namespace, as Neutron's do);
- nftables: table ``reconciler_HOME`` (inet and bridge), per network ``in-H``, ``out-H``
  and ``spoof-H``, per port ``pi-T`` / ``po-T`` (T: the tap's hash), per group
  ``sg-G-in`` / ``sg-G-out``.

The mark on every device we create is its interface alias,
``reconciler:v1 home=HOME key=KIND/TENANT/NAME hash=SPECHASH``: HOME tells installations
apart (several may share a kernel), the key says which resource owns the device.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from ipaddress import IPv4Network

from reconciler.errors import PermanentError
from reconciler.models import NAME_PATTERN, Key
from reconciler.models._resource import canonical_json
from reconciler.naming import host_name, short_hash

ALIAS_PREFIX = "reconciler:v1"
#: a network bridge or a router namespace: `rc-` + 10 hex digits
OUR_NAME = re.compile(r"^rc-[0-9a-f]{10}$")
#: a network's VXLAN or VLAN device, and its DHCP namespace (H: the bridge's 10 hex digits)
OUR_SEGMENT = re.compile(r"^r[vl]-[0-9a-f]{10}$")
OUR_DHCP_NAMESPACE = re.compile(r"^rc-dhcp-[0-9a-f]{10}$")
#: a security group's chain: `sg-` + 10 hex digits + `-in` or `-out`
OUR_GROUP_CHAIN = re.compile(r"^sg-[0-9a-f]{10}-(in|out)$")
_IFNAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,14}$")
_UPLINK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$")
_CHAIN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,30}$")
_NETNS = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")
_HOME = re.compile(r"^[0-9a-f]{8}$")
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_INSTANCE = re.compile(NAME_PATTERN)
_HOSTNAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_ALIAS_RE = re.compile(
    r"^reconciler:v1 home=(?P<home>[0-9a-f]{8}) key=(?P<key>[A-Za-z]+/[a-z0-9-]+/[a-z0-9-]+)"
    r" hash=(?P<hash>[0-9a-zA-Z]*)$"
)
_COMMENT_RE = re.compile(r"^rc:(?P<owner>[0-9a-z-]+):(?P<sha>[0-9a-f]{8})$")


# --- checks ---------------------------------------------------------------------------


def check_ifname(name: str) -> str:
    """An interface name we derived: [a-z0-9-], at most 15 characters."""
    if not _IFNAME.fullmatch(name):
        raise PermanentError(f"refusing interface name {name!r}: not a derived name of ours")
    return name


def check_uplink(name: str) -> str:
    """An uplink from the host config (eth1, enp1s0, bond0.5): a plain interface name."""
    if not _UPLINK.fullmatch(name):
        raise PermanentError(f"host config: uplink {name!r} is not an interface name")
    return name


def check_chain(name: str) -> str:
    if not _CHAIN.fullmatch(name):
        raise PermanentError(f"refusing nftables name {name!r}: not a derived name of ours")
    return name


def check_netns(name: str) -> str:
    if not _NETNS.fullmatch(name):
        raise PermanentError(f"refusing namespace name {name!r}: not a derived name of ours")
    return name


def check_home(home: str) -> str:
    if not _HOME.fullmatch(home):
        raise PermanentError(f"installation id {home!r} must be 8 hex digits")
    return home


def check_mac(mac: str) -> str:
    if not _MAC.fullmatch(mac):
        raise PermanentError(f"{mac!r} is not a MAC address (aa:bb:cc:dd:ee:ff)")
    return mac


def check_hostname(name: str) -> str:
    """An instance name (the model's name pattern): safe in dnsmasq's files."""
    if not _INSTANCE.fullmatch(name):
        raise PermanentError(f"{name!r} is not an instance name")
    return name


def dns_label(name: str) -> str:
    """`name` when it is a valid DNS label, else "" (such a port gets no name in DNS)."""
    return name if _HOSTNAME.fullmatch(name) else ""


# --- networks -------------------------------------------------------------------------


def bridge(key: Key) -> str:
    """The network's bridge: `rc-` + 10 hex digits of its key."""
    return check_ifname(host_name(key))


def net_hash(bridge_name: str) -> str:
    """The 10 hex digits every per-network name shares."""
    return bridge_name[3:]


def vxlan_device(bridge_name: str) -> str:
    return check_ifname("rv-" + net_hash(bridge_name))


def vlan_device(bridge_name: str) -> str:
    return check_ifname("rl-" + net_hash(bridge_name))


def dhcp_namespace(bridge_name: str) -> str:
    return check_netns("rc-dhcp-" + net_hash(bridge_name))


def dhcp_legs(bridge_name: str, cidr: IPv4Network | str) -> tuple[str, str]:
    """(host side on the bridge, side inside the DHCP namespace) of a subnet's leg."""
    h = short_hash(bridge_name, str(cidr))
    return check_ifname("rd-" + h), check_ifname("d-" + h)


def dhcp_dir_name(cidr: IPv4Network | str) -> str:
    """The folder of a subnet's dnsmasq files: 10.0.0.0/24 -> 10.0.0.0_24."""
    return str(cidr).replace("/", "_")


def network_chains(bridge_name: str) -> tuple[str, str, str]:
    """(ingress, egress, anti-spoofing) chains of a network."""
    h = net_hash(bridge_name)
    return check_chain("in-" + h), check_chain("out-" + h), check_chain("spoof-" + h)


def port_chains(tap: str) -> tuple[str, str]:
    """(ingress, egress) chains of an instance port, named by its tap's hash."""
    check_ifname(tap)
    return check_chain("pi-" + tap[3:]), check_chain("po-" + tap[3:])


# --- routers --------------------------------------------------------------------------


def router_namespace(key: Key) -> str:
    return check_netns(host_name(key))


def router_leg(router: Key, network: Key) -> tuple[str, str]:
    """(host side on the network's bridge, `qr-` side in the router's namespace)."""
    h = short_hash(str(router), str(network))
    return check_ifname("rr-" + h), check_ifname("qr-" + h)


def gateway_leg(router: Key, network: Key) -> tuple[str, str]:
    """(host side on the external network's bridge, `qg-` side in the namespace)."""
    h = short_hash(str(router), str(network))
    return check_ifname("rg-" + h), check_ifname("qg-" + h)


def leg_mac(inside: str) -> str:
    """A stable MAC for a namespace's leg (`fa:16:3e` + 3 bytes of a hash of its name, a
    locally administered address as Neutron's): a router or DHCP namespace made again
    answers with the MAC its neighbours' ARP caches already hold."""
    digest = hashlib.sha256(check_ifname(inside).encode()).hexdigest()[:6]
    return "fa:16:3e:" + ":".join(digest[i : i + 2] for i in range(0, 6, 2))


# --- security groups ------------------------------------------------------------------


def group_prefix(key: Key) -> str:
    """`sg-` + 10 hex digits: the group's host name and the prefix of its chains."""
    return check_chain(host_name(key, prefix="sg-"))


def group_chains(key: Key) -> tuple[str, str]:
    prefix = group_prefix(key)
    return prefix + "-in", prefix + "-out"


def table(home: str) -> str:
    """Our inet and bridge tables' name: one per installation."""
    return check_chain("reconciler_" + check_home(home))


# --- marks ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AliasMark:
    """The mark an interface alias carries."""

    home: str
    key: Key
    spec_hash: str

    def format(self) -> str:
        return f"{ALIAS_PREFIX} home={self.home} key={self.key} hash={self.spec_hash}"


def format_alias(home: str, key: Key, spec_hash: str) -> str:
    return AliasMark(check_home(home), key, spec_hash).format()


def parse_alias(text: str | None) -> AliasMark | None:
    """The mark in an alias; None when it is not one of ours (of any installation)."""
    if not text:
        return None
    m = _ALIAS_RE.fullmatch(text.strip())
    if not m:
        return None
    return AliasMark(m.group("home"), Key.parse(m.group("key")), m.group("hash"))


# --- rule comments --------------------------------------------------------------------


def rule_comment(owner: str, chain: str, expr: object) -> str:
    """`rc:OWNER:SHA8`: who owns the rule and a digest of what it says (chain + expression),
    so observe can tell an expected rule from a missing or rewritten one."""
    digest = hashlib.sha256(canonical_json([chain, expr]).encode()).hexdigest()[:8]
    return f"rc:{owner}:{digest}"


def comment_owner(comment: str | None) -> str | None:
    if not comment:
        return None
    m = _COMMENT_RE.fullmatch(comment)
    return m.group("owner") if m else None
