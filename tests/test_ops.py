"""The op registry's newer kinds, rule by rule: every one-axis rule is run on N shards and the per-rank
outputs combined as its output placement says (S: concatenate, P: sum, R: all equal) must equal the op on
the full tensors (the meaning ``runtime.apply.run_locally`` relies on). Unlike ``test_rules._check``,
``_check_all`` checks EVERY rule returned (shapes are chosen divisible; a rule left out must be named in
``skip``) and returns them, so each test also pins which rules exist. Then the registry's invariants, and
the kinds of the graphs of a few catalogue models."""
from __future__ import annotations

import collections

import pytest
import torch
import torch.nn.functional as F

from autoplan.ops import ALIAS_KINDS, OP_KINDS, AxisRule, RuleCtx, get, kind_of
from autoplan.ops.norm import BATCH_NORM_GRAD_STATS, BATCH_NORM_STATS
from autoplan.ops.registry import _key
from autoplan.strategies.placement import Partial, Replicate, Shard
from test_rules import N, _combine, _split  # tests/ is on sys.path (pytest's default import mode)

aten = torch.ops.aten
S, R, P = Shard, Replicate(), Partial()

torch.manual_seed(0)


def _ctx(tensors: list[torch.Tensor], out_shape, attrs: dict | None = None, target: str = "") -> RuleCtx:
    return RuleCtx(tuple(tuple(t.shape) for t in tensors), tuple(t.dtype for t in tensors), tuple(out_shape),
                   attrs or {}, target)


def _check_all(kind: str, fn, tensors: list[torch.Tensor], attrs: dict | None = None, target: str = "",
               skip=()) -> list[AxisRule]:
    """Every rule of ``kind`` for this call computes ``fn`` on the full tensors (except those in ``skip``)."""
    expected = fn(*tensors)
    rules = get(kind).rule(_ctx(tensors, expected.shape, attrs, target))
    assert rules, f"{kind} has no rules"
    for r in rules:
        assert len(r.ins) == len(tensors), f"{kind} rule {r} places {len(r.ins)} of {len(tensors)} inputs"
        if r in skip:
            continue
        for p, t in zip(r.ins, tensors):
            assert not isinstance(p, Shard) or t.shape[p.dim] % N == 0, f"pick shapes divisible by {N}: {r}"
            assert not isinstance(p, Partial) or t.dtype.is_floating_point, f"{kind} rule {r}: partial integers"
        pieces = [_split(t, p) for t, p in zip(tensors, r.ins)]
        outs = [fn(*[pc[k] for pc in pieces]) for k in range(N)]
        torch.testing.assert_close(_combine(outs, r.out), expected, rtol=1e-5, atol=1e-5, msg=f"{kind} rule {r}")
    return rules


def _outs(rules: list[AxisRule]) -> set:
    return {r.out for r in rules}


# ------------------------------------------------------------------------------------------------ conv

def test_conv1d_and_conv3d_split_batch_output_channels_and_input_channels():
    x, w, b = torch.randn(4, 6, 10), torch.randn(8, 6, 3), torch.randn(8)
    rules = _check_all("conv", lambda x, w, b: F.conv1d(x, w, b, padding=1), [x, w, b], {"padding": 1}, "conv1d")
    assert set(rules) == {AxisRule(S(0), (S(0), R, R)), AxisRule(S(1), (R, S(0), S(0))), AxisRule(P, (S(1), S(1), P))}
    assert len(_check_all("conv", F.conv1d, [x, w], target="conv1d")) == 3  # no bias
    x, w, b = torch.randn(2, 4, 6, 6, 6), torch.randn(6, 4, 3, 3, 3), torch.randn(6)
    rules = _check_all("conv", lambda x, w, b: F.conv3d(x, w, b, stride=2), [x, w, b], {"stride": 2}, "conv3d")
    assert _outs(rules) == {S(0), S(1), P}


def test_depthwise_conv2d_splits_channels_with_its_weight_given_the_local_group_count():
    # each rank convolves its channels with its filters: groups = its channel count (C / N), not C
    x, w, b = torch.randn(2, 6, 8, 8), torch.randn(6, 1, 3, 3), torch.randn(6)
    fn = lambda x, w, b: F.conv2d(x, w, b, padding=1, groups=x.shape[1])  # noqa: E731
    for attrs, target in (({"padding": 1, "groups": 6}, "conv2d"),
                          ({"arg3": [1, 1], "arg4": [1, 1], "arg5": [1, 1], "arg6": 6}, "aten.conv2d.default")):
        rules = _check_all("conv", fn, [x, w, b], attrs, target)
        assert set(rules) == {AxisRule(S(0), (S(0), R, R)), AxisRule(S(1), (S(1), S(0), S(0)))}


def test_grouped_conv_that_is_not_depthwise_splits_only_the_batch():
    x, w = torch.randn(2, 6, 8, 8), torch.randn(6, 3, 3, 3)  # groups=2
    rules = _check_all("conv", lambda x, w: F.conv2d(x, w, groups=2), [x, w], {"groups": 2}, "conv2d")
    assert rules == [AxisRule(S(0), (S(0), R))]


def test_generic_aten_convolution_reads_groups_and_transposed_from_their_positions():
    # aten.convolution / aten._convolution(x, w, b, stride, padding, dilation, transposed, output_padding, groups, ...)
    x, w, b = torch.randn(2, 4, 6, 6), torch.randn(4, 6, 3, 3), torch.randn(6)  # transposed: w is (C_in, C_out, k)
    attrs = {"arg3": [1, 1], "arg4": [0, 0], "arg5": [1, 1], "arg6": True, "arg7": [0, 0], "arg8": 1}
    fn = lambda x, w, b: aten.convolution.default(x, w, b, [1, 1], [0, 0], [1, 1], True, [0, 0], 1)  # noqa: E731
    rules = _check_all("conv", fn, [x, w, b], attrs, "aten.convolution.default")
    assert set(rules) == {AxisRule(S(0), (S(0), R, R)), AxisRule(S(1), (R, S(1), S(0))), AxisRule(P, (S(1), S(0), P))}
    ctx = _ctx([x, w, b], fn(x, w, b).shape, attrs, "aten.convolution.default")
    assert get("conv").flops(ctx) == 2.0 * x.numel() * 6 * 9  # each input element meets C_out * k weights

    x, w, b = torch.randn(2, 6, 8, 8), torch.randn(6, 1, 3, 3), torch.randn(6)  # depthwise, through _convolution
    attrs = {"arg3": [1, 1], "arg4": [1, 1], "arg5": [1, 1], "arg6": False, "arg7": [0, 0], "arg8": 6,
             "arg9": False, "arg10": False, "arg11": True, "arg12": True}
    fn = lambda x, w, b: aten._convolution.default(  # noqa: E731
        x, w, b, [1, 1], [1, 1], [1, 1], False, [0, 0], x.shape[1], False, False, True, True)
    rules = _check_all("conv", fn, [x, w, b], attrs, "aten._convolution.default")
    assert set(rules) == {AxisRule(S(0), (S(0), R, R)), AxisRule(S(1), (S(1), S(0), S(0)))}


# ------------------------------------------------------------------------------------------- norms

def test_group_norm_splits_only_the_batch():
    x, w, b = torch.randn(4, 6, 5, 5), torch.randn(6), torch.randn(6)
    rules = _check_all("group_norm", lambda x, w, b: F.group_norm(x, 3, w, b), [x, w, b], {"arg1": 3}, "group_norm")
    assert rules == [AxisRule(S(0), (S(0), R, R))]


def _bn(x, rm, rv, w, b):
    return F.batch_norm(x, rm.clone(), rv.clone(), w, b, training=True, momentum=0.1, eps=1e-5)


def _bn_tensors(c: int = 6):
    return [torch.randn(4, c, 5, 5) * 3 + 1, torch.randn(c), torch.rand(c) + 0.5, torch.randn(c), torch.randn(c)]


def test_batch_norm_channel_split_splits_running_stats_and_affine_weights_and_exchanges_nothing():
    x, rm, rv, w, b = tensors = _bn_tensors()
    rules = get("batch_norm").rule(_ctx(tensors, x.shape, {"training": True}, "batch_norm"))
    batch = [r for r in rules if r.ins[0] == S(0)]
    checked = _check_all("batch_norm", _bn, tensors, {"training": True}, "batch_norm", skip=batch)
    channel = [r for r in checked if r.ins[0] == S(1)]
    assert channel == [AxisRule(S(1), (S(1), S(0), S(0), S(0), S(0)))] and not channel[0].comm
    # the running statistics, updated in place on each rank's channels, are the full update's shards
    full_rm, full_rv = rm.clone(), rv.clone()
    F.batch_norm(x, full_rm, full_rv, w, b, training=True)
    parts = [[t.clone() for t in pc] for pc in zip(x.chunk(N, 1), rm.chunk(N), rv.chunk(N), w.chunk(N), b.chunk(N))]
    for xs, rms, rvs, ws, bs in parts:
        F.batch_norm(xs, rms, rvs, ws, bs, training=True)
    torch.testing.assert_close(torch.cat([p[1] for p in parts]), full_rm)
    torch.testing.assert_close(torch.cat([p[2] for p in parts]), full_rv)


def _sync_batch_norm(x, rm, rv, w, b, momentum=0.1, eps=1e-5):
    """SyncBatchNorm on the batch shards: per-shard (sum, sum of squares, count) per channel, all-reduced (summed)."""
    c = x.shape[1]
    dims = [0] + list(range(2, x.ndim))
    shards = x.chunk(N, 0)
    stats = [torch.stack([s.sum(dims), (s * s).sum(dims), torch.full((c,), s.numel() / c)]) for s in shards]
    total = sum(stats)  # the all-reduce
    count = total[2]
    mean = total[0] / count
    var = total[1] / count - mean * mean
    rstd = (var + eps).rsqrt()
    shape = (1, c) + (1,) * (x.ndim - 2)
    ys = [(s - mean.view(shape)) * (rstd * w).view(shape) + b.view(shape) for s in shards]
    new_rm = (1 - momentum) * rm + momentum * mean
    new_rv = (1 - momentum) * rv + momentum * var * count / (count - 1)
    return ys, mean, rstd, new_rm, new_rv, stats[0]


def test_batch_norm_batch_split_is_sync_batch_norm_with_its_statistics_all_reduce_listed():
    x, rm, rv, w, b = tensors = _bn_tensors()
    c = x.shape[1]
    rules = get("batch_norm").rule(_ctx(tensors, x.shape, {"training": True}, "batch_norm"))
    (batch,) = [r for r in rules if r.ins[0] == S(0)]
    assert batch.out == S(0) and batch.ins == (S(0), R, R, R, R)
    assert ("all_reduce", 3 * 4.0 * c, False, "forward") in batch.comm  # sum, sum of squares, count: fp32 each
    assert ("all_reduce", 2 * 4.0 * c, False, "backward") in batch.comm
    assert len(batch.comm) == 2

    ys, mean, rstd, new_rm, new_rv, local_stats = _sync_batch_norm(x, rm, rv, w, b)
    assert local_stats.numel() * local_stats.element_size() == BATCH_NORM_STATS * 4 * c  # what is all-reduced
    full_rm, full_rv = rm.clone(), rv.clone()
    full = F.batch_norm(x, full_rm, full_rv, w, b, training=True)
    torch.testing.assert_close(torch.cat(ys), full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(new_rm, full_rm)
    torch.testing.assert_close(new_rv, full_rv)
    # without the all-reduce the shards are normalised with their own statistics: wrong
    alone = torch.cat([_bn(s, rm, rv, w, b) for s in x.chunk(N)])
    assert not torch.allclose(alone, F.batch_norm(x, rm.clone(), rv.clone(), w, b, training=True), atol=1e-3)


def test_batch_norm_batch_split_backward_needs_two_statistics_summed_over_the_shards():
    x, rm, rv, w, b = _bn_tensors()
    xr = x.clone().requires_grad_()
    dy = torch.randn_like(x)
    F.batch_norm(xr, rm.clone(), rv.clone(), w, b, training=True).backward(dy)
    _, mean, rstd, *_ = _sync_batch_norm(x, rm, rv, w, b)
    c, dims = x.shape[1], [0, 2, 3]
    shape = (1, c, 1, 1)
    xhats = [(s - mean.view(shape)) * rstd.view(shape) for s in x.chunk(N)]
    local = [torch.stack([g.sum(dims), (g * h).sum(dims)]) for g, h in zip(dy.chunk(N), xhats)]
    assert local[0].numel() * local[0].element_size() == BATCH_NORM_GRAD_STATS * 4 * c
    sum_dy, sum_dy_xhat = sum(local)  # the backward all-reduce
    count = x.numel() / c
    dx = [(w * rstd).view(shape) / count * (count * g - sum_dy.view(shape) - h * sum_dy_xhat.view(shape))
          for g, h in zip(dy.chunk(N), xhats)]
    torch.testing.assert_close(torch.cat(dx), xr.grad, rtol=1e-4, atol=1e-5)


def test_functional_batch_norm_per_channel_outputs_split_with_the_channels_and_are_whole_under_a_batch_split():
    # _native_batch_norm_legit_functional(x, w, b, running_mean, running_var, training, momentum, eps)
    # -> (out, save_mean, save_rstd, new_running_mean, new_running_var)
    x, rm, rv, w, b = _bn_tensors()
    args = [x, w, b, rm, rv]
    attrs = {"arg5": True, "arg6": 0.1, "arg7": 1e-5}
    target = "aten._native_batch_norm_legit_functional.default"
    full = aten._native_batch_norm_legit_functional.default(x, w, b, rm, rv, True, 0.1, 1e-5)
    _, mean, rstd, new_rm, new_rv, _ = _sync_batch_norm(x, rm, rv, w, b)
    for i, synced in zip(range(1, 5), (mean, rstd, new_rm, new_rv)):
        fn = lambda *t, i=i: aten._native_batch_norm_legit_functional.default(*t, True, 0.1, 1e-5)[i]  # noqa: E731
        rules = get("batch_norm").rule(_ctx(args, full[i].shape, attrs, target))
        whole = [r for r in rules if r.ins[0] == S(0)]
        assert whole == [AxisRule(R, (S(0), R, R, R, R))]  # synchronised: every rank holds the global statistics
        torch.testing.assert_close(synced, full[i], rtol=1e-5, atol=1e-5)
        rules = _check_all("batch_norm", fn, args, attrs, target, skip=whole)
        assert AxisRule(S(0), (S(1), S(0), S(0), S(0), S(0))) in rules
    main = get("batch_norm").rule(_ctx(args, x.shape, attrs, target))
    assert {r.ins[0] for r in main} == {S(0), S(1)} and any(r.comm for r in main if r.ins[0] == S(0))


# ------------------------------------------------------------------------------------------- einsum

@pytest.mark.parametrize("equation, shapes, outs", [
    ("bij,bjk->bik", [(2, 4, 6), (2, 6, 4)], {S(0), S(1), S(2), P}),
    ("bhqd,bhkd->bhqk", [(2, 2, 4, 6), (2, 2, 4, 6)], {S(0), S(1), S(2), S(3), P}),
    ("ij->j", [(4, 6)], {S(0), P}),
    ("bi,bi->b", [(4, 6), (4, 6)], {S(0), P}),
    ("bte,ec->btc", [(2, 4, 6), (6, 4)], {S(0), S(1), S(2), P}),
    ("ii->i", [(4, 4)], {P}),
])
def test_einsum_rules_from_the_subscripts_all_compute_the_full_result(equation, shapes, outs):
    tensors = [torch.randn(s) for s in shapes]
    rules = _check_all("einsum", lambda *t: torch.einsum(equation, *t), tensors, {"arg0": equation}, "einsum")
    assert _outs(rules) == outs
    letters = {ch for s in equation.split("->")[0].split(",") for ch in s if s.count(ch) == 1}
    assert len(rules) == len(letters) + len(tensors)  # one per (non-diagonal) letter, one per partial operand


def test_einsum_never_shards_a_diagonal_letter():
    rules = get("einsum").rule(_ctx([torch.randn(4, 4)], (4,), {"arg0": "ii->i"}, "einsum"))
    assert rules and all(not isinstance(p, Shard) for r in rules for p in (r.out, *r.ins))
    rules = get("einsum").rule(_ctx([torch.randn(4, 4, 6)], (4, 6), {"arg0": "iij->ij"}, "einsum"))
    assert all(r.ins[0] != S(0) and r.ins[0] != S(1) for r in rules) and AxisRule(S(1), (S(2),)) in rules


# ------------------------------------------------------------------------------------------ baddbmm

@pytest.mark.parametrize("base_shape", [(2, 4, 6), (4, 6), (1, 1, 6)])
def test_baddbmm_splits_batch_rows_and_columns_with_the_broadcast_input_following(base_shape):
    base, a, b = torch.randn(base_shape), torch.randn(2, 4, 8), torch.randn(2, 8, 6)
    fn = lambda base, a, b: torch.baddbmm(base, a, b, beta=0.5, alpha=2.0)  # noqa: E731
    rules = _check_all("baddbmm", fn, [base, a, b], {"beta": 0.5, "alpha": 2.0}, "baddbmm")
    assert _outs(rules) == {S(0), S(1), S(2)}


# ------------------------------------------------------------------------------------------- lookups

def test_gather_splits_every_other_dim_where_index_and_input_agree():
    x = torch.randn(4, 6, 8)
    idx = torch.randint(0, 6, (4, 3, 8))
    for dim in (1, -2):
        rules = _check_all("gather", lambda x, i: torch.gather(x, dim, i), [x, idx], {"arg1": dim}, "gather")
        assert rules == [AxisRule(S(0), (S(0), S(0))), AxisRule(S(2), (S(2), S(2)))]
    small = torch.randint(0, 6, (4, 3, 4))  # smaller than x on dim 2: that dim cannot split
    rules = _check_all("gather", lambda x, i: torch.gather(x, 1, i), [x, small], {"arg1": 1}, "aten.gather.default")
    assert rules == [AxisRule(S(0), (S(0), S(0)))]


def test_scatter_and_scatter_add_split_every_other_dim_of_input_index_and_source_alike():
    x, src = torch.randn(4, 6, 8), torch.randn(4, 6, 8)
    perm = torch.rand(4, 6, 8).argsort(dim=1)  # distinct targets: scatter is deterministic
    rules = _check_all("scatter", lambda x, i, s: torch.scatter(x, 1, i, s), [x, perm, src], {"arg1": 1}, "scatter")
    assert rules == [AxisRule(S(0), (S(0),) * 3), AxisRule(S(2), (S(2),) * 3)]
    rules = _check_all("scatter", lambda x, i: torch.scatter(x, 1, i, 2.0), [x, perm], {"arg1": 1, "arg3": 2.0},
                       "aten.scatter.value")
    assert _outs(rules) == {S(0), S(2)}
    x5, dup, src6 = torch.randn(4, 5, 8), torch.randint(0, 5, (4, 6, 8)), torch.randn(4, 6, 8)  # repeated targets
    for target, fn in (("scatter_add", lambda x, i, s: torch.scatter_add(x, 1, i, s)),
                       ("scatter_reduce", lambda x, i, s: torch.scatter_reduce(x, 1, i, s, "amax"))):
        rules = _check_all("scatter", fn, [x5, dup, src6], {"arg1": 1, "arg4": "amax"}, target)
        assert rules == [AxisRule(S(0), (S(0),) * 3), AxisRule(S(2), (S(2),) * 3)]


def test_index_select_splits_other_dims_or_the_picked_dim_with_its_index_or_a_partial_input():
    x, idx = torch.randn(4, 6, 8), torch.randint(0, 6, (4,))
    rules = _check_all("index_select", lambda x, i: torch.index_select(x, 1, i), [x, idx], {"arg1": 1}, "index_select")
    assert set(rules) == {AxisRule(S(0), (S(0), R)), AxisRule(S(2), (S(2), R)), AxisRule(S(1), (R, S(0))),
                          AxisRule(P, (P, R))}


def test_index_with_one_index_tensor_splits_the_index_dims_or_the_trailing_input_dims():
    x, idx = torch.randn(6, 4, 8), torch.randint(0, 6, (2, 4))
    fn = lambda x, i: aten.index.Tensor(x, [i])  # x[idx]  # noqa: E731
    rules = _check_all("index", fn, [x, idx], {}, "aten.index.Tensor")
    assert set(rules) == {AxisRule(S(0), (R, S(0))), AxisRule(S(1), (R, S(1))), AxisRule(S(2), (S(1), R)),
                          AxisRule(S(3), (S(2), R)), AxisRule(P, (P, R))}


def test_index_on_a_later_dim_is_not_mistaken_for_a_leading_index_when_shapes_coincide():
    # x[:, idx] is aten.index(x, [None, idx]): the None is not in attrs; on (4, 4, 3) the shapes fit x[idx] too
    x, idx = torch.randn(4, 4, 3), torch.tensor([3, 0, 2, 1])
    out = aten.index.Tensor(x, [None, idx])
    assert get("index").rule(_ctx([x, idx], out.shape, {}, "aten.index.Tensor")) == []


def test_index_add_splits_other_dims_and_sums_partial_inputs_but_index_copy_does_not():
    x, idx, src = torch.randn(6, 4), torch.randint(0, 6, (4,)), torch.randn(4, 4)
    rules = _check_all("index_add", lambda x, i, s: torch.index_add(x, 0, i, s, alpha=2.0), [x, idx, src],
                       {"arg1": 0, "alpha": 2.0}, "index_add")
    assert set(rules) == {AxisRule(S(1), (S(1), R, S(1))), AxisRule(P, (P, R, P))}
    xt, srct = torch.randn(4, 6), torch.randn(4, 4)
    rules = _check_all("index_add", lambda x, i, s: x.index_add(1, i, s), [xt, idx, srct], {"arg1": 1}, "index_add")
    assert set(rules) == {AxisRule(S(0), (S(0), R, S(0))), AxisRule(P, (P, R, P))}
    uniq = torch.randperm(6)[:4]
    rules = _check_all("index_add", lambda x, i, s: torch.index_copy(x, 0, i, s), [x, uniq, src], {"arg1": 0},
                       "index_copy")
    assert rules == [AxisRule(S(1), (S(1), R, S(1)))]


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_embedding_bag_splits_the_hidden_dim_with_the_table(mode):
    w = torch.randn(10, 8)
    bags = torch.randint(0, 10, (4, 3))
    rules = _check_all("embedding_bag", lambda i, w: F.embedding_bag(i, w, mode=mode), [bags, w], {"mode": mode},
                       "embedding_bag")
    assert rules == [AxisRule(S(1), (R, S(1)))]
    flat, offsets = torch.randint(0, 10, (12,)), torch.tensor([0, 3, 7, 9])
    rules = _check_all("embedding_bag", lambda i, w, o: F.embedding_bag(i, w, o, mode=mode), [flat, w, offsets],
                       {"mode": mode}, "embedding_bag")
    assert rules == [AxisRule(S(1), (R, S(1), R))]


def test_embedding_bag_aten_spelling_finds_the_table_first_and_per_sample_weights_stay_whole():
    w, flat, offsets, psw = torch.randn(10, 8), torch.randint(0, 10, (12,)), torch.tensor([0, 3, 7, 9]), torch.rand(12)
    fn = lambda w, i, o: aten.embedding_bag.default(w, i, o)[0]  # noqa: E731
    assert _check_all("embedding_bag", fn, [w, flat, offsets], {}, "aten.embedding_bag.default") == \
        [AxisRule(S(1), (S(1), R, R))]
    fn = lambda i, w, o, p: F.embedding_bag(i, w, o, mode="sum", per_sample_weights=p)  # noqa: E731
    assert _check_all("embedding_bag", fn, [flat, w, offsets, psw], {"mode": "sum"}, "embedding_bag") == \
        [AxisRule(S(1), (R, S(1), R, R))]


# ------------------------------------------------------------------------------- selections and scans

def test_topk_and_sort_split_every_dim_but_the_selected_one_for_values_and_indices():
    x = torch.randn(4, 6, 8)
    for out in (0, 1):  # values, indices (distinct random values: no ties)
        rules = _check_all("select_k", lambda x: torch.topk(x, 3, 1)[out], [x], {"arg1": 3, "arg2": 1}, "topk")
        assert rules == [AxisRule(S(0), (S(0),)), AxisRule(S(2), (S(2),))]
        rules = _check_all("select_k", lambda x: torch.topk(x, 3)[out], [x], {"arg1": 3}, "aten.topk.default")
        assert _outs(rules) == {S(0), S(1)}  # default dim: the last
        rules = _check_all("select_k", lambda x: torch.topk(x, 2, dim=0)[out], [x], {"arg1": 2, "dim": 0}, "topk")
        assert _outs(rules) == {S(1), S(2)}
        rules = _check_all("select_k", lambda x: torch.sort(x, 1, descending=True)[out], [x],
                           {"arg1": 1, "descending": True}, "sort")
        assert _outs(rules) == {S(0), S(2)}


def test_argmax_and_max_along_a_dim_shift_the_dims_after_it_unless_kept():
    x = torch.randn(4, 6, 8)
    rules = _check_all("select_k", lambda x: torch.argmax(x, 1), [x], {"arg1": 1}, "argmax")
    assert rules == [AxisRule(S(0), (S(0),)), AxisRule(S(1), (S(2),))]
    rules = _check_all("select_k", lambda x: torch.argmax(x, 1, keepdim=True), [x], {"arg1": 1, "keepdim": True},
                       "argmax")
    assert rules == [AxisRule(S(0), (S(0),)), AxisRule(S(2), (S(2),))]
    rules = _check_all("select_k", lambda x: torch.max(x, -1).values, [x], {"arg1": -1}, "aten.max.dim")
    assert rules == [AxisRule(S(0), (S(0),)), AxisRule(S(1), (S(1),))]
    assert get("select_k").rule(_ctx([x], (), {}, "argmax")) == []  # over the whole tensor
    elementwise = get("select_k").rule(_ctx([x, x], x.shape, {}, "aten.max.other"))  # torch.max(a, b)
    assert elementwise == [AxisRule(S(d), (S(d), S(d))) for d in range(3)]


def test_cumsum_splits_other_dims_and_is_linear_in_a_partial_input():
    x = torch.randn(4, 6, 8)
    rules = _check_all("scan", lambda x: torch.cumsum(x, 1), [x], {"arg1": 1}, "cumsum")
    assert set(rules) == {AxisRule(S(0), (S(0),)), AxisRule(S(2), (S(2),)), AxisRule(P, (P,))}
    rules = _check_all("scan", lambda x: torch.cumprod(x, -1), [x], {"arg1": -1}, "cumprod")
    assert set(rules) == {AxisRule(S(0), (S(0),)), AxisRule(S(1), (S(1),))}  # a product: no partial rule
    rules = _check_all("scan", lambda x: torch.cummax(x, dim=0).values, [x], {"dim": 0}, "cummax")
    assert _outs(rules) == {S(1), S(2)}


def test_log_softmax_splits_every_dim_but_the_normalised_one():
    x = torch.randn(4, 6, 8)
    rules = _check_all("softmax", lambda x: F.log_softmax(x, dim=1), [x], {"dim": 1}, "log_softmax")
    assert rules == [AxisRule(S(0), (S(0),)), AxisRule(S(2), (S(2),))]
    rules = _check_all("softmax", lambda x: aten._log_softmax.default(x, -1, False), [x], {"arg1": -1, "arg2": False},
                       "aten._log_softmax.default")
    assert rules == [AxisRule(S(0), (S(0),)), AxisRule(S(1), (S(1),))]


@pytest.mark.parametrize("target, fn, attrs", [
    ("max_pool2d", lambda x: F.max_pool2d(x, 3, 2, 1), {"arg1": 3, "arg2": 2, "arg3": 1}),
    ("adaptive_avg_pool2d", lambda x: F.adaptive_avg_pool2d(x, (2, 2)), {"arg1": (2, 2)}),
    ("interpolate", lambda x: F.interpolate(x, scale_factor=2, mode="nearest"), {"scale_factor": 2, "mode": "nearest"}),
    ("aten.upsample_nearest2d.vec", lambda x: aten.upsample_nearest2d.vec(x, [12, 12], None), {"arg1": [12, 12]}),
])
def test_pooling_and_interpolation_split_batch_and_channels_never_the_windows(target, fn, attrs):
    rules = _check_all("pool", fn, [torch.randn(2, 4, 8, 8)], attrs, target)
    assert rules == [AxisRule(S(0), (S(0),)), AxisRule(S(1), (S(1),))]


# ------------------------------------------------------------------------------------------- shapes

def test_select_drops_its_dim_and_shifts_the_sharding_of_the_dims_after_it():
    x = torch.randn(4, 6, 8)
    rules = _check_all("slice", lambda x: aten.select.int(x, 1, 2), [x], {"arg1": 1, "arg2": 2}, "aten.select.int")
    assert set(rules) == {AxisRule(S(0), (S(0),)), AxisRule(S(1), (S(2),)), AxisRule(P, (P,))}
    rules = _check_all("slice", lambda x: x.select(-1, 3), [x], {"arg1": -1, "arg2": 3}, "select")
    assert set(rules) == {AxisRule(S(0), (S(0),)), AxisRule(S(1), (S(1),)), AxisRule(P, (P,))}
    rules = _check_all("slice", lambda x: aten.slice.Tensor(x, 1, 2, 6), [x], {"arg1": 1, "arg2": 2, "arg3": 6},
                       "aten.slice.Tensor")
    assert set(rules) == {AxisRule(S(0), (S(0),)), AxisRule(S(2), (S(2),)), AxisRule(P, (P,))}


def test_stack_splits_every_other_dim_with_the_inputs_dims_shifted_past_the_new_one():
    a, b = torch.randn(4, 6, 8), torch.randn(4, 6, 8)
    rules = _check_all("cat", lambda a, b: torch.stack([a, b], dim=1), [a, b], {"dim": 1}, "stack")
    assert set(rules) == {AxisRule(S(0), (S(0), S(0))), AxisRule(S(2), (S(1), S(1))), AxisRule(S(3), (S(2), S(2))),
                          AxisRule(P, (P, P))}
    rules = _check_all("cat", lambda a, b: torch.stack([a, b], -1), [a, b], {"arg1": -1}, "aten.stack.default")
    assert _outs(rules) == {S(0), S(1), S(2), P}


def test_repeat_and_expand_split_only_the_dims_they_keep():
    x = torch.randn(4, 6)
    rules = _check_all("expand", lambda x: x.repeat(2, 1, 1), [x], {"arg1": 2, "arg2": 1, "arg3": 1}, "repeat")
    assert rules == [AxisRule(S(1), (S(0),)), AxisRule(S(2), (S(1),))]
    rules = _check_all("expand", lambda x: x.repeat(1, 2), [x], {"arg1": 1, "arg2": 2}, "repeat")
    assert rules == [AxisRule(S(0), (S(0),))]
    rules = _check_all("expand", lambda x: x.repeat_interleave(2, dim=0), [x], {"arg1": 2, "dim": 0},
                       "repeat_interleave")
    assert rules == [AxisRule(S(1), (S(1),))]
    y = torch.randn(4, 1, 6)
    # sizes of kept dims as -1: each rank's call is then valid on its shard (DTensor rewrites literal sizes)
    rules = _check_all("expand", lambda y: y.expand(-1, 6, -1), [y], {"arg1": -1, "arg2": 6, "arg3": -1}, "expand")
    assert rules == [AxisRule(S(0), (S(0),)), AxisRule(S(2), (S(2),))]


def test_pad_splits_only_the_dims_it_does_not_pad():
    x = torch.randn(4, 6, 8)
    rules = _check_all("pad", lambda x: F.pad(x, (1, 1)), [x], {"arg1": (1, 1)}, "pad")
    assert _outs(rules) == {S(0), S(1)}
    rules = _check_all("pad", lambda x: F.pad(x, (0, 0, 2, 0), mode="reflect"), [x], {"arg1": (0, 0, 2, 0),
                       "mode": "reflect"}, "pad")
    assert _outs(rules) == {S(0), S(2)}


def test_zeros_like_reads_no_input_and_may_be_made_split_on_any_dim():
    x = torch.randn(4, 6, 8)
    assert get("fill_like").data_inputs("zeros_like") == 0 and kind_of(torch.zeros_like) == "fill_like"
    rules = get("fill_like").rule(_ctx([], x.shape, {}, "zeros_like"))  # as captured: the input lends a shape only
    assert rules == [AxisRule(S(d), ()) for d in range(x.ndim)]
    for r in rules:  # each rank makes its shard: together the full tensor
        local = list(x.shape)
        local[r.out.dim] //= N
        torch.testing.assert_close(_combine([torch.zeros(local) for _ in range(N)], r.out), torch.zeros_like(x))


# ------------------------------------------------------------------------------------------ registry

def test_every_spelling_and_every_aten_overload_of_it_maps_to_exactly_its_one_kind():
    owners = collections.defaultdict(set)
    for name, k in OP_KINDS.items():
        for s in k.spellings:
            owners[_key(s)].add(name)
            assert kind_of(s) == name, (s, name)
            if isinstance(s, torch._ops.OpOverloadPacket):
                for ov in s.overloads():
                    assert kind_of(getattr(s, ov)) == name, (s, ov)
    assert not {s: o for s, o in owners.items() if len(o) > 1}


@pytest.mark.parametrize("spelling, kind", [
    (aten.add_.Tensor, "elementwise"), ("mul_", "elementwise"), (aten.mul_.Tensor, "elementwise"),
    ("relu_", "elementwise"), (aten.index_add_.default, "index_add"), ("scatter_add_", "scatter"),
    (aten.scatter_.src, "scatter"), (aten.cumsum_.default, "scan"),
])
def test_in_place_spellings_map_to_their_out_of_place_kind(spelling, kind):
    assert kind_of(spelling) == kind


def test_dunder_and_unregistered_names_have_no_kind():
    assert kind_of("__iadd__") is None and kind_of("no_such_op_") is None and kind_of([1]) is None


_MATMUL_SAMPLES = {  # kind -> (input shapes, output shape, attrs, target, expected forward FLOPs)
    "linear": (((4, 8), (10, 8)), (4, 10), {}, "linear", 2 * 4 * 10 * 8),
    "matmul": (((2, 4, 8), (2, 8, 6)), (2, 4, 6), {}, "matmul", 2 * 2 * 4 * 6 * 8),
    "addmm": (((10,), (6, 8), (8, 10)), (6, 10), {}, "addmm", 2 * 6 * 10 * 8),
    "baddbmm": (((2, 4, 6), (2, 4, 8), (2, 8, 6)), (2, 4, 6), {}, "baddbmm", 2 * 2 * 4 * 6 * 8),
    "einsum": (((2, 4, 8), (2, 8, 6)), (2, 4, 6), {"arg0": "bij,bjk->bik"}, "einsum", 2 * 2 * 4 * 8 * 6),
    "conv": (((2, 6, 8, 8), (10, 6, 3, 3)), (2, 10, 6, 6), {}, "conv2d", 2 * 2 * 10 * 36 * 6 * 9),
    "sdpa": (((2, 4, 6, 8),) * 3, (2, 4, 6, 8), {}, "scaled_dot_product_attention", 4 * 2 * 4 * 6 * 6 * 8),
}


def test_every_matmul_kind_prices_its_flops():
    assert {k for k, o in OP_KINDS.items() if o.matmul} == set(_MATMUL_SAMPLES)  # a new matmul kind: add a sample
    for kind, (shapes, out, attrs, target, flops) in _MATMUL_SAMPLES.items():
        ctx = RuleCtx(shapes, (torch.float32,) * len(shapes), out, attrs, target)
        assert OP_KINDS[kind].flops(ctx) == flops > 0, kind


def test_alias_kinds_are_exactly_the_kinds_declared_alias():
    assert ALIAS_KINDS == {k for k, o in OP_KINDS.items() if o.alias}
    assert {"view", "transpose", "slice", "expand", "split", "fill_like", "input", "param"} <= ALIAS_KINDS
    assert not ALIAS_KINDS & {"conv", "batch_norm", "einsum", "gather", "cat", "elementwise", "unknown"}


# ------------------------------------------------------------------------- graphs of catalogue models

_MODELS = ("resnet", "bert", "t5", "mixtral")


@pytest.fixture(scope="module")
def catalogue_graphs():
    pytest.importorskip("transformers")
    from autoplan.api import prepare_job
    from autoplan.models.hf_catalog import get_arch

    graphs = {}
    for name in _MODELS:
        model, inputs = get_arch(name).build(2)
        graphs[name] = prepare_job(model, inputs, cluster="cpu", devices=1).graph
    return graphs


@pytest.mark.parametrize("name", _MODELS)
def test_catalogue_model_graph_has_only_registered_kinds_and_well_formed_rules(catalogue_graphs, name):
    from autoplan.graph import op_context

    graph = catalogue_graphs[name]
    assert {n.kind for n in graph.nodes.values()} <= set(OP_KINDS)
    for node in graph.nodes.values():
        ctx = op_context(graph, node, 4)
        for r in get(node.kind).rule(ctx):  # each input placed once, only existing dims split
            assert len(r.ins) == len(ctx.in_shapes), (node.name, node.target, r)
            for p, shape in zip((r.out, *r.ins), (ctx.out_shape, *ctx.in_shapes)):
                assert not isinstance(p, Shard) or p.dim < len(shape), (node.name, node.target, r)


def test_resnet_graph_has_conv_and_batch_norm_nodes_and_no_unknown_batch_norm(catalogue_graphs):
    nodes = catalogue_graphs["resnet"].nodes.values()
    kinds = collections.Counter(n.kind for n in nodes)
    assert kinds["conv"] > 0 and kinds["batch_norm"] > 0
    assert not [n.target for n in nodes if n.kind == "unknown" and "batch_norm" in n.target]
