"""Strategies: the legal placements of each op on a device mesh (see rules.py to add an op)."""
from autoplan.strategies.expand import Strategy, expand
from autoplan.strategies.placement import P, R, Partial, Placement, Placements, Replicate, Shard, parse_placement
from autoplan.strategies.rules import RULES, AxisRule, RuleCtx, rule

__all__ = [
    "Strategy", "expand", "P", "R", "Partial", "Placement", "Placements", "Replicate", "Shard",
    "parse_placement", "RULES", "AxisRule", "RuleCtx", "rule",
]
