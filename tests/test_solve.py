"""Solvers on plain arrays: DP and ILP agree with brute force, errors are exact and clear."""
from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from autoplan.errors import InfeasibleError
from autoplan.solve import Problem, Solution, dp_table_size, solve_brute, solve_dp, solve_eliminate, solve_ilp
from autoplan.solve.eliminate import lower_bound, undominated

Solver = Callable[[Problem], Solution]
SETTINGS = settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
INF = np.inf


@st.composite
def problems(draw: st.DrawFn, budgeted: bool) -> Problem:
    """1..8 nodes, 1..6 strategies, random (parallel, cyclic or no) edges, some np.inf.

    Costs lie in [0, 1]: drawn by hypothesis (edge cases such as 0, 1, tiny and repeated
    values), or for speed from a seeded generator as uniform floats or multiples of 1/8 (many
    ties).  Memory is whole bytes, so every solver sees the same budget boundary exactly.
    """
    n = draw(st.integers(1, 8))
    sizes = draw(st.lists(st.integers(1, 6), min_size=n, max_size=n))
    style = draw(st.sampled_from(["hypothesis", "uniform", "grid"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    inf_rate = draw(st.sampled_from([0.0, 0.05, 0.15, 0.4]))

    def costs(shape: tuple[int, ...]) -> np.ndarray:
        if style == "hypothesis":
            array = draw(arrays(np.float64, shape, elements=st.floats(0.0, 1.0)))
        elif style == "uniform":
            array = rng.random(shape)
        else:
            array = rng.integers(0, 9, shape) / 8
        return np.where(rng.random(shape) < inf_rate, INF, array)

    node_cost = tuple(costs((k,)) for k in sizes)
    node_mem = tuple(
        draw(arrays(np.float64, (k,), elements=st.integers(0, 50).map(float))) for k in sizes
    )
    ends = st.tuples(st.integers(0, n - 1), st.integers(1, max(n - 1, 1)))
    pairs = draw(st.lists(ends, max_size=12)) if n > 1 else []
    edges = tuple(
        (u, (u + step) % n, costs((sizes[u], sizes[(u + step) % n]))) for u, step in pairs
    )
    budget, offset = None, 0.0
    if budgeted:
        offset = float(draw(st.integers(0, 20)))
        low = offset + sum(m.min() for m in node_mem)
        high = offset + sum(m.max() for m in node_mem)
        budget = float(math.floor(low + (high - low) * draw(st.integers(-5, 60)) / 100))
    return Problem(node_cost, node_mem, edges, mem_budget=budget, mem_offset=offset)


def assert_matches_brute_force(p: Problem, solve: Solver) -> None:
    try:
        expected = solve_brute(p)
    except InfeasibleError as err:
        with pytest.raises(InfeasibleError) as got:
            solve(p)
        if err.min_memory_bytes is None:
            assert got.value.min_memory_bytes is None
        else:
            assert got.value.min_memory_bytes == pytest.approx(err.min_memory_bytes, rel=1e-12)
        return
    got = solve(p)
    assert math.isclose(got.cost, expected.cost, rel_tol=1e-6, abs_tol=1e-12)
    assert (got.cost, got.mem) == p.evaluate(got.choice)
    assert got.gap == 0.0
    if p.mem_budget is not None:
        assert got.mem <= p.mem_budget


@SETTINGS
@given(problems(budgeted=False))
def test_dp_matches_brute_force_unconstrained(p: Problem) -> None:
    assert_matches_brute_force(p, solve_dp)


@SETTINGS
@given(problems(budgeted=False))
def test_variable_elimination_matches_brute_force_unconstrained(p: Problem) -> None:
    assert_matches_brute_force(p, solve_eliminate)


@SETTINGS
@given(problems(budgeted=False), st.sampled_from([1, 6, 36, 10**6]))
def test_mini_bucket_bound_never_exceeds_the_optimum_and_is_exact_when_no_bucket_splits(p: Problem, limit: int) -> None:
    try:
        best = solve_brute(p).cost
    except InfeasibleError:
        assert lower_bound(p, max_table_size=limit) == math.inf
        return
    bound = lower_bound(p, max_table_size=limit)
    assert bound <= best + 1e-9 * max(1.0, abs(best))
    if limit == 10**6:  # every table fits: elimination is exact
        assert bound == pytest.approx(best, rel=1e-9, abs=1e-12)


@SETTINGS
@given(problems(budgeted=False))
def test_dropping_dominated_strategies_keeps_an_optimum(p: Problem) -> None:
    try:
        best = solve_brute(p).cost
    except InfeasibleError:
        return
    keep = undominated(p, [np.arange(k) for k in p.sizes])
    sub = Problem(tuple(c[k] for c, k in zip(p.node_cost, keep)), tuple(m[k] for m, k in zip(p.node_mem, keep)),
                  tuple((u, v, m[np.ix_(keep[u], keep[v])]) for u, v, m in p.edges))
    assert solve_brute(sub).cost == pytest.approx(best, rel=1e-9, abs=1e-12)


def test_variable_elimination_keeps_tables_small_where_every_block_reads_one_shared_node() -> None:
    """A mask read by each of 24 chained blocks: the path-ordered DP's sets grow, elimination's do not."""
    rng = np.random.default_rng(0)
    blocks, k = 24, 6
    n = 2 * blocks + 1  # node 0 is the shared mask; blocks are (attention, mlp) pairs in a chain
    edges = [(0, 1 + 2 * b, rng.random((k, k))) for b in range(blocks)]
    edges += [(i, i + 1, rng.random((k, k))) for i in range(1, n - 1)]
    p = Problem(tuple(rng.random(k) for _ in range(n)), tuple(np.zeros(k) for _ in range(n)), tuple(edges))
    got = solve_eliminate(p, max_table_size=k ** 3)
    assert got.solver == "eliminate" and got.cost == pytest.approx(solve_ilp(p).cost, rel=1e-9)


@SETTINGS
@given(problems(budgeted=True))
def test_dp_matches_brute_force_under_memory_budget(p: Problem) -> None:
    assert_matches_brute_force(p, solve_dp)


@settings(max_examples=150, deadline=None)
@given(problems(budgeted=True))
def test_dp_matches_brute_force_when_only_the_forward_tables_fit(p: Problem) -> None:
    """With the table limit at the forward DP's own size, the reverse bounds fall back to
    cheaper scalar bounds; the result must stay exact."""
    assert_matches_brute_force(p, lambda q: solve_dp(q, max_table_size=dp_table_size(q)))


@SETTINGS
@given(problems(budgeted=False))
def test_ilp_matches_brute_force_unconstrained(p: Problem) -> None:
    assert_matches_brute_force(p, solve_ilp)


@SETTINGS
@given(problems(budgeted=True))
def test_ilp_matches_brute_force_under_memory_budget(p: Problem) -> None:
    assert_matches_brute_force(p, solve_ilp)


@settings(max_examples=100, deadline=None)
@given(problems(budgeted=True))
def test_brute_force_matches_pure_python_enumeration(p: Problem) -> None:
    assume(math.prod(p.sizes) <= 2000)
    scored = [(*p.evaluate(c), c) for c in itertools.product(*(range(k) for k in p.sizes))]
    legal = [s for s in scored if math.isfinite(s[0])]
    fitting = [s for s in legal if s[1] <= p.mem_budget]
    if fitting:
        assert solve_brute(p).cost == pytest.approx(min(s[0] for s in fitting), rel=1e-12, abs=1e-12)  # sums in another order
    else:
        with pytest.raises(InfeasibleError) as err:
            solve_brute(p)
        expected = min((s[1] for s in legal), default=None)
        assert err.value.min_memory_bytes == expected


@settings(max_examples=100, deadline=None)
@given(problems(budgeted=False))
def test_dp_cost_to_go_bounds_are_exact_or_below_the_true_remaining_cost(p: Problem) -> None:
    """The budgeted DP prunes with per-step bounds on the cost still to come; they must never
    exceed the truth (exact when affordable, cheaper scalar fallbacks otherwise)."""
    from autoplan.solve.dp import _dependent_axes, _plan, _schedule, _to_go

    assume(math.prod(p.sizes) <= 500)
    edges, adjacency, steps = _plan(p)
    order = [s.vertex for s in steps]
    past = _dependent_axes(steps)
    truth: list[dict[tuple[int, ...], float]] = [{} for _ in steps]
    for choice in itertools.product(*(range(k) for k in p.sizes)):
        for i in range(len(steps)):
            future = set(order[i + 1 :])
            rest = sum(p.node_cost[v][choice[v]] for v in future) + sum(
                m[choice[a], choice[b]] for (a, b), m in edges.items() if a in future or b in future
            )
            key = tuple(choice[a] for a in past[i])
            truth[i][key] = min(truth[i].get(key, INF), rest)
    reverse = _schedule(p.sizes, adjacency, order[::-1])
    sweep = max((s.table_size for s in reverse), default=1)  # reverse DP affordable from here
    joins = [1]  # dense join at step i: dependent set x the unprocessed vertices it touches
    for i in range(len(steps)):
        done = set(order[: i + 1])
        touched = {f for f in order[i + 1 :] if adjacency[f] & done}
        joins.append(math.prod(p.sizes[v] for v in (*past[i], *touched)))
    caps = [(10**9, True), (sweep, False), (max(sweep, max(joins) - 1), False), (1, False)]
    for cap, exact in caps:
        bounds = _to_go(p.sizes, steps, adjacency, p.node_cost, edges, cap)
        for i, expected in enumerate(truth):
            for key, value in expected.items():
                got = bounds[i][key] if isinstance(bounds[i], np.ndarray) else bounds[i]
                if exact:
                    assert got == pytest.approx(value, rel=1e-9, abs=1e-12)
                else:
                    assert got <= value + 1e-9


@settings(max_examples=150, deadline=None)
@given(problems(budgeted=True), st.floats(0.0, 0.1))
def test_dp_frontier_keeps_the_optimum_for_any_memory_price(p: Problem, price: float) -> None:
    """The frontier DP prunes with a Lagrangian bound that is valid for every price >= 0: given
    an incumbent that costs exactly the optimum, the optimal path must never be pruned."""
    from autoplan.solve.dp import _legal_mem, _pareto, _plan, _to_go

    try:
        best = solve_brute(p)
    except InfeasibleError:
        return
    edges, adjacency, steps = _plan(p)
    legal_mem, legal_edges = _legal_mem(p, edges)
    priced = [c + price * m for c, m in zip(p.node_cost, p.node_mem)]
    to_go = (
        _to_go(p.sizes, steps, adjacency, priced, edges, 10**9),
        _to_go(p.sizes, steps, adjacency, legal_mem, legal_edges, 10**9),
    )
    choice = _pareto(p, steps, edges, to_go, price, best.cost)
    assert choice is not None
    assert p.evaluate(choice)[0] == pytest.approx(best.cost, rel=1e-9, abs=1e-12)


def chain(n: int, k: int, seed: int, budget: float | None = None) -> Problem:
    rng = np.random.default_rng(seed)
    return Problem(
        node_cost=tuple(rng.random(k) for _ in range(n)),
        node_mem=tuple(rng.integers(0, 100, k).astype(float) for _ in range(n)),
        edges=tuple((i, i + 1, rng.random((k, k))) for i in range(n - 1)),
        mem_budget=budget,
    )


def viterbi(p: Problem) -> float:
    best = p.node_cost[0].copy()
    for (_, _, matrix), cost in zip(p.edges, p.node_cost[1:]):
        best = (best[:, None] + matrix).min(axis=0) + cost
    return float(best.min())


def test_dp_solves_200_node_chain_like_viterbi() -> None:
    p = chain(200, 8, seed=1)
    assert dp_table_size(p) == 64
    got = solve_dp(p)
    assert got.cost == pytest.approx(viterbi(p), rel=1e-12)
    assert (got.cost, got.mem) == p.evaluate(got.choice)


def test_dp_matches_ilp_on_chain_under_tight_memory_budget() -> None:
    free = solve_dp(chain(30, 4, seed=2))
    p = chain(30, 4, seed=2, budget=free.mem - 200)
    dp, ilp = solve_dp(p), solve_ilp(p)
    assert dp.mem <= p.mem_budget and ilp.mem <= p.mem_budget
    assert dp.cost == pytest.approx(ilp.cost, rel=1e-9)
    assert dp.cost > free.cost


def test_dp_table_size_stays_small_for_relabelled_chains_stars_and_cycles() -> None:
    rng = np.random.default_rng(3)
    labels = rng.permutation(50)
    relabelled_chain = Problem(
        tuple(np.zeros(4) for _ in range(50)),
        tuple(np.zeros(4) for _ in range(50)),
        tuple((int(labels[i]), int(labels[i + 1]), np.zeros((4, 4))) for i in range(49)),
    )
    star = Problem(
        tuple(np.zeros(3) for _ in range(20)),
        tuple(np.zeros(3) for _ in range(20)),
        tuple((0, i, np.zeros((3, 3))) for i in range(1, 20)),
    )
    cycle = Problem(
        tuple(np.zeros(5) for _ in range(12)),
        tuple(np.zeros(5) for _ in range(12)),
        tuple((i, (i + 1) % 12, np.zeros((5, 5))) for i in range(12)),
    )
    isolated = Problem((np.zeros(7),) * 3, (np.zeros(7),) * 3, ())
    assert dp_table_size(relabelled_chain) == 16
    assert dp_table_size(star) == 9
    assert dp_table_size(cycle) == 125
    assert dp_table_size(isolated) == 7


def test_dp_refuses_tables_above_the_limit() -> None:
    with pytest.raises(ValueError, match="table"):
        solve_dp(chain(5, 8, seed=4), max_table_size=10)


def test_infeasible_budget_reports_smallest_legal_plan_in_one_line() -> None:
    gib = 2.0**30
    p = Problem(
        node_cost=(np.array([1.0, INF]), np.array([1.0, 2.0])),  # 10 GiB option is illegal
        node_mem=(np.array([60 * gib, 10 * gib]), np.array([30 * gib, 35 * gib])),
        edges=(),
        mem_budget=80 * gib,
        mem_offset=5 * gib,
    )
    for solve in (solve_brute, solve_dp, solve_ilp):
        with pytest.raises(InfeasibleError) as err:
            solve(p)
        assert err.value.min_memory_bytes == 95 * gib
        assert str(err.value) == (
            "no sharding fits in 80.0 GiB per device: the smallest plan needs 95.0 GiB"
        )


@pytest.mark.parametrize("solve", [solve_brute, solve_dp, solve_ilp])
def test_all_illegal_choices_raise_infeasible_without_min_memory(solve: Solver) -> None:
    p = Problem(
        node_cost=(np.array([1.0, 2.0]), np.array([3.0, 4.0])),
        node_mem=(np.zeros(2), np.zeros(2)),
        edges=(  # parallel edges: each allows one pair, but not the same one
            (0, 1, np.array([[INF, 0.0], [INF, INF]])),
            (1, 0, np.array([[INF, INF], [INF, 0.0]])),
        ),
    )
    with pytest.raises(InfeasibleError, match="infinite cost") as err:
        solve(p)
    assert err.value.min_memory_bytes is None


@pytest.mark.parametrize("solve", [solve_brute, solve_dp, solve_ilp])
def test_empty_problem_costs_nothing_but_its_offset(solve: Solver) -> None:
    p = Problem((), (), (), mem_budget=100.0, mem_offset=40.0)
    assert solve(p).choice == () and solve(p).mem == 40.0
    with pytest.raises(InfeasibleError) as err:
        solve(dataclasses.replace(p, mem_budget=10.0))
    assert err.value.min_memory_bytes == 40.0


def test_ilp_never_exceeds_budget_with_fractional_memory() -> None:
    rng = np.random.default_rng(5)
    base = chain(6, 5, seed=5)
    mems = tuple(rng.random(5) * 1e9 for _ in range(6))
    free = solve_brute(dataclasses.replace(base, node_mem=mems))
    p = dataclasses.replace(base, node_mem=mems, mem_budget=free.mem * 0.8)
    got, best = solve_ilp(p), solve_brute(p)
    assert got.mem <= p.mem_budget
    assert got.cost == pytest.approx(best.cost, rel=1e-9)


@pytest.mark.parametrize("magnitude", [1e-9, 1.0, 1e9])
def test_ilp_cost_scaling_is_exact_for_any_magnitude(magnitude: float) -> None:
    p = chain(7, 4, seed=6)
    p = dataclasses.replace(
        p,
        node_cost=tuple(c * magnitude for c in p.node_cost),
        edges=tuple((u, v, m * magnitude) for u, v, m in p.edges),
    )
    assert solve_ilp(p).cost == pytest.approx(solve_brute(p).cost, rel=1e-9)


def test_evaluate_adds_parallel_edges_and_memory_offset() -> None:
    p = Problem(
        node_cost=(np.array([1.0, 2.0]), np.array([10.0, 20.0, 30.0])),
        node_mem=(np.array([5.0, 6.0]), np.array([7.0, 8.0, 9.0])),
        edges=(
            (0, 1, np.arange(6.0).reshape(2, 3)),
            (1, 0, 100 * np.arange(6.0).reshape(3, 2)),
        ),
        mem_offset=1000.0,
    )
    assert p.evaluate((1, 2)) == (2.0 + 30.0 + 5.0 + 500.0, 1000.0 + 6.0 + 9.0)


def test_brute_force_refuses_more_than_two_million_combinations() -> None:
    p = Problem(tuple(np.zeros(10) for _ in range(7)), tuple(np.zeros(10) for _ in range(7)), ())
    with pytest.raises(ValueError, match="combinations"):
        solve_brute(p)


@pytest.mark.parametrize(
    "node_cost, node_mem, edges",
    [
        ((np.zeros(2),), (np.zeros(2), np.zeros(2)), ()),  # node count differs
        ((np.zeros(2),), (np.zeros(3),), ()),  # strategy count differs
        ((np.zeros((2, 2)),), (np.zeros((2, 2)),), ()),  # not 1-D
        ((np.zeros(0),), (np.zeros(0),), ()),  # no strategy
        ((np.zeros(2), np.zeros(3)), (np.zeros(2), np.zeros(3)), ((0, 1, np.zeros((3, 2))),)),
        ((np.zeros(2), np.zeros(3)), (np.zeros(2), np.zeros(3)), ((0, 2, np.zeros((2, 3))),)),
        ((np.zeros(2), np.zeros(3)), (np.zeros(2), np.zeros(3)), ((1, 1, np.zeros((3, 3))),)),
        ((np.array([np.nan, 0.0]),), (np.zeros(2),), ()),  # NaN cost
        ((np.zeros(2),), (np.array([-1.0, 0.0]),), ()),  # negative memory
    ],
)
def test_validate_rejects_mismatched_shapes(
    node_cost: tuple, node_mem: tuple, edges: tuple
) -> None:
    p = Problem(node_cost, node_mem, edges)
    with pytest.raises(ValueError):
        p.validate()
    for solve in (solve_brute, solve_dp, solve_ilp):
        with pytest.raises(ValueError):
            solve(p)
