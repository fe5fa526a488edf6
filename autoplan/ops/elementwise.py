"""Elementwise ops (unary, binary with broadcasting, where, masked_fill, casts) and dropout."""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F

from autoplan.ops.registry import AxisRule, RuleCtx, elementwise_flops, op_kind, saves_none
from autoplan.strategies.placement import P, R, Shard

aten = torch.ops.aten

# summands and casts: the output is partial where every input is (a sum of partial sums)
_ADDITIVE = {"add", "sub", "neg", "iadd", "__add__", "__radd__", "float", "half", "bfloat16", "to", "type_as", "_to_copy",
             "clone", "type"}
_MULTIPLICATIVE = {"mul", "imul", "__mul__", "__rmul__", "div", "truediv"}  # linear in one partial operand
# ops whose backward needs no input value (only the output gradient): autograd keeps nothing of them
_NOT_READ_BY_BACKWARD = frozenset({"add", "sub", "iadd", "__add__", "__radd__", "neg", "float", "half", "bfloat16",
                                   "to", "_to_copy", "type_as", "type", "masked_fill", "where"})
_NO_WEIGHT_VALUE = frozenset({"add", "sub", "iadd", "__add__", "__radd__", "neg"})


def broadcast_dims(c: RuleCtx) -> list[AxisRule]:
    """Any output dim splits the inputs that carry it (size-1 broadcast dims replicated)."""
    out = c.out_shape
    rules = []
    for d in range(len(out)):
        ins = []
        for shape in c.in_shapes:
            di = d - (len(out) - len(shape))
            ins.append(Shard(di) if di >= 0 and shape[di] == out[d] and out[d] > 1 else R)
        if any(isinstance(p, Shard) for p in ins):
            rules.append(AxisRule(Shard(d), tuple(ins)))
    return rules


def broadcast_rules(c: RuleCtx, allow_partial: bool) -> list[AxisRule]:
    """``broadcast_dims``; with ``allow_partial``, sums and casts of partial inputs, products with one partial operand."""
    rules = broadcast_dims(c)
    if allow_partial:
        name = c.name
        scalars = [v for k, v in c.attrs.items() if k.startswith("arg") and isinstance(v, (int, float))]
        if name in _ADDITIVE and not (scalars and name in ("add", "sub", "iadd", "__add__", "__radd__")):
            rules.append(AxisRule(P, (P,) * len(c.in_shapes)))
        elif name in _MULTIPLICATIVE:
            positions = [0] if name in ("div", "truediv") else range(len(c.in_shapes))
            for i in positions:
                ins = [R] * len(c.in_shapes)
                ins[i] = P
                rules.append(AxisRule(P, tuple(ins)))
    return rules


def _saves(name: str, pos: int) -> bool:
    return name not in _NOT_READ_BY_BACKWARD


def _reads_weight(name: str, pos: int) -> bool:
    return name not in _NO_WEIGHT_VALUE


_ELEMENTWISE = (
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pow, operator.iadd, operator.imul,
    operator.floordiv, operator.mod, operator.and_, operator.or_, operator.xor, operator.invert, operator.eq,
    operator.ne, operator.lt, operator.le, operator.gt, operator.ge, operator.abs,
    torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.pow, torch.rsqrt, torch.sqrt, torch.exp, torch.tanh,
    torch.sigmoid, torch.sin, torch.cos, torch.where, torch.relu, torch.abs, torch.log, torch.erf, torch.clamp,
    torch.maximum, torch.minimum, torch.masked_fill, torch.square, torch.reciprocal, torch.sign, torch.floor,
    torch.ceil, torch.round, torch.logical_not, torch.logical_and, torch.logical_or, torch.eq, torch.ne, torch.lt,
    torch.le, torch.gt, torch.ge, torch.isinf, torch.isnan, torch.log1p, torch.exp2, torch.log2, torch.tan,
    torch.fmod, torch.remainder, torch.bitwise_and, torch.bitwise_or, torch.bitwise_not,
    F.gelu, F.silu, F.relu, F.tanh, F.sigmoid, F.softplus, F.leaky_relu, F.relu6, F.mish, F.elu, F.hardtanh,
    F.hardswish, F.hardsigmoid, F.selu, F.logsigmoid, F.tanhshrink, F.glu,
    "add", "sub", "mul", "div", "neg", "pow", "rsqrt", "sqrt", "exp", "tanh", "sigmoid", "relu", "float", "half",
    "bfloat16", "to", "type_as", "type", "masked_fill", "sin", "cos", "__add__", "__mul__", "__radd__", "__rmul__",
    "__sub__", "__rsub__", "__truediv__", "__rtruediv__", "__neg__", "__pow__", "__and__", "__or__", "__invert__",
    "abs", "log", "erf", "clamp", "clip", "maximum", "minimum", "square", "reciprocal", "sign", "floor", "ceil",
    "round", "eq", "ne", "lt", "le", "gt", "ge", "long", "int", "bool", "double", "logical_not", "where", "tan",
    aten.add, aten.sub, aten.mul, aten.div, aten.neg, aten.pow, aten.rsqrt, aten.sqrt, aten.exp, aten.tanh,
    aten.sigmoid, aten.gelu, aten.silu, aten.relu, aten._to_copy, aten.to, aten.where, aten.masked_fill, aten.sin,
    aten.cos, aten.type_as, aten.abs, aten.log, aten.erf, aten.clamp, aten.clamp_min, aten.clamp_max, aten.clip,
    aten.maximum, aten.minimum, aten.square, aten.reciprocal, aten.sign, aten.floor, aten.ceil, aten.round,
    aten.eq, aten.ne, aten.lt, aten.le, aten.gt, aten.ge, aten.logical_not, aten.logical_and, aten.logical_or,
    aten.__and__, aten.__or__, aten.__xor__, aten.bitwise_and, aten.bitwise_or, aten.bitwise_not, aten.bitwise_xor,
    aten.isinf, aten.isnan, aten.log1p, aten.exp2, aten.log2, aten.tan, aten.fmod, aten.remainder, aten.rsub,
    aten.softplus, aten.leaky_relu, aten.hardtanh, aten.elu, aten.mish, aten.hardswish, aten.hardsigmoid,
    aten.glu, aten.lerp, aten.addcmul, aten.addcdiv,
    aten.floor_divide, aten.trunc, aten.frac, aten.nan_to_num, aten.xlogy,
    aten.copy, aten.fill, aten.zero, aten.lift_fresh_copy, aten.pow_, aten.logit, aten.atan, aten.asin, aten.acos,
    aten.sinh, aten.cosh, aten.expm1, aten.erfinv, aten.erfc, aten.sgn, aten.threshold,
)


def _data_inputs(name: str) -> int | None:
    return 1 if name == "type_as" else None  # x.type_as(y): y lends a dtype


@op_kind("elementwise", spellings=_ELEMENTWISE, flops=elementwise_flops, saves_input=_saves, reads_weight=_reads_weight,
         data_inputs=_data_inputs)
def elementwise_rules(c: RuleCtx) -> list[AxisRule]:
    """Any broadcast dim; sums and casts of partial inputs, products with one partial operand."""
    return broadcast_rules(c, allow_partial=True)


@op_kind("dropout", spellings=(F.dropout, aten.dropout, torch.dropout, aten.native_dropout, F.dropout1d, F.dropout2d,
                               F.dropout3d, F.alpha_dropout, aten.feature_dropout, aten.alpha_dropout),
         flops=elementwise_flops, saves_input=saves_none)
def dropout_rules(c: RuleCtx) -> list[AxisRule]:
    """Any dim splits (each rank draws its own mask for its shard)."""
    return broadcast_rules(c, allow_partial=False)
