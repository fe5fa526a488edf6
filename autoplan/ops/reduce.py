"""Reductions and scans: sum / mean / max, softmax, cumsum, top-k / sort / argmax; pooling and interpolation."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from autoplan.ops.elementwise import broadcast_dims
from autoplan.ops.registry import AxisRule, RuleCtx, elementwise_flops, op_kind, saves_all, saves_none
from autoplan.strategies.placement import P, Shard

aten = torch.ops.aten


def _norm(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def _reduced_dims(c: RuleCtx) -> set[int]:
    n = len(c.in_shapes[0])
    dims = c.attr("dim", "arg1")
    if dims is None or isinstance(dims, bool):
        return set(range(n))
    return {_norm(int(d), n) for d in (dims if isinstance(dims, (list, tuple)) else [dims])}


def _kept_dims(c: RuleCtx, reduced: set[int]) -> list[AxisRule]:
    """Dims the reduction keeps split input and output alike (squeezed dims shift the ones after)."""
    n = len(c.in_shapes[0])
    keep = len(c.out_shape) == n
    return [AxisRule(Shard(d if keep else d - sum(1 for r in reduced if r < d)), (Shard(d),))
            for d in range(n) if d not in reduced]


_LINEAR = frozenset({"sum", "mean", "nansum"})


@op_kind("reduce", flops=elementwise_flops, saves_input=saves_none, spellings=(
    "sum", "mean", torch.sum, torch.mean, aten.sum, aten.mean, "amax", "amin", torch.amax, torch.amin, aten.amax,
    aten.amin, "prod", torch.prod, aten.prod, "any", "all", torch.any, torch.all, aten.any, aten.all, "norm",
    torch.norm, aten.norm, aten.linalg_vector_norm, torch.logsumexp, aten.logsumexp, "logsumexp", "var", "std",
    torch.var, torch.std, aten.var, aten.std, "count_nonzero", aten.count_nonzero, "nansum", aten.nansum))
def reduce_rules(c: RuleCtx) -> list[AxisRule]:
    """Kept dims split; a sum or mean over a split dim is partial (other reductions are not)."""
    reduced = _reduced_dims(c)
    rules = _kept_dims(c, reduced)
    if c.name in _LINEAR:
        rules.append(AxisRule(P, (P,)))
        rules += [AxisRule(P, (Shard(d),)) for d in sorted(reduced)]
    return rules


@op_kind("softmax", saves_output=True, flops=lambda c: 5.0 * c.numel(0), spellings=(
    F.softmax, torch.softmax, aten.softmax, aten._softmax, "softmax", F.log_softmax, torch.log_softmax,
    aten.log_softmax, aten._log_softmax, "log_softmax"))
def softmax_rules(c: RuleCtx) -> list[AxisRule]:
    """Normalised over one dim: every other dim splits."""
    n = len(c.in_shapes[0])
    dim = _norm(int(c.attr("dim", "arg1", default=-1)), n)
    return [AxisRule(Shard(d), (Shard(d),)) for d in range(n) if d != dim]


@op_kind("scan", flops=elementwise_flops, saves_input=saves_none, spellings=(
    torch.cumsum, aten.cumsum, "cumsum", torch.cumprod, aten.cumprod, "cumprod", torch.cummax, aten.cummax))
def scan_rules(c: RuleCtx) -> list[AxisRule]:
    """A running sum along one dim: every other dim splits; a cumulative sum of a partial input is partial."""
    n = len(c.in_shapes[0])
    dim = _norm(int(c.attr("dim", "arg1", default=0)), n)
    rules = [AxisRule(Shard(d), (Shard(d),)) for d in range(n) if d != dim]
    return rules + ([AxisRule(P, (P,))] if c.name == "cumsum" else [])


@op_kind("select_k", flops=elementwise_flops, saves_input=saves_none, spellings=(
    torch.topk, aten.topk, "topk", torch.sort, aten.sort, "sort", torch.argmax, aten.argmax, "argmax",
    torch.argmin, aten.argmin, "argmin", torch.argsort, aten.argsort, "argsort", torch.max, torch.min, aten.max,
    aten.min, "max", "min", torch.kthvalue, aten.kthvalue, torch.median, aten.median))
def select_k_rules(c: RuleCtx) -> list[AxisRule]:
    """Top-k, sorts and arg-extrema along one dim (the routers of mixture-of-experts): every other dim splits."""
    n = len(c.in_shapes[0])
    if c.name in ("max", "min") and len(c.in_shapes) == 2:  # torch.max(a, b): elementwise
        return broadcast_dims(c)
    if c.name in ("topk", "kthvalue"):
        dim = c.attr("arg2", "dim", default=-1)
    else:
        dim = c.attr("dim", "arg1", default=None if c.name in ("argmax", "argmin", "max", "min", "median") else -1)
    if dim is None or isinstance(dim, bool):
        return []  # over the whole tensor
    dim = _norm(int(dim), n)
    keep = len(c.out_shape) == n
    return [AxisRule(Shard(d if keep or d < dim else d - 1), (Shard(d),)) for d in range(n) if d != dim]


@op_kind("pool", flops=elementwise_flops, saves_input=saves_all, spellings=(
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.lp_pool2d,
    aten.max_pool1d, aten.max_pool2d, aten.max_pool3d, aten.avg_pool1d, aten.avg_pool2d, aten.avg_pool3d,
    aten.adaptive_avg_pool1d, aten.adaptive_avg_pool2d, aten.adaptive_avg_pool3d, aten._adaptive_avg_pool2d,
    aten.max_pool2d_with_indices, aten.max_pool3d_with_indices, F.interpolate, aten.upsample_nearest2d,
    aten.upsample_bilinear2d, aten.upsample_nearest1d, aten.upsample_linear1d, aten.upsample_bicubic2d,
    aten.upsample_nearest3d, aten.upsample_trilinear3d, aten._upsample_nearest_exact2d, aten.pixel_shuffle,
    aten.pixel_unshuffle, F.pixel_shuffle, F.pixel_unshuffle))
def pool_rules(c: RuleCtx) -> list[AxisRule]:
    """(N, C, *spatial) windows, resampling: the batch and the channels split (windows stay whole)."""
    x, out = c.in_shapes[0], c.out_shape
    if c.name in ("pixel_shuffle", "pixel_unshuffle"):
        return [AxisRule(Shard(0), (Shard(0),))]
    return [AxisRule(Shard(d), (Shard(d),)) for d in range(min(2, len(x))) if d < len(out) and x[d] == out[d]]
