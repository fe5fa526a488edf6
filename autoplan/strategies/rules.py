"""Sharding rules of each op kind, written for ONE mesh axis (expanded to N-D in ``expand.py``).

A rule says, for one mesh axis: the placement the op needs for each tensor input, the
placement of its output, and any collective the op itself issues on that axis (for example the
statistics all-reduces of a vocabulary-parallel cross-entropy). All-Replicate is always legal
and is added by the expansion. Rules register with ``@rule("kind")``; one function serves a
family (all einsum-like ops derive their rules from index letters, as DTensor's
``_mm_like_strategy`` does).

To add an op: classify its spellings in ``graph.KINDS``, then write a rule here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from autoplan.strategies.placement import P, R, Placement, Shard


@dataclass(frozen=True)
class AxisRule:
    out: Placement
    ins: tuple[Placement, ...]
    comm: tuple[tuple[str, float], ...] = ()  # (collective, global bytes) the op issues in forward


@dataclass(frozen=True)
class RuleCtx:
    in_shapes: tuple[tuple[int, ...], ...]
    in_dtypes: tuple[torch.dtype, ...]
    out_shape: tuple[int, ...]
    attrs: dict = field(hash=False)
    target: str = ""

    def attr(self, *names: str, default=None):
        for n in names:
            if n in self.attrs and self.attrs[n] is not None:
                return self.attrs[n]
        return default


RuleFn = Callable[[RuleCtx], list[AxisRule]]
RULES: dict[str, RuleFn] = {}


def rule(*kinds: str) -> Callable[[RuleFn], RuleFn]:
    def register(fn: RuleFn) -> RuleFn:
        for k in kinds:
            RULES[k] = fn
        return fn

    return register


def _norm(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


# ------------------------------------------------------------------------------ matmul family


@rule("linear")
def linear_rules(c: RuleCtx) -> list[AxisRule]:
    nx = len(c.in_shapes[0])
    has_bias = len(c.in_shapes) > 2
    rules = []
    for d in range(nx - 1):  # batch-like dims of x
        rules.append(AxisRule(Shard(d), (Shard(d), R) + ((R,) if has_bias else ())))
    rules.append(AxisRule(Shard(nx - 1), (R, Shard(0)) + ((Shard(0),) if has_bias else ())))  # column parallel
    rules.append(AxisRule(P, (Shard(nx - 1), Shard(1)) + ((P,) if has_bias else ())))  # row parallel
    rules.append(AxisRule(P, (P, R) + ((P,) if has_bias else ())))  # linear in a partial input
    return rules


@rule("matmul")
def matmul_rules(c: RuleCtx) -> list[AxisRule]:
    a, b = c.in_shapes[0], c.in_shapes[1]
    out = c.out_shape
    if len(a) < 2 or len(b) < 2:
        return []
    rules = []
    for d in range(len(out) - 2):  # broadcast batch dims
        ins = []
        for shape in (a, b):
            di = d - (len(out) - len(shape))
            ins.append(Shard(di) if di >= 0 and shape[di] == out[d] else R)
        rules.append(AxisRule(Shard(d), tuple(ins)))
    rules.append(AxisRule(Shard(len(out) - 2), (Shard(len(a) - 2), R)))  # rows of a
    rules.append(AxisRule(Shard(len(out) - 1), (R, Shard(len(b) - 1))))  # columns of b
    rules.append(AxisRule(P, (Shard(len(a) - 1), Shard(len(b) - 2))))  # contraction
    rules.append(AxisRule(P, (P, R)))
    rules.append(AxisRule(P, (R, P)))
    return rules


@rule("addmm")
def addmm_rules(c: RuleCtx) -> list[AxisRule]:
    """addmm(bias, x, w) = bias + x @ w with x (M, K), w (K, N) (transformers' GPT-2 Conv1D)."""
    if len(c.in_shapes) != 3 or len(c.in_shapes[1]) != 2 or len(c.in_shapes[2]) != 2:
        return []
    bias_cols = Shard(len(c.in_shapes[0]) - 1) if c.in_shapes[0] else R
    return [
        AxisRule(Shard(0), (R, Shard(0), R)),  # rows
        AxisRule(Shard(1), (bias_cols, R, Shard(1))),  # columns
        AxisRule(P, (P, Shard(1), Shard(0))),  # contraction
        AxisRule(P, (P, P, R)),
    ]


@rule("conv2d")
def conv2d_rules(c: RuleCtx) -> list[AxisRule]:
    bias = len(c.in_shapes) > 2
    groups = c.attr("groups", "arg6", default=1) or 1
    rules = [AxisRule(Shard(0), (Shard(0), R) + ((R,) if bias else ()))]
    if groups == 1:
        rules.append(AxisRule(Shard(1), (R, Shard(0)) + ((Shard(0),) if bias else ())))
        rules.append(AxisRule(P, (Shard(1), Shard(1)) + ((P,) if bias else ())))
    return rules


@rule("embedding")
def embedding_rules(c: RuleCtx) -> list[AxisRule]:
    # F.embedding(indices, weight); aten.embedding(weight, indices): find the integer input
    idx_pos = 0 if not c.in_dtypes[0].is_floating_point else 1
    w_pos = 1 - idx_pos
    nidx = len(c.in_shapes[idx_pos])
    out_last = len(c.out_shape) - 1

    def make(idx_p: Placement, w_p: Placement, out: Placement) -> AxisRule:
        ins = [R, R]
        ins[idx_pos], ins[w_pos] = idx_p, w_p
        return AxisRule(out, tuple(ins))

    rules = [make(Shard(d), R, Shard(d)) for d in range(nidx)]
    rules.append(make(R, Shard(1), Shard(out_last)))  # hidden-sharded table
    rules.append(make(R, Shard(0), P))  # vocabulary-parallel table (masked lookup, summed)
    return rules


# ------------------------------------------------------------------------------ attention


@rule("sdpa")
def sdpa_rules(c: RuleCtx) -> list[AxisRule]:
    q = c.in_shapes[0]
    n = len(q)
    extra = len(c.in_shapes) - 3  # attention mask

    def mask(dim: int | None) -> tuple[Placement, ...]:
        if not extra:
            return ()
        m = c.in_shapes[3]
        if dim is None:
            return (R,) * extra
        dm = dim - (n - len(m))
        return ((Shard(dm) if dm >= 0 and m[dm] == q[dim] else R),) * extra

    rules = [AxisRule(Shard(d), (Shard(d),) * 3 + mask(d)) for d in range(n - 3)]  # batch
    if n >= 3:
        rules.append(AxisRule(Shard(n - 3), (Shard(n - 3),) * 3 + mask(n - 3)))  # heads (q and kv heads)
    rules.append(AxisRule(Shard(n - 2), (Shard(n - 2), R, R) + mask(n - 2)))  # queries' sequence, K/V gathered
    return rules


# ------------------------------------------------------------------------------ normalisation


@rule("layer_norm", "rms_norm")
def norm_rules(c: RuleCtx) -> list[AxisRule]:
    nx = len(c.in_shapes[0])
    shape = c.attr("arg1", "normalized_shape")
    nd = len(shape) if isinstance(shape, (list, tuple)) else (len(c.in_shapes[1]) if len(c.in_shapes) > 1 else 1)
    others = (R,) * (len(c.in_shapes) - 1)
    return [AxisRule(Shard(d), (Shard(d),) + others) for d in range(nx - nd)]


@rule("softmax")
def softmax_rules(c: RuleCtx) -> list[AxisRule]:
    n = len(c.in_shapes[0])
    dim = _norm(int(c.attr("dim", "arg1", default=-1)), n)
    return [AxisRule(Shard(d), (Shard(d),)) for d in range(n) if d != dim]


@rule("cross_entropy")
def cross_entropy_rules(c: RuleCtx) -> list[AxisRule]:
    logits = c.in_shapes[0]
    if len(logits) != 2:
        return []
    n_rows = logits[0]
    stat = n_rows * 4.0  # one fp32 per row
    return [
        AxisRule(P, (Shard(0), Shard(0))),  # rows split: each rank a partial mean
        # vocabulary-parallel (Megatron): all-reduces of the row max, the target logit and the sum of exps
        AxisRule(P, (Shard(1), R), comm=(("all_reduce", stat),) * 3),
    ]


# ------------------------------------------------------------------------------ elementwise

_ADDITIVE = {"add", "sub", "neg", "iadd", "__add__", "__radd__", "float", "half", "bfloat16", "to", "type_as", "_to_copy", "clone", "type"}
_MULTIPLICATIVE = {"mul", "imul", "__mul__", "__rmul__", "div", "truediv"}


def _base_name(target: str) -> str:
    """``aten.add.Tensor``, ``add.Tensor`` (an overload's __name__), ``add`` -> ``add``."""
    return target.removeprefix("aten.").split(".")[0]


def broadcast_rules(c: RuleCtx, allow_partial: bool) -> list[AxisRule]:
    out = c.out_shape
    rules = []
    for d in range(len(out)):
        ins = []
        for shape in c.in_shapes:
            di = d - (len(out) - len(shape))
            ins.append(Shard(di) if di >= 0 and shape[di] == out[d] and out[d] > 1 else R)
        if any(isinstance(p, Shard) for p in ins):
            rules.append(AxisRule(Shard(d), tuple(ins)))
    if allow_partial:
        name = _base_name(c.target)
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


@rule("elementwise")
def elementwise_rules(c: RuleCtx) -> list[AxisRule]:
    return broadcast_rules(c, allow_partial=True)


@rule("dropout")
def dropout_rules(c: RuleCtx) -> list[AxisRule]:
    return broadcast_rules(c, allow_partial=False)


@rule("expand")
def expand_rules(c: RuleCtx) -> list[AxisRule]:
    return broadcast_rules(c, allow_partial=False)


# ------------------------------------------------------------------------------ shape ops


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


@rule("view")
def view_rules(c: RuleCtx) -> list[AxisRule]:
    src, dst = c.in_shapes[0], c.out_shape
    extra = (R,) * (len(c.in_shapes) - 1)  # view_as / reshape_as take a second tensor
    rules = [AxisRule(Shard(j), (Shard(i),) + extra) for i, j in view_groups(src, dst)]
    rules.append(AxisRule(P, (P,) + extra))
    return rules


def _permutation(c: RuleCtx) -> list[int] | None:
    n = len(c.in_shapes[0])
    name = _base_name(c.target)
    if name in ("t", "mT"):
        perm = list(range(n))
        perm[-1], perm[-2] = perm[-2], perm[-1]
        return perm
    if name == "transpose":
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


@rule("transpose")
def transpose_rules(c: RuleCtx) -> list[AxisRule]:
    perm = _permutation(c)
    if perm is None:
        return []
    return [AxisRule(Shard(j), (Shard(perm[j]),)) for j in range(len(perm))] + [AxisRule(P, (P,))]


@rule("split")
def split_rules(c: RuleCtx) -> list[AxisRule]:
    dim = c.attrs["dim"]
    n = len(c.in_shapes[0])
    return [AxisRule(Shard(d), (Shard(d),)) for d in range(n) if d != dim] + [AxisRule(P, (P,))]


@rule("slice")
def slice_rules(c: RuleCtx) -> list[AxisRule]:
    if len(c.in_shapes) != 1:  # e.g. slicing a tensor built from sizes: replicate only
        return []
    src, dst = c.in_shapes[0], c.out_shape
    if len(src) != len(dst):
        return []
    return [AxisRule(Shard(d), (Shard(d),)) for d in range(len(src)) if src[d] == dst[d]] + [AxisRule(P, (P,))]


@rule("cat")
def cat_rules(c: RuleCtx) -> list[AxisRule]:
    n = len(c.out_shape)
    dim = _norm(int(c.attr("dim", "arg1", default=0)), n)
    k = len(c.in_shapes)
    return [AxisRule(Shard(d), (Shard(d),) * k) for d in range(n) if d != dim] + [AxisRule(P, (P,) * k)]


@rule("reduce")
def reduce_rules(c: RuleCtx) -> list[AxisRule]:
    n = len(c.in_shapes[0])
    dims = c.attr("dim", "arg1")
    if dims is None:
        reduced = set(range(n))
    else:
        reduced = {_norm(int(d), n) for d in (dims if isinstance(dims, (list, tuple)) else [dims])}
    keep = len(c.out_shape) == n
    rules = [AxisRule(P, (P,))]
    for d in range(n):
        if d in reduced:
            rules.append(AxisRule(P, (Shard(d),)))
        else:
            out_d = d if keep else d - sum(1 for r in reduced if r < d)
            rules.append(AxisRule(Shard(out_d), (Shard(d),)))
    return rules


@rule("pool")
def pool_rules(c: RuleCtx) -> list[AxisRule]:
    return [AxisRule(Shard(d), (Shard(d),)) for d in range(min(2, len(c.in_shapes[0])))]


@rule("input", "param")
def source_rules(c: RuleCtx) -> list[AxisRule]:
    return [AxisRule(Shard(d), ()) for d in range(len(c.out_shape))]


@rule("buffer", "constant", "unknown")
def replicate_only(c: RuleCtx) -> list[AxisRule]:
    return []
