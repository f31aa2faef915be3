"""The storage driver: Volume on the backends the host config names (lvm, file).

One driver for the kind, several backends (as Cinder has one volume service with
several backends): a volume's `backend` picks one, the host config's default fills it
when the manifest does not. Observe is one bulk read per backend (`lvs` of the volume
group; one directory scan), matched by the ownership mark the backend keeps on the
object itself, never by name alone.

What the instance driver needs to attach a volume is in `Observed.host`: `path`,
`format` and `block` ("true" for a block device). Growing a volume that a running guest
holds is finished by the instance driver (blockResize), which the plan says.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any, Mapping, Sequence

from reconciler.drivers.storage._common import GIB, STORED_FIELDS, Found, gib, payload
from reconciler.units import human
from reconciler.drivers.storage._file import FileBackend
from reconciler.drivers.storage._lvm import LV_METADATA_BYTES, NO_DM, LvmBackend
from reconciler.errors import NotFound, PermanentError
from reconciler.models import Key
from reconciler.naming import host_name
from reconciler.state import FieldDiff, Mark, Observation, Observed, Proposal, Target, Unowned

Backend = FileBackend | LvmBackend

DEFAULTS = {"multiattach": False, "wipe": False, "deletionPolicy": "Retain"}


class StorageDriver:
    """Realises Volume on file and LVM backends."""

    name = "storage"
    kinds = ("Volume",)

    def __init__(self, backends: Mapping[str, Backend], default: str, max_parallel: int = 4):
        if default not in backends:
            raise PermanentError(f"the default volume backend {default!r} is not configured")
        self.backends = dict(backends)
        self.default = default
        self.max_parallel = max_parallel
        self._last: dict[str, list[Found]] = {}

    # --- reading -------------------------------------------------------------------------

    def observe(self) -> Observation:
        result = Observation()
        for bname, backend in self.backends.items():
            found = backend.scan()
            self._last[bname] = found
            for f in found:
                if f.payload is None:
                    result.unowned.append(Unowned("Volume", f.name, f.detail))
                else:
                    obs = self._observed(backend, f)
                    if obs is None:
                        result.unowned.append(Unowned("Volume", f.name, "unreadable ownership mark"))
                    else:
                        result.owned.append(obs)
        return result

    def host_name(self, key: Key) -> str:
        return host_name(key)

    def _observed(self, backend: Backend, found: Found) -> Observed | None:
        data = found.payload or {}
        try:
            mark = Mark.from_dict(data["mark"])
        except (KeyError, TypeError, AttributeError):
            return None
        stored = data.get("spec") if isinstance(data.get("spec"), dict) else {}
        spec: dict[str, Any] = {"sizeGiB": gib(found.size), "backend": backend.name}
        for name in STORED_FIELDS:
            spec[name] = stored.get(name, DEFAULTS[name])
        spec["snapshots"] = sorted(found.snapshots)
        host = {"volume": found.name, "backend": backend.name, "driver": backend.driver,
                "format": found.format, "data": found.data, **found.extra}
        if found.path:
            host["path"] = found.path
        if found.block:
            host["block"] = "true"
        if found.in_use:
            host["inUse"] = "true"
        return Observed(mark.key, f"{backend.name}/{found.name}", spec, mark, host, drift=found.drift)

    def _find(self, observed: Observed) -> tuple[Backend, Found]:
        backend = self._backend(observed.host.get("backend"))
        name = observed.host.get("volume") or self.host_name(observed.key)
        found = backend.find(name)
        if found is None:
            raise NotFound(f"{observed.key.display}: volume {name} is gone from backend {backend.name}")
        if found.payload is None:
            raise PermanentError(f"{observed.key.display}: volume {name} is no longer ours; not touching it")
        return backend, found

    def _backend(self, name: object) -> Backend:
        if name is None:
            return self.backends[self.default]
        if not isinstance(name, str) or name not in self.backends:
            raise PermanentError(f"no volume backend {name!r} on this host (configured: "
                                 f"{', '.join(sorted(self.backends))})")
        return self.backends[name]

    def _reread(self, backend: Backend, name: str) -> Observed:
        found = backend.find(name)
        obs = self._observed(backend, found) if found is not None and found.payload is not None else None
        if obs is None:
            raise PermanentError(f"volume {name} on backend {backend.name} vanished while being changed")
        return obs

    # --- acting --------------------------------------------------------------------------

    def create(self, target: Target) -> Observed:
        backend = self._backend(target.spec.get("backend"))
        name = self.host_name(target.key)
        wanted = list(target.spec.get("snapshots") or [])
        data = payload(backend.home, target.mark.to_dict(), target.spec, wanted)
        found = backend.create(name, int(target.spec["sizeGiB"]), data)
        missing = [snap for snap in wanted if snap not in found.snapshots]
        for snap in missing:
            backend.snapshot(found, snap)
        observed = None if missing else self._observed(backend, found)
        return observed if observed is not None else self._reread(backend, name)

    def update(self, target: Target, observed: Observed, diffs: Sequence[FieldDiff]) -> Observed:
        backend, found = self._find(observed)
        size = int(target.spec["sizeGiB"])
        want = set(target.spec.get("snapshots") or [])
        have = set(found.snapshots)
        extra = {"sizeGiB": size} if isinstance(backend, FileBackend) else {}
        if want - have:  # write-ahead: snapshots about to be taken are ours even if this is killed
            backend.write(found, {**payload(backend.home, target.mark.to_dict(), target.spec, want | have), **extra})
        if found.drift:
            backend.activate(found)
        backend.grow(found, size)
        for snap in sorted(want - have):
            backend.snapshot(found, snap)
        for snap in sorted(have - want):
            backend.unsnapshot(found, snap)
        backend.write(found, {**payload(backend.home, target.mark.to_dict(), target.spec, want), **extra})
        return self._reread(backend, found.name)

    def delete(self, observed: Observed) -> None:
        try:
            backend, found = self._find(observed)
        except NotFound:
            return  # already gone: deleting is idempotent
        backend.delete(found, wipe=bool(observed.spec.get("wipe")))

    def orphan(self, observed: Observed) -> Observed:
        backend, found = self._find(observed)
        data = dict(found.payload or {})
        data["mark"] = dataclasses.replace(observed.mark, orphaned=True).to_dict()
        backend.write(found, data)
        return self._reread(backend, found.name)

    def adopt(self, host_name: str, target: Target) -> Observed:
        """Put `target`'s mark on the unmarked volume `host_name` of its backend; its data,
        size and snapshots stay as they are (those snapshots stay someone else's)."""
        backend = self._backend(target.spec.get("backend"))
        found = backend.adopt(host_name, payload(backend.home, target.mark.to_dict(), target.spec, []))
        return self._reread(backend, found.name)

    # --- what the host can and cannot do -------------------------------------------------

    def defaults(self, kind: str) -> dict[str, Any]:
        return {"backend": self.default} if kind == "Volume" else {}

    def problems(self, kind: str, tenant: str, name: str, spec: Mapping[str, Any]
                 ) -> list[tuple[tuple[str | int, ...], str]]:
        if kind != "Volume":
            return []
        bname = spec.get("backend") or self.default
        if bname not in self.backends:
            return [(("backend",), f"no volume backend {bname!r} on this host (configured: "
                                   f"{', '.join(sorted(self.backends))})")]
        backend = self.backends[bname]
        out: list[tuple[tuple[str | int, ...], str]] = []
        if isinstance(backend, FileBackend) and spec.get("multiattach"):
            out.append((("multiattach",), f"backend {bname} keeps volumes in qcow2 files, which two running "
                                          "guests cannot share (QEMU locks them for one writer): use an LVM "
                                          "backend for a multiattach volume"))
        if isinstance(backend, LvmBackend) and not backend.lvm.activation:
            if backend.thin:
                out.append((("backend",), f"backend {bname} is thin-provisioned, and {NO_DM} (thin "
                                          "pools need it)"))
            if spec.get("snapshots"):
                out.append((("snapshots",), f"LVM snapshots need device-mapper, and {NO_DM}"))
            if spec.get("wipe"):
                out.append((("wipe",), f"wiping writes zeros to the LV, and {NO_DM}"))
        return out

    def attach_problem(self, kind: str, tenant: str, name: str, spec: Mapping[str, Any]) -> str | None:
        if kind != "Volume":
            return None
        backend = self.backends.get(spec.get("backend") or self.default)
        if isinstance(backend, LvmBackend) and not backend.lvm.activation:
            return f"it is on the LVM backend {backend.name}, and {NO_DM}: no guest can use it"
        return None

    def lane(self, key: Key, spec: Mapping[str, Any] | None, observed: Observed | None) -> str | None:
        """One lvm2 writer per volume group (lvm serialises on its VG lock anyway; queueing
        here keeps the others from timing out on it)."""
        bname = (spec or {}).get("backend") or (observed.host.get("backend") if observed else None)
        backend = self.backends.get(bname or self.default)
        return f"vg:{backend.vg}" if isinstance(backend, LvmBackend) else None

    def admit(self, proposals: Sequence[Proposal]) -> list[tuple[Key, tuple[str | int, ...], str]]:
        """Capacity admission per backend, and snapshots of qcow2 files a guest holds open."""
        out: list[tuple[Key, tuple[str | int, ...], str]] = []
        needs: dict[str, list[tuple[int, Key]]] = defaultdict(list)
        new_lvs: dict[str, list[int]] = defaultdict(list)
        first: dict[str, Key] = {}
        for p in proposals:
            if p.spec is None:
                continue
            bname = p.spec.get("backend") or self.default
            backend = self.backends.get(bname)
            if backend is None:
                continue
            first.setdefault(bname, p.key)
            size = int(p.spec.get("sizeGiB") or 0)
            snaps = set(p.spec.get("snapshots") or [])
            same = p.observed is not None and p.observed.host.get("backend") == bname and p.action == "update"
            had: set[str] = set()
            if same:
                assert p.observed is not None
                old = int(p.observed.spec.get("sizeGiB") or 0)
                had = set(p.observed.spec.get("snapshots") or [])
                need = max(0, size - old) * GIB + backend.snapshot_cost(size) * len(snaps - had)
                if isinstance(backend, FileBackend) and snaps != had and p.observed.host.get("inUse") == "true":
                    out.append((p.key, ("snapshots",),
                                "a qcow2 internal snapshot needs the image closed, and a running guest "
                                "holds it: stop the instance or detach the volume, then apply"))
            else:
                need = size * GIB + backend.snapshot_cost(size) * len(snaps)
            if need:
                needs[bname].append((need, p.key))
            if isinstance(backend, LvmBackend):
                new_lvs[bname].append((0 if same else 1) + len(snaps - had))
        for bname in sorted(set(needs) | {b for b, counts in new_lvs.items() if sum(counts)}):
            backend = self.backends[bname]
            found = self._last.get(bname)
            cap = backend.capacity(found if found is not None else backend.scan())
            count = sum(new_lvs.get(bname, ()))
            if cap.metadata_free is not None and count * LV_METADATA_BYTES > cap.metadata_free:
                assert isinstance(backend, LvmBackend)
                out.append((first[bname], ("backend",),
                            f"the metadata area of volume group {backend.vg} has {human(cap.metadata_free)} "
                            f"left, and {count} new LVs need about {human(count * LV_METADATA_BYTES)}: lvm "
                            "would refuse them (give the PV a bigger --metadatasize, or use another volume "
                            "group)"))
            items = needs.get(bname, [])
            total = sum(n for n, _ in items)
            room, how = cap.room, cap.how
            if total > room:
                items.sort(key=lambda item: (-item[0], item[1]))
                listed = ", ".join(f"{k.display} {human(n)}" for n, k in items[:5])
                more = f" and {len(items) - 5} more" if len(items) > 5 else ""
                out.append((items[0][1], ("sizeGiB",),
                            f"not enough space on volume backend {bname}: this plan needs {human(total)} "
                            f"({listed}{more}), {human(max(room, 0))} is available ({how})"))
        return out

    def describe(self) -> dict[str, str]:
        parts = []
        for bname, backend in sorted(self.backends.items()):
            default = ", default" if bname == self.default else ""
            if isinstance(backend, FileBackend):
                parts.append(f"{bname} (file {backend.path}{default})")
            else:
                kind = f"thin pool {backend.pool}" if backend.thin else "thick"
                dm = "" if backend.lvm.activation else ", metadata only: no device-mapper"
                parts.append(f"{bname} (lvm {backend.vg}, {kind}{dm}{default})")
        return {"backends": "; ".join(parts)}
