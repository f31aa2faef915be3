"""Disk files: qcow2 overlays through `qemu-img` (argument lists), and header reads.

Reading a qcow2 header is 72 bytes and no process, so `observe` learns every root
disk's virtual size and backing file without running `qemu-img info` per instance.
"""

from __future__ import annotations

import json
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

from reconciler.errors import PermanentError, TransientError

GIB = 1024**3
QCOW2_MAGIC = b"QFI\xfb"


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


def qemu_img(*args: str, timeout: float = 300) -> str:
    """Run qemu-img with an argument list; errors become ours."""
    try:
        proc = subprocess.run(
            ["qemu-img", *args], capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError:
        raise PermanentError("qemu-img is not installed (apt-get install qemu-utils)") from None
    except subprocess.TimeoutExpired:
        raise TransientError(f"qemu-img {args[0]} timed out after {timeout:.0f} s") from None
    if proc.returncode != 0:
        message = (proc.stderr or proc.stdout).strip().splitlines()
        text = message[-1] if message else f"exit status {proc.returncode}"
        if "lock" in text.lower():
            raise TransientError(f"qemu-img {args[0]}: {text}")
        raise PermanentError(f"qemu-img {args[0]}: {text}")
    return proc.stdout


def create_overlay(path: Path, backing: Path, backing_format: str, size_gib: int) -> None:
    """A qcow2 overlay on `backing`, `size_gib` big (never smaller than the backing)."""
    tmp = path.with_name(".tmp-" + path.name)
    tmp.unlink(missing_ok=True)
    qemu_img("create", "-q", "-f", "qcow2", "-F", backing_format, "-b", str(backing),
             str(tmp), f"{size_gib}G")
    tmp.replace(path)


def resize(path: Path, size_gib: int) -> None:
    qemu_img("resize", "-q", str(path), f"{size_gib}G")


def image_info(path: Path) -> tuple[str, int]:
    """(format, virtual size in bytes) of an image file, as qemu-img sees it."""
    info = json.loads(qemu_img("info", "--output=json", str(path)))
    return str(info.get("format", "raw")), int(info.get("virtual-size", 0))
