"""Exact simplification of a problem: eliminate low-degree nodes before the DP or the ILP.

A node with one neighbour folds into it (``c_u[a] += min_b M[a, b] + c_x[b]``); a node with two
neighbours becomes one edge between them (``M'[a, c] = min_b M1[a, b] + c_x[b] + M2[b, c]``,
series reduction); a node alone picks its cheapest strategy. Each step keeps the argmin, so the
eliminated nodes' strategies are recovered in reverse order once the rest is solved. These are
the variable-elimination steps of the DP, taken greedily first.

With no memory budget every such node may go. Under a budget only nodes whose memory is the
same for every strategy may (views, transposes, replicated-only ops): their memory moves into
``mem_offset`` and nothing the budget depends on is forgotten, so the reduction stays exact.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from autoplan.solve.dp import solve_dp
from autoplan.solve.eliminate import solve_eliminate
from autoplan.solve.ilp import solve_ilp
from autoplan.solve.problem import Problem, Solution, make_solution, merge_edges


@dataclass
class _Step:
    node: int
    neighbours: tuple[int, ...]
    argmin: np.ndarray  # strategy of ``node`` indexed by the neighbours' strategies


@dataclass
class Reduced:
    problem: Problem  # over the surviving nodes
    survivors: list[int]  # original index of each surviving node
    steps: list[_Step]
    n: int  # nodes of the original problem
    dropped_cost: float = 0.0  # costs of eliminated nodes left out of ``problem`` (its optimum + this = the original's)

    def expand(self, choice: tuple[int, ...]) -> list[int]:
        """A choice for the reduced problem -> a choice for the original one."""
        full = [0] * self.n
        for n, s in zip(self.survivors, choice):
            full[n] = int(s)
        for step in reversed(self.steps):
            idx = tuple(full[n] for n in step.neighbours)
            full[step.node] = int(step.argmin[idx]) if idx else int(step.argmin)
        return full


def _oriented(edges: dict[tuple[int, int], np.ndarray], a: int, b: int) -> np.ndarray:
    return edges[(a, b)] if (a, b) in edges else edges[(b, a)].T


def _add_edge(edges: dict[tuple[int, int], np.ndarray], a: int, b: int, mat: np.ndarray) -> None:
    if a > b:
        a, b, mat = b, a, mat.T
    edges[(a, b)] = edges[(a, b)] + mat if (a, b) in edges else mat


def _const_memory(cost: np.ndarray, mem: np.ndarray) -> float | None:
    legal = mem[np.isfinite(cost)]
    if legal.size == 0:
        return float(mem.max()) if mem.size else 0.0
    return float(legal[0]) if np.all(legal == legal[0]) else None


def reduce_problem(p: Problem) -> Reduced:
    cost = [c.copy() for c in p.node_cost]
    edges = dict(merge_edges(p))
    adj: list[set[int]] = [set() for _ in cost]
    for u, v in edges:
        adj[u].add(v)
        adj[v].add(u)
    offset = p.mem_offset
    alive = set(range(len(cost)))
    steps: list[_Step] = []
    dropped = 0.0
    budgeted = p.mem_budget is not None
    queue = sorted(alive)
    while queue:
        x = queue.pop()
        if x not in alive or (len(adj[x]) > 2 and len(cost[x]) > 1):
            continue
        const = _const_memory(cost[x], p.node_mem[x]) if budgeted else 0.0
        if const is None:
            continue
        nbrs = tuple(sorted(adj[x]))
        if len(cost[x]) == 1 and len(nbrs) > 2:  # one strategy: each edge is a cost on the neighbour
            dropped += float(cost[x][0])
            for u in nbrs:
                cost[u] = cost[u] + _oriented(edges, u, x)[:, 0]
                del edges[(min(u, x), max(u, x))]
                adj[u].discard(x)
            steps.append(_Step(x, (), np.array(0)))
        elif not nbrs:
            steps.append(_Step(x, (), np.array(int(np.argmin(cost[x])))))
            dropped += float(np.min(cost[x]))
        elif len(nbrs) == 1:
            (u,) = nbrs
            tot = _oriented(edges, u, x) + cost[x][None, :]
            steps.append(_Step(x, (u,), np.argmin(tot, axis=1)))
            cost[u] = cost[u] + np.min(tot, axis=1)
            del edges[(min(u, x), max(u, x))]
            adj[u].discard(x)
        else:
            u, w = nbrs
            tot = _oriented(edges, u, x)[:, :, None] + cost[x][None, :, None] + _oriented(edges, x, w)[None, :, :]
            steps.append(_Step(x, (u, w), np.argmin(tot, axis=1)))
            del edges[(min(u, x), max(u, x))]
            del edges[(min(w, x), max(w, x))]
            adj[u].discard(x)
            adj[w].discard(x)
            _add_edge(edges, u, w, np.min(tot, axis=1))
            adj[u].add(w)
            adj[w].add(u)
        if budgeted:
            offset += const
        adj[x].clear()
        alive.discard(x)
        queue.extend(nbrs)
    rest = sorted(alive)
    pos = {n: i for i, n in enumerate(rest)}
    sub = Problem(
        tuple(cost[n] for n in rest),
        tuple(p.node_mem[n] if budgeted else np.zeros_like(cost[n]) for n in rest),
        tuple((pos[u], pos[v], m) for (u, v), m in edges.items()),
        mem_budget=p.mem_budget,
        mem_offset=offset if budgeted else 0.0,
    )
    return Reduced(sub, rest, steps, len(cost), dropped)


def solve_reduced(p: Problem, *, max_table_size: int = 50_000_000, ilp: bool = True) -> Solution:
    """Exact optimum of an unconstrained problem: eliminate degree <= 2 nodes, then variable elimination or
    the DP on the rest, else CP-SAT (``ilp=False``: ValueError instead, when the tables are too big)."""
    if p.mem_budget is not None:
        raise ValueError("solve_reduced takes unconstrained problems: use reduce_problem with solve_dp or solve_ilp")
    started = time.perf_counter()
    red = reduce_problem(p)
    choice: tuple[int, ...] = ()
    solver, gap = "dp", 0.0
    if red.survivors:
        try:  # elimination on a min-fill order (a tree decomposition), else the path-ordered DP, else CP-SAT
            sol = solve_eliminate(red.problem, max_table_size=max_table_size)
        except ValueError:
            try:
                sol = solve_dp(red.problem, max_table_size=max_table_size)
            except ValueError:  # tables too wide for either: CP-SAT on what is left
                if not ilp:
                    raise
                sol = solve_ilp(red.problem, time_limit_s=60.0, threads=2)
        choice, solver, gap = sol.choice, sol.solver, sol.gap
    return make_solution(p, red.expand(choice), solver, started, gap)
