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
