"""Domain XML config objects: round trips, libvirt-normalised XML, units, and errors.

The four XML fixtures below were captured on this project's libvirt 9.0 host
(QEMU 7.2): a domain built by ``DomainConfig(...).to_xml()`` was defined with
``virsh -c qemu:///system define``, read back with ``virsh dumpxml --inactive`` (and,
for the first one, started and read with ``virsh dumpxml``), then undefined; the last
one got our mark through ``virsh metadata --set`` (libvirt's setMetadata) instead. They
are embedded verbatim (paths as they were), so the parse tests never need libvirt; the
``test_live_libvirt_*`` tests repeat the capture when virsh and libvirtd are there.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from hostcheck import require_host

from reconciler.drivers.libvirt._config import (
    NS,
    DiskConfig,
    DomainConfig,
    InterfaceConfig,
    OwnerMetadata,
    XMLParseError,
)

CAPTURE_DIR = "/tmp/rctest-u-gb8u4u81"
USERDATA_HASH = "sha256:" + "0" * 64
CAPTURE_MARK = {
    "kind": "Instance", "tenant": "acme", "name": "vm", "specHash": "abc123",
    "applied": {"vcpus": 1, "userData": USERDATA_HASH}, "orphaned": False, "dependsOn": [],
}
CAPTURE_SPEC = {"vcpus": 1, "memoryMiB": 256, "image": "tiny", "userData": USERDATA_HASH}


def captured_config() -> DomainConfig:
    """What was defined to produce INACTIVE_XML and LIVE_XML (MAC given in upper case)."""
    d = CAPTURE_DIR
    return DomainConfig(
        name="rctest-u-capture", domain_type="qemu", title="acme/vm",
        description="Instance acme/vm, managed by reconciler",
        memory_kib=262144, current_memory_kib=196608, vcpus=1, max_vcpus=2, machine="pc",
        disks=[
            DiskConfig(f"{d}/root.qcow2", "vda", "qcow2"),
            DiskConfig(f"{d}/seed.iso", "hdc", "raw", device="cdrom", bus="ide", readonly=True),
            DiskConfig(f"{d}/data.raw", "vdb", "raw", serial="rc-0123456789"),
        ],
        interfaces=[InterfaceConfig("52:54:00:AB:CD:EF", "rctestubr0", mtu=1450)],
        console_log=f"{d}/console.log",
        owner=OwnerMetadata(CAPTURE_MARK, CAPTURE_SPEC),
    )


def captured_config2() -> DomainConfig:
    """What produced INACTIVE2_XML: kvm, host CPU, a block disk, no balloon, no mark.
    Its <memory> was rewritten to unit='GiB' and <currentMemory> to unit='MiB' before
    the define; libvirt stores KiB."""
    return DomainConfig(
        name="rctest-u-plain", domain_type="kvm", memory_kib=1048576, vcpus=2, machine="q35",
        cpu_model=None,
        disks=[
            DiskConfig(f"{CAPTURE_DIR}/root.qcow2", "vda", "qcow2"),
            DiskConfig("/dev/rctest-u-vg/data", "vdb", "raw", serial="rc-abcdef0123", block=True),
        ],
        interfaces=[InterfaceConfig("52:54:00:12:34:56", "rctestubr1")],
        memballoon=False,
    )


# `virsh dumpxml --inactive rctest-u-capture`
INACTIVE_XML = """<domain type='qemu'>
  <name>rctest-u-capture</name>
  <uuid>ad516494-a825-482b-a9cc-ca3ffcd0e9c6</uuid>
  <title>acme/vm</title>
  <description>Instance acme/vm, managed by reconciler</description>
  <metadata xmlns:rc="https://reconciler.dev/xmlns/libvirt/1">
    <rc:instance kind="Instance" tenant="acme" name="vm" specHash="abc123">
      <rc:mark>{"applied": {"userData": "sha256:0000000000000000000000000000000000000000000000000000000000000000", "vcpus": 1}, "dependsOn": [], "kind": "Instance", "name": "vm", "orphaned": false, "specHash": "abc123", "tenant": "acme"}</rc:mark>
      <rc:spec>{"image": "tiny", "memoryMiB": 256, "userData": "sha256:0000000000000000000000000000000000000000000000000000000000000000", "vcpus": 1}</rc:spec>
    </rc:instance>
  </metadata>
  <memory unit='KiB'>262144</memory>
  <currentMemory unit='KiB'>196608</currentMemory>
  <vcpu placement='static' current='1'>2</vcpu>
  <os>
    <type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type>
    <boot dev='hd'/>
  </os>
  <features>
    <acpi/>
    <apic/>
  </features>
  <cpu mode='custom' match='exact' check='none'>
    <model fallback='allow'>qemu64</model>
  </cpu>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/tmp/rctest-u-gb8u4u81/root.qcow2'/>
      <target dev='vda' bus='virtio'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x03' function='0x0'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/tmp/rctest-u-gb8u4u81/data.raw'/>
      <target dev='vdb' bus='virtio'/>
      <serial>rc-0123456789</serial>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x04' function='0x0'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <source file='/tmp/rctest-u-gb8u4u81/seed.iso'/>
      <target dev='hdc' bus='ide'/>
      <readonly/>
      <address type='drive' controller='0' bus='1' target='0' unit='0'/>
    </disk>
    <controller type='usb' index='0' model='piix3-uhci'>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x01' function='0x2'/>
    </controller>
    <controller type='pci' index='0' model='pci-root'/>
    <controller type='ide' index='0'>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x01' function='0x1'/>
    </controller>
    <interface type='bridge'>
      <mac address='52:54:00:ab:cd:ef'/>
      <source bridge='rctestubr0'/>
      <model type='virtio'/>
      <mtu size='1450'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x02' function='0x0'/>
    </interface>
    <serial type='file'>
      <source path='/tmp/rctest-u-gb8u4u81/console.log' append='on'/>
      <target type='isa-serial' port='0'>
        <model name='isa-serial'/>
      </target>
    </serial>
    <console type='file'>
      <source path='/tmp/rctest-u-gb8u4u81/console.log' append='on'/>
      <target type='serial' port='0'/>
    </console>
    <input type='mouse' bus='ps2'/>
    <input type='keyboard' bus='ps2'/>
    <audio id='1' type='none'/>
    <memballoon model='virtio'>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x05' function='0x0'/>
    </memballoon>
    <rng model='virtio'>
      <backend model='random'>/dev/urandom</backend>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x06' function='0x0'/>
    </rng>
  </devices>
</domain>

"""

# `virsh dumpxml rctest-u-capture` while it ran (no guest OS: the balloon never moved)
LIVE_XML = """<domain type='qemu' id='12'>
  <name>rctest-u-capture</name>
  <uuid>ad516494-a825-482b-a9cc-ca3ffcd0e9c6</uuid>
  <title>acme/vm</title>
  <description>Instance acme/vm, managed by reconciler</description>
  <metadata xmlns:rc="https://reconciler.dev/xmlns/libvirt/1">
    <rc:instance kind="Instance" tenant="acme" name="vm" specHash="abc123">
      <rc:mark>{"applied": {"userData": "sha256:0000000000000000000000000000000000000000000000000000000000000000", "vcpus": 1}, "dependsOn": [], "kind": "Instance", "name": "vm", "orphaned": false, "specHash": "abc123", "tenant": "acme"}</rc:mark>
      <rc:spec>{"image": "tiny", "memoryMiB": 256, "userData": "sha256:0000000000000000000000000000000000000000000000000000000000000000", "vcpus": 1}</rc:spec>
    </rc:instance>
  </metadata>
  <memory unit='KiB'>262144</memory>
  <currentMemory unit='KiB'>262144</currentMemory>
  <vcpu placement='static' current='1'>2</vcpu>
  <resource>
    <partition>/machine</partition>
  </resource>
  <os>
    <type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type>
    <boot dev='hd'/>
  </os>
  <features>
    <acpi/>
    <apic/>
  </features>
  <cpu mode='custom' match='exact' check='full'>
    <model fallback='forbid'>qemu64</model>
    <feature policy='require' name='hypervisor'/>
    <feature policy='require' name='lahf_lm'/>
  </cpu>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/tmp/rctest-u-gb8u4u81/root.qcow2' index='3'/>
      <backingStore/>
      <target dev='vda' bus='virtio'/>
      <alias name='virtio-disk0'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x03' function='0x0'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/tmp/rctest-u-gb8u4u81/data.raw' index='2'/>
      <backingStore/>
      <target dev='vdb' bus='virtio'/>
      <serial>rc-0123456789</serial>
      <alias name='virtio-disk1'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x04' function='0x0'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <source file='/tmp/rctest-u-gb8u4u81/seed.iso' index='1'/>
      <backingStore/>
      <target dev='hdc' bus='ide'/>
      <readonly/>
      <alias name='ide0-1-0'/>
      <address type='drive' controller='0' bus='1' target='0' unit='0'/>
    </disk>
    <controller type='usb' index='0' model='piix3-uhci'>
      <alias name='usb'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x01' function='0x2'/>
    </controller>
    <controller type='pci' index='0' model='pci-root'>
      <alias name='pci.0'/>
    </controller>
    <controller type='ide' index='0'>
      <alias name='ide'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x01' function='0x1'/>
    </controller>
    <interface type='bridge'>
      <mac address='52:54:00:ab:cd:ef'/>
      <source bridge='rctestubr0'/>
      <target dev='vnet12'/>
      <model type='virtio'/>
      <mtu size='1450'/>
      <alias name='net0'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x02' function='0x0'/>
    </interface>
    <serial type='file'>
      <source path='/tmp/rctest-u-gb8u4u81/console.log' append='on'/>
      <target type='isa-serial' port='0'>
        <model name='isa-serial'/>
      </target>
      <alias name='serial0'/>
    </serial>
    <console type='file'>
      <source path='/tmp/rctest-u-gb8u4u81/console.log' append='on'/>
      <target type='serial' port='0'/>
      <alias name='serial0'/>
    </console>
    <input type='mouse' bus='ps2'>
      <alias name='input0'/>
    </input>
    <input type='keyboard' bus='ps2'>
      <alias name='input1'/>
    </input>
    <audio id='1' type='none'/>
    <memballoon model='virtio'>
      <alias name='balloon0'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x05' function='0x0'/>
    </memballoon>
    <rng model='virtio'>
      <backend model='random'>/dev/urandom</backend>
      <alias name='rng0'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x06' function='0x0'/>
    </rng>
  </devices>
  <seclabel type='dynamic' model='dac' relabel='yes'>
    <label>+64055:+64055</label>
    <imagelabel>+64055:+64055</imagelabel>
  </seclabel>
</domain>

"""

# `virsh dumpxml --inactive rctest-u-plain` (never started; `virsh dumpxml` gave the same)
INACTIVE2_XML = """<domain type='kvm'>
  <name>rctest-u-plain</name>
  <uuid>8c95228e-a702-49a4-ad1a-fab33039a08b</uuid>
  <memory unit='KiB'>1048576</memory>
  <currentMemory unit='KiB'>1048576</currentMemory>
  <vcpu placement='static'>2</vcpu>
  <os>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <boot dev='hd'/>
  </os>
  <features>
    <acpi/>
    <apic/>
  </features>
  <cpu mode='host-passthrough' check='none' migratable='on'/>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/tmp/rctest-u-gb8u4u81/root.qcow2'/>
      <target dev='vda' bus='virtio'/>
      <address type='pci' domain='0x0000' bus='0x03' slot='0x00' function='0x0'/>
    </disk>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw'/>
      <source dev='/dev/rctest-u-vg/data'/>
      <target dev='vdb' bus='virtio'/>
      <serial>rc-abcdef0123</serial>
      <address type='pci' domain='0x0000' bus='0x04' slot='0x00' function='0x0'/>
    </disk>
    <controller type='usb' index='0' model='qemu-xhci'>
      <address type='pci' domain='0x0000' bus='0x02' slot='0x00' function='0x0'/>
    </controller>
    <controller type='sata' index='0'>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x1f' function='0x2'/>
    </controller>
    <controller type='pci' index='0' model='pcie-root'/>
    <controller type='pci' index='1' model='pcie-root-port'>
      <model name='pcie-root-port'/>
      <target chassis='1' port='0x8'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x01' function='0x0' multifunction='on'/>
    </controller>
    <controller type='pci' index='2' model='pcie-root-port'>
      <model name='pcie-root-port'/>
      <target chassis='2' port='0x9'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x01' function='0x1'/>
    </controller>
    <controller type='pci' index='3' model='pcie-root-port'>
      <model name='pcie-root-port'/>
      <target chassis='3' port='0xa'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x01' function='0x2'/>
    </controller>
    <controller type='pci' index='4' model='pcie-root-port'>
      <model name='pcie-root-port'/>
      <target chassis='4' port='0xb'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x01' function='0x3'/>
    </controller>
    <controller type='pci' index='5' model='pcie-root-port'>
      <model name='pcie-root-port'/>
      <target chassis='5' port='0xc'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x01' function='0x4'/>
    </controller>
    <controller type='pci' index='6' model='pcie-root-port'>
      <model name='pcie-root-port'/>
      <target chassis='6' port='0xd'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x01' function='0x5'/>
    </controller>
    <interface type='bridge'>
      <mac address='52:54:00:12:34:56'/>
      <source bridge='rctestubr1'/>
      <model type='virtio'/>
      <address type='pci' domain='0x0000' bus='0x01' slot='0x00' function='0x0'/>
    </interface>
    <input type='mouse' bus='ps2'/>
    <input type='keyboard' bus='ps2'/>
    <audio id='1' type='none'/>
    <memballoon model='none'/>
    <rng model='virtio'>
      <backend model='random'>/dev/urandom</backend>
      <address type='pci' domain='0x0000' bus='0x05' slot='0x00' function='0x0'/>
    </rng>
  </devices>
</domain>

"""


# `virsh dumpxml --inactive rctest-u-adopted` after `virsh metadata rctest-u-adopted
# --uri NS --key rc --set "$(OwnerMetadata(...).to_metadata_xml())" --config` (the
# setMetadata call of adopt/orphan) on a domain defined without our mark
INACTIVE3_XML = """<domain type='qemu'>
  <name>rctest-u-adopted</name>
  <uuid>ef25646c-1342-4ae1-bd2f-d85c03b78b21</uuid>
  <metadata>
    <rc:instance xmlns:rc="https://reconciler.dev/xmlns/libvirt/1" kind="Instance" tenant="acme" name="old-vm" specHash="h9">
      <rc:mark>{"applied": {"image": "tiny", "userData": "sha256:1111111111111111111111111111111111111111111111111111111111111111"}, "dependsOn": [], "kind": "Instance", "name": "old-vm", "orphaned": false, "specHash": "h9", "tenant": "acme"}</rc:mark>
      <rc:spec>{"image": "tiny", "memoryMiB": 128, "userData": "sha256:1111111111111111111111111111111111111111111111111111111111111111", "vcpus": 1}</rc:spec>
    </rc:instance>
  </metadata>
  <memory unit='KiB'>131072</memory>
  <currentMemory unit='KiB'>131072</currentMemory>
  <vcpu placement='static'>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type>
    <boot dev='hd'/>
  </os>
  <features>
    <acpi/>
    <apic/>
  </features>
  <cpu mode='custom' match='exact' check='none'>
    <model fallback='allow'>qemu64</model>
  </cpu>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/tmp/rctest-u-gb8u4u81/root.qcow2'/>
      <target dev='vda' bus='virtio'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x02' function='0x0'/>
    </disk>
    <controller type='usb' index='0' model='piix3-uhci'>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x01' function='0x2'/>
    </controller>
    <controller type='pci' index='0' model='pci-root'/>
    <input type='mouse' bus='ps2'/>
    <input type='keyboard' bus='ps2'/>
    <audio id='1' type='none'/>
    <memballoon model='virtio'>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x03' function='0x0'/>
    </memballoon>
    <rng model='virtio'>
      <backend model='random'>/dev/urandom</backend>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x04' function='0x0'/>
    </rng>
  </devices>
</domain>

"""

# --- helpers ---------------------------------------------------------------------------


def by_target(cfg: DomainConfig) -> dict[str, DiskConfig]:
    return {d.target: d for d in cfg.disks}


def roundtrip(cfg: DomainConfig) -> DomainConfig:
    return DomainConfig.parse(cfg.to_xml())


def full_domain(**overrides) -> DomainConfig:
    fields = dict(
        name="rc-0123456789",
        domain_type="kvm",
        uuid="6f1c1b1e-7a52-4f5e-9a11-0c2b9f0d6a77",
        title="acme/web-1",
        description="Instance acme/web-1, managed by reconciler",
        memory_kib=524288,
        current_memory_kib=524288,
        vcpus=2,
        max_vcpus=2,
        machine="pc",
        cpu_model=None,
        disks=[
            DiskConfig("/var/lib/rc/instances/rc-0123456789/root.qcow2", "vda", "qcow2"),
            DiskConfig("/var/lib/rc/instances/rc-0123456789/seed.iso", "hdc", "raw",
                       device="cdrom", bus="ide", readonly=True),
            DiskConfig("/var/lib/rc/volumes/data.raw", "vdb", "raw", serial="rc-aaaaaaaaaa"),
            DiskConfig("/dev/rcvg/rc-bbbbbbbbbb", "vdc", "raw", serial="rc-bbbbbbbbbb", block=True),
        ],
        interfaces=[
            InterfaceConfig("52:54:00:0a:0b:0c", "rc-1111111111", mtu=1450),
            InterfaceConfig("52:54:00:0d:0e:0f", "rc-2222222222"),
        ],
        console_log="/var/lib/rc/instances/rc-0123456789/console.log",
        memballoon=True,
        owner=OwnerMetadata(
            {"kind": "Instance", "tenant": "acme", "name": "web-1", "specHash": "h1",
             "applied": {"vcpus": 2, "userData": USERDATA_HASH}, "orphaned": False,
             "dependsOn": []},
            {"vcpus": 2, "memoryMiB": 512, "image": "tiny", "networks": [{"network": "web"}],
             "note": "ünïcode & <markup>"},
        ),
    )
    fields.update(overrides)
    return DomainConfig(**fields)


def domain_xml(inner: str = "", *, memory: str = "<memory unit='KiB'>131072</memory>") -> str:
    return f"<domain type='qemu'><name>x</name>{memory}{inner}<devices/></domain>"


# --- round trips ----------------------------------------------------------------------


def test_full_domain_round_trips() -> None:
    cfg = full_domain()
    assert roundtrip(cfg) == cfg


def test_round_trip_keeps_every_disk_kind() -> None:
    disks = by_target(roundtrip(full_domain()))
    root = "/var/lib/rc/instances/rc-0123456789/root.qcow2"
    assert disks["vda"] == DiskConfig(root, "vda", "qcow2")
    cdrom = disks["hdc"]
    assert (cdrom.device, cdrom.bus, cdrom.readonly, cdrom.format) == ("cdrom", "ide", True, "raw")
    assert disks["vdb"].serial == "rc-aaaaaaaaaa" and not disks["vdb"].block
    block = disks["vdc"]
    assert block.block and block.source == "/dev/rcvg/rc-bbbbbbbbbb"
    assert block.serial == "rc-bbbbbbbbbb"
    assert not block.readonly and disks["vda"].serial is None


def test_block_disk_uses_source_dev_and_file_disk_source_file() -> None:
    block = ET.fromstring(DiskConfig("/dev/sdz", "vdb", "raw", block=True).to_xml())
    assert block.get("type") == "block" and block.find("source").attrib == {"dev": "/dev/sdz"}
    file = ET.fromstring(DiskConfig("/x/y.qcow2", "vdb").to_xml())
    assert file.get("type") == "file" and file.find("source").attrib == {"file": "/x/y.qcow2"}
    assert file.find("readonly") is None and file.find("serial") is None


def test_nics_round_trip_with_and_without_mtu() -> None:
    nics = roundtrip(full_domain()).interfaces
    assert nics == [
        InterfaceConfig("52:54:00:0a:0b:0c", "rc-1111111111", mtu=1450),
        InterfaceConfig("52:54:00:0d:0e:0f", "rc-2222222222", mtu=None),
    ]
    assert ET.fromstring(nics[1].to_xml()).find("mtu") is None


def test_upper_case_mac_parses_lower_case() -> None:
    xml = InterfaceConfig("52:54:00:AB:CD:EF", "br0").to_xml()
    nic = InterfaceConfig.from_element(ET.fromstring(xml))
    assert nic.mac == "52:54:00:ab:cd:ef"


def test_console_log_round_trips_and_is_optional() -> None:
    assert roundtrip(full_domain()).console_log == "/var/lib/rc/instances/rc-0123456789/console.log"
    cfg = full_domain(console_log=None)
    assert ET.fromstring(cfg.to_xml()).find("devices/serial") is None
    assert roundtrip(cfg).console_log is None


@pytest.mark.parametrize("balloon", [True, False])
def test_memballoon_virtio_or_none(balloon: bool) -> None:
    cfg = full_domain(memballoon=balloon)
    model = ET.fromstring(cfg.to_xml()).find("devices/memballoon").get("model")
    assert model == ("virtio" if balloon else "none")
    assert roundtrip(cfg).memballoon is balloon


def test_vcpus_current_below_max() -> None:
    cfg = full_domain(vcpus=2, max_vcpus=8)
    vcpu = ET.fromstring(cfg.to_xml()).find("vcpu")
    assert (vcpu.text, vcpu.get("current")) == ("8", "2")
    back = roundtrip(cfg)
    assert (back.vcpus, back.max_vcpus) == (2, 8)


def test_vcpus_without_max_has_no_current_attribute() -> None:
    cfg = full_domain(vcpus=3, max_vcpus=None)
    assert ET.fromstring(cfg.to_xml()).find("vcpu").get("current") is None
    back = roundtrip(cfg)
    assert (back.vcpus, back.max_vcpus) == (3, 3)


def test_current_memory_defaults_to_memory() -> None:
    cfg = full_domain(memory_kib=1048576, current_memory_kib=None)
    back = roundtrip(cfg)
    assert (back.memory_kib, back.current_memory_kib) == (1048576, 1048576)
    back = roundtrip(full_domain(memory_kib=1048576, current_memory_kib=524288))
    assert (back.memory_kib, back.current_memory_kib) == (1048576, 524288)


def test_cpu_model_custom_or_host_passthrough() -> None:
    assert roundtrip(full_domain(cpu_model="qemu64")).cpu_model == "qemu64"
    cfg = full_domain(cpu_model=None)
    assert ET.fromstring(cfg.to_xml()).find("cpu").get("mode") == "host-passthrough"
    assert roundtrip(cfg).cpu_model is None


def test_owner_metadata_in_our_namespace() -> None:
    cfg = full_domain()
    root = ET.fromstring(cfg.to_xml())
    (elem,) = root.findall(f"metadata/{{{NS}}}instance")
    assert NS == "https://reconciler.dev/xmlns/libvirt/1"
    assert elem.attrib == {"kind": "Instance", "tenant": "acme", "name": "web-1", "specHash": "h1"}
    assert json.loads(elem.findtext(f"{{{NS}}}mark")) == cfg.owner.mark
    assert json.loads(elem.findtext(f"{{{NS}}}spec")) == cfg.owner.spec
    assert roundtrip(cfg).owner == cfg.owner


def test_owner_metadata_alone_round_trips() -> None:
    owner = OwnerMetadata({"kind": "Instance", "name": "a"}, {"vcpus": 1})
    assert OwnerMetadata.from_element(ET.fromstring(owner.to_xml())) == owner


def test_domain_without_owner_parses_as_unowned() -> None:
    cfg = full_domain(owner=None)
    assert ET.fromstring(cfg.to_xml()).find("metadata") is None
    assert roundtrip(cfg).owner is None


def test_other_metadata_is_not_ours() -> None:
    xml = domain_xml().replace(
        "<name>x</name>",
        "<name>x</name><metadata><o:instance xmlns:o='https://example.org/other'>"
        "<o:mark>{}</o:mark></o:instance></metadata>",
    )
    assert DomainConfig.parse(xml).owner is None


def test_minimal_domain_round_trips() -> None:
    cfg = DomainConfig(name="tiny")
    back = roundtrip(cfg)
    assert dataclasses.replace(back, current_memory_kib=None, max_vcpus=None) == cfg
    assert (back.memory_kib, back.vcpus, back.disks, back.interfaces) == (131072, 1, [], [])


def test_disk_lookup_by_target() -> None:
    cfg = full_domain()
    assert cfg.disk("vdb").serial == "rc-aaaaaaaaaa"
    assert cfg.disk("vdz") is None


# --- libvirt-normalised XML -----------------------------------------------------------


def _assert_as_built(parsed: DomainConfig, built: DomainConfig, machine: str) -> None:
    """Everything we compare is what we put in, however libvirt normalised the XML."""
    assert parsed.name == built.name
    assert parsed.domain_type == built.domain_type
    assert parsed.title == built.title and parsed.description == built.description
    assert parsed.memory_kib == built.memory_kib
    assert parsed.vcpus == built.vcpus
    assert parsed.max_vcpus == (built.max_vcpus or built.vcpus)
    assert parsed.machine == machine
    assert parsed.cpu_model == built.cpu_model
    # libvirt reorders disks (by bus); we match them by target
    assert by_target(parsed) == by_target(built)
    lower = [dataclasses.replace(i, mac=i.mac.lower()) for i in built.interfaces]
    assert parsed.interfaces == lower
    assert parsed.console_log == built.console_log
    assert parsed.memballoon == built.memballoon
    assert parsed.owner == built.owner


def test_inactive_libvirt_xml_parses_to_what_we_defined() -> None:
    parsed = DomainConfig.parse(INACTIVE_XML)
    _assert_as_built(parsed, captured_config(), machine="pc-i440fx-7.2")
    assert parsed.uuid == "ad516494-a825-482b-a9cc-ca3ffcd0e9c6"
    assert parsed.current_memory_kib == 196608
    assert parsed.interfaces[0].mac == "52:54:00:ab:cd:ef"
    # libvirt added a <console> mirroring the serial port, controllers, inputs and
    # <address> elements: none of them shows up
    assert [d.target for d in parsed.disks] == ["vda", "vdb", "hdc"]


def test_live_libvirt_xml_parses_to_what_we_defined() -> None:
    parsed = DomainConfig.parse(LIVE_XML)
    _assert_as_built(parsed, captured_config(), machine="pc-i440fx-7.2")
    # <alias>, <backingStore/>, source index=, <target dev='vnet12'/>, the CPU features
    # and check='full' are ignored; currentMemory is the balloon's (nothing moved it)
    assert parsed.current_memory_kib == 262144
    assert parsed.uuid == DomainConfig.parse(INACTIVE_XML).uuid


def test_normalised_xml_of_a_kvm_domain_with_a_block_disk() -> None:
    parsed = DomainConfig.parse(INACTIVE2_XML)
    _assert_as_built(parsed, captured_config2(), machine="pc-q35-7.2")
    assert (parsed.memory_kib, parsed.current_memory_kib) == (1048576, 1048576)  # was GiB / MiB
    assert parsed.owner is None and parsed.console_log is None and not parsed.memballoon
    block = parsed.disk("vdb")
    assert block.block and block.source == "/dev/rctest-u-vg/data"


ADOPTED_MARK = {
    "kind": "Instance", "tenant": "acme", "name": "old-vm", "specHash": "h9",
    "applied": {"image": "tiny", "userData": "sha256:" + "1" * 64}, "orphaned": False,
    "dependsOn": [],
}
ADOPTED_SPEC = {"image": "tiny", "vcpus": 1, "memoryMiB": 128, "userData": "sha256:" + "1" * 64}


def test_metadata_set_through_libvirt_parses_to_our_owner() -> None:
    parsed = DomainConfig.parse(INACTIVE3_XML)
    assert parsed.owner == OwnerMetadata(ADOPTED_MARK, ADOPTED_SPEC)
    assert (parsed.name, parsed.memory_kib, parsed.vcpus) == ("rctest-u-adopted", 131072, 1)
    assert parsed.machine == "pc-i440fx-7.2"


def test_metadata_xml_for_set_metadata_has_no_namespace() -> None:
    owner = OwnerMetadata(ADOPTED_MARK, ADOPTED_SPEC)
    text = owner.to_metadata_xml()
    assert NS not in text and "rc:" not in text
    elem = ET.fromstring(text)
    assert [elem.tag] + [c.tag for c in elem] == ["instance", "mark", "spec"]
    assert elem.attrib == {"kind": "Instance", "tenant": "acme", "name": "old-vm", "specHash": "h9"}
    assert OwnerMetadata.from_element(elem) == owner


def test_parsed_libvirt_xml_builds_back_to_the_same_config() -> None:
    parsed = DomainConfig.parse(INACTIVE_XML)
    assert roundtrip(parsed) == parsed


def test_captured_fixtures_came_from_our_builder() -> None:
    """Guards the fixture: our own XML of the captured config names the same things."""
    built = ET.fromstring(captured_config().to_xml())
    got = ET.fromstring(INACTIVE_XML)
    for path in ("name", "title", "description", "memory", "currentMemory", "vcpu"):
        assert built.findtext(path) == got.findtext(path), path
    assert got.find("devices/address") is None  # addresses sit inside devices
    assert got.find("devices/disk/address") is not None
    assert ET.fromstring(LIVE_XML).find("devices/interface/alias").get("name") == "net0"


# --- units ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("unit", "value", "kib"),
    [
        ("KiB", "262144", 262144),
        ("k", "1024", 1024),
        ("MiB", "256", 262144),
        ("M", "256", 262144),
        ("GiB", "2", 2097152),
        ("G", "1", 1048576),
        ("TiB", "1", 1073741824),
        ("bytes", "268435456", 262144),
        ("b", "1048576", 1024),
        ("KB", "1024000", 1000000),
        ("MB", "1000", 976562),  # 10^9 bytes, rounded down to whole KiB
        ("GB", "1", 976562),
    ],
)
def test_memory_units(unit: str, value: str, kib: int) -> None:
    xml = domain_xml(memory=f"<memory unit='{unit}'>{value}</memory>"
                            f"<currentMemory unit='{unit}'>{value}</currentMemory>")
    cfg = DomainConfig.parse(xml)
    assert cfg.memory_kib == kib
    assert cfg.current_memory_kib == kib


def test_memory_without_unit_is_kib() -> None:
    cfg = DomainConfig.parse(domain_xml(memory="<memory>4096</memory>"))
    assert cfg.memory_kib == 4096 and cfg.current_memory_kib is None


def test_memory_with_whitespace() -> None:
    cfg = DomainConfig.parse(domain_xml(memory="<memory unit='MiB'>\n  512\n</memory>"))
    assert cfg.memory_kib == 524288


def test_unknown_memory_unit_is_a_parse_error() -> None:
    with pytest.raises(XMLParseError, match="unknown memory unit"):
        DomainConfig.parse(domain_xml(memory="<memory unit='furlongs'>1</memory>"))


# --- errors ---------------------------------------------------------------------------

OWNED = (
    "<domain type='qemu'><name>x</name><metadata>"
    f"<rc:instance xmlns:rc='{NS}' kind='Instance'>{{inner}}</rc:instance>"
    "</metadata><memory unit='KiB'>131072</memory><devices/></domain>"
)

BAD = {
    "empty string": "",
    "not XML": "this is not xml",
    "unclosed": "<domain><name>x</name>",
    "two roots": "<domain><name>x</name></domain><domain/>",
    "root is not domain": "<network><name>x</name></network>",
    "namespaced domain root": f"<rc:domain xmlns:rc='{NS}'><name>x</name></rc:domain>",
    "no name": "<domain type='qemu'><memory>1</memory></domain>",
    "empty name": "<domain type='qemu'><name></name></domain>",
    "mark missing": OWNED.format(inner="<rc:spec>{}</rc:spec>"),
    "spec missing": OWNED.format(inner="<rc:mark>{}</rc:mark>"),
    "both missing": OWNED.format(inner=""),
    "mark not JSON": OWNED.format(inner="<rc:mark>{not json</rc:mark><rc:spec>{}</rc:spec>"),
    "spec not JSON": OWNED.format(inner="<rc:mark>{}</rc:mark><rc:spec>nope</rc:spec>"),
    "mark empty": OWNED.format(inner="<rc:mark></rc:mark><rc:spec>{}</rc:spec>"),
    "mark a list": OWNED.format(inner="<rc:mark>[1, 2]</rc:mark><rc:spec>{}</rc:spec>"),
    "spec a string": OWNED.format(inner="<rc:mark>{}</rc:mark><rc:spec>\"s\"</rc:spec>"),
    "mark and spec in a foreign namespace": OWNED.format(
        inner="<o:mark xmlns:o='https://example.org/o'>{}</o:mark>"
              "<o:spec xmlns:o='https://example.org/o'>{}</o:spec>"
    ),
}


@pytest.mark.parametrize("xml", list(BAD.values()), ids=list(BAD))
def test_bad_xml_is_a_parse_error(xml: str) -> None:
    with pytest.raises(XMLParseError) as info:
        DomainConfig.parse(xml)
    assert type(info.value) is XMLParseError
    assert isinstance(info.value, ValueError)


def test_metadata_children_without_a_namespace_parse() -> None:
    """What setMetadata may store: only the root element in our namespace."""
    cfg = DomainConfig.parse(OWNED.format(inner='<mark>{"a": 1}</mark><spec>{"b": 2}</spec>'))
    assert cfg.owner == OwnerMetadata({"a": 1}, {"b": 2})


def test_a_good_owned_domain_parses() -> None:
    """The error cases above differ from this one only in what they break."""
    cfg = DomainConfig.parse(OWNED.format(inner='<rc:mark>{"a": 1}</rc:mark><rc:spec>{}</rc:spec>'))
    assert cfg.owner == OwnerMetadata({"a": 1}, {})


# Numbers that are not numbers: libvirt never writes them, but the parser's contract is
# XMLParseError for anything it cannot read. These raise a bare ValueError from int()
# today, which `_observe_instances` does not catch (it catches XMLParseError), so one
# such domain would abort the whole observe.
NOT_NUMBERS = {
    "memory": domain_xml(memory="<memory unit='KiB'>lots</memory>"),
    "currentMemory": domain_xml("<currentMemory unit='KiB'>1.5</currentMemory>"),
    "vcpu": domain_xml("<vcpu>two</vcpu>"),
    "vcpu current": domain_xml("<vcpu current='x'>2</vcpu>"),
    "mtu": "<domain><name>x</name><devices><interface type='bridge'><mtu size='big'/>"
           "</interface></devices></domain>",
}


@pytest.mark.parametrize("xml", list(NOT_NUMBERS.values()), ids=list(NOT_NUMBERS))
def test_non_numeric_values_are_a_parse_error(xml: str) -> None:
    with pytest.raises(XMLParseError):
        DomainConfig.parse(xml)


# --- the capture, live ------------------------------------------------------------------

VIRSH = shutil.which("virsh")
URI = "qemu:///system"


def _virsh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    assert VIRSH is not None
    return subprocess.run([VIRSH, "-q", "-c", URI, *args], capture_output=True, text=True,
                          timeout=60, check=check)


def test_live_libvirt_round_trip(tmp_path: Path) -> None:
    """Define what we build, read libvirt's normalised XML back, compare, undefine."""
    require_host()
    name = f"rctest-u-{uuid.uuid4().hex[:10]}"
    for f in ("root.qcow2", "seed.iso", "data.raw"):
        (tmp_path / f).write_bytes(b"")
    built = dataclasses.replace(
        captured_config(),
        name=name,
        disks=[
            DiskConfig(str(tmp_path / "root.qcow2"), "vda", "qcow2"),
            DiskConfig(str(tmp_path / "seed.iso"), "hdc", "raw", device="cdrom", bus="ide",
                       readonly=True),
            DiskConfig(str(tmp_path / "data.raw"), "vdb", "raw", serial="rc-0123456789"),
            DiskConfig("/dev/rctest-u-vg/data", "vdc", "raw", serial="rc-abcdef0123", block=True),
        ],
        console_log=str(tmp_path / "console.log"),
    )
    xml_file = tmp_path / "domain.xml"
    xml_file.write_text(built.to_xml())
    _virsh("define", str(xml_file))
    try:
        inactive = _virsh("dumpxml", "--inactive", name).stdout
        current = _virsh("dumpxml", name).stdout
    finally:
        _virsh("undefine", name, check=False)
    assert _virsh("domstate", name, check=False).returncode != 0  # really gone
    for text in (inactive, current):
        parsed = DomainConfig.parse(text)
        machine = parsed.machine
        assert machine.startswith("pc-i440fx-"), machine
        _assert_as_built(parsed, built, machine=machine)
        assert parsed.current_memory_kib == 196608
        assert parsed.uuid


def test_live_libvirt_set_metadata(tmp_path: Path) -> None:
    """Mark a domain the way adopt/orphan do (setMetadata), read it back, undefine."""
    require_host()
    name = f"rctest-u-{uuid.uuid4().hex[:10]}"
    plain = DomainConfig(name=name, disks=[DiskConfig(str(tmp_path / "root.qcow2"), "vda")])
    xml_file = tmp_path / "domain.xml"
    xml_file.write_text(plain.to_xml())
    owner = OwnerMetadata(ADOPTED_MARK, ADOPTED_SPEC)
    _virsh("define", str(xml_file))
    try:
        assert DomainConfig.parse(_virsh("dumpxml", "--inactive", name).stdout).owner is None
        _virsh("metadata", name, "--uri", NS, "--key", "rc", "--set", owner.to_metadata_xml(),
               "--config")
        parsed = DomainConfig.parse(_virsh("dumpxml", "--inactive", name).stdout)
    finally:
        _virsh("undefine", name, check=False)
    assert parsed.owner == owner


def test_owner_home_round_trips_in_both_forms() -> None:
    owner = OwnerMetadata({"kind": "Instance", "tenant": "t", "name": "n", "specHash": "h"}, {"vcpus": 1},
                          "/var/lib/reconciler/libvirt/instances")
    cfg = DomainConfig(name="rc-x", owner=owner)
    assert DomainConfig.parse(cfg.to_xml()).owner.home == owner.home
    plain = ET.fromstring(owner.to_metadata_xml())  # what setMetadata gets
    assert plain.get("home") == owner.home


def test_nic_tap_name_round_trips() -> None:
    """The tap is named so the network driver's per-port rules can match it."""
    xml = InterfaceConfig("52:54:00:ab:cd:ef", "rc-0123456789", target="rt-0123456789").to_xml()
    assert ET.fromstring(xml).find("target").get("dev") == "rt-0123456789"
    assert InterfaceConfig.from_element(ET.fromstring(xml)).target == "rt-0123456789"
    assert ET.fromstring(InterfaceConfig("52:54:00:ab:cd:ef", "br0").to_xml()).find("target") is None


def test_a_multiattach_disk_is_shareable_and_reads_back() -> None:
    disk = DiskConfig("/dev/vg0/rc-0123456789", "vdb", "raw", serial="rc-0123456789", block=True, shareable=True)
    elem = ET.fromstring(disk.to_xml())
    assert elem.get("type") == "block" and elem.find("shareable") is not None
    assert DiskConfig.from_element(elem) == disk
    assert ET.fromstring(DiskConfig("/v.qcow2", "vdc").to_xml()).find("shareable") is None
