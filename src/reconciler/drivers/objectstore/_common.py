"""What both object stores share: a bucket as found, and the ownership payload on it.

A store keeps, on the bucket itself (Swift container metadata, or an S3 marker object),
one payload: ``{"home": ..., "mark": {...}, "spec": {...}}``: the installation that owns it,
the ownership mark, and the spec fields the store cannot show (deletionPolicy,
purgeOnDelete). Swift metadata values are short (256 bytes), so there the payload is
JSON, deflated, base64url, cut into numbered chunks, and the installation id goes alone
in `rc-home`.
"""

from __future__ import annotations

import base64
import json
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

from reconciler.fileio import read_json_object, write_atomic
from reconciler.state import Target
from reconciler.units import human

#: spec fields the store cannot express: kept in the payload, reported back as they were
STORED_FIELDS = ("deletionPolicy", "purgeOnDelete")
HOME_KEY = "rc-home"
CHUNK_KEY = "rc-mark-"
CHUNK = 240


@dataclass(frozen=True, slots=True)
class Found:
    """One bucket a store found: ours (with its payload) or someone else's."""

    tenant: str
    name: str
    account: str  # the Swift account, or the S3 access key's owner, for status
    payload: Mapping[str, Any] | None  # None: not ours
    detail: str = ""  # why it is not ours
    acl: str = "private"  # private | public-read | what else was found (drift)
    versioning: bool = False
    quota: Mapping[str, int | None] = field(default_factory=lambda: {"bytes": None, "objects": None})
    metadata: Mapping[str, str] = field(default_factory=dict)  # user metadata (never rc-*)
    objects: int | None = 0  # None: not known (S3 without a listing)
    bytes: int | None = 0
    drift: tuple[str, ...] = ()


def make_payload(home: str, mark: Mapping[str, Any], spec: Mapping[str, Any]) -> dict[str, Any]:
    return {"home": home, "mark": dict(mark), "spec": {k: spec[k] for k in STORED_FIELDS if k in spec}}


def encode_items(payload: Mapping[str, Any]) -> dict[str, str]:
    """The metadata items that carry the payload: `rc-home` and `rc-mark-0..N`."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    packed = base64.urlsafe_b64encode(zlib.compress(text, 9)).decode().rstrip("=")
    items = {HOME_KEY: str(payload["home"])}
    for i in range(0, len(packed), CHUNK):
        items[f"{CHUNK_KEY}{i // CHUNK}"] = packed[i : i + CHUNK]
    return items


def decode_payload(items: Mapping[str, str]) -> dict[str, Any] | None:
    """The payload from metadata items (keys lowercase), or None when absent or damaged."""
    chunks = []
    for i in range(len(items)):
        part = items.get(f"{CHUNK_KEY}{i}")
        if part is None:
            break
        chunks.append(part)
    if not chunks:
        return None
    packed = "".join(chunks)
    try:
        data = json.loads(zlib.decompress(base64.urlsafe_b64decode(packed + "=" * (-len(packed) % 4))))
    except (ValueError, zlib.error):
        return None
    return data if isinstance(data, dict) and "mark" in data else None


def is_ours_key(key: str) -> bool:
    return key == HOME_KEY or key.startswith(CHUNK_KEY)


def data_of(found: Found) -> str:
    """What the bucket holds, for status and the plan's delete warning."""
    if found.objects is None:
        return "unknown"
    if found.objects == 0:
        return "empty"
    size = "" if found.bytes is None else f", {human(found.bytes)}"
    return f"{found.objects} object{'s' if found.objects != 1 else ''}{size}"


class Store(Protocol):
    """One object store of the host config (a Swift cluster, or an S3 endpoint)."""

    name: str
    driver: str  # "swift" | "s3"

    def scan(self) -> list[Found]:
        """Every bucket of every account this store reaches for us (with metadata)."""
        ...

    def tenants(self) -> Sequence[str]: ...

    def create(self, target: Target, payload: Mapping[str, Any]) -> Found: ...

    def update(self, target: Target, previous: Mapping[str, Any], payload: Mapping[str, Any]) -> Found:
        """`previous`: the fields the user had set at the last apply (what to remove)."""
        ...

    def delete(self, tenant: str, name: str, purge: bool) -> None: ...

    def set_payload(self, tenant: str, name: str, payload: Mapping[str, Any]) -> Found:
        """Write only the ownership payload (orphan, adopt)."""
        ...

    def problems(self, tenant: str, name: str, spec: Mapping[str, Any]) -> list[tuple[tuple[str | int, ...], str]]: ...


class Registry:
    """What this installation wrote where, kept in the state directory (0600 JSON):

    - `tenants`: the accounts this store has made buckets in. Observe lists those (and
      the tenants with credentials), so a bucket of a tenant since removed from the
      manifests is still found, retained or deleted, never forgotten. Written before the
      first bucket of an account is created.
    - `creating`: buckets whose create began but whose mark may not be on them yet (S3
      creates a bucket and tags it in two requests): a bucket listed here and found
      without a mark is ours, half made, and the next apply finishes it.
    """

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()

    def _read(self) -> dict[str, list[str]]:
        data = read_json_object(self.path) or {}
        return {k: [str(x) for x in data.get(k, []) if isinstance(x, str)] for k in ("tenants", "creating")}

    def _write(self, data: dict[str, list[str]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomic(self.path, json.dumps({k: sorted(set(v)) for k, v in data.items()}, indent=1))

    def tenants(self) -> list[str]:
        return self._read()["tenants"]

    def creating(self) -> set[str]:
        return set(self._read()["creating"])

    def add(self, tenant: str, creating: str | None = None) -> None:
        with self._lock:
            data = self._read()
            if tenant in data["tenants"] and (creating is None or creating in data["creating"]):
                return
            data["tenants"].append(tenant)
            if creating is not None:
                data["creating"].append(creating)
            self._write(data)

    def created(self, what: str) -> None:
        with self._lock:
            data = self._read()
            if what in data["creating"]:
                data["creating"].remove(what)
                self._write(data)
