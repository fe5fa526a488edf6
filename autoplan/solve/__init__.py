"""Solvers for the strategy-assignment problem (plain numpy arrays, no torch).

``solve_dp`` (exact dependent-set DP, check ``dp_table_size`` first), ``solve_eliminate`` (exact
variable elimination, unconstrained problems), ``solve_ilp`` (CP-SAT)
and ``solve_brute`` (enumeration, for tests) all return a :class:`Solution` or raise
:class:`autoplan.errors.InfeasibleError`.
"""
from autoplan.solve.brute import solve_brute
from autoplan.solve.dp import dp_table_size, solve_dp
from autoplan.solve.eliminate import solve_eliminate
from autoplan.solve.ilp import solve_ilp
from autoplan.solve.problem import Problem, Solution

__all__ = ["Problem", "Solution", "dp_table_size", "solve_brute", "solve_dp", "solve_eliminate", "solve_ilp"]
