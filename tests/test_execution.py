"""How plans are executed: lowering per-op plans to native recipes, and pipeline plans as recipes."""
from __future__ import annotations

import pytest

import autoplan
from autoplan.api import prepare_job
from autoplan.execution import _megatron_param
from autoplan.hardware import load_cluster
from autoplan.pipeline_search import pipeline_candidates
from autoplan.plan import Plan


def _plan(**kw) -> Plan:
    args = dict(cluster="cpu", devices=4, global_batch=8, seq_len=32, baselines=False, dtype="fp32")
    return autoplan.plan("gpt-tiny", **{**args, **kw})


@pytest.mark.parametrize("family, zero", [("ddp", 0), ("fsdp", 3)])
def test_data_parallel_plans_lower_to_the_native_recipe_of_their_family(family, zero):
    plan = _plan(force=family)
    ex = plan.execution
    assert ex["runtime"] == "recipe" and ex["from"] == family and ex["fallback"] == "per-op"
    r = ex["recipe"]
    assert (r["tp"], r["pp"], r["dp"], r["zero"]) == (1, 1, 4, zero)
    assert r["micro_batches"] == plan.data["training"]["micro_batches"] and r["dtype"] == "fp32"
    assert plan.ops  # the per-op description stays: the runtime falls back to it for unknown model structures


def test_a_layout_no_recipe_has_runs_per_op_and_the_plan_says_which_parameter_is_why():
    plan = _plan(force="megatron", mesh="tp=4")
    ex = plan.execution
    assert ex["runtime"] == "per-op"
    wrong = [q for q, pl in plan.params.items() if pl[-1] != _megatron_param(q, 2) and q in ex["reason"]]
    assert wrong, ex["reason"]


def test_megatron_split_of_the_zoo_blocks_is_column_then_row():
    assert _megatron_param("blocks.3.attn.qkv.weight", 2) == "S(0)"
    assert _megatron_param("blocks.3.attn.qkv.bias", 1) == "S(0)"
    assert _megatron_param("blocks.3.attn.proj.weight", 2) == "S(1)"
    assert _megatron_param("blocks.3.attn.proj.bias", 1) == "R"
    assert _megatron_param("blocks.0.mlp.w2.weight", 2) == "S(1)"
    assert _megatron_param("tok_emb.weight", 2) == "S(0)"  # vocabulary-parallel embedding and head
    assert _megatron_param("lm_head.weight", 2) == "S(0)"
    assert _megatron_param("pos_emb.weight", 2) == "R"


def test_a_winning_pipeline_configuration_becomes_the_plan_and_runs_as_a_recipe(tmp_path):
    plan = autoplan.plan("gpt:layers=8,hidden=512,heads=8,vocab=4096,seq=512", cluster="dgx-a100-80gb", devices=16,
                         global_batch=32, seq_len=512, baselines=False, pipeline=True)
    pipe = plan.data["pipeline_alternative"]
    assert pipe["found"] and pipe["faster_than_plan"] and pipe["predicted"]["fits"]
    ex = plan.execution
    assert ex["runtime"] == "recipe" and ex["from"] == "pipeline search"
    r, cfg = ex["recipe"], pipe["config"]
    assert (r["tp"], r["pp"], r["dp"], r["virtual_stages"], r["recompute"]) == \
        (cfg["tp"], cfg["pp"], cfg["dp"], cfg["virtual_stages"], cfg["recompute"])
    assert r["micro_batches"] * r["dp"] * cfg["micro_batch"] == 32 and r["micro_batches"] >= r["pp"]
    assert plan.mesh == {"pp": r["pp"], "dp": r["dp"], "tp": r["tp"]}
    assert plan.predicted.step_time_s == pytest.approx(pipe["predicted"]["step_time_s"])
    assert plan.data["per_op_alternative"]["predicted"]["step_time_s"] > plan.predicted.step_time_s
    assert plan.ops == [] and plan.data["collectives"] == []  # no per-op placements describe a pipeline run
    plan.save(tmp_path / "p.json")
    assert Plan.load(tmp_path / "p.json").execution == ex


def test_pipeline_candidates_have_the_micro_batches_their_schedule_needs():
    job = prepare_job("gpt:layers=8,hidden=256,heads=4,vocab=1024,seq=256", cluster=load_cluster("dgx-a100-80gb"),
                      devices=16, global_batch=32, seq_len=256)
    seen = 0
    for cfg in pipeline_candidates(job):
        m = job.global_batch // (cfg.dp * cfg.micro_batch)
        if cfg.pp > 1:
            seen += 1
            assert m >= cfg.pp, cfg  # 1F1B: at least one micro-batch per stage
            if cfg.virtual_stages > 1:
                assert m % cfg.pp == 0, cfg  # interleaved: micro-batches in groups of pp
    assert seen


def test_estimate_writes_the_fixed_configuration_as_a_plan_that_runs_as_a_recipe(tmp_path):
    from click.testing import CliRunner

    from autoplan.cli import main

    out = tmp_path / "pp.json"
    res = CliRunner().invoke(main, ["estimate", "gpt-tiny:layers=4", "--cluster", "cpu", "--pp", "2", "--dp", "2",
                                    "--global-batch", "8", "--seq-len", "32", "--dtype", "fp32", "-o", str(out)])
    assert res.exit_code == 0, res.output
    plan = Plan.load(out)
    r = plan.execution["recipe"]
    assert (r["pp"], r["dp"], r["tp"], r["micro_batches"], r["schedule"]) == (2, 2, 1, 4, "1f1b")
    assert plan.world_size == 4 and plan.mesh == {"pp": 2, "dp": 2, "tp": 1}
    est = CliRunner().invoke(main, ["estimate", "gpt-tiny:layers=4", "--cluster", "cpu", "--pp", "2", "--dp", "2",
                                    "--global-batch", "8", "--seq-len", "32", "--dtype", "fp32", "--json"])
    assert plan.predicted.step_time_s == pytest.approx(__import__("json").loads(est.output)["step_time_s"])


def test_a_model_no_recipe_knows_keeps_its_per_op_plan_and_says_why_no_pipeline_was_searched():
    """Pipelines run only as recipes; for a model the recipes do not know (here the zoo GPT inside
    a wrapper module) no pipeline is searched, and the plan says why."""
    import torch

    from autoplan.models import resolve_model

    class Wrapper(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.inner(tokens)

    spec = resolve_model("gpt:layers=8,hidden=512,heads=8,vocab=4096,seq=512")
    with torch.device("meta"):
        model = Wrapper(spec.build())
    plan = autoplan.plan(model, (torch.zeros(32, 512, dtype=torch.long, device="meta"),), cluster="dgx-a100-80gb",
                         devices=16, global_batch=32, baselines=False)
    pipe = plan.data["pipeline_alternative"]
    assert not pipe["found"] and pipe["executable"] is False and "GPT and Llama only" in pipe["why_not"]
    # the plan is the per-op search's layout (here data parallel: it runs as a native recipe), not a pipeline
    assert plan.ops and "pipeline_stages" not in plan.data["training"]
    assert plan.execution["runtime"] in pipe["why_not"]
