"""Recipe runtime (Megatron-style TP x PP x DP, ZeRO, recompute, bf16).

Fast tests: the pure parts (stage split, recipe validation and JSON, GPT's qkv permutation) and
a one-rank gloo group in this process (recompute really recomputes, bf16, errors).
One slow test launches ``tests/multirank/recipe_worker.py`` once on 4 ranks and checks every
case against a single process.
"""
from __future__ import annotations

import json
import re
from collections import Counter

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

import autoplan.models as zoo
from autoplan.inputs import cross_entropy
from autoplan.errors import AutoplanError
from autoplan.estimate import EstimateConfig
from autoplan.runtime.recipe import (
    Recipe,
    apply_recipe,
    check_model,
    recipe_from_estimate,
    split_layers,
    stage_block_ids,
)
from autoplan.runtime.recipe_models import (
    ATTENTION_CLASSES,
    MLP_CLASSES,
    build_stage,
    detect_family,
    inverse_permutation,
    qkv_permutation,
    release_unused,
    unpermute_full,
)


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return zoo.resolve_model(name).build()


# ------------------------------------------------------------------------------ pure parts


@pytest.mark.parametrize("layers,stages", [(4, 2), (5, 2), (7, 3), (12, 8), (3, 3), (32, 6)])
def test_split_layers_is_balanced(layers, stages):
    counts = split_layers(layers, stages)
    assert len(counts) == stages and sum(counts) == layers
    assert max(counts) - min(counts) <= 1
    assert list(counts) == sorted(counts)  # the extra blocks go to the last stages


def test_stage_block_ids():
    assert stage_block_ids(Recipe(pp=2, micro_batches=2), 5) == [[0, 1], [2, 3, 4]]
    explicit = Recipe(pp=2, micro_batches=2, stage_layers=(3, 1))
    assert stage_block_ids(explicit, 4) == [[0, 1, 2], [3]]
    with pytest.raises(AutoplanError, match=r"sum to 4 but the model has 6 blocks"):
        stage_block_ids(explicit, 6)
    with pytest.raises(AutoplanError, match=r"layers\(2\) < pipeline stages\(4\)"):
        split_layers(2, 4)


@pytest.mark.parametrize("kwargs,message", [
    (dict(tp=0), r"tp=0 must be a positive integer"),
    (dict(schedule="zb"), r"schedule='zb' is unknown"),
    (dict(recompute="some"), r"recompute='some' is unknown"),
    (dict(dtype="fp16"), r"dtype='fp16' is unknown"),
    (dict(zero=4), r"zero=4 must be 0, 1, 2 or 3"),
    (dict(pp=2, schedule="interleaved", micro_batches=2), r"'interleaved' needs virtual_stages > 1"),
    (dict(pp=2, virtual_stages=2, micro_batches=2), r"needs schedule 'interleaved'"),
    (dict(virtual_stages=2, schedule="interleaved"), r"needs pp > 1"),
    (dict(pp=4, micro_batches=2), r"micro_batches\(2\) < pp\(4\)"),
    (dict(pp=2, virtual_stages=2, schedule="interleaved", micro_batches=3), r"micro_batches\(3\) % pp\(2\)"),
    (dict(pp=2, micro_batches=2, stage_layers=(1, 1, 1)), r"3 entries but pp\(2\) \* virtual_stages\(1\) = 2"),
    (dict(stage_layers=(0,)), r"positive block counts"),
])
def test_recipe_validation(kwargs, message):
    with pytest.raises(AutoplanError, match=message):
        Recipe(**kwargs)


def test_recipe_json_round_trip():
    r = Recipe(tp=2, pp=2, dp=1, schedule="interleaved", virtual_stages=2, micro_batches=4, recompute="selective",
               zero=1, sequence_parallel=True, dtype="bf16", stage_layers=(1, 1, 1, 1))
    d = json.loads(json.dumps(r.to_json()))
    assert d["stage_layers"] == [1, 1, 1, 1]
    assert Recipe.from_json(d) == r
    assert Recipe.from_json({}) == Recipe()
    assert Recipe().world_size == 1 and r.world_size == 4 and r.num_stages == 4
    with pytest.raises(AutoplanError, match=r"unknown recipe keys \['tensor_parallel'\]"):
        Recipe.from_json({"tensor_parallel": 2})


@pytest.mark.parametrize("hidden,tp", [(8, 2), (12, 3), (64, 4)])
def test_qkv_permutation_round_trip(hidden, tp):
    w = torch.randn(3 * hidden, 5)
    perm = qkv_permutation(hidden, tp)
    permuted = w[perm]
    part = hidden // tp
    q, k, v = w.split(hidden)
    for r, shard in enumerate(permuted.chunk(tp)):  # contiguous tp shard r holds [q_r; k_r; v_r]
        rows = slice(r * part, (r + 1) * part)
        assert torch.equal(shard, torch.cat([q[rows], k[rows], v[rows]]))
    assert torch.equal(permuted[inverse_permutation(perm)], w)
    family = detect_family(build("gpt-tiny"))
    assert torch.equal(unpermute_full("blocks.0.attn.qkv.weight", permuted, family, tp), w)
    assert torch.equal(unpermute_full("blocks.0.attn.proj.weight", permuted, family, tp), permuted)


def test_model_checks():
    gpt, llama = detect_family(build("gpt-tiny")), detect_family(build("llama-tiny"))
    assert gpt.tied and not llama.tied and (llama.heads, llama.kv_heads) == (4, 2)
    with pytest.raises(AutoplanError, match=r"tp\(4\) does not divide heads and kv_heads"):
        check_model(Recipe(tp=4), llama)
    with pytest.raises(AutoplanError, match=r"pp\(2\) \* virtual_stages\(2\) = 4 stages > layers\(2\)"):
        check_model(Recipe(pp=2, virtual_stages=2, schedule="interleaved", micro_batches=2), gpt)
    check_model(Recipe(tp=4), gpt)
    with pytest.raises(AutoplanError, match=r"supports the zoo's GPT and Llama models, not MLPClassifier"):
        detect_family(build("mlp"))
    with pytest.raises(AutoplanError, match="dropout=0.1 under tp"):
        check_model(Recipe(tp=2), detect_family(build("gpt-tiny:dropout=0.1")))


def test_recipe_from_estimate():
    cfg = EstimateConfig(tp=2, pp=4, dp=2, virtual_stages=2, micro_batch=2, recompute="selective",
                         sequence_parallel=True, zero=1, dtype="bf16")
    assert recipe_from_estimate(cfg, global_batch=32) == Recipe(
        tp=2, pp=4, dp=2, schedule="interleaved", virtual_stages=2, micro_batches=8, recompute="selective", zero=1,
        sequence_parallel=True, dtype="bf16")
    plain = recipe_from_estimate(EstimateConfig(pp=4, dp=1, micro_batch=4, dtype="fp32"), global_batch=8)
    assert (plain.schedule, plain.micro_batches, plain.dtype) == ("gpipe", 2, "fp32")  # 1F1B needs >= 4 micro-batches
    with pytest.raises(AutoplanError, match=r"global batch\(10\) is not a multiple of dp\(2\) \* micro_batch\(2\) = 4"):
        recipe_from_estimate(EstimateConfig(dp=2, micro_batch=2), global_batch=10)


def test_stage_modules_keep_original_names_and_release_the_rest():
    model = build("gpt-tiny:layers=4")
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    family = detect_family(model)
    first = build_stage(model, family, [0, 1], True, False)
    last = build_stage(model, family, [2, 3], False, True)
    for stage in (first, last):
        assert {n for n, _ in stage.named_parameters(remove_duplicate=False)} <= names
    assert "lm_head.weight" in dict(last.named_parameters()) and "tok_emb.weight" in dict(first.named_parameters())
    release_unused(model, {id(p) for p in last.parameters()})  # a last-stage rank
    assert all(p.is_meta for p in model.blocks[0].parameters()) and model.pos_emb.weight.is_meta
    assert not model.tok_emb.weight.is_meta  # tied to lm_head: kept
    assert not any(p.is_meta for p in last.parameters())


def test_gradient_buckets(monkeypatch):
    from autoplan.runtime import recipe_dp

    monkeypatch.setattr(recipe_dp, "BUCKET_BYTES", 40)
    ts = [torch.ones(3), torch.ones(20), torch.ones(2, dtype=torch.float64), torch.ones(4), torch.ones(5)]
    assert [[t.numel() for t in b] for b in recipe_dp._buckets(ts)] == [[3], [20], [4, 5], [2]]  # by dtype, <= 40 bytes


def test_needs_a_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(AutoplanError, match="needs an initialised process group"):
        apply_recipe(build("gpt-tiny"), Recipe())


# ------------------------------------------------------------------------------ one rank, in this process




def batch(seed: int = 1, size: int = 4, seq: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(0, 256, (size, seq + 1), generator=torch.Generator().manual_seed(seed))
    return x[:, :-1].contiguous(), x[:, 1:].contiguous()


class OpCounter(TorchDispatchMode):
    """Counts aten ops, recompute in backward included (CPU autograd runs in this thread)."""

    def __init__(self):
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.__name__.split(".")[0]] += 1
        return func(*args, **(kwargs or {}))


def test_world_size_mismatch(one_rank):
    with pytest.raises(AutoplanError, match=r"world size\(1\) != tp\(2\) \* pp\(1\) \* dp\(2\) = 4: launch 4 ranks"):
        apply_recipe(build("gpt-tiny"), Recipe(tp=2, dp=2))


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
def test_recompute_really_recomputes(one_rank, name):
    """none / selective / full: same gradients; selective re-runs the attention core (SDPA) but not the
    projections nor the MLP, full re-runs whole blocks. Pre-hooks count module calls (they also fire
    during non-reentrant recompute), a dispatch mode counts the aten ops."""
    x, y = batch()
    grads, pre, ops = {}, {}, {}
    for mode in ("none", "selective", "full"):
        rm = apply_recipe(build(name), Recipe(recompute=mode, micro_batches=2))
        calls = Counter()
        for mod in rm.stages[0].modules():
            if isinstance(mod, ATTENTION_CLASSES + MLP_CLASSES):
                kind = "attn" if isinstance(mod, ATTENTION_CLASSES) else "mlp"
                mod.register_forward_pre_hook(lambda m, a, kind=kind: calls.update([kind]))
        with OpCounter() as counter:
            rm.train_step(x, y)
        grads[mode], pre[mode], ops[mode] = rm.full_grads(), calls, counter.counts
    sdpa = "_scaled_dot_product_flash_attention_for_cpu"
    forwards = 2 * 2  # blocks x micro-batches
    assert pre["none"] == {"attn": forwards, "mlp": forwards}
    assert pre["selective"] == {"attn": 2 * forwards, "mlp": forwards}
    assert pre["full"] == {"attn": 2 * forwards, "mlp": 2 * forwards}
    assert ops["none"][sdpa] == forwards and ops["selective"][sdpa] == ops["full"][sdpa] == 2 * forwards
    mm = ops["none"]["mm"] + ops["none"]["addmm"]
    assert ops["selective"]["mm"] + ops["selective"]["addmm"] == mm  # projections are saved, not recomputed
    assert ops["full"]["mm"] + ops["full"]["addmm"] > mm
    names = {n for n, _ in build(name).named_parameters(remove_duplicate=False)}
    assert {k.replace("._checkpoint_wrapped_module", "") for k in rm.module.state_dict()} == names
    for mode in ("selective", "full"):
        for n, g in grads["none"].items():
            torch.testing.assert_close(grads[mode][n], g, rtol=0, atol=0)


def test_one_rank_matches_plain_training_and_bf16_is_close(one_rank):
    x, y = batch(size=4)
    ref = build("llama-tiny")
    ref_loss = cross_entropy(ref(x), y)
    ref_loss.backward()
    loss = float(ref_loss.detach())
    for dtype, tol in (("fp32", 1e-6), ("bf16", 2e-2)):
        rm = apply_recipe(build("llama-tiny"), Recipe(micro_batches=2, dtype=dtype, zero=1))
        got = rm.train_step(x, y)
        assert abs(got - loss) <= tol * loss, (dtype, got, loss)
        grads = rm.full_grads()
        for n, p in ref.named_parameters():
            err = float((grads[n] - p.grad).norm() / p.grad.norm())
            assert err <= (1e-5 if dtype == "fp32" else 5e-2), (dtype, n, err)
    with pytest.raises(AutoplanError, match=r"global batch\(4\) is not divisible by dp\(1\) \* micro_batches\(3\)"):
        apply_recipe(build("gpt-tiny"), Recipe(micro_batches=3)).train_step(x, y)
    with pytest.raises(AutoplanError, match=r"sequence length\(80\) > the model's context\(64\)"):
        apply_recipe(build("gpt-tiny"), Recipe()).train_step(*batch(seq=80))


# ------------------------------------------------------------------------------ 4 ranks, one launch

CASES = {  # label -> (model, recipe keys); split between the two families
    "pp2_tp2_1f1b": ("gpt-tiny:layers=4", "pp=2,tp=2,micro_batches=4"),  # tied embedding across stages, qkv permuted
    "pp4_1f1b": ("llama-tiny:layers=4", "pp=4,micro_batches=8"),
    "interleaved_pp2_v2_dp2": ("gpt-tiny:layers=4", "pp=2,dp=2,schedule=interleaved,virtual_stages=2,micro_batches=4"),
    "gpipe_pp2_dp2": ("llama-tiny:layers=4", "pp=2,dp=2,schedule=gpipe,micro_batches=2"),
    "full_recompute_tp2_dp2": ("llama-tiny", "tp=2,dp=2,recompute=full"),
    "selective_recompute_tp2_dp2": ("gpt-tiny", "tp=2,dp=2,recompute=selective"),
    "zero1_dp4": ("gpt-tiny", "dp=4,zero=1"),
    "zero2_dp4": ("llama-tiny", "dp=4,zero=2"),
    "zero3_dp4": ("gpt-tiny", "dp=4,zero=3"),
    "zero3_dp2_tp2": ("llama-tiny", "dp=2,tp=2,zero=3"),
    "zero2_pp2_dp2": ("gpt-tiny:layers=4", "pp=2,dp=2,zero=2,micro_batches=2"),
    "zero1_pp2_dp2": ("gpt-tiny:layers=4", "pp=2,dp=2,zero=1,micro_batches=2"),  # ZeRO-1 with the tied pair
    "interleaved_pp2_v2_tp2": ("llama-tiny:layers=4",
                               "pp=2,tp=2,schedule=interleaved,virtual_stages=2,micro_batches=2"),
    "dp4_accumulate2": ("llama-tiny", "dp=4,micro_batches=2"),
    "zero3_dp4_accumulate2": ("llama-tiny", "dp=4,zero=3,micro_batches=2"),
    "sequence_parallel_tp2_dp2": ("gpt-tiny", "tp=2,dp=2,sequence_parallel=1"),
    "sequence_parallel_tp2_pp2_selective": ("llama-tiny:layers=4",
                                            "tp=2,pp=2,sequence_parallel=1,micro_batches=2,recompute=selective"),
    "bf16_zero3_dp4": ("llama-tiny", "dp=4,zero=3,dtype=bf16"),
    "bf16_pp2_dp2_zero1": ("gpt-tiny:layers=4", "pp=2,dp=2,micro_batches=2,zero=1,dtype=bf16"),  # autocast
    "bf16_tp2_pp2": ("llama-tiny:layers=4", "tp=2,pp=2,micro_batches=2,dtype=bf16"),
}
FP32 = [c for c in CASES if not c.startswith("bf16")]


@pytest.fixture(scope="module")
def recipe_report(tmp_path_factory) -> dict[str, dict]:
    from test_runtime_multirank import torchrun  # type: ignore[import-not-found]  # tests/ is on sys.path

    out = tmp_path_factory.mktemp("recipe") / "report.json"
    cases = ";".join(f"{label}|{model}|{keys}" for label, (model, keys) in CASES.items())
    proc = torchrun(4, "recipe_worker.py", str(out), cases)
    assert out.exists(), proc.stderr[-3000:]
    return {c["case"]: c for c in json.loads(out.read_text())}


@pytest.mark.slow
@pytest.mark.parametrize("case", FP32)
def test_recipe_matches_one_process(recipe_report, case):
    r = recipe_report[case]
    assert "error" not in r, r.get("traceback")
    assert not r["grads_missing"]
    assert r["grad_rel"] < 1e-5, r  # every full gradient of step 1, relative to its norm
    assert r["loss_rel"] < 1e-5, r  # losses of 3 AdamW steps
    assert r["param_abs"] < 1e-4, r  # every parameter after them
    assert r["sgd_param_rel"] < 1e-5, r  # one SGD step: gradients averaged, not summed


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in CASES if c.startswith("bf16")])
def test_recipe_bf16_is_close(recipe_report, case):
    r = recipe_report[case]
    assert "error" not in r, r.get("traceback")
    assert r["loss_rel"] < 2e-2 and r["grad_rel"] < 5e-2 and r["sgd_param_rel"] < 2e-2, r
    assert r["param_abs"] < 2e-2, r


@pytest.mark.slow
def test_recipe_recompute_and_sharding_evidence(recipe_report):
    calls = {c: (r["attn_calls_per_forward"], r["mlp_calls_per_forward"]) for c, r in recipe_report.items()
             if "attn_calls_per_forward" in r}  # forward pre-hook calls per block forward, on the slowest rank
    assert calls["full_recompute_tp2_dp2"] == (2.0, 2.0)  # whole blocks re-run in backward
    assert calls["selective_recompute_tp2_dp2"] == (2.0, 1.0)  # attention only
    assert calls["sequence_parallel_tp2_pp2_selective"] == (2.0, 1.0)
    assert all(calls[c] == (1.0, 1.0) for c in calls if "recompute" not in c and "selective" not in c)
    r = recipe_report
    # optimizer state (AdamW: 2 x parameters) per rank ~ 1/dp; ZeRO-1 partitions whole parameters
    assert r["zero1_dp4"]["optimizer_state_frac"] < 0.3 and r["zero1_dp4"]["param_numel_frac"] == 1.0
    assert r["dp4_accumulate2"]["optimizer_state_frac"] == 1.0
    for case in ("zero2_dp4", "zero3_dp4"):
        assert r[case]["optimizer_state_frac"] <= 0.26 and r[case]["param_numel_frac"] <= 0.26  # sharded between steps
    assert r["zero3_dp4"]["block_frac_after_forward"] <= 0.26  # ZeRO-3 reshards after forward
    assert r["zero2_dp4"]["block_frac_after_forward"] == 1.0  # ZeRO-2 keeps them for backward
    assert r["zero2_pp2_dp2"]["block_frac_after_forward"] == 1.0
    assert r["zero3_dp2_tp2"]["block_frac_after_forward"] <= 0.3  # 1/(dp*tp) of the sharded matrices
    assert r["pp4_1f1b"]["param_numel_frac"] < 0.35 and r["pp2_tp2_1f1b"]["param_numel_frac"] < 0.3  # 1/pp, 1/(pp*tp)


@pytest.mark.slow
def test_recipe_errors_are_one_line(recipe_report):
    errors = recipe_report["errors"]["errors"]
    expected = {
        "world": r"world size\(4\) != tp\(2\) \* pp\(1\) \* dp\(1\) = 2",
        "batch": r"global batch\(6\) is not divisible by dp\(4\) \* micro_batches\(1\)",
        "kv_heads": r"tp\(4\) does not divide heads and kv_heads",
        "layers": r"4 stages > layers\(2\)",
        "model": r"not MLPClassifier",
    }
    for key, pattern in expected.items():
        assert re.search(pattern, errors[key]) and "\n" not in errors[key], (key, errors[key])
