"""Exact dynamic program over a vertex ordering with dependent sets (PaSE, Jia et al., IPDPS 2021).

Vertices are processed in an order ``v_1 .. v_n``.  After step ``i`` the *dependent set*
``D_i`` holds the processed vertices that still have an unprocessed neighbour; every cost term
between a processed and an unprocessed vertex involves only ``D_i``, so

    T_i[d] = min over processed vertices outside D_i of
             (node costs of processed vertices + edge costs between processed vertices)

is all the past the future needs.  Step ``i`` extends ``T_{i-1}`` by one axis for ``v_i``
(adding ``v_i``'s node cost and its edges to ``D_{i-1}`` by broadcasting) and min-reduces the
vertices that leave the set, keeping argmin back-pointers to recover the choice.  The largest
table has ``prod_{u in D_{i-1} + v_i} k_u`` entries; the ordering is chosen greedily to keep
dependent sets small (for a chain it is the natural order, giving ``k^2`` entries).

With a memory budget every table entry becomes the exact Pareto frontier of (cost, memory)
pairs, kept only when the unconstrained optimum does not fit:

1. the same min-sum DP with memory as the objective gives the smallest legal memory (for the
   infeasibility error) and a feasible plan;
2. a walk along the Lagrangian hull (price memory at the chord slope, solve ``cost + price *
   mem`` unconstrained) gives a good feasible incumbent and a near-optimal price;
3. a DP in reverse order gives, per dependent-set assignment, the exact priced cost and the
   exact legal memory still to come (or scalar per-term bounds when too large);
4. the frontier DP drops a point when its memory plus the memory to come exceeds the budget,
   or when its Lagrangian bound ``cost + price * (mem - budget) + priced cost to come`` exceeds
   the incumbent.  Both bounds are valid lower bounds, so the result is the exact optimum.
"""
from __future__ import annotations

import heapq
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from autoplan.solve.problem import (
    EdgeMap,
    Problem,
    Solution,
    budget_error,
    fits,
    illegal_error,
    make_solution,
    mem_limit,
    merge_edges,
    neighbours,
    oriented,
)


@dataclass(frozen=True)
class _Step:
    vertex: int
    joins: tuple[int, ...]  # processed neighbours of ``vertex`` (all in the dependent set)
    leaves: tuple[int, ...]  # vertices that leave the dependent set after this step
    table_size: int  # entries of the table over (dependent set + vertex)


def vertex_order(sizes: Sequence[int], adjacency: Sequence[set[int]]) -> list[int]:
    """Greedy min-frontier ordering.

    Repeatedly process the vertex that makes the next dependent set smallest (log-size growth:
    ``+log k_v`` if ``v`` stays, ``-log k_u`` for each set member whose last open neighbour is
    ``v``); ties prefer vertices touching more of the set, then fewer unprocessed neighbours
    (so a new component starts at a leaf or chain end), then fewer strategies, then the lower
    index (so a chain comes out in its natural order, whatever its labels).
    """
    n = len(sizes)
    logk = [math.log(k) for k in sizes]
    open_degree = [len(a) for a in adjacency]  # unprocessed neighbours of each vertex
    done = [False] * n

    def key(v: int) -> tuple[float, int, int, int, int]:
        growth = logk[v] if open_degree[v] > 0 else 0.0
        touching = 0
        for u in adjacency[v]:
            if done[u]:
                touching += 1
                if open_degree[u] == 1:
                    growth -= logk[u]
        return (round(growth, 9), -touching, open_degree[v], sizes[v], v)

    heap = [key(v) for v in range(n)]
    heapq.heapify(heap)
    order: list[int] = []
    while heap:
        entry = heapq.heappop(heap)
        v = entry[-1]
        if done[v] or entry != key(v):
            continue  # stale entry; the current key was pushed when it changed
        done[v] = True
        order.append(v)
        affected = set()
        for u in adjacency[v]:
            open_degree[u] -= 1
            if not done[u]:
                affected.add(u)
        for u in adjacency[v]:
            if done[u] and open_degree[u] == 1:
                affected.update(w for w in adjacency[u] if not done[w])
        for w in affected:
            heapq.heappush(heap, key(w))
    return order


def _schedule(
    sizes: Sequence[int], adjacency: Sequence[set[int]], order: Sequence[int]
) -> list[_Step]:
    open_degree = [len(a) for a in adjacency]
    done = [False] * len(sizes)
    dependent: set[int] = set()
    steps: list[_Step] = []
    for v in order:
        table_size = math.prod(sizes[u] for u in dependent) * sizes[v]
        joins = tuple(sorted(u for u in adjacency[v] if done[u]))
        done[v] = True
        for u in adjacency[v]:
            open_degree[u] -= 1
        dependent.add(v)
        leaves = tuple(u for u in (*joins, v) if open_degree[u] == 0)
        dependent.difference_update(leaves)
        steps.append(_Step(v, joins, leaves, table_size))
    return steps


def _plan(p: Problem) -> tuple[EdgeMap, list[set[int]], list[_Step]]:
    edges = merge_edges(p)
    adjacency = neighbours(len(p.sizes), edges)
    return edges, adjacency, _schedule(p.sizes, adjacency, vertex_order(p.sizes, adjacency))


def _dependent_axes(steps: Sequence[_Step]) -> list[tuple[int, ...]]:
    """The dependent set after each step, in the axis order the tables keep it."""
    axes: tuple[int, ...] = ()
    out = []
    for step in steps:
        axes = tuple(a for a in (*axes, step.vertex) if a not in step.leaves)
        out.append(axes)
    return out


def dp_table_size(p: Problem) -> int:
    """Entries of the largest DP table the ordering needs (per Pareto point when budgeted)."""
    p.validate()
    return max((s.table_size for s in _plan(p)[2]), default=1)


def solve_dp(p: Problem, *, max_table_size: int = 50_000_000) -> Solution:
    """Exact optimum by the dependent-set DP; ValueError if a table exceeds ``max_table_size``."""
    started = time.perf_counter()
    p.validate()
    edges, adjacency, steps = _plan(p)
    largest = max((s.table_size for s in steps), default=1)
    if largest > max_table_size:
        raise ValueError(
            f"the DP needs a table of {largest} entries (limit {max_table_size}); use solve_ilp"
        )
    n = len(p.sizes)
    cost, choice = _min_sum(n, steps, p.node_cost, edges)
    if not math.isfinite(cost):
        raise illegal_error()
    if fits(p, p.evaluate(choice)[1]):
        return make_solution(p, choice, "dp", started, gap=0.0)
    legal_mem, legal_edges = _legal_mem(p, edges)
    smallest = _min_sum(n, steps, legal_mem, legal_edges)[1]
    min_mem = p.evaluate(smallest)[1]
    if not fits(p, min_mem):
        raise budget_error(p, min_mem)
    incumbent, price = _lagrangian(p, steps, edges, choice, smallest)
    priced = [c + price * m for c, m in zip(p.node_cost, p.node_mem)]
    go_priced = _to_go(p.sizes, steps, adjacency, priced, edges, max_table_size)
    go_mem = _to_go(p.sizes, steps, adjacency, legal_mem, legal_edges, max_table_size)
    better = _pareto(p, steps, edges, (go_priced, go_mem), price, p.evaluate(incumbent)[0])
    if better is not None and p.evaluate(better)[0] < p.evaluate(incumbent)[0]:
        incumbent = better
    return make_solution(p, incumbent, "dp", started, gap=0.0)


def _min_sum(
    n: int,
    steps: Sequence[_Step],
    node_w: Sequence[np.ndarray],
    edge_w: EdgeMap,
    record: list[tuple[tuple[int, ...], np.ndarray]] | None = None,
) -> tuple[float, list[int]]:
    """Minimise sum of node and edge weights with dense tables; returns (value, choice).

    ``record`` (if given) receives ``(dependent set, table)`` after every step.
    """
    table = np.zeros(())
    axes: list[int] = []
    trail: list[tuple[int, tuple[int, ...], np.ndarray]] = []
    for step in steps:
        v = step.vertex
        table = table[..., np.newaxis] + node_w[v]
        axes.append(v)
        for u in step.joins:
            matrix = oriented(edge_w, u, v)
            shape = [1] * len(axes)
            shape[axes.index(u)], shape[-1] = matrix.shape
            table += matrix.reshape(shape)
        for u in step.leaves:
            axis = axes.index(u)
            best = np.argmin(table, axis=axis)
            table = np.min(table, axis=axis)
            axes.pop(axis)
            trail.append((u, tuple(axes), best))
        if record is not None:
            record.append((tuple(axes), table))
    choice = [0] * n
    for u, rest, best in reversed(trail):
        choice[u] = int(best[tuple(choice[a] for a in rest)])
    return float(table), choice


def _legal_mem(p: Problem, edges: EdgeMap) -> tuple[list[np.ndarray], EdgeMap]:
    """Weights whose min-sum is the smallest memory (without offset) of a finite-cost choice."""
    node_w = [np.where(np.isfinite(c), m, np.inf) for c, m in zip(p.node_cost, p.node_mem)]
    edge_w = {k: np.where(np.isfinite(m), 0.0, np.inf) for k, m in edges.items()}
    return node_w, edge_w


def _lagrangian(
    p: Problem, steps: Sequence[_Step], edges: EdgeMap, low: list[int], high: list[int]
) -> tuple[list[int], float]:
    """Walk the lower convex hull of (mem, cost) between an infeasible and a feasible choice.

    Each step prices memory at the slope of the chord and solves ``cost + price * mem``
    unconstrained.  Returns the cheapest feasible choice met (an incumbent) and the final price
    (a near-optimal Lagrange multiplier of the budget).
    """
    (c_lo, m_lo), (c_hi, m_hi) = p.evaluate(low), p.evaluate(high)
    best, best_cost = high, c_hi
    price = 0.0
    for _ in range(30):
        price = max(c_hi - c_lo, 0.0) / (m_lo - m_hi)
        weights = [c + price * m for c, m in zip(p.node_cost, p.node_mem)]
        choice = _min_sum(len(p.sizes), steps, weights, edges)[1]
        cost, mem = p.evaluate(choice)
        chord = c_hi + price * m_hi
        if cost + price * mem >= chord - 1e-12 * max(abs(chord), 1e-300):
            break  # no choice below the chord: (low, high) is a hull edge
        if fits(p, mem):
            c_hi, m_hi = cost, mem
            if cost < best_cost:
                best, best_cost = choice, cost
        else:
            c_lo, m_lo = cost, mem
    return best, price


def _to_go(
    sizes: Sequence[int],
    steps: Sequence[_Step],
    adjacency: Sequence[set[int]],
    node_w: Sequence[np.ndarray],
    edge_w: EdgeMap,
    cap: int,
) -> list[np.ndarray | float]:
    """Lower bound on the weight not yet counted after each step, per dependent-set assignment.

    Exact (a dense array over the dependent set) when affordable: a DP in reverse order gives
    the best weight of the unprocessed vertices given their boundary, joined with the edges that
    cross to the dependent set.  Otherwise a scalar bound from per-term minima.
    """
    n = len(steps)
    fallback = _suffix_bounds(steps, node_w, edge_w)
    reverse = _schedule(sizes, adjacency, [s.vertex for s in reversed(steps)])
    if max((s.table_size for s in reverse), default=1) > cap:
        return list(fallback)
    record: list[tuple[tuple[int, ...], np.ndarray]] = []
    _min_sum(len(sizes), reverse, node_w, edge_w, record)
    past = _dependent_axes(steps)
    bounds: list[np.ndarray | float] = []
    for i in range(n - 1):
        future, table = record[n - 2 - i]
        bounds.append(_join(past[i], future, table, sizes, adjacency, edge_w, cap))
    bounds.append(0.0)
    return bounds


def _suffix_bounds(
    steps: Sequence[_Step], node_w: Sequence[np.ndarray], edge_w: EdgeMap
) -> list[float]:
    """Scalar bounds: every future node and every edge with a future end at its minimum."""
    terms = [
        float(np.min(node_w[s.vertex]))
        + sum(float(np.min(oriented(edge_w, u, s.vertex))) for u in s.joins)
        for s in steps
    ]
    return [math.fsum(terms[i + 1 :]) for i in range(len(steps))]


def _join(
    past: tuple[int, ...],
    future: tuple[int, ...],
    table: np.ndarray,
    sizes: Sequence[int],
    adjacency: Sequence[set[int]],
    edge_w: EdgeMap,
    cap: int,
) -> np.ndarray | float:
    """min over the future boundary of (future table + edges crossing to the past set)."""
    crossing = [
        (i, j) for i, a in enumerate(past) for j, f in enumerate(future) if f in adjacency[a]
    ]
    if math.prod(sizes[a] for a in (*past, *future)) > cap:
        return float(np.min(table)) + sum(
            float(np.min(oriented(edge_w, past[i], future[j]))) for i, j in crossing
        )
    dims = len(past) + len(future)
    total = table.reshape((1,) * len(past) + table.shape)
    for i, j in crossing:
        shape = [1] * dims
        matrix = oriented(edge_w, past[i], future[j])
        shape[i], shape[len(past) + j] = matrix.shape
        total = total + matrix.reshape(shape)
    reduced = np.min(total, axis=tuple(range(len(past), dims))) if future else total
    return np.broadcast_to(reduced, tuple(sizes[a] for a in past))


def _pareto(
    p: Problem,
    steps: Sequence[_Step],
    edges: EdgeMap,
    to_go: tuple[Sequence[np.ndarray | float], Sequence[np.ndarray | float]],
    price: float,
    bound: float,
) -> list[int] | None:
    """Exact budgeted optimum if it costs less than ``bound``: Pareto frontiers of (cost, mem).

    Points are flat arrays (``keys``: dependent-set strategies of each point); each step records
    every surviving point's parent and the strategy it gave ``v``.  A point is dropped when its
    memory plus the memory still to come exceeds the budget, or when its Lagrangian bound
    ``cost + price * (mem + mem to come - budget)`` (priced weight still to come) exceeds
    ``bound`` (the incumbent's cost, plus float slack).
    """
    sizes, (go_priced, go_mem) = p.sizes, to_go
    limit = mem_limit(p)
    assert limit is not None
    budget = limit - p.mem_offset
    slack = bound + 1e-9 * max(abs(bound), abs(price * budget), 1e-300)
    keys = np.zeros((1, 0), dtype=np.int64)
    cost, mem = np.zeros(1), np.zeros(1)
    axes: tuple[int, ...] = ()
    history: list[tuple[int, np.ndarray, np.ndarray]] = []
    for i, (step, after) in enumerate(zip(steps, _dependent_axes(steps))):
        v = step.vertex
        k = sizes[v]
        parent = np.repeat(np.arange(cost.shape[0]), k)
        pick = np.tile(np.arange(k), cost.shape[0])
        c = cost[parent] + p.node_cost[v][pick]
        m = mem[parent] + p.node_mem[v][pick]
        for u in step.joins:
            c += oriented(edges, u, v)[keys[parent, axes.index(u)], pick]
        stay = [j for j, a in enumerate((*axes, v)) if a not in step.leaves]
        keys, axes = np.column_stack([keys[parent], pick])[:, stay], after
        index = tuple(keys.T)
        priced = c + price * m + _at(go_priced[i], index) - price * budget
        ok = np.isfinite(c) & (m + _at(go_mem[i], index) <= budget) & (priced <= slack)
        keep = np.flatnonzero(ok)[_frontier(keys[ok], [sizes[a] for a in axes], c[ok], m[ok])]
        history.append((v, parent[keep], pick[keep]))
        keys, cost, mem = keys[keep], c[keep], m[keep]
        if cost.shape[0] == 0:
            return None
    choice = [0] * len(sizes)
    point = int(np.argmin(cost))
    for v, parent, pick in reversed(history):
        choice[v] = int(pick[point])
        point = int(parent[point])
    return choice


def _at(bound: np.ndarray | float, index: tuple[np.ndarray, ...]) -> np.ndarray | float:
    return bound[index] if isinstance(bound, np.ndarray) else bound


def _frontier(
    keys: np.ndarray, radices: Sequence[int], cost: np.ndarray, mem: np.ndarray
) -> np.ndarray:
    """Indices of the points on the (cost, mem) Pareto frontier of each key (ties: keep one)."""
    if cost.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    strides = np.ones(len(radices), dtype=np.int64)
    for j in range(len(radices) - 2, -1, -1):
        strides[j] = strides[j + 1] * radices[j + 1]
    group = keys @ strides if len(radices) else np.zeros(cost.shape[0], dtype=np.int64)
    order = np.lexsort((mem, cost, group))  # by group, then cost, then memory
    _, rank = np.unique(mem[order], return_inverse=True)
    # Shift each group below all earlier ones, so one running minimum restarts at every group.
    shifted = rank.astype(np.int64).ravel() - group[order] * (int(rank.max()) + 1)
    previous = np.concatenate(([np.iinfo(np.int64).max], np.minimum.accumulate(shifted)[:-1]))
    return order[shifted < previous]
