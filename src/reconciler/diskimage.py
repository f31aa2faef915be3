"""Disk image files (qcow2 and raw): facts from their headers, changes through `qemu-img`.

Shared by the libvirt driver (root disks: qcow2 overlays on registered images) and the
storage driver (qcow2 volume files). It imports only the standard library and
`reconciler.errors`.

Why header reads instead of `qemu-img info` per file: `observe` looks at every disk
file on the host (hundreds), and one `qemu-img info` is a process start of tens of
milliseconds. `read_image` opens the file once and reads a few small pieces laid down
by the qcow2 spec (docs/interop/qcow2.txt in QEMU): the 72-byte header, the backing
file name, the snapshot table and the active L1 table. That is microseconds per file
and needs no lock, so it also works while a guest has the image open. Every change
(create, resize, snapshots) goes through `qemu-img` with an argument list, which takes
QEMU's image locks and so refuses to touch an image a running guest holds
(`ImageLocked`).

Whether a guest holds an image is also answerable without a process: QEMU takes OFD
byte-range locks on its image files, listed in /proc/locks (`locked_files`,
`is_locked`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from reconciler.errors import PermanentError, TransientError

GIB = 1024**3
QCOW2_MAGIC = b"QFI\xfb"

# Limits of QEMU's qcow2 driver (block/qcow2.h): a file beyond them is refused by QEMU
# too, and they bound what a garbage file with the qcow2 magic can make us read.
QCOW2_MIN_CLUSTER_BITS = 9
QCOW2_MAX_CLUSTER_BITS = 21
QCOW2_MAX_L1_ENTRIES = 32 * 1024**2 // 8  # QCOW_MAX_L1_SIZE: 32 MiB of 8-byte entries
QCOW2_MAX_SNAPSHOTS = 65536  # QCOW_MAX_SNAPSHOTS
QCOW2_MAX_SNAPSHOTS_BYTES = 64 * 1024**2  # QCOW_MAX_SNAPSHOTS_SIZE
QCOW2_MAX_SNAPSHOT_EXTRA = 1024  # QCOW_MAX_SNAPSHOT_EXTRA_DATA
QCOW2_MAX_BACKING_NAME = 1023  # QEMU: "Backing file name too long"

_HEADER = struct.Struct(">4sIQIIQIIQQIIQ")  # the 72 bytes of a version 2 header
_SNAPSHOT_ENTRY = struct.Struct(">QIHHIIQII")  # the fixed 40 bytes of a snapshot entry
_L1_CHUNK = 64 * 1024  # read the L1 table in pieces; stop at the first used entry

# qemu-img's words when another process holds the image (block/file-posix.c):
# 'Failed to get "write" lock', 'Failed to get shared "write" lock',
# 'Failed to lock byte 100', then 'Is another process using the image [FILE]?'.
_LOCK_MESSAGE = re.compile(
    r'Failed to get (shared )?"[^"]*" lock|Failed to lock byte|Is another process using the image'
)


class ImageLocked(TransientError):
    """Another process (typically a running guest) holds the image: retry when it is gone."""


# ---------------------------------------------------------------------------------------
# Header reads (no process)


@dataclass(frozen=True, slots=True)
class Qcow2Header:
    virtual_size: int
    backing_file: str | None


def read_qcow2_header(path: Path) -> Qcow2Header | None:
    """The virtual size and backing file of a qcow2 file; None when it is not qcow2."""
    try:
        with open(path, "rb") as f:
            head = f.read(72)
            if len(head) < 32 or head[:4] != QCOW2_MAGIC:
                return None
            backing_offset, backing_size = struct.unpack(">QI", head[8:20])
            (size,) = struct.unpack(">Q", head[24:32])
            backing = None
            if backing_offset and 0 < backing_size <= 4096:
                f.seek(backing_offset)
                backing = f.read(backing_size).decode("utf-8", "replace")
    except FileNotFoundError:
        return None
    return Qcow2Header(size, backing)


@dataclass(frozen=True, slots=True)
class ImageFacts:
    """What `read_image` learns about an image file.

    `allocated` is the space the file takes on its filesystem (st_blocks * 512).
    `has_data`: for qcow2, some entry of the active L1 table is set, i.e. an L2 table
    (so some guest cluster) was ever allocated; it stays True after the guest discards
    or zeroes its data, and `preallocation=metadata` sets it at creation. For raw, any
    allocated block counts (note `qemu-img create -f raw` allocates the first 4 KiB).
    """

    format: str  # "qcow2" or "raw"
    virtual_size: int  # bytes the guest sees
    allocated: int  # bytes the file takes on disk
    has_data: bool
    snapshots: tuple[str, ...]  # qcow2 internal snapshot names, in table order
    backing_file: str | None  # as written in the header (may be relative)


def read_image(path: Path) -> ImageFacts | None:
    """The facts of an image file from its header; None when the file does not exist.

    A file that does not start with the qcow2 magic is raw. A qcow2 file that is
    truncated or inconsistent raises PermanentError naming the file and the problem
    (reporting partial facts would hide the damage from whoever must repair it), as does
    a file that cannot be read (e.g. no permission) or is not a regular file.
    """
    try:
        # O_NONBLOCK: a FIFO in the way must not hang observe (no effect on regular files)
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise PermanentError(f"{path} is not a regular file")
            allocated = st.st_blocks * 512
            head = f.read(_HEADER.size)
            if head[:4] != QCOW2_MAGIC:
                return ImageFacts("raw", st.st_size, allocated, allocated > 0, (), None)
            return _read_qcow2(f, path, head, st.st_size, allocated)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise PermanentError(f"{path}: cannot read the image: {e.strerror or e}") from None


def _read_qcow2(f: BinaryIO, path: Path, head: bytes, file_size: int, allocated: int) -> ImageFacts:
    def corrupt(what: str) -> PermanentError:
        return PermanentError(f"{path}: not a valid qcow2 image: {what}")

    def within_file(offset: int, length: int, what: str) -> None:
        if offset + length > file_size:
            raise corrupt(f"the {what} ({length} bytes at offset {offset}) lies beyond "
                          f"the end of the file ({file_size} bytes): truncated?")

    def read_at(offset: int, length: int, what: str) -> bytes:
        within_file(offset, length, what)
        f.seek(offset)
        data = f.read(length)
        if len(data) != length:
            raise corrupt(f"the file ends inside the {what} (offset {offset}): truncated?")
        return data

    if len(head) < _HEADER.size:
        raise corrupt(f"the header is truncated ({len(head)} of {_HEADER.size} bytes)")
    (_magic, version, backing_offset, backing_size, cluster_bits, size, _crypt, l1_size,
     l1_offset, _refcount_offset, _refcount_clusters, nb_snapshots,
     snapshots_offset) = _HEADER.unpack(head)
    if version not in (2, 3):
        raise corrupt(f"unknown version {version} (QEMU knows 2 and 3)")
    if not QCOW2_MIN_CLUSTER_BITS <= cluster_bits <= QCOW2_MAX_CLUSTER_BITS:
        raise corrupt(f"cluster_bits {cluster_bits} is outside "
                      f"{QCOW2_MIN_CLUSTER_BITS}..{QCOW2_MAX_CLUSTER_BITS}")
    cluster_size = 1 << cluster_bits

    backing = None
    if backing_offset and backing_size:
        if backing_size > QCOW2_MAX_BACKING_NAME:
            raise corrupt(f"the backing file name is {backing_size} bytes long "
                          f"(at most {QCOW2_MAX_BACKING_NAME})")
        backing = os.fsdecode(read_at(backing_offset, backing_size, "backing file name"))

    snapshots: list[str] = []
    if nb_snapshots:
        if nb_snapshots > QCOW2_MAX_SNAPSHOTS:
            raise corrupt(f"{nb_snapshots} snapshots (at most {QCOW2_MAX_SNAPSHOTS})")
        if snapshots_offset % cluster_size:
            raise corrupt(f"the snapshot table offset {snapshots_offset} is not cluster aligned")
        offset = snapshots_offset
        for i in range(nb_snapshots):
            entry = _SNAPSHOT_ENTRY.unpack(read_at(offset, _SNAPSHOT_ENTRY.size,
                                                   f"snapshot table entry {i}"))
            id_size, name_size, extra_size = entry[2], entry[3], entry[8]
            if extra_size > QCOW2_MAX_SNAPSHOT_EXTRA:
                raise corrupt(f"snapshot table entry {i} has {extra_size} bytes of extra data "
                              f"(at most {QCOW2_MAX_SNAPSHOT_EXTRA})")
            name_offset = offset + _SNAPSHOT_ENTRY.size + extra_size + id_size
            name = read_at(name_offset, name_size, f"name of snapshot table entry {i}")
            snapshots.append(name.decode("utf-8", "replace"))
            end = name_offset + name_size
            offset = end + (-end % 8)
            if offset - snapshots_offset > QCOW2_MAX_SNAPSHOTS_BYTES:
                raise corrupt(f"the snapshot table is larger than "
                              f"{QCOW2_MAX_SNAPSHOTS_BYTES} bytes")

    has_data = False
    if l1_size:
        if l1_size > QCOW2_MAX_L1_ENTRIES:
            raise corrupt(f"the L1 table has {l1_size} entries (at most {QCOW2_MAX_L1_ENTRIES})")
        if l1_offset % cluster_size:
            raise corrupt(f"the L1 table offset {l1_offset} is not cluster aligned")
        remaining = l1_size * 8
        within_file(l1_offset, remaining, "L1 table")
        offset = l1_offset
        while remaining and not has_data:
            chunk = read_at(offset, min(remaining, _L1_CHUNK), "L1 table")
            has_data = chunk.count(0) != len(chunk)
            offset += len(chunk)
            remaining -= len(chunk)

    return ImageFacts("qcow2", size, allocated, has_data, tuple(snapshots), backing)


# ---------------------------------------------------------------------------------------
# Changes through qemu-img


def dying_with_us(argv: list[str]) -> list[str]:
    """`argv` run so that it is killed when we die (util-linux `setpriv --pdeathsig`):
    a qemu-img left running by a killed reconciler would go on writing a file that the
    next run has cleaned up already. Unchanged where there is no setpriv."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", "--", *argv] if setpriv else argv


def qemu_img(*args: str, timeout: float = 300, image: Path | None = None) -> str:
    """Run qemu-img with an argument list; errors become ours.

    `image` names the file in the ImageLocked message (else the name qemu-img prints).
    """
    program = shutil.which("qemu-img")
    if program is None:
        raise PermanentError("qemu-img is not installed (apt-get install qemu-utils)")
    try:
        proc = subprocess.run(
            dying_with_us([program, *args]), capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError:
        raise PermanentError("qemu-img is not installed (apt-get install qemu-utils)") from None
    except subprocess.TimeoutExpired:
        raise TransientError(f"qemu-img {args[0]} timed out after {timeout:.0f} s") from None
    if proc.returncode != 0:
        output = (proc.stderr or proc.stdout).strip()
        lock = _LOCK_MESSAGE.search(output)
        if lock:
            named = re.search(r"using the image \[(.*)\]\?", output)
            name = str(image) if image is not None else named.group(1) if named else "the image"
            detail = next(line for line in output.splitlines() if lock.group(0) in line)
            raise ImageLocked(
                f"{name} is in use: another process (typically a running guest) holds it, "
                f"so qemu-img {args[0]} cannot open it ({detail.removeprefix('qemu-img: ')})"
            )
        message = output.splitlines()
        text = message[-1] if message else f"exit status {proc.returncode}"
        raise PermanentError(f"qemu-img {args[0]}: {text}")
    return proc.stdout


def create_overlay(path: Path, backing: Path, backing_format: str, size_gib: int) -> None:
    """A qcow2 overlay on `backing`, `size_gib` big (never smaller than the backing)."""
    tmp = path.with_name(".tmp-" + path.name)
    tmp.unlink(missing_ok=True)
    qemu_img("create", "-q", "-f", "qcow2", "-F", backing_format, "-b", str(backing),
             str(tmp), f"{size_gib}G")
    tmp.replace(path)


def create_qcow2(path: Path, size_gib: int) -> None:
    """A new empty qcow2 file of `size_gib` GiB with no backing file.

    Made as `.tmp-NAME` next to `path`, then linked into place: `path` appears whole or
    not at all, and an existing `path` is never overwritten (PermanentError).
    """
    if isinstance(size_gib, bool) or not isinstance(size_gib, int) or size_gib < 1:
        raise PermanentError(
            f"{path}: the size must be a whole number of GiB >= 1, not {size_gib!r}")
    if os.path.lexists(path):
        raise PermanentError(f"{path} already exists: a new volume never overwrites a file")
    tmp = path.with_name(".tmp-" + path.name)
    tmp.unlink(missing_ok=True)
    try:
        qemu_img("create", "-q", "-f", "qcow2", str(tmp), f"{size_gib}G", image=path)
        try:
            os.link(tmp, path)  # fails when `path` exists, unlike a rename
        except FileExistsError:
            raise PermanentError(
                f"{path} already exists: a new volume never overwrites a file") from None
    finally:
        tmp.unlink(missing_ok=True)


def resize(path: Path, size_gib: int) -> None:
    qemu_img("resize", "-q", str(path), f"{size_gib}G", image=path)


def image_info(path: Path) -> tuple[str, int]:
    """(format, virtual size in bytes) of an image file, as qemu-img sees it."""
    info = json.loads(qemu_img("info", "--output=json", str(path), image=path))
    return str(info.get("format", "raw")), int(info.get("virtual-size", 0))


def snapshot_create(path: Path, name: str) -> None:
    """An internal snapshot `name` of the qcow2 image (`qemu-img snapshot -c`).

    Refuses a name the image already has: qemu-img would add a second snapshot with the
    same name, and `snapshot -d` deletes only the first of them.
    """
    if not name:
        raise PermanentError(f"{path}: a snapshot needs a name")
    facts = read_image(path)
    if facts is not None and name in facts.snapshots:
        raise PermanentError(f"{path} already has a snapshot named {name!r}")
    qemu_img("snapshot", "-q", "-c", name, str(path), image=path)


def snapshot_delete(path: Path, name: str) -> None:
    """Delete the internal snapshot `name` (`qemu-img snapshot -d`; by name, not by ID)."""
    qemu_img("snapshot", "-q", "-d", name, str(path), image=path)


def snapshot_list(path: Path) -> list[str]:
    """The internal snapshot names of the image, in table order, as qemu-img sees them.

    `qemu-img snapshot -l` prints a table whose TAG column cannot be split reliably
    (names may hold spaces; long ones shift the columns), so the names come from the
    same program's `info --output=json`, which lists the same snapshots exactly.
    """
    info = json.loads(qemu_img("info", "--output=json", str(path), image=path))
    return [str(s["name"]) for s in info.get("snapshots", [])]


# ---------------------------------------------------------------------------------------
# Who holds an image: /proc/locks


def locked_files(proc: Path = Path("/proc")) -> frozenset[tuple[int, int, int]]:
    """(major, minor, inode) of every file with a POSIX, FLOCK or OFD lock held on it.

    /proc/locks lines (fs/locks.c, lock_get_status) look like::

        1: OFDLCK ADVISORY  READ -1 fe:00:2179520 100 101
        2: POSIX  ADVISORY  WRITE 25771 fe:00:2146315 0 EOF
        3: -> POSIX  ADVISORY  WRITE 25780 fe:00:2146315 0 EOF

    The device is `MAJOR:MINOR` of the file's superblock in hex, the inode in decimal.
    Lines with `->` are processes waiting for a lock (their holder has its own line);
    leases are not locks and are skipped. QEMU holds OFD locks on its open images.
    """
    try:
        text = (proc / "locks").read_text()
    except FileNotFoundError:
        return frozenset()
    found = set()
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 6 or fields[1] == "->" or fields[1] not in ("POSIX", "FLOCK", "OFDLCK"):
            continue
        parts = fields[5].split(":")
        if len(parts) != 3:
            continue  # "<none>:0": a lock on no inode
        try:
            major, minor, inode = int(parts[0], 16), int(parts[1], 16), int(parts[2])
        except ValueError:
            continue
        found.add((major, minor, inode % 2**64))  # kernels before 5.5 printed it signed
    return frozenset(found)


def is_locked(path: Path, locks: frozenset[tuple[int, int, int]]) -> bool:
    """Whether some process holds a lock on `path` (False when it does not exist).

    Compares the file's st_dev and st_ino with `locks` from `locked_files`. Where stat
    reports another device than the superblock's (btrfs subvolumes, overlayfs) this
    finds nothing; images live on plain ext4/xfs directories here.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    return (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino) in locks
