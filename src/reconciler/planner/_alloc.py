"""Stable allocation of host-wide ids (VNIs, VLAN ids) for networks that omit them.

Deterministic: the first candidate is a hash of the network's key, then the next free
one. An id once allocated lives on in the host object and is kept (a `hostDefault`
field), so adding or removing other networks never renumbers an existing one.
"""

from __future__ import annotations

import hashlib
from typing import Iterable

from reconciler.models import Key

RANGES = {"vni": (4096, 16777215), "vlanId": (100, 4094)}


def allocate(key: Key, field: str, used: set[int]) -> int:
    lo, hi = RANGES[field]
    size = hi - lo + 1
    if len(used) >= size:
        raise ValueError(f"no free {field} left")
    start = int(hashlib.sha256(str(key).encode()).hexdigest()[:8], 16) % size
    for step in range(size):
        candidate = lo + (start + step) % size
        if candidate not in used:
            used.add(candidate)
            return candidate
    raise ValueError(f"no free {field} left")  # pragma: no cover


def used_ids(specs: Iterable[dict], field: str) -> set[int]:
    return {s[field] for s in specs if isinstance(s.get(field), int)}
