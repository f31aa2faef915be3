"""Disk image files: header reads against what qemu-img says, and changes through qemu-img.

qemu-img and qemu-io (qemu-utils) are a dependency of the libvirt and storage drivers:
these tests run the real tools, never a stand-in. An image "held by a guest" is held by
a real `qemu-io` process waiting on a pipe for commands, which takes QEMU's OFD locks.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import re
import shutil
import struct
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from reconciler.diskimage import (
    GIB,
    QCOW2_MAGIC,
    ImageFacts,
    ImageLocked,
    Qcow2Header,
    create_overlay,
    create_qcow2,
    image_info,
    is_locked,
    locked_files,
    read_image,
    read_qcow2_header,
    resize,
    snapshot_create,
    snapshot_delete,
    snapshot_list,
)
from reconciler.errors import PermanentError, TransientError

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
    reason="qemu-img and qemu-io are not installed (apt-get install qemu-utils)",
)

MIB = 1024**2


def qemu_img_create(*args: str) -> None:
    subprocess.run(["qemu-img", "create", "-q", *args], check=True, capture_output=True, timeout=60)


def test_a_qcow2_file_reports_its_virtual_size_and_no_backing(tmp_path: Path) -> None:
    path = tmp_path / "base.qcow2"
    qemu_img_create("-f", "qcow2", str(path), "3G")
    assert read_qcow2_header(path) == Qcow2Header(3 * GIB, None)


@pytest.mark.parametrize("size, expected", [("64M", 64 * MIB), ("1G", GIB), ("65536G", 65536 * GIB),
                                            ("1000000000", 1000000000)])
def test_sizes(tmp_path: Path, size: str, expected: int) -> None:
    path = tmp_path / "disk.qcow2"
    qemu_img_create("-f", "qcow2", str(path), size)
    header = read_qcow2_header(path)
    assert header is not None and header.virtual_size == expected


def test_an_overlay_reports_its_backing_path(tmp_path: Path) -> None:
    base = tmp_path / "images" / "rc-0123456789-abcdef012345.qcow2"
    base.parent.mkdir()
    qemu_img_create("-f", "qcow2", str(base), "1G")
    overlay = tmp_path / "root.qcow2"
    qemu_img_create("-f", "qcow2", "-b", str(base), "-F", "qcow2", str(overlay), "10G")
    assert read_qcow2_header(overlay) == Qcow2Header(10 * GIB, str(base))


def test_an_overlay_on_a_raw_image(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    qemu_img_create("-f", "raw", str(base), "16M")
    overlay = tmp_path / "root.qcow2"
    qemu_img_create("-f", "qcow2", "-b", str(base), "-F", "raw", str(overlay), "2G")
    assert read_qcow2_header(overlay) == Qcow2Header(2 * GIB, str(base))


def test_an_overlay_without_a_size_takes_the_backing_size(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    qemu_img_create("-f", "qcow2", str(base), "5G")
    overlay = tmp_path / "root.qcow2"
    qemu_img_create("-f", "qcow2", "-b", str(base), "-F", "qcow2", str(overlay))
    assert read_qcow2_header(overlay) == Qcow2Header(5 * GIB, str(base))


def test_a_relative_backing_path_is_reported_as_written(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    qemu_img_create("-f", "qcow2", str(base), "1G")
    overlay = tmp_path / "root.qcow2"
    qemu_img_create("-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(overlay), "1G")
    assert read_qcow2_header(overlay) == Qcow2Header(GIB, "base.qcow2")


def test_a_backing_path_with_non_ascii_characters(tmp_path: Path) -> None:
    base = tmp_path / "bäse image.qcow2"
    qemu_img_create("-f", "qcow2", str(base), "1G")
    overlay = tmp_path / "root.qcow2"
    qemu_img_create("-f", "qcow2", "-b", str(base), "-F", "qcow2", str(overlay), "1G")
    header = read_qcow2_header(overlay)
    assert header is not None and header.backing_file == str(base)


def test_after_qemu_img_resize(tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    qemu_img_create("-f", "qcow2", str(path), "1G")
    subprocess.run(["qemu-img", "resize", "-q", str(path), "4G"], check=True, capture_output=True)
    assert read_qcow2_header(path) == Qcow2Header(4 * GIB, None)


def test_a_raw_file_is_not_qcow2(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    qemu_img_create("-f", "raw", str(path), "16M")
    assert read_qcow2_header(path) is None


def test_a_raw_file_with_data_is_not_qcow2(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(b"\xeb\x63\x90" + b"\0" * 1021)  # a boot sector's start
    assert read_qcow2_header(path) is None


@pytest.mark.parametrize("length", [0, 3, 4, 20, 31])
def test_a_short_file_is_not_qcow2(tmp_path: Path, length: int) -> None:
    path = tmp_path / "short.qcow2"
    real = tmp_path / "real.qcow2"
    qemu_img_create("-f", "qcow2", str(real), "1G")
    path.write_bytes(real.read_bytes()[:length])  # even with the magic at its start
    assert read_qcow2_header(path) is None


def test_a_truncated_header_still_gives_the_size(tmp_path: Path) -> None:
    """32 bytes hold the magic, backing offset and size: enough to read."""
    real = tmp_path / "real.qcow2"
    qemu_img_create("-f", "qcow2", str(real), "7G")
    path = tmp_path / "head.qcow2"
    path.write_bytes(real.read_bytes()[:32])
    assert read_qcow2_header(path) == Qcow2Header(7 * GIB, None)


def test_a_missing_file(tmp_path: Path) -> None:
    assert read_qcow2_header(tmp_path / "nope.qcow2") is None
    assert read_qcow2_header(tmp_path / "no-dir" / "nope.qcow2") is None


def test_a_hand_built_header(tmp_path: Path) -> None:
    """The fields at the offsets of the qcow2 spec (big-endian)."""
    backing = b"/images/base.qcow2"
    head = QCOW2_MAGIC + struct.pack(">I", 3) + struct.pack(">QI", 104, len(backing))
    head += struct.pack(">I", 16) + struct.pack(">Q", 42 * GIB)
    head = head.ljust(104, b"\0") + backing
    path = tmp_path / "hand.qcow2"
    path.write_bytes(head)
    assert read_qcow2_header(path) == Qcow2Header(42 * GIB, "/images/base.qcow2")


# --- helpers: what the real tools say ------------------------------------------------------


def facts_of(path: Path) -> ImageFacts:
    facts = read_image(path)
    assert facts is not None, f"{path} does not exist"
    return facts


def invalid(path: Path) -> str:
    """The start of read_image's error for a damaged qcow2 file, as a pattern."""
    return re.escape(f"{path}: not a valid qcow2 image: ")


def qemu_img_info(path: Path) -> dict:
    out = subprocess.run(["qemu-img", "info", "--output=json", str(path)], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    return json.loads(out)


def qemu_img_snapshot_names(path: Path) -> list[str]:
    """The TAG column of `qemu-img snapshot -l` (for names without spaces)."""
    out = subprocess.run(["qemu-img", "snapshot", "-l", str(path)], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    lines = out.splitlines()
    if not lines:
        return []
    assert lines[0] == "Snapshot list:" and lines[1].split()[:2] == ["ID", "TAG"]
    return [line.split()[1] for line in lines[2:]]


def qemu_io_write(path: Path, offset: str, length: str = "64k", fmt: str = "qcow2") -> None:
    subprocess.run(["qemu-io", "-f", fmt, "-c", f"write -P 0x55 {offset} {length}", str(path)],
                   check=True, capture_output=True, timeout=60)


def proc_locks_mention(path: Path) -> bool:
    """/proc/locks read here without the code under test: a line with the file's inode."""
    st = os.stat(path)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    return any(dev in line.split() for line in Path("/proc/locks").read_text().splitlines())


@contextlib.contextmanager
def held_by_qemu_io(path: Path, read_only: bool = False) -> Iterator[subprocess.Popen]:
    """A qemu-io process with `path` open read-write (as a running guest has its disk;
    read-only as it has its backing image), waiting for commands on a pipe; ended by
    closing the pipe, else by its PID."""
    args = ["qemu-io", *(["-r"] if read_only else []), "-f", "qcow2", str(path)]
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not proc_locks_mention(path):
            assert proc.poll() is None, f"qemu-io exited: {proc.stderr.read()!r}"
            assert time.monotonic() < deadline, "qemu-io took no lock on the image"
            time.sleep(0.02)
        yield proc
    finally:
        assert proc.stdin is not None
        proc.stdin.close()  # end of input: qemu-io quits
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.terminate()
            proc.wait(timeout=10)
        assert proc.stderr is not None
        proc.stderr.close()


# --- read_image against qemu-img info -------------------------------------------------------


@pytest.mark.parametrize("size", ["1M", "1G", "3G", "1000000000", "65536G"])
def test_read_image_of_a_new_qcow2_agrees_with_qemu_img_info(tmp_path: Path, size: str) -> None:
    path = tmp_path / "disk.qcow2"
    qemu_img_create("-f", "qcow2", str(path), size)
    info = qemu_img_info(path)
    facts = read_image(path)
    assert facts == ImageFacts("qcow2", info["virtual-size"], info["actual-size"], False, (), None)
    assert facts.allocated == os.stat(path).st_blocks * 512


def test_read_image_of_an_overlay_gives_its_backing_file(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    qemu_img_create("-f", "raw", str(base), "16M")
    overlay = tmp_path / "root.qcow2"
    create_overlay(overlay, base, "raw", 2)
    info = qemu_img_info(overlay)
    facts = facts_of(overlay)
    assert facts.backing_file == info["backing-filename"] == str(base)
    assert (facts.format, facts.virtual_size) == ("qcow2", info["virtual-size"])
    assert facts.virtual_size == 2 * GIB
    assert facts.has_data is False  # the backing file's data is not the overlay's


def test_read_image_after_resize(tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    create_qcow2(path, 1)
    resize(path, 5)
    assert facts_of(path).virtual_size == qemu_img_info(path)["virtual-size"] == 5 * GIB


def test_read_image_of_a_raw_file(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    qemu_img_create("-f", "raw", str(path), "16M")
    info = qemu_img_info(path)
    facts = facts_of(path)
    assert (facts.format, facts.virtual_size, facts.allocated) == (
        info["format"], info["virtual-size"], info["actual-size"])
    assert facts.snapshots == () and facts.backing_file is None
    # qemu-img allocates the first block of a new raw file, so it "has data"
    assert facts.has_data == (facts.allocated > 0)


def test_a_sparse_raw_file_has_no_data_until_written(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(64 * MIB)
    assert read_image(path) == ImageFacts("raw", 64 * MIB, 0, False, (), None)
    qemu_io_write(path, "1M", fmt="raw")
    facts = facts_of(path)
    assert facts.has_data and facts.allocated >= 64 * 1024
    assert facts.virtual_size == 64 * MIB


def test_an_empty_file_is_raw(tmp_path: Path) -> None:
    path = tmp_path / "empty"
    path.touch()
    assert read_image(path) == ImageFacts("raw", 0, 0, False, (), None)


def test_read_image_of_a_missing_file(tmp_path: Path) -> None:
    assert read_image(tmp_path / "nope.qcow2") is None
    assert read_image(tmp_path / "no-dir" / "nope.qcow2") is None


def test_read_image_of_a_directory_is_a_permanent_error(tmp_path: Path) -> None:
    with pytest.raises(PermanentError, match=re.escape(str(tmp_path))):
        read_image(tmp_path)


def test_read_image_of_a_fifo_is_a_permanent_error_not_a_hang(tmp_path: Path) -> None:
    path = tmp_path / "pipe.qcow2"
    os.mkfifo(path)
    with pytest.raises(PermanentError, match=re.escape(f"{path} is not a regular file")):
        read_image(path)


# --- has_data ------------------------------------------------------------------------------


def test_has_data_after_a_qemu_io_write(tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    create_qcow2(path, 1)
    assert facts_of(path).has_data is False
    qemu_io_write(path, "0")
    assert facts_of(path).has_data is True


@pytest.mark.parametrize("size, offset", [("1G", "1023M"), ("10T", "10239G")])
def test_has_data_sees_a_write_at_the_end_of_a_large_l1_table(
        tmp_path: Path, size: str, offset: str) -> None:
    """10 TiB has 20480 L1 entries (160 KiB): more than one piece of the table is read."""
    path = tmp_path / "disk.qcow2"
    qemu_img_create("-f", "qcow2", str(path), size)
    assert facts_of(path).has_data is False
    qemu_io_write(path, offset)
    assert facts_of(path).has_data is True


def test_has_data_stays_after_a_snapshot(tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    create_qcow2(path, 1)
    qemu_io_write(path, "0")
    snapshot_create(path, "before")
    facts = facts_of(path)
    assert facts.has_data and facts.snapshots == ("before",)


# --- snapshots -----------------------------------------------------------------------------


def test_snapshots_in_table_order_after_create_and_delete(tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    create_qcow2(path, 1)
    assert facts_of(path).snapshots == () and snapshot_list(path) == []
    for name in ("s1", "s2", "nightly-2024-01-01", "s3"):
        snapshot_create(path, name)
    assert qemu_img_snapshot_names(path) == ["s1", "s2", "nightly-2024-01-01", "s3"]
    assert facts_of(path).snapshots == ("s1", "s2", "nightly-2024-01-01", "s3")
    assert snapshot_list(path) == ["s1", "s2", "nightly-2024-01-01", "s3"]
    snapshot_delete(path, "s2")
    snapshot_delete(path, "s1")
    assert qemu_img_snapshot_names(path) == ["nightly-2024-01-01", "s3"]
    assert facts_of(path).snapshots == ("nightly-2024-01-01", "s3")
    assert snapshot_list(path) == ["nightly-2024-01-01", "s3"]
    snapshot_delete(path, "nightly-2024-01-01")
    snapshot_delete(path, "s3")
    assert facts_of(path).snapshots == () and snapshot_list(path) == []
    assert qemu_img_snapshot_names(path) == []


def test_snapshot_names_with_spaces_long_and_non_ascii(tmp_path: Path) -> None:
    names = ["two  spaces", "x" * 200, "snäpshot", "2"]
    path = tmp_path / "disk.qcow2"
    create_qcow2(path, 1)
    for name in names:
        snapshot_create(path, name)
    assert list(facts_of(path).snapshots) == snapshot_list(path) == names
    assert [s["name"] for s in qemu_img_info(path)["snapshots"]] == names


def test_a_snapshot_named_like_an_id_is_deleted_by_name(tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    create_qcow2(path, 1)
    for name in ("first", "1", "third"):  # "first" has ID 1
        snapshot_create(path, name)
    snapshot_delete(path, "1")
    assert facts_of(path).snapshots == ("first", "third")


def test_snapshot_create_refuses_a_name_the_image_has(tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    create_qcow2(path, 1)
    snapshot_create(path, "s1")
    with pytest.raises(PermanentError, match="already has a snapshot named 's1'"):
        snapshot_create(path, "s1")
    with pytest.raises(PermanentError, match="needs a name"):
        snapshot_create(path, "")
    assert qemu_img_snapshot_names(path) == ["s1"]


def test_snapshot_delete_of_a_missing_name(tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    create_qcow2(path, 1)
    with pytest.raises(PermanentError, match="snapshot not found") as caught:
        snapshot_delete(path, "nope")
    assert not isinstance(caught.value, TransientError)


def test_snapshots_of_a_raw_file_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    qemu_img_create("-f", "raw", str(path), "16M")
    with pytest.raises(PermanentError):
        snapshot_create(path, "s1")
    assert snapshot_list(path) == []


def test_snapshot_list_of_an_overlay_whose_backing_is_gone(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    create_qcow2(base, 1)
    overlay = tmp_path / "root.qcow2"
    create_overlay(overlay, base, "qcow2", 1)
    base.unlink()
    assert snapshot_list(overlay) == []  # `qemu-img snapshot -l` fails here: it opens the backing
    assert facts_of(overlay).backing_file == str(base)


# --- create_qcow2 --------------------------------------------------------------------------


def test_create_qcow2_makes_an_empty_image(tmp_path: Path) -> None:
    path = tmp_path / "vol.qcow2"
    create_qcow2(path, 20)
    info = qemu_img_info(path)
    assert (info["format"], info["virtual-size"]) == ("qcow2", 20 * GIB)
    assert "backing-filename" not in info
    assert read_image(path) == ImageFacts("qcow2", 20 * GIB, info["actual-size"], False, (), None)
    assert image_info(path) == ("qcow2", 20 * GIB)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vol.qcow2"]  # no .tmp- left


def test_create_qcow2_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "vol.qcow2"
    create_qcow2(path, 1)
    qemu_io_write(path, "0")
    before = path.read_bytes()
    with pytest.raises(PermanentError, match="already exists"):
        create_qcow2(path, 2)
    assert path.read_bytes() == before
    other = tmp_path / "notes.txt"
    other.write_text("not an image")
    with pytest.raises(PermanentError, match="already exists"):
        create_qcow2(other, 1)
    assert other.read_text() == "not an image"
    dangling = tmp_path / "link.qcow2"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(PermanentError, match="already exists"):
        create_qcow2(dangling, 1)
    assert not (tmp_path / "nowhere").exists()
    assert not list(tmp_path.glob(".tmp-*"))


def test_create_qcow2_replaces_a_stale_temporary(tmp_path: Path) -> None:
    (tmp_path / ".tmp-vol.qcow2").write_bytes(b"half a file from a killed run")
    create_qcow2(tmp_path / "vol.qcow2", 1)
    assert facts_of(tmp_path / "vol.qcow2").virtual_size == GIB
    assert not list(tmp_path.glob(".tmp-*"))


def test_a_failed_create_qcow2_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "vol.qcow2"
    with pytest.raises(PermanentError, match="qemu-img create"):
        create_qcow2(path, 4_000_000)  # beyond what qcow2 with 64 KiB clusters addresses
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(PermanentError):
        create_qcow2(tmp_path / "no-dir" / "vol.qcow2", 1)


@pytest.mark.parametrize("size", [0, -1, True, 1.5, "1"])
def test_create_qcow2_refuses_a_size_that_is_not_whole_gib(tmp_path: Path, size: object) -> None:
    with pytest.raises(PermanentError, match="whole number of GiB"):
        create_qcow2(tmp_path / "vol.qcow2", size)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


# --- an image held by another process ------------------------------------------------------


def test_changes_to_an_image_held_by_qemu_io_raise_image_locked(tmp_path: Path) -> None:
    path = tmp_path / "vol.qcow2"
    create_qcow2(path, 1)
    snapshot_create(path, "old")
    with held_by_qemu_io(path):
        for change in (lambda: snapshot_create(path, "new"), lambda: snapshot_delete(path, "old"),
                       lambda: resize(path, 2), lambda: snapshot_list(path)):
            with pytest.raises(ImageLocked) as caught:
                change()
            message = str(caught.value)
            assert str(path) in message and "another process" in message
            assert "running guest" in message
            assert isinstance(caught.value, TransientError)
        # the header read needs no lock: it works while the guest runs
        facts = facts_of(path)
        assert facts.snapshots == ("old",) and facts.virtual_size == GIB
        assert is_locked(path, locked_files())
    assert not is_locked(path, locked_files())
    snapshot_create(path, "new")
    resize(path, 2)
    assert read_image(path) == ImageFacts("qcow2", 2 * GIB, os.stat(path).st_blocks * 512, False,
                                          ("old", "new"), None)


def test_an_image_held_read_only_takes_overlays_but_no_changes(tmp_path: Path) -> None:
    """A running guest opens its overlay's backing image read-only: another overlay on it
    can be made, but the image cannot be changed, and it shows as locked."""
    base = tmp_path / "base.qcow2"
    create_qcow2(base, 1)
    with held_by_qemu_io(base, read_only=True):
        create_overlay(tmp_path / "root.qcow2", base, "qcow2", 2)
        with pytest.raises(ImageLocked, match=re.escape(str(base))):
            snapshot_create(base, "s1")
        assert is_locked(base, locked_files())
    assert facts_of(tmp_path / "root.qcow2").backing_file == str(base)


# --- /proc/locks ---------------------------------------------------------------------------


def test_locked_files_sees_qemu_ios_ofd_locks(tmp_path: Path) -> None:
    path = tmp_path / "vol.qcow2"
    create_qcow2(path, 1)
    other = tmp_path / "other.qcow2"
    create_qcow2(other, 1)
    st = os.stat(path)
    key = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    assert key not in locked_files()
    with held_by_qemu_io(path) as proc:
        lines = [line for line in Path("/proc/locks").read_text().splitlines()
                 if f":{st.st_ino} " in line]
        assert lines and all(line.split()[1] == "OFDLCK" for line in lines), lines
        assert key in locked_files()
        assert is_locked(path, locked_files())
        assert not is_locked(other, locked_files())
        assert proc.poll() is None
    assert key not in locked_files()


def test_locked_files_sees_posix_flock_and_ofd_locks(tmp_path: Path) -> None:
    files = {kind: tmp_path / kind for kind in ("posix", "flock", "ofd")}
    for path in files.values():
        path.write_bytes(b"x" * 4096)
    with open(files["posix"], "r+b") as posix, open(files["flock"], "r+b") as flock, \
            open(files["ofd"], "r+b") as ofd:
        fcntl.lockf(posix, fcntl.LOCK_EX | fcntl.LOCK_NB, 100, 10)
        fcntl.flock(flock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        if hasattr(fcntl, "F_OFD_SETLK"):
            # struct flock: l_type, l_whence, l_start, l_len, l_pid (0 for OFD locks)
            fcntl.fcntl(ofd, fcntl.F_OFD_SETLK,
                        struct.pack("hhqqi4x", fcntl.F_RDLCK, os.SEEK_SET, 100, 1, 0))
        locks = locked_files()
        assert is_locked(files["posix"], locks)
        assert is_locked(files["flock"], locks)
        assert is_locked(files["ofd"], locks) == hasattr(fcntl, "F_OFD_SETLK")
        fcntl.lockf(posix, fcntl.LOCK_UN, 100, 10)
        assert not is_locked(files["posix"], locked_files())
        assert is_locked(files["flock"], locked_files())
    locks = locked_files()
    assert not any(is_locked(path, locks) for path in files.values())
    assert not is_locked(tmp_path / "missing", locks)


def test_locked_files_parses_the_kernel_format(tmp_path: Path) -> None:
    """The lines of fs/locks.c lock_get_status: device MAJOR:MINOR in hex, inode in decimal."""
    (tmp_path / "locks").write_text(
        "1: POSIX  ADVISORY  WRITE 25771 fe:00:2146315 0 EOF\n"
        "1: -> POSIX  ADVISORY  WRITE 25780 fe:00:2146315 0 EOF\n"
        "2: OFDLCK ADVISORY  READ -1 103:1a:12 100 101\n"
        "3: FLOCK  ADVISORY  WRITE 812 00:19:77 0 EOF\n"
        "4: LEASE  ACTIVE    READ 900 08:01:555 0 EOF\n"
        "5: DELEG  ACTIVE    READ 901 08:01:556 0 EOF\n"
        "6: POSIX  *NOINODE* WRITE 902 <none>:0 0 EOF\n"
        "7: -> OFDLCK ADVISORY  WRITE -1 08:01:999 0 EOF\n"
        "8: POSIX  ADVISORY  READ 903 08:01:-2 0 EOF\n"
        "garbage\n\n"
    )
    assert locked_files(tmp_path) == frozenset({
        (254, 0, 2146315), (0x103, 0x1a, 12), (0, 0x19, 77), (8, 1, 2**64 - 2)})


def test_locked_files_without_proc_locks(tmp_path: Path) -> None:
    assert locked_files(tmp_path) == frozenset()


def test_locked_files_reads_this_machines_proc_locks() -> None:
    locks = locked_files()
    assert all(isinstance(n, int) and n >= 0 for key in locks for n in key)


# --- damaged files -------------------------------------------------------------------------


def patched(tmp_path: Path, source: Path, offset: int, fmt: str, value: int) -> Path:
    data = bytearray(source.read_bytes())
    struct.pack_into(fmt, data, offset, value)
    path = tmp_path / "patched.qcow2"
    path.write_bytes(bytes(data))
    return path


@pytest.fixture
def real_image(tmp_path: Path) -> Path:
    """A qcow2 with a backing file name, data and two snapshots."""
    base = tmp_path / "base.qcow2"
    create_qcow2(base, 1)
    path = tmp_path / "real.qcow2"
    create_overlay(path, base, "qcow2", 1)
    qemu_io_write(path, "0")
    snapshot_create(path, "s1")
    snapshot_create(path, "second snapshot")
    return path


@pytest.mark.parametrize("length", [4, 20, 32, 71])
def test_a_truncated_header(tmp_path: Path, real_image: Path, length: int) -> None:
    path = tmp_path / "short.qcow2"
    path.write_bytes(real_image.read_bytes()[:length])
    with pytest.raises(PermanentError, match=invalid(path) + "the header is truncated"):
        read_image(path)


def test_a_file_cut_after_its_first_cluster(tmp_path: Path, real_image: Path) -> None:
    path = tmp_path / "cut.qcow2"
    path.write_bytes(real_image.read_bytes()[:65536])
    with pytest.raises(PermanentError, match=invalid(path) + ".*beyond the end of the file"):
        read_image(path)


def test_garbage_after_the_magic(tmp_path: Path) -> None:
    path = tmp_path / "garbage.qcow2"
    path.write_bytes(QCOW2_MAGIC + bytes(range(256)) * 64)
    with pytest.raises(PermanentError, match=invalid(path) + "unknown version"):
        read_image(path)


@pytest.mark.parametrize("offset, fmt, value, message", [
    (4, ">I", 1, "unknown version 1"),
    (20, ">I", 40, "cluster_bits 40"),
    (16, ">I", 5000, "backing file name is 5000 bytes"),
    (8, ">Q", 2**62, "backing file name .* beyond the end"),
    (60, ">I", 0xFFFFFFFF, "4294967295 snapshots"),
    (60, ">I", 60000, r"snapshot table entry \d+ .* beyond the end"),
    (64, ">Q", 2**40, "snapshot table entry 0 .* beyond the end"),
    (64, ">Q", 65536 + 8, "snapshot table offset .* not cluster aligned"),
    (36, ">I", 0xFFFFFFFF, "the L1 table has 4294967295 entries"),
    (36, ">I", 4 * 1024**2, "L1 table .* beyond the end"),
    (40, ">Q", 2**50, "L1 table .* beyond the end"),
    (40, ">Q", 65536 + 512, "L1 table offset .* not cluster aligned"),
])
def test_absurd_header_fields(tmp_path: Path, real_image: Path, offset: int, fmt: str,
                              value: int, message: str) -> None:
    path = patched(tmp_path, real_image, offset, fmt, value)
    with pytest.raises(PermanentError, match=invalid(path) + ".*" + message):
        read_image(path)


def test_absurd_snapshot_extra_data(tmp_path: Path, real_image: Path) -> None:
    (snapshots_offset,) = struct.unpack(">Q", real_image.read_bytes()[64:72])
    path = patched(tmp_path, real_image, snapshots_offset + 36, ">I", 0xFFFFFFFF)
    with pytest.raises(PermanentError, match="entry 0 has 4294967295 bytes of extra data"):
        read_image(path)


def test_the_real_image_itself_reads(real_image: Path) -> None:
    facts = facts_of(real_image)
    assert facts.snapshots == ("s1", "second snapshot") and facts.has_data
    assert facts.backing_file == str(real_image.parent / "base.qcow2")


def test_every_truncation_and_byte_flip_is_facts_or_a_permanent_error(
        tmp_path: Path, real_image: Path) -> None:
    """Never another exception, whatever the damage."""
    data = real_image.read_bytes()
    path = tmp_path / "damaged.qcow2"
    rng = random.Random(1234)
    lengths = list(range(0, 80)) + [rng.randrange(80, len(data)) for _ in range(100)]
    for length in lengths:
        path.write_bytes(data[:length])
        with contextlib.suppress(PermanentError):
            read_image(path)
    for _ in range(300):
        damaged = bytearray(data[:65536 * 8])
        for _ in range(rng.randrange(1, 4)):
            damaged[rng.randrange(4, 104)] = rng.randrange(256)
        path.write_bytes(bytes(damaged))
        with contextlib.suppress(PermanentError):
            read_image(path)
