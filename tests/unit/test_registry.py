"""The driver registry: which driver realises which kind, as the host config says."""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.drivers.libvirt import LibvirtDriver
from reconciler.drivers.memory import MemoryDriver
from reconciler.drivers.registry import build_drivers
from reconciler.errors import ConfigError
from reconciler.hostconfig import HostConfig

MEMORY_REST = {k: "memory" for k in ("Tenant", "Network", "Router", "SecurityGroup", "Volume", "Bucket")}


def test_libvirt_serves_images_and_instances_with_one_instance(tmp_path: Path) -> None:
    config = HostConfig(stateDir=tmp_path, drivers={**MEMORY_REST, "Image": "libvirt", "Instance": "libvirt"})
    drivers = build_drivers(config)
    assert isinstance(drivers["Instance"], LibvirtDriver)
    assert drivers["Image"] is drivers["Instance"]
    assert isinstance(drivers["Volume"], MemoryDriver)
    assert drivers["Instance"].settings.instance_dir == tmp_path / "libvirt" / "instances"


@pytest.mark.parametrize("kind", ["Volume", "Network", "Bucket"])
def test_a_kind_the_driver_does_not_realise_is_a_config_error(tmp_path: Path, kind: str) -> None:
    # whichever order the kinds come in: the check is per kind, not per driver
    config = HostConfig(stateDir=tmp_path,
                        drivers={**MEMORY_REST, "Image": "libvirt", "Instance": "libvirt", kind: "libvirt"})
    with pytest.raises(ConfigError, match=f"drivers: {kind}: the libvirt driver realises only Image, Instance"):
        build_drivers(config)


def test_object_stores_from_the_host_config(tmp_path: Path) -> None:
    from reconciler.drivers.objectstore import ObjectStoreDriver, S3Store, SwiftStore
    from reconciler.hostconfig import load_host_config

    path = tmp_path / "host.yaml"
    path.write_text(
        "stateDir: state\n"
        "drivers: {Tenant: memory, Network: memory, Router: memory, SecurityGroup: memory,\n"
        "          Image: memory, Instance: memory, Volume: memory, Bucket: objectstore}\n"
        "objectStores:\n"
        "  local: {driver: swift, default: true, tenants: {acme: {user: 'acme:ops', key: s3cret}}}\n"
        "  aws: {driver: s3, endpoint: 'https://s3.example', region: eu-west-1, tagging: false,\n"
        "        tenants: {acme: {accessKey: AK, secretKey: topsecret}}}\n"
    )
    drivers = build_drivers(load_host_config(path))
    driver = drivers["Bucket"]
    assert isinstance(driver, ObjectStoreDriver)
    assert driver.default == "local" and driver.defaults("Bucket") == {"store": "local"}
    assert isinstance(driver.stores["local"], SwiftStore) and isinstance(driver.stores["aws"], S3Store)
    assert driver.stores["local"].account_of("acme") == "user acme:ops"
    assert driver.stores["local"].account_of("globex") == "AUTH_globex"
    assert driver.stores["local"].registry.path == tmp_path / "state" / "objectstore" / "local.json"
    assert not driver.stores["aws"].tagging
    for store in driver.stores.values():  # keys never in a repr (logs, tracebacks)
        assert "s3cret" not in repr(store) and "topsecret" not in repr(store)


def test_several_object_stores_need_exactly_one_default(tmp_path: Path) -> None:
    config = HostConfig(stateDir=tmp_path, objectStores={"a": {"driver": "swift"}, "b": {"driver": "s3"}})
    with pytest.raises(ConfigError, match="objectStores: exactly one store must say `default: true`"):
        config.object_stores()
    assert HostConfig(stateDir=tmp_path).object_stores()[1] == "local"


def test_a_driver_name_that_is_a_store_driver_says_where_it_goes(tmp_path: Path) -> None:
    config = HostConfig(stateDir=tmp_path, drivers={**MEMORY_REST, "Bucket": "swift", "Volume": "lvm"})
    with pytest.raises(ConfigError) as refused:
        build_drivers(config)
    assert "Bucket: swift (the Bucket driver is `objectstore`; swift and s3 are the `driver` of a store" in str(refused.value)
    assert "Volume: lvm (the Volume driver is `storage`)" in str(refused.value)
