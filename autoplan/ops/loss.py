"""Losses: cross-entropy (rows split, or vocabulary-parallel with its statistics all-reduced)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from autoplan.ops.registry import AxisRule, RuleCtx, op_kind
from autoplan.strategies.placement import P, R, Shard

aten = torch.ops.aten


@op_kind("cross_entropy", spellings=(F.cross_entropy, aten.cross_entropy_loss, F.nll_loss, aten.nll_loss,
                                     aten.nll_loss_nd), saves_output=True, flops=lambda c: 5.0 * c.numel(0))
def cross_entropy_rules(c: RuleCtx) -> list[AxisRule]:
    """Mean loss of (rows, classes) logits over the targets that count: rows split (each rank a partial
    sum, divided by the number of counted targets, all-reduced: one fp32), or the vocabulary (Megatron:
    all-reduces of the row max, the target logit and the sum of exps)."""
    logits = c.in_shapes[0]
    if len(logits) != 2:
        return []
    n_rows = logits[0]
    stat = n_rows * 4.0  # one fp32 per row
    count = ("all_reduce", 4.0, False)  # the mean is over the targets that count (not ignore_index): their number
    rules = [AxisRule(P, (Shard(0), Shard(0)), comm=(count,))]
    if c.name == "cross_entropy_loss" or c.name == "cross_entropy":
        rules.append(AxisRule(P, (Shard(1), R), comm=(("all_reduce", stat),) * 3))
    return rules
