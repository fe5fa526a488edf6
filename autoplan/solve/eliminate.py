"""Exact min-sum variable elimination for unconstrained problems (bucket elimination, Dechter 1999).

Nodes are eliminated one at a time in a *min-fill* order (the node whose neighbours need the
fewest new links, ties to the smallest table). Eliminating ``x`` gathers every factor that
mentions ``x`` (its node cost, its edges, tables left by earlier eliminations), sums them over
the union of their variables, and keeps

    f(N(x)) = min over s_x of (sum of those factors)        with argmin back-pointers,

a new factor over ``x``'s neighbours ``N(x)``. The last factor is a scalar: the optimum; the
choices come back by reading the back-pointers in reverse order. Exact for any graph; the work
is the largest table, ``prod k_u`` over ``x`` and ``N(x)``, checked before allocation.

Where the PaSE DP walks a vertex order with dependent sets (a path decomposition), elimination
follows a tree decomposition: on the graphs transformers give (an attention mask or rotary
table read by every block, residual streams) its tables stay small where the DP's grow with depth.
"""
from __future__ import annotations

import math
import time

import numpy as np

from autoplan.solve.problem import Problem, Solution, illegal_error, make_solution

Factor = tuple[tuple[int, ...], np.ndarray]  # (variables, table with one axis per variable, in that order)


def elimination_order(sizes: tuple[int, ...], adjacency: list[set[int]]) -> tuple[list[int], int]:
    """Greedy min-fill order and the largest table it makes (entries over a node and its neighbours)."""
    adj = [set(a) for a in adjacency]
    alive = set(range(len(sizes)))
    order, largest = [], 1
    while alive:
        def key(x: int) -> tuple[int, float, int]:
            nb = list(adj[x])
            fill = sum(1 for i, a in enumerate(nb) for b in nb[i + 1:] if b not in adj[a])
            return fill, sum(math.log(sizes[u]) for u in nb) + math.log(sizes[x]), x

        x = min(alive, key=key)
        nb = adj[x]
        largest = max(largest, sizes[x] * math.prod(sizes[u] for u in nb))
        for u in nb:
            adj[u].discard(x)
            adj[u].update(nb - {u})
        adj[x] = set()
        alive.discard(x)
        order.append(x)
    return order, largest


def _aligned(factor: Factor, variables: tuple[int, ...]) -> np.ndarray:
    """The factor's table with an axis per variable of ``variables`` (size 1 where it does not depend)."""
    vars_, table = factor
    perm = sorted(range(len(vars_)), key=lambda i: variables.index(vars_[i]))
    table = np.transpose(table, perm)
    shape = [1] * len(variables)
    for i in perm:
        shape[variables.index(vars_[i])] = table.shape[perm.index(i)]
    return table.reshape(shape)


def legal_strategies(p: Problem) -> list[np.ndarray]:
    """Per node, the strategies that can be in a finite-cost choice: a finite node cost, and for every
    edge some legal strategy of the other end at a finite pair cost (repeated until nothing changes)."""
    keep = [np.isfinite(c) for c in p.node_cost]
    changed = True
    while changed:
        changed = False
        for u, v, m in p.edges:
            finite = np.isfinite(m) & keep[u][:, None] & keep[v][None, :]
            for node, ok in ((u, finite.any(axis=1)), (v, finite.any(axis=0))):
                if np.any(keep[node] & ~ok):
                    keep[node] = keep[node] & ok
                    changed = True
    return [np.flatnonzero(k) for k in keep]


def undominated(p: Problem, keep: list[np.ndarray]) -> list[np.ndarray]:
    """Per node, the kept strategies no other kept strategy dominates: one whose node cost and every edge
    cost (against every kept strategy of each neighbour) is at most this one's can replace it in any
    choice at no greater cost, so some optimum avoids the dominated one (ties: the lower index stays).
    Repeated until nothing changes (dropping a neighbour's strategy can make more comparable)."""
    keep = [k.copy() for k in keep]
    incident: list[list[tuple[int, np.ndarray]]] = [[] for _ in p.node_cost]
    for u, v, m in p.edges:
        incident[u].append((v, m))
        incident[v].append((u, m.T))
    changed = True
    while changed:
        changed = False
        for i, cost in enumerate(p.node_cost):
            if len(keep[i]) < 2:
                continue
            rows = np.concatenate([cost[keep[i], None]] + [m[np.ix_(keep[i], keep[j])] for j, m in incident[i]], axis=1)
            rows = np.where(np.isinf(rows), np.finfo(np.float64).max, rows)
            le = np.all(rows[:, None, :] <= rows[None, :, :], axis=2)  # le[t, s]: t is nowhere worse than s
            order = np.arange(len(rows))
            beats = le & (~le.T | (order[:, None] < order[None, :]))  # strictly better somewhere, or equal and first
            np.fill_diagonal(beats, False)
            dominated = beats.any(axis=0)
            if dominated.any():
                keep[i] = keep[i][~dominated]
                changed = True
    return keep


def solve_eliminate(p: Problem, *, max_table_size: int = 20_000_000) -> Solution:
    """Exact optimum of an unconstrained problem by variable elimination (ValueError if a table is too big).

    Strategies that no finite-cost choice can use are dropped first (``legal_strategies``): planners
    mask whole families of strategies with infinite costs, and the tables shrink with them; then those
    another strategy dominates (``undominated``)."""
    if p.mem_budget is not None:
        raise ValueError("solve_eliminate takes unconstrained problems")
    started = time.perf_counter()
    legal = legal_strategies(p)
    if any(len(k) == 0 for k in legal):
        raise illegal_error()
    legal = undominated(p, legal)
    choice = _eliminate(_restricted(p, legal), max_table_size)
    return make_solution(p, tuple(int(k[c]) for k, c in zip(legal, choice)), "eliminate", started, 0.0)


def _restricted(p: Problem, keep: list[np.ndarray]) -> Problem:
    return Problem(tuple(c[k] for c, k in zip(p.node_cost, keep)), tuple(m[k] for m, k in zip(p.node_mem, keep)),
                   tuple((u, v, m[np.ix_(keep[u], keep[v])]) for u, v, m in p.edges))


def _eliminate(p: Problem, max_table_size: int) -> list[int]:
    n = len(p.node_cost)
    adjacency: list[set[int]] = [set() for _ in range(n)]
    for u, v, _ in p.edges:
        adjacency[u].add(v)
        adjacency[v].add(u)
    order, largest = elimination_order(p.sizes, adjacency)
    if largest > max_table_size:
        raise ValueError(f"variable elimination needs a table of {largest} entries (limit {max_table_size})")
    factors: list[Factor] = [((i,), c) for i, c in enumerate(p.node_cost)]
    factors += [((u, v), m) for u, v, m in p.edges]
    steps: list[tuple[int, tuple[int, ...], np.ndarray]] = []  # (x, its neighbours, argmin over x)
    for x in order:
        mine = [f for f in factors if x in f[0]]
        factors = [f for f in factors if x not in f[0]]
        rest = tuple(sorted({u for vars_, _ in mine for u in vars_} - {x}))
        variables = rest + (x,)
        total = sum(_aligned(f, variables) for f in mine)
        total = np.broadcast_to(total, tuple(p.sizes[u] for u in variables))
        steps.append((x, rest, np.argmin(total, axis=-1)))
        factors.append((rest, np.min(total, axis=-1)))
    optimum = sum(float(t) for vars_, t in factors if not vars_)
    if not math.isfinite(optimum):
        raise illegal_error()
    choice = [0] * n
    for x, rest, argmin in reversed(steps):
        choice[x] = int(argmin[tuple(choice[u] for u in rest)])
    return choice




def _reduced(p: Problem) -> Problem | None:
    """The problem on its legal, undominated strategies (None when no finite choice exists)."""
    legal = legal_strategies(p)
    if any(len(k) == 0 for k in legal):
        return None
    return _restricted(p, undominated(p, legal))


def lower_bound(p: Problem, *, max_table_size: int = 1_000_000) -> float:
    """A lower bound of the unconstrained optimum by mini-bucket elimination (Dechter and Rish, 2003):
    eliminating ``x``, factors whose joint table would exceed ``max_table_size`` are split into
    mini-buckets, each minimised over ``x`` on its own (min of a sum >= sum of mins). Exact when no
    bucket is split; ``math.inf`` when no finite choice exists."""
    sub = _reduced(p)
    if sub is None:
        return math.inf
    sizes = sub.sizes
    adjacency: list[set[int]] = [set() for _ in sizes]
    for u, v, _ in sub.edges:
        adjacency[u].add(v)
        adjacency[v].add(u)
    order, _ = elimination_order(sizes, adjacency)
    factors: list[Factor] = [((i,), c) for i, c in enumerate(sub.node_cost)]
    factors += [((u, v), m) for u, v, m in sub.edges]
    for x in order:
        mine = sorted((f for f in factors if x in f[0]), key=lambda f: -len(f[0]))
        factors = [f for f in factors if x not in f[0]]
        buckets: list[list[Factor]] = []
        for f in mine:  # first fit: a factor joins the first mini-bucket it keeps within the size limit
            for b in buckets:
                scope = {u for vars_, _ in b for u in vars_} | set(f[0])
                if math.prod(sizes[u] for u in scope) <= max_table_size:
                    b.append(f)
                    break
            else:
                buckets.append([f])
        for b in buckets:
            rest = tuple(sorted({u for vars_, _ in b for u in vars_} - {x}))
            variables = rest + (x,)
            total = np.broadcast_to(sum(_aligned(f, variables) for f in b), tuple(sizes[u] for u in variables))
            factors.append((rest, np.min(total, axis=-1)))
    return float(sum(float(t) for vars_, t in factors if not vars_))


__all__ = ["elimination_order", "lower_bound", "solve_eliminate", "undominated"]
