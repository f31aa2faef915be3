"""plan(desired, observed, graph) -> Plan. Pure: no I/O, deterministic.

For every resource the planner decides one action:

- in the manifests, not on the host: create (or a conflict error when an object we do
  not own has its name);
- in both: the three-way merge gives the target; no difference is a noop; differences
  are an update, or a replace when any changed field forces one (disruption: none,
  restart, replace);
- on the host, not in the manifests: delete, or orphan when its last applied
  `deletionPolicy` is Retain (a Tenant is orphaned while retained objects remain);
- `destroy=True`: every resource of the manifests that is on the host is deleted or
  orphaned by its `deletionPolicy`; nothing else is touched.
- a kind whose driver could not observe the host (`unavailable`: a service down) is not
  planned: its resources are `unknown`, and so are the changes that could touch what
  they hold (what depends on them; the removal of kinds they may use). Everything else
  is planned as usual.

Ordering edges between changes (data in the plan, so a saved plan keeps them):
creates and updates after the creates and updates of what they reference now; deletes
(and replaces) after the changes (deletes) of everything that referenced them when
last applied.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any, Iterable, Mapping

import networkx as nx

from reconciler.dependencies import build_graph, dependencies_of, spec_from_applied
from reconciler.errors import Problem, format_path
from reconciler.graph import order
from reconciler.models import KINDS, Desired, Key, Resource, UpdatePolicy
from reconciler.planner._alloc import allocate, used_ids
from reconciler.planner._diff import diff, merge
from reconciler.planner._plan import Action, Change, Disruption, Plan
from reconciler.planner._ports import Ports, derived_diffs
from reconciler.state import FieldDiff, Mark, Observation, Observed, Target, Unowned

_ACTS = (Action.CREATE, Action.UPDATE, Action.REPLACE)
_GONE = (Action.DELETE,)


def plan(
    desired: Desired,
    observation: Observation,
    graph: nx.DiGraph | None = None,
    *,
    conflicts: Mapping[Key, Unowned] | None = None,
    destroy: bool = False,
    defaults: Mapping[str, Mapping[str, Any]] | None = None,
    unavailable: Mapping[str, str] | None = None,
) -> Plan:
    """The changes that make the host match `desired` (or, with `destroy`, remove it).

    `defaults`: per kind, the host's values for fields a manifest leaves to the host
    (e.g. a volume's backend), filled in when an object is created. `unavailable`: kind
    -> why its driver could not observe (those resources are not planned)."""
    graph = build_graph(desired) if graph is None else graph
    conflicts = conflicts or {}
    unavailable = unavailable or {}
    unknown: dict[Key, str] = {}
    owned = _group(observation.owned, desired)
    errors: list[Problem] = []
    changes: dict[Key, Change] = {}
    allocator = _Allocator(desired, observation.owned, defaults or {})
    ports = Ports(desired, {key: found[0] for key, found in owned.items()})
    running = _running_attachments(owned)
    if not destroy:
        errors.extend(ports.problems)

    for key in sorted(desired.resources):
        res = desired.resources[key]
        if key.kind in unavailable:
            unknown[key] = unavailable[key.kind]
            continue
        found = owned.get(key, [])
        if destroy:
            if found:
                changes[key] = _removal(key, found, res.spec_full.get("deletionPolicy"), "destroy requested", res)
            continue
        if not found:
            if key in conflicts:
                errors.append(_conflict_problem(res, conflicts[key]))
                continue
            changes[key] = _create(res, allocator, ports, desired)
        else:
            change = _update(res, found, graph, errors, allocator, ports, desired, running)
            changes[key] = change

    if not destroy:
        for key in sorted(owned.keys() - desired.resources.keys()):
            found = owned[key]
            policy = found[0].mark.applied.get("deletionPolicy")
            changes[key] = _removal(key, found, policy, "removed from the manifests", None)

    _retain_tenants(changes, owned)
    if unavailable:
        _hold_unobservable(changes, unknown, graph, unavailable)
    edges = _edges(changes, graph)
    return Plan(changes=_ordered(changes, edges), edges=edges, errors=errors, destroy=destroy, unknown=unknown)


#: the kinds each kind can name in its spec (the `reference` rule), besides its Tenant
USES: Mapping[str, frozenset[str]] = {
    "Instance": frozenset({"Image", "Network", "SecurityGroup", "Volume"}),
    "Router": frozenset({"Network"}),
    "SecurityGroup": frozenset({"SecurityGroup"}),
}


def _hold_unobservable(changes: dict[Key, Change], unknown: dict[Key, str], graph: nx.DiGraph,
                       unavailable: Mapping[str, str]) -> None:
    """Move to `unknown` the changes that could touch what an unobservable driver holds:
    creates and updates of what depends on an unknown resource, and removals and
    replacements of kinds an object we cannot see may use (a guest we cannot see may
    still be on the bridge a delete would remove)."""
    down = set(unknown)
    for key, change in sorted(changes.items()):
        if change.action is Action.NOOP:
            continue
        why = None
        if change.action in (Action.DELETE, Action.REPLACE):
            users = sorted(k for k in unavailable if key.kind in USES.get(k, frozenset()) | {"Tenant"})
            if users:
                why = (f"not {change.action.value}d now: a {users[0]} we cannot see may still use it "
                       f"({unavailable[users[0]]})")
        if why is None and key in graph:
            waits = sorted(down & nx.ancestors(graph, key))
            if waits:
                why = f"waits for {waits[0].display}: {unknown[waits[0]]}"
        if why is not None:
            unknown[key] = why
            del changes[key]


# --- per resource ---------------------------------------------------------------------


def _group(owned: Iterable[Observed], desired: Desired) -> dict[Key, list[Observed]]:
    """Owned objects by key; the primary (matching the manifest's hash) first."""
    groups: dict[Key, list[Observed]] = defaultdict(list)
    for obs in owned:
        groups[obs.key].append(obs)
    for key, found in groups.items():
        res = desired.get(key)
        want = res.spec_hash if res is not None else None
        found.sort(key=lambda o: (o.mark.spec_hash != want, o.mark.orphaned, o.identity))
    return groups


def _mark(res: Resource) -> Mark:
    return Mark(res.key, res.spec_hash, res.spec_set, depends_on=tuple(res.metadata.dependsOn))


def _target(res: Resource, spec: Mapping[str, Any], derived: Mapping[str, Any]) -> Target:
    references = tuple(dict.fromkeys(Key(r.kind, r.tenant, r.name) for r in res.spec.references(res.key.tenant)))
    return Target(res.key, spec, _mark(res), references, derived=derived)


def _create(res: Resource, allocator: "_Allocator", ports: Ports, desired: Desired) -> Change:
    spec = allocator.fill(res)
    if res.key.kind == "Instance":
        spec = ports.instance_spec(res, spec)
    return Change(
        key=res.key,
        action=Action.CREATE,
        reason="not on the host",
        target=_target(res, spec, _derived(res, ports, desired)),
        create_before_destroy=KINDS[res.key.kind].create_before_destroy,
        source=f"{res.source.file}:{res.source.line}",
    )


def _update(res: Resource, found: list[Observed], graph: nx.DiGraph, errors: list[Problem],
            allocator: "_Allocator", ports: Ports, desired: Desired,
            running: Mapping[Key, list[Key]]) -> Change:
    model = KINDS[res.key.kind]
    primary = found[0]
    applied = primary.mark.applied
    if res.spec_full == primary.spec:  # the common case: nothing to merge
        target = dict(res.spec_full)
    else:
        target = merge(model, res.spec_full, res.spec_set, applied, primary.spec)
    if res.key.kind == "Instance":
        target = ports.instance_spec(res, target)
    diffs = [] if target == dict(primary.spec) else diff(model, target, primary.spec, res.spec_set, applied)
    if res.key.kind == "Instance":
        diffs = [_allocated(d, res) for d in diffs]
    derived = _derived(res, ports, desired)
    if derived != dict(primary.derived):
        diffs += [FieldDiff(path, old, new, UpdatePolicy.IN_PLACE, cause="derived")
                  for path, old, new in derived_diffs(derived, primary.derived)
                  # a volume attached or detached: its volumes[] diff says it already
                  if not (path[0] == "volumeGiB" and (old is None or new is None))]
    if res.key.kind == "Network" and target.get("type") != primary.spec.get("type"):
        target = allocator.retype(res, target)  # replaced: the old type's host ids do not carry over
    source = f"{res.source.file}:{res.source.line}"
    for d in diffs:
        if isinstance(d.new, int | float) and isinstance(d.old, int | float) and d.new < d.old:
            meta_shrink = _shrink_of(model, d.path)
            if meta_shrink == "error":
                path = ("spec",) + d.path
                errors.append(
                    Problem(res.source.file, res.line_of(path),
                            f"cannot shrink from {d.old} to {d.new}: a {res.key.kind.lower()} only grows; "
                            f"keep {d.old} or more", res.key.display, format_path(path))
                )
    common = dict(key=res.key, observed=tuple(found), source=source,
                  create_before_destroy=model.create_before_destroy)
    if not diffs and primary.drift:
        return Change(action=Action.UPDATE, reason=_reason([], primary.drift),
                      target=_target(res, target, derived), **common)
    if not diffs:
        if primary.mark.orphaned:
            return Change(action=Action.UPDATE, reason="back in the manifests (was orphaned): adopted again",
                          target=_target(res, target, derived), **common)
        if len(found) > 1:
            return Change(action=Action.UPDATE, reason=f"{len(found) - 1} duplicate host object(s) to remove",
                          target=_target(res, target, derived), **common)
        return Change(action=Action.NOOP, reason="up to date", **common)
    notes: list[str] = []
    diffs = _live(diffs, primary, notes)
    if res.key.kind == "Volume":
        notes.extend(_grown_live(diffs, running.get(res.key, [])))
    replace = [d for d in diffs if d.policy is UpdatePolicy.REPLACE]
    restart = [d for d in diffs if d.policy is UpdatePolicy.RESTART]
    reason = _reason(diffs, primary.drift)
    if primary.mark.orphaned:
        reason = f"back in the manifests (was orphaned): adopted again; {reason}"
    if replace:
        fields = ", ".join(format_path(d.path) for d in replace)
        notes.extend(_replace_notes(res.key, graph, model.create_before_destroy))
        warnings: tuple[str, ...] = ()
        if model.stateful:
            kind = res.key.kind.lower()
            if target.get("deletionPolicy") != "Delete":
                path = ("spec",) + replace[0].path
                errors.append(Problem(
                    res.source.file, res.line_of(path),
                    f"changing {fields} would replace this {kind} and destroy its data, which "
                    "deletionPolicy Retain refuses: keep the old value, or create a new "
                    f"{kind} and copy the data (or set deletionPolicy: Delete to allow it)",
                    res.key.display, format_path(path)))
            warnings = (f"replacing destroys the data of {res.key.display}: the new {kind} starts empty",)
        return Change(action=Action.REPLACE, reason=f"{fields} forces replacement; {reason}",
                      disruption=Disruption.REPLACE, diffs=tuple(diffs),
                      target=_target(res, target, derived), notes=tuple(notes), warnings=warnings,
                      **common)
    disruption = Disruption.NONE
    if restart:
        disruption = Disruption.RESTART
        fields = ", ".join(format_path(d.path) for d in restart)
        if res.key.kind == "Instance" and target.get("restartPolicy") == "Allowed":
            notes.append(f"{fields}: the instance restarts during apply (restartPolicy: Allowed)")
        else:
            notes.append(f"{fields}: takes effect at the next restart")
    if len(found) > 1:
        notes.append(f"{len(found) - 1} duplicate host object(s) removed")
    return Change(action=Action.UPDATE, reason=reason, disruption=disruption, diffs=tuple(diffs),
                  target=_target(res, target, derived), notes=tuple(notes), **common)


def _live(diffs: list[FieldDiff], primary: Observed, notes: list[str]) -> list[FieldDiff]:
    """Restart-class diffs the host can apply without a restart become in-place ones.

    The driver says what it can change live (`Observed.live`: field -> highest value);
    and a stopped object has nothing to restart: its changes apply when it starts."""
    stopped = primary.spec.get("powerState") == "stopped"
    out = []
    for d in diffs:
        if d.policy is UpdatePolicy.RESTART and len(d.path) == 1:
            limit = primary.live.get(str(d.path[0]))
            if stopped:
                d = dataclasses.replace(d, policy=UpdatePolicy.IN_PLACE)
            elif limit is not None and isinstance(d.new, int) and d.new <= limit:
                d = dataclasses.replace(d, policy=UpdatePolicy.IN_PLACE)
                notes.append(f"{d.path[0]}: applied live, without a restart")
        out.append(d)
    return out


def _derived(res: Resource, ports: Ports, desired: Desired) -> dict[str, Any]:
    """Host facts of `res` that follow from other resources: a network's ports, a group's
    members, a router's address (see Ports) and the sizes of an instance's volumes (a
    volume that grows while attached to a running instance is grown in the guest too)."""
    out = ports.derived(res)
    if res.key.kind == "Instance":
        sizes = {}
        for att in res.spec.volumes:  # type: ignore[attr-defined]
            vol = desired.get(Key("Volume", res.key.tenant, att.volume))
            if vol is not None:
                sizes[att.volume] = vol.spec_full["sizeGiB"]
        if sizes:
            out["volumeGiB"] = sizes
    return out


def _running_attachments(owned: Mapping[Key, list[Observed]]) -> dict[Key, list[Key]]:
    """Volume -> the running instances it is attached to now, as the host says."""
    out: dict[Key, list[Key]] = defaultdict(list)
    for key, found in owned.items():
        if key.kind != "Instance" or found[0].spec.get("powerState") != "running":
            continue
        for att in found[0].spec.get("volumes") or []:
            if isinstance(att, dict) and isinstance(att.get("volume"), str):
                out[Key("Volume", key.tenant, att["volume"])].append(key)
    return out


def _grown_live(diffs: list[FieldDiff], instances: list[Key]) -> list[str]:
    grow = [d for d in diffs if d.path == ("sizeGiB",) and isinstance(d.new, int)
            and isinstance(d.old, int) and d.new > d.old]
    if not grow or not instances:
        return []
    names = ", ".join(k.display for k in sorted(instances))
    return [f"sizeGiB: grown live while attached to running {names}: the guest sees "
            f"{grow[0].new} GiB at once (blockResize), without a restart"]


def _allocated(d: FieldDiff, res: Resource) -> FieldDiff:
    """A NIC address the manifest does not fix changes because of other resources (its
    subnet changed, or another instance now fixes it): not the user's edit, nor drift."""
    if len(d.path) == 3 and d.path[0] == "networks" and d.path[2] == "ip" and isinstance(d.path[1], int):
        written = res.spec_set.get("networks") or []
        i = d.path[1]
        if not (i < len(written) and written[i].get("ip")):
            return dataclasses.replace(d, cause="derived")
    return d


def _shrink_of(model: type, path: tuple[str | int, ...]) -> str | None:
    from reconciler.planner._diff import field_table

    current = model
    meta = None
    for part in path:
        if isinstance(part, int):
            continue
        meta = field_table(current).get(part)
        if meta is None:
            return None
        current = meta.nested  # type: ignore[assignment]
    return meta.shrink if meta else None


def _reason(diffs: list[FieldDiff], host_drift: Iterable[str] = ()) -> str:
    drift = [format_path(d.path) for d in diffs if d.cause == "drift"] + list(host_drift)
    intent = [format_path(d.path) for d in diffs if d.cause == "manifest"]
    derived = [format_path(d.path) for d in diffs if d.cause == "derived"]
    parts = []
    if intent:
        parts.append("manifest changed: " + ", ".join(intent))
    if derived:
        parts.append("other resources changed: " + ", ".join(derived))
    if drift:
        parts.append("drift on the host: " + ", ".join(drift))
    return "; ".join(parts)


def _replace_notes(key: Key, graph: nx.DiGraph, cbd: bool) -> list[str]:
    notes = []
    if not cbd:
        notes.append("the old object is destroyed before the new one is created")
    if key in graph:
        dependents = sorted(k for k in graph.successors(key) if isinstance(k, Key))
        instances = [k.display for k in dependents if k.kind == "Instance"]
        if key.kind == "Network" and instances:
            notes.append("every instance on it loses its address meanwhile: " + ", ".join(instances))
        elif dependents:
            notes.append("depends on it: " + ", ".join(k.display for k in dependents))
    return notes


def _removal(key: Key, found: list[Observed], policy: object, why: str, res: Resource | None) -> Change:
    stateful = KINDS[key.kind].stateful if key.kind in KINDS else False
    source = f"{res.source.file}:{res.source.line}" if res else None
    if stateful and policy != "Delete":
        if all(o.mark.orphaned for o in found):
            return Change(key=key, action=Action.NOOP, reason="orphaned: retained with its data",
                          observed=tuple(found), source=source)
        return Change(key=key, action=Action.ORPHAN,
                      reason=f"{why}; deletionPolicy Retain keeps it and its data",
                      observed=tuple(found), source=source)
    notes: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    purge = key.kind == "Bucket" and bool(found[0].spec.get("purgeOnDelete"))
    if purge:
        notes = ("purgeOnDelete: its objects are deleted first",)
    if stateful:
        held = [o.host.get("data") for o in found if o.host.get("data") not in (None, "", "empty")]
        if held and key.kind == "Bucket" and not purge:
            warnings = (f"holds {held[0]} and purgeOnDelete is false: the store deletes only empty "
                        "buckets, so this delete will fail (set purgeOnDelete: true, or empty it first)",)
        elif held:
            warnings = (f"holds data ({held[0]}): deleting destroys it for good "
                        "(deletionPolicy: Delete)",)
    return Change(key=key, action=Action.DELETE, reason=why, disruption=Disruption.DESTROY,
                  observed=tuple(found), notes=notes, warnings=warnings, source=source)


def _retain_tenants(changes: dict[Key, Change], owned: Mapping[Key, list[Observed]]) -> None:
    """A tenant is not deleted while retained objects of it stay on the host."""
    staying: dict[str, list[Key]] = defaultdict(list)
    for key in owned:
        change = changes.get(key)
        if key.kind != "Tenant" and (change is None or change.action is not Action.DELETE):
            staying[key.tenant].append(key)
    for key, change in list(changes.items()):
        if key.kind == "Tenant" and change.action is Action.DELETE and staying.get(key.tenant):
            kept = ", ".join(k.display for k in sorted(staying[key.tenant])[:5])
            if all(o.mark.orphaned for o in change.observed):  # already orphaned: nothing to do
                changes[key] = Change(key=key, action=Action.NOOP, observed=change.observed, source=change.source,
                                      reason=f"orphaned: kept while retained objects remain: {kept}")
                continue
            changes[key] = Change(key=key, action=Action.ORPHAN, observed=change.observed, source=change.source,
                                  reason=f"{change.reason}; kept while retained objects remain: {kept}")


def _conflict_problem(res: Resource, unowned: Unowned) -> Problem:
    detail = f" ({unowned.detail})" if unowned.detail else ""
    kind = res.key.kind.lower()
    return Problem(
        res.source.file, res.line_of(("metadata", "name")),
        f"conflict: {'an' if kind[0] in 'aeiou' else 'a'} {kind} host object without our ownership mark is "
        f"in the way of {unowned.host_name!r}{detail}; it is left untouched. Remove or rename it on the "
        "host, or rename the resource in the manifest",
        res.key.display, "metadata.name",
    )


class _Allocator:
    """Fills host-wide ids (VNI, VLAN id) that manifests omit, stably and uniquely."""

    def __init__(self, desired: Desired, owned: list[Observed], defaults: Mapping[str, Mapping[str, Any]]):
        nets = [o.spec for o in owned if o.key.kind == "Network"]
        nets += [r.spec_full for r in desired.of_kind("Network")]
        self.used = {f: used_ids(nets, f) for f in ("vni", "vlanId")}
        self.defaults = defaults

    def fill(self, res: Resource) -> dict:
        spec = dict(res.spec_full)
        if res.key.kind == "Network":
            self._segment_id(res.key, spec)
        for name, value in self.defaults.get(res.key.kind, {}).items():
            if spec.get(name) is None:
                spec[name] = value
        return spec

    def _segment_id(self, key: Key, spec: dict) -> None:
        """Allocate the id the network's type needs, when the spec has none."""
        field = {"vxlan": "vni", "vlan": "vlanId"}.get(spec.get("type", ""))
        if field and spec.get(field) is None:
            spec[field] = allocate(key, field, self.used[field])

    def retype(self, res: Resource, target: dict) -> dict:
        """A network changing type: host-chosen ids and MTU of the old type go; new ids are allocated."""
        spec = dict(target)
        for name in ("vni", "vlanId", "mtu"):
            if name not in res.spec_set:
                spec[name] = None
        self._segment_id(res.key, spec)
        return spec


# --- ordering ---------------------------------------------------------------------------


def _edges(changes: Mapping[Key, Change], graph: nx.DiGraph) -> list[tuple[str, str]]:
    edges: set[tuple[str, str]] = set()
    acting = {k: c for k, c in changes.items() if c.action is not Action.NOOP}
    ids = {k: str(k) for k in acting}
    for key, change in acting.items():
        if change.action in _ACTS and key in graph:
            for dep in graph.predecessors(key):
                other = acting.get(dep)
                if other is not None and other.action in _ACTS:
                    edges.add((ids[dep], ids[key]))
        primary = change.primary
        if primary is None:
            continue
        old = spec_from_applied(key.kind, primary.mark.applied)
        if old is None:
            continue
        for dep, _rule in dependencies_of(key, old, primary.mark.depends_on):
            other = acting.get(dep)
            if other is None or other is change:
                continue
            if other.action is Action.DELETE:
                edges.add((ids[key], ids[dep]))
            elif change.action is Action.DELETE and other.action is Action.REPLACE:
                # what goes away stops using the old object before that one is destroyed
                edges.add((ids[key], ids[dep]))
    return sorted(edges)


def _ordered(changes: Mapping[Key, Change], edges: list[tuple[str, str]]) -> list[Change]:
    """Acting changes in a topological order of the edges (ties by id), then the noops."""
    by_id = {c.id: c for c in changes.values()}
    acting = [i for i, c in by_id.items() if c.action is not Action.NOOP]
    noops = sorted(i for i, c in by_id.items() if c.action is Action.NOOP)
    return [by_id[i] for i in order(acting, edges)] + [by_id[i] for i in noops]
