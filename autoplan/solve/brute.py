"""Exhaustive search: the reference the other solvers are tested against.

Every combination of strategies (the full ``itertools.product`` of the strategy ranges) is
scored at once in a dense numpy tensor with one axis per node, built straight from the raw
(unmerged) edge list, so it shares no code path with the DP or the ILP.  Refuses problems with
more than 2e6 combinations.
"""
from __future__ import annotations

import math
import time

import numpy as np

from autoplan.solve.problem import (
    Problem,
    Solution,
    budget_error,
    fits,
    illegal_error,
    make_solution,
)

MAX_COMBINATIONS = 2_000_000


def solve_brute(p: Problem) -> Solution:
    """Exact optimum by enumeration; raises ValueError if there are more than 2e6 combinations."""
    started = time.perf_counter()
    p.validate()
    sizes = p.sizes
    combinations = math.prod(sizes)
    if combinations > MAX_COMBINATIONS:
        raise ValueError(
            f"brute force would enumerate {combinations} combinations (limit {MAX_COMBINATIONS})"
        )
    cost = cost_tensor(p)
    legal = np.isfinite(cost)
    if not legal.any():
        raise illegal_error()
    if p.mem_budget is None:
        return make_solution(p, _argmin(cost), "brute", started, gap=0.0)
    mem = mem_tensor(p)
    feasible = legal & fits(p, mem)
    if not feasible.any():
        smallest = _argmin(np.where(legal, mem, np.inf))
        raise budget_error(p, p.evaluate(smallest)[1])
    return make_solution(p, _argmin(np.where(feasible, cost, np.inf)), "brute", started, gap=0.0)


def cost_tensor(p: Problem) -> np.ndarray:
    """Cost of every combination, shape ``p.sizes``."""
    sizes = p.sizes
    total = np.zeros(sizes)
    for i, cost in enumerate(p.node_cost):
        total += cost.reshape(_axis_shape(sizes, i))
    for u, v, matrix in p.edges:
        lo, hi = sorted((u, v))
        shape = [1] * len(sizes)
        shape[lo], shape[hi] = sizes[lo], sizes[hi]
        total += (matrix if u < v else matrix.T).reshape(shape)
    return total


def mem_tensor(p: Problem) -> np.ndarray:
    """Memory (incl. offset) of every combination, shape ``p.sizes``."""
    sizes = p.sizes
    total = np.full(sizes, p.mem_offset)
    for i, mem in enumerate(p.node_mem):
        total += mem.reshape(_axis_shape(sizes, i))
    return total


def _axis_shape(sizes: tuple[int, ...], axis: int) -> list[int]:
    shape = [1] * len(sizes)
    shape[axis] = sizes[axis]
    return shape


def _argmin(values: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.unravel_index(int(np.argmin(values)), values.shape))
