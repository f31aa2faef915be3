"""The Volume contract, against the in-memory driver and the storage driver's two real
backends: qcow2 files in a pool directory, and LVM on a loop-device volume group the
test creates and removes (with activation disabled where the kernel has no
device-mapper, as on the CI machine: metadata operations are still real).

What the drivers did is checked with `qemu-img`, `qemu-io` and `lvs` (not our code).
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from contract.conftest import target
from reconciler.errors import Conflict
from reconciler.loader import load
from reconciler.models import Key
from reconciler.planner import Action, plan
from reconciler.state import Proposal

GIB = 1024**3


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=False, timeout=60)


class MemoryVolumes:
    name = "memory"
    backend = None
    can_snapshot = True

    def __init__(self, root: Path):
        from reconciler.drivers.memory import MemoryDriver

        self.root = root / "memory"
        self.driver = MemoryDriver(self.root, kinds=("Volume",))

    def _file(self, name: str) -> Path:
        return self.root / "Volume" / f"{name}.json"

    def unowned(self, key: Key) -> str:
        name = self.driver.host_name(key)
        self._file(name).parent.mkdir(parents=True, exist_ok=True)
        self._file(name).write_text(json.dumps({"spec": {"sizeGiB": 3}}))
        return name

    def exists(self, name: str) -> bool:
        return self._file(name).exists()

    def size(self, name: str) -> int:
        return json.loads(self._file(name).read_text())["spec"]["sizeGiB"] * GIB

    def marked(self, name: str) -> bool:
        return "mark" in json.loads(self._file(name).read_text())

    def snapshots(self, name: str) -> list[str]:
        return sorted(json.loads(self._file(name).read_text())["spec"].get("snapshots") or [])

    def cleanup(self) -> None:
        """Nothing: its files live in pytest's tmp_path."""


class FileVolumes:
    name = "file"
    backend = "local"
    can_snapshot = True

    def __init__(self, root: Path):
        from reconciler.drivers.storage import FileBackend, StorageDriver

        self.pool = root / "pool"
        self.home = "t" + secrets.token_hex(4)
        self.driver = StorageDriver({"local": FileBackend("local", self.pool, self.home)}, "local")

    def image(self, name: str) -> Path:
        return self.pool / f"{name}.qcow2"

    def unowned(self, key: Key) -> str:
        name = self.driver.host_name(key)
        self.pool.mkdir(parents=True, exist_ok=True)
        assert _run("qemu-img", "create", "-q", "-f", "qcow2", str(self.image(name)), "3G").returncode == 0
        return name

    def exists(self, name: str) -> bool:
        return self.image(name).exists()

    def size(self, name: str) -> int:
        out = _run("qemu-img", "info", "--output=json", "-U", str(self.image(name)))
        assert out.returncode == 0, out.stderr
        return int(json.loads(out.stdout)["virtual-size"])

    def marked(self, name: str) -> bool:
        sidecar = self.pool / f"{name}.json"
        return sidecar.exists() and json.loads(sidecar.read_text()).get("home") == self.home

    def snapshots(self, name: str) -> list[str]:
        out = _run("qemu-img", "snapshot", "-l", "-U", str(self.image(name)))
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()[2:]  # "Snapshot list:" and the column heads
        return sorted(line.split()[1] for line in lines if line.strip())

    def write(self, name: str, pattern: int) -> None:
        out = _run("qemu-io", "-f", "qcow2", "-c", f"write -P {pattern} 0 64k", str(self.image(name)))
        assert out.returncode == 0, out.stderr

    def holds(self, name: str, pattern: int) -> bool:
        out = _run("qemu-io", "-f", "qcow2", "-r", "-U", "-c", f"read -P {pattern} 0 64k", str(self.image(name)))
        return out.returncode == 0 and "Pattern verification failed" not in out.stdout

    def cleanup(self) -> None:
        shutil.rmtree(self.pool, ignore_errors=True)


class LvmVolumes:
    name = "lvm"
    backend = "vg"

    def __init__(self, vg: Any):
        from reconciler.drivers.storage import Lvm2, LvmBackend, StorageDriver
        from lvmvg import device_mapper

        self.vg = vg
        self.home = "t" + secrets.token_hex(4)
        self.can_snapshot = device_mapper()
        self.driver = StorageDriver(
            {"vg": LvmBackend("vg", vg.name, self.home, Lvm2(extra_config=vg.config))}, "vg")

    def _lvs(self) -> dict[str, dict[str, str]]:
        out = _run("lvs", "--config", self.vg.config, "--reportformat", "json", "--units", "b", "--nosuffix",
                   "-o", "lv_name,lv_size,lv_tags,origin", self.vg.name)
        assert out.returncode == 0, out.stderr
        return {row["lv_name"]: row for row in json.loads(out.stdout)["report"][0]["lv"]}

    def unowned(self, key: Key) -> str:
        name = self.driver.host_name(key)
        out = _run("lvcreate", "--config", self.vg.config, "-L", "12m", "-n", name, "--yes", self.vg.name)
        assert out.returncode == 0, out.stderr
        return name

    def exists(self, name: str) -> bool:
        return name in self._lvs()

    def size(self, name: str) -> int:
        return int(self._lvs()[name]["lv_size"])

    def marked(self, name: str) -> bool:
        return f"rc.home={self.home}" in self._lvs()[name]["lv_tags"].split(",")

    def snapshots(self, name: str) -> list[str]:
        return sorted(n.split(".s.", 1)[1] for n, row in self._lvs().items() if row["origin"] == name)

    def cleanup(self) -> None:
        pass  # the loop VG goes with everything on it


@contextlib.contextmanager
def _harness(kind: str, tmp_path: Path) -> Iterator[Any]:
    with contextlib.ExitStack() as stack:
        if kind == "memory":
            h: Any = MemoryVolumes(tmp_path)
        elif kind == "file":
            require_qemu_img()
            h = FileVolumes(tmp_path)
        else:
            from lvmvg import loop_vg, require_lvm

            require_lvm()
            h = LvmVolumes(stack.enter_context(loop_vg(tmp_path, size_mib=8192)))
        h.tenant = "rct" + secrets.token_hex(3)
        stack.callback(h.cleanup)
        yield h


def require_qemu_img() -> None:
    from hostcheck import require

    require(tuple(f"{tool} missing: run scripts/setup-storage.sh" for tool in ("qemu-img", "qemu-io")
                   if shutil.which(tool) is None))


@pytest.fixture(params=["memory", "file", "lvm"])
def vols(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """Every Volume driver."""
    with _harness(request.param, tmp_path) as h:
        yield h


@pytest.fixture(params=["file", "lvm"])
def real_vols(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """The storage driver's real backends (capacity, lanes)."""
    with _harness(request.param, tmp_path) as h:
        yield h


@pytest.fixture
def file_vols(tmp_path: Path) -> Iterator[Any]:
    with _harness("file", tmp_path) as h:
        yield h


def _volume(h: Any, name: str = "data", **spec: Any):
    spec.setdefault("sizeGiB", 1)
    if h.backend:
        spec.setdefault("backend", h.backend)
    return target("Volume", h.tenant, name, **spec)


def _owned(h: Any) -> list:
    return [o for o in h.driver.observe().owned if o.key.tenant == h.tenant]


# --- the lifecycle ---------------------------------------------------------------------


def test_create_is_observed_with_its_mark_and_size(vols) -> None:
    t = _volume(vols, sizeGiB=1)
    created = vols.driver.create(t)
    assert dict(created.spec) == dict(t.spec)
    (obs,) = _owned(vols)
    assert obs.key == t.key and obs.mark.spec_hash == t.mark.spec_hash and not obs.mark.orphaned
    assert dict(obs.spec) == dict(t.spec)
    name = vols.driver.host_name(t.key)
    assert vols.exists(name) and vols.marked(name)
    assert vols.size(name) == 1 * GIB
    if vols.name == "file":
        assert obs.host["path"] == str(vols.image(name)) and obs.host["format"] == "qcow2"
        assert obs.host["data"] == "empty"
    if vols.name == "lvm":
        assert obs.host["block"] == "true" and obs.host["lv"] == f"{vols.vg.name}/{name}"


def test_grow_in_place(vols) -> None:
    obs = vols.driver.create(_volume(vols, sizeGiB=1))
    grown = vols.driver.update(_volume(vols, sizeGiB=3), obs, ())
    assert grown.spec["sizeGiB"] == 3
    assert vols.size(vols.driver.host_name(obs.key)) == 3 * GIB
    assert grown.identity == obs.identity  # the same object, not a new one


def test_shrink_is_refused_at_plan_time_and_nothing_changes(vols, write_manifests) -> None:
    obs = vols.driver.create(_volume(vols, sizeGiB=2))
    spec: dict[str, Any] = {"sizeGiB": 1}
    if vols.backend:
        spec["backend"] = vols.backend
    docs = [
        {"apiVersion": "reconciler/v1", "kind": "Tenant", "metadata": {"name": vols.tenant}, "spec": {}},
        {"apiVersion": "reconciler/v1", "kind": "Volume", "metadata": {"name": "data", "tenant": vols.tenant},
         "spec": spec},
    ]
    desired, problems = load([write_manifests({"v.yaml": yaml.safe_dump_all(docs)})])
    assert problems == []
    result = plan(desired, vols.driver.observe())
    assert [(p.path, "cannot shrink from 2 to 1" in p.message) for p in result.errors] == [("spec.sizeGiB", True)]
    assert result.errors[0].file.endswith("v.yaml") and result.errors[0].line > 1
    assert vols.size(vols.driver.host_name(obs.key)) == 2 * GIB


def test_snapshots_are_added_and_removed_by_name(vols) -> None:
    if not vols.can_snapshot:
        # no device-mapper: the driver refuses up front (plan time), naming the field
        problems = vols.driver.problems("Volume", vols.tenant, "data", dict(_volume(vols, snapshots=["s1"]).spec))
        assert [p for p, _ in problems] == [("snapshots",)]
        assert "device-mapper" in problems[0][1]
        return
    obs = vols.driver.create(_volume(vols, snapshots=["s1"]))
    name = vols.driver.host_name(obs.key)
    assert obs.spec["snapshots"] == ["s1"] and vols.snapshots(name) == ["s1"]
    obs = vols.driver.update(_volume(vols, snapshots=["s1", "s2"]), obs, ())
    assert vols.snapshots(name) == ["s1", "s2"]
    obs = vols.driver.update(_volume(vols, snapshots=["s2"]), obs, ())
    assert vols.snapshots(name) == ["s2"] and obs.spec["snapshots"] == ["s2"]
    (again,) = _owned(vols)
    assert again.spec["snapshots"] == ["s2"]


def test_orphan_keeps_the_volume_its_data_and_its_mark(vols) -> None:
    obs = vols.driver.create(_volume(vols))
    name = vols.driver.host_name(obs.key)
    if vols.name == "file":
        vols.write(name, 0x5A)
    kept = vols.driver.orphan(obs)
    assert kept.mark.orphaned
    (again,) = _owned(vols)
    assert again.mark.orphaned and again.key == obs.key
    assert vols.exists(name) and vols.marked(name)
    if vols.name == "file":
        assert vols.holds(name, 0x5A)
        assert again.host["data"].endswith("written")


def test_delete_removes_it(vols) -> None:
    obs = vols.driver.create(_volume(vols, deletionPolicy="Delete", wipe=vols.name != "lvm" or vols.can_snapshot))
    name = vols.driver.host_name(obs.key)
    if vols.name == "file":
        vols.write(name, 0x33)
    vols.driver.delete(obs)
    assert not vols.exists(name)
    assert _owned(vols) == []
    vols.driver.delete(obs)  # idempotent


def test_an_unowned_object_with_our_name_is_a_conflict_and_untouched(vols) -> None:
    t = _volume(vols)
    name = vols.unowned(t.key)
    before = vols.size(name)
    seen = vols.driver.observe()
    assert [o for o in seen.owned if o.key.tenant == vols.tenant] == []
    assert any(u.kind == "Volume" and u.host_name == name for u in seen.unowned)
    with pytest.raises(Conflict):
        vols.driver.create(t)
    assert vols.exists(name) and not vols.marked(name) and vols.size(name) == before


def test_import_adopts_an_unowned_volume_as_it_is(vols) -> None:
    t = _volume(vols, sizeGiB=1)
    name = vols.unowned(t.key)
    size = vols.size(name)
    adopted = vols.driver.adopt(name, t)
    assert adopted.key == t.key and vols.marked(name)
    assert vols.size(name) == size  # its data and size stay as they were
    (obs,) = _owned(vols)
    assert obs.key == t.key
    if vols.name != "memory":
        assert obs.spec["sizeGiB"] == -(-size // GIB)


# --- what the real backends add ---------------------------------------------------------


def test_capacity_admission_names_what_is_needed_and_free(real_vols) -> None:
    vols = real_vols
    big = 64 if vols.name == "lvm" else 65536  # the loop VG has 8 GiB; no filesystem has 64 TiB
    vols.driver.observe()
    t = _volume(vols, sizeGiB=big)
    problems = vols.driver.admit([Proposal(t.key, "create", t.spec, None)])
    assert [(k, p) for k, p, _ in problems] == [(t.key, ("sizeGiB",))]
    message = problems[0][2]
    assert "this plan needs" in message and "is available" in message and "free" in message, message
    small = _volume(vols, sizeGiB=1)
    assert vols.driver.admit([Proposal(small.key, "create", small.spec, None)]) == []
    assert not vols.exists(vols.driver.host_name(t.key))  # admission changes nothing


def test_lvm_admission_counts_the_volume_groups_metadata_space(tmp_path: Path) -> None:
    """Every LV and its tags take VG metadata text; a VG made with lvm's default metadata
    area holds some hundreds of ours. Admission says so before lvm would refuse."""
    with _harness("lvm", tmp_path) as vols:
        proposals = [Proposal(Key("Volume", vols.tenant, f"v{i}"), "create",
                              {"sizeGiB": 1, "backend": "vg", "snapshots": []}, None) for i in range(1000)]
        problems = vols.driver.admit(proposals)
        meta = [m for _, p, m in problems if p == ("backend",)]
        assert len(meta) == 1 and "metadata area of volume group" in meta[0] and "1000 new LVs" in meta[0]
        assert vols.driver.admit(proposals[:3]) == []


def test_growth_is_admitted_by_the_difference(real_vols) -> None:
    vols = real_vols
    obs = vols.driver.create(_volume(vols, sizeGiB=1))
    grow = _volume(vols, sizeGiB=2)
    assert vols.driver.admit([Proposal(grow.key, "update", grow.spec, obs)]) == []


def test_one_lvm_writer_per_volume_group(real_vols) -> None:
    vols = real_vols
    lane = vols.driver.lane(Key("Volume", vols.tenant, "a"), {"backend": vols.backend}, None)
    assert lane == (f"vg:{vols.vg.name}" if vols.name == "lvm" else None)


def test_a_missing_image_is_drift_and_apply_recreates_it(file_vols) -> None:
    """Only the file backend keeps its mark apart from the data (a sidecar)."""
    vols = file_vols
    obs = vols.driver.create(_volume(vols))
    image = vols.image(vols.driver.host_name(obs.key))
    image.unlink()
    (broken,) = _owned(vols)
    assert broken.drift and "missing" in broken.drift[0]
    fixed = vols.driver.update(_volume(vols), broken, ())
    assert fixed.drift == () and vols.size(image.stem) == GIB


def test_a_file_a_process_holds_is_grown_by_that_process_not_behind_its_back(file_vols) -> None:
    """qemu locks the images it has open; growing one under it would corrupt it. The
    driver leaves the growth to the holder (the instance driver's blockResize). (LVs are
    grown under a running guest by lvm itself.)"""
    vols = file_vols
    obs = vols.driver.create(_volume(vols))
    image = vols.image(vols.driver.host_name(obs.key))
    holder = subprocess.Popen(["qemu-io", "-f", "qcow2", str(image)], stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            (held,) = _owned(vols)
            if held.host.get("inUse") == "true":
                break
            subprocess.run(["sleep", "0.05"], check=False)
        assert held.host.get("inUse") == "true"
        grown = vols.driver.update(_volume(vols, sizeGiB=2), held, ())
        assert grown.spec["sizeGiB"] == 1  # untouched: the holder grows it
        snap = _volume(vols, snapshots=["s1"])
        problems = vols.driver.admit([Proposal(snap.key, "update", snap.spec, held)])
        assert [p for _, p, _ in problems] == [("snapshots",)]
    finally:
        holder.stdin.close()  # type: ignore[union-attr]
        holder.wait(timeout=10)


def test_plan_removal_retains_by_default_and_deletes_when_told(vols, write_manifests) -> None:
    retained = vols.driver.create(_volume(vols, "kept"))
    deleted = vols.driver.create(_volume(vols, "gone", deletionPolicy="Delete"))
    docs = [{"apiVersion": "reconciler/v1", "kind": "Tenant", "metadata": {"name": vols.tenant}, "spec": {}}]
    desired, _ = load([write_manifests({"t.yaml": yaml.safe_dump(docs[0])})])
    result = plan(desired, vols.driver.observe())
    actions = {c.key.name: c.action for c in result.changes if c.key.kind == "Volume"}
    assert actions == {"kept": Action.ORPHAN, "gone": Action.DELETE}
    assert retained.key.name == "kept" and deleted.key.name == "gone"
