"""A Plan is data: an ordered list of Changes and the edges between them."""

from __future__ import annotations

import datetime as _dt
import enum
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

from reconciler.errors import Problem
from reconciler.models import Key
from reconciler.state import FieldDiff, Mark, Observed, Target

PLAN_FORMAT = 1


class Action(str, enum.Enum):
    """A closed set, as in Terraform."""

    NOOP = "noop"
    CREATE = "create"
    UPDATE = "update"
    REPLACE = "replace"
    DELETE = "delete"
    ORPHAN = "orphan"


class Disruption(str, enum.Enum):
    """How much a change disturbs what runs (ordered)."""

    NONE = "none"  # nothing running is disturbed
    RESTART = "restart"  # takes effect when the resource restarts (or restarts it)
    REPLACE = "replace"  # destroyed and created again
    DESTROY = "destroy"  # removed


@dataclass(frozen=True, slots=True)
class Change:
    """One resource's change: what, why, and how disruptive."""

    key: Key
    action: Action
    reason: str
    disruption: Disruption = Disruption.NONE
    diffs: tuple[FieldDiff, ...] = ()
    #: what to realise (create/update/replace); None for delete/orphan/noop
    target: Target | None = None
    #: the host objects now: the primary first, then duplicates to remove
    observed: tuple[Observed, ...] = ()
    notes: tuple[str, ...] = ()
    #: what this change destroys that cannot come back (data): shown in red
    warnings: tuple[str, ...] = ()
    create_before_destroy: bool = False
    #: manifest file and line, when the resource is in the manifests
    source: str | None = None

    @property
    def id(self) -> str:
        return str(self.key)

    @property
    def primary(self) -> Observed | None:
        return self.observed[0] if self.observed else None

    @property
    def duplicates(self) -> tuple[Observed, ...]:
        return self.observed[1:]

    def to_dict(self, redact: bool = True) -> dict[str, Any]:
        data: dict[str, Any] = {
            "kind": self.key.kind,
            "tenant": self.key.tenant,
            "name": self.key.name,
            "action": self.action.value,
            "reason": self.reason,
            "disruption": self.disruption.value,
            "diffs": [d.to_dict(redact) for d in self.diffs],
            "notes": list(self.notes),
            "warnings": list(self.warnings),
            "createBeforeDestroy": self.create_before_destroy,
            "source": self.source,
            "fingerprints": {o.identity: o.fingerprint() for o in self.observed},
        }
        if not redact:
            data["target"] = (
                None
                if self.target is None
                else {"spec": dict(self.target.spec), "mark": self.target.mark.to_dict(),
                      "references": [str(k) for k in self.target.references],
                      "derived": dict(self.target.derived)}
            )
            data["observed"] = [o.to_dict() for o in self.observed]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Change":
        key = Key(data["kind"], data["tenant"], data["name"])
        target = data.get("target")
        return cls(
            key=key,
            action=Action(data["action"]),
            reason=data["reason"],
            disruption=Disruption(data["disruption"]),
            diffs=tuple(FieldDiff.from_dict(d) for d in data.get("diffs", [])),
            target=None if target is None else Target(
                key, target["spec"], Mark.from_dict(target["mark"]),
                tuple(Key.parse(k) for k in target.get("references", [])),
                derived=target.get("derived", {}),
            ),
            observed=tuple(Observed.from_dict(o) for o in data.get("observed", [])),
            notes=tuple(data.get("notes", [])),
            warnings=tuple(data.get("warnings", [])),
            create_before_destroy=bool(data.get("createBeforeDestroy", False)),
            source=data.get("source"),
        )


@dataclass(slots=True)
class Plan:
    """Changes in execution order, with the ordering edges between their ids."""

    changes: list[Change] = field(default_factory=list)
    #: (before, after) pairs of change ids; only between changes that act
    edges: list[tuple[str, str]] = field(default_factory=list)
    #: problems found while planning (conflicts, refused shrinks): the plan cannot apply
    errors: list[Problem] = field(default_factory=list)
    #: resources not planned because their driver (or one they wait for) could not
    #: observe the host (a service down): key -> why. The rest of the plan applies.
    unknown: dict[Key, str] = field(default_factory=dict)
    destroy: bool = False
    created_at: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))

    def __iter__(self) -> Iterator[Change]:
        return iter(self.changes)

    @property
    def actionable(self) -> list[Change]:
        return [c for c in self.changes if c.action is not Action.NOOP]

    @property
    def has_changes(self) -> bool:
        return any(c.action is not Action.NOOP for c in self.changes)

    def counts(self) -> Counter[Action]:
        return Counter(c.action for c in self.changes)

    def summary(self) -> str:
        n = self.counts()
        parts = [
            f"{n[Action.CREATE]} to add",
            f"{n[Action.UPDATE]} to change",
            f"{n[Action.REPLACE]} to replace",
            f"{n[Action.DELETE]} to destroy",
        ]
        if n[Action.ORPHAN]:
            parts.append(f"{n[Action.ORPHAN]} to orphan (retained)")
        if self.unknown:
            parts.append(f"{len(self.unknown)} not planned (cannot observe)")
        return "Plan: " + ", ".join(parts) + "."

    def to_dict(self, redact: bool = True) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "createdAt": self.created_at,
            "destroy": self.destroy,
            "summary": {a.value: self.counts()[a] for a in Action},
            "errors": [str(p) for p in self.errors],
            "unknown": [{"kind": k.kind, "tenant": k.tenant, "name": k.name, "reason": why}
                        for k, why in sorted(self.unknown.items())],
            "changes": [c.to_dict(redact) for c in self.changes],
            "edges": [list(e) for e in self.edges],
        }

    def to_json(self, redact: bool = True) -> str:
        return json.dumps(self.to_dict(redact), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Plan":
        if data.get("format") != PLAN_FORMAT:
            raise ValueError(f"unsupported plan format {data.get('format')!r}")
        if data.get("errors"):
            raise ValueError("this plan has errors and cannot be applied")
        changes = [Change.from_dict(c) for c in data["changes"]]
        for c in changes:
            if c.action in (Action.CREATE, Action.UPDATE, Action.REPLACE) and c.target is None:
                raise ValueError(f"{c.key.display}: a saved plan must hold its targets (use plan --out)")
        return cls(
            changes=changes,
            edges=[(a, b) for a, b in data.get("edges", [])],
            destroy=bool(data.get("destroy", False)),
            created_at=data.get("createdAt", ""),
            unknown={Key(u["kind"], u["tenant"], u["name"]): u["reason"] for u in data.get("unknown", [])},
        )
