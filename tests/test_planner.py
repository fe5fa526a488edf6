"""Golden plans: the planner rediscovers tensor, data and sharded parallelism where each is right."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import autoplan
from autoplan.errors import InfeasibleError
from autoplan.plan import Plan


class MLPBlock(nn.Module):
    def __init__(self, hidden: int = 1024):
        super().__init__()
        self.fc1 = nn.Linear(hidden, 4 * hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * hidden, hidden)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def test_mlp_block_under_tensor_parallel_is_column_then_row_with_no_communication_between():
    with torch.device("meta"):
        model = MLPBlock()
    x = torch.empty(8, 256, 1024, device="meta")
    plan = autoplan.plan(model, (x,), targets=torch.empty(8, 256, dtype=torch.long, device="meta"), cluster="dgx-h100",
                         devices=8, mesh="tp=8", force="megatron", baselines=False, micro_batches=[1])
    assert plan.params["fc1.weight"] == ["S(0)"]  # column parallel
    assert plan.params["fc2.weight"] == ["S(1)"]  # row parallel
    ops = {o["name"]: o for o in plan.ops}
    fc1 = next(o for o in plan.ops if o["module"] == "fc1" and o["kind"] == "linear")
    fc2 = next(o for o in plan.ops if o["module"] == "fc2" and o["kind"] == "linear")
    assert fc2["inputs"][0] == fc1["output"] == ["S(2)"]
    between = {fc1["name"], fc2["name"]} | {n for n, o in ops.items() if o["module"] == "act"}
    assert not [c for c in plan.data["collectives"] if c["src"] in between and c["dst"] in between]
    assert fc2["output"] == ["P"]


def test_small_model_with_ample_memory_gets_data_parallel():
    # the per-op search alone (the pipeline search's pp=1 answer is DDP too, with ZeRO-1, and has no ops)
    plan = autoplan.plan("gpt2", cluster="dgx-h100", devices=8, global_batch=64, seq_len=1024, baselines=False,
                         pipeline=False)
    assert plan.predicted.fits
    # every device computes 1/8 of the batch: matmuls and attention split along the batch on every axis
    compute = [o for o in plan.ops if o["kind"] in ("linear", "sdpa")]
    assert compute and all(set(o["output"]) == {"S(0)"} for o in compute)
    # inside the transformer blocks, activations never move: collectives there are on parameters only
    module = {o["name"]: o["module"] for o in plan.ops}
    in_blocks = [c for c in plan.data["collectives"] if module.get(c["src"], "").startswith("blocks.")]
    assert not in_blocks
    ddp_like = autoplan.plan("gpt2", cluster="dgx-h100", devices=8, global_batch=64, seq_len=1024, baselines=False, force="ddp")
    assert plan.predicted.step_time_s <= ddp_like.predicted.step_time_s
    assert plan.predicted.step_time_s >= 0.95 * ddp_like.predicted.step_time_s  # DDP is (within 5%) the best


def test_memory_cut_below_the_replicated_footprint_gives_a_sharded_plan_that_fits():
    free = autoplan.plan("gpt2", cluster="dgx-h100", devices=8, global_batch=64, seq_len=1024, baselines=False)
    ddp = autoplan.plan("gpt2", cluster="dgx-h100", devices=8, global_batch=64, seq_len=1024, baselines=False, force="ddp")
    replicated_params = ddp.predicted.param_memory_bytes
    budget = 0.6 * replicated_params
    plan = autoplan.plan("gpt2", cluster="dgx-h100", devices=8, global_batch=64, seq_len=1024, baselines=False,
                         memory_bytes=budget)
    assert plan.predicted.fits and plan.predicted.peak_memory_bytes <= budget
    assert plan.predicted.param_memory_bytes < replicated_params
    assert any(any(p != "R" for p in pl) for pl in plan.params.values())
    assert plan.predicted.step_time_s >= free.predicted.step_time_s


def test_a_model_that_fits_nowhere_names_the_smallest_memory_any_plan_needs():
    with pytest.raises(InfeasibleError) as err:
        autoplan.plan("gpt2", cluster="dgx-h100", devices=2, global_batch=8, seq_len=1024, baselines=False,
                      memory_bytes=2**20)
    assert err.value.min_memory_bytes and err.value.min_memory_bytes > 2**20
    assert "smallest plan needs" in str(err.value) and "\n" not in str(err.value)


def test_plan_round_trips_through_json_with_all_promised_fields(tmp_path):
    plan = autoplan.plan("gpt-tiny", cluster="cpu", devices=4, global_batch=8, seq_len=32)
    path = tmp_path / "plan.json"
    plan.save(path)
    loaded = Plan.load(path)
    assert loaded.data == plan.data
    d = loaded.data
    assert d["schema"] == "autoplan-plan/1" and d["model"]["fingerprint"]
    assert set(d["baselines"]) == {"ddp", "fsdp", "megatron"}
    for field in ("step_time_s", "compute_s", "comm_s", "peak_memory_bytes", "mfu", "fits", "per_layer"):
        assert field in d["predicted"]
    assert d["solver"]["name"] in ("dp", "eliminate", "ilp") and d["solver"]["gap"] >= 0
    assert len(d["params"]) == len({n for n, _ in _named_params("gpt-tiny")})
    assert all(len(p) == len(d["mesh"]["shape"]) for p in d["params"].values())


def _named_params(name):
    from autoplan.models import resolve_model

    with torch.device("meta"):
        return list(resolve_model(name).build().named_parameters())


ZOO_ON_H100 = [
    ("gpt2", 1, 64, 1024), ("gpt2-medium", 1, 64, 1024), ("gpt2-large", 1, 64, 1024), ("gpt2-xl", 1, 64, 1024),
    ("llama3-8b", 1, 64, 4096), ("mlp", 1, 1024, None), ("cnn", 1, 1024, None),
]
ZOO_ON_H100_LARGE = [("llama3-70b", 8, 256, 4096), ("gpt3-175b", 32, 512, 2048), ("llama3-405b", 64, 512, 4096)]


def _check_beats_baselines(name, nodes, batch, seq):
    plan = autoplan.plan(name, cluster="dgx-h100", nodes=nodes, global_batch=batch, seq_len=seq)
    assert plan.predicted.fits
    for base_name, base in plan.baselines.items():
        if base.step_time_s is None:
            assert base.fits is False, base_name
            continue
        assert plan.predicted.step_time_s <= base.step_time_s * (1 + 1e-9), base_name
        assert base.fits == (base.peak_memory_bytes <= plan.data["cluster"]["usable_memory_bytes"])


@pytest.mark.parametrize("name,nodes,batch,seq", ZOO_ON_H100)
def test_zoo_plan_on_a_dgx_h100_node_is_no_worse_than_any_baseline(name, nodes, batch, seq):
    _check_beats_baselines(name, nodes, batch, seq)


@pytest.mark.slow
@pytest.mark.parametrize("name,nodes,batch,seq", ZOO_ON_H100_LARGE)
def test_large_zoo_plans_on_dgx_h100_nodes_are_no_worse_than_any_baseline(name, nodes, batch, seq):
    _check_beats_baselines(name, nodes, batch, seq)


def test_transformers_models_are_captured_by_export_and_planned():
    tf = pytest.importorskip("transformers")

    class CausalLM(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, idx):
            return self.inner(input_ids=idx, use_cache=False, return_dict=False)[0]

    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=64))
    llama = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                               max_position_embeddings=64))
    for model in (gpt2, llama):
        plan = autoplan.plan(CausalLM(model), (torch.zeros(8, 32, dtype=torch.long),), cluster="dgx-h100", devices=4)
        assert plan.data["model"]["capture"] == "export"
        assert plan.predicted.fits and plan.predicted.step_time_s > 0
        assert plan.data["model"]["num_params"] == sum(p.numel() for p in model.parameters())
        for base in plan.baselines.values():
            if base.step_time_s is not None:
                assert plan.predicted.step_time_s <= base.step_time_s * (1 + 1e-9)


@pytest.mark.parametrize("force,mesh", [("megatron", "dp=2,tp=4"), ("fsdp", None), (None, None)])
def test_per_layer_split_and_listed_collectives_add_up_to_the_predicted_step(force, mesh):
    plan = autoplan.plan("gpt2:layers=4", cluster="dgx-h100", devices=8, global_batch=32, seq_len=1024,
                         baselines=False, force=force, mesh=mesh, micro_batches=[2])
    layers = plan.data["predicted"]["per_layer"]
    assert sum(l["compute_s"] for l in layers) == pytest.approx(plan.predicted.compute_s, rel=1e-9)
    assert sum(l["comm_s"] for l in layers) == pytest.approx(plan.predicted.comm_s, rel=1e-9)
    overhead = plan.data["predicted"]["runtime_overhead_s"]  # the per-op runtime's own (0 for a recipe)
    assert plan.predicted.step_time_s == pytest.approx(
        plan.predicted.compute_s + plan.predicted.comm_s + plan.predicted.optimizer_s + overhead, rel=1e-9)


def test_every_prediction_prices_the_loss_report_as_one_scalar_all_reduce_over_all_ranks():
    from autoplan.api import prepare_job
    from autoplan.cost.comm import collective_seconds
    from autoplan.estimate import EstimateConfig, estimate
    from autoplan.hardware import load_cluster

    clus = load_cluster("dgx-h100")
    want = collective_seconds("all_reduce", 8.0, 16, clus.inter_node)  # 16 ranks span two 8-GPU nodes
    assert want > 0
    plan = autoplan.plan("gpt2:layers=2", cluster="dgx-h100", devices=16, global_batch=32, seq_len=256,
                         baselines=False, pipeline=False)
    layers = {l["layer"]: l for l in plan.data["predicted"]["per_layer"]}
    assert layers["(loss report)"]["comm_s"] == pytest.approx(want, rel=1e-12)
    job = prepare_job("gpt2:layers=2", cluster="dgx-h100", devices=16, global_batch=32, seq_len=256)
    est = estimate(job, EstimateConfig(dp=16, micro_batch=2))  # the recipe's step, as ``estimate`` prices it
    assert est.comm_s >= want
    assert est.step_time_s == pytest.approx(est.compute_s + est.comm_s + est.bubble_s + est.optimizer_s, rel=1e-9)
    single = autoplan.plan("gpt2:layers=2", cluster="dgx-h100", devices=1, global_batch=4, seq_len=256,
                           baselines=False, pipeline=False)
    assert "(loss report)" not in {l["layer"] for l in single.data["predicted"]["per_layer"]}  # one rank: nothing to reduce


def test_per_op_overhead_prices_every_planned_move_at_its_group_size(tmp_path):
    """The per-op runtime's overhead: DTensor dispatch per op, plus, per collective a planned move
    issues (not the bucketed gradient all-reduces, not an op's own), the measured cost of the move's
    machinery at the group size of the axis it crosses."""
    import yaml

    from autoplan.hardware import PROFILES_DIR, load_cluster

    tree = yaml.safe_load((PROFILES_DIR / "cpu-measured.yaml").read_text())
    tree["measured"]["device"]["reshard"] = {"group_sizes": [2, 4], "seconds": [0.001, 0.01]}
    with_moves = tmp_path / "moves.yaml"
    with_moves.write_text(yaml.safe_dump(tree))
    tree["device"]["reshard_overhead_s"]["value"] = 0.0
    del tree["measured"]["device"]["reshard"]
    without = tmp_path / "none.yaml"
    without.write_text(yaml.safe_dump(tree))
    kw = dict(devices=4, global_batch=8, seq_len=64, dtype="fp32", baselines=False, force="megatron", mesh="dp=2,tp=2",
              micro_batches=[1], recompute=False, pipeline=False)
    a = autoplan.plan("gpt-tiny:layers=2", cluster=str(with_moves), **kw)
    b = autoplan.plan("gpt-tiny:layers=2", cluster=str(without), **kw)
    assert a.data["execution"]["runtime"] == "per-op" and a.params == b.params  # same layout, priced twice
    sizes = dict(zip(a.data["mesh"]["axis_names"], a.data["mesh"]["shape"]))
    params = {c["src"] for c in a.data["collectives"] if c["src"].startswith("model_")}
    want = sum({2: 0.001, 4: 0.01}[sizes[c["axis"]]] * c["per_step"] for c in a.data["collectives"]
               if c["input"] >= 0 and not (c["phase"] == "backward" and c["kind"] == "all_reduce" and c["src"] in params))
    assert want > 0
    extra = a.data["predicted"]["runtime_overhead_s"] - b.data["predicted"]["runtime_overhead_s"]
    assert extra == pytest.approx(want, rel=1e-9)
    assert load_cluster(with_moves).device.measured.reshard_seconds(2) == 0.001
