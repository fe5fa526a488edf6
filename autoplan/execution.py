"""How a plan is executed: the per-op interpreter, or a native recipe (the plan's ``execution``).

The runtime has two engines (``autoplan.runtime``):

* ``per-op``: an fx interpreter over DTensor that follows every op's planned placements; it runs
  any plan of any captured model, at the price of Python dispatch per op;
* ``recipe``: Megatron-style TP x PP x DP with ZeRO stages, recompute and bf16, built from native
  PyTorch parallelism (``parallelize_module``, FSDP2, ``torch.distributed.pipelining``) on models
  whose structure it knows (embedding, a list of blocks, head).

A pipeline plan can only run as a recipe. A per-op plan is *lowered* to a recipe when it is one:
every op keeps the batch split over the data-parallel axes, parameters are replicated on a 1-D
mesh (DDP), dim-0 sharded on a 1-D mesh (FSDP) or split the Megatron way on the tensor-parallel axis, exactly as the recipe
would place them. Lowering never changes what is computed or how much is communicated; it lets
native code issue it. The per-op description stays in the plan, and the runtime falls back to
it when the model's structure is not one the recipe knows.

This module is pure planning (no torch.distributed): it writes the ``execution`` section.
"""
from __future__ import annotations

from typing import Any, Mapping

from autoplan.baselines import allow_for
from autoplan.graph import OpGraph
from autoplan.mesh import Mesh
from autoplan.strategies import Replicate, Shard
from autoplan.strategies.expand import Strategy

# Megatron's split of the zoo's transformer blocks (names of the Linear modules)
COLUMN_PARALLEL = ("qkv", "fc", "wq", "wk", "wv", "w1", "w3")
ROW_PARALLEL = ("proj", "wo", "w2")
VOCAB_PARALLEL = ("tok_emb", "lm_head")  # split along the vocabulary (the loss runs vocab-parallel)
NORM_KINDS = ("layer_norm", "rms_norm", "dropout")
RECIPE_DTYPES = {"fp32": "fp32", "bf16": "bf16", "fp16": "bf16"}  # fp16 plans run bf16 (no loss scaling)


def recipe(*, tp: int = 1, pp: int = 1, dp: int = 1, micro_batches: int = 1, virtual_stages: int = 1,
           recompute: str = "none", zero: int = 0, sequence_parallel: bool = False, dtype: str = "fp32",
           stage_layers: list[int] | None = None) -> dict[str, Any]:
    """A recipe as the plan stores it (``autoplan.runtime.recipe.Recipe.from_json`` reads it)."""
    return {
        "tp": tp, "pp": pp, "dp": dp,
        "schedule": "interleaved" if virtual_stages > 1 else "1f1b",
        "virtual_stages": virtual_stages, "micro_batches": micro_batches, "recompute": recompute,
        "zero": zero, "sequence_parallel": sequence_parallel, "dtype": RECIPE_DTYPES.get(dtype, dtype),
        "stage_layers": stage_layers,
    }


def per_op(reason: str) -> dict[str, Any]:
    return {"runtime": "per-op", "reason": reason}


def pipeline_execution(cfg: Any, global_batch: int) -> dict[str, Any]:
    """The execution of a configuration found by the pipeline search (an ``EstimateConfig``)."""
    m = global_batch // (cfg.dp * cfg.micro_batch)
    r = recipe(tp=cfg.tp, pp=cfg.pp, dp=cfg.dp, micro_batches=m, virtual_stages=cfg.virtual_stages,
               recompute=cfg.recompute, zero=cfg.zero, sequence_parallel=cfg.sequence_parallel, dtype=cfg.dtype)
    return {"runtime": "recipe", "recipe": r, "from": "pipeline search", "fallback": None}


def _megatron_param(qual: str, ndim: int) -> str:
    """How the recipe splits a parameter over the tensor-parallel axis: "S(0)", "S(1)" or "R"."""
    parts = qual.split(".")
    module, leaf = (parts[-2], parts[-1]) if len(parts) >= 2 else ("", parts[-1])
    if module in VOCAB_PARALLEL:
        return "S(0)"
    if module in COLUMN_PARALLEL:
        return "S(0)"
    if module in ROW_PARALLEL and leaf == "weight" and ndim == 2:
        return "S(1)"
    return "R"


def lower(graph: OpGraph, mesh: Mesh, chosen: Mapping[str, Strategy], params: Mapping[str, list[str]],
          *, micro_batches: int, recompute: bool, dtype: str) -> dict[str, Any]:
    """The execution of a per-op plan: a recipe when the plan is one (see the module doc), else per-op."""
    common = dict(micro_batches=micro_batches, recompute="full" if recompute else "none", dtype=dtype)

    def fits(family: str, m: Mesh) -> bool:
        allow = allow_for(family, m)
        return all(allow(node, chosen[name]) for name, node in graph.nodes.items())

    # DDP's recipe all-reduces over the whole world at once: the same collectives as the plan only on
    # a 1-D mesh (on 2-D, the plan prices one all-reduce per axis; the per-op runtime issues those)
    if sum(s > 1 for s in mesh.shape) <= 1 and all(all(p == "R" for p in pl) for pl in params.values()) \
            and fits("ddp", mesh):
        return {"runtime": "recipe", "recipe": recipe(dp=mesh.size, **common), "from": "ddp", "fallback": "per-op"}
    if mesh.ndim == 1:
        if fits("fsdp", mesh):
            return {"runtime": "recipe", "recipe": recipe(dp=mesh.size, zero=3, **common), "from": "fsdp",
                    "fallback": "per-op"}
    if mesh.ndim > 2:
        return per_op(f"mesh {mesh.as_dict()} has no native recipe")
    tp, dp = mesh.shape[-1], (mesh.shape[0] if mesh.ndim == 2 else 1)
    by_param = {n.param: n for n in graph.nodes.values() if n.kind == "param"}
    for qual, pl in params.items():
        node = by_param.get(qual)
        want = _megatron_param(qual, len(node.out.base) if node is not None else 2)
        if pl[-1] != want or any(p != "R" for p in pl[:-1]):
            return per_op(f"{qual} is placed {pl}, not as DDP, FSDP or Megatron's tensor parallelism place it")
    norms = [chosen[n].out[-1] for n, node in graph.nodes.items() if node.kind in NORM_KINDS and len(node.out.base) == 3]
    if all(isinstance(p, Replicate) for p in norms):
        sp = False
    elif all(p == Shard(1) for p in norms):
        sp = True
    else:
        return per_op("norms are split along the sequence for some layers only")
    if not fits("megatron", mesh):
        return per_op("some op leaves the Megatron layout (batch split on the data axis, none on the tensor axis)")
    return {"runtime": "recipe", "recipe": recipe(tp=tp, dp=dp, sequence_parallel=sp, **common),
            "from": "megatron", "fallback": "per-op"}


__all__ = ["lower", "per_op", "pipeline_execution", "recipe"]
