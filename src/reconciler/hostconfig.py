"""The host config: settings of this host, not of the cloud (state dir, drivers...).

Found at `--host-config FILE`, else `$RECONCILER_HOST_CONFIG`, else
`/etc/reconciler/host.yaml`; when none exists the defaults apply.
"""

from __future__ import annotations

import os
from ipaddress import IPv4Address
from pathlib import Path
from typing import Literal

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field

from reconciler.errors import ConfigError, format_path

DEFAULT_PATH = Path("/etc/reconciler/host.yaml")
ENV_VAR = "RECONCILER_HOST_CONFIG"

#: the real driver of each kind (the default)
REAL_DRIVERS: dict[str, str] = {
    "Tenant": "identity",
    "Network": "netlink",
    "Router": "netlink",
    "SecurityGroup": "netlink",
    "Image": "libvirt",
    "Instance": "libvirt",
    "Volume": "file",
    "Bucket": "swift",
}


class LibvirtConfig(BaseModel):
    """Settings of the libvirt driver (Instance, Image)."""

    model_config = ConfigDict(extra="forbid")

    uri: str = Field("qemu:///system", description="libvirt connection URI.")
    domainType: Literal["auto", "kvm", "qemu"] = Field(
        "auto",
        description="`auto`: kvm when a probe boot under KVM works on this host, else qemu "
        "(TCG emulation); or force one.",
    )
    imageDir: Path | None = Field(None, description="Registered images (default: STATE_DIR/libvirt/images).")
    instanceDir: Path | None = Field(
        None, description="Root disks, seeds and console logs (default: STATE_DIR/libvirt/instances)."
    )
    probeImage: Path = Field(
        Path("/var/lib/reconciler/images/tiny.qcow2"),
        description="Guest booted once under KVM to decide the domain type (built by `make setup`).",
    )
    shutdownTimeoutSeconds: float = Field(
        60.0, ge=0, description="How long a graceful (ACPI) shutdown may take before the domain is forced off."
    )
    maxParallel: int = Field(8, ge=1, le=64, description="Instance and image changes at once.")


class NetlinkConfig(BaseModel):
    """Settings of the netlink driver (Network, Router, SecurityGroup)."""

    model_config = ConfigDict(extra="forbid")

    uplinks: dict[str, str] = Field(
        default_factory=dict,
        description="Host interface a `flat` or `vlan` network uses as its uplink, by network "
        "(`TENANT/NAME: eth1`). The interface is enslaved to the network's bridge (flat) or "
        "carries its VLAN sub-interface (vlan); it is never deleted.",
    )
    vxlanLocal: IPv4Address | None = Field(
        None, description="Local address of VXLAN tunnels (default: none, the kernel picks)."
    )
    vxlanPeers: list[IPv4Address] = Field(
        default_factory=list,
        description="Other hosts' VXLAN addresses: every VXLAN network floods to them (unicast "
        "head-end replication), for multi-host tenant networks.",
    )
    vxlanPort: int = Field(4789, ge=1, le=65535, description="UDP port of VXLAN.")
    dnsmasq: str = Field("dnsmasq", description="The dnsmasq program (one per subnet).")
    leaseSeconds: int = Field(3600, ge=120, description="DHCP lease time.")
    maxParallel: int = Field(8, ge=1, le=64, description="Network, router and group changes at once.")


class HostConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stateDir: Path = Field(
        Path("/var/lib/reconciler"),
        description="Journal, lock, dnsmasq files and in-memory driver state live here.",
    )
    drivers: Literal["memory", "real"] | dict[str, str] = Field(
        "real",
        description="`memory` (every kind in memory, for tests and trying it), `real` "
        "(the host drivers), or a map of kind to driver name.",
    )
    lockTimeoutSeconds: float = Field(60.0, ge=0, description="How long apply waits for the host lock.")
    libvirt: LibvirtConfig = Field(default_factory=LibvirtConfig, description="The libvirt driver.")
    netlink: NetlinkConfig = Field(default_factory=NetlinkConfig, description="The netlink driver.")
    #: where it was read from (None: defaults)
    source: Path | None = Field(None, exclude=True)

    def driver_names(self) -> dict[str, str]:
        if self.drivers == "memory":
            return {kind: "memory" for kind in REAL_DRIVERS}
        if self.drivers == "real":
            return dict(REAL_DRIVERS)
        names = dict(REAL_DRIVERS)
        names.update(self.drivers)
        return names


def config_path(explicit: str | os.PathLike[str] | None) -> tuple[Path, bool]:
    """(path, required): an explicit or environment path must exist."""
    if explicit:
        return Path(explicit), True
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env), True
    return DEFAULT_PATH, False


def load_host_config(explicit: str | os.PathLike[str] | None = None) -> HostConfig:
    path, required = config_path(explicit)
    if not path.exists():
        if required:
            raise ConfigError(f"host config {path} does not exist")
        return HostConfig()
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"host config {path}: cannot read: {exc.strerror or exc}") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        what = " ".join(str(m) for m in (exc.context, exc.problem) if m)
        raise ConfigError(f"host config {path}:{line}: YAML syntax error: {what}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"host config {path}: not YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"host config {path}: must be a mapping of settings")
    try:
        config = HostConfig.model_validate(data)
    except pydantic.ValidationError as exc:
        lines = [f"{path}: {format_path(e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise ConfigError("host config is invalid:\n" + "\n".join(lines)) from None
    unknown = set(config.driver_names()) - set(REAL_DRIVERS)
    if unknown:
        raise ConfigError(f"{path}: drivers: unknown kind(s) {', '.join(sorted(unknown))}")
    config.source = path
    if not config.stateDir.is_absolute():
        config.stateDir = (path.parent / config.stateDir).resolve()
    for name in ("imageDir", "instanceDir", "probeImage"):
        value = getattr(config.libvirt, name)
        if value is not None and not value.is_absolute():
            setattr(config.libvirt, name, (path.parent / value).resolve())
    return config
