"""Normalisations: layer norm, RMS norm, group norm, batch norm (synchronised under a batch split)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from autoplan.ops.registry import AxisRule, RuleCtx, op_kind
from autoplan.strategies.placement import R, Shard

aten = torch.ops.aten


def _input_only(name: str, pos: int) -> bool:
    return pos == 0  # the input (its statistics are small); the weight is a parameter


def _norm_flops(c: RuleCtx) -> float:
    return 5.0 * c.numel(0)


@op_kind("layer_norm", spellings=(F.layer_norm, aten.layer_norm, aten.native_layer_norm),
         flops=_norm_flops, saves_input=_input_only)
def layer_norm_rules(c: RuleCtx) -> list[AxisRule]:
    """Statistics over the trailing normalized dims: any leading dim splits."""
    return _leading_dims(c)


@op_kind("rms_norm", spellings=(F.rms_norm, aten.rms_norm),
         flops=_norm_flops, saves_input=_input_only)
def rms_norm_rules(c: RuleCtx) -> list[AxisRule]:
    """Root-mean-square over the trailing normalized dims: any leading dim splits."""
    return _leading_dims(c)


def _leading_dims(c: RuleCtx) -> list[AxisRule]:
    nx = len(c.in_shapes[0])
    shape = c.attr("arg1", "normalized_shape")
    nd = len(shape) if isinstance(shape, (list, tuple)) else (len(c.in_shapes[1]) if len(c.in_shapes) > 1 else 1)
    others = (R,) * (len(c.in_shapes) - 1)
    return [AxisRule(Shard(d), (Shard(d),) + others) for d in range(nx - nd)]


@op_kind("group_norm", spellings=(F.group_norm, aten.group_norm, aten.native_group_norm),
         flops=_norm_flops, saves_input=_input_only)
def group_norm_rules(c: RuleCtx) -> list[AxisRule]:
    """(N, C, *) normalised per sample and group of channels: the batch splits."""
    others = (R,) * (len(c.in_shapes) - 1)
    return [AxisRule(Shard(0), (Shard(0),) + others)]


BATCH_NORM_STATS = 3  # all-reduced per channel in forward under a batch split: the sum, the sum of squares, the count
BATCH_NORM_GRAD_STATS = 2  # and in backward: the sums of the output gradient and of its product with x-hat


@op_kind("batch_norm", flops=_norm_flops, saves_input=_input_only, spellings=(
    F.batch_norm, aten.batch_norm, aten.native_batch_norm, aten._native_batch_norm_legit,
    aten._native_batch_norm_legit_functional, aten._native_batch_norm_legit_no_training))
def batch_norm_rules(c: RuleCtx) -> list[AxisRule]:
    """(N, C, *) normalised per channel over the batch and the spatial dims. Split on the batch, the
    statistics are all-reduced across the axis (SyncBatchNorm: the plan computes what one process
    computes; fp32 per channel, three values in forward and two in backward). Split on the channels,
    nothing is exchanged; the running statistics and the affine parameters split with them. The per-channel
    outputs (batch statistics, updated running statistics) are whole under a batch split."""
    x = c.in_shapes[0]
    if len(x) < 2:
        return []
    channels = x[1]
    per_param = tuple(Shard(0) if len(s) == 1 and s[0] == channels else R for s in c.in_shapes[1:])
    if len(c.out_shape) == 1:  # a per-channel output of the functional op: priced with its main output
        return [AxisRule(R, (Shard(0),) + (R,) * (len(c.in_shapes) - 1)), AxisRule(Shard(0), (Shard(1),) + per_param)]
    training = c.attr("arg5", "training", default=True) and c.name != "_native_batch_norm_legit_no_training"
    stats = (("all_reduce", BATCH_NORM_STATS * 4.0 * channels, False, "forward"),
             ("all_reduce", BATCH_NORM_GRAD_STATS * 4.0 * channels, False, "backward")) if training else ()
    return [
        AxisRule(Shard(0), (Shard(0),) + (R,) * (len(c.in_shapes) - 1), comm=stats),
        AxisRule(Shard(1), (Shard(1),) + per_param),
    ]
