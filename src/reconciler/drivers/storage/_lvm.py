"""The LVM backend: one logical volume per volume in an existing volume group.

The ownership payload lives in the LV's own tags (``rc.home=HOME`` and the payload in
``rc.m.N=...`` chunks), so the mark travels with the LV and a single ``lvs`` of the
group reads every volume, ours and not ours. Snapshots are LVs whose origin is the
volume, tagged ``rc.snap=NAME``. Only LVs with our home tag are ever changed.

Without device-mapper (no /dev/mapper/control) LVs cannot be activated: lvm2 runs with
activation disabled, creating, growing, tagging and removing LVs still work (metadata),
but nothing can be attached, snapshotted, wiped or thin-provisioned; the driver says so
at plan time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from reconciler.drivers.storage._common import Capacity, Found, dumps
from reconciler.units import human
from reconciler.drivers.storage._lvm2 import Lvm2, decode_tags, encode_tags
from reconciler.errors import Conflict, NotFound, PermanentError

HOME_TAG = "rc.home="
PAYLOAD = "rc.m"
SNAP_TAG = "rc.snap="
SNAP_SEP = ".s."
#: VG metadata text one of our LVs takes, with its tags (measured: ~500 bytes + tags ~450)
LV_METADATA_BYTES = 1536

NO_DM = ("this host has no device-mapper (the kernel lists none in /proc/misc), so LVM volumes "
         "cannot be activated")


class LvmBackend:
    driver = "lvm"

    def __init__(self, name: str, vg: str, home: str, lvm: Lvm2, *, thin: bool = False,
                 pool: str | None = None, overcommit: float = 20.0, snapshot_percent: int = 100):
        self.name = name
        self.vg = vg
        self.home = home
        self.lvm = lvm
        self.thin = thin
        self.pool = pool
        self.overcommit = overcommit
        self.snapshot_percent = snapshot_percent

    # --- reading -------------------------------------------------------------------------

    def scan(self) -> list[Found]:
        lvs = self.lvm.lvs(self.vg)
        snaps: dict[str, list[str]] = {}
        for lv in lvs:
            if lv.origin and self._ours(lv.tags):
                name = _tag_value(lv.tags, SNAP_TAG)
                if name:
                    snaps.setdefault(lv.origin, []).append(name)
        found = []
        for lv in lvs:
            if lv.origin and self._ours(lv.tags) and _tag_value(lv.tags, SNAP_TAG) is not None:
                continue  # a snapshot of ours: listed with its volume
            if lv.is_thin_pool or lv.is_snapshot:
                found.append(Found(lv.name, lv.size, None, f"LV {self.vg}/{lv.name} is not a volume of ours"))
                continue
            found.append(self._found(lv, sorted(snaps.get(lv.name, ()))))
        return found

    def find(self, name: str) -> Found | None:
        """One volume (with its snapshots): one `lvs` of the group."""
        lvs = self.lvm.lvs(self.vg)
        lv = next((x for x in lvs if x.name == name), None)
        if lv is None:
            return None
        if not self._ours(lv.tags):
            return self._found(lv, [])
        snaps = [_tag_value(s.tags, SNAP_TAG) for s in lvs if s.origin == name and self._ours(s.tags)]
        return self._found(lv, sorted(n for n in snaps if n))

    def _found(self, lv: Any, snapshots: list[str]) -> Found:
        data = self._payload(lv.tags)
        if data is None:
            why = "no ownership mark in its tags" if not self._ours(lv.tags) else "unreadable mark in its tags"
            return Found(lv.name, lv.size, None, f"LV {self.vg}/{lv.name}: {why}")
        device = self.lvm.device_path(self.vg, lv.name)
        drift: tuple[str, ...] = ()
        if self.lvm.activation and lv.active is False:
            drift = (f"LV {self.vg}/{lv.name} is not active",)
        if lv.data_percent is not None and lv.pool_lv:
            written = "empty" if lv.data_percent == 0 else f"{human(lv.size * lv.data_percent / 100)} written"
        else:
            written = "not inspected (a thick LV): assume it holds data"
        return Found(
            name=lv.name, size=lv.size, payload=data,
            path=str(device) if self.lvm.activation else None, format="raw", block=True,
            data=written, in_use=lv.open is True,
            snapshots=tuple(snapshots), drift=drift,
            extra={"lv": f"{self.vg}/{lv.name}", **({"pool": lv.pool_lv} if lv.pool_lv else {})},
        )

    def _ours(self, tags: tuple[str, ...]) -> bool:
        return HOME_TAG + self.home in tags

    def _payload(self, tags: tuple[str, ...]) -> dict[str, Any] | None:
        if not self._ours(tags):
            return None
        raw = decode_tags(PAYLOAD, tags)
        if raw is None:
            return None
        try:
            data = json.loads(raw)
        except ValueError:
            return None
        return data if isinstance(data, dict) and isinstance(data.get("mark"), dict) else None

    def _tags(self, data: Mapping[str, Any]) -> list[str]:
        return [HOME_TAG + self.home, *encode_tags(PAYLOAD, dumps(data).encode())]

    # --- acting --------------------------------------------------------------------------

    def create(self, name: str, size_gib: int, data: Mapping[str, Any]) -> Found:
        try:  # the mark is in lvcreate's own tags: the LV never exists without it
            self.lvm.create(self.vg, name, size_gib * 1024**3, self._tags(data),
                            thin_pool=self.pool if self.thin else None)
        except Conflict:
            existing = self.lvm.lv(self.vg, name)
            if existing is None or self._payload(existing.tags) is None:
                raise Conflict(f"LV {self.vg}/{name} exists and is not ours; not touching it") from None
        found = self.find(name)
        assert found is not None
        return found

    def write(self, found: Found, data: Mapping[str, Any]) -> None:
        if found.payload is not None and dict(found.payload) == dict(data):
            return  # the tags already say it: no metadata commit
        lv = self._lv(found.name)
        old = [t for t in lv.tags if t.startswith(PAYLOAD + ".") or t.startswith(HOME_TAG)]
        new = self._tags(data)
        self.lvm.retag(self.vg, found.name, add=[t for t in new if t not in old],
                       remove=[t for t in old if t not in new])

    def grow(self, found: Found, size_gib: int) -> None:
        if found.size < size_gib * 1024**3:
            self.lvm.extend(self.vg, found.name, size_gib * 1024**3)

    def activate(self, found: Found) -> None:
        self.lvm.activate(self.vg, found.name)

    def snapshot(self, found: Found, name: str) -> None:
        if not self.lvm.activation:
            raise PermanentError(f"cannot take snapshot {name!r} of {self.vg}/{found.name}: {NO_DM}")
        size = None if self.thin else found.size * self.snapshot_percent // 100
        self.lvm.snapshot(self.vg, found.name, found.name + SNAP_SEP + name, size,
                          [HOME_TAG + self.home, SNAP_TAG + name])

    def unsnapshot(self, found: Found, name: str) -> None:
        lv_name = found.name + SNAP_SEP + name
        try:
            lv = self._lv(lv_name)
        except NotFound:
            return
        if not self._ours(lv.tags) or _tag_value(lv.tags, SNAP_TAG) != name:
            raise Conflict(f"LV {self.vg}/{lv_name} is not a snapshot of ours; not touching it")
        self.lvm.remove(self.vg, lv_name)

    def delete(self, found: Found, wipe: bool) -> None:
        """`found` was just read (by the driver, with its mark checked)."""
        for snap in found.snapshots:
            self.unsnapshot(found, snap)
        if wipe:
            if not self.lvm.activation:
                raise PermanentError(f"cannot wipe {self.vg}/{found.name}: {NO_DM}; set wipe: false to "
                                     "delete it without wiping")
            self.lvm.activate(self.vg, found.name)
            _zero(self.lvm.device_path(self.vg, found.name), found.size)
        self.lvm.remove(self.vg, found.name)

    def adopt(self, name: str, data: Mapping[str, Any]) -> Found:
        lv = self._lv(name)
        if self._ours(lv.tags):
            raise Conflict(f"LV {self.vg}/{name} already carries our mark")
        self.lvm.retag(self.vg, name, add=self._tags(data), remove=[])
        found = self.find(name)
        assert found is not None
        return found

    def _lv(self, name: str) -> Any:
        lv = self.lvm.lv(self.vg, name)
        if lv is None:
            raise NotFound(f"LV {self.vg}/{name} does not exist")
        return lv

    # --- capacity ------------------------------------------------------------------------

    def capacity(self, found: list[Found]) -> Capacity:
        """One report of the group: its free space (thick) or its thin pool's size, and
        its metadata area (every LV and its tags take some; lvm refuses changes once it
        is full)."""
        vg, lvs = self.lvm.report(self.vg)
        if not self.thin:
            return Capacity(vg.free, f"{human(vg.free)} free in volume group {self.vg}", vg.metadata_free)
        pool = next((lv for lv in lvs if lv.name == self.pool and lv.is_thin_pool), None)
        if pool is None:
            raise PermanentError(f"volume backend {self.name}: thin pool {self.vg}/{self.pool} does not exist "
                                 "(the host config's volumeBackends names it)")
        promised = sum(f.size for f in found if f.extra.get("pool") == self.pool)
        room = int(pool.size * self.overcommit) - promised
        return Capacity(room, f"thin pool {self.vg}/{self.pool}: {human(pool.size)} x{self.overcommit:g} "
                              f"overcommit, {human(promised)} promised to existing volumes", vg.metadata_free)

    def snapshot_cost(self, size_gib: int) -> int:
        return 0 if self.thin else size_gib * 1024**3 * self.snapshot_percent // 100


def _tag_value(tags: tuple[str, ...], prefix: str) -> str | None:
    for tag in tags:
        if tag.startswith(prefix):
            return tag[len(prefix):]
    return None


def _zero(device: Path, size: int) -> None:
    """Overwrite a block device with zeros (wipe: true), as Cinder's volume_clear=zero."""
    import os

    chunk = b"\0" * (1 << 20)
    fd = os.open(device, os.O_WRONLY)
    try:
        done = 0
        while done < size:
            done += os.write(fd, chunk[: min(len(chunk), size - done)])
        os.fsync(fd)
    finally:
        os.close(fd)
