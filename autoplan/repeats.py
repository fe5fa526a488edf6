"""Repeated layers: find the N identical blocks of a model so the solver prices one.

Nodes whose module path runs through ``<container>.<index>`` (an ``nn.ModuleList`` child) form
block ``index``. Blocks of one container are *tied* when they have the same ops, shapes and
internal wiring, and each takes its outside inputs either from the previous block or from the
same node outside. Tying maps every node of block i to its counterpart in block 0 (its
*representative*); the solver then chooses one sharding for all copies, and each cost term is
counted once per copy. This is exact within the search space where identical layers share a
sharding, as Alpa and autoparallel also assume.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

from autoplan.graph import OpGraph, OpNode

_BLOCK_RE = re.compile(r"^(.*?)\.(\d+)(?:\.|$)")


@dataclass(frozen=True)
class Tying:
    rep: dict[str, str]  # node -> representative node (itself when untied)
    count: dict[str, int]  # representative -> number of copies it stands for
    in_block: frozenset[str]  # representatives that belong to a tied block
    boundary: frozenset[str]  # representatives whose copies feed nodes outside their own block
    groups: tuple[tuple[str, int], ...]  # (container path, number of tied blocks)

    @staticmethod
    def identity(graph: OpGraph) -> "Tying":
        return Tying({n: n for n in graph.nodes}, {n: 1 for n in graph.nodes}, frozenset(), frozenset(), ())


def _block_of(node: OpNode) -> tuple[str, int] | None:
    path = node.param if node.kind == "param" and node.param else node.module
    m = _BLOCK_RE.match(path or "")
    if not m:
        return None
    return m.group(1), int(m.group(2))


def _signature(graph: OpGraph, names: list[str], prev: list[str] | None) -> tuple | None:
    """Hashable description of a block; outside inputs are ("prev", j) or ("fixed", name)."""
    local = {n: i for i, n in enumerate(names)}
    prev_local = {n: i for i, n in enumerate(prev or [])}
    sig = []
    for n in names:
        node = graph.nodes[n]
        ins = []
        for src in node.inputs:
            if src in local:
                ins.append(("local", local[src]))
            elif src in prev_local:
                ins.append(("prev", prev_local[src]))
            else:
                ins.append(("fixed", src))
        attrs = tuple(sorted((k, repr(v)) for k, v in node.attrs.items()))
        sig.append((node.kind, node.target, node.out.base, tuple(sorted(node.out.batch_dims)), attrs, tuple(ins)))
    return tuple(sig)


def _compatible_first(first: tuple, second: tuple) -> bool:
    """Block 0 may take from a fixed outside node what later blocks take from their predecessor."""
    if len(first) != len(second):
        return False
    for a, b in zip(first, second):
        if a[:5] != b[:5] or len(a[5]) != len(b[5]):
            return False
        for x, y in zip(a[5], b[5]):
            if x != y and not (x[0] == "fixed" and y[0] == "prev"):
                return False
    return True


def find_repeats(graph: OpGraph) -> Tying:
    blocks: dict[str, dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
    for node in graph.nodes.values():
        where = _block_of(node)
        if where is not None:
            blocks[where[0]][where[1]].append(node.name)
    rep = {n: n for n in graph.nodes}
    count = {n: 1 for n in graph.nodes}
    in_block: set[str] = set()
    groups = []
    for container, by_index in blocks.items():
        indices = sorted(by_index)
        if len(indices) < 2 or indices != list(range(indices[0], indices[0] + len(indices))):
            continue
        lists = [by_index[i] for i in indices]
        sigs = [_signature(graph, lists[0], None)] + [_signature(graph, lists[i], lists[i - 1]) for i in range(1, len(lists))]
        if any(s != sigs[1] for s in sigs[2:]) or not _compatible_first(sigs[0], sigs[1]):
            continue
        for names in lists[1:]:
            for n, n0 in zip(names, lists[0]):
                rep[n] = n0
        for n0 in lists[0]:
            count[n0] = len(lists)
            in_block.add(n0)
        for names in lists[1:]:
            for n in names:
                count.pop(n, None)
        groups.append((container, len(lists)))
    boundary = set()
    block_id = {n: _block_of(graph.nodes[n]) for n in graph.nodes}
    for u, v in graph.dag.edges:
        if rep[u] in in_block and block_id[u] != block_id[v] and graph.nodes[u].kind != "param":
            boundary.add(rep[u])
    return Tying(rep, count, frozenset(in_block), frozenset(boundary), tuple(groups))
