"""Outer search: meshes x micro-batches x recompute around the exact per-layer sharding solve.

Every configuration's unconstrained optimum (exact, ``solve_reduced``) is a lower bound of its
memory-constrained optimum. Configurations are visited cheapest bound first; one whose
unconstrained optimum fits is optimal for itself, one that does not goes to the ILP with the
memory budget, and the search stops when the next bound is no better than the best plan that
fits (branch and bound: the result is the exact optimum over the enumerated space).
"""
from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from autoplan.baselines import Allow, family_masks
from autoplan.cost.model import Priced, StepConfig, assemble, price_mesh
from autoplan.errors import AutoplanError, InfeasibleError
from autoplan.graph import OpGraph
from autoplan.hardware import Cluster
from autoplan.mesh import Mesh, candidate_meshes, divisors
from autoplan.repeats import Tying
from autoplan.solve import Problem, Solution, solve_dp, solve_ilp
from autoplan.solve.budgeted import TOLERANCE, lagrangian, min_memory
from autoplan.solve.problem import format_bytes, make_solution
from autoplan.solve.eliminate import lower_bound
from autoplan.solve.reduce import reduce_problem, solve_reduced


@dataclass(frozen=True)
class SearchOptions:
    dtype: str = "bf16"  # compute dtype: bf16 | fp16 | fp32
    micro_batches: tuple[int, ...] | None = None  # gradient-accumulation counts to try; None = every divisor of the global batch (up to max_micro_batches)
    max_micro_batches: int = 64  # largest accumulation count tried when searching
    recompute: tuple[bool, ...] = (False, True)  # whole-block activation recompute choices to try
    solver: str = "auto"  # auto (reduce+DP, ILP under memory pressure) | dp | ilp
    time_limit_s: float = 60.0  # per ILP solve
    memory_bytes: float | None = None  # override the profile's usable memory per device (what-if)
    threads: int = 2  # CP-SAT workers
    attention: str = "flash"  # attention kernel: flash (fused) | unfused (scores materialised)


@dataclass
class Evaluated:
    mesh: Mesh
    cfg: StepConfig
    priced: Priced
    solution: Solution
    lower_bound_s: float  # unconstrained optimum of this configuration


@dataclass
class SearchResult:
    best: Evaluated
    evaluated: list[Evaluated]  # every configuration that produced a plan that fits, best first
    configurations: int  # configurations enumerated
    solved: int  # configurations that needed a memory-constrained solve
    seconds: float
    solvers: dict[str, float] = field(default_factory=dict)  # solver -> seconds spent




def _restrict(priced: Priced, masks: list[np.ndarray]) -> Priced:
    p = priced.problem
    costs = tuple(np.where(mask, c, np.inf) for c, mask in zip(p.node_cost, masks))
    priced.problem = Problem(costs, p.node_mem, p.edges, mem_budget=p.mem_budget, mem_offset=p.mem_offset)
    return priced


RUNNERS_UP = 3  # plans kept beside the best, for the report


def micro_batch_counts(global_batch: int, options: SearchOptions) -> list[int]:
    if options.micro_batches is not None:
        bad = [m for m in options.micro_batches if m < 1 or global_batch % m]
        if bad:
            raise AutoplanError(f"micro-batch count {bad[0]} does not divide the global batch {global_batch}: pick a divisor")
        return list(options.micro_batches)
    return [m for m in divisors(global_batch) if m <= options.max_micro_batches]


def memory_budget(cluster: Cluster, options: SearchOptions) -> float:
    return options.memory_bytes if options.memory_bytes is not None else cluster.device.usable_memory_bytes


def _solve_constrained(priced: Priced, options: SearchOptions, hint: list[int] | None = None) -> Solution:
    """Exact memory-constrained optimum: CP-SAT on the reduced problem (or the Pareto DP)."""
    started = time.perf_counter()
    red = reduce_problem(priced.problem)
    if options.solver == "dp":
        sol = solve_dp(red.problem)
    else:
        sol = solve_ilp(red.problem, time_limit_s=options.time_limit_s, threads=options.threads, hint=hint)
    return make_solution(priced.problem, red.expand(sol.choice), sol.solver, started, sol.gap)


def _unconstrained(priced: Priced, solver_seconds: dict[str, float]) -> Solution | None:
    """The configuration's optimum without the memory limit (exact; a lower bound of the limited one)."""
    p = priced.problem
    try:
        sol = solve_reduced(Problem(p.node_cost, p.node_mem, p.edges))
    except InfeasibleError:
        return None
    solver_seconds["dp"] = solver_seconds.get("dp", 0.0) + sol.seconds
    return sol


def dominates(cheap: Problem, dear: Problem) -> bool:
    """Is every cost of ``dear`` (each node strategy, each edge pair) at least ``cheap``'s, on the same graph?
    Then ``dear``'s optimum is at least ``cheap``'s: a lower bound without solving ``dear``."""
    if len(cheap.node_cost) != len(dear.node_cost) or len(cheap.edges) != len(dear.edges):
        return False
    for a, b in zip(cheap.node_cost, dear.node_cost):
        if a.shape != b.shape or not np.all(b >= a):
            return False
    for (u, v, a), (x, y, b) in zip(cheap.edges, dear.edges):
        if (u, v) != (x, y) or a.shape != b.shape or not np.all(b >= a):
            return False
    return True


def _bound(priced: Priced, solver_seconds: dict[str, float]) -> tuple[float, Solution | None]:
    """The unconstrained optimum where elimination or the DP finds it quickly; else a mini-bucket lower
    bound (the exact solve, CP-SAT, waits until the branch and bound reaches the configuration)."""
    p = priced.problem
    free = Problem(p.node_cost, p.node_mem, p.edges)
    started = time.perf_counter()
    try:
        sol = solve_reduced(free, ilp=False)
    except InfeasibleError:
        return float("inf"), None
    except ValueError:
        red = reduce_problem(free)
        bound = lower_bound(red.problem, max_table_size=10_000_000) + red.dropped_cost
        solver_seconds["bound"] = solver_seconds.get("bound", 0.0) + time.perf_counter() - started
        return bound, None
    solver_seconds["dp"] = solver_seconds.get("dp", 0.0) + sol.seconds
    return sol.cost, sol


class _Bounds(list):
    """The branch and bound's heap, and per mesh its first configuration."""

    def __init__(self) -> None:
        super().__init__()
        self.base: dict[Mesh, tuple[Priced, float, Solution | None, bool]] = {}  # bound, solution, bound is exact


def _tighten(base: dict, msh: Mesh, solver_seconds: dict[str, float]) -> tuple[Priced, float, Solution | None]:
    """The mesh's first configuration solved exactly (once; before, its bound may be a mini-bucket one):
    (its priced problem, its optimum, its solution), the bound of every configuration that dominates it."""
    first, bound, sol, exact = base[msh]
    if not exact:
        sol = _unconstrained(first, solver_seconds)
        base[msh] = (first, sol.cost if sol is not None else float("inf"), sol, True)
    return base[msh][0], base[msh][1], base[msh][2]


def _lazy_bounds(configs, pricings, tying, budget, masks, solver_seconds, progress) -> "_Bounds":
    """A heap of (lower bound, tie-break, mesh, config, priced, unconstrained solution or None).

    Per mesh the first configuration (fewest micro-batches, no recompute) is bounded (solved, where that is
    quick); a configuration whose every cost is at least that one's (more micro-batches or recompute only
    add work) borrows its bound, and is solved only if the branch and bound reaches it."""
    heap = _Bounds()
    base = heap.base
    for done, (msh, cfg) in enumerate(configs):
        if progress is not None:
            progress("configurations", done, len(configs))
        priced = assemble(pricings[msh], tying, cfg, budget)
        if masks:
            priced = _restrict(priced, masks[msh])
        first = base.get(msh)
        if first is not None and dominates(first[0].problem, priced.problem):
            if first[1] < float("inf"):
                heapq.heappush(heap, (first[1], done, msh, cfg, priced, None))
            continue
        bound, sol = _bound(priced, solver_seconds)
        if first is None:
            base[msh] = (priced, bound, sol, sol is not None or bound == float("inf"))
        if bound < float("inf"):
            heapq.heappush(heap, (bound, done, msh, cfg, priced, sol))
    return heap


def search(
    graph: OpGraph,
    tying: Tying,
    cluster: Cluster,
    *,
    devices: int,
    global_batch: int,
    mesh: Mesh | None = None,
    meshes: list[Mesh] | None = None,
    options: SearchOptions = SearchOptions(),
    allow: Allow | None = None,
    cache: dict | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> SearchResult:
    """The best configuration over meshes x micro-batches x recompute (see the module docstring).

    ``allow(node, strategy)`` restricts the strategies of some ops (how baselines are priced).
    """
    started = time.perf_counter()
    budget = memory_budget(cluster, options)
    if meshes is None:
        meshes = [mesh] if mesh is not None else candidate_meshes(devices, cluster.devices_per_node)
    recomputes = options.recompute if tying.groups else (False,)
    counts = micro_batch_counts(global_batch, options)
    cache = {} if cache is None else cache  # mesh pricings, shared by the plan's and the baselines' searches
    pricings = {}
    for i, msh in enumerate(meshes):
        if progress is not None:
            progress("pricing meshes", i, len(meshes))
        key = (msh.shape, options.dtype, options.attention)
        if key not in cache:
            cache[key] = price_mesh(graph, tying, msh, cluster, options.dtype, attention=options.attention)
        pricings[msh] = cache[key]
    masks = {msh: family_masks(graph, pricings[msh].reps, pricings[msh].strategies, allow) for msh in meshes} if allow else {}
    configs = [(msh, StepConfig(global_batch, m, rc, options.dtype)) for msh in meshes for m in counts for rc in recomputes]
    solver_seconds: dict[str, float] = {}
    bounds = _lazy_bounds(configs, pricings, tying, budget, masks, solver_seconds, progress)
    evaluated: list[Evaluated] = []
    min_mem = float("inf")
    solved = 0
    incumbent = float("inf")
    pending = []  # (lower bound, config) whose Lagrangian bound did not close: the ILP decides
    while bounds:
        bound, order, msh, cfg, priced, sol = heapq.heappop(bounds)
        if bound >= incumbent and (len(evaluated) >= RUNNERS_UP or sol is None):
            break  # nothing left can beat the best; runners-up are those already solved
        if sol is None:  # a lower bound only: tighten it, and visit the configuration in order
            first, base_bound, base_sol = _tighten(bounds.base, msh, solver_seconds)
            if first is priced and base_sol is not None:  # the mesh's first configuration, now solved
                heapq.heappush(bounds, (base_bound, order, msh, cfg, priced, base_sol))
                continue
            if base_bound > bound:  # borrowed from the first configuration's bound, now exact
                heapq.heappush(bounds, (base_bound, order, msh, cfg, priced, None))
                continue
            sol = _unconstrained(priced, solver_seconds)
            if sol is not None:
                heapq.heappush(bounds, (sol.cost, order, msh, cfg, priced, sol))
            continue
        floor = min_memory(priced.problem)
        if floor > budget:
            min_mem = min(min_mem, floor)
            continue
        if sol.mem <= budget:
            evaluated.append(Evaluated(msh, cfg, priced, sol, bound))
            incumbent = min(incumbent, sol.cost)
            continue
        if options.solver != "auto":
            pending.append((bound, msh, cfg, priced, None))
            continue
        t0 = time.perf_counter()
        red = reduce_problem(priced.problem)
        choice, lower = lagrangian(red.problem)
        solver_seconds["lagrangian"] = solver_seconds.get("lagrangian", 0.0) + time.perf_counter() - t0
        if choice is not None:
            full = red.expand(tuple(choice))
            cand = make_solution(priced.problem, full, "dp", t0, 0.0)
            closed = cand.cost - lower <= TOLERANCE * abs(cand.cost)
            if not closed:
                cand = Solution(cand.choice, cand.cost, cand.mem, cand.solver, cand.seconds, (cand.cost - lower) / cand.cost)
            evaluated.append(Evaluated(msh, cfg, priced, cand, bound))
            incumbent = min(incumbent, cand.cost)
            if closed:
                continue
        pending.append((max(bound, lower), msh, cfg, priced, choice))
    pending.sort(key=lambda p: p[0])
    for lower, msh, cfg, priced, hint in pending:
        if lower >= incumbent:
            break
        solved += 1
        try:
            sol = _solve_constrained(priced, options, hint)
        except InfeasibleError as exc:
            if exc.min_memory_bytes is not None:
                min_mem = min(min_mem, exc.min_memory_bytes)
            continue
        solver_seconds[sol.solver] = solver_seconds.get(sol.solver, 0.0) + sol.seconds
        evaluated = [e for e in evaluated if not (e.mesh == msh and e.cfg == cfg)]
        evaluated.append(Evaluated(msh, cfg, priced, sol, lower))
        incumbent = min(incumbent, sol.cost)
    evaluated.sort(key=lambda e: e.solution.cost)
    if not evaluated:
        need = f"the smallest plan needs {format_bytes(min_mem)}" if min_mem < float("inf") else "no sharding is legal"
        raise InfeasibleError(
            f"no plan fits in {format_bytes(budget)} per device on {devices} devices: {need}; "
            "add devices, raise micro-batches, or use a device with more memory",
            min_memory_bytes=min_mem if min_mem < float("inf") else None,
        )
    return SearchResult(evaluated[0], evaluated, len(configs), solved, time.perf_counter() - started, solver_seconds)
