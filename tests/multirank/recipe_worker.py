"""Run by torchrun (4 ranks): recipe runtime (TP x PP x DP, ZeRO, recompute, bf16) vs one process.

usage: python -m torch.distributed.run --standalone --nproc-per-node 4 recipe_worker.py OUT.json CASES
CASES: ';'-separated ``label|model|key=value,...`` (recipe keys, e.g. ``pp2tp2|gpt-tiny:layers=4|pp=2,tp=2,micro_batches=4``).
Rank 0 writes a JSON report: per case, gradient / loss / parameter errors against a single process
on the same global batch, one SGD step, and evidence of sharding and recompute.
"""
from __future__ import annotations

import copy
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from common import error_of, run_cases, token_batches  # type: ignore[import-not-found]
from equivalence_worker import rel  # type: ignore[import-not-found]

torch.set_num_threads(1)


def parse(spec: str):
    from autoplan.runtime.recipe import Recipe

    label, model, keys = spec.split("|")
    kw: dict = {}
    for item in filter(None, keys.split(",")):
        key, value = item.split("=")
        kw[key] = value if key in ("schedule", "recompute", "dtype") else (value == "1" if key == "sequence_parallel"
                                                                            else int(value))
    return label, model, Recipe(**kw)


def build(name: str):
    import autoplan.models as zoo

    torch.manual_seed(0)
    return zoo.resolve_model(name).build()


def ref_step(ref, opt, x, y) -> tuple[float, dict[str, torch.Tensor]]:
    from autoplan.inputs import cross_entropy

    loss = cross_entropy(ref(x), y)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in ref.named_parameters()}
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach()), grads


def max_over_ranks(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def count_calls(rm, ref) -> tuple[dict[str, int], dict[str, float]]:
    """Forward PRE-hooks (they also fire during non-reentrant recompute) on attention and MLP modules,
    and the fraction of its blocks' parameters a stage holds at the end of its forward (all of them
    under ZeRO-2, which keeps them unsharded until backward; ~1/dp under ZeRO-3)."""
    from autoplan.runtime.recipe_dp import local_tensor
    from autoplan.runtime.recipe_models import ATTENTION_CLASSES, MLP_CLASSES

    calls = {"attn": 0, "mlp": 0, "blocks": 0}
    held = {"block_frac_after_forward": 0.0}

    def pre(kind):
        def hook(module, args):
            calls[kind] += 1
        return hook

    def after_forward(module, args, out):
        full = sum(p.numel() for key in module.blocks for p in ref.blocks[int(key)].parameters())
        frac = sum(local_tensor(p).numel() for p in module.blocks.parameters()) / full
        held["block_frac_after_forward"] = max(held["block_frac_after_forward"], frac)

    for stage in rm.stages:
        calls["blocks"] += len(stage.blocks)
        stage.register_forward_hook(after_forward)
        for mod in stage.modules():
            if isinstance(mod, ATTENTION_CLASSES):
                mod.register_forward_pre_hook(pre("attn"))
            elif isinstance(mod, MLP_CLASSES):
                mod.register_forward_pre_hook(pre("mlp"))
    return calls, held


def run_case(spec: str, batches) -> dict:
    from autoplan.runtime.recipe import apply_recipe

    label, name, recipe = parse(spec)
    t0 = time.perf_counter()
    model = build(name)
    ref = copy.deepcopy(model)
    total_numel = sum(p.numel() for p in ref.parameters())
    rm = apply_recipe(model, recipe, optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-3))
    calls, held = count_calls(rm, ref)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    out: dict = {"case": label, "model": name, "recipe": recipe.to_json()}
    losses, ref_losses = [], []
    for step, (x, y) in enumerate(batches):
        calls["attn"] = calls["mlp"] = 0
        losses.append(rm.train_step(x, y))
        if step == 1:  # not step 0: pipeline stages run one extra forward there to infer shapes
            per_forward = calls["blocks"] * recipe.micro_batches
            out["attn_calls_per_forward"] = max_over_ranks(calls["attn"] / per_forward)  # 2: attention recomputed
            out["mlp_calls_per_forward"] = max_over_ranks(calls["mlp"] / per_forward)  # 2: whole block recomputed
        if step == 0:
            grads = rm.full_grads()  # the optimizer step does not clear them
            out["optimizer_state_frac"] = max_over_ranks(rm.optimizer_state_numel() / (2 * total_numel))  # AdamW: 2 states
            out["block_frac_after_forward"] = max_over_ranks(held["block_frac_after_forward"])
        ref_loss, ref_grads = ref_step(ref, ref_opt, x, y)
        ref_losses.append(ref_loss)
        if step == 0:
            out["grad_rel"] = max(rel(grads[n], ref_grads[n]) for n in ref_grads)
            out["grads_missing"] = sorted(set(ref_grads) - set(grads))
    out["param_numel_frac"] = max_over_ranks(rm.local_param_numel() / total_numel)  # between steps, this rank
    full = rm.full_state_dict()
    out["losses"], out["ref_losses"] = losses, ref_losses
    out["loss_rel"] = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses))
    out["param_abs"] = max(float((full[n] - p.detach()).abs().max()) for n, p in ref.named_parameters())
    out["sgd_param_rel"] = sgd_check(name, recipe, batches[0])
    out["seconds"] = time.perf_counter() - t0
    return out


def sgd_check(name: str, recipe, batch) -> float:
    """One SGD step (lr 0.5): gradients averaged, not summed (max relative parameter error)."""
    from autoplan.inputs import cross_entropy
    from autoplan.runtime.recipe import apply_recipe

    model = build(name)
    ref = copy.deepcopy(model)
    rm = apply_recipe(model, recipe, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.5))
    rm.train_step(*batch)
    opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    cross_entropy(ref(batch[0]), batch[1]).backward()
    opt.step()
    full = rm.full_state_dict()
    return max(rel(full[n], p.detach()) for n, p in ref.named_parameters())


def error_cases() -> dict[str, str]:
    """Configurations the runtime refuses with a one-line AutoplanError (checked in a real process group)."""
    from autoplan.runtime.recipe import Recipe, apply_recipe

    out = {}
    tries = {
        "world": ("gpt-tiny", dict(tp=2)),
        "batch": ("gpt-tiny", dict(dp=4)),
        "kv_heads": ("llama-tiny", dict(tp=4)),
        "layers": ("gpt-tiny", dict(pp=4, micro_batches=4)),
        "model": ("mlp", dict(dp=4)),
    }
    for key, (name, kwargs) in tries.items():
        def attempt(name=name, kwargs=kwargs, key=key) -> None:
            rm = apply_recipe(build(name), Recipe(**kwargs))
            if key == "batch":
                rm.train_step(torch.zeros(6, 8, dtype=torch.long), torch.zeros(6, 8, dtype=torch.long))

        out[key] = error_of(attempt)
    return out


def main() -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    out_path, cases = sys.argv[1], [c for c in sys.argv[2].split(";") if c]
    batches = token_batches()
    run_cases(cases, lambda case: run_case(case, batches), out_path,
              extra=lambda: [{"case": "errors", "errors": error_cases()}])
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
