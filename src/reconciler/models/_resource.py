"""A loaded resource (spec + where it came from) and the desired state as a whole."""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, create_model

from reconciler import API_VERSION
from reconciler.models._base import Key, Metadata, Source, Spec


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical_json(value: Any) -> str:
    """Sorted keys, no spaces: equal values give equal text (for hashes and fingerprints)."""
    return _CANONICAL.encode(value)


def spec_hash(spec_set: Mapping[str, Any]) -> str:
    """Hash of the user's intent (the fields they set), stored in the ownership mark."""
    return hashlib.sha256(canonical_json(spec_set).encode()).hexdigest()[:32]


def line_at(lines: Mapping[tuple[str | int, ...], int], path: tuple[str | int, ...], default: int) -> int:
    """Line of the deepest part of `path` found in `lines`, else `default`."""
    for n in range(len(path), -1, -1):
        line = lines.get(tuple(path[:n]))
        if line is not None:
            return line
    return default


@dataclass(frozen=True, slots=True)
class Resource:
    """One desired resource: its validated spec and where it was declared."""

    key: Key
    metadata: Metadata
    spec: Spec
    source: Source
    #: document path -> line number, for error messages about any field
    lines: Mapping[tuple[str | int, ...], int] = field(default_factory=dict, repr=False)
    #: only the fields the user wrote (JSON-able); this is what the mark stores
    spec_set: dict[str, Any] = field(default_factory=dict, repr=False)
    #: every field with defaults filled in (JSON-able)
    spec_full: dict[str, Any] = field(default_factory=dict, repr=False)
    spec_hash: str = ""

    @classmethod
    def build(
        cls,
        metadata: Metadata,
        spec: Spec,
        source: Source,
        lines: Mapping[tuple[str | int, ...], int] | None = None,
    ) -> "Resource":
        tenant = metadata.name if spec.kind == "Tenant" else (metadata.tenant or "")
        spec_set = spec.model_dump(mode="json", exclude_unset=True)
        return cls(
            key=Key(spec.kind, tenant, metadata.name),
            metadata=metadata,
            spec=spec,
            source=source,
            lines=lines or {},
            spec_set=spec_set,
            spec_full=spec.model_dump(mode="json"),
            spec_hash=spec_hash(spec_set),
        )

    def line_of(self, path: tuple[str | int, ...]) -> int:
        """Line of the deepest part of `path` that exists in the document."""
        return line_at(self.lines, path, self.source.line)


@dataclass(slots=True)
class Desired:
    """Every resource the manifests declare, by key."""

    resources: dict[Key, Resource] = field(default_factory=dict)
    #: keys of documents that were identified but failed validation (errors reported)
    unloaded: set[Key] = field(default_factory=set)
    #: data derived from this (read-only once loaded) state, by whoever derives it,
    #: e.g. the dependency graph, so it is built once per load
    derived: dict[str, Any] = field(default_factory=dict, repr=False)

    def __iter__(self) -> Iterator[Resource]:
        return iter(self.resources.values())

    def __len__(self) -> int:
        return len(self.resources)

    def __contains__(self, key: object) -> bool:
        return key in self.resources

    def get(self, key: Key) -> Resource | None:
        return self.resources.get(key)

    def of_kind(self, kind: str) -> Iterator[Resource]:
        return (r for r in self.resources.values() if r.key.kind == kind)


@functools.cache
def document_model(kind: str) -> type[BaseModel]:
    """The pydantic model of a whole manifest document of one kind (used for schemas)."""
    from reconciler.models import KINDS

    spec_cls = KINDS[kind]
    return create_model(
        kind,
        __config__=ConfigDict(extra="forbid", title=kind),
        __doc__=spec_cls.__doc__,
        apiVersion=(Literal[API_VERSION], Field(description="Always reconciler/v1.")),  # type: ignore[valid-type]
        kind=(Literal[kind], Field(description="The kind of resource.")),  # type: ignore[valid-type]
        metadata=(Metadata, Field(description="Name, tenant and labels.")),
        spec=(spec_cls, Field(default_factory=spec_cls, description=spec_cls.__doc__)),
    )
