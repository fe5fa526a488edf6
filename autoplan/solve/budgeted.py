"""Memory-constrained solve: exact reduction, a Lagrangian bound, then the ILP only if needed.

1. ``reduce_problem`` removes every node whose memory does not depend on its strategy (exact).
2. Lagrangian relaxation: for a price ``lam`` per byte, ``min cost + lam * mem`` is an
   unconstrained problem solved exactly by the reduced DP. Each ``lam`` gives a lower bound
   ``f(lam) - lam * (budget - offset)`` on the constrained optimum, and its minimiser is a
   candidate plan; bisection on ``lam`` finds the cheapest candidate that fits.
3. When the best candidate meets the best bound (to 1e-9 relative), it is optimal and no ILP
   runs. Otherwise CP-SAT solves the reduced problem with the memory constraint, starting
   from the candidate, and its proven gap is reported.
"""
from __future__ import annotations

import math
import time

import numpy as np

from autoplan.solve.ilp import solve_ilp
from autoplan.solve.problem import Problem, Solution, budget_error, make_solution
from autoplan.solve.reduce import reduce_problem, solve_reduced

TOLERANCE = 1e-9


def min_memory(p: Problem) -> float:
    """A lower bound of any choice's memory: each node's smallest legal memory (memory has no edge terms)."""
    total = p.mem_offset
    for cost, mem in zip(p.node_cost, p.node_mem):
        legal = mem[np.isfinite(cost)]
        total += float(legal.min()) if legal.size else float("inf")
    return total


def lagrangian(p: Problem, iterations: int = 24) -> tuple[list[int] | None, float]:
    """(cheapest fitting choice found, best lower bound) for a budgeted problem."""
    assert p.mem_budget is not None
    room = p.mem_budget - p.mem_offset
    best: list[int] | None = None
    best_cost = math.inf
    lower = -math.inf

    def probe(lam: float) -> bool:
        nonlocal best, best_cost, lower
        relaxed = Problem(tuple(c + lam * m for c, m in zip(p.node_cost, p.node_mem)), p.node_mem, p.edges)
        sol = solve_reduced(relaxed)
        cost, mem = p.evaluate(sol.choice)
        lower = max(lower, sol.cost - lam * room)
        fits = mem <= p.mem_budget * (1 + 1e-12)
        if fits and cost < best_cost:
            best, best_cost = list(sol.choice), cost
        return fits

    if probe(0.0):
        return best, lower
    scale = max(float(np.max(np.where(np.isfinite(c), c, 0))) for c in p.node_cost) or 1.0
    mem_scale = max(float(np.max(m)) for m in p.node_mem) or 1.0
    hi = scale / mem_scale
    for _ in range(60):
        if probe(hi):
            break
        hi *= 4.0
    else:
        return best, lower
    lo = 0.0
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if probe(mid):
            hi = mid
        else:
            lo = mid
        if best is not None and best_cost - lower <= TOLERANCE * abs(best_cost):
            break
    return best, lower


def solve_budgeted(p: Problem, *, time_limit_s: float = 60.0, use_ilp: bool = True) -> Solution:
    """Exact (or gap-reported) optimum of a problem with a memory budget."""
    started = time.perf_counter()
    if p.mem_budget is None:
        return solve_reduced(p)
    floor = min_memory(p)
    red = reduce_problem(p)
    if floor > p.mem_budget:
        raise budget_error(p, _exact_min_memory(p, red) if math.isfinite(floor) else floor)
    choice, lower = lagrangian(red.problem)
    if choice is not None:
        cost = red.problem.evaluate(choice)[0]
        gap = max(0.0, (cost - lower) / abs(cost)) if cost else 0.0
        if gap <= TOLERANCE or not use_ilp:
            return make_solution(p, red.expand(tuple(choice)), "dp", started, 0.0 if gap <= TOLERANCE else gap)
    sol = solve_ilp(red.problem, time_limit_s=time_limit_s)
    out = make_solution(p, red.expand(sol.choice), "ilp", started, sol.gap)
    return out


def _exact_min_memory(p: Problem, red) -> float:
    """Smallest memory of any legal choice (memory as the objective, solved exactly)."""
    mem_as_cost = Problem(
        tuple(np.where(np.isfinite(c), m, np.inf) for c, m in zip(p.node_cost, p.node_mem)),
        p.node_mem,
        tuple((u, v, np.where(np.isfinite(mat), 0.0, np.inf)) for u, v, mat in p.edges),
    )
    sol = solve_reduced(mem_as_cost)
    return p.evaluate(sol.choice)[1]
