"""Harnesses that let one contract suite run against the in-memory and the real drivers.

A harness gives the driver under test and the few host-specific things a case needs:
an object without our mark in the way of a name, and a volume the instance can attach
(a real qcow2 file for libvirt; for the memory driver any observed volume).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Iterator

import pytest

from hostcheck import TEST_IMAGE, require_host
from reconciler.models import KINDS, Key
from reconciler.models._resource import spec_hash
from reconciler.naming import host_name
from reconciler.state import Mark, Observed, Target

#: libvirt's QEMU runs as another user: test files live where it can reach them
TEST_ROOT = Path("/var/lib/reconciler/test-tmp")


def target(kind: str, tenant: str, name: str, **fields: Any) -> Target:
    """A Target as the planner would make it: the full spec and a mark of the set fields."""
    model = KINDS[kind]
    spec = model.model_validate(fields)
    applied = spec.model_dump(mode="json", exclude_unset=True)
    key = Key(kind, tenant, name)
    return Target(key, spec.model_dump(mode="json"), Mark(key, spec_hash(applied), applied))


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, check=False)


class MemoryHarness:
    name = "memory"

    def __init__(self, root: Path):
        from reconciler.drivers.memory import MemoryDriver

        self.root = root
        self.driver = MemoryDriver(root / "memory")
        self.image_source = str(root / "image.qcow2")

    def unowned(self, key: Key) -> str:
        folder = self.root / "memory" / key.kind
        folder.mkdir(parents=True, exist_ok=True)
        name = self.driver.host_name(key)
        (folder / f"{name}.json").write_text('{"spec": {"vcpus": 1}}')
        return name

    def volume(self, tenant: str, name: str) -> Observed:
        key = Key("Volume", tenant, name)
        return Observed(key, host_name(key), {"sizeGiB": 1}, Mark(key, "x", {}), {"driver": "memory"})

    def network(self, tenant: str, name: str) -> Observed | None:
        return None

    def related(self, *observed: Observed | None) -> dict[Key, Observed]:
        return {o.key: o for o in observed if o is not None}

    def cleanup(self) -> None:
        pass


class LibvirtHarness:
    name = "libvirt"

    def __init__(self, root: Path, tenant: str):
        from reconciler.drivers.libvirt import LibvirtDriver, LibvirtSettings

        self.root = root
        self.tenant = tenant
        self.driver = LibvirtDriver(LibvirtSettings(
            domain_type="qemu",
            image_dir=root / "images",
            instance_dir=root / "instances",
            shutdown_timeout_s=10,
        ))
        self.image_source = str(TEST_IMAGE)
        self.bridges: list[str] = []
        self.domains: list[str] = []

    def unowned(self, key: Key) -> str:
        name = self.driver.host_name(key)
        dom = ET.Element("domain", {"type": "qemu"})
        ET.SubElement(dom, "name").text = name
        ET.SubElement(dom, "memory", {"unit": "MiB"}).text = "64"
        os_el = ET.SubElement(dom, "os")
        ET.SubElement(os_el, "type", {"arch": "x86_64"}).text = "hvm"
        path = self.root / f"{name}.xml"
        path.write_text(ET.tostring(dom, encoding="unicode"))
        result = _run("virsh", "-c", "qemu:///system", "define", str(path))
        assert result.returncode == 0, result.stderr
        self.domains.append(name)
        return name

    def volume(self, tenant: str, name: str) -> Observed:
        key = Key("Volume", tenant, name)
        path = self.root / f"vol-{name}.qcow2"
        if not path.exists():
            assert _run("qemu-img", "create", "-q", "-f", "qcow2", str(path), "64M").returncode == 0
        return Observed(key, str(path), {"sizeGiB": 1}, Mark(key, "x", {}),
                        {"path": str(path), "format": "qcow2", "driver": "test"})

    def network(self, tenant: str, name: str) -> Observed:
        """A Linux bridge standing in for the network driver's (the network issue's job)."""
        key = Key("Network", tenant, name)
        bridge = host_name(key)
        if bridge not in self.bridges:
            assert _run("ip", "link", "add", bridge, "type", "bridge").returncode == 0
            _run("ip", "link", "set", bridge, "up")
            self.bridges.append(bridge)
        return Observed(key, bridge, {"type": "flat", "subnets": [{"cidr": "10.252.0.0/24"}]},
                        Mark(key, "x", {}), {"bridge": bridge})

    def related(self, *observed: Observed | None) -> dict[Key, Observed]:
        return {o.key: o for o in observed if o is not None}

    def cleanup(self) -> None:
        out = _run("virsh", "-c", "qemu:///system", "list", "--all", "--name").stdout.split()
        for dom in out:
            xml = _run("virsh", "-c", "qemu:///system", "dumpxml", dom).stdout
            if f"<title>{self.tenant}/" in xml or dom in self.domains:
                _run("virsh", "-c", "qemu:///system", "destroy", dom)
                _run("virsh", "-c", "qemu:///system", "undefine", dom, "--nvram")
        for bridge in self.bridges:
            _run("ip", "link", "del", bridge)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(params=["memory", "libvirt"])
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    tenant = "rctest" + secrets.token_hex(3)
    if request.param == "memory":
        h: Any = MemoryHarness(tmp_path)
        Path(h.image_source).write_bytes(b"QFI\xfb" + bytes(100))
    else:
        require_host()
        TEST_ROOT.mkdir(parents=True, exist_ok=True)
        os.chmod(TEST_ROOT, 0o755)
        root = TEST_ROOT / tenant
        root.mkdir()
        os.chmod(root, 0o755)
        h = LibvirtHarness(root, tenant)
    h.tenant = tenant
    try:
        yield h
    finally:
        h.cleanup()
