"""Build the drivers the host config names, one instance per driver."""

from __future__ import annotations

import hashlib

from reconciler.drivers.base import Driver
from reconciler.drivers.libvirt import LibvirtDriver, LibvirtSettings
from reconciler.drivers.memory import MemoryDriver
from reconciler.drivers.netlink import NetlinkDriver, NetlinkSettings
from reconciler.drivers.objectstore import ObjectStoreDriver, Registry, S3Store, SwiftStore
from reconciler.drivers.storage import FileBackend, Lvm2, LvmBackend, StorageDriver
from reconciler.errors import ConfigError
from reconciler.hostconfig import FileBackend as FileBackendConfig
from reconciler.hostconfig import REAL_DRIVERS, HostConfig
from reconciler.hostconfig import SwiftStore as SwiftStoreConfig


def build_drivers(config: HostConfig) -> dict[str, Driver]:
    """Kind -> driver. Kinds served by the same driver share one instance."""
    names = config.driver_names()
    instances: dict[str, Driver] = {}
    out: dict[str, Driver] = {}
    missing = []
    for kind, name in names.items():
        if name not in instances:
            if name == "memory":
                kinds = tuple(k for k, n in names.items() if n == "memory")
                instances[name] = MemoryDriver(config.stateDir / "memory", kinds)
            elif name == "libvirt":
                instances[name] = LibvirtDriver(libvirt_settings(config))
            elif name == "netlink":
                instances[name] = NetlinkDriver(netlink_settings(config))
            elif name == "storage":
                instances[name] = storage_driver(config)
            elif name == "objectstore":
                instances[name] = objectstore_driver(config)
            else:
                real = REAL_DRIVERS.get(kind)
                hint = ""
                if name in ("swift", "s3") and kind == "Bucket":
                    hint = (" (the Bucket driver is `objectstore`; swift and s3 are the `driver` of a "
                            "store under objectStores)")
                elif real and real != name and real != "identity":
                    hint = f" (the {kind} driver is `{real}`)"
                missing.append(f"{kind}: {name}{hint}")
                continue
        if kind not in instances[name].kinds:
            raise ConfigError(f"host config: drivers: {kind}: the {name} driver realises only "
                              + ", ".join(instances[name].kinds))
        out[kind] = instances[name]
    if missing:
        raise ConfigError(
            "these drivers are not available in this version: " + ", ".join(missing)
            + ". Set `drivers: memory` in the host config to try reconciler without touching "
            "the host."
        )
    return out


def libvirt_settings(config: HostConfig) -> LibvirtSettings:
    lv = config.libvirt
    return LibvirtSettings(
        uri=lv.uri,
        domain_type=lv.domainType,
        image_dir=lv.imageDir or config.stateDir / "libvirt" / "images",
        instance_dir=lv.instanceDir or config.stateDir / "libvirt" / "instances",
        probe_image=lv.probeImage,
        shutdown_timeout_s=lv.shutdownTimeoutSeconds,
        max_parallel=lv.maxParallel,
    )


def home_of(config: HostConfig) -> str:
    """This installation's id (of its state directory): marks tell our objects from those
    of another reconciler on the same host."""
    return hashlib.sha256(str(config.stateDir.resolve()).encode()).hexdigest()[:8]


def storage_driver(config: HostConfig) -> StorageDriver:
    configured, default = config.volume_backends()
    home = home_of(config)
    backends: dict[str, FileBackend | LvmBackend] = {}
    for name, cfg in configured.items():
        if isinstance(cfg, FileBackendConfig):
            assert cfg.path is not None
            backends[name] = FileBackend(name, cfg.path, home, overcommit=cfg.overcommit)
        else:
            backends[name] = LvmBackend(
                name, cfg.vg, home, Lvm2(activation=cfg.activation, extra_config=cfg.lvmConfig),
                thin=cfg.thin, pool=cfg.pool, overcommit=cfg.overcommit, snapshot_percent=cfg.snapshotPercent,
            )
    return StorageDriver(backends, default)


def objectstore_driver(config: HostConfig) -> ObjectStoreDriver:
    configured, default = config.object_stores()
    home = home_of(config)
    state = config.stateDir.resolve() / "objectstore"
    stores: dict[str, SwiftStore | S3Store] = {}
    for name, cfg in configured.items():
        registry = Registry(state / f"{name}.json")
        if isinstance(cfg, SwiftStoreConfig):
            stores[name] = SwiftStore(
                name, auth_url=cfg.authUrl, user=cfg.user, key=cfg.key, reseller_prefix=cfg.resellerPrefix,
                credentials={t: (c.user, c.key) for t, c in cfg.tenants.items()}, registry=registry,
                home=home, timeout_s=cfg.timeoutSeconds, max_parallel=cfg.maxParallel)
        else:
            stores[name] = S3Store(
                name, endpoint=cfg.endpoint, region=cfg.region, addressing=cfg.addressing,
                credentials={t: (c.accessKey, c.secretKey) for t, c in cfg.tenants.items()},
                registry=registry, home=home, timeout_s=cfg.timeoutSeconds, max_parallel=cfg.maxParallel,
                tagging=cfg.tagging, readable_acl=cfg.readableAcl)
    return ObjectStoreDriver(stores, default, home)


def netlink_settings(config: HostConfig) -> NetlinkSettings:
    nl = config.netlink
    state = config.stateDir.resolve()
    return NetlinkSettings(
        state_dir=state / "netlink",
        home=home_of(config),
        uplinks=dict(nl.uplinks),
        vxlan_local=str(nl.vxlanLocal) if nl.vxlanLocal else None,
        vxlan_peers=tuple(str(p) for p in nl.vxlanPeers),
        vxlan_port=nl.vxlanPort,
        dnsmasq=nl.dnsmasq,
        lease_seconds=nl.leaseSeconds,
        max_parallel=nl.maxParallel,
    )
