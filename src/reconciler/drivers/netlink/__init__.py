"""The netlink driver: Network, Router and SecurityGroup on Linux (pyroute2, dnsmasq, nftables)."""

from reconciler.drivers.netlink._driver import NetlinkDriver, NetlinkSettings

__all__ = ["NetlinkDriver", "NetlinkSettings"]
