"""Run by torchrun (4 ranks): checkpoints of recipe plans, resharded across layouts and engines.

usage: python -m torch.distributed.run --standalone --nproc-per-node 4 checkpoint_worker.py OUT.json DIR PLANS.json
PLANS.json maps names to plan files: ``pipeline`` (pp=2 x dp=2, from ``autoplan estimate -o``),
``ddp`` (a per-op plan of the same model, 4 ranks).

1. ``reference``: the pipeline plan trains STEPS steps uninterrupted (``autoplan.apply``, the
   data and seed ``autoplan train`` uses) and saves at step 2.
2. A chain of legs: each builds a fresh model with another layout or engine, loads the previous
   leg's checkpoint (``load_checkpoint``), records whether its full parameters equal the ones the
   previous leg saved, trains 2 steps (losses compared with the reference by the test) and saves.
Rank 0 writes a JSON report.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from common import error_of  # type: ignore[import-not-found]

torch.set_num_threads(1)
MODEL = "gpt-tiny:layers=4"
LR = 1e-3
# (label, engine, recipe keys or plan name): every leg loads the previous leg's checkpoint
LEGS = [
    ("tp2_dp2_zero1", "recipe", dict(tp=2, dp=2, zero=1)),  # GPT qkv permuted for tp, ZeRO-1 optimizer
    ("tp2_dp2_zero1_again", "recipe", dict(tp=2, dp=2, zero=1)),  # the same layout: exact round trip
    ("per_op_ddp", "per-op", "ddp"),  # recipe (tp=2) -> per-op engine: the qkv rows are stored canonically
    ("zero3_dp2_tp2", "recipe", dict(dp=2, tp=2, zero=3)),  # per-op -> recipe; FSDP2 x TP: qkv shards strided
    ("pp2_dp2_zero1", "recipe", dict(pp=2, dp=2, zero=1, micro_batches=2)),  # tied pair over stages + ZeRO-1
    ("pipeline_plan", "plan", "pipeline"),  # back to the plan autoplan train runs
]
STEPS = max(20, 2 + 2 * len(LEGS))  # 20: the reference of `autoplan train --steps 20` too


def build():
    import autoplan.models as zoo

    torch.manual_seed(0)
    return zoo.resolve_model(MODEL).build()


def optimizer(params):
    return torch.optim.AdamW(params, lr=LR)


def make(engine: str, what, plans: dict[str, str]):
    from autoplan.plan import Plan
    from autoplan.runtime.apply import apply as apply_per_op
    from autoplan.runtime.engine import apply
    from autoplan.runtime.recipe import Recipe, apply_recipe

    if engine == "recipe":
        return apply_recipe(build(), Recipe(**what), optimizer=optimizer)
    if engine == "per-op":
        return apply_per_op(build(), Plan.load(plans[what]), optimizer=optimizer)
    return apply(build(), Plan.load(plans[what]), optimizer=optimizer)


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Over every parameter (the per-op engine's full state also lists a tied weight's second name)."""
    names = [n for n, _ in build().named_parameters()]
    if any(n not in a or n not in b for n in names):
        return float("inf")
    return max(float((a[n] - b[n]).abs().max()) for n in names)


def main() -> None:
    from autoplan.runtime.checkpoint import checkpoint_info, latest_checkpoint, load_checkpoint, save_checkpoint
    from autoplan.runtime.train import TokenStream, synthetic_tokens

    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    out_path, root, plans = sys.argv[1], Path(sys.argv[2]), json.loads(Path(sys.argv[3]).read_text())
    data = TokenStream(synthetic_tokens(256), 8, 32)  # as `autoplan train` (gpt-tiny's vocabulary)
    report: dict = {"legs": []}
    t0 = time.perf_counter()
    pm = make("plan", "pipeline", plans)
    ref = []
    for step in range(STEPS):
        ref.append(pm.train_step(*data(step)))
        if step + 1 == 2:
            save_checkpoint(pm, root / "leg0", 2)
            saved = pm.full_state_dict()
    report["reference"] = ref
    report["reference_seconds"] = time.perf_counter() - t0
    report["leg0_info"] = checkpoint_info(latest_checkpoint(root / "leg0"))
    step = 2
    for i, (label, engine, what) in enumerate(LEGS, start=1):
        leg: dict = {"leg": label, "start": step}
        t0 = time.perf_counter()
        try:
            pm = make(engine, what, plans)
            leg["loaded_step"] = load_checkpoint(pm, root / f"leg{i - 1}")
            leg["param_max_diff"] = max_diff(pm.full_state_dict(), saved)
            leg["losses"] = [pm.train_step(*data(s)) for s in range(step, step + 2)]
            step += 2
            save_checkpoint(pm, root / f"leg{i}", step)
            saved = pm.full_state_dict()
        except Exception as exc:  # noqa: BLE001 - reported; the chain stops
            leg["error"] = f"{type(exc).__name__}: {exc}"
            leg["traceback"] = traceback.format_exc()[-3000:]
            report["legs"].append(leg)
            break
        leg["seconds"] = time.perf_counter() - t0
        report["legs"].append(leg)
        dist.barrier()
    report["errors"] = error_cases(root, plans)
    if dist.get_rank() == 0:
        with open(out_path, "w") as fh:
            json.dump(report, fh, indent=1)
        shutil.rmtree(root / "leg0", ignore_errors=True)
    dist.destroy_process_group()


def error_cases(root: Path, plans: dict[str, str]) -> dict[str, str]:
    """Bad combinations: one-line AutoplanErrors naming the fix."""
    from autoplan.runtime.checkpoint import load_checkpoint

    out = {}
    tries = {
        # a checkpoint of another model (no fingerprint to tell: the shapes do)
        "other_model": lambda: load_checkpoint(_other_model(), root / "leg1"),
        # AdamW states are not SGD's
        "other_optimizer": lambda: load_checkpoint(_sgd(), root / "leg1"),
        "empty": lambda: load_checkpoint(make("recipe", dict(dp=4), plans), root / "nothing-here"),
    }
    for key, fn in tries.items():
        out[key] = error_of(fn)
    return out


def _other_model():
    import autoplan.models as zoo
    from autoplan.runtime.recipe import Recipe, apply_recipe

    torch.manual_seed(0)
    return apply_recipe(zoo.resolve_model("gpt-tiny:layers=4,hidden=32").build(), Recipe(dp=4), optimizer=optimizer)


def _sgd():
    from autoplan.runtime.recipe import Recipe, apply_recipe

    return apply_recipe(build(), Recipe(dp=4), optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9))


if __name__ == "__main__":
    main()
