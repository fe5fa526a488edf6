"""Convolutions, 1-D to 3-D (and their transposes): batch split, output-channel split, input-channel split."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from autoplan.ops.registry import AxisRule, RuleCtx, op_kind
from autoplan.strategies.placement import P, R, Shard

aten = torch.ops.aten


def _weight(name: str, pos: int) -> bool:
    return pos == 1


# (input, weight, bias, stride, padding, dilation, transposed, output_padding, groups, ...)
_GENERIC = ("convolution", "_convolution")


def _groups(c: RuleCtx) -> int:
    groups = c.attr("groups", "arg8" if c.name in _GENERIC else "arg6", default=1)
    return int(groups or 1)


def _transposed(c: RuleCtx) -> bool:
    """aten.convolution(..., transposed=True): the weight is (C_in, C_out / groups, *k)."""
    return c.name in _GENERIC and bool(c.attr("transposed", "arg6", default=False))


def _conv_flops(c: RuleCtx) -> float:
    w = c.in_shapes[1]  # (C_out, C_in / groups, *kernel); transposed (C_in, C_out / groups, *kernel)
    return 2.0 * (c.numel(0) if _transposed(c) else c.numel()) * w[1] * math.prod(w[2:])


@op_kind("conv", matmul=True, flops=_conv_flops, reads_weight=_weight, spellings=(
    F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d, aten.conv1d, aten.conv2d, aten.conv3d,
    aten.convolution, aten._convolution))
def conv_rules(c: RuleCtx) -> list[AxisRule]:
    """(N, C_in, *) * (C_out, C_in/groups, *k): the batch splits; with one group the output channels split
    (the weight's rows, column parallel) or the input channels (partial sums, row parallel); a depthwise
    convolution (groups = channels) splits its channels with its weight."""
    x = c.in_shapes[0]
    bias = len(c.in_shapes) > 2
    groups = _groups(c)
    w_out, w_in = (1, 0) if _transposed(c) else (0, 1)  # the weight's output- and input-channel dims
    rules = [AxisRule(Shard(0), (Shard(0), R) + ((R,) if bias else ()))]
    if groups == 1:
        rules.append(AxisRule(Shard(1), (R, Shard(w_out)) + ((Shard(0),) if bias else ())))
        rules.append(AxisRule(P, (Shard(1), Shard(w_in)) + ((P,) if bias else ())))
    elif len(x) > 1 and groups == x[1] == c.out_shape[1]:  # depthwise
        rules.append(AxisRule(Shard(1), (Shard(1), Shard(0)) + ((Shard(0),) if bias else ())))
    return rules
