"""A generic dependency graph: nodes are hashable, an edge a -> b means "a before b".

Knows nothing about resources (see :mod:`reconciler.dependencies` for that): cycles,
ordering, and rendering as Graphviz dot or Mermaid.
"""

from __future__ import annotations

import heapq
from typing import Callable, Hashable, Iterable

import networkx as nx


def find_cycles(graph: nx.DiGraph) -> list[list[Hashable]]:
    """One cycle per strongly connected component that has one, each a list of nodes.

    Deterministic: components and cycles start at their smallest node.
    """
    cycles: list[list[Hashable]] = []
    for component in nx.strongly_connected_components(graph):
        if len(component) == 1:
            (node,) = component
            if graph.has_edge(node, node):
                cycles.append([node])
            continue
        start = min(component, key=str)
        sub = graph.subgraph(component)
        cycle = _cycle_through(sub, start)
        cycles.append(cycle)
    cycles.sort(key=lambda c: str(c[0]))
    return cycles


def _cycle_through(graph: nx.DiGraph, start: Hashable) -> list[Hashable]:
    """Shortest cycle through `start` inside a strongly connected graph."""
    best: list[Hashable] | None = None
    for pred in sorted(graph.predecessors(start), key=str):
        path = nx.shortest_path(graph, start, pred)
        if best is None or len(path) < len(best):
            best = path
    assert best is not None
    return best


def topological_order(graph: nx.DiGraph) -> list[Hashable]:
    """Nodes in an order where every edge points forward; ties broken by name."""
    return list(nx.lexicographical_topological_sort(graph, key=str))


def order(nodes: Iterable[str], edges: Iterable[tuple[str, str]]) -> list[str]:
    """Kahn's algorithm over string nodes: every edge points forward, ties by name.

    The same result as `topological_order` on the graph they make, without building one
    (the planner orders tens of thousands of changes). Raises ValueError on a cycle.
    """
    nodes = list(nodes)
    succ: dict[str, list[str]] = {n: [] for n in nodes}
    indegree = dict.fromkeys(nodes, 0)
    for a, b in edges:
        succ[a].append(b)
        indegree[b] += 1
    heap = [n for n, d in indegree.items() if d == 0]
    heapq.heapify(heap)
    out: list[str] = []
    while heap:
        node = heapq.heappop(heap)
        out.append(node)
        for nxt in succ[node]:
            indegree[nxt] -= 1
            if indegree[nxt] == 0:
                heapq.heappush(heap, nxt)
    if len(out) != len(nodes):
        raise ValueError("the edges have a cycle")
    return out


def descendants(graph: nx.DiGraph, node: Hashable) -> set[Hashable]:
    return nx.descendants(graph, node)


def to_dot(graph: nx.DiGraph, label: Callable[[Hashable], str] = str, name: str = "reconciler") -> str:
    """Graphviz dot text; edges point from a dependency to what depends on it."""
    ids = {node: f"n{i}" for i, node in enumerate(sorted(graph.nodes, key=str))}
    lines = [f"digraph {name} {{", "  rankdir=LR;", "  node [shape=box];"]
    for node, nid in ids.items():
        lines.append(f"  {nid} [label={_dot_quote(label(node))}];")
    for a, b in sorted(graph.edges, key=lambda e: (str(e[0]), str(e[1]))):
        lines.append(f"  {ids[a]} -> {ids[b]};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def to_mermaid(graph: nx.DiGraph, label: Callable[[Hashable], str] = str) -> str:
    """Mermaid flowchart text."""
    ids = {node: f"n{i}" for i, node in enumerate(sorted(graph.nodes, key=str))}
    lines = ["flowchart LR"]
    for node, nid in ids.items():
        lines.append(f'  {nid}["{_mermaid_escape(label(node))}"]')
    for a, b in sorted(graph.edges, key=lambda e: (str(e[0]), str(e[1]))):
        lines.append(f"  {ids[a]} --> {ids[b]}")
    return "\n".join(lines) + "\n"


def _dot_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _mermaid_escape(text: str) -> str:
    return text.replace('"', "#quot;")


def from_edges(nodes: Iterable[Hashable], edges: Iterable[tuple[Hashable, Hashable]]) -> nx.DiGraph:
    graph = nx.DiGraph()
    graph.add_nodes_from(nodes)
    graph.add_edges_from(edges)
    return graph
