"""Boot the test guest image through libvirt for real and check that it answers.

Needs root, libvirt (scripts/setup-libvirt.sh) and the image (scripts/build-test-image.sh).
Everything it creates on the host is named rctest-g<hex> and removed again; its only
traffic goes to its own bridge's 10.254.X.0/24.
"""

from __future__ import annotations

import io
import os
import random
import secrets
import shutil
import subprocess
import time
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hostcheck import require_host

IMAGE = Path(os.environ.get("RECONCILER_TEST_IMAGE", "/var/lib/reconciler/images/tiny.qcow2"))
# libvirt's QEMU (user libvirt-qemu) must reach the files: pytest's tmp dirs are 0700.
TEST_TMP = Path("/var/lib/reconciler/test-tmp")
VIRSH = ["virsh", "-q", "-c", "qemu:///system"]
BOOT_TIMEOUT = 90.0
SHUTDOWN_TIMEOUT = 30.0

pytestmark = [pytest.mark.slow]


@pytest.fixture(autouse=True)
def _real_host() -> None:
    require_host()


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), check=check, capture_output=True, text=True)


def virsh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(*VIRSH, *args, check=check)


def make_seed_iso(path: Path, files: dict[str, str]) -> None:
    """A NoCloud seed: ISO9660 labelled cidata, Rock Ridge and Joliet names."""
    import pycdlib
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident="cidata")
    for name, text in files.items():
        data = text.encode()
        iso.add_fp(
            io.BytesIO(data),
            len(data),
            f"/{name.upper().replace('-', '_')}.;1",
            rr_name=name,
            joliet_path=f"/{name}",
        )
    iso.write(str(path))
    iso.close()


def domain_xml(name: str, overlay: Path, data: Path, seed: Path, bridge: str, mac: str,
               console: Path) -> str:
    dom = ET.Element("domain", type="qemu")  # TCG: this host's PVM-backed kvm cannot run Linux
    ET.SubElement(dom, "name").text = name
    ET.SubElement(dom, "memory", unit="MiB").text = "128"
    ET.SubElement(dom, "vcpu").text = "1"
    os_el = ET.SubElement(dom, "os")
    ET.SubElement(os_el, "type", arch="x86_64", machine="pc").text = "hvm"  # i440fx: IDE
    ET.SubElement(os_el, "boot", dev="hd")
    ET.SubElement(ET.SubElement(dom, "features"), "acpi")  # the power button needs ACPI
    cpu = ET.SubElement(dom, "cpu", mode="custom", match="exact")
    ET.SubElement(cpu, "model", fallback="allow").text = "qemu64"
    ET.SubElement(dom, "on_poweroff").text = "destroy"
    devices = ET.SubElement(dom, "devices")

    def disk(device: str, fmt: str, path: Path, target: str, bus: str) -> ET.Element:
        el = ET.SubElement(devices, "disk", type="file", device=device)
        ET.SubElement(el, "driver", name="qemu", type=fmt)
        ET.SubElement(el, "source", file=str(path))
        ET.SubElement(el, "target", dev=target, bus=bus)
        return el

    disk("disk", "qcow2", overlay, "vda", "virtio")
    ET.SubElement(disk("disk", "qcow2", data, "vdb", "virtio"), "serial").text = "rctest-data"
    ET.SubElement(disk("cdrom", "raw", seed, "hdc", "ide"), "readonly")
    nic = ET.SubElement(devices, "interface", type="bridge")
    ET.SubElement(nic, "source", bridge=bridge)
    ET.SubElement(nic, "mac", address=mac)
    ET.SubElement(nic, "model", type="virtio")
    serial = ET.SubElement(devices, "serial", type="file")  # no <console>: define would fail
    ET.SubElement(serial, "source", path=str(console))
    ET.SubElement(serial, "target", port="0")
    ET.SubElement(devices, "memballoon", model="virtio")
    return ET.tostring(dom, encoding="unicode")


def free_subnet() -> int:
    """A third octet X with 10.254.X.0/24 unused on this host."""
    used = run("ip", "-4", "-o", "addr", "show").stdout
    for _ in range(100):
        x = random.randint(1, 254)
        if f" 10.254.{x}." not in used:
            return x
    raise RuntimeError("no free 10.254.X.0/24")


@dataclass
class Guest:
    name: str
    ip: str
    console: Path

    def console_text(self) -> str:
        try:
            return self.console.read_text(errors="replace")
        except OSError as exc:
            return f"(no console log: {exc})"


@pytest.fixture
def guest() -> Iterator[Guest]:
    name = f"rctest-g{secrets.token_hex(3)}"  # 14 characters: bridge names allow 15
    x = free_subnet()
    TEST_TMP.mkdir(parents=True, exist_ok=True)
    TEST_TMP.chmod(0o755)
    workdir = TEST_TMP / name
    workdir.mkdir(mode=0o755)
    workdir.chmod(0o755)
    defined = bridge = False
    try:
        run("ip", "link", "add", "name", name, "type", "bridge")
        bridge = True
        run("ip", "addr", "add", f"10.254.{x}.1/24", "dev", name)
        run("ip", "link", "set", name, "up")

        overlay, data = workdir / "root.qcow2", workdir / "data.qcow2"
        seed, console = workdir / "seed.iso", workdir / "console.log"
        run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(IMAGE),
            str(overlay))
        run("qemu-img", "create", "-q", "-f", "qcow2", str(data), "64M")
        mac = "52:54:00:%02x:%02x:%02x" % tuple(secrets.token_bytes(3))
        make_seed_iso(seed, {
            "meta-data": f"instance-id: {name}\nlocal-hostname: {name}\n",
            "user-data": "#!/bin/sh\necho user-data ran > /www/user-data.txt\n",
            "network-config": (
                "version: 2\n"
                "ethernets:\n"
                "  nic0:\n"
                "    match:\n"
                f'      macaddress: "{mac}"\n'
                "    set-name: eth0\n"
                "    mtu: 1450\n"
                "    dhcp4: false\n"
                "    addresses:\n"
                f"      - 10.254.{x}.10/24\n"
                f"    gateway4: 10.254.{x}.1\n"
                "    nameservers:\n"
                "      addresses:\n"
                f"        - 10.254.{x}.1\n"
            ),
        })
        xml_path = workdir / "domain.xml"
        xml_path.write_text(domain_xml(name, overlay, data, seed, name, mac, console))
        virsh("define", str(xml_path))
        defined = True
        yield Guest(name=name, ip=f"10.254.{x}.10", console=console)
    finally:
        if defined:
            virsh("destroy", name, check=False)
            virsh("undefine", name, check=False)
        if bridge:
            run("ip", "link", "del", name, check=False)
        shutil.rmtree(workdir, ignore_errors=True)


def http_get(url: str, timeout: float = 3.0) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy
    with opener.open(url, timeout=timeout) as response:
        return response.read().decode()


def test_guest_boots_answers_and_shuts_down_gracefully(guest: Guest) -> None:
    started = time.monotonic()
    virsh("start", guest.name)
    info = None
    while time.monotonic() - started < BOOT_TIMEOUT:
        try:
            info = http_get(f"http://{guest.ip}/cgi-bin/info")
            break
        except OSError:
            time.sleep(0.5)
    boot_seconds = time.monotonic() - started
    assert info is not None, (
        f"no HTTP answer from {guest.ip} within {BOOT_TIMEOUT:.0f} s; "
        f"state {virsh('domstate', guest.name, check=False).stdout.strip()!r}; "
        f"console:\n{guest.console_text()}"
    )
    print(f"first HTTP answer {boot_seconds:.1f} s after virsh start")
    lines = info.splitlines()
    assert f"hostname={guest.name}" in lines, info
    assert f"ip=eth0,{guest.ip}/24" in lines, info
    assert "mtu=eth0,1450" in lines, info
    assert "nproc=1" in lines, info
    memtotal = next(int(line.split("=", 1)[1]) for line in lines if line.startswith("memtotal_kb="))
    assert 64 * 1024 < memtotal <= 128 * 1024, info
    assert "disk=vda,,33554432" in lines, info
    assert "disk=vdb,rctest-data,67108864" in lines, info
    assert guest.name in http_get(f"http://{guest.ip}/")
    # user-data runs in the background after the network: give it a moment.
    deadline = time.monotonic() + 10
    while True:
        try:
            assert http_get(f"http://{guest.ip}/user-data.txt").strip() == "user-data ran"
            break
        except OSError:
            if time.monotonic() > deadline:
                raise

    virsh("shutdown", "--mode", "acpi", guest.name)
    deadline = time.monotonic() + SHUTDOWN_TIMEOUT
    state = ""
    while time.monotonic() < deadline:
        state = virsh("domstate", guest.name).stdout.strip()
        if state == "shut off":
            break
        time.sleep(0.3)
    assert state == "shut off", f"still {state!r}; console:\n{guest.console_text()}"
    assert "reconciler-guest: power button" in guest.console_text()
