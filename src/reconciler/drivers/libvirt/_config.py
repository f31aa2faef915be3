"""Domain XML as config objects: built with ElementTree, parsed back; no libvirt here.

Nova's `LibvirtConfig*` classes are the model: the driver fills a :class:`DomainConfig`,
`to_xml()` renders it, and :meth:`DomainConfig.parse` reads the XML libvirt hands back
(normalised by libvirt: machine type expanded, addresses and aliases added, units
converted). Parsing keeps only what we compare, so libvirt's normalisation never
shows up as a difference.

The ownership mark lives in ``<metadata>`` under our namespace::

    <rc:instance xmlns:rc="https://reconciler.dev/xmlns/libvirt/1"
                 kind="Instance" tenant="acme" name="web-1" specHash="...">
      <rc:mark>{...json...}</rc:mark>
      <rc:spec>{...json...}</rc:spec>
    </rc:instance>
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any

NS = "https://reconciler.dev/xmlns/libvirt/1"
NS_PREFIX = "rc"
ET.register_namespace(NS_PREFIX, NS)

_UNITS = {
    "b": 1, "bytes": 1, "k": 1024, "kib": 1024, "kb": 1000, "m": 1024**2, "mib": 1024**2,
    "mb": 1000**2, "g": 1024**3, "gib": 1024**3, "gb": 1000**3, "t": 1024**4, "tib": 1024**4,
}


class XMLParseError(ValueError):
    """The XML is not a domain we can read."""


@dataclass(slots=True)
class OwnerMetadata:
    """Our mark in the domain's <metadata>: the Mark as a dict, and the applied spec."""

    mark: dict[str, Any]
    spec: dict[str, Any]
    #: the instance dir of the installation (host config) that manages the domain; None
    #: in marks written before it was recorded. Another installation on the same libvirtd
    #: (another state dir: a test, a benchmark) must leave the domain alone.
    home: str | None = None

    def to_element(self) -> ET.Element:
        attrs = {
            "kind": str(self.mark.get("kind", "")),
            "tenant": str(self.mark.get("tenant", "")),
            "name": str(self.mark.get("name", "")),
            "specHash": str(self.mark.get("specHash", "")),
        }
        if self.home:
            attrs["home"] = self.home
        root = ET.Element(f"{{{NS}}}instance", attrs)
        ET.SubElement(root, f"{{{NS}}}mark").text = json.dumps(self.mark, sort_keys=True)
        ET.SubElement(root, f"{{{NS}}}spec").text = json.dumps(self.spec, sort_keys=True)
        return root

    def to_xml(self) -> str:
        return ET.tostring(self.to_element(), encoding="unicode")

    def to_metadata_xml(self) -> str:
        """The element without a namespace, as `virDomainSetMetadata` wants it (libvirt
        puts it in our namespace itself)."""
        elem = self.to_element()
        for node in elem.iter():
            node.tag = node.tag.split("}", 1)[-1]
        return ET.tostring(elem, encoding="unicode")

    @classmethod
    def from_element(cls, elem: ET.Element) -> "OwnerMetadata":
        # children are in our namespace (libvirt 9 namespaces them on setMetadata too);
        # accept un-namespaced ones as well, as older libvirt may store them
        mark_el = elem.find(f"{{{NS}}}mark")
        if mark_el is None:
            mark_el = elem.find("mark")
        spec_el = elem.find(f"{{{NS}}}spec")
        if spec_el is None:
            spec_el = elem.find("spec")
        if mark_el is None or spec_el is None:
            raise XMLParseError("our metadata element lacks <mark> or <spec>")
        try:
            mark = json.loads(mark_el.text or "")
            spec = json.loads(spec_el.text or "")
        except ValueError as exc:
            raise XMLParseError(f"our metadata is not JSON: {exc}") from None
        if not isinstance(mark, dict) or not isinstance(spec, dict):
            raise XMLParseError("our metadata must hold JSON objects")
        return cls(mark, spec, elem.get("home") or None)


@dataclass(slots=True)
class DiskConfig:
    """A disk or CD-ROM: `source` is a file path, or a block device when `block`."""

    source: str
    target: str  # vda, vdb..., hdc
    format: str = "qcow2"  # qcow2 | raw
    device: str = "disk"  # disk | cdrom
    bus: str = "virtio"  # virtio | ide | sata
    serial: str | None = None
    block: bool = False
    readonly: bool = False
    #: attached to several domains at once (a multiattach volume): no caching, no locks
    shareable: bool = False

    def to_element(self) -> ET.Element:
        disk = ET.Element("disk", {"type": "block" if self.block else "file", "device": self.device})
        ET.SubElement(disk, "driver", {"name": "qemu", "type": self.format})
        ET.SubElement(disk, "source", {"dev" if self.block else "file": self.source})
        ET.SubElement(disk, "target", {"dev": self.target, "bus": self.bus})
        if self.serial:
            ET.SubElement(disk, "serial").text = self.serial
        if self.readonly:
            ET.SubElement(disk, "readonly")
        if self.shareable:
            ET.SubElement(disk, "shareable")
        return disk

    def to_xml(self) -> str:
        return ET.tostring(self.to_element(), encoding="unicode")

    @classmethod
    def from_element(cls, elem: ET.Element) -> "DiskConfig":
        source = elem.find("source")
        target = elem.find("target")
        driver = elem.find("driver")
        serial = elem.find("serial")
        block = elem.get("type") == "block"
        path = ""
        if source is not None:
            path = source.get("dev" if block else "file") or ""
        return cls(
            source=path,
            target=target.get("dev", "") if target is not None else "",
            format=driver.get("type", "raw") if driver is not None else "raw",
            device=elem.get("device", "disk"),
            bus=target.get("bus", "") if target is not None else "",
            serial=serial.text if serial is not None else None,
            block=block,
            readonly=elem.find("readonly") is not None,
            shareable=elem.find("shareable") is not None,
        )


@dataclass(slots=True)
class InterfaceConfig:
    """A virtio NIC on a Linux bridge."""

    mac: str
    bridge: str
    mtu: int | None = None
    model: str = "virtio"
    #: the host-side tap's name (the network driver's per-port rules match it); not
    #: compared: libvirt names the taps of domains defined without one `vnetN`
    target: str | None = field(default=None, compare=False)

    def to_element(self) -> ET.Element:
        nic = ET.Element("interface", {"type": "bridge"})
        ET.SubElement(nic, "mac", {"address": self.mac})
        ET.SubElement(nic, "source", {"bridge": self.bridge})
        if self.target:
            ET.SubElement(nic, "target", {"dev": self.target})
        ET.SubElement(nic, "model", {"type": self.model})
        if self.mtu:
            ET.SubElement(nic, "mtu", {"size": str(self.mtu)})
        return nic

    def to_xml(self) -> str:
        return ET.tostring(self.to_element(), encoding="unicode")

    @classmethod
    def from_element(cls, elem: ET.Element) -> "InterfaceConfig":
        mac = elem.find("mac")
        source = elem.find("source")
        model = elem.find("model")
        mtu = elem.find("mtu")
        target = elem.find("target")
        return cls(
            mac=(mac.get("address", "") if mac is not None else "").lower(),
            bridge=source.get("bridge", "") if source is not None else "",
            mtu=_int(mtu.get("size", "0"), "<mtu size>") or None if mtu is not None else None,
            model=model.get("type", "") if model is not None else "",
            target=target.get("dev") if target is not None else None,
        )


@dataclass(slots=True)
class DomainConfig:
    """The parts of a domain we build and compare."""

    name: str
    domain_type: str = "qemu"  # kvm | qemu
    uuid: str | None = None
    title: str | None = None
    description: str | None = None
    memory_kib: int = 131072  # the maximum (<memory>)
    current_memory_kib: int | None = None  # <currentMemory>; None: same as memory
    vcpus: int = 1  # <vcpu current=...>
    max_vcpus: int | None = None  # <vcpu>N</vcpu>; None: same as vcpus
    machine: str = "pc"
    cpu_model: str | None = "qemu64"  # None: host-passthrough (kvm)
    disks: list[DiskConfig] = field(default_factory=list)
    interfaces: list[InterfaceConfig] = field(default_factory=list)
    console_log: str | None = None
    memballoon: bool = True
    owner: OwnerMetadata | None = None

    # --- building --------------------------------------------------------------------

    def to_element(self) -> ET.Element:
        dom = ET.Element("domain", {"type": self.domain_type})
        ET.SubElement(dom, "name").text = self.name
        if self.uuid:
            ET.SubElement(dom, "uuid").text = self.uuid
        if self.title:
            ET.SubElement(dom, "title").text = self.title
        if self.description:
            ET.SubElement(dom, "description").text = self.description
        if self.owner is not None:
            ET.SubElement(dom, "metadata").append(self.owner.to_element())
        ET.SubElement(dom, "memory", {"unit": "KiB"}).text = str(self.memory_kib)
        current = self.current_memory_kib if self.current_memory_kib is not None else self.memory_kib
        ET.SubElement(dom, "currentMemory", {"unit": "KiB"}).text = str(current)
        max_vcpus = self.max_vcpus if self.max_vcpus is not None else self.vcpus
        attrs = {"placement": "static"}
        if max_vcpus != self.vcpus:
            attrs["current"] = str(self.vcpus)
        ET.SubElement(dom, "vcpu", attrs).text = str(max_vcpus)
        os_el = ET.SubElement(dom, "os")
        ET.SubElement(os_el, "type", {"arch": "x86_64", "machine": self.machine}).text = "hvm"
        ET.SubElement(os_el, "boot", {"dev": "hd"})
        features = ET.SubElement(dom, "features")
        ET.SubElement(features, "acpi")
        ET.SubElement(features, "apic")
        if self.cpu_model:
            cpu = ET.SubElement(dom, "cpu", {"mode": "custom", "match": "exact"})
            ET.SubElement(cpu, "model", {"fallback": "allow"}).text = self.cpu_model
        else:
            ET.SubElement(dom, "cpu", {"mode": "host-passthrough"})
        ET.SubElement(dom, "clock", {"offset": "utc"})
        ET.SubElement(dom, "on_poweroff").text = "destroy"
        ET.SubElement(dom, "on_reboot").text = "restart"
        ET.SubElement(dom, "on_crash").text = "destroy"
        devices = ET.SubElement(dom, "devices")
        for disk in self.disks:
            devices.append(disk.to_element())
        for nic in self.interfaces:
            devices.append(nic.to_element())
        if self.console_log:
            # a file-backed serial port; no <console> element (define fails with one)
            serial = ET.SubElement(devices, "serial", {"type": "file"})
            ET.SubElement(serial, "source", {"path": self.console_log, "append": "on"})
            ET.SubElement(serial, "target", {"port": "0"})
        ET.SubElement(devices, "memballoon", {"model": "virtio" if self.memballoon else "none"})
        rng = ET.SubElement(devices, "rng", {"model": "virtio"})
        ET.SubElement(rng, "backend", {"model": "random"}).text = "/dev/urandom"
        return dom

    def to_xml(self) -> str:
        return ET.tostring(self.to_element(), encoding="unicode")

    # --- parsing ---------------------------------------------------------------------

    @classmethod
    def parse(cls, xml: str) -> "DomainConfig":
        try:
            dom = ET.fromstring(xml)
        except ET.ParseError as exc:
            raise XMLParseError(f"not XML: {exc}") from None
        if dom.tag != "domain":
            raise XMLParseError(f"root element is <{dom.tag}>, not <domain>")
        name = dom.findtext("name")
        if not name:
            raise XMLParseError("domain without a name")
        vcpu = dom.find("vcpu")
        max_vcpus = _int((vcpu.text or "1").strip(), "<vcpu>") if vcpu is not None else 1
        vcpus = _int(vcpu.get("current", max_vcpus), "<vcpu current>") if vcpu is not None else 1
        memory_kib = _kib(dom.find("memory")) or 0
        current = _kib(dom.find("currentMemory"))
        os_type = dom.find("os/type")
        cpu = dom.find("cpu")
        cpu_model = None
        if cpu is not None and cpu.get("mode", "custom") == "custom":
            cpu_model = cpu.findtext("model")
        disks = [DiskConfig.from_element(d) for d in dom.iterfind("devices/disk")]
        nics = [
            InterfaceConfig.from_element(i)
            for i in dom.iterfind("devices/interface")
        ]
        console_log = None
        for serial in dom.iterfind("devices/serial"):
            if serial.get("type") == "file":
                src = serial.find("source")
                console_log = src.get("path") if src is not None else None
        balloon = dom.find("devices/memballoon")
        owner = None
        meta = dom.find(f"metadata/{{{NS}}}instance")
        if meta is not None:
            owner = OwnerMetadata.from_element(meta)
        return cls(
            name=name,
            domain_type=dom.get("type", "qemu"),
            uuid=dom.findtext("uuid"),
            title=dom.findtext("title"),
            description=dom.findtext("description"),
            memory_kib=memory_kib,
            current_memory_kib=current,
            vcpus=vcpus,
            max_vcpus=max_vcpus,
            machine=os_type.get("machine", "") if os_type is not None else "",
            cpu_model=cpu_model,
            disks=disks,
            interfaces=nics,
            console_log=console_log,
            memballoon=balloon is not None and balloon.get("model") != "none",
            owner=owner,
        )

    # --- queries ---------------------------------------------------------------------

    def disk(self, target: str) -> DiskConfig | None:
        return next((d for d in self.disks if d.target == target), None)


def _kib(elem: ET.Element | None) -> int | None:
    if elem is None or not (elem.text or "").strip():
        return None
    unit = elem.get("unit", "KiB").lower()
    factor = _UNITS.get(unit)
    if factor is None:
        raise XMLParseError(f"unknown memory unit {unit!r}")
    return _int(elem.text.strip(), f"<{elem.tag}>") * factor // 1024  # type: ignore[union-attr]


def _int(value: object, what: str) -> int:
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise XMLParseError(f"{what} is not a whole number: {value!r}") from None
