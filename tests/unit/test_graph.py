"""reconciler.graph (cycles, order, rendering) and reconciler.dependencies.build_graph."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import networkx as nx
import pytest

from reconciler.dependencies import build_graph, dependencies_of, parse_depends_on
from reconciler.graph import descendants, find_cycles, from_edges, to_dot, to_mermaid, topological_order
from reconciler.loader import load
from reconciler.models import Key

# --- find_cycles ------------------------------------------------------------------------

CYCLE_CASES = [
    # (id, nodes, edges, expected cycles)
    ("acyclic", "abcd", [("a", "b"), ("b", "c"), ("a", "c"), ("c", "d")], []),
    ("empty", "", [], []),
    ("self-loop", "ab", [("a", "a"), ("a", "b")], [["a"]]),
    ("two-cycle", "ab", [("a", "b"), ("b", "a")], [["a", "b"]]),
    ("three-cycle from its smallest node", "xyz", [("z", "x"), ("x", "y"), ("y", "z")], [["x", "y", "z"]]),
    (
        "two components and a self-loop",
        "abcdef",
        [("b", "a"), ("a", "b"), ("e", "d"), ("d", "e"), ("f", "f"), ("c", "d")],
        [["a", "b"], ["d", "e"], ["f"]],
    ),
    (
        "one component with two cycles gives one, the shortest through its start",
        "abcd",
        [("a", "b"), ("b", "c"), ("c", "d"), ("d", "a"), ("c", "a")],
        [["a", "b", "c"]],
    ),
    ("self-loop inside a larger component counts once", "ab", [("a", "b"), ("b", "a"), ("b", "b")], [["a", "b"]]),
]


@pytest.mark.parametrize(
    "nodes,edges,expected", [c[1:] for c in CYCLE_CASES], ids=[c[0] for c in CYCLE_CASES]
)
def test_find_cycles(nodes: str, edges: list, expected: list) -> None:
    graph = from_edges(list(nodes), edges)
    cycles = find_cycles(graph)
    assert cycles == expected
    for cycle in cycles:
        closed = cycle + [cycle[0]]
        for a, b in zip(closed, closed[1:]):
            assert graph.has_edge(a, b), (a, b)
    # one cycle per strongly connected component that has one
    components = [
        c for c in nx.strongly_connected_components(graph)
        if len(c) > 1 or any(graph.has_edge(n, n) for n in c)
    ]
    assert len(cycles) == len(components)


@pytest.mark.parametrize("nodes,edges,expected", [c[1:] for c in CYCLE_CASES], ids=[c[0] for c in CYCLE_CASES])
def test_find_cycles_is_deterministic(nodes: str, edges: list, expected: list) -> None:
    forward = find_cycles(from_edges(list(nodes), edges))
    backward = find_cycles(from_edges(list(reversed(nodes)), list(reversed(edges))))
    assert forward == backward == expected


def test_find_cycles_with_keys() -> None:
    a, b = Key("Network", "acme", "a"), Key("Network", "acme", "b")
    graph = from_edges([b, a], [(b, a), (a, b)])
    assert find_cycles(graph) == [[a, b]]


# --- topological_order ------------------------------------------------------------------

ORDER_CASES = [
    ("chain", "cba", [("c", "b"), ("b", "a")], ["c", "b", "a"]),
    ("ties broken by name", "dcba", [], ["a", "b", "c", "d"]),
    ("diamond", "abcd", [("d", "b"), ("d", "c"), ("b", "a"), ("c", "a")], ["d", "b", "c", "a"]),
    ("name order among ready nodes", "abcz", [("z", "a"), ("b", "c")], ["b", "c", "z", "a"]),
]


@pytest.mark.parametrize("nodes,edges,expected", [c[1:] for c in ORDER_CASES], ids=[c[0] for c in ORDER_CASES])
def test_topological_order(nodes: str, edges: list, expected: list) -> None:
    graph = from_edges(list(nodes), edges)
    order = topological_order(graph)
    assert order == expected
    assert sorted(order) == sorted(nodes)
    pos = {n: i for i, n in enumerate(order)}
    assert all(pos[a] < pos[b] for a, b in edges)


def test_topological_order_of_a_cycle_is_refused() -> None:
    with pytest.raises(nx.NetworkXUnfeasible):
        topological_order(from_edges("ab", [("a", "b"), ("b", "a")]))


def test_descendants() -> None:
    graph = from_edges("abcd", [("a", "b"), ("b", "c")])
    assert descendants(graph, "a") == {"b", "c"}
    assert descendants(graph, "d") == set()


# --- rendering --------------------------------------------------------------------------

RENDER_NODES = ['plain', 'say "hi"', 'back\\slash', "Network acme/web"]
RENDER_EDGES = [('plain', 'say "hi"'), ("Network acme/web", "plain"), ('say "hi"', "back\\slash")]


def _dot_ids(text: str) -> dict[str, str]:
    """label -> node id, unquoting dot strings."""
    out = {}
    for nid, quoted in re.findall(r'^\s+(n\d+) \[label="((?:[^"\\]|\\.)*)"\];$', text, re.M):
        out[re.sub(r"\\(.)", r"\1", quoted)] = nid
    return out


def test_to_dot_has_every_node_and_edge_escaped() -> None:
    graph = from_edges(RENDER_NODES, RENDER_EDGES)
    text = to_dot(graph, name="g")
    assert text.startswith("digraph g {\n") and text.endswith("}\n")
    ids = _dot_ids(text)
    assert set(ids) == set(RENDER_NODES)
    assert 'label="say \\"hi\\""' in text
    assert 'label="back\\\\slash"' in text
    edges = set(re.findall(r"^\s+(n\d+) -> (n\d+);$", text, re.M))
    assert edges == {(ids[a], ids[b]) for a, b in RENDER_EDGES}
    assert to_dot(from_edges(reversed(RENDER_NODES), reversed(RENDER_EDGES)), name="g") == text


def test_to_mermaid_has_every_node_and_edge_escaped() -> None:
    graph = from_edges(RENDER_NODES, RENDER_EDGES)
    text = to_mermaid(graph)
    assert text.startswith("flowchart LR\n")
    found = dict((label, nid) for nid, label in re.findall(r'^\s+(n\d+)\["([^"]*)"\]$', text, re.M))
    assert set(found) == {n.replace('"', "#quot;") for n in RENDER_NODES}
    assert "say #quot;hi#quot;" in found
    ids = {n: found[n.replace('"', "#quot;")] for n in RENDER_NODES}
    edges = set(re.findall(r"^\s+(n\d+) --> (n\d+)$", text, re.M))
    assert edges == {(ids[a], ids[b]) for a, b in RENDER_EDGES}
    assert to_mermaid(from_edges(reversed(RENDER_NODES), reversed(RENDER_EDGES))) == text


def test_rendering_uses_the_label_function() -> None:
    graph = from_edges([Key("Tenant", "acme", "acme"), Key("Network", "acme", "web")],
                       [(Key("Tenant", "acme", "acme"), Key("Network", "acme", "web"))])
    dot = to_dot(graph, label=lambda k: k.display)
    mermaid = to_mermaid(graph, label=lambda k: k.display)
    for text in (dot, mermaid):
        assert "Tenant acme" in text and "Network acme/web" in text
        assert "Network/acme/web" not in text


def test_rendering_an_empty_graph() -> None:
    assert to_dot(nx.DiGraph()) == "digraph reconciler {\n  rankdir=LR;\n  node [shape=box];\n}\n"
    assert to_mermaid(nx.DiGraph()) == "flowchart LR\n"


# --- build_graph ------------------------------------------------------------------------

CLOUD = """
apiVersion: reconciler/v1
kind: Tenant
metadata: {name: acme}
---
apiVersion: reconciler/v1
kind: Tenant
metadata: {name: infra}
---
apiVersion: reconciler/v1
kind: Network
metadata: {name: public, tenant: infra}
spec:
  type: flat
  external: true
  subnets: [{cidr: 192.0.2.0/24}]
---
apiVersion: reconciler/v1
kind: Network
metadata: {name: web, tenant: acme}
spec:
  subnets: [{cidr: 10.10.1.0/24}]
---
apiVersion: reconciler/v1
kind: Image
metadata: {name: tiny, tenant: acme}
spec: {source: /images/tiny.qcow2}
---
apiVersion: reconciler/v1
kind: Volume
metadata: {name: data, tenant: acme}
spec: {sizeGiB: 1}
---
apiVersion: reconciler/v1
kind: SecurityGroup
metadata: {name: web, tenant: acme}
spec:
  rules:
    - {protocol: tcp, ports: "5432", remote: db}
---
apiVersion: reconciler/v1
kind: SecurityGroup
metadata: {name: db, tenant: acme}
spec:
  rules:
    - {protocol: tcp, ports: "80", remote: web}
---
apiVersion: reconciler/v1
kind: Instance
metadata: {name: vm, tenant: acme}
spec:
  image: tiny
  networks: [{network: web, securityGroups: [web]}]
  volumes: [{volume: data}]
---
apiVersion: reconciler/v1
kind: Router
metadata: {name: edge, tenant: acme}
spec:
  networks: [web]
  external: infra/public
---
apiVersion: reconciler/v1
kind: Bucket
metadata:
  name: assets
  tenant: acme
  dependsOn: [Instance/vm, Tenant/infra]
"""


def K(text: str) -> Key:
    return Key.parse(text)


@pytest.fixture
def cloud_graph(write_manifests: Callable[..., Path]) -> nx.DiGraph:
    desired, problems = load([write_manifests(CLOUD)])
    assert problems == [], [str(p) for p in problems]
    return build_graph(desired)


EDGE_CASES = [
    # (dependency, dependent, rule)
    ("Tenant/acme/acme", "Network/acme/web", "tenant"),
    ("Tenant/acme/acme", "Image/acme/tiny", "tenant"),
    ("Tenant/acme/acme", "Volume/acme/data", "tenant"),
    ("Tenant/acme/acme", "SecurityGroup/acme/web", "tenant"),
    ("Tenant/acme/acme", "Instance/acme/vm", "tenant"),
    ("Tenant/acme/acme", "Router/acme/edge", "tenant"),
    ("Tenant/infra/infra", "Network/infra/public", "tenant"),
    ("Image/acme/tiny", "Instance/acme/vm", "reference"),
    ("Network/acme/web", "Instance/acme/vm", "reference"),
    ("SecurityGroup/acme/web", "Instance/acme/vm", "reference"),
    ("Volume/acme/data", "Instance/acme/vm", "reference"),
    ("Network/acme/web", "Router/acme/edge", "reference"),
    ("Network/infra/public", "Router/acme/edge", "reference"),
    ("Instance/acme/vm", "Bucket/acme/assets", "dependsOn"),
    ("Tenant/infra/infra", "Bucket/acme/assets", "dependsOn"),
]


@pytest.mark.parametrize("dep,dependent,rule", EDGE_CASES, ids=[f"{r}:{a}->{b}" for a, b, r in EDGE_CASES])
def test_build_graph_edges(cloud_graph: nx.DiGraph, dep: str, dependent: str, rule: str) -> None:
    assert cloud_graph.has_edge(K(dep), K(dependent))
    assert cloud_graph.edges[K(dep), K(dependent)]["rule"] == rule


def test_build_graph_has_no_other_edges(cloud_graph: nx.DiGraph) -> None:
    expected = {(K(a), K(b)) for a, b, _ in EDGE_CASES} | {
        (K("Tenant/acme/acme"), K("SecurityGroup/acme/db")),
        (K("Tenant/acme/acme"), K("Bucket/acme/assets")),
    }
    assert set(cloud_graph.edges) == expected
    assert all(isinstance(n, Key) for n in cloud_graph.nodes)
    assert not any(d.get("missing") for _, d in cloud_graph.nodes(data=True))


def test_security_groups_naming_each_other_make_no_cycle(cloud_graph: nx.DiGraph) -> None:
    web, db = K("SecurityGroup/acme/web"), K("SecurityGroup/acme/db")
    assert not cloud_graph.has_edge(web, db)
    assert not cloud_graph.has_edge(db, web)
    assert find_cycles(cloud_graph) == []
    order = topological_order(cloud_graph)
    assert set(order) == set(cloud_graph.nodes)


def test_security_group_reference_is_declared_without_ordering() -> None:
    from reconciler.models.security_group import SecurityGroupSpec

    spec = SecurityGroupSpec.model_validate({"rules": [{"remote": "other"}, {"remote": "10.0.0.0/8"}]})
    key = K("SecurityGroup/acme/self")
    assert [r.key for r in spec.references("acme")] == [K("SecurityGroup/acme/other")]
    assert [r.ordering for r in spec.references("acme")] == [False]
    assert dependencies_of(key, spec) == [(K("Tenant/acme/acme"), "tenant")]


MISSING = """
apiVersion: reconciler/v1
kind: Instance
metadata: {name: vm, tenant: ghost}
spec:
  image: nope
  networks: [{network: nowhere}]
"""


def test_missing_dependencies_are_nodes_marked_missing(write_manifests: Callable[..., Path]) -> None:
    desired, problems = load([write_manifests(MISSING)])
    assert problems  # the checks report the missing references
    assert K("Instance/ghost/vm") in desired
    graph = build_graph(desired)
    missing = {n for n, d in graph.nodes(data=True) if d.get("missing")}
    assert missing == {K("Tenant/ghost/ghost"), K("Image/ghost/nope"), K("Network/ghost/nowhere")}
    assert graph.nodes[K("Instance/ghost/vm")].get("missing") is None
    for dep in missing:
        assert graph.has_edge(dep, K("Instance/ghost/vm"))


DEPENDS_CYCLE = """
apiVersion: reconciler/v1
kind: Tenant
metadata: {name: acme}
---
apiVersion: reconciler/v1
kind: Network
metadata: {name: a, tenant: acme, dependsOn: [Network/b]}
spec: {subnets: [{cidr: 10.1.0.0/24}]}
---
apiVersion: reconciler/v1
kind: Network
metadata: {name: b, tenant: acme, dependsOn: [Network/a]}
spec: {subnets: [{cidr: 10.2.0.0/24}]}
---
apiVersion: reconciler/v1
kind: Network
metadata: {name: c, tenant: acme, dependsOn: [Network/c]}
spec: {subnets: [{cidr: 10.3.0.0/24}]}
"""


def test_depends_on_cycles_are_found(write_manifests: Callable[..., Path]) -> None:
    desired, problems = load([write_manifests(DEPENDS_CYCLE)], check=False)
    assert problems == []
    graph = build_graph(desired)
    assert graph.edges[K("Network/acme/b"), K("Network/acme/a")]["rule"] == "dependsOn"
    assert find_cycles(graph) == [
        [K("Network/acme/a"), K("Network/acme/b")],
        [K("Network/acme/c")],
    ]


@pytest.mark.parametrize(
    "entry,expected",
    [
        ("Network/web", Key("Network", "acme", "web")),
        ("Tenant/infra", Key("Tenant", "infra", "infra")),
        ("network/web", None),
        ("Network/", None),
        ("Network", None),
        ("Gadget/x", None),
    ],
)
def test_parse_depends_on(entry: str, expected: Key | None) -> None:
    assert parse_depends_on(entry, "acme") == expected


def test_malformed_depends_on_adds_no_edge() -> None:
    from reconciler.models.network import NetworkSpec

    key = K("Network/acme/a")
    deps = dependencies_of(key, NetworkSpec(), ["Gadget/x", "Network/b", "bad"])
    assert deps == [(K("Tenant/acme/acme"), "tenant"), (K("Network/acme/b"), "dependsOn")]


def test_tenant_has_no_tenant_edge() -> None:
    from reconciler.models.tenant import TenantSpec

    assert dependencies_of(K("Tenant/acme/acme"), TenantSpec()) == []
