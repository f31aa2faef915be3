"""Which resource depends on which: the resource graph built from specs.

Edges point from a dependency to its dependent (create the network before the instance
on it). Sources of edges, each a named rule:

- `tenant`: every resource depends on its Tenant;
- `reference`: a spec field naming another resource (Instance.image, Router.networks...),
  except references declared without ordering (security groups naming each other);
- `dependsOn`: the user's explicit `metadata.dependsOn`.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import networkx as nx

from reconciler.models import KINDS, Desired, Key, Reference, Spec


def parse_depends_on(entry: str, tenant: str) -> Key | None:
    """`Kind/name` -> Key in `tenant`; None when malformed."""
    kind, sep, name = entry.partition("/")
    if not sep or kind not in KINDS or not name:
        return None
    if kind == "Tenant":
        return Key("Tenant", name, name)
    return Key(kind, tenant, name)


def dependencies_of(key: Key, spec: Spec, depends_on: Iterable[str] = ()) -> list[tuple[Key, str]]:
    """(dependency, rule) pairs of one resource, in a stable order."""
    deps: list[tuple[Key, str]] = []
    if key.kind != "Tenant":
        deps.append((Key("Tenant", key.tenant, key.tenant), "tenant"))
        if key.tenant == "":
            deps.pop()
    for ref in spec.references(key.tenant):
        if ref.ordering:
            deps.append((_ref_key(ref), "reference"))
    for entry in depends_on:
        dep = parse_depends_on(entry, key.tenant)
        if dep is not None:
            deps.append((dep, "dependsOn"))
    return deps


def _ref_key(ref: Reference) -> Key:
    return Key(ref.kind, ref.tenant, ref.name)


def spec_from_applied(kind: str, applied: Mapping[str, Any] | None) -> Spec | None:
    """Parse a last-applied spec (from an ownership mark); None when it no longer parses."""
    cls = KINDS.get(kind)
    if cls is None or applied is None:
        return None
    try:
        return cls.model_validate(dict(applied))
    except Exception:  # noqa: BLE001 - an old mark from another version: no edges known
        return None


def build_graph(desired: Desired) -> nx.DiGraph:
    """The resource graph of the desired state (nodes are Keys, edges carry `rule`).

    Dependencies that are not declared still get a node (attribute `missing=True`), so
    checks can report them and cycles through them are still found. Built once per
    Desired (kept in `desired.derived`); treat it as read-only.
    """
    cached = desired.derived.get("graph")
    if cached is not None and cached[0] == len(desired):
        return cached[1]
    graph = nx.DiGraph()
    for res in desired:
        graph.add_node(res.key)
    for res in desired:
        for dep, rule in dependencies_of(res.key, res.spec, res.metadata.dependsOn):
            if dep not in graph:
                graph.add_node(dep, missing=True)
            graph.add_edge(dep, res.key, rule=rule)
    desired.derived["graph"] = (len(desired), graph)
    return graph
