r"""Integer program for the strategy assignment, solved with OR-Tools CP-SAT.

Variables (only for legal, i.e. finite-cost, entries; illegal ones are simply absent = 0):

    x[i,a]   in {0,1}   node i uses strategy a
    y[e,a,b] in {0,1}   edge e = (u, v) uses the pair (a, b)  (parallel edges merged first)

Model:

    minimise   sum_{i,a} C[i,a] x[i,a] + sum_{e,a,b} C[e,a,b] y[e,a,b]
    s.t.       sum_a x[i,a] = 1                      for every node i
               sum_b y[e,a,b] = x[u,a]               for every edge e = (u, v), strategy a of u
               sum_a y[e,a,b] = x[v,b]               for every edge e = (u, v), strategy b of v
               sum_{i,a} W[i,a] x[i,a] <= B          (only with a memory budget)

The two edge constraints (the compact linearisation) force ``y[e,a,b] = x[u,a] * x[v,b]``
when each node picks exactly one strategy; a forbidden (infinite) pair has no ``y`` so the
two nodes cannot pick it together.

Scaling.  CP-SAT needs integers.  ``C = round(cost / max|cost| * steps)``, where ``steps`` is
as large as keeps both the objective of any solution below 2^53 (exact in a double) and the
sum over all objective terms below 2^61 (CP-SAT's overflow check).  For problems of a few
thousand terms that is ~1e12 integer steps per ``max|cost|``, so the returned choice is
optimal to ~1e-12 relative; its cost is always recomputed exactly with ``Problem.evaluate``.
Memory: if every byte count is an integer, ``W`` is in bytes (exact); otherwise
``W = ceil(mem / unit)`` with ``unit = max(total, 1) / 2^40``.  Rounding node memory up and the
budget ``B = floor((budget - offset) / unit)`` down means a returned choice never exceeds the
budget.  The gap is ``(objective - best bound) / |objective|`` in the scaled units.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
import time
from dataclasses import dataclass

import numpy as np
from ortools.sat.python import cp_model

from autoplan.errors import AutoplanError
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
)


@dataclass
class _Model:
    model: cp_model.CpModel
    x: list[dict[int, cp_model.IntVar]]  # node -> strategy -> Boolean
    y: dict[tuple[int, int], dict[tuple[int, int], cp_model.IntVar]]  # edge -> pair -> Boolean


@dataclass(frozen=True)
class _Result:
    status: int
    choice: tuple[int, ...] | None
    gap: float


def solve_ilp(
    p: Problem, *, time_limit_s: float = 30.0, threads: int = 1, hint: Sequence[int] | None = None
) -> Solution:
    """Optimum (up to the time limit; see ``Solution.gap``) by CP-SAT.

    ``hint``: a choice to start from (e.g. the Lagrangian's best plan that fits).
    """
    started = time.perf_counter()
    p.validate()
    edges = merge_edges(p)
    m = _build(p, edges)
    _add_cost_objective(p, edges, m)
    _add_memory_budget(p, m)
    if hint is not None:
        _add_hint(m, hint)
    result = _run(m, time_limit_s, threads)
    if result.status == cp_model.INFEASIBLE:
        remaining = max(time_limit_s - (time.perf_counter() - started), 1.0)
        raise _infeasibility(p, edges, remaining, threads)
    if result.choice is None:
        raise AutoplanError(
            f"the ILP solver found no plan within {time_limit_s:g} s; raise the time limit"
        )
    solution = make_solution(p, result.choice, "ilp", started, result.gap)
    if not fits(p, solution.mem):
        raise RuntimeError(f"ILP returned a plan over budget ({solution.mem} bytes)")
    return solution


def _add_hint(m: _Model, hint: Sequence[int]) -> None:
    for strategies, a in zip(m.x, hint):
        for b, var in strategies.items():
            m.model.add_hint(var, b == a)
    for (u, v), pairs in m.y.items():
        for (a, b), var in pairs.items():
            m.model.add_hint(var, a == hint[u] and b == hint[v])


def _build(p: Problem, edges: EdgeMap) -> _Model:
    model = cp_model.CpModel()
    x = [
        {a: model.new_bool_var(f"x_{i}_{a}") for a in np.flatnonzero(np.isfinite(cost)).tolist()}
        for i, cost in enumerate(p.node_cost)
    ]
    # [Constraint] one strategy per node
    for strategies in x:
        model.add_exactly_one(strategies.values())
    y: dict[tuple[int, int], dict[tuple[int, int], cp_model.IntVar]] = {}
    for (u, v), matrix in edges.items():
        pairs = {
            (a, b): model.new_bool_var(f"y_{u}_{v}_{a}_{b}")
            for a in x[u]
            for b in x[v]
            if math.isfinite(matrix[a, b])
        }
        y[(u, v)] = pairs
        # [Constraint] edge pairs agree with u's strategy: sum_b y[e,a,b] == x[u,a]
        for a, var in x[u].items():
            model.add(sum(pairs[a, b] for b in x[v] if (a, b) in pairs) == var)
        # [Constraint] edge pairs agree with v's strategy: sum_a y[e,a,b] == x[v,b]
        for b, var in x[v].items():
            model.add(sum(pairs[a, b] for a in x[u] if (a, b) in pairs) == var)
    return _Model(model, x, y)


def _cost_scale(p: Problem, edges: EdgeMap) -> tuple[float, float]:
    """(largest finite |cost|, integer steps it maps to); weight = round(cost / largest * steps)."""
    finite = [c[np.isfinite(c)] for c in (*p.node_cost, *edges.values())]
    largest = max((float(np.max(np.abs(f))) for f in finite if f.size), default=0.0)
    if largest == 0.0:
        return 1.0, 1.0
    active_terms = len(p.node_cost) + len(edges)
    all_terms = sum(f.size for f in finite)
    return largest, min(2.0**53 / max(active_terms, 1), 2.0**61 / max(all_terms, 1))


def _add_cost_objective(p: Problem, edges: EdgeMap, m: _Model) -> None:
    largest, steps = _cost_scale(p, edges)
    variables: list[cp_model.IntVar] = []
    weights: list[int] = []
    for cost, strategies in zip(p.node_cost, m.x):
        for a, var in strategies.items():
            variables.append(var)
            weights.append(round(float(cost[a]) / largest * steps))
    for key, pairs in m.y.items():
        for (a, b), var in pairs.items():
            variables.append(var)
            weights.append(round(float(edges[key][a, b]) / largest * steps))
    # [Objective] scaled node costs + scaled edge-pair costs
    m.model.minimize(cp_model.LinearExpr.weighted_sum(variables, weights))


def _memory_weights(p: Problem) -> tuple[float, list[np.ndarray]]:
    """(unit in bytes, integer node memory rounded up to units)."""
    total = sum(float(np.max(mem)) for mem in p.node_mem)
    integral = all(bool(np.all(np.floor(mem) == mem)) for mem in p.node_mem)
    unit = 1.0 if integral and total < 2.0**52 else max(total, 1.0) / 2.0**40
    return unit, [np.ceil(mem / unit).astype(np.int64) for mem in p.node_mem]


def _memory_expr(m: _Model, weights: list[np.ndarray]) -> cp_model.LinearExpr:
    variables = [var for strategies in m.x for var in strategies.values()]
    coeffs = [int(w[a]) for w, strategies in zip(weights, m.x) for a in strategies]
    return cp_model.LinearExpr.weighted_sum(variables, coeffs)


def _add_memory_budget(p: Problem, m: _Model) -> None:
    limit = mem_limit(p)
    if limit is None:
        return
    unit, weights = _memory_weights(p)
    most = sum(int(w.max()) for w in weights)
    budget = math.floor((limit - p.mem_offset) / unit) if math.isfinite(limit) else most
    # [Constraint] memory budget (node memory rounded up, budget rounded down)
    m.model.add(_memory_expr(m, weights) <= max(min(budget, most), -1))


def _run(m: _Model, time_limit_s: float, threads: int) -> _Result:
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = float(time_limit_s)
    solver.parameters.num_workers = int(threads)
    # Keep the compact formulation intact: presolve rewrites "sum_b y == x" into exactly-one
    # clauses whose LP relaxation is much weaker, and lazy LP rows delay the (on trees exact)
    # bound.  On a 200 x 8 chain this takes CP-SAT from no proof in 20 s to optimal in ~1 s.
    solver.parameters.cp_model_presolve = False
    solver.parameters.add_lp_constraints_lazily = False
    status = solver.solve(m.model)
    if status == cp_model.MODEL_INVALID:
        raise RuntimeError(f"invalid CP-SAT model: {m.model.validate()}")
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return _Result(status, None, math.inf)
    choice = tuple(
        next(a for a, var in strategies.items() if solver.boolean_value(var)) for strategies in m.x
    )
    if status == cp_model.OPTIMAL:
        return _Result(status, choice, 0.0)
    objective, bound = solver.objective_value, solver.best_objective_bound
    return _Result(status, choice, max(objective - bound, 0.0) / max(abs(objective), 1.0))


def _infeasibility(p: Problem, edges: EdgeMap, time_limit_s: float, threads: int) -> Exception:
    """The InfeasibleError for an infeasible model: solve for the smallest legal memory."""
    m = _build(p, edges)
    _, weights = _memory_weights(p)
    # [Objective] smallest memory of any legal (finite-cost) choice
    m.model.minimize(_memory_expr(m, weights))
    result = _run(m, time_limit_s, threads)
    if result.status == cp_model.INFEASIBLE:
        return illegal_error()
    if result.choice is None:
        return AutoplanError(
            f"the ILP solver could not find the smallest plan within {time_limit_s:g} s"
        )
    return budget_error(p, p.evaluate(result.choice)[1])
