"""Which domain type really runs a guest here: `kvm` when KVM boots one, else `qemu` (TCG).

A naive probe lies: where /dev/kvm is backed by PVM, a domain with no OS runs fine
under kvm while a Linux guest stops on emulation failures and libvirt leaves it paused.
So the probe boots the real test guest once under kvm (a transient domain on an
overlay of the probe image) and takes kvm only when the guest prints its boot marker.
The answer is cached (keyed by kernel, QEMU and /dev/kvm) so it is paid once per host.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from reconciler import diskimage
from reconciler.drivers.libvirt._config import DiskConfig, DomainConfig
from reconciler.drivers.libvirt._host import Host, libvirt

BOOT_MARKER = b"reconciler-guest: booted"


@dataclass(frozen=True, slots=True)
class DomainType:
    type: str  # kvm | qemu
    reason: str


def choose_domain_type(
    host: Host,
    setting: str,
    cache: Path,
    probe_image: Path,
    workdir: Path,
    *,
    timeout_s: float = 30.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> DomainType:
    if setting in ("kvm", "qemu"):
        return DomainType(setting, "set in the host config (libvirt.domainType)")
    if not os.path.exists("/dev/kvm"):
        return DomainType("qemu", "no /dev/kvm on this host: TCG emulation")
    key = _cache_key(host)
    try:
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return DomainType(cached["type"], cached["reason"] + " (probed earlier)")
    except (OSError, ValueError, KeyError, TypeError):
        pass
    result = _probe(host, probe_image, workdir, timeout_s, sleep, clock)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"key": key, "type": result.type, "reason": result.reason}))
    return result


def _cache_key(host: Host) -> str:
    try:
        qemu = str(host.conn().getVersion())
    except Exception:  # noqa: BLE001 - the key only has to change when the host does
        qemu = "?"
    return f"{platform.release()}|qemu {qemu}|kvm {os.stat('/dev/kvm').st_rdev}"


def _probe(host: Host, image: Path, workdir: Path, timeout_s: float,
           sleep: Callable[[float], None], clock: Callable[[], float]) -> DomainType:
    if not image.exists():
        return DomainType("qemu", f"no probe image at {image} to prove KVM boots a guest: TCG "
                          "(set libvirt.domainType: kvm to force KVM)")
    workdir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="rc-probe-", dir=workdir))
    os.chmod(tmp, 0o755)
    name = f"rc-probe-{os.getpid()}"
    dom = None
    try:
        fmt, _ = diskimage.image_info(image)
        overlay = tmp / "disk.qcow2"
        diskimage.create_overlay(overlay, image, fmt, 1)
        console = tmp / "console.log"
        config = DomainConfig(
            name=name, domain_type="kvm", memory_kib=128 * 1024, cpu_model=None,
            disks=[DiskConfig(str(overlay), "vda")], console_log=str(console),
            description="reconciler: KVM probe (transient)",
        )
        try:
            dom = host.conn().createXML(config.to_xml(), 0)
        except libvirt.libvirtError as exc:
            return DomainType("qemu", f"KVM refused a guest ({exc.get_error_message()}): TCG")
        deadline = clock() + timeout_s
        while clock() < deadline:
            state = dom.state()[0]
            if state == libvirt.VIR_DOMAIN_PAUSED:
                return DomainType("qemu", "KVM paused the probe guest (emulation failure, e.g. "
                                  "PVM-backed /dev/kvm): TCG")
            if state != libvirt.VIR_DOMAIN_RUNNING:
                return DomainType("qemu", "the probe guest did not keep running under KVM: TCG")
            if console.exists() and BOOT_MARKER in console.read_bytes():
                return DomainType("kvm", "KVM booted the probe guest")
            sleep(0.2)
        return DomainType("qemu", f"the probe guest did not boot under KVM within {timeout_s:.0f} s: TCG")
    finally:
        if dom is not None:
            try:
                dom.destroy()
            except libvirt.libvirtError:
                pass
        shutil.rmtree(tmp, ignore_errors=True)
