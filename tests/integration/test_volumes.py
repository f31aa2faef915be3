"""Volumes on the real storage driver, attached to a real guest, driven through the CLI.

One guest (no NICs) boots with a 1 GiB file volume attached. Its user-data runs a small
watcher that reports to the serial console what the guest itself sees: every vd* disk
with its serial and size (from /proc/partitions and /sys/block/*/serial) whenever that
changes, and, each time the volume's disk (serial = the volume's host name) appears,
whether it already holds the marker "RCDATA:..." (then `volume kept ...`) or writes one
(`volume written ...`). The host side is checked with virsh, qemu-img/qemu-io (-U: the
running QEMU holds the image lock) and the file system, never through our code.

Tests a-e share that guest and run in file order: attach at boot, grow live, detach and
re-attach (data kept), remove with Retain (orphaned, data kept), put back with Delete and
remove (deleted). f-g: the LVM backend (refused at plan time on a host without
device-mapper; attached to a guest where device-mapper exists).

Needs root, libvirt (scripts/setup-libvirt.sh) and the test guest image
(scripts/build-test-image.sh); skipped otherwise. Guests run under TCG (domainType: qemu).
"""

from __future__ import annotations

import json
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import lvmvg
import pytest
from hostcheck import require_host

from conftest import (
    ok,
    plan_is_zero,
    IMAGE,
    HostEnv,
    domstate,
    dumpxml,
    host_env,
    qemu_img_info,
    run,
    virsh,
    wait_for,
)
from reconciler.models import Key
from reconciler.naming import host_name

GIB = 1024**3
BOOT_TIMEOUT = 90.0
SEE_TIMEOUT = 30.0  # the guest polls every 0.3 s; TCG on a busy host is slow
VM = "vm"
VOLUME = "data"
LVM_VOLUME = "fast"
NO_DM_REASON = "no device-mapper: LVM volumes cannot be activated on this kernel"

pytestmark = [pytest.mark.slow]


@pytest.fixture(autouse=True)
def _real_host() -> None:
    require_host()


# --- the guest's side: a disk watcher in user-data ------------------------------------

# $VOL: the volume's disk serial; $TOKEN: what the guest writes into the volume.
WATCHER = r"""#!/bin/sh
VOL=@VOL@
TOKEN=@TOKEN@
log() { echo "reconciler-guest: $*" >/dev/console; }
dmesg -n 1  # kernel messages off the console: they would interleave with ours
mkdir -p /run/disks
check_volume() {  # a fresh appearance of the volume's disk $1
  head=$(dd if=/dev/$1 bs=64 count=1 2>/dev/null | tr -d '\000')
  case "$head" in
    RCDATA:*) log "volume kept $head" ;;
    *)
      marker="RCDATA:$(hostname):$TOKEN"
      if printf '%s' "$marker" | dd of=/dev/$1 bs=64 count=1 conv=sync,fsync 2>/dev/null && sync; then
        log "volume written $marker"
      else
        log "volume write failed on $1"
      fi ;;
  esac
}
log "disk watcher started"
volwas=
while :; do
  seen=" "
  volnow=
  for d in $(awk '$4 ~ /^vd[a-z]+$/ {print $4}' /proc/partitions); do
    kib=$(awk -v d="$d" '$4 == d {print $3}' /proc/partitions)
    serial=$(cat "/sys/block/$d/serial" 2>/dev/null)
    line="disk $d serial=$serial kib=$kib"
    seen="$seen$d "
    if [ "$(cat "/run/disks/$d" 2>/dev/null)" != "$line" ]; then
      echo "$line" >"/run/disks/$d"
      log "$line"
    fi
    [ "$serial" = "$VOL" ] && volnow=$d
  done
  for f in /run/disks/*; do
    [ -e "$f" ] || continue
    d=${f##*/}
    case "$seen" in
      *" $d "*) ;;
      *) log "disk $d gone $(sed -n 's/.*\(serial=[^ ]*\).*/\1/p' "$f")"; rm -f "$f" ;;
    esac
  done
  if [ -n "$volnow" ] && [ -z "$volwas" ]; then
    check_volume "$volnow"
  fi
  volwas=$volnow
  sleep 0.3
done
"""

DISK_EVENT = re.compile(
    r"reconciler-guest: disk (vd[a-z]+) (?:serial=(\S*) kib=(\d+)|gone serial=(\S*))\s*$"
)
VOLUME_EVENT = re.compile(r"reconciler-guest: volume (kept|written|write failed)\s*(.*?)\s*$")


def guest_disks(console: str) -> dict[str, tuple[str, int]]:
    """What the guest sees now, by its console: serial -> (device, KiB)."""
    by_dev: dict[str, tuple[str, int]] = {}
    for line in console.splitlines():
        m = DISK_EVENT.search(line)
        if m is None:
            continue
        dev, serial, kib, _gone = m.groups()
        if kib is None:
            by_dev.pop(dev, None)
        else:
            by_dev[dev] = (serial, int(kib))
    return {serial: (dev, kib) for dev, (serial, kib) in by_dev.items()}


def volume_events(console: str) -> list[tuple[str, str]]:
    """The watcher's ("kept"|"written"|"write failed", detail), in order; only whole lines
    (the console file may be read while the guest is still writing its last line)."""
    whole = console[: console.rfind("\n") + 1]
    return [m.groups() for line in whole.splitlines() if (m := VOLUME_EVENT.search(line))]


def qemu_io_head(path: Path, length: int = 64) -> bytes:
    """The first bytes of the guest-visible data of a qcow2 file, read by qemu-io."""
    out = run("qemu-io", "-r", "-U", "-f", "qcow2", "-c", f"read -v 0 {length}", str(path)).stdout
    data = bytearray()
    for line in out.splitlines():
        m = re.match(r"^[0-9a-f]{8}:\s+((?:[0-9a-f]{2}\s)+)", line)
        if m:
            data.extend(bytes.fromhex(m.group(1).replace(" ", "")))
    assert len(data) == length, out
    return bytes(data)


def domblklist(name: str) -> dict[str, str]:
    """Target -> source of the domain's live disks, by virsh."""
    out = virsh("domblklist", name).stdout
    return {parts[0]: parts[1] for parts in (line.split(None, 1) for line in out.splitlines()) if len(parts) == 2}


def domblk_capacity(name: str, target: str) -> int:
    out = virsh("domblkinfo", name, target).stdout
    return int(re.search(r"^Capacity:\s+(\d+)", out, re.M).group(1))


# --- the shared cloud: one guest, one file volume --------------------------------------


@dataclass
class Rig:
    env: HostEnv
    token: str

    @property
    def domain(self) -> str:
        return self.env.domain_name(VM)

    @property
    def serial(self) -> str:
        return host_name(Key("Volume", self.env.tenant, VOLUME))

    @property
    def image(self) -> Path:
        return self.env.volume_pool / f"{self.serial}.qcow2"

    @property
    def sidecar(self) -> Path:
        return self.env.volume_pool / f"{self.serial}.json"

    @property
    def marker(self) -> str:
        return f"RCDATA:{VM}:{self.token}"

    def console(self) -> str:
        path = self.env.instance_dir / self.domain / "console.log"
        try:
            return path.read_text(errors="replace")
        except OSError as exc:
            return f"(no console log: {exc})"

    def write(self, *, size: int = 1, volume: bool = True, attached: bool = True,
              policy: str | None = None) -> Path:
        return self.env.write_manifest(
            cloud_text(self.env, self.token, VOLUME, size=size, volume=volume, attached=attached,
                       policy=policy))

    def sees(self, predicate, what: str, timeout: float = SEE_TIMEOUT):
        """Wait until predicate(console) is true; on a timeout, show the console."""
        try:
            return wait_for(lambda: predicate(self.console()), timeout, interval=0.3, what=what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.domain}: {domstate(self.domain, reason=True)}\n"
                                 f"console:\n{self.console()[-3000:]}") from None


def cloud_text(env: HostEnv, token: str, volume_name: str, *, size: int = 1, volume: bool = True,
               attached: bool = True, policy: str | None = None, backend: str | None = None) -> str:
    serial = host_name(Key("Volume", env.tenant, volume_name))
    user_data = WATCHER.replace("@VOL@", serial).replace("@TOKEN@", token)
    text = (
        "apiVersion: reconciler/v1\nkind: Tenant\n"
        f"metadata: {{name: {env.tenant}}}\nspec: {{}}\n"
        "---\napiVersion: reconciler/v1\nkind: Image\n"
        f"metadata: {{name: tiny, tenant: {env.tenant}}}\nspec: {{source: {IMAGE}}}\n"
    )
    if volume:
        extra = "".join(f", {k}: {v}" for k, v in (("deletionPolicy", policy), ("backend", backend)) if v)
        text += (
            "---\napiVersion: reconciler/v1\nkind: Volume\n"
            f"metadata: {{name: {volume_name}, tenant: {env.tenant}}}\n"
            f"spec: {{sizeGiB: {size}{extra}}}\n"
        )
    text += (
        "---\napiVersion: reconciler/v1\nkind: Instance\n"
        f"metadata: {{name: {VM}, tenant: {env.tenant}}}\nspec:\n"
        "  image: tiny\n  vcpus: 1\n  memoryMiB: 128\n  rootDiskGiB: 1\n"
        "  restartPolicy: Never\n  powerState: running\n  networks: []\n"
        + (f"  volumes: [{{volume: {volume_name}}}]\n" if attached else "  volumes: []\n")
        + "  userData: |\n"
        + "".join(f"    {line}\n" if line else "\n" for line in user_data.splitlines())
    )
    return text


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    with host_env(volumes=True) as env:
        r = Rig(env, secrets.token_hex(6))
        started = time.monotonic()
        ok(env.apply(r.write()))
        print(f"apply of a volume and an instance attaching it: {time.monotonic() - started:.1f} s")
        yield r


# --- a. attached at boot ---------------------------------------------------------------


def test_a_guest_sees_the_attached_file_volume(rig: Rig) -> None:
    env = rig.env
    assert domstate(rig.domain) == "running", rig.console()

    # the host: a 1 GiB qcow2 file in the pool with its sidecar, attached with its serial
    img = qemu_img_info(rig.image)
    assert img["format"] == "qcow2", img
    assert img["virtual-size"] == 1 * GIB, img
    assert "backing-filename" not in img, img
    sidecar = json.loads(rig.sidecar.read_text())
    assert sidecar["mark"]["kind"] == "Volume", sidecar
    assert (sidecar["mark"]["tenant"], sidecar["mark"]["name"]) == (env.tenant, VOLUME), sidecar
    assert not sidecar["mark"]["orphaned"], sidecar
    assert sorted(p.name for p in env.volume_pool.iterdir()) == sorted([rig.image.name, rig.sidecar.name])

    xml = dumpxml(rig.domain)
    vols = [d for d in xml.iterfind("devices/disk")
            if d.find("source") is not None and d.find("source").get("file") == str(rig.image)]
    assert len(vols) == 1, virsh("dumpxml", rig.domain).stdout
    disk = vols[0]
    assert disk.get("device") == "disk"
    assert disk.findtext("serial") == rig.serial
    assert disk.find("driver").get("type") == "qcow2"
    assert disk.find("target").get("bus") == "virtio"
    target = disk.find("target").get("dev")
    assert domblklist(rig.domain).get(target) == str(rig.image)
    assert domblk_capacity(rig.domain, target) == 1 * GIB
    persistent = dumpxml(rig.domain, inactive=True)
    assert any(d.findtext("serial") == rig.serial for d in persistent.iterfind("devices/disk"))

    # the guest: sees the disk by its serial, 1 GiB, and wrote its marker into it
    rig.sees(lambda c: rig.serial in guest_disks(c), "the guest to see the volume", BOOT_TIMEOUT)
    disks = guest_disks(rig.console())
    assert disks[rig.serial][1] == 1024 * 1024, disks
    assert disks[""][0] == "vda", disks  # the root disk: no serial
    rig.sees(lambda c: volume_events(c), "the guest's first look into the volume")
    assert volume_events(rig.console()) == [("written", rig.marker)], rig.console()[-2000:]
    # on the host, the data is in the file (the guest wrote with fsync)
    wait_for(lambda: qemu_io_head(rig.image).startswith(rig.marker.encode()), 10,
             what="the marker in the qcow2 file")
    plan_is_zero(env, rig.write())


# --- b. grown while the guest runs -----------------------------------------------------


def test_b_grow_while_attached_reaches_the_running_guest(rig: Rig) -> None:
    env = rig.env
    domid = virsh("domid", rig.domain).stdout.strip()
    bigger = rig.write(size=2)
    result = ok(env.cli("plan", "--detailed-exitcode", str(bigger)), code=2)
    assert "grown live" in result.stdout, result.stdout
    assert "volumeGiB.data: 1 -> 2" in result.stdout, result.stdout
    ok(env.apply(bigger))

    assert domstate(rig.domain) == "running"
    assert virsh("domid", rig.domain).stdout.strip() == domid  # not restarted
    assert qemu_img_info(rig.image)["virtual-size"] == 2 * GIB
    dev = guest_disks(rig.console())[rig.serial][0]
    rig.sees(lambda c: guest_disks(c).get(rig.serial, ("", 0))[1] == 2 * 1024 * 1024,
             "the guest to see 2 GiB (kib=2097152)")
    assert guest_disks(rig.console())[rig.serial][0] == dev  # the same disk, not re-plugged
    target = next(t for t, s in domblklist(rig.domain).items() if s == str(rig.image))
    assert domblk_capacity(rig.domain, target) == 2 * GIB
    assert volume_events(rig.console()) == [("written", rig.marker)]  # no new appearance
    plan_is_zero(env, bigger)


# --- c. detached and attached again ----------------------------------------------------


def test_c_detach_and_reattach_keep_the_data(rig: Rig) -> None:
    env = rig.env
    domid = virsh("domid", rig.domain).stdout.strip()
    detached = rig.write(size=2, attached=False)
    ok(env.apply(detached))
    # the guest released the disk (ACPI hot-unplug): gone from QEMU and from the guest
    try:
        wait_for(lambda: str(rig.image) not in domblklist(rig.domain).values(), SEE_TIMEOUT,
                 what="the disk to leave the running domain (virsh domblklist)")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: the guest did not release the hot-unplugged disk\n"
                             f"console:\n{rig.console()[-3000:]}") from None
    rig.sees(lambda c: rig.serial not in guest_disks(c), "the disk to disappear in the guest")
    assert not any(d.findtext("serial") == rig.serial
                   for d in dumpxml(rig.domain, inactive=True).iterfind("devices/disk"))
    assert rig.image.exists() and rig.sidecar.exists()
    plan_is_zero(env, detached)

    attached = rig.write(size=2)
    ok(env.apply(attached))
    rig.sees(lambda c: len(volume_events(c)) >= 2, "the guest to look into the re-attached volume")
    assert volume_events(rig.console()) == [("written", rig.marker), ("kept", rig.marker)], (
        rig.console()[-2000:])
    assert guest_disks(rig.console())[rig.serial][1] == 2 * 1024 * 1024
    assert str(rig.image) in domblklist(rig.domain).values()
    assert virsh("domid", rig.domain).stdout.strip() == domid  # all of it live
    plan_is_zero(env, attached)


# --- d. removed, Retain ----------------------------------------------------------------


def test_d_removed_volume_is_orphaned_with_its_data(rig: Rig) -> None:
    env = rig.env
    removed = rig.write(volume=False, attached=False)
    result = ok(env.cli("plan", "--detailed-exitcode", str(removed)), code=2)
    orphan_line = re.compile(rf"^\s*! Volume {env.tenant}/{VOLUME}\s*$", re.M)
    assert orphan_line.search(result.stdout), result.stdout
    assert "will be orphaned" in result.stdout, result.stdout
    assert "!!" not in result.stdout, result.stdout  # nothing is destroyed
    ok(env.apply(removed))

    wait_for(lambda: str(rig.image) not in domblklist(rig.domain).values(), SEE_TIMEOUT,
             what="the disk to leave the running domain")
    rig.sees(lambda c: rig.serial not in guest_disks(c), "the disk to disappear in the guest")
    assert rig.image.exists() and rig.sidecar.exists()
    sidecar = json.loads(rig.sidecar.read_text())
    assert sidecar["mark"]["orphaned"] is True, sidecar
    assert qemu_img_info(rig.image)["virtual-size"] == 2 * GIB
    assert qemu_io_head(rig.image).rstrip(b"\0") == rig.marker.encode()
    plan_is_zero(env, removed)


# --- e. back with Delete, then removed --------------------------------------------------


def test_e_delete_policy_deletes_the_volume_and_warns_of_its_data(rig: Rig) -> None:
    env = rig.env
    back = rig.write(size=2, attached=False, policy="Delete")
    result = ok(env.cli("plan", "--detailed-exitcode", str(back)), code=2)
    # an update of the orphaned volume (its new mark is not orphaned): the reason says it is
    # taken back, and names the change
    assert re.search(rf"^\s*~ Volume {env.tenant}/{VOLUME}\s*$", result.stdout, re.M), result.stdout
    assert "back in the manifests (was orphaned): adopted again; manifest changed: deletionPolicy" in result.stdout
    assert 'deletionPolicy: "Retain" -> "Delete"' in result.stdout, result.stdout
    assert "!!" not in result.stdout, result.stdout
    ok(env.apply(back))
    sidecar = json.loads(rig.sidecar.read_text())
    assert sidecar["mark"]["orphaned"] is False, sidecar
    assert sidecar["spec"]["deletionPolicy"] == "Delete", sidecar
    assert qemu_io_head(rig.image).rstrip(b"\0") == rig.marker.encode()  # adopted as it was
    plan_is_zero(env, back)

    gone = rig.write(volume=False, attached=False)
    result = ok(env.cli("plan", "--detailed-exitcode", str(gone)), code=2)
    warnings = [line for line in result.stdout.splitlines() if line.strip().startswith("!!")]
    assert len(warnings) == 1, result.stdout
    assert re.search(r"holds data \([^)]* written\)", warnings[0]), result.stdout
    assert re.search(rf"^\s*- Volume {env.tenant}/{VOLUME}\s*$", result.stdout, re.M), result.stdout
    ok(env.apply(gone))
    assert not rig.image.exists()
    assert not rig.sidecar.exists()
    assert list(env.volume_pool.iterdir()) == []
    assert domstate(rig.domain) == "running"
    plan_is_zero(env, gone)


# --- f, g. the LVM backend -----------------------------------------------------------------


def _lvm_backends(vg) -> dict[str, dict[str, object]]:
    return {"vg": {"driver": "lvm", "vg": vg.name, "lvmConfig": vg.config}}


def test_f_lvm_volume_without_device_mapper_is_refused_at_plan(tmp_path: Path) -> None:
    lvmvg.require_lvm()
    if lvmvg.device_mapper():
        pytest.skip("this host has device-mapper: test_g attaches an LVM volume instead")
    with lvmvg.loop_vg(tmp_path, size_mib=256) as vg, host_env(volume_backends=_lvm_backends(vg)) as env:
        text = cloud_text(env, "unused", LVM_VOLUME, backend="vg")
        manifest = env.write_manifest(text)
        line = next(i for i, row in enumerate(text.splitlines(), 1)
                    if row.startswith("  volumes: [{volume:"))
        for args in (("plan", str(manifest)), ("apply", "--yes", str(manifest))):
            result = env.cli(*args)
            output = result.stdout + result.stderr
            assert result.returncode == 1, output
            assert "Traceback" not in output, output
            problem = next((row for row in output.splitlines() if f"{manifest}:{line}:" in row), None)
            assert problem is not None, f"no error at {manifest}:{line}:\n{output}"
            assert f"Instance {env.tenant}/{VM}" in problem, problem
            assert "spec.volumes[0].volume" in problem, problem
            assert f"Volume {env.tenant}/{LVM_VOLUME}" in problem, problem
            assert "no device-mapper" in problem, problem
        # nothing was made: no LV, no domain
        config = vg.config
        if "activation=0" not in config.replace(" ", ""):
            config += " global{activation=0}"  # metadata only: nothing to activate here
        lvs = run("lvs", "--config", config, "--noheadings", "-o", "lv_name", vg.name).stdout.split()
        assert lvs == [], lvs
        assert env.domains() == {}


def test_g_lvm_volume_attached_to_a_guest(tmp_path: Path) -> None:
    if not lvmvg.device_mapper():
        pytest.skip(NO_DM_REASON)
    lvmvg.require_lvm()
    with lvmvg.loop_vg(tmp_path, size_mib=2048) as vg, host_env(volume_backends=_lvm_backends(vg)) as env:
        token = secrets.token_hex(6)
        serial = host_name(Key("Volume", env.tenant, LVM_VOLUME))
        manifest = env.write_manifest(cloud_text(env, token, LVM_VOLUME, backend="vg"))
        ok(env.apply(manifest))
        domain = env.domain_name(VM)
        device = Path("/dev") / vg.name / serial

        out = run("lvs", "--config", vg.config, "--noheadings", "--units", "b", "--nosuffix",
                  "-o", "lv_name,lv_size,lv_active", vg.name).stdout.split()
        assert out[:2] == [serial, str(1 * GIB)], out
        xml = dumpxml(domain)
        disks = [d for d in xml.iterfind("devices/disk") if d.findtext("serial") == serial]
        assert len(disks) == 1, virsh("dumpxml", domain).stdout
        assert disks[0].get("type") == "block"
        assert Path(disks[0].find("source").get("dev")).resolve() == device.resolve()

        console_path = env.instance_dir / domain / "console.log"

        def console() -> str:
            try:
                return console_path.read_text(errors="replace")
            except OSError:
                return ""

        try:
            wait_for(lambda: volume_events(console()), BOOT_TIMEOUT, interval=0.3,
                     what="the guest's first look into the LVM volume")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nconsole:\n{console()[-3000:]}") from None
        marker = f"RCDATA:{VM}:{token}"
        assert volume_events(console()) == [("written", marker)], console()[-2000:]
        assert guest_disks(console())[serial][1] == 1024 * 1024

        def head() -> bytes:  # the guest's bytes, on the LV itself
            with open(device, "rb") as f:
                return f.read(64)

        wait_for(lambda: head().rstrip(b"\0") == marker.encode(), 10, what=f"the marker on {device}")
        plan_is_zero(env, manifest)
