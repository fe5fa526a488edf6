"""The strategy-assignment problem that every solver works on, on plain numpy arrays.

A problem has ``n`` nodes; node ``i`` has ``k_i`` candidate strategies.  A *choice* picks one
strategy ``s_i`` per node.  Its cost and memory are

    cost(s) = sum_i node_cost[i][s_i] + sum_{(u, v, M) in edges} M[s_u, s_v]
    mem(s)  = mem_offset + sum_i node_mem[i][s_i]

and the solvers minimise ``cost(s)`` subject to ``mem(s) <= mem_budget``.  ``np.inf`` in a cost
marks an illegal strategy (node) or an illegal pair of strategies (edge).

This module also holds the small helpers the solvers share: merging parallel edges, the budget
test (with a 1e-12 relative slack that absorbs floating-point summation order) and the
user-facing infeasibility errors.
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from autoplan.errors import InfeasibleError

#: A merged edge set: ``(u, v) -> M`` with ``u < v`` and ``M`` of shape ``(k_u, k_v)``.
EdgeMap = dict[tuple[int, int], np.ndarray]


@dataclass(frozen=True, eq=False)
class Problem:
    """Pick one strategy per node to minimise sum of node costs + edge costs,
    s.t. sum of node memory <= mem_budget.

    Arrays are converted to float64 on construction; call :meth:`validate` to check shapes.
    (``eq=False``: problems hold arrays, so they compare and hash by identity.)
    """

    node_cost: tuple[np.ndarray, ...]
    node_mem: tuple[np.ndarray, ...]
    edges: tuple[tuple[int, int, np.ndarray], ...]
    mem_budget: float | None = None
    mem_offset: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "node_cost", tuple(_as_float(c) for c in self.node_cost))
        object.__setattr__(self, "node_mem", tuple(_as_float(m) for m in self.node_mem))
        object.__setattr__(self, "edges", tuple(_as_edge(e) for e in self.edges))
        if self.mem_budget is not None:
            object.__setattr__(self, "mem_budget", float(self.mem_budget))
        object.__setattr__(self, "mem_offset", float(self.mem_offset))

    @property
    def sizes(self) -> tuple[int, ...]:
        """Number of strategies of every node."""
        return tuple(int(c.shape[0]) for c in self.node_cost)

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistency (shapes, NaN, negative memory, ...)."""
        if len(self.node_cost) != len(self.node_mem):
            raise ValueError(
                f"node_cost has {len(self.node_cost)} nodes but node_mem has {len(self.node_mem)}"
            )
        for i, (cost, mem) in enumerate(zip(self.node_cost, self.node_mem)):
            _check_node(i, cost, mem)
        sizes = self.sizes
        for j, (u, v, matrix) in enumerate(self.edges):
            _check_edge(j, u, v, matrix, sizes)
        if self.mem_budget is not None and math.isnan(self.mem_budget):
            raise ValueError("mem_budget is NaN")
        if not math.isfinite(self.mem_offset):
            raise ValueError(f"mem_offset must be finite, got {self.mem_offset}")

    def evaluate(self, choice: Sequence[int]) -> tuple[float, float]:
        """``(cost, mem)`` of a choice; ``mem`` includes ``mem_offset``; sums are exact (fsum)."""
        picks = self._check_choice(choice)
        cost = math.fsum(
            [float(c[s]) for c, s in zip(self.node_cost, picks)]
            + [float(m[picks[u], picks[v]]) for u, v, m in self.edges]
        )
        mem = math.fsum([self.mem_offset] + [float(m[s]) for m, s in zip(self.node_mem, picks)])
        return cost, mem

    def _check_choice(self, choice: Sequence[int]) -> tuple[int, ...]:
        picks = tuple(int(s) for s in choice)
        if len(picks) != len(self.node_cost):
            raise ValueError(f"choice has {len(picks)} entries for {len(self.node_cost)} nodes")
        for i, (s, k) in enumerate(zip(picks, self.sizes)):
            if not 0 <= s < k:
                raise ValueError(f"choice[{i}] = {s} is out of range for {k} strategies")
        return picks


@dataclass(frozen=True)
class Solution:
    """One strategy per node, with its exact (re-evaluated) cost and memory."""

    choice: tuple[int, ...]
    cost: float
    mem: float
    solver: str
    seconds: float
    gap: float


def _as_float(values: object) -> np.ndarray:
    return np.asarray(values, dtype=np.float64)


def _as_edge(edge: object) -> tuple[int, int, np.ndarray]:
    try:
        u, v, matrix = edge  # type: ignore[misc]
    except (TypeError, ValueError) as err:
        raise ValueError(f"an edge must be a (u, v, matrix) triple, got {edge!r}") from err
    return int(u), int(v), _as_float(matrix)


def _check_node(i: int, cost: np.ndarray, mem: np.ndarray) -> None:
    if cost.ndim != 1 or cost.shape[0] == 0:
        raise ValueError(f"node_cost[{i}] must be a non-empty 1-D array, got shape {cost.shape}")
    if mem.shape != cost.shape:
        raise ValueError(
            f"node_mem[{i}] has shape {mem.shape} but node_cost[{i}] has shape {cost.shape}"
        )
    if np.isnan(cost).any() or np.isneginf(cost).any():
        raise ValueError(f"node_cost[{i}] contains NaN or -inf")
    if not np.isfinite(mem).all() or (mem < 0).any():
        raise ValueError(f"node_mem[{i}] must be finite and >= 0")


def _check_edge(j: int, u: int, v: int, matrix: np.ndarray, sizes: tuple[int, ...]) -> None:
    n = len(sizes)
    if not (0 <= u < n and 0 <= v < n):
        raise ValueError(f"edge {j} joins ({u}, {v}) but there are only {n} nodes")
    if u == v:
        raise ValueError(f"edge {j} is a self-loop on node {u}")
    if matrix.shape != (sizes[u], sizes[v]):
        raise ValueError(
            f"edge {j} ({u}, {v}) has a cost matrix of shape {matrix.shape}, "
            f"expected {(sizes[u], sizes[v])}"
        )
    if np.isnan(matrix).any() or np.isneginf(matrix).any():
        raise ValueError(f"edge {j} ({u}, {v}) cost matrix contains NaN or -inf")


def merge_edges(p: Problem) -> EdgeMap:
    """Sum parallel edges: one matrix per unordered node pair, keyed ``(u, v)`` with ``u < v``."""
    merged: EdgeMap = {}
    for u, v, matrix in p.edges:
        key, oriented = ((u, v), matrix) if u < v else ((v, u), matrix.T)
        merged[key] = merged[key] + oriented if key in merged else oriented.copy()
    return merged


def oriented(edges: EdgeMap, u: int, v: int) -> np.ndarray:
    """The merged matrix between ``u`` and ``v`` with rows indexed by ``u``'s strategies."""
    return edges[(u, v)] if u < v else edges[(v, u)].T


def neighbours(n: int, edges: EdgeMap) -> list[set[int]]:
    """Adjacency sets of the (undirected, merged) edge graph."""
    adjacency: list[set[int]] = [set() for _ in range(n)]
    for u, v in edges:
        adjacency[u].add(v)
        adjacency[v].add(u)
    return adjacency


def mem_limit(p: Problem) -> float | None:
    """Largest total memory (incl. offset) that counts as fitting, or None when unconstrained."""
    if p.mem_budget is None or p.mem_budget == math.inf:
        return None
    return p.mem_budget + 1e-12 * max(abs(p.mem_budget), 1.0)


def fits(p: Problem, mem: float) -> bool:
    """Whether a total memory (incl. offset) fits the budget."""
    limit = mem_limit(p)
    return limit is None or mem <= limit


def format_bytes(n_bytes: float) -> str:
    """Human-readable size, e.g. ``95.2 GiB``."""
    for unit, size in (("TiB", 2.0**40), ("GiB", 2.0**30), ("MiB", 2.0**20), ("KiB", 2.0**10)):
        if abs(n_bytes) >= size:
            return f"{n_bytes / size:.1f} {unit}"
    return f"{n_bytes:.0f} B"


def budget_error(p: Problem, min_mem: float) -> InfeasibleError:
    """The error for "no legal choice fits the budget"; ``min_mem`` is the smallest legal plan."""
    return InfeasibleError(
        f"no sharding fits in {format_bytes(float(p.mem_budget or 0.0))} per device: "
        f"the smallest plan needs {format_bytes(min_mem)}",
        min_memory_bytes=min_mem,
    )


def illegal_error() -> InfeasibleError:
    """The error for "every choice has an infinite cost"."""
    return InfeasibleError(
        "no sharding is legal: every combination of strategies has an infinite cost"
    )


def make_solution(
    p: Problem, choice: Sequence[int], solver: str, started: float, gap: float
) -> Solution:
    """Package a choice, re-evaluating cost and memory exactly; ``started`` is a perf_counter."""
    picks = tuple(int(s) for s in choice)
    cost, mem = p.evaluate(picks)
    return Solution(picks, cost, mem, solver, time.perf_counter() - started, gap)
