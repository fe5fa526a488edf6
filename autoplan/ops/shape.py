"""Shape ops (no data of their own): views, permutations, expands, splits, slices; and concatenation."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from autoplan.ops.elementwise import broadcast_dims
from autoplan.ops.registry import AxisRule, RuleCtx, op_kind, saves_none
from autoplan.strategies.placement import P, Shard

aten = torch.ops.aten


def _norm(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def view_groups(src: tuple[int, ...], dst: tuple[int, ...]) -> list[tuple[int, int]]:
    """(src dim, dst dim) pairs whose sharding carries over a view: outermost dims of each
    group of dims that a reshape merges or splits (size-1 dims are skipped)."""
    pairs = []
    i = j = 0
    while i < len(src) and j < len(dst):
        if src[i] == 1:
            i += 1
            continue
        if dst[j] == 1:
            j += 1
            continue
        pairs.append((i, j))
        a, b = src[i], dst[j]
        i, j = i + 1, j + 1
        while a != b:
            if a < b:
                if i >= len(src):
                    return pairs
                a *= src[i]
                i += 1
            else:
                if j >= len(dst):
                    return pairs
                b *= dst[j]
                j += 1
    return pairs


@op_kind("view", alias=True, saves_input=saves_none, data_inputs=lambda name: 1, spellings=(
    "view", "reshape", "flatten", "unflatten", "contiguous", "unsqueeze", "squeeze", "view_as", "reshape_as",
    torch.reshape, torch.flatten, torch.unsqueeze, torch.squeeze, torch.unflatten,
    aten.view, aten.reshape, aten._unsafe_view, aten.contiguous, aten.unsqueeze, aten.squeeze, aten.flatten,
    aten.unflatten, aten.clone, aten.alias, aten.detach, aten.lift_fresh,
    "clone", torch.clone, "detach", torch.detach, "requires_grad_"))
def view_rules(c: RuleCtx) -> list[AxisRule]:
    """The outermost dim of each merged or split group of dims carries its sharding."""
    src, dst = c.in_shapes[0], c.out_shape
    rules = [AxisRule(Shard(j), (Shard(i),)) for i, j in view_groups(src, dst)]
    rules.append(AxisRule(P, (P,)))
    return rules


def _permutation(c: RuleCtx) -> list[int] | None:
    n = len(c.in_shapes[0])
    name = c.name
    if name in ("t", "mT", "numpy_T") or (name == "T" and n == 2):
        perm = list(range(n))
        perm[-1], perm[-2] = perm[-2], perm[-1]
        return perm
    if name in ("transpose", "swapaxes", "swapdims"):
        d0, d1 = c.attr("arg1", "dim0"), c.attr("arg2", "dim1")
        if d0 is None or d1 is None:
            return None
        perm = list(range(n))
        d0, d1 = _norm(int(d0), n), _norm(int(d1), n)
        perm[d0], perm[d1] = perm[d1], perm[d0]
        return perm
    if name == "permute":
        dims = c.attr("arg1", "dims")
        if isinstance(dims, (list, tuple)):
            return [_norm(int(d), n) for d in dims]
        dims = [c.attrs.get(f"arg{i}") for i in range(1, n + 1)]
        if all(isinstance(d, int) for d in dims):
            return [_norm(d, n) for d in dims]
    return None


@op_kind("transpose", alias=True, saves_input=saves_none, data_inputs=lambda name: 1, spellings=(
    "transpose", "permute", "t", "mT", "swapaxes", "swapdims", torch.transpose, torch.permute, torch.t,
    torch.swapaxes, aten.transpose, aten.permute, aten.t, aten.swapaxes, aten.numpy_T))
def transpose_rules(c: RuleCtx) -> list[AxisRule]:
    """Output dim j carries input dim perm[j]'s sharding."""
    perm = _permutation(c)
    if perm is None:
        return []
    return [AxisRule(Shard(j), (Shard(perm[j]),)) for j in range(len(perm))] + [AxisRule(P, (P,))]


@op_kind("expand", alias=True, saves_input=saves_none, data_inputs=lambda name: 1, spellings=(
    "expand", "expand_as", aten.expand, "repeat_interleave", torch.repeat_interleave, aten.repeat_interleave,
    "repeat", aten.repeat, torch.broadcast_to, aten.broadcast_to, "broadcast_to"))
def expand_rules(c: RuleCtx) -> list[AxisRule]:
    """A dim kept from the input splits; broadcast (new or size-1) dims stay whole."""
    return [r for r in broadcast_dims(c) if isinstance(r.ins[0], Shard)]


@op_kind("split", alias=True, saves_input=saves_none)
def split_rules(c: RuleCtx) -> list[AxisRule]:
    """One part of a split / chunk / unbind: any other dim splits."""
    dim = c.attrs["dim"]
    n = len(c.in_shapes[0])
    return [AxisRule(Shard(d), (Shard(d),)) for d in range(n) if d != dim] + [AxisRule(P, (P,))]


@op_kind("slice", alias=True, saves_input=saves_none, spellings=(
    "narrow", torch.narrow, aten.narrow, aten.slice, aten.select, "select", torch.select))
def slice_rules(c: RuleCtx) -> list[AxisRule]:
    """A dim the slice keeps whole splits (a selected dim disappears: the dims after it shift)."""
    if len(c.in_shapes) != 1:  # e.g. slicing a tensor built from sizes: replicate only
        return []
    src, dst = c.in_shapes[0], c.out_shape
    if len(src) == len(dst):
        return [AxisRule(Shard(d), (Shard(d),)) for d in range(len(src)) if src[d] == dst[d]] + [AxisRule(P, (P,))]
    dim = c.attr("arg1", "dim")
    if c.name != "select" or dim is None or len(src) != len(dst) + 1:
        return []
    dim = _norm(int(dim), len(src))
    return [AxisRule(Shard(d if d < dim else d - 1), (Shard(d),)) for d in range(len(src)) if d != dim] + \
        [AxisRule(P, (P,))]


@op_kind("cat", saves_input=saves_none, spellings=(torch.cat, torch.concat, aten.cat, aten.concat, torch.stack, aten.stack))
def cat_rules(c: RuleCtx) -> list[AxisRule]:
    """Concatenation (or stacking) along one dim: any other dim splits every input alike."""
    n = len(c.out_shape)
    dim = _norm(int(c.attr("dim", "arg1", default=0)), n)
    k = len(c.in_shapes)
    stacked = len(c.in_shapes[0]) == n - 1
    rules = []
    for d in range(n):
        if d == dim:
            continue
        di = d if not stacked or d < dim else d - 1
        rules.append(AxisRule(Shard(d), (Shard(di),) * k))
    return rules + [AxisRule(P, (P,) * k)]


@op_kind("scatter_view", saves_input=saves_none, spellings=(aten.slice_scatter, aten.select_scatter, aten.diagonal_scatter,
                                                            torch.slice_scatter, torch.select_scatter))
def scatter_view_rules(c: RuleCtx) -> list[AxisRule]:
    """x with a slice (or a selected index) of ``dim`` replaced by src (functional ``x[:, 1:] = src``):
    any other dim splits x, src and the output alike."""
    if len(c.in_shapes) != 2:
        return []
    x, src = c.in_shapes
    dim = _norm(int(c.attr("arg2", "dim", default=0)), len(x))
    selected = len(src) == len(x) - 1
    rules = []
    for d in range(len(x)):
        if d == dim:
            continue
        ds = d - 1 if selected and d > dim else d
        if ds < len(src) and src[ds] == x[d]:
            rules.append(AxisRule(Shard(d), (Shard(d), Shard(ds))))
    return rules + [AxisRule(P, (P, P))]


@op_kind("pad", saves_input=saves_none, spellings=(F.pad, aten.pad, aten.constant_pad_nd, "pad"))
def pad_rules(c: RuleCtx) -> list[AxisRule]:
    """Padding of the trailing dims (pairs from the last dim backwards): a dim padded by nothing splits."""
    x = c.in_shapes[0]
    pads = c.attr("arg1", "pad")
    if not isinstance(pads, (list, tuple)):
        return []
    padded = {len(x) - 1 - i // 2 for i, p in enumerate(pads) if p}
    return [AxisRule(Shard(d), (Shard(d),)) for d in range(len(x)) if d not in padded and x[d] == c.out_shape[d]]
