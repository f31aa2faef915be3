"""The file backend: one qcow2 file per volume in a pool directory, with a sidecar.

``POOL/NAME.qcow2`` is the volume, ``POOL/NAME.json`` (0600) its ownership payload. A
qcow2 file without a sidecar (or with one that is not ours) is someone else's: reported,
never touched. Observe is one directory scan, one read of ``/proc/locks`` (which files a
running guest holds) and, per volume, one small read of its qcow2 header (size,
snapshots, whether data was ever written): no process per volume.

Crash safety: the sidecar is written (atomically) before the image is created, so a
killed apply leaves either nothing, or a sidecar whose image is missing (reported as
drift and created by the next apply). Snapshot names are written to the sidecar before
they are taken.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

from reconciler import diskimage, faults
from reconciler.drivers.storage._common import GIB, Capacity, Found, dumps
from reconciler.units import human
from reconciler.errors import Conflict, NotFound, PermanentError, TransientError
from reconciler.fileio import write_atomic

SUFFIX = ".qcow2"
SIDECAR = ".json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$")


class FileBackend:
    driver = "file"

    def __init__(self, name: str, path: Path, home: str, overcommit: float = 1.0):
        self.name = name
        self.path = Path(path)
        self.home = home
        self.overcommit = overcommit

    # --- reading -------------------------------------------------------------------------

    def scan(self) -> list[Found]:
        try:
            entries = {e.name: e for e in os.scandir(self.path)}
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise TransientError(f"volume backend {self.name}: cannot list {self.path}: {exc.strerror}") from None
        locks = diskimage.locked_files()
        found = []
        for fname in sorted(entries):
            if fname.startswith("."):
                continue  # temporary files of a write
            if fname.endswith(SUFFIX):
                stem = fname[: -len(SUFFIX)]
                found.append(self._found(stem, entries.get(stem + SIDECAR) is not None, locks))
            elif fname.endswith(SIDECAR) and (fname[: -len(SIDECAR)] + SUFFIX) not in entries:
                stem = fname[: -len(SIDECAR)]
                data = self._sidecar(stem)
                if data is not None:  # ours, but its image is gone (a killed create, or deleted by hand)
                    found.append(Found(stem, int(data.get("sizeGiB", 0)) * GIB, data,
                                       drift=(f"its image file {self.path / (stem + SUFFIX)} is missing",)))
        return found

    def find(self, stem: str) -> Found | None:
        image = self.path / (stem + SUFFIX)
        sidecar = self.path / (stem + SIDECAR)
        if not image.exists():
            data = self._sidecar(stem) if sidecar.exists() else None
            if data is None:
                return None
            return Found(stem, int(data.get("sizeGiB", 0)) * GIB, data,
                         drift=(f"its image file {image} is missing",))
        return self._found(stem, sidecar.exists(), diskimage.locked_files())

    def _found(self, stem: str, has_sidecar: bool, locks: frozenset[tuple[int, int, int]]) -> Found:
        image = self.path / (stem + SUFFIX)
        try:
            facts = diskimage.read_image(image)
        except PermanentError as exc:
            return Found(stem, 0, None, f"unreadable image: {exc}")
        if facts is None:
            return Found(stem, 0, None, "vanished while listing")
        data = self._sidecar(stem) if has_sidecar else None
        if data is None:
            why = "no sidecar with an ownership mark" if not has_sidecar else "its sidecar is not ours"
            return Found(stem, facts.virtual_size, None, f"{image}: {why}")
        in_use = diskimage.is_locked(image, locks)
        owned = set(data.get("snapshots") or ())
        return Found(
            name=stem, size=facts.virtual_size, payload=data, path=str(image), format=facts.format,
            data=f"{human(facts.allocated)} written" if facts.has_data else "empty", allocated=facts.allocated,
            in_use=in_use, snapshots=tuple(s for s in facts.snapshots if s in owned),
            extra={"allocated": human(facts.allocated)},
        )

    def _sidecar(self, stem: str) -> dict[str, Any] | None:
        """The payload, when it is ours (this installation's); None otherwise."""
        try:
            data = json.loads((self.path / (stem + SIDECAR)).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or not isinstance(data.get("mark"), dict) or data.get("home") != self.home:
            return None
        return data

    # --- acting --------------------------------------------------------------------------

    def create(self, stem: str, size_gib: int, data: Mapping[str, Any]) -> Found:
        _check(stem)
        image = self.path / (stem + SUFFIX)
        sidecar = self.path / (stem + SIDECAR)
        self.path.mkdir(parents=True, exist_ok=True)
        if image.exists():
            if self._sidecar(stem) is None:
                raise Conflict(f"{image} exists and is not ours; not touching it")
        elif sidecar.exists() and self._sidecar(stem) is None:
            raise Conflict(f"{sidecar} exists and is not ours; not touching it")
        self._write(stem, {**data, "sizeGiB": size_gib})
        faults.point("storage.file-sidecar-written")
        if not image.exists():
            diskimage.create_qcow2(image, size_gib)
        found = self.find(stem)
        assert found is not None
        return found

    def write(self, found: Found, data: Mapping[str, Any]) -> None:
        self._write(found.name, data)

    def _write(self, stem: str, data: Mapping[str, Any]) -> None:
        _check(stem)
        write_atomic(self.path / (stem + SIDECAR), dumps(data), one_temporary=True)  # see delete

    def activate(self, found: Found) -> None:
        """Files need no activation."""

    def grow(self, found: Found, size_gib: int) -> None:
        """Grow the file, unless a running guest holds it: then its hypervisor grows it
        (the instance's blockResize), which is the only safe way while it is open."""
        image = self.path / (found.name + SUFFIX)
        if not image.exists():
            diskimage.create_qcow2(image, size_gib)
            return
        if diskimage.is_locked(image, diskimage.locked_files()):
            return
        facts = diskimage.read_image(image)
        if facts is not None and facts.virtual_size < size_gib * GIB:
            diskimage.resize(image, size_gib)

    def snapshot(self, found: Found, name: str) -> None:
        image = self.path / (found.name + SUFFIX)
        if name in diskimage.snapshot_list(image):
            raise Conflict(f"{image} already has a snapshot {name!r} that is not ours; not touching it")
        diskimage.snapshot_create(image, name)

    def unsnapshot(self, found: Found, name: str) -> None:
        image = self.path / (found.name + SUFFIX)
        if name in diskimage.snapshot_list(image):
            diskimage.snapshot_delete(image, name)

    def delete(self, found: Found, wipe: bool) -> None:
        image = self.path / (found.name + SUFFIX)
        if image.exists():
            if diskimage.is_locked(image, diskimage.locked_files()):
                raise TransientError(f"{image} is in use (a running guest holds it): detach it first")
            if wipe:
                _zero(image)
            image.unlink()
        # what a create killed inside qemu-img, or a sidecar write killed, left
        image.with_name(".tmp-" + image.name).unlink(missing_ok=True)
        sidecar = self.path / (found.name + SIDECAR)
        sidecar.with_name(".tmp-" + sidecar.name).unlink(missing_ok=True)
        sidecar.unlink(missing_ok=True)

    def adopt(self, stem: str, data: Mapping[str, Any]) -> Found:
        _check(stem)
        image = self.path / (stem + SUFFIX)
        if not image.exists():
            raise NotFound(f"{image} does not exist")
        if (self.path / (stem + SIDECAR)).exists():
            raise Conflict(f"{image} already has a sidecar; not touching it")
        facts = diskimage.read_image(image)
        size_gib = -(-facts.virtual_size // GIB) if facts else 0
        self._write(stem, {**data, "sizeGiB": size_gib})
        found = self.find(stem)
        assert found is not None
        return found

    # --- capacity ------------------------------------------------------------------------

    def capacity(self, found: list[Found]) -> Capacity:
        """What may still be promised: free space (x overcommit) minus what the volumes
        found by the last scan may still grow into."""
        where = self.path if self.path.exists() else _existing_parent(self.path)
        st = os.statvfs(where)
        free = st.f_bavail * st.f_frsize
        promised = sum(max(0, f.size - f.allocated) for f in found if f.payload is not None and f.path)
        room = int(free * self.overcommit) - promised
        text = (f"{human(free)} free on the filesystem of {self.path}"
                + (f" x{self.overcommit:g} overcommit" if self.overcommit != 1 else "")
                + (f", {human(promised)} of it promised to existing volumes" if promised else ""))
        return Capacity(room, text)


    def snapshot_cost(self, size_gib: int) -> int:
        return 0  # an internal snapshot only shares clusters until the guest writes


def _check(stem: str) -> None:
    if not _NAME.fullmatch(stem) or stem in (".", ".."):
        raise PermanentError(f"{stem!r} cannot be a volume file name")


def _existing_parent(path: Path) -> Path:
    for parent in (path, *path.parents):
        if parent.exists():
            return parent
    return Path("/")


def _zero(path: Path) -> None:
    """Overwrite a file with zeros, to its end, before it is removed (wipe: true)."""
    chunk = b"\0" * (1 << 20)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        done = 0
        while done < size:
            n = min(len(chunk), size - done)
            f.write(chunk[:n])
            done += n
        f.flush()
        os.fsync(f.fileno())
