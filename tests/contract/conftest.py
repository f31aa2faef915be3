"""Harnesses that let one contract suite run against the in-memory and the real drivers.

A harness gives the driver under test and the few host-specific things a case needs:
an object without our mark in the way of a name, and a volume the instance can attach
(a real qcow2 file for libvirt; for the memory driver any observed volume).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Iterator

import pytest

from hostcheck import TEST_IMAGE, require_host, require_network
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


# --- networks: the memory driver and the netlink driver -------------------------------

class NetlinkHarness:
    """The netlink driver on the real kernel, with a state dir and an installation id
    (`home`) of its own; cleanup removes everything carrying that home, even after a
    failed test."""

    name = "netlink"

    def __init__(self, root: Path, tenant: str):
        import hashlib

        from reconciler.drivers.netlink import NetlinkDriver, NetlinkSettings

        self.root = root
        self.tenant = tenant
        self.home = hashlib.sha256(str(root).encode()).hexdigest()[:8]
        self.table = f"reconciler_{self.home}"
        self.driver = NetlinkDriver(NetlinkSettings(state_dir=root / "netlink", home=self.home,
                                                    lease_seconds=600, max_parallel=4))
        self.unmarked: list[tuple[str, str]] = []  # (kind, name) made by the test

    def unowned(self, key: Key) -> str:
        """A bridge (or namespace) with our name and no mark, as a person would make it."""
        name = self.driver.host_name(key)
        if key.kind == "Router":
            assert _run("ip", "netns", "add", name).returncode == 0
            self.unmarked.append(("netns", name))
        else:
            assert _run("ip", "link", "add", name, "type", "bridge").returncode == 0
            self.unmarked.append(("link", name))
        return name

    def related(self, *observed: Observed | None) -> dict[Key, Observed]:
        return {o.key: o for o in observed if o is not None}

    # --- independent views of the host (iproute2, nft, /proc) -------------------------

    def link(self, name: str) -> dict[str, Any] | None:
        result = _run("ip", "-d", "-j", "link", "show", "dev", name)
        if result.returncode != 0:
            return None
        import json

        return json.loads(result.stdout)[0]

    def namespaces(self) -> set[str]:
        return {line.split()[0] for line in _run("ip", "netns", "list").stdout.splitlines() if line.strip()}

    def nft(self, family: str = "inet", namespace: str | None = None, table: str | None = None) -> dict[str, Any]:
        """chain -> [rule text without handles] of a table ({} when it does not exist)."""
        argv = ["nft", "list", "table", family, table or self.table]
        if namespace:
            argv = ["ip", "netns", "exec", namespace, *argv]
        result = _run(*argv)
        if result.returncode != 0:
            return {}
        chains: dict[str, Any] = {}
        current = None
        for line in result.stdout.splitlines():
            text = line.strip()
            if text.startswith("chain "):
                current = text.split()[1]
                chains[current] = []
            elif current and text and text != "}" and not text.startswith(("type ", "policy ")):
                chains[current].append(text)
        return chains

    def dnsmasq_pids(self) -> list[int]:
        pids = []
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                try:
                    cmd = (proc / "cmdline").read_bytes().decode(errors="replace")
                    state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
                except (OSError, IndexError):
                    continue
                if "dnsmasq" in cmd and str(self.root) in cmd and state not in ("Z", "X"):
                    pids.append(int(proc.name))
        return pids

    def leftovers(self) -> list[str]:
        """Everything of this installation still on the host."""
        mark = f"home={self.home} "
        left = []
        for name, alias in _aliases().items():
            if mark in alias:
                left.append(f"link {name}")
        for ns in self.namespaces():
            if ns.startswith("rc-") and mark in _lo_alias(ns):
                left.append(f"namespace {ns}")
        for family in ("inet", "bridge"):
            if _run("nft", "list", "table", family, self.table).returncode == 0:
                left.append(f"table {family} {self.table}")
        left += [f"dnsmasq {pid}" for pid in self.dnsmasq_pids()]
        return left

    def cleanup(self) -> None:
        import signal

        # the driver's own delete first (routers, then networks and groups); whatever it
        # leaves, the sweep below removes, and the fixture then asserts nothing is left
        with contextlib.suppress(Exception):
            seen = self.driver.observe().owned
            for obs in sorted(seen, key=lambda o: o.key.kind != "Router"):
                with contextlib.suppress(Exception):
                    self.driver.delete(obs)
        for pid in self.dnsmasq_pids():
            os.kill(pid, signal.SIGKILL)
        mark = f"home={self.home} "
        for ns in self.namespaces():
            if ns.startswith("rc-") and mark in _lo_alias(ns):
                _run("ip", "netns", "del", ns)
        for name, alias in _aliases().items():
            if mark in alias:
                _run("ip", "link", "del", name)
        for kind, name in self.unmarked:
            if kind == "netns":
                _run("ip", "netns", "del", name)
            else:
                _run("ip", "link", "del", name)
        for family in ("inet", "bridge"):
            _run("nft", "delete", "table", family, self.table)
        shutil.rmtree(self.root, ignore_errors=True)


def _aliases() -> dict[str, str]:
    import json

    result = _run("ip", "-j", "link", "show")
    return {link["ifname"]: link.get("ifalias", "") for link in json.loads(result.stdout or "[]")}


def _lo_alias(namespace: str) -> str:
    import json

    result = _run("ip", "-n", namespace, "-j", "link", "show", "dev", "lo")
    if result.returncode != 0:
        return ""
    return (json.loads(result.stdout or "[{}]")[0] or {}).get("ifalias", "")


@pytest.fixture(params=["memory", "netlink"])
def net_harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """The network kinds' harness: the memory driver, or the netlink driver on this kernel
    with a unique test tenant and a state dir of its own."""
    tenant = "rctest" + secrets.token_hex(3)
    if request.param == "memory":
        h: Any = MemoryHarness(tmp_path)
    else:
        require_network()
        TEST_ROOT.mkdir(parents=True, exist_ok=True)
        os.chmod(TEST_ROOT, 0o755)
        root = TEST_ROOT / f"net-{tenant}"
        root.mkdir()
        os.chmod(root, 0o755)  # dnsmasq (user nobody) reads its files below
        h = NetlinkHarness(root, tenant)
    h.tenant = tenant
    try:
        yield h
    finally:
        h.cleanup()
    if request.param == "netlink":
        assert h.leftovers() == [], "the harness's cleanup left host objects behind"
