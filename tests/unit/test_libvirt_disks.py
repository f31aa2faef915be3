"""read_qcow2_header on real qcow2 files made by qemu-img, and on what is not qcow2.

qemu-img (qemu-utils) is a dependency of the libvirt driver: these tests need it."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest

from reconciler.drivers.libvirt._disks import GIB, QCOW2_MAGIC, Qcow2Header, read_qcow2_header

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
