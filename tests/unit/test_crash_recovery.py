"""Crash safety, focused: the fault points a crash test stops a run at, and what a run
killed half way leaves for the next one (regressions found by tests/integration/test_crash.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from reconciler import faults
from reconciler.drivers.libvirt._driver import LibvirtDriver, LibvirtSettings
from reconciler.drivers.memory import MemoryDriver
from reconciler.drivers.netlink import _host
from reconciler.errors import NotFound
from reconciler.executor import Executor
from reconciler.models import Key
from reconciler.naming import host_name
from reconciler.planner import plan
from reconciler.state import Mark, Observation, Target

# --- fault points ------------------------------------------------------------------------


def run_python(code: str, faults_value: str | None, log: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in (faults.ENV_VAR, faults.LOG_VAR)}
    if faults_value is not None:
        env[faults.ENV_VAR] = faults_value
    if log is not None:
        env[faults.LOG_VAR] = str(log)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, timeout=60)


CALLS = """
    from reconciler import faults
    for what in ("create a", "delete b", "update c"):
        n = faults.call_started(what)
        print("ran", what, flush=True)
        faults.call_returned(n, what)
    faults.point("somewhere")
    faults.point("somewhere")
    print("done", flush=True)
"""


@pytest.mark.parametrize(("value", "printed"), [
    ("call:1", []),
    ("call:2", ["ran create a"]),
    ("call:2:after", ["ran create a", "ran delete b"]),
    ("call:3:after", ["ran create a", "ran delete b", "ran update c"]),
    ("somewhere", ["ran create a", "ran delete b", "ran update c"]),
    ("somewhere@2", ["ran create a", "ran delete b", "ran update c"]),
])
def test_a_fault_point_kills_the_process_exactly_there(value: str, printed: list[str]) -> None:
    result = run_python(CALLS, value)
    assert result.returncode == -signal.SIGKILL, result
    assert result.stdout.splitlines() == printed


@pytest.mark.parametrize("value", [None, "", "call:9", "call:1:before", "elsewhere", "somewhere@3"])
def test_a_point_that_is_not_named_changes_nothing(value: str | None) -> None:
    result = run_python(CALLS, value)
    assert result.returncode == 0, result
    assert result.stdout.splitlines()[-1] == "done"


def test_the_trace_lists_every_call_boundary_and_named_point(tmp_path: Path) -> None:
    log = tmp_path / "trace"
    result = run_python(CALLS, "trace", log)
    assert result.returncode == 0, result
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(e["event"], e["call"], e["what"]) for e in events] == [
        ("before", 1, "create a"), ("after", 1, "create a"),
        ("before", 2, "delete b"), ("after", 2, "delete b"),
        ("before", 3, "update c"), ("after", 3, "update c"),
        ("point", None, "somewhere"), ("point", None, "somewhere"),
    ]
    assert [e["t"] for e in events] == sorted(e["t"] for e in events)


def test_without_the_variable_calls_are_not_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(faults.ENV_VAR, raising=False)
    assert faults.call_started("create x") == 0
    faults.call_returned(0, "create x")


def test_the_executor_numbers_each_driver_call_that_changes_the_host(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every create/update/delete the executor makes is one numbered call, logged before
    it starts and after it returns, so a crash test can stop an apply at each boundary."""
    from reconciler.dependencies import build_graph
    from reconciler.loader import load

    manifest = tmp_path / "cloud.yaml"
    manifest.write_text(textwrap.dedent("""
        apiVersion: reconciler/v1
        kind: Tenant
        metadata: {name: acme}
        ---
        apiVersion: reconciler/v1
        kind: Network
        metadata: {name: web, tenant: acme}
        spec: {subnets: [{cidr: 10.0.0.0/24}]}
        ---
        apiVersion: reconciler/v1
        kind: Volume
        metadata: {name: data, tenant: acme}
        spec: {sizeGiB: 1}
        """))
    desired, problems = load([manifest])
    assert not problems
    driver = MemoryDriver(tmp_path / "memory")
    drivers = {k: driver for k in driver.kinds}
    log = tmp_path / "trace"
    monkeypatch.setenv(faults.ENV_VAR, "trace")
    monkeypatch.setenv(faults.LOG_VAR, str(log))
    monkeypatch.setattr(faults, "_calls", 0)
    the_plan = plan(desired, Observation(), build_graph(desired))
    result = Executor(drivers).apply(the_plan)
    assert result.ok
    events = [json.loads(line) for line in log.read_text().splitlines()]
    befores = sorted((e["call"], e["what"]) for e in events if e["event"] == "before")
    afters = sorted((e["call"], e["what"]) for e in events if e["event"] == "after")
    assert befores == afters
    assert [n for n, _ in befores] == [1, 2, 3]
    assert sorted(w for _, w in befores) == ["create Network/acme/web", "create Tenant/acme/acme",
                                             "create Volume/acme/data"]


# --- libvirt: an image registration killed half way ---------------------------------------


def qcow2(path: Path, size: str = "16M") -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
    return path


def image_target(key: Key, source: Path) -> Target:
    spec: dict[str, Any] = {"source": str(source), "format": "qcow2", "sha256": None}
    return Target(key, spec, Mark(key, "0" * 32, spec))


def test_an_image_registration_killed_after_its_mark_is_drift_and_finished(tmp_path: Path) -> None:
    """Was: the image was copied to a random `.tmp-XXXX` file before its mark was written:
    a kill during the copy left that file in the image directory for ever (16 MB a time),
    and a kill after the mark planned a replacement that deleted what it had just made.
    Now the mark goes first, the copy has one name per image, and a mark without its file
    is drift that the update repairs."""
    source = qcow2(tmp_path / "source.qcow2")
    sha = hashlib.sha256(source.read_bytes()).hexdigest()
    images = tmp_path / "images"
    d = LibvirtDriver(LibvirtSettings(image_dir=images, instance_dir=tmp_path / "instances"))
    key = Key("Image", "acme", "tiny")
    target = image_target(key, source)
    created = d.create(target)
    image = Path(created.host["image"])
    assert sorted(p.name for p in images.iterdir()) == sorted([image.name, f"{created.identity}.json"])
    # what a run killed during the copy leaves: the mark, part of the copy, no image
    image.unlink()
    partial = images / f".tmp-{image.name}"
    partial.write_bytes(b"the first megabytes of a copy")
    (found,) = d.observe().owned
    assert found.spec == target.spec  # the same spec (not a replacement) ...
    assert found.drift == (f"registered file {image} is missing",)  # ... with drift
    repaired = d.update(target, found, ())
    assert repaired.host["image"] == str(image)
    assert hashlib.sha256(image.read_bytes()).hexdigest() == sha
    assert not partial.exists()
    (found,) = d.observe().owned
    assert found.drift == ()
    # a destroy after such a kill removes the partial copy too
    image.unlink()
    partial.write_bytes(b"half")
    d.delete(found)
    assert list(images.iterdir()) == []


def test_an_image_registration_leaves_no_temporary_file(tmp_path: Path) -> None:
    source = qcow2(tmp_path / "source.qcow2")
    images = tmp_path / "images"
    d = LibvirtDriver(LibvirtSettings(image_dir=images, instance_dir=tmp_path / "instances"))
    key = Key("Image", "acme", "tiny")
    stale = images / f".tmp-{host_name(key)}-{hashlib.sha256(source.read_bytes()).hexdigest()[:12]}.qcow2"
    images.mkdir()
    stale.write_bytes(b"left by a run killed during its copy")
    d.create(image_target(key, source))
    assert not [p.name for p in images.iterdir() if p.name.startswith(".")]


# --- netlink: a namespace whose creation or removal was killed half way ------------------


def test_a_namespace_mount_point_without_a_namespace_is_a_stub(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Was: creating a namespace makes its mount point first, then binds the namespace to
    it; a run killed in between left a file that every later apply and destroy tried to
    enter ("failed to open netns"), for ever. Now it is told apart (not on nsfs), made
    again by apply, removed by destroy, and never entered."""
    monkeypatch.setattr(_host, "NETNS_DIR", tmp_path)
    (tmp_path / "rc-dhcp-0123456789").touch()
    assert _host.namespace_stub("rc-dhcp-0123456789")
    (tmp_path / "rc-0123456789").symlink_to("/proc/self/ns/net")  # on nsfs, as a bound one is
    assert not _host.namespace_stub("rc-0123456789")
    assert not _host.namespace_stub("rc-aaaaaaaaaa")  # not there at all
    with pytest.raises(NotFound, match="only a mount point"):
        with _host.Namespace("rc-dhcp-0123456789"):
            pass


def test_an_unmarked_device_is_ours_only_while_our_sidecar_names_it(tmp_path: Path) -> None:
    """The kernel takes no alias with a device's creation: a run killed between creating
    and marking it left an unmarked device that every later apply refused as someone
    else's, and destroy left behind. Unmarked counts as ours only with `half_made` (our
    sidecar, written before the device was made, exists); a mark of another
    installation or resource, or any other alias, never does."""
    from reconciler.drivers.netlink import NetlinkDriver, NetlinkSettings
    from reconciler.drivers.netlink._names import format_alias

    d = NetlinkDriver(NetlinkSettings(state_dir=tmp_path, home="0a1b2c3d"))
    key = Key("Network", "acme", "web")
    for alias in (None, ""):
        assert d.owns(alias, key, half_made=True) and d.foreign(alias, key, half_made=True) is None
        assert not d.owns(alias, key) and d.foreign(alias, key) == "has no reconciler mark"
    for alias in ("eth uplink", format_alias("ffffffff", key, "h"),
                  format_alias("0a1b2c3d", Key("Network", "acme", "db"), "h")):
        assert not d.owns(alias, key, half_made=True)
        assert d.foreign(alias, key, half_made=True)
    assert d.owns(format_alias("0a1b2c3d", key, "h"), key)


def test_an_instance_folder_without_its_domain_does_not_keep_its_image(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Was: a create killed before define, or a delete killed between undefine and
    removing the folder, left the instance's folder with no domain: nothing observed it,
    so nothing removed it, and its root disk counted as a user of its image, which every
    destroy then kept (retired) for ever. Now such folders of this installation are
    removed when an instance or image is deleted, except one a create is filling now."""
    from reconciler.drivers.libvirt._driver import claim_folder
    from reconciler import diskimage

    source = qcow2(tmp_path / "source.qcow2")
    d = LibvirtDriver(LibvirtSettings(image_dir=tmp_path / "images", instance_dir=tmp_path / "instances"))
    monkeypatch.setattr(d, "_lookup", lambda name: None)  # no domain at all on this "host"
    image = d.create(image_target(Key("Image", "acme", "tiny"), source))
    home = str(tmp_path / "instances")
    folders = {}
    for name in ("left", "filling"):
        key = Key("Instance", "acme", name)
        folders[name] = tmp_path / "instances" / host_name(key)
        claim_folder(folders[name], key, home)
        diskimage.create_overlay(folders[name] / "root.qcow2", Path(image.host["image"]), "qcow2", 1)
    d._creating.add(folders["filling"].name)
    theirs = tmp_path / "instances" / host_name(Key("Instance", "acme", "theirs"))
    theirs.mkdir()  # no mark of ours: never touched
    d.delete(image)
    assert not folders["left"].exists()
    assert folders["filling"].exists() and theirs.exists()
    # the image stays (retired) only for the folder still being filled
    assert sorted(p.suffix for p in (tmp_path / "images").iterdir()) == [".json", ".qcow2"]
    d._creating.clear()
    d.delete(image)
    assert not folders["filling"].exists() and theirs.exists()
    assert list((tmp_path / "images").iterdir()) == []


# --- storage: a volume whose create was killed inside qemu-img ----------------------------


def test_destroying_a_volume_removes_what_a_killed_create_left(tmp_path: Path) -> None:
    """A create killed inside `qemu-img create` leaves `.tmp-NAME.qcow2` (never seen by a
    scan: it is not the volume yet); the next create overwrites it, and the volume's
    delete removes it, so a destroy after such a kill leaves nothing in the pool."""
    from reconciler.drivers.storage import FileBackend

    backend = FileBackend("local", tmp_path, "0a1b2c3d")
    data = {"home": "0a1b2c3d", "mark": {"kind": "Volume", "tenant": "acme", "name": "v"}}
    found = backend.create("rc-0123456789", 1, data)
    (tmp_path / ".tmp-rc-0123456789.qcow2").write_bytes(b"half a qcow2 header")
    backend.delete(found, wipe=False)
    assert list(tmp_path.iterdir()) == []


def test_a_killed_sidecar_write_leaves_nothing_in_the_pool(tmp_path: Path) -> None:
    """Was: a volume's sidecar was written through a randomly named `.tmp-XXXX.json`; a
    run killed in that write (e.g. orphaning a retained volume in a destroy) left it in
    the user's pool for good. Now each volume has one temporary name: the next write of
    its sidecar replaces what a killed one left, and deleting the volume removes it."""
    from reconciler.drivers.storage import FileBackend

    backend = FileBackend("local", tmp_path, "0a1b2c3d")
    data = {"home": "0a1b2c3d", "mark": {"kind": "Volume", "tenant": "acme", "name": "v"}}
    found = backend.create("rc-0123456789", 1, data)
    stale = tmp_path / ".tmp-rc-0123456789.json"
    stale.write_text('{"home": "0a1b2c3d", "ma')  # killed half way through a write
    assert [f.name for f in backend.scan()] == ["rc-0123456789"]
    backend.write(found, {**data, "orphaned": True})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rc-0123456789.json", "rc-0123456789.qcow2"]
    assert json.loads((tmp_path / "rc-0123456789.json").read_text())["orphaned"] is True
    stale.write_text("{")
    backend.delete(found, wipe=False)
    assert list(tmp_path.iterdir()) == []


def test_a_router_whose_last_change_was_cut_short_is_drift(tmp_path: Path) -> None:
    """Was: observe does not enter a router's namespace, so a router killed after its
    legs but before its addresses, route or rules were inside looked done, and no plan
    repaired it (no SNAT for its tenants). Its sidecar now says when an ensure finished."""
    from reconciler.drivers.netlink import NetlinkDriver, NetlinkSettings, _nft
    from reconciler.drivers.netlink._driver import Facts

    d = NetlinkDriver(NetlinkSettings(state_dir=tmp_path, home="0a1b2c3d"))
    key = Key("Router", "acme", "r")
    ns = host_name(key)
    facts = Facts(_host.Snapshot(namespaces=frozenset({ns})), _nft.Listing(), _nft.Listing(), {}, {}, {})
    spec = {"networks": [], "external": None, "snat": False}
    data: dict[str, Any] = {"mark": Mark(key, "h", spec).to_dict(), "spec": spec, "derived": {}, "legs": {}}
    assert d.routers.observed(facts, ns, data).drift == ()  # no record of it: an older sidecar, done
    cut = d.routers.observed(facts, ns, {**data, "ensured": False})
    assert len(cut.drift) == 1 and "cut short" in cut.drift[0]
    assert d.routers.observed(facts, ns, {**data, "ensured": True}).drift == ()


def test_an_instance_folder_never_exists_without_its_mark(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Was: the folder was made, then marked (owner.json), and removed with rmtree: a run
    killed between mkdir and the mark, or in the middle of the rmtree (owner.json gone,
    the rest not), left a folder "without our mark" that every later plan refused as
    someone else's (found by test_crash at release count). Now it is marked under a
    temporary name and renamed into place, and renamed away before it is removed; what a
    kill leaves (`.tmp-<name>`) is removed by the next claim or sweep."""
    from reconciler.drivers.libvirt._driver import OWNER_FILE, claim_folder, discard_folder, folder_owner

    home = str(tmp_path)
    key = Key("Instance", "acme", "vm")
    folder = tmp_path / host_name(key)
    staging = tmp_path / f".tmp-{folder.name}"
    staging.mkdir()  # a claim killed before its mark was in
    claim_folder(folder, key, home)
    assert folder_owner(folder) == (str(key), home) and not staging.exists()
    (folder / "root.qcow2").write_bytes(b"disk")
    discard_folder(folder)
    assert list(tmp_path.iterdir()) == []
    # a removal killed in its rmtree: the folder is already out of the way, marked or not
    claim_folder(folder, key, home)
    folder.rename(staging)
    (staging / OWNER_FILE).unlink()
    d = LibvirtDriver(LibvirtSettings(image_dir=tmp_path / "images", instance_dir=tmp_path))
    monkeypatch.setattr(d, "_lookup", lambda name: None)
    assert d._folders_in_the_way(set()) == []  # not in the way of the instance
    with d._image_lock:
        d._sweep_unfinished()
    assert list(tmp_path.iterdir()) == []


# --- the tools we run die with us --------------------------------------------------------


def test_a_tool_run_by_a_killed_reconciler_dies_with_it(tmp_path: Path) -> None:
    """Was: a qemu-img started by a reconciler that was then killed went on, and wrote its
    `.tmp-NAME.qcow2` into the pool after the next run had cleaned it up (found by
    test_crash at release count). qemu-img now gets SIGKILL when its parent dies."""
    import secrets
    import time

    from reconciler import diskimage
    from reconciler.procs import is_alive

    # setpriv is util-linux's (Essential on Debian): without it this protection is gone
    assert diskimage.dying_with_us(["x"])[-1:] == ["x"] and diskimage.dying_with_us(["x"]) != ["x"], \
        "no setpriv on this host: a qemu-img of a killed reconciler would outlive it"
    marker = f"{600 + secrets.randbelow(1000)}.{secrets.randbelow(10**6)}"  # a sleep only this test runs
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import subprocess
        from reconciler import diskimage
        subprocess.run(diskimage.dying_with_us(["sleep", "{marker}"]))
        """)])

    def sleepers() -> list[int]:
        found = []
        for entry in Path("/proc").iterdir():
            try:
                cmd = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmd[:2] == [b"sleep", marker.encode()] and is_alive(int(entry.name)):
                found.append(int(entry.name))
        return found

    try:
        deadline = time.monotonic() + 30
        while not sleepers() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sleepers(), "the tool did not start"
        parent.kill()
        parent.wait()
        while sleepers() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not sleepers(), "the tool outlived the process that ran it"
    finally:
        parent.kill()
        parent.wait()
        for pid in sleepers():  # ours (its marker): never left behind
            os.kill(pid, signal.SIGKILL)


def test_the_last_network_or_group_drops_the_tables_before_its_sidecar_goes(tmp_path: Path) -> None:
    """Was: the last network (or security group) deleted removed its sidecar, then our
    nftables tables: a destroy killed in between left the tables for good, since nothing
    observed was left to delete (found by test_crash at release count). Now the tables
    go first; until the sidecar is removed too, the next destroy finds the object."""
    from reconciler.drivers.netlink import NetlinkDriver, NetlinkSettings, _names
    from reconciler.drivers.netlink._nft import BRIDGE_BASE, INET_BASE, Listing
    from reconciler.drivers.netlink._sidecar import GROUPS, NETWORKS
    from reconciler.state import Observed

    d = NetlinkDriver(NetlinkSettings(state_dir=tmp_path, home="0a1b2c3d"))
    dropped: list[str] = []
    group = Key("SecurityGroup", "acme", "web")
    prefix = _names.group_prefix(group)

    class Nft:
        def list_table(self, family: str, table: str) -> Listing:
            return Listing(exists=True, chains={b.name: [] for b in (INET_BASE if family == "inet" else BRIDGE_BASE)})

        def apply(self, commands: Any, namespace: str | None = None) -> None:
            pass

        def delete_table(self, family: str, table: str) -> None:
            # a kill right here: the group must still be found by the next destroy
            assert d.sidecars.read(GROUPS, prefix) is not None, "the sidecar went before the tables"
            dropped.append(family)

    d.nft = Nft()  # type: ignore[assignment]
    d.sidecars.write(NETWORKS, "rc-0123456789", {"mark": {}})
    d.sidecars.write(GROUPS, prefix, {"mark": {}})
    observed = Observed(group, prefix, {}, Mark(group, "h", {}), {})
    d.drop_tables_if_unused(leaving=(GROUPS, prefix))
    assert dropped == []  # the network still needs them
    d.sidecars.remove(NETWORKS, "rc-0123456789")
    d.groups.delete(observed)
    assert dropped == ["inet", "bridge"]
    assert not d.sidecars.any(NETWORKS, GROUPS)
