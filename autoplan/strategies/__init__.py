"""Strategies: placements (``placement.py``, the ground every layer stands on) and the legal N-D
strategies of each op (``expand.py``), expanded from the op registry's one-axis rules (``autoplan/ops``).

This package's namespace holds the placements only: ``autoplan.ops`` imports them, and ``expand``
imports ``autoplan.ops`` (import it as ``autoplan.strategies.expand``)."""
from autoplan.strategies.placement import P, R, Partial, Placement, Placements, Replicate, Shard, parse_placement

__all__ = ["P", "R", "Partial", "Placement", "Placements", "Replicate", "Shard", "parse_placement"]
