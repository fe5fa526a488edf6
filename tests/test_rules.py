"""Every one-axis sharding rule computes the right thing: run the op on each rank's shard and
combine the outputs as the rule's output placement says (S: concatenate, R: equal, P: sum)."""
from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F

from autoplan.strategies.placement import Partial, Replicate, Shard
from autoplan.ops import RuleCtx, get
from autoplan.ops.shape import view_groups

N = 2  # ranks on the axis


def _split(t: torch.Tensor, p) -> list[torch.Tensor]:
    if isinstance(p, Shard):
        return list(t.chunk(N, dim=p.dim))
    if isinstance(p, Partial):
        return [t / N for _ in range(N)]  # summands
    return [t for _ in range(N)]


def _combine(outs: list[torch.Tensor], p) -> torch.Tensor:
    if isinstance(p, Shard):
        return torch.cat(outs, dim=p.dim)
    if isinstance(p, Partial):
        return sum(outs)
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0])
    return outs[0]


def _check(kind: str, fn, tensors: list[torch.Tensor], attrs: dict | None = None, target: str = "", skip=()):
    expected = fn(*tensors)
    ctx = RuleCtx(tuple(tuple(t.shape) for t in tensors), tuple(t.dtype for t in tensors), tuple(expected.shape), attrs or {}, target)
    rules = get(kind).rule(ctx)
    assert rules, f"{kind} has no rules"
    checked = 0
    for r in rules:
        if any(isinstance(p, Shard) and t.shape[p.dim] % N for p, t in zip(r.ins, tensors)):
            continue
        if any(isinstance(p, Partial) and not t.dtype.is_floating_point for p, t in zip(r.ins, tensors)):
            continue
        if r in skip:
            continue
        pieces = [_split(t, p) for t, p in zip(tensors, r.ins)]
        outs = [fn(*[pc[k] for pc in pieces]) for k in range(N)]
        torch.testing.assert_close(_combine(outs, r.out), expected, rtol=1e-5, atol=1e-5, msg=f"{kind} rule {r}")
        checked += 1
    assert checked >= 1


def test_linear_rules_compute_the_full_result_including_column_and_row_parallel():
    x, w, b = torch.randn(4, 6, 8), torch.randn(10, 8), torch.randn(10)
    _check("linear", F.linear, [x, w, b])
    _check("linear", F.linear, [x, w])


def test_addmm_rules_cover_rows_columns_and_contraction():
    _check("addmm", torch.addmm, [torch.randn(10), torch.randn(6, 8), torch.randn(8, 10)])


def test_matmul_rules_cover_batch_rows_columns_and_contraction():
    _check("matmul", torch.matmul, [torch.randn(2, 4, 6, 8), torch.randn(2, 4, 8, 6)])


def test_softmax_and_layer_norm_rules_never_split_the_normalised_dim():
    _check("softmax", lambda x: F.softmax(x, dim=-1), [torch.randn(4, 6, 8)], {"dim": -1})
    ln = lambda x, w, b: F.layer_norm(x, (8,), w, b)  # noqa: E731
    _check("layer_norm", ln, [torch.randn(4, 6, 8), torch.randn(8), torch.randn(8)], {"arg1": (8,)})
    rms = lambda x, w: F.rms_norm(x, (8,), w)  # noqa: E731
    _check("rms_norm", rms, [torch.randn(4, 6, 8), torch.randn(8)], {"arg1": (8,)})


def test_sdpa_rules_shard_batch_heads_and_query_sequence_including_grouped_query_attention():
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731
    _check("sdpa", fn, [q, k, v])
    _check("sdpa", F.scaled_dot_product_attention, [torch.randn(2, 4, 6, 8)] * 3)


def test_elementwise_rules_handle_broadcasting_and_partial_inputs():
    _check("elementwise", operator.add, [torch.randn(4, 6, 8), torch.randn(8)], target="add")
    _check("elementwise", operator.mul, [torch.randn(4, 6, 8), torch.randn(6, 8)], target="mul")
    _check("elementwise", F.gelu, [torch.randn(4, 6, 8)], target="gelu")


def test_adding_a_scalar_to_a_partial_value_is_not_allowed():
    ctx = RuleCtx(((4, 8),), (torch.float32,), (4, 8), {"arg1": 1.0}, "add")
    assert not any(isinstance(r.out, Partial) for r in get("elementwise").rule(ctx))


def test_view_transpose_split_cat_rules_move_the_sharded_dim_correctly():
    x = torch.randn(4, 6, 8)
    _check("view", lambda t: t.reshape(t.shape[0], t.shape[1], -1, 4), [x])
    _check("view", lambda t: t.reshape(-1, t.shape[2]), [x])
    _check("transpose", lambda t: t.transpose(1, 2), [x], {"arg1": 1, "arg2": 2}, "transpose")
    _check("transpose", lambda t: t.permute(2, 0, 1), [x], {"arg1": 2, "arg2": 0, "arg3": 1}, "permute")
    _check("split", lambda t: t[:, :, 4:], [x], {"dim": 2})
    _check("cat", lambda a, b: torch.cat([a, b], dim=-1), [x, x], {"dim": -1})


def test_view_groups_pair_the_outermost_dims_of_merged_and_split_groups():
    assert view_groups((2, 3, 4), (6, 4)) == [(0, 0), (2, 1)]
    assert view_groups((6, 4), (2, 3, 4)) == [(0, 0), (1, 2)]
    assert view_groups((2, 1, 4), (2, 4)) == [(0, 0), (2, 1)]


def test_embedding_rules_shard_tokens_and_hidden_size():
    idx, w = torch.randint(0, 10, (4, 6)), torch.randn(10, 8)
    ctx = RuleCtx(((4, 6), (10, 8)), (torch.int64, torch.float32), (4, 6, 8), {}, "embedding")
    vocab = [r for r in get("embedding").rule(ctx) if isinstance(r.out, Partial)]
    assert vocab and vocab[0].ins == (Replicate(), Shard(0))  # masked lookup: runtime-specific
    _check("embedding", F.embedding, [idx, w], skip=tuple(vocab))


def test_cross_entropy_row_split_gives_a_partial_mean():
    logits, tgt = torch.randn(8, 10), torch.randint(0, 10, (8,))
    ctx = RuleCtx(((8, 10), (8,)), (torch.float32, torch.int64), (), {}, "cross_entropy")
    rows = [r for r in get("cross_entropy").rule(ctx) if r.ins[0] == Shard(0)]
    pieces = list(zip(logits.chunk(N), tgt.chunk(N)))
    total = sum(F.cross_entropy(a, b) * a.shape[0] / logits.shape[0] for a, b in pieces)
    torch.testing.assert_close(total, F.cross_entropy(logits, tgt))
    assert rows and isinstance(rows[0].out, Partial)
    vocab = [r for r in get("cross_entropy").rule(ctx) if r.ins[0] == Shard(1)]
    assert vocab and vocab[0].comm and vocab[0].comm[0][0] == "all_reduce"


@pytest.mark.parametrize("kind", ["conv"])
def test_conv2d_rules_split_batch_output_and_input_channels(kind):
    x, w, b = torch.randn(4, 6, 8, 8), torch.randn(10, 6, 3, 3), torch.randn(10)
    _check(kind, F.conv2d, [x, w, b])
