"""Network: a tenant's layer-2 segment (bridge + VXLAN/VLAN/flat) with IPv4 subnets."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network
from typing import Literal

from pydantic import Field

from reconciler.models._base import Spec, Strict
from reconciler.models._fields import UpdatePolicy, spec_field


class Dhcp(Strict):
    enabled: bool = spec_field(True, description="Serve DHCP on this subnet.")
    start: IPv4Address | None = spec_field(
        None,
        description="First address handed out (default: network address + 10, or + 3 in a "
        "/28 or smaller; never the gateway). The DHCP server itself takes the address just "
        "below the range (or just above it when that is taken).",
    )
    end: IPv4Address | None = spec_field(
        None,
        description="Last address handed out (default: the last usable address, or the one "
        "before it when that is the gateway).",
    )


class Subnet(Strict):
    cidr: IPv4Network = spec_field(
        description="IPv4 network in CIDR notation, e.g. 10.10.0.0/24. Changing it forces "
        "replacement of the network: every instance on it loses its address meanwhile.",
        update=UpdatePolicy.REPLACE,
    )
    gateway: IPv4Address | None = spec_field(
        None, description="Gateway address inside the subnet (default: first usable address)."
    )
    dhcp: Dhcp = Field(default_factory=Dhcp, description="DHCP service for the subnet.")
    dnsServers: list[IPv4Address] = spec_field(
        default_factory=list, description="DNS servers announced by DHCP."
    )


class NetworkSpec(Spec):
    """A tenant network (Neutron's network + subnets)."""

    kind = "Network"

    type: Literal["flat", "vxlan", "vlan"] = spec_field(
        "vxlan",
        description="Segmentation: flat (optionally on the host uplink), vxlan or vlan.",
        update=UpdatePolicy.REPLACE,
    )
    vni: int | None = spec_field(
        None,
        description="VXLAN network identifier (vxlan only); allocated stably when omitted.",
        update=UpdatePolicy.REPLACE,
        host_default=True,
        ge=1,
        le=16777215,
    )
    vlanId: int | None = spec_field(
        None,
        description="VLAN id (vlan only); allocated stably when omitted.",
        update=UpdatePolicy.REPLACE,
        host_default=True,
        ge=1,
        le=4094,
    )
    mtu: int | None = spec_field(
        None,
        description="MTU of the network in bytes (default: 1500 for flat and vlan, 1450 for "
        "vxlan). Guest NICs get the same MTU.",
        host_default=True,
        ge=576,
        le=9000,
    )
    external: bool = spec_field(
        False,
        description="A provider network that routers of every tenant may use as their "
        "external gateway (written `TENANT/NAME` from another tenant).",
    )
    subnets: list[Subnet] = spec_field(
        default_factory=list, description="IPv4 subnets on this network."
    )


def gateway_of(subnet: Subnet) -> IPv4Address:
    """The subnet's gateway: as written, else the first usable address."""
    if subnet.gateway is not None:
        return subnet.gateway
    return subnet.cidr.network_address + 1


def dhcp_range_of(subnet: Subnet) -> tuple[IPv4Address, IPv4Address]:
    """The DHCP range: as written, else network+10 (network+3 in a /28 or smaller) to the
    last usable address, a default end or start never being the gateway."""
    net = subnet.cidr
    gateway = gateway_of(subnet)
    start = subnet.dhcp.start
    if start is None:
        start = net.network_address + (10 if net.num_addresses > 16 else 3)
        if start == gateway:
            start += 1
    end = subnet.dhcp.end
    if end is None:
        end = net.broadcast_address - 1
        if end == gateway:
            end -= 1
    return start, end


def dhcp_server_of(subnet: Subnet) -> IPv4Address | None:
    """The address the subnet's DHCP server holds: just below the DHCP range (skipping the
    gateway), else just above it; never the network or broadcast address. None when DHCP
    is off or there is no room (a validation error)."""
    if not subnet.dhcp.enabled:
        return None
    net = subnet.cidr
    gateway = gateway_of(subnet)
    start, end = dhcp_range_of(subnet)
    for candidate in (start - 1, start - 2, end + 1, end + 2):
        if net.network_address < candidate < net.broadcast_address and candidate != gateway:
            return candidate
    return None


def default_mtu(spec: NetworkSpec) -> int:
    return spec.mtu or (1450 if spec.type == "vxlan" else 1500)
