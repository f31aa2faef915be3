"""Sidecars: the full mark, spec and derived facts of each object, one private JSON file
per object (``STATE_DIR/networks/BRIDGE.json``, ``routers/NAMESPACE.json``,
``groups/PREFIX.json``).

The kernel has room for a short mark only (an interface alias of 256 bytes) and none at
all on nftables chains or namespaces, so the rest lives here. A sidecar is written
before the first host object is made and removed after the last is gone: a crash in
between leaves an object observe reports with drift, never a host object nobody knows.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from reconciler.errors import PermanentError
from reconciler.fileio import read_json_object, write_atomic

NETWORKS = "networks"
ROUTERS = "routers"
GROUPS = "groups"


class Sidecars:
    def __init__(self, root: Path):
        self.root = root

    def path(self, folder: str, name: str) -> Path:
        if "/" in name or name.startswith("."):
            raise PermanentError(f"bad sidecar name {name!r}")
        return self.root / folder / f"{name}.json"

    def read(self, folder: str, name: str) -> dict[str, Any] | None:
        """The sidecar's data; None when there is none; {} when it is unreadable."""
        return read_json_object(self.path(folder, name))

    def all(self, folder: str) -> dict[str, dict[str, Any]]:
        """name -> data for every sidecar in `folder` (temporary files skipped)."""
        base = self.root / folder
        if not base.is_dir():
            return {}
        out = {}
        for path in sorted(base.glob("*.json")):
            if not path.name.startswith("."):
                out[path.stem] = read_json_object(path) or {}
        return out

    def write(self, folder: str, name: str, data: Mapping[str, Any]) -> None:
        path = self.path(folder, name)
        if not self.root.is_dir():
            # traversable: dnsmasq (user nobody) reads its files in STATE_DIR/dhcp
            self.root.mkdir(parents=True, exist_ok=True)
            os.chmod(self.root, 0o755)
        if not path.parent.is_dir():
            path.parent.mkdir(exist_ok=True)
            os.chmod(path.parent, 0o700)
        write_atomic(path, json.dumps(data, sort_keys=True, indent=1))

    def remove(self, folder: str, name: str) -> None:
        self.path(folder, name).unlink(missing_ok=True)

    def any(self, *folders: str, but: tuple[str, str] | None = None) -> bool:
        """Whether any sidecar exists in `folders` (names only: no file is read), the one
        `but` (folder, name) not counted."""
        skip = self.path(*but) if but is not None else None
        return any(not path.name.startswith(".") and path != skip
                   for folder in folders for path in (self.root / folder).glob("*.json"))


