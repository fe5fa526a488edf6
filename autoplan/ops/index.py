"""Lookups and indexed updates: embedding, embedding_bag, gather, scatter, index_select, index, index_add, index_put."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from autoplan.ops.registry import AxisRule, RuleCtx, elementwise_flops, op_kind, saves_none
from autoplan.strategies.placement import P, R, Placement, Shard

aten = torch.ops.aten


def _norm(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def _no_weight_value(name: str, pos: int) -> bool:
    return False  # the table's gradient needs only the output gradient and the indices


@op_kind("embedding", spellings=(F.embedding, aten.embedding), saves_input=saves_none, reads_weight=_no_weight_value)
def embedding_rules(c: RuleCtx) -> list[AxisRule]:
    """Rows looked up by index: split the indices, or the table's hidden dim, or its vocabulary
    (each rank looks up the ids it owns, zeros elsewhere: a partial sum)."""
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


@op_kind("embedding_bag", spellings=(F.embedding_bag, aten.embedding_bag, aten._embedding_bag), flops=elementwise_flops,
         reads_weight=_no_weight_value)
def embedding_bag_rules(c: RuleCtx) -> list[AxisRule]:
    """Bags of rows summed: the table's hidden dim splits the output's."""
    w_pos = next((i for i, d in enumerate(c.in_dtypes) if d.is_floating_point and len(c.in_shapes[i]) == 2), None)
    if w_pos is None or len(c.out_shape) != 2:
        return []
    ins = [R] * len(c.in_shapes)
    ins[w_pos] = Shard(1)
    return [AxisRule(Shard(1), tuple(ins))]


@op_kind("gather", spellings=(torch.gather, aten.gather, "gather", torch.take_along_dim, aten.take_along_dim),
         flops=elementwise_flops, saves_input=saves_none)
def gather_rules(c: RuleCtx) -> list[AxisRule]:
    """out[i][j] = x[i][index[i][j]] along ``dim``: any other dim of equal size splits x, index and out."""
    x, idx = c.in_shapes[0], c.in_shapes[-1]
    dim = c.attr("arg1", "dim")
    if dim is None or len(x) != len(idx):
        return []
    dim = _norm(int(dim), len(x))
    return [AxisRule(Shard(d), (Shard(d), Shard(d))) for d in range(len(x)) if d != dim and x[d] == idx[d]]


@op_kind("scatter", spellings=(torch.scatter, aten.scatter, "scatter", torch.scatter_add, aten.scatter_add,
                               "scatter_add", aten.scatter_reduce, torch.scatter_reduce, "scatter_reduce"),
         flops=elementwise_flops, saves_input=saves_none)
def scatter_rules(c: RuleCtx) -> list[AxisRule]:
    """x[i][index[i][j]] = src[i][j] along ``dim``: any other dim of equal size splits all three alike."""
    shapes = c.in_shapes
    dim = c.attr("arg1", "dim")
    if dim is None or any(len(s) != len(shapes[0]) for s in shapes):
        return []
    dim = _norm(int(dim), len(shapes[0]))
    n = len(shapes)
    return [AxisRule(Shard(d), (Shard(d),) * n) for d in range(len(shapes[0]))
            if d != dim and all(s[d] == shapes[0][d] for s in shapes)]


@op_kind("index_select", spellings=(torch.index_select, aten.index_select, "index_select"), flops=elementwise_flops,
         saves_input=saves_none)
def index_select_rules(c: RuleCtx) -> list[AxisRule]:
    """Whole slices picked along ``dim``: any other dim splits x and out (the index replicated);
    the picked dim splits with the index (each rank picks its share)."""
    x = c.in_shapes[0]
    dim = c.attr("arg1", "dim")
    if dim is None or len(c.in_shapes) != 2:
        return []
    dim = _norm(int(dim), len(x))
    rules = [AxisRule(Shard(d), (Shard(d), R)) for d in range(len(x)) if d != dim]
    return rules + [AxisRule(Shard(dim), (R, Shard(0))), AxisRule(P, (P, R))]


@op_kind("index", spellings=(aten.index, aten._unsafe_index), flops=elementwise_flops, saves_input=saves_none)
def index_rules(c: RuleCtx) -> list[AxisRule]:
    """x[idx] with one index tensor on the leading dim (token dispatch, routing): the index's dims split
    the output's leading dims (each rank gathers its rows); x's other dims split the output's trailing ones."""
    if len(c.in_shapes) != 2:
        return []
    x, idx, out = c.in_shapes[0], c.in_shapes[1], c.out_shape
    k = len(idx)
    if tuple(out[:k]) != tuple(idx) or tuple(out[k:]) != tuple(x[1:]):
        return []
    # x[:, idx] is captured alike (the leading Nones are no constants): refuse shapes that fit it too
    if any(tuple(out) == tuple(x[:m]) + tuple(idx) + tuple(x[m + 1:]) for m in range(1, len(x))):
        return []
    rules = [AxisRule(Shard(j), (R, Shard(j))) for j in range(k)]
    rules += [AxisRule(Shard(k + d - 1), (Shard(d), R)) for d in range(1, len(x))]
    return rules + [AxisRule(P, (P, R))]


@op_kind("index_add", spellings=(torch.index_add, aten.index_add, "index_add", torch.index_copy, aten.index_copy,
                                 "index_copy"), flops=elementwise_flops, saves_input=saves_none)
def index_add_rules(c: RuleCtx) -> list[AxisRule]:
    """x.index_add(dim, index, source): any other dim splits x, source and out (index replicated);
    sums are linear: partial x and source give a partial result."""
    if len(c.in_shapes) != 3:
        return []
    x = c.in_shapes[0]
    dim = c.attr("arg1", "dim")
    if dim is None:
        return []
    dim = _norm(int(dim), len(x))
    rules = [AxisRule(Shard(d), (Shard(d), R, Shard(d))) for d in range(len(x)) if d != dim]
    return rules + ([AxisRule(P, (P, R, P))] if c.name == "index_add" else [])


@op_kind("index_put", spellings=(aten.index_put, aten._unsafe_index_put, "index_put"), flops=elementwise_flops,
         saves_input=saves_none)
def index_put_rules(c: RuleCtx) -> list[AxisRule]:
    """x[idx] = values: replicated (where the indices point is known only at run time)."""
    return []
