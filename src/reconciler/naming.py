"""Host object names: derived, short, stable (Linux interface names have 15 characters)."""

from __future__ import annotations

import hashlib

from reconciler.models import Key

PREFIX = "rc-"


def short_hash(*parts: str, length: int = 10) -> str:
    return hashlib.sha256("/".join(parts).encode()).hexdigest()[:length]


def host_name(key: Key, prefix: str = PREFIX) -> str:
    """`rc-` + 10 hex digits of sha256(kind/tenant/name): 13 characters."""
    return prefix + short_hash(key.kind, key.tenant, key.name)


def mac_address(tenant: str, instance: str, network: str) -> str:
    """The stable MAC of an instance's NIC on a network: QEMU's 52:54:00 prefix + 3 bytes
    of sha256(tenant/instance/network). The instance and network drivers both use it (the
    DHCP reservation and the guest NIC must agree)."""
    digest = short_hash(tenant, instance, network, length=6)
    return "52:54:00:" + ":".join(digest[i : i + 2] for i in range(0, 6, 2))


def tap_name(tenant: str, instance: str, network: str) -> str:
    """The host-side device of an instance's NIC on a network (`rt-` + 10 hex digits):
    the instance driver names the tap so, and the network driver's port rules match it."""
    return "rt-" + short_hash(tenant, instance, network)
