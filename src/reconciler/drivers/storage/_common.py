"""What both backends share: one volume as found on the host, and its ownership payload.

A backend stores, on the object itself (a sidecar file, or LV tags), one JSON payload:
``{"home": ..., "mark": {...}, "spec": {...}, "snapshots": [...]}``: the installation
that owns it, the ownership mark, the spec fields the host cannot show (multiattach,
wipe, deletionPolicy) and, for qcow2 files, the snapshots that are ours (written before
they are taken, so a killed apply never leaves a snapshot of ours looking foreign).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

GIB = 1024**3

#: spec fields the host cannot express: kept in the payload, reported back as they were
STORED_FIELDS = ("multiattach", "wipe", "deletionPolicy")


@dataclass(frozen=True, slots=True)
class Capacity:
    """What a backend can still promise: bytes, how that was computed, and (LVM) the
    bytes left in the volume group's metadata area."""

    room: int
    how: str
    metadata_free: int | None = None


@dataclass(frozen=True, slots=True)
class Found:
    """One volume a backend found: ours (with its payload) or someone else's."""

    name: str  # host name: the file's stem, or the LV's name
    size: int  # bytes, as the guest sees it
    payload: Mapping[str, Any] | None  # None: not ours
    detail: str = ""  # why it is not ours
    path: str | None = None  # what a guest attaches (None: cannot be attached here)
    format: str = "raw"
    block: bool = False
    data: str = ""  # "empty", "12.0 MiB written", or why it is unknown
    allocated: int = 0  # bytes the host has given it (a sparse file's blocks)
    in_use: bool = False  # held open by a process (a running guest)
    snapshots: tuple[str, ...] = ()  # names of our snapshots that exist
    drift: tuple[str, ...] = ()
    extra: Mapping[str, str] = field(default_factory=dict)  # more host facts for status


def payload(home: str, mark: Mapping[str, Any], spec: Mapping[str, Any],
            snapshots: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        "home": home,
        "mark": dict(mark),
        "spec": {k: spec[k] for k in STORED_FIELDS if k in spec},
        "snapshots": sorted(set(snapshots)),
    }


def dumps(data: Mapping[str, Any]) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def gib(size: int) -> int:
    """Whole GiB, rounded up (an adopted 1.5 GiB volume is reported as 2)."""
    return -(-size // GIB)
