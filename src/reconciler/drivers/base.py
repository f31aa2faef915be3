"""The Driver protocol every driver follows."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

from reconciler.models import Key
from reconciler.state import FieldDiff, HostEvent, Observation, Observed, Proposal, Target


@runtime_checkable
class Driver(Protocol):
    """Realises some kinds on a host.

    - `observe` is one bulk read of every object of its kinds: those with our mark, and
      unmarked ones (reported as conflicts when in the way, never touched).
    - `create`, `update`, `delete`, `orphan` act on one object and return what is there
      afterwards. Errors are raised as :class:`~reconciler.errors.TransientError` or
      :class:`~reconciler.errors.PermanentError`, translated from the driver's library.
    """

    name: str
    kinds: tuple[str, ...]
    #: how many changes of this driver may run at once
    max_parallel: int

    def observe(self) -> Observation: ...

    def host_name(self, key: Key) -> str:
        """The name the host object for `key` has (to find unmarked objects in the way)."""
        ...

    def create(self, target: Target) -> Observed: ...

    def update(self, target: Target, observed: Observed, diffs: Sequence[FieldDiff]) -> Observed: ...

    def delete(self, observed: Observed) -> None: ...

    def orphan(self, observed: Observed) -> Observed:
        """Keep the object and its data, flag its mark as orphaned."""
        ...


@runtime_checkable
class Adopting(Protocol):
    """A driver that can adopt an object without our mark (``reconciler import``)."""

    def adopt(self, host_name: str, target: Target) -> Observed:
        """Put `target`'s mark on the unmarked object `host_name`; change nothing else."""
        ...


@runtime_checkable
class Describing(Protocol):
    """A driver with facts worth showing in ``reconciler status`` (e.g. its domain type)."""

    def describe(self) -> dict[str, str]: ...


@runtime_checkable
class Validating(Protocol):
    """A driver that knows what this host cannot realise, so `plan` says so up front
    (e.g. a vlan network on a kernel without 8021q) instead of failing at apply time."""

    def problems(self, kind: str, tenant: str, name: str, spec: Mapping[str, Any]
                 ) -> list[tuple[tuple[str | int, ...], str]]:
        """(path in the spec, message) for each thing about this resource the host cannot do."""
        ...


@runtime_checkable
class Defaulting(Protocol):
    """A driver that fills fields a manifest leaves to the host (`x-host-default`), so a
    plan shows what will be created (e.g. a volume's backend: the host's default)."""

    def defaults(self, kind: str) -> dict[str, Any]: ...


@runtime_checkable
class Admitting(Protocol):
    """A driver that checks a whole plan against what the host has room for (capacity
    admission), before any change: e.g. volumes that would not fit in their volume group."""

    def admit(self, proposals: Sequence[Proposal]) -> list[tuple[Key, tuple[str | int, ...], str]]:
        """(resource, path in its spec, message) for each change the host cannot take."""
        ...


@runtime_checkable
class Attachable(Protocol):
    """A driver of things instances attach (volumes) that knows when this host cannot
    attach one (e.g. LVM volumes on a kernel without device-mapper)."""

    def attach_problem(self, kind: str, tenant: str, name: str, spec: Mapping[str, Any]) -> str | None: ...


@runtime_checkable
class Laned(Protocol):
    """A driver whose changes to one host object group must not overlap (e.g. one lvm2
    writer per volume group): the executor runs changes of the same lane one at a time."""

    def lane(self, key: Key, spec: Mapping[str, Any] | None, observed: Observed | None) -> str | None: ...


class Watch(Protocol):
    """A running watcher: `close()` stops it (idempotent) and returns once it stopped."""

    def close(self) -> None: ...


@runtime_checkable
class Watching(Protocol):
    """A driver that reports host changes as they happen (libvirt lifecycle events,
    netlink notifications), so the daemon heals drift without polling."""

    def watch(self, notify: Callable[[HostEvent], None]) -> Watch:
        """Start watching in a background (daemon) thread; call `notify` for each change
        to a host object that is or may be ours (from that thread). Reconnects by itself
        when the service goes away and comes back; never raises from the thread."""
        ...
