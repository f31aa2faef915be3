"""The host config: settings of this host, not of the cloud (state dir, drivers...).

Found at `--host-config FILE`, else `$RECONCILER_HOST_CONFIG`, else
`/etc/reconciler/host.yaml`; when none exists the defaults apply.
"""

from __future__ import annotations

import os
from ipaddress import IPv4Address
from pathlib import Path
from typing import Annotated, Literal, Union

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
    "Volume": "storage",
    "Bucket": "objectstore",
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


BACKEND_NAME = r"^[a-z0-9][a-z0-9-]{0,62}$"


class FileBackend(BaseModel):
    """qcow2 files in a pool directory (Cinder's NFS/file drivers, locally): works on any
    machine, thin by nature (a file grows as the guest writes)."""

    model_config = ConfigDict(extra="forbid")

    driver: Literal["file"]
    path: Path | None = Field(None, description="Pool directory (default: STATE_DIR/volumes/NAME).")
    default: bool = Field(False, description="Volumes without `backend` go here.")
    overcommit: float = Field(
        1.0, ge=1.0, le=100.0,
        description="How many times the free space of the filesystem may be promised to "
        "volumes (qcow2 files are sparse). 1.0: every GiB of every volume must be free.",
    )


class LvmBackend(BaseModel):
    """Logical volumes of an existing LVM volume group (Cinder's LVM driver): thick, or thin
    in a thin pool of that group."""

    model_config = ConfigDict(extra="forbid")

    driver: Literal["lvm"]
    vg: str = Field(description="The volume group (it must exist; reconciler never creates or removes it).",
                    pattern=r"^[A-Za-z0-9+_.][A-Za-z0-9+_.-]{0,126}$")
    thin: bool = Field(False, description="Thin volumes in `pool` (needs device-mapper).")
    pool: str | None = Field(None, description="The thin pool LV in `vg` (required when thin).",
                             pattern=r"^[A-Za-z0-9+_.][A-Za-z0-9+_.-]{0,126}$")
    default: bool = Field(False, description="Volumes without `backend` go here.")
    overcommit: float = Field(
        20.0, ge=1.0, le=100.0,
        description="Thin only: how many times the pool's size may be promised to volumes "
        "(Cinder's max_over_subscription_ratio).",
    )
    snapshotPercent: int = Field(
        100, ge=1, le=100,
        description="Thick only: the copy-on-write space of a snapshot, in percent of its volume.",
    )
    activation: bool | None = Field(
        None,
        description="Whether LVs can be activated (need device-mapper). Default: detected "
        "(/dev/mapper/control). `false` runs every lvm2 command with activation disabled "
        "(metadata only).",
    )
    lvmConfig: str = Field("", description="Extra `--config` text for every lvm2 command "
                                           "(e.g. a devices filter).")


VolumeBackend = Annotated[Union[FileBackend, LvmBackend], Field(discriminator="driver")]


class SwiftCredentials(BaseModel):
    """A tenant's own Swift user: its buckets are made with these, in its account."""

    model_config = ConfigDict(extra="forbid")

    user: str = Field(description="Swift user (tempauth `account:user`).", min_length=1)
    key: str = Field(description="Its key (password). Keep the host config 0600.", min_length=1,
                     json_schema_extra={"x-sensitive": True})


class _Store(BaseModel):
    """What every object store has."""

    model_config = ConfigDict(extra="forbid")

    default: bool = Field(False, description="Buckets without `store` go here.")
    timeoutSeconds: float = Field(10.0, gt=0, le=600, description="Per request.")
    maxParallel: int = Field(8, ge=1, le=64, description="Requests at once (observe, purge).")


class SwiftStore(_Store):
    """An OpenStack Swift cluster (python-swiftclient). Default: the embedded all-in-one
    that `make setup` starts on 127.0.0.1:8080 (scripts/setup-swift.sh)."""

    driver: Literal["swift"]
    authUrl: str = Field("http://127.0.0.1:8080/auth/v1.0", description="Auth endpoint (v1 auth).")
    user: str = Field("admin:admin", description="A reseller-admin user: it reaches the account "
                      "of every tenant without credentials of its own (`resellerPrefix` + tenant).")
    key: str = Field("admin", description="Its key.", json_schema_extra={"x-sensitive": True})
    resellerPrefix: str = Field("AUTH_", description="Account of a tenant without credentials: "
                                "this prefix + the tenant's name (tempauth's reseller prefix).",
                                pattern=r"^[A-Za-z0-9_-]{0,32}$")
    tenants: dict[str, SwiftCredentials] = Field(
        default_factory=dict,
        description="Credentials per tenant: its buckets go to that user's account, made "
        "with its own credentials (so a tenant cannot reach another's buckets).",
    )


class S3Credentials(BaseModel):
    model_config = ConfigDict(extra="forbid")

    accessKey: str = Field(description="Access key id.", min_length=1)
    secretKey: str = Field(description="Secret access key.", min_length=1,
                           json_schema_extra={"x-sensitive": True})


class S3Store(_Store):
    """Any S3-compatible endpoint (boto3), e.g. Swift's own s3api, Ceph RGW, MinIO, AWS.
    S3 has no bucket quotas: a bucket with `quota` set is refused at plan time here."""

    driver: Literal["s3"]
    endpoint: str = Field("http://127.0.0.1:8080", description="Endpoint URL.")
    region: str = Field("us-east-1", description="Region (SigV4 signing).")
    addressing: Literal["path", "virtual"] = Field("path", description="Bucket addressing style.")
    tagging: bool = Field(True, description="The endpoint has bucket tagging (where `metadata` "
                          "goes). Swift's s3api has not: `false` there, and `plan` refuses metadata.")
    readableAcl: bool = Field(True, description="The endpoint shows canned ACLs in a bucket's grants. "
                              "Swift's s3api (s3_acl off) does not: `false` there, and the applied "
                              "ACL is reported (its drift is not seen).")
    tenants: dict[str, S3Credentials] = Field(
        default_factory=dict,
        description="Credentials per tenant (required for every tenant with buckets here: "
        "S3 has no reseller admin).",
    )


ObjectStore = Annotated[Union[SwiftStore, S3Store], Field(discriminator="driver")]


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
    volumeBackends: dict[Annotated[str, Field(pattern=BACKEND_NAME)], VolumeBackend] = Field(
        default_factory=dict,
        description="Where volumes live, by backend name (a Volume's `backend`). One of them "
        "is the default (`default: true`, or the only one). None configured: one file backend "
        "`local` in STATE_DIR/volumes/local.",
    )
    objectStores: dict[Annotated[str, Field(pattern=BACKEND_NAME)], ObjectStore] = Field(
        default_factory=dict,
        description="Where buckets live, by store name (a Bucket's `store`). One of them is "
        "the default (`default: true`, or the only one). None configured: one swift store "
        "`local`, the embedded all-in-one on 127.0.0.1:8080.",
    )
    #: where it was read from (None: defaults)
    source: Path | None = Field(None, exclude=True)

    def volume_backends(self) -> tuple[dict[str, FileBackend | LvmBackend], str]:
        """The backends with their paths resolved, and the default's name."""
        backends = dict(self.volumeBackends) or {"local": FileBackend(driver="file", default=True)}
        out: dict[str, FileBackend | LvmBackend] = {}
        for name, backend in backends.items():
            if isinstance(backend, FileBackend) and backend.path is None:
                backend = backend.model_copy(update={"path": self.stateDir / "volumes" / name})
            out[name] = backend
        defaults = [n for n, b in out.items() if b.default]
        if len(out) == 1:
            return out, next(iter(out))
        if len(defaults) != 1:
            raise ConfigError(
                "host config: volumeBackends: exactly one backend must say `default: true` "
                f"(found {len(defaults)}: {', '.join(defaults) or 'none'})"
            )
        return out, defaults[0]

    def object_stores(self) -> tuple[dict[str, SwiftStore | S3Store], str]:
        """The object stores, and the default's name."""
        stores: dict[str, SwiftStore | S3Store] = dict(self.objectStores) or {
            "local": SwiftStore(driver="swift", default=True)}
        defaults = [n for n, b in stores.items() if b.default]
        if len(stores) == 1:
            return stores, next(iter(stores))
        if len(defaults) != 1:
            raise ConfigError(
                "host config: objectStores: exactly one store must say `default: true` "
                f"(found {len(defaults)}: {', '.join(defaults) or 'none'})"
            )
        return stores, defaults[0]

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
    for name, backend in config.volumeBackends.items():
        if isinstance(backend, LvmBackend) and backend.thin and not backend.pool:
            raise ConfigError(f"{path}: volumeBackends.{name}.pool: a thin backend needs its thin pool LV")
        if isinstance(backend, FileBackend) and backend.path is not None and not backend.path.is_absolute():
            backend.path = (path.parent / backend.path).resolve()
    if not config.stateDir.is_absolute():
        config.stateDir = (path.parent / config.stateDir).resolve()
    for name in ("imageDir", "instanceDir", "probeImage"):
        value = getattr(config.libvirt, name)
        if value is not None and not value.is_absolute():
            setattr(config.libvirt, name, (path.parent / value).resolve())
    config.volume_backends()  # exactly one default: said now, not at the first volume
    config.object_stores()
    return config
