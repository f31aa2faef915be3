"""What drivers observe and are asked to realise: marks, observed objects, targets, diffs.

Plain data shared by the planner, the executor and the drivers. The host is the
observed state: every object we create carries a :class:`Mark` (its key, the hash and
content of the last applied spec, and whether it is orphaned), and observation reads
the marks back. There is no state file.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Mapping

from reconciler.models import Key, UpdatePolicy
from reconciler.models._resource import canonical_json

SENSITIVE = "(sensitive)"


@dataclass(frozen=True, slots=True)
class Mark:
    """The ownership mark on a host object."""

    key: Key
    spec_hash: str
    applied: Mapping[str, Any]  # the fields the user had set when it was last applied
    orphaned: bool = False
    #: metadata.dependsOn when last applied, so deletes honour it in reverse
    depends_on: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.key.kind,
            "tenant": self.key.tenant,
            "name": self.key.name,
            "specHash": self.spec_hash,
            "applied": dict(self.applied),
            "orphaned": self.orphaned,
            "dependsOn": list(self.depends_on),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Mark":
        return cls(
            key=Key(data["kind"], data["tenant"], data["name"]),
            spec_hash=data["specHash"],
            applied=dict(data.get("applied") or {}),
            orphaned=bool(data.get("orphaned", False)),
            depends_on=tuple(data.get("dependsOn") or ()),
        )


@dataclass(frozen=True, slots=True)
class Observed:
    """One host object carrying our mark, as a driver read it."""

    key: Key
    identity: str  # unique id of the host object (domain UUID, bridge name, file path...)
    spec: Mapping[str, Any]  # the live spec, in manifest terms
    mark: Mark
    host: Mapping[str, str] = field(default_factory=dict)  # for status: {"bridge": "rc-1a2b"}
    #: fields that can change without a restart, up to this value (e.g. memory up to the
    #: running domain's maximum): the planner classes such a change as in place
    live: Mapping[str, int] = field(default_factory=dict)
    #: host facts derived from other resources, as found (see :attr:`Target.derived`)
    derived: Mapping[str, Any] = field(default_factory=dict)
    #: what the driver found broken on the host that the spec cannot express (a missing
    #: bridge, a dead dnsmasq, a deleted rule): the next apply repairs it
    drift: tuple[str, ...] = ()

    def fingerprint(self) -> str:
        """Changes whenever the object, its live spec or its mark changes."""
        text = canonical_json([self.identity, self.spec, self.mark.to_dict(), self.derived,
                               list(self.drift)])
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": str(self.key),
            "identity": self.identity,
            "spec": dict(self.spec),
            "mark": self.mark.to_dict(),
            "host": dict(self.host),
            "live": dict(self.live),
            "derived": dict(self.derived),
            "drift": list(self.drift),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Observed":
        return cls(
            key=Key.parse(data["key"]),
            identity=data["identity"],
            spec=data["spec"],
            mark=Mark.from_dict(data["mark"]),
            host=data.get("host", {}),
            live=data.get("live", {}),
            derived=data.get("derived", {}),
            drift=tuple(data.get("drift", ())),
        )


@dataclass(frozen=True, slots=True)
class Proposal:
    """One planned change as a driver sees it when admitting a plan (no planner types)."""

    key: Key
    action: str  # "create", "update", "replace", "delete", "orphan"
    spec: Mapping[str, Any] | None  # the target spec (None for delete/orphan)
    observed: Observed | None  # the host object now (None for create)


@dataclass(frozen=True, slots=True)
class Unowned:
    """A host object without our mark: never modified or deleted, only reported."""

    kind: str
    host_name: str
    detail: str = ""


@dataclass(slots=True)
class Observation:
    """One bulk read of the host by one or more drivers."""

    owned: list[Observed] = field(default_factory=list)
    unowned: list[Unowned] = field(default_factory=list)

    def extend(self, other: "Observation") -> None:
        self.owned.extend(other.owned)
        self.unowned.extend(other.unowned)


@dataclass(frozen=True, slots=True)
class Target:
    """What a driver is asked to realise: the whole spec and the mark to write."""

    key: Key
    spec: Mapping[str, Any]
    mark: Mark
    #: the resources this one references (its image, networks, volumes), from the plan
    references: tuple[Key, ...] = ()
    #: what the host has for those (a network's bridge, a volume's device path), filled
    #: in by the executor at apply time
    related: Mapping[Key, Observed] = field(default_factory=dict, compare=False)
    #: host facts the planner derives from other resources: a network's ports (every
    #: instance NIC on it: MAC, address, tap, security groups), a security group's
    #: remote groups resolved to member addresses, a router's external address
    derived: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class FieldDiff:
    """One changed field: path in the spec, old and new values, and how it applies."""

    path: tuple[str | int, ...]
    old: Any
    new: Any
    policy: UpdatePolicy
    cause: str = "manifest"  # "manifest": the user changed it; "drift": the host did
    sensitive: bool = False

    def to_dict(self, redact: bool = True) -> dict[str, Any]:
        hide = redact and self.sensitive
        return {
            "path": list(self.path),
            "old": SENSITIVE if hide and self.old is not None else self.old,
            "new": SENSITIVE if hide and self.new is not None else self.new,
            "policy": self.policy.value,
            "cause": self.cause,
            "sensitive": self.sensitive,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "FieldDiff":
        return cls(
            path=tuple(data["path"]),
            old=data["old"],
            new=data["new"],
            policy=UpdatePolicy(data["policy"]),
            cause=data.get("cause", "manifest"),
            sensitive=bool(data.get("sensitive", False)),
        )


@dataclass(frozen=True, slots=True)
class HostEvent:
    """Something changed on the host (a domain stopped, a link went away), as a driver's
    watcher saw it: the daemon only marks resources dirty from it (level-based), it never
    acts on the event itself."""

    driver: str  # the driver's name: "libvirt", "netlink"
    #: the host object's name as the driver names it (a domain name, an interface name);
    #: the daemon maps it to resources through the last observation
    subject: str
    what: str  # for logs and status events: "domain stopped", "link deleted"
