"""Where tensors come from (inputs, parameters, buffers, constants) and ops with no rule."""
from __future__ import annotations

import torch

from autoplan.ops.registry import AxisRule, RuleCtx, op_kind, saves_none
from autoplan.strategies.placement import Shard

aten = torch.ops.aten


@op_kind("input", alias=True, saves_input=saves_none)
def input_rules(c: RuleCtx) -> list[AxisRule]:
    """A batch tensor: any dim may arrive split."""
    return [AxisRule(Shard(d), ()) for d in range(len(c.out_shape))]


@op_kind("param", alias=True, saves_input=saves_none)
def param_rules(c: RuleCtx) -> list[AxisRule]:
    """A trainable parameter: any dim may be stored split (FSDP, tensor parallel)."""
    return [AxisRule(Shard(d), ()) for d in range(len(c.out_shape))]


@op_kind("buffer", alias=True, saves_input=saves_none)
def buffer_rules(c: RuleCtx) -> list[AxisRule]:
    """A buffer (running statistics, rotary tables): replicated."""
    return []


@op_kind("constant", alias=True, saves_input=saves_none, spellings=(
    torch.arange, torch.zeros, torch.ones, torch.full, torch.empty, torch.tensor, torch.linspace, torch.eye,
    aten.arange, aten.zeros, aten.ones, aten.full, aten.empty, aten.scalar_tensor, aten.linspace, aten.eye,
    "new_zeros", "new_ones", "new_full", "new_empty", "new_tensor", aten.new_zeros, aten.new_ones, aten.new_full,
    aten.new_empty), data_inputs=lambda name: 0)
def constant_rules(c: RuleCtx) -> list[AxisRule]:
    """A tensor made in forward (positions, masks, fills): replicated, free to move to any placement."""
    return []


@op_kind("unknown")
def unknown_rules(c: RuleCtx) -> list[AxisRule]:
    """An op with no entry: planned replicated (a warning names it; ``autoplan explain`` lists it)."""
    return []



@op_kind("fill_like", alias=True, saves_input=saves_none, data_inputs=lambda name: 0, spellings=(
    aten.zeros_like, aten.ones_like, aten.full_like, aten.empty_like, aten.rand_like, aten.randn_like,
    torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like, torch.rand_like, torch.randn_like))
def fill_like_rules(c: RuleCtx) -> list[AxisRule]:
    """A fresh tensor shaped like its argument (whose values it never reads): made already split, any dim."""
    return [AxisRule(Shard(d), ()) for d in range(len(c.out_shape))]
