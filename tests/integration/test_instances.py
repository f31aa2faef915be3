"""Instances and images on a real libvirtd with real guests, driven through the CLI.

Every check looks at the host with `virsh`, `qemu-img`, sysfs and HTTP to the guests,
never through the reconciler's own code. Tests a-d share one applied cloud (two guests)
and run in file order: create, memory changes, power off/on, destroy. The Network stays
in the memory driver; the fixture creates its Linux bridge (named as the network driver
would name it) with an address, and the guests get fixed IPs on it.

Needs root, libvirt (scripts/setup-libvirt.sh) and the test guest image
(scripts/build-test-image.sh); skipped otherwise. Guests run under TCG (domainType: qemu).
"""

from __future__ import annotations

import os
import re
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest
from hostcheck import require_host

from conftest import (
    ok,
    plan_is_zero,
    IMAGE,
    URI,
    HostEnv,
    domstate,
    dumpxml,
    guest_info,
    host_env,
    http_get,
    qemu_img_info,
    run,
    sha256_file,
    virsh,
    wait_for,
)
from reconciler.naming import mac_address

NS = "https://reconciler.dev/xmlns/libvirt/1"
GIB = 1024**3
BOOT_TIMEOUT = 90.0  # two TCG guests on two cores

pytestmark = [pytest.mark.slow]


@pytest.fixture(autouse=True)
def _real_host() -> None:
    require_host()


# --- the shared cloud --------------------------------------------------------------------


@dataclass(frozen=True)
class Vm:
    name: str
    network: str
    ip: str
    vcpus: int
    memory: int = 128

    def manifest(self, tenant: str, **overrides: object) -> str:
        fields: dict[str, object] = {
            "image": "tiny", "vcpus": self.vcpus, "memoryMiB": self.memory, "rootDiskGiB": 1,
            "restartPolicy": "Never", "powerState": "running",
        }
        fields.update(overrides)
        body = "".join(f"  {k}: {v}\n" for k, v in fields.items())
        return (
            "---\napiVersion: reconciler/v1\nkind: Instance\n"
            f"metadata: {{name: {self.name}, tenant: {tenant}}}\nspec:\n{body}"
            f"  networks: [{{network: {self.network}, ip: {self.ip}}}]\n"
            "  userData: |\n"
            "    #!/bin/sh\n"
            "    echo \"user-data ran on $(hostname)\" > /www/user-data.txt\n"
        )


def base_manifest(env: HostEnv) -> str:
    text = (
        "apiVersion: reconciler/v1\nkind: Tenant\n"
        f"metadata: {{name: {env.tenant}}}\nspec: {{}}\n"
        "---\napiVersion: reconciler/v1\nkind: Image\n"
        f"metadata: {{name: tiny, tenant: {env.tenant}}}\nspec: {{source: {IMAGE}}}\n"
    )
    for bridge in env.bridges.values():
        text += (
            "---\napiVersion: reconciler/v1\nkind: Network\n"
            f"metadata: {{name: {bridge.network}, tenant: {env.tenant}}}\n"
            # the networks are in memory here (no dnsmasq): guests take static addresses
            f"spec: {{type: flat, subnets: [{{cidr: {bridge.subnet}, dhcp: {{enabled: false}}}}]}}\n"
        )
    return text


@dataclass
class Cloud:
    env: HostEnv
    vms: dict[str, Vm]
    manifest: Path
    image_sha: str

    def write(self, **per_vm: dict[str, object]) -> Path:
        """The manifest with some fields of some instances changed: write(a={...})."""
        text = base_manifest(self.env)
        for key, vm in self.vms.items():
            text += vm.manifest(self.env.tenant, **per_vm.get(key, {}))
        return self.env.write_manifest(text)

    def domain(self, key: str) -> str:
        return self.env.domain_name(self.vms[key].name)


@pytest.fixture(scope="module")
def cloud(rc_env_module: HostEnv) -> Cloud:
    env = rc_env_module
    net_a = env.add_bridge("net-a", mtu=1450)  # an MTU the guest NIC has to follow
    net_b = env.add_bridge("net-b")
    vms = {
        "a": Vm("vm-a", "net-a", net_a.ip(10), vcpus=1),
        "b": Vm("vm-b", "net-b", net_b.ip(10), vcpus=2),
    }
    image_sha = sha256_file(IMAGE)
    c = Cloud(env, vms, Path(), image_sha)
    c.manifest = c.write()
    started = time.monotonic()
    result = env.apply(c.manifest)
    print(f"apply of two instances: {time.monotonic() - started:.1f} s")
    ok(result)
    return c


def find(root: ET.Element, path: str) -> ET.Element:
    el = root.find(path)
    assert el is not None, f"no {path} in\n{ET.tostring(root, encoding='unicode')}"
    return el


def memory_kib(root: ET.Element, tag: str = "memory") -> int:
    el = find(root, tag)
    units = {"kib": 1, "mib": 1024, "gib": 1024**2, "b": 1 / 1024, "bytes": 1 / 1024}
    return int(int(el.text) * units[el.get("unit", "KiB").lower()])


def dominfo(name: str) -> dict[str, str]:
    out = virsh("dominfo", name).stdout
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines())}


def info_of(env: HostEnv, vm: "Vm", timeout: float = BOOT_TIMEOUT) -> dict[str, list[str]]:
    """The guest's /cgi-bin/info; on a timeout the failure shows its state and console."""
    try:
        return guest_info(vm.ip, timeout)
    except AssertionError as exc:
        name = env.domain_name(vm.name)
        try:
            console = (env.instance_dir / name / "console.log").read_text(errors="replace")
        except OSError as err:
            console = f"(no console log: {err})"
        raise AssertionError(f"{exc}\n{vm.name} ({name}): {domstate(name, reason=True)}\n"
                             f"console:\n{console[-3000:]}") from None


def console_of(cloud: Cloud, key: str) -> str:
    path = cloud.env.instance_dir / cloud.domain(key) / "console.log"
    try:
        return path.read_text(errors="replace")
    except OSError as exc:
        return f"(no console log: {exc})"


# --- a. create -----------------------------------------------------------------------


def test_a_two_instances_run_as_declared(cloud: Cloud) -> None:
    env = cloud.env
    domains = env.domains()
    assert sorted(domains) == sorted(cloud.domain(k) for k in cloud.vms), domains
    registered = sorted(p for p in env.image_dir.glob("rc-*") if p.suffix != ".json")
    assert len(registered) == 1, list(env.image_dir.iterdir())
    assert sha256_file(registered[0]) == cloud.image_sha  # a verbatim copy of the source

    for key, vm in cloud.vms.items():
        name = cloud.domain(key)
        bridge = env.bridges[vm.network]
        assert domstate(name) == "running", console_of(cloud, key)
        info = dominfo(name)
        assert info["CPU(s)"] == str(vm.vcpus), info
        assert info["Max memory"] == f"{vm.memory * 1024} KiB", info
        assert info["Used memory"] == f"{vm.memory * 1024} KiB", info
        assert info["Persistent"] == "yes", info

        xml = dumpxml(name)
        assert xml.get("type") == "qemu"
        assert xml.findtext("title") == f"{env.tenant}/{vm.name}"
        mark = find(xml, f"metadata/{{{NS}}}instance")
        assert mark.get("kind") == "Instance"
        assert mark.get("tenant") == env.tenant
        assert mark.get("name") == vm.name
        assert re.fullmatch(r"[0-9a-f]{16,}", mark.get("specHash") or ""), mark.attrib
        assert "user-data ran" not in ET.tostring(xml, encoding="unicode")  # secrets stay out

        folder = env.instance_dir / name
        disks = {find(d, "target").get("dev"): d for d in xml.iterfind("devices/disk")}
        root = disks["vda"]
        assert root.get("device") == "disk"
        assert find(root, "driver").get("type") == "qcow2"
        assert find(root, "source").get("file") == str(folder / "root.qcow2")
        assert find(root, "target").get("bus") == "virtio"
        seed = next(d for d in xml.iterfind("devices/disk") if d.get("device") == "cdrom")
        assert find(seed, "source").get("file") == str(folder / "seed.iso")
        assert seed.find("readonly") is not None
        assert len(list(xml.iterfind("devices/disk"))) == 2

        img = qemu_img_info(folder / "root.qcow2")
        assert img["format"] == "qcow2"
        assert img["virtual-size"] == 1 * GIB
        assert img["backing-filename"] == str(registered[0])
        assert img.get("backing-filename-format", "qcow2") == "qcow2"

        nics = list(xml.iterfind("devices/interface"))
        assert len(nics) == 1
        nic = nics[0]
        assert nic.get("type") == "bridge"
        assert find(nic, "source").get("bridge") == bridge.name
        assert find(nic, "mac").get("address") == mac_address(env.tenant, vm.name, vm.network)
        assert find(nic, "model").get("type") == "virtio"
        assert find(nic, "mtu").get("size") == str(bridge.mtu)
        serial = find(xml, "devices/serial")
        assert find(serial, "source").get("path") == str(folder / "console.log")
        # the tap is a port of the right bridge (seen from the kernel, not libvirt)
        tap = find(nic, "target").get("dev")
        assert Path("/sys/class/net", tap, "master").resolve().name == bridge.name

    assert cloud.env.bridges["net-a"].mtu == 1450
    for key, vm in cloud.vms.items():  # both boot at once: poll one, then the other
        info = info_of(env, vm)
        bridge = env.bridges[vm.network]
        assert info["hostname"] == [vm.name], (info, console_of(cloud, key))
        assert info["ip"] == [f"eth0,{vm.ip}/{bridge.subnet.prefixlen}"], info
        assert info["mtu"] == [f"eth0,{bridge.mtu}"], info
        assert info["nproc"] == [str(vm.vcpus)], info
        assert info["disk"] == [f"vda,,{1 * GIB}"], info
        text = wait_for(lambda: http_get(f"http://{vm.ip}/user-data.txt"), 15, what="user-data")
        assert text.strip() == f"user-data ran on {vm.name}"

    plan_is_zero(env, cloud.manifest)


# --- b. memory -----------------------------------------------------------------------


def test_b_memory_changes_follow_the_planned_class(cloud: Cloud) -> None:
    env, name, vm = cloud.env, cloud.domain("a"), cloud.vms["a"]
    old_kib, new_kib = vm.memory * 1024, 160 * 1024
    domid = virsh("domid", name).stdout.strip()
    small_total = int(info_of(env, vm)["memtotal_kb"][0])

    # over the boot maximum, restarts not allowed: the config changes, the guest does not
    bigger = cloud.write(a={"memoryMiB": 160})
    result = ok(env.cli("plan", "--detailed-exitcode", str(bigger)), code=2)
    assert "takes effect at the next restart" in result.stdout, result.stdout
    ok(env.apply(bigger))
    assert memory_kib(dumpxml(name, inactive=True)) == new_kib
    assert memory_kib(dumpxml(name, inactive=True), "currentMemory") == new_kib
    assert memory_kib(dumpxml(name)) == old_kib
    assert domstate(name) == "running"
    assert virsh("domid", name).stdout.strip() == domid  # not restarted
    plan_is_zero(env, bigger)

    # restarts allowed: apply restarts it, and the running guest has the new value
    allowed = cloud.write(a={"memoryMiB": 160, "restartPolicy": "Allowed"})
    ok(env.apply(allowed))
    assert domstate(name) == "running"
    assert virsh("domid", name).stdout.strip() != domid  # a new QEMU process
    assert memory_kib(dumpxml(name)) == new_kib
    assert memory_kib(dumpxml(name), "currentMemory") == new_kib
    big_total = int(info_of(env, vm)["memtotal_kb"][0])
    assert big_total - small_total > 24 * 1024, (small_total, big_total)  # +32 MiB, less overhead
    plan_is_zero(env, allowed)

    # below the boot maximum: the balloon takes it back live, no restart
    domid = virsh("domid", name).stdout.strip()
    smaller = cloud.write(a={"memoryMiB": 128, "restartPolicy": "Allowed"})
    result = ok(env.cli("plan", "--detailed-exitcode", str(smaller)), code=2)
    assert "applied live" in result.stdout, result.stdout
    ok(env.apply(smaller))
    assert virsh("domid", name).stdout.strip() == domid
    assert memory_kib(dumpxml(name, inactive=True)) == old_kib
    assert memory_kib(dumpxml(name, inactive=True), "currentMemory") == old_kib
    # the balloon inflates in the guest's own time; libvirt reports it when QEMU does
    wait_for(lambda: dominfo(name)["Used memory"] == f"{old_kib} KiB", 30,
             what=f"the balloon to reach {old_kib} KiB (dominfo)")
    assert memory_kib(dumpxml(name), "currentMemory") == old_kib
    # the guest sees it (the balloon driver lowers MemTotal by what it takes)
    wait_for(lambda: int(info_of(env, vm, 5)["memtotal_kb"][0]) <= big_total - 24 * 1024, 30,
             what=f"the guest's MemTotal to shrink from {big_total} kB")
    plan_is_zero(env, smaller)
    cloud.manifest = smaller


# --- c. power --------------------------------------------------------------------------


def test_c_power_state_stopped_then_running(cloud: Cloud) -> None:
    env, name, vm = cloud.env, cloud.domain("b"), cloud.vms["b"]
    info_of(env, vm)  # up (and acpid listening) before the button is pressed
    stopped = cloud.write(a={"restartPolicy": "Allowed"}, b={"powerState": "stopped"})
    ok(env.apply(stopped))
    # graceful: the guest powered itself off after the ACPI button, not destroyed
    assert domstate(name, reason=True) == "shut off (shutdown)", console_of(cloud, "b")
    assert "reconciler-guest: power button" in console_of(cloud, "b")
    assert domstate(cloud.domain("a")) == "running"
    plan_is_zero(env, stopped)

    running = cloud.write(a={"restartPolicy": "Allowed"})
    ok(env.apply(running))
    assert domstate(name) == "running"
    info = info_of(env, vm)
    assert info["hostname"] == [vm.name]
    plan_is_zero(env, running)
    cloud.manifest = running


# --- d. destroy ------------------------------------------------------------------------


def test_d_destroy_leaves_nothing(cloud: Cloud) -> None:
    env = cloud.env
    names = [cloud.domain(k) for k in cloud.vms]
    started = time.monotonic()
    ok(env.cli("destroy", "--yes", str(cloud.manifest)))
    print(f"destroy of two instances: {time.monotonic() - started:.1f} s")
    listed = virsh("list", "--all", "--name").stdout.split()
    assert not set(names) & set(listed), listed
    assert env.domains() == {}
    assert not env.instance_dir.exists() or list(env.instance_dir.iterdir()) == []
    for n in names:
        assert not (env.instance_dir / n).exists()
    leftovers = list(env.image_dir.glob("rc-*")) if env.image_dir.exists() else []
    assert leftovers == [], leftovers
    assert sha256_file(IMAGE) == cloud.image_sha  # the source image is never touched


# --- e. a domain someone else defined ------------------------------------------------


def test_e_unmarked_domain_in_the_way_is_a_conflict(rc_env: HostEnv) -> None:
    env = rc_env
    bridge = env.add_bridge("net")
    name = env.domain_name("vm")
    # defined by hand, as an admin would: no mark; titled so that teardown finds it
    xml = (
        f"<domain type='qemu'><name>{name}</name><title>{env.tenant}/handmade</title>"
        "<memory unit='MiB'>64</memory><vcpu>1</vcpu>"
        "<os><type arch='x86_64' machine='pc'>hvm</type></os></domain>"
    )
    path = env.root / "handmade.xml"
    path.write_text(xml)
    virsh("define", str(path))
    before = virsh("dumpxml", "--inactive", name).stdout

    text = base_manifest(env) + Vm("vm", "net", bridge.ip(10), vcpus=1).manifest(env.tenant)
    manifest = env.write_manifest(text)
    for args in (("plan", str(manifest)), ("apply", "--yes", str(manifest))):
        result = env.cli(*args)
        assert result.returncode == 1, result
        output = result.stdout + result.stderr
        assert "conflict" in output.lower() and name in output, output
        assert "Traceback" not in output
        assert virsh("dumpxml", "--inactive", name).stdout == before
        assert domstate(name) == "shut off"
    assert not (env.instance_dir / name).exists()

    ok(env.cli("destroy", "--yes", str(manifest)))
    assert virsh("dumpxml", "--inactive", name).stdout == before
    assert domstate(name) == "shut off"


# --- f. killed between define and start ------------------------------------------------


def test_f_apply_killed_after_define_converges_on_rerun(rc_env: HostEnv) -> None:
    env = rc_env
    bridge = env.add_bridge("net")
    vm = Vm("vm", "net", bridge.ip(10), vcpus=1)
    manifest = env.write_manifest(base_manifest(env) + vm.manifest(env.tenant))
    name = env.domain_name(vm.name)

    result = env.apply(manifest, env={"RECONCILER_FAULTS": "libvirt.after-define"})
    assert result.returncode == -9, result  # SIGKILL
    assert list(env.domains()) == [name]
    assert domstate(name) == "shut off"
    assert find(dumpxml(name, inactive=True), f"metadata/{{{NS}}}instance").get("name") == vm.name

    ok(env.apply(manifest))
    assert list(env.domains()) == [name]  # the same domain, no duplicate
    assert domstate(name) == "running"
    info = info_of(env, vm)
    assert info["hostname"] == [vm.name]
    plan_is_zero(env, manifest)
    # nothing leaked: one instance directory per domain, one registered image
    assert sorted(p.name for p in env.instance_dir.iterdir()) == [name]
    assert sorted(p.name for p in (env.instance_dir / name).iterdir()) == [
        "console.log", "owner.json", "root.qcow2", "seed.iso", "seed.json"]
    assert len([p for p in env.image_dir.glob("rc-*") if p.suffix != ".json"]) == 1
    assert not [p for p in env.image_dir.iterdir() if p.name.startswith(".tmp-")]


# --- g. the domain type probe -----------------------------------------------------------


def boot_by_hand(env: HostEnv, domain_type: str, label: str, timeout: float) -> str:
    """Boot the test image under `domain_type` with virsh (not our code) and watch its
    serial console: "booted" when the guest gets past its seed lookup within `timeout`
    (a PVM-backed kvm stops before that), else what happened instead."""
    folder = env.root / label
    folder.mkdir(mode=0o755)
    overlay, console = folder / "root.qcow2", folder / "console.log"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(IMAGE), str(overlay))
    cpu = ("<cpu mode='custom' match='exact'><model fallback='allow'>qemu64</model></cpu>"
           if domain_type == "qemu" else "<cpu mode='host-passthrough'/>")
    name = env.domain_name(label)
    xml = (
        f"<domain type='{domain_type}'><name>{name}</name><title>{env.tenant}/{label}</title>"
        "<memory unit='MiB'>128</memory><vcpu>1</vcpu>"
        "<os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>"
        f"<features><acpi/><apic/></features>{cpu}<devices>"
        "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        f"<source file='{overlay}'/><target dev='vda' bus='virtio'/></disk>"
        f"<serial type='file'><source path='{console}'/><target port='0'/></serial>"
        "</devices></domain>"
    )
    path = folder / "domain.xml"
    path.write_text(xml)
    virsh("define", str(path))
    try:
        virsh("start", name)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = domstate(name)
            if state != "running":
                return f"{state} (console: {console.read_bytes()[-300:]!r})"
            # past the seed lookup (none here): modules loaded, disks probed, ~10 s of work
            if console.exists() and b"reconciler-guest: hostname" in console.read_bytes():
                return "booted"
            time.sleep(0.3)
        return f"not booted within {timeout:.0f} s"
    finally:
        virsh("destroy", name, check=False)
        virsh("undefine", name, check=False)


def test_g_domain_type_probe_picks_a_type_that_boots() -> None:
    from reconciler.drivers.libvirt._driver import LibvirtDriver, LibvirtSettings

    with host_env() as env:
        settings = LibvirtSettings(
            uri=URI, domain_type="auto", image_dir=env.root / "probe" / "images",
            instance_dir=env.root / "probe" / "instances", probe_image=IMAGE,
        )
        started = time.monotonic()
        chosen = LibvirtDriver(settings).domain_type()
        print(f"probe: {chosen.type} ({chosen.reason}) in {time.monotonic() - started:.1f} s")
        assert chosen.type in ("qemu", "kvm"), chosen
        assert chosen.reason.strip(), chosen
        # the probe cleaned up after itself (its transient domain is named after our pid)
        assert f"rc-probe-{os.getpid()}" not in virsh("list", "--all", "--name").stdout.split()

        # consistency: a guest of the chosen type really boots...
        outcome = boot_by_hand(env, chosen.type, "check-chosen", 90)
        assert outcome == "booted", f"the probe chose {chosen.type} ({chosen.reason}), but: {outcome}"
        # ...and when it fell back to TCG although /dev/kvm exists, KVM really cannot
        if chosen.type == "qemu" and Path("/dev/kvm").exists():
            outcome = boot_by_hand(env, "kvm", "check-kvm", 30)
            assert outcome != "booted", f"the probe chose qemu ({chosen.reason}), but KVM boots the guest"
