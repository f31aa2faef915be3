"""Instances and images on QEMU/KVM through libvirt (Nova's job in OpenStack)."""

from reconciler.drivers.libvirt._driver import LibvirtDriver, LibvirtSettings

__all__ = ["LibvirtDriver", "LibvirtSettings"]
