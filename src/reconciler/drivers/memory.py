"""The in-memory driver: every kind, persisted as one JSON file per object.

For tests and for trying the tool without root; never the default. It behaves like a
real driver where it matters: objects carry the ownership mark, an unmarked file in
the way is a conflict, observe is one directory scan per kind, and writes are atomic
(temporary file + rename), so a killed apply leaves whole objects or none.

Layout: ``STATE_DIR/memory/KIND/HOSTNAME[.N].json`` with ``{"mark", "spec", "host"}``;
a file without ``"mark"`` stands for an object someone else created by hand.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Sequence

from reconciler.errors import Conflict, NotFound, PermanentError
from reconciler.fileio import write_atomic
from reconciler.models import KINDS, Key
from reconciler.naming import host_name
from reconciler.state import FieldDiff, Mark, Observation, Observed, Target, Unowned

#: what the host identity of each kind is called in status (mirrors the real drivers)
HOST_FIELD = {
    "Tenant": "account",
    "Network": "bridge",
    "Router": "namespace",
    "SecurityGroup": "nftSet",
    "Image": "image",
    "Instance": "domain",
    "Volume": "volume",
    "Bucket": "container",
}


class MemoryDriver:
    """Realises every kind as JSON files under `root` (normally STATE_DIR/memory)."""

    name = "memory"

    def __init__(self, root: str | os.PathLike[str], kinds: Sequence[str] = tuple(KINDS), max_parallel: int = 8):
        self.root = Path(root)
        self.kinds = tuple(kinds)
        self.max_parallel = max_parallel

    # --- reading ---------------------------------------------------------------------

    def observe(self) -> Observation:
        result = Observation()
        for kind in self.kinds:
            folder = self.root / kind
            if not folder.is_dir():
                continue
            for path in sorted(folder.glob("*.json")):
                if path.name.startswith("."):
                    continue  # a temporary file of a write (a killed apply may leave one)
                try:
                    data = json.loads(path.read_text())
                except (OSError, ValueError):
                    result.unowned.append(Unowned(kind, _base_name(path), "unreadable file"))
                    continue
                if not isinstance(data, dict) or not data.get("mark"):
                    result.unowned.append(Unowned(kind, _base_name(path), f"{path} has no ownership mark"))
                    continue
                try:
                    mark = Mark.from_dict(data["mark"])
                except (KeyError, TypeError):
                    result.unowned.append(Unowned(kind, _base_name(path), "unreadable mark"))
                    continue
                result.owned.append(
                    Observed(mark.key, path.stem, data.get("spec") or {}, mark, data.get("host") or {},
                             derived=data.get("derived") or {})
                )
        return result

    def host_name(self, key: Key) -> str:
        return host_name(key)

    # --- acting ----------------------------------------------------------------------

    def create(self, target: Target) -> Observed:
        folder = self.root / target.key.kind
        folder.mkdir(parents=True, exist_ok=True)
        base = self.host_name(target.key)
        path = folder / f"{base}.json"
        n = 1
        while path.exists():
            existing = _read(path)
            if not existing or not existing.get("mark"):
                raise Conflict(f"{path} exists and is not ours; not touching it")
            if _mark_key(existing) != target.key:
                raise Conflict(f"{path} belongs to another resource")
            # create-before-destroy: the old object still exists under the base name
            path = folder / f"{base}.{n}.json"
            n += 1
        host = {HOST_FIELD[target.key.kind]: base, "driver": "memory"}
        _write(path, {"mark": target.mark.to_dict(), "spec": dict(target.spec), "host": host,
                      "derived": dict(target.derived)})
        return Observed(target.key, path.stem, dict(target.spec), target.mark, host, derived=dict(target.derived))

    def update(self, target: Target, observed: Observed, diffs: Sequence[FieldDiff]) -> Observed:
        path = self._path(observed)
        data = _read(path)
        if data is None:
            raise NotFound(f"{observed.key.display}: {path} is gone")
        _check_ours(data, observed, path)
        data["spec"] = dict(target.spec)
        data["mark"] = target.mark.to_dict()
        data["derived"] = dict(target.derived)
        _write(path, data)
        return Observed(target.key, observed.identity, dict(target.spec), target.mark, data.get("host") or {},
                        derived=dict(target.derived))

    def delete(self, observed: Observed) -> None:
        path = self._path(observed)
        data = _read(path)
        if data is None:
            return  # already gone: deleting is idempotent
        _check_ours(data, observed, path)
        path.unlink(missing_ok=True)

    def orphan(self, observed: Observed) -> Observed:
        path = self._path(observed)
        data = _read(path)
        if data is None:
            raise NotFound(f"{observed.key.display}: {path} is gone")
        _check_ours(data, observed, path)
        mark = dataclasses.replace(observed.mark, orphaned=True)
        data["mark"] = mark.to_dict()
        _write(path, data)
        return dataclasses.replace(observed, mark=mark)

    def adopt(self, host_name: str, target: Target) -> Observed:
        """Mark an unmarked object file as ours; its live spec stays what it was."""
        path = self.root / target.key.kind / f"{host_name}.json"
        if "/" in host_name or host_name.startswith("."):
            raise PermanentError(f"bad host name {host_name!r}")
        data = _read(path)
        if data is None:
            raise NotFound(f"{path} does not exist")
        if data.get("mark"):
            raise Conflict(f"{path} already carries a mark")
        spec = data.get("spec") if isinstance(data.get("spec"), dict) else dict(target.spec)
        host = {HOST_FIELD[target.key.kind]: host_name, "driver": "memory"}
        derived = data.get("derived") if isinstance(data.get("derived"), dict) else {}
        _write(path, {"mark": target.mark.to_dict(), "spec": spec, "host": host, "derived": derived})
        return Observed(target.key, path.stem, spec, target.mark, host, derived=derived)

    def _path(self, observed: Observed) -> Path:
        if "/" in observed.identity or observed.identity.startswith("."):
            raise PermanentError(f"bad identity {observed.identity!r}")
        return self.root / observed.key.kind / f"{observed.identity}.json"


def _base_name(path: Path) -> str:
    return path.stem.split(".", 1)[0]


def _check_ours(data: dict[str, Any], observed: Observed, path: Path) -> None:
    if not data.get("mark") or _mark_key(data) != observed.key:
        raise Conflict(f"{path} is no longer ours; not touching it")


def _mark_key(data: dict[str, Any]) -> Key | None:
    """The key in a file's mark; None when the mark is not one of ours (someone else's)."""
    try:
        return Mark.from_dict(data["mark"]).key
    except (KeyError, TypeError, AttributeError):
        return None


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise PermanentError(f"cannot read {path}: {exc}") from None
    return data if isinstance(data, dict) else {}


def _write(path: Path, data: dict[str, Any]) -> None:
    """Atomic, private (0600: specs may hold userData)."""
    write_atomic(path, json.dumps(data, sort_keys=True))
