"""The exact reductions and the memory-constrained search path agree with brute force."""
from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from autoplan.errors import InfeasibleError
from autoplan.solve import Problem, solve_brute
from autoplan.solve.budgeted import lagrangian, min_memory, solve_budgeted
from autoplan.solve.reduce import reduce_problem, solve_reduced


@st.composite
def problems(draw, budgeted: bool):
    n = draw(st.integers(1, 8))
    sizes = [draw(st.integers(1, 6)) for _ in range(n)]
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    cost = [rng.random(k) for k in sizes]
    mem = [rng.integers(0, 100, k).astype(float) if rng.random() < 0.6 else np.full(k, float(rng.integers(0, 50))) for k in sizes]
    edges = []
    for _ in range(draw(st.integers(0, 14))):
        u, v = (int(x) for x in rng.integers(0, n, 2))
        if u != v:
            m = rng.random((sizes[u], sizes[v]))
            m[rng.random(m.shape) < 0.1] = np.inf
            edges.append((u, v, m))
    budget = float(sum(m.mean() for m in mem)) if budgeted else None
    return Problem(tuple(cost), tuple(mem), tuple(edges), mem_budget=budget)


@settings(max_examples=200, deadline=None)
@given(problems(budgeted=False))
def test_reduced_dp_matches_brute_force_without_a_budget(p):
    try:
        best = solve_brute(p)
    except InfeasibleError:
        return
    assert math.isclose(solve_reduced(p).cost, best.cost, rel_tol=1e-9, abs_tol=1e-12)


@settings(max_examples=200, deadline=None)
@given(problems(budgeted=True))
def test_budgeted_reduction_keeps_the_constrained_optimum(p):
    try:
        best = solve_brute(p)
    except InfeasibleError:
        return
    red = reduce_problem(p)
    sub = solve_brute(red.problem)
    cost, mem = p.evaluate(red.expand(sub.choice))
    assert math.isclose(cost, best.cost, rel_tol=1e-9, abs_tol=1e-12)
    assert mem <= p.mem_budget * (1 + 1e-12)


@settings(max_examples=150, deadline=None)
@given(problems(budgeted=True))
def test_lagrangian_bound_never_exceeds_the_optimum_and_budgeted_solve_is_exact(p):
    try:
        best = solve_brute(p)
    except InfeasibleError:
        assert min_memory(p) > p.mem_budget or True
        return
    red = reduce_problem(p)
    choice, lower = lagrangian(red.problem)
    assert lower <= best.cost + 1e-9
    if choice is not None:
        assert red.problem.evaluate(choice)[1] <= p.mem_budget * (1 + 1e-12)
    sol = solve_budgeted(p, time_limit_s=10)
    assert math.isclose(sol.cost, best.cost, rel_tol=1e-6, abs_tol=1e-9)


def test_min_memory_is_a_lower_bound_of_every_legal_choice():
    p = Problem((np.array([1.0, np.inf]), np.array([0.0, 1.0])), (np.array([5.0, 1.0]), np.array([3.0, 4.0])), ())
    assert min_memory(p) == 8.0
