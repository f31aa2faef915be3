"""The lvm2 boundary on real lvm: a throwaway VG on a loop device per test (tests/lvmvg.py),
seen by lvm through a devices filter that shows it alone. No lvm is mocked.

Names, tags and the missing-tool message need no root; the rest skips without root and
lvm (or fails with RECONCILER_REQUIRE_HOST=1)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator

import pytest

from reconciler.drivers.storage import _lvm2
from reconciler.drivers.storage._lvm2 import (
    MAX_TAG,
    Lvm2,
    LvInfo,
    decode_tags,
    encode_tags,
    has_device_mapper,
    prefixed_tags,
)
from reconciler.errors import Conflict, NotFound, PermanentError, TransientError
from tests.lvmvg import ENV, LoopVg, loop_vg, require_lvm

MIB = 1024 * 1024
NO_LVM = "/nonexistent/lvm"  # a binary that cannot run: proves a check came before lvm
DM_HERE = has_device_mapper()


@pytest.fixture
def vg(tmp_path: Path) -> Iterator[LoopVg]:
    require_lvm()
    with loop_vg(tmp_path, size_mib=256) as made:
        yield made


@pytest.fixture
def lvm(vg: LoopVg) -> Lvm2:
    return Lvm2(extra_config=vg.config)


def _lv(lvm: Lvm2, vg: LoopVg, name: str) -> LvInfo:
    info = lvm.lv(vg.name, name)
    assert info is not None, f"{vg.name}/{name} is missing"
    return info


# --- names and tags: no lvm needed ------------------------------------------------------


@pytest.mark.parametrize("name", [
    "", "-data", ".", "..", "a b", "a/b", "a,b", "dätä", "x" * 128, "snapshot1", "pvmove0",
    "data_tmeta", "x_tdata", "x_cdata", "x_cmeta", "x_corig", "x_mlog", "x_mimage_0",
    "x_pmspare", "x_rimage_1", "x_rmeta_0", "x_vorigin", "x_vdata", "x_imeta",
])
def test_bad_lv_names_are_refused_before_lvm_runs(name: str) -> None:
    lvm = Lvm2(activation=False, binary=NO_LVM)
    for call in (lambda: lvm.create("rvtestvg", name, MIB),
                 lambda: lvm.extend("rvtestvg", name, MIB),
                 lambda: lvm.retag("rvtestvg", name, add=["a"]),
                 lambda: lvm.remove("rvtestvg", name),
                 lambda: lvm.snapshot("rvtestvg", "origin", name, MIB),
                 lambda: lvm.lv("rvtestvg", name),
                 lambda: lvm.device_path("rvtestvg", name)):
        with pytest.raises(PermanentError) as caught:
            call()
        assert "install" not in str(caught.value)  # lvm never ran
        assert "logical volume" in str(caught.value)


@pytest.mark.parametrize("name", ["", "-vg", ".", "..", "v g", "vg/x", "x" * 128, "vg!"])
def test_bad_vg_names_are_refused_before_lvm_runs(name: str) -> None:
    lvm = Lvm2(activation=False, binary=NO_LVM)
    for call in (lambda: lvm.lvs(name), lambda: lvm.vg(name), lambda: lvm.report(name),
                 lambda: lvm.create(name, "data", MIB), lambda: lvm.remove(name, "data"),
                 lambda: lvm.pool(name, "pool")):
        with pytest.raises(PermanentError, match="volume group name"):
            call()


def test_names_lvm_accepts_pass() -> None:
    assert _lvm2.check_lv_name("vol-1.data+x_y") == "vol-1.data+x_y"
    assert _lvm2.check_lv_name("x" * 127) == "x" * 127
    assert _lvm2.check_vg_name("snapshots") == "snapshots"  # LV rules are not VG rules
    with pytest.raises(PermanentError, match="at most 125"):  # "VG/LV" is limited too
        _lvm2.check_lv_name("x" * 115, vg="rvtestexp1")
    assert _lvm2.check_lv_name("x" * 114, vg="rvtestexp1")


def test_bad_tags_and_sizes_are_refused_before_lvm_runs() -> None:
    lvm = Lvm2(activation=False, binary=NO_LVM)
    for tag in ("a,b", "a b", "", "x" * (MAX_TAG + 1), "é"):
        with pytest.raises(PermanentError, match="tag"):
            lvm.create("rvtestvg", "data", MIB, tags=[tag])
    with pytest.raises(PermanentError, match="both added and removed"):
        lvm.retag("rvtestvg", "data", add=["a", "b"], remove=["b"])
    for size in (0, -1, 1.5, True):
        with pytest.raises(PermanentError, match="positive number of bytes"):
            lvm.create("rvtestvg", "data", size)  # type: ignore[arg-type]
    lvm.retag("rvtestvg", "data")  # nothing to change: no command at all


def test_a_missing_lvm_says_how_to_install_it() -> None:
    with pytest.raises(PermanentError, match="apt-get install lvm2"):
        Lvm2(activation=False, binary=NO_LVM).lvs("rvtestvg")


@pytest.mark.parametrize("payload", [
    b"", b"x", json.dumps({"home": "h", "mark": {"name": "a"}}).encode(),
    bytes(range(256)), random.Random(7).randbytes(3000),
])
def test_tags_round_trip_in_any_order(payload: bytes) -> None:
    tags = encode_tags("rv", payload)
    assert all(len(tag) <= MAX_TAG and _lvm2._TAG.fullmatch(tag) for tag in tags)
    assert all(tag.startswith("rv.") for tag in tags)
    shuffled = [*tags, "other", "rvx.0=abc", "rv.own.0=zz"]  # not ours: ignored
    random.Random(1).shuffle(shuffled)
    assert decode_tags("rv", shuffled) == payload
    assert sorted(prefixed_tags("rv", shuffled)) == sorted(tags)


def test_a_big_payload_spans_several_tags_and_any_damage_reads_as_none() -> None:
    payload = random.Random(3).randbytes(3000)
    tags = encode_tags("rv", payload)
    assert len(tags) == 5  # 3004 bytes -> 4006 base64 characters, 1000 a tag
    assert decode_tags("rv", tags[:-1]) is None  # the last chunk is missing
    assert decode_tags("rv", tags[1:]) is None  # the first
    assert decode_tags("rv", [t for i, t in enumerate(tags) if i != 2]) is None
    assert decode_tags("rv", [*tags, "rv.1=AAAA"]) is None  # a chunk twice
    garbled = tags[2][:-3] + ("AAA" if not tags[2].endswith("AAA") else "BBB")
    assert decode_tags("rv", [*tags[:2], garbled, *tags[3:]]) is None  # CRC catches it
    assert decode_tags("rv", [*tags[:2], tags[2][:-1] + "!", *tags[3:]]) is None  # not base64
    assert decode_tags("rv", []) is None
    assert decode_tags("rv", ["rv.0="]) is None
    assert decode_tags("other", tags) is None


def test_tag_prefixes_are_checked() -> None:
    for prefix in ("", "a=b", "a b", "x" * 17):
        with pytest.raises(ValueError):
            encode_tags(prefix, b"x")


# --- device-mapper and the activation flag --------------------------------------------


def test_device_mapper_is_read_from_the_kernel_not_the_node(tmp_path: Path) -> None:
    dev, proc = tmp_path / "dev", tmp_path / "proc"
    (dev / "mapper").mkdir(parents=True)
    proc.mkdir()
    (proc / "misc").write_text("237 loop-control\n")
    assert not has_device_mapper(dev, proc)
    (dev / "mapper" / "control").write_text("")  # not a char device: not the driver
    assert not has_device_mapper(dev, proc)
    (proc / "misc").write_text("237 loop-control\n236 device-mapper\n")
    assert has_device_mapper(dev, proc)
    # this host: lvm makes /dev/mapper/control itself when it is missing (also with no
    # driver behind it), so the node proves nothing; the kernel's list of drivers does
    with open("/proc/misc") as f:
        listed = any(line.split()[1:] == ["device-mapper"] for line in f)
    if listed:
        assert has_device_mapper()
    elif os.geteuid() == 0 and Path("/dev/mapper/control").exists():
        try:  # a module not loaded yet loads on open; no driver at all: ENODEV
            os.close(os.open("/dev/mapper/control", os.O_RDWR))
            opens = True
        except OSError:
            opens = False
        assert has_device_mapper() is opens


def test_activation_follows_device_mapper_and_disables_lvm_activation() -> None:
    assert Lvm2().activation is DM_HERE
    off = Lvm2(activation=False, extra_config="devices{scan_lvs=0}")
    assert off.activation is False
    assert off.argv("lvs", ["vg"]) == ["lvm", "lvs", "--config",
                                       "global{activation=0} devices{scan_lvs=0}", "vg"]
    on = Lvm2(activation=True)
    assert on.activation is True and on.argv("lvs", ["vg"]) == ["lvm", "lvs", "vg"]
    # never twice: lvm warns about a duplicate value
    twice = Lvm2(activation=False, extra_config="global{activation=0}")
    assert twice.config().count("activation=0") == 1
    with pytest.raises(PermanentError, match="device-mapper"):
        off.activate("rvtestvg", "data")
    assert off.device_path("rvtestvg", "data") == Path("/dev/rvtestvg/data")


# --- real lvm -------------------------------------------------------------------------


def test_create_extend_retag_remove(vg: LoopVg, lvm: Lvm2) -> None:
    before = datetime.now(timezone.utc) - timedelta(seconds=5)
    lvm.create(vg.name, "data", 8 * MIB, tags=["rv-test", "a=b"])
    info = _lv(lvm, vg, "data")
    assert info.size == 8 * MIB and isinstance(info.size, int)
    assert info.vg == vg.name and set(info.tags) == {"rv-test", "a=b"}
    assert info.attr.startswith("-wi") and info.origin is None and info.pool_lv is None
    assert info.data_percent is None and info.path == f"/dev/{vg.name}/data"
    assert info.created is not None and before <= info.created <= datetime.now(timezone.utc)
    if not lvm.activation:
        assert info.active is None and info.open is None  # lvm shows 'X': unknown

    lvm.extend(vg.name, "data", 16 * MIB)
    assert _lv(lvm, vg, "data").size == 16 * MIB
    lvm.extend(vg.name, "data", 16 * MIB)  # already: nothing to do
    lvm.extend(vg.name, "data", 13 * MIB)  # rounds up to 16 MiB (4 MiB extents): nothing to do
    with pytest.raises(PermanentError, match="never shrunk"):
        lvm.extend(vg.name, "data", 8 * MIB)
    lvm.create(vg.name, "odd", 5 * MIB + 1)  # whole sectors, then a whole extent
    assert _lv(lvm, vg, "odd").size == 8 * MIB

    lvm.retag(vg.name, "data", add=["c", "d"], remove=["a=b", "not-there"])
    assert set(_lv(lvm, vg, "data").tags) == {"rv-test", "c", "d"}

    lvm.remove(vg.name, "data")
    lvm.remove(vg.name, "odd")
    assert lvm.lv(vg.name, "data") is None
    assert lvm.lvs(vg.name) == []


def test_one_retag_is_one_metadata_commit(vg: LoopVg, lvm: Lvm2) -> None:
    lvm.create(vg.name, "data", 4 * MIB, tags=["a", "b"])
    seqno = _seqno(lvm, vg)
    lvm.retag(vg.name, "data", add=["x", "y", "z"], remove=["a", "b"])
    assert _seqno(lvm, vg) == seqno + 1
    assert _lv(lvm, vg, "data").tags == ("x", "y", "z")


def _seqno(lvm: Lvm2, vg: LoopVg) -> int:
    out = lvm.run("vgs", ["--reportformat", "json", "-o", "vg_seqno", vg.name], "seqno", report=True)
    return int(json.loads(out)["report"][0]["vg"][0]["vg_seqno"])


def test_real_lvm_keeps_encoded_tags_intact(vg: LoopVg, lvm: Lvm2) -> None:
    payload = json.dumps({"home": "host/inst", "mark": {"kind": "Volume", "name": "ü-data"},
                          "blob": random.Random(5).randbytes(2200).hex()}).encode()
    assert len(payload) > 3000
    tags = encode_tags("rv", payload)
    special = "az.AZ_09+-/=!:&#"  # every character lvm allows in a tag
    lvm.create(vg.name, "data", 4 * MIB, tags=[*tags, special, "x" * MAX_TAG])
    got = _lv(lvm, vg, "data").tags
    assert set(got) == {*tags, special, "x" * MAX_TAG}
    assert decode_tags("rv", got) == payload
    # replace the payload in one retag: the old chunks out, the new in
    new = encode_tags("rv", b'{"small": true}')
    old = [t for t in prefixed_tags("rv", got) if t not in new]
    lvm.retag(vg.name, "data", add=[t for t in new if t not in got], remove=old)
    assert decode_tags("rv", _lv(lvm, vg, "data").tags) == b'{"small": true}'


def test_reports_parse_sizes_as_integers(vg: LoopVg, lvm: Lvm2) -> None:
    info = lvm.vg(vg.name)
    assert info.name == vg.name and info.extent_size == 4 * MIB
    assert info.size == 252 * MIB == info.free  # 256 MiB less the metadata area, in extents
    assert isinstance(info.metadata_free, int) and info.metadata_free > 100_000
    got_vg, got_lvs = lvm.report(vg.name)  # an empty VG: vgs answers
    assert got_vg == info and got_lvs == []
    lvm.create(vg.name, "a", 4 * MIB)
    lvm.create(vg.name, "b", 12 * MIB)
    got_vg, got_lvs = lvm.report(vg.name)
    assert got_vg.free == info.free - 16 * MIB and got_vg.size == info.size
    assert {(lv.name, lv.size) for lv in got_lvs} == {("a", 4 * MIB), ("b", 12 * MIB)}
    assert got_lvs == lvm.lvs(vg.name)
    assert lvm.pool(vg.name, "nope") is None
    with pytest.raises(PermanentError, match="not a thin pool"):
        lvm.pool(vg.name, "a")


def test_a_missing_vg_is_a_host_config_error(vg: LoopVg, lvm: Lvm2) -> None:
    missing = vg.name + "x"
    for call in (lambda: lvm.lvs(missing), lambda: lvm.vg(missing), lambda: lvm.report(missing),
                 lambda: lvm.create(missing, "data", MIB), lambda: lvm.lv(missing, "data"),
                 lambda: lvm.remove(missing, "data")):
        with pytest.raises(PermanentError) as caught:
            call()
        assert type(caught.value) is PermanentError  # not NotFound: the VG must exist
        message = str(caught.value)
        assert "host config names a VG that does not exist" in message
        assert f"volume groups here: {vg.name}" in message  # only ours: the filter
        assert "WARNING" not in message


def test_a_missing_lv_is_not_found(vg: LoopVg, lvm: Lvm2) -> None:
    for call in (lambda: lvm.extend(vg.name, "nope", 8 * MIB),
                 lambda: lvm.retag(vg.name, "nope", add=["a"]),
                 lambda: lvm.remove(vg.name, "nope"),
                 lambda: lvm.snapshot(vg.name, "nope", "snap", 8 * MIB),
                 lambda: lvm.create(vg.name, "thin", 8 * MIB, thin_pool="nopool")):
        with pytest.raises(NotFound) as caught:
            call()
        assert "WARNING" not in str(caught.value)


def test_a_duplicate_name_is_a_conflict(vg: LoopVg, lvm: Lvm2) -> None:
    lvm.create(vg.name, "data", 4 * MIB)
    with pytest.raises(Conflict, match="already exists"):
        lvm.create(vg.name, "data", 4 * MIB)


def test_no_space_says_what_is_needed_and_free(vg: LoopVg, lvm: Lvm2) -> None:
    with pytest.raises(PermanentError) as caught:
        lvm.create(vg.name, "big", 1024 * MIB)
    assert str(caught.value).endswith(
        "not enough free space in the volume group: needs 256 extents (1.0 GiB), "
        "63 extents (252.0 MiB) free")
    lvm.create(vg.name, "data", 8 * MIB)
    with pytest.raises(PermanentError, match=r"needs \d+ extents .* free"):
        lvm.extend(vg.name, "data", 1024 * MIB)
    assert _lv(lvm, vg, "data").size == 8 * MIB


def test_a_full_metadata_area_is_permanent_and_changes_nothing(vg: LoopVg, lvm: Lvm2) -> None:
    lvm.create(vg.name, "data", 4 * MIB, tags=["keep"])
    room = lvm.vg(vg.name).metadata_free
    assert room is not None and room < 600_000  # lvm's default: about 510 KiB of text
    too_many = [f"t{i:04d}-" + "x" * 1000 for i in range(room // 1000 + 10)]
    with pytest.raises(PermanentError, match="metadata area is full .* vgcreate --metadatasize"):
        lvm.retag(vg.name, "data", add=too_many)
    assert _lv(lvm, vg, "data").tags == ("keep",)


@contextlib.contextmanager
def _vg_lock_held(vg: LoopVg) -> Iterator[None]:
    """Hold lvm's file lock of the VG, as another lvm command writing it would."""
    out = subprocess.run(["lvm", "lvmconfig", "--typeconfig", "full", "global/locking_dir"],
                         capture_output=True, text=True, env=ENV, check=True).stdout
    path = Path(out.strip().partition("=")[2].strip('"')) / f"V_{vg.name}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)  # our test VG's lock file


def test_lock_contention_is_transient(vg: LoopVg) -> None:
    impatient = Lvm2(extra_config=vg.config + " global{wait_for_locks=0}")
    patient = Lvm2(extra_config=vg.config, timeout=1.0)  # lvm waits: our timeout ends it
    with _vg_lock_held(vg):
        with pytest.raises(TransientError, match="holds the volume group's lock"):
            impatient.create(vg.name, "data", 4 * MIB)
        with pytest.raises(TransientError, match="did not finish in 1 s"):
            patient.create(vg.name, "data", 4 * MIB)
    patient.create(vg.name, "data", 4 * MIB)  # free again
    assert [lv.name for lv in patient.lvs(vg.name)] == ["data"]


@pytest.mark.skipif(DM_HERE, reason="device-mapper exists here: test_snapshots_and_thin_volumes"
                    "_with_device_mapper covers snapshots and thin pools")
def test_snapshots_and_thin_pools_need_device_mapper(vg: LoopVg, lvm: Lvm2) -> None:
    assert lvm.activation is False
    lvm.create(vg.name, "origin", 8 * MIB)
    with pytest.raises(PermanentError) as caught:
        lvm.snapshot(vg.name, "origin", "snap", 8 * MIB, tags=["rv-test"])
    assert "needs the kernel's device-mapper driver, which this host lacks" in str(caught.value)
    assert "Can't create snapshot" in str(caught.value)
    with pytest.raises(PermanentError, match="device-mapper driver, which this host lacks"):
        lvm.run("lvcreate", ["--type", "thin-pool", "-L", "64m", "-n", "pool", "--yes", vg.name],
                "creating thin pool")
    with pytest.raises(PermanentError, match="not a thin volume: a snapshot of it needs a size"):
        lvm.snapshot(vg.name, "origin", "snap")
    with pytest.raises(PermanentError, match="device-mapper"):
        lvm.activate(vg.name, "origin")
    # wrongly told there is device-mapper (and without the fixture's activation=0)
    forced = Lvm2(activation=True, extra_config=vg.config.replace("global{activation=0}", ""))
    with pytest.raises(PermanentError, match="device-mapper driver, which this host lacks"):
        forced.create(vg.name, "data", 4 * MIB)
    # nothing was left behind by the failed commands
    assert [lv.name for lv in lvm.lvs(vg.name)] == ["origin"]
    assert lvm.vg(vg.name).free == 252 * MIB - 8 * MIB


@pytest.mark.skipif(not DM_HERE, reason="needs the kernel's device-mapper, which this host "
                    "lacks (test_snapshots_and_thin_pools_need_device_mapper runs instead)")
def test_snapshots_and_thin_volumes_with_device_mapper(vg: LoopVg, lvm: Lvm2) -> None:
    assert lvm.activation is True
    lvm.run("lvcreate", ["--type", "thin-pool", "-L", "64m", "-n", "pool", "--yes", vg.name],
            "creating thin pool")
    pool = lvm.pool(vg.name, "pool")
    assert pool is not None and pool.size == 64 * MIB and pool.data_percent is not None
    lvm.create(vg.name, "thin", 128 * MIB, tags=["rv-test"], thin_pool="pool")
    thin = _lv(lvm, vg, "thin")
    assert thin.is_thin and thin.pool_lv == "pool" and thin.size == 128 * MIB
    lvm.snapshot(vg.name, "thin", "thin-snap", None, tags=["rv-snap"])
    snap = _lv(lvm, vg, "thin-snap")
    assert snap.is_snapshot and snap.origin == "thin" and snap.tags == ("rv-snap",)
    assert lvm.activate(vg.name, "thin-snap") == Path(f"/dev/{vg.name}/thin-snap")
    lvm.create(vg.name, "thick", 8 * MIB)
    lvm.snapshot(vg.name, "thick", "thick-snap", 8 * MIB)
    assert _lv(lvm, vg, "thick-snap").origin == "thick"
    assert lvm.device_path(vg.name, "thick").exists()
    for name in ("thick-snap", "thick", "thin-snap", "thin", "pool"):
        lvm.remove(vg.name, name)
    assert lvm.lvs(vg.name) == []
