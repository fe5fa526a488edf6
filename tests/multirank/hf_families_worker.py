"""Run by torchrun (4 ranks): unmodified transformers models, planned and trained, vs one process.

usage: python -m torch.distributed.run --standalone --nproc-per-node 4 hf_families_worker.py OUT.json CASES
CASES: comma-separated arch[:mesh[:family]] with arch a name of ``autoplan.models.hf_catalog``, mesh like
dp=2+tp=2 (default: the planner's choice for 4 ranks) and family ddp|fsdp|megatron (a forced layout). Each case: plan the model with its own inputs dict (labels
inside, so the loss is the model's), apply the plan, train 3 SGD steps on the same global batches as one
process, and report the relative errors of the losses and of every parameter after the steps.
"""
from __future__ import annotations

import copy
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from common import run_cases  # type: ignore[import-not-found]

torch.set_num_threads(1)
BATCH = 8  # global batch: 2 samples per rank
STEPS = int(os.environ.get("AUTOPLAN_STEPS", "3"))  # SGD steps per case
LR = 0.05


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def batches(arch) -> list[dict]:
    """STEPS global batches, the same on every rank (the catalogue's seeded inputs, shifted per step)."""
    out = []
    for step in range(STEPS):
        torch.manual_seed(100 + step)
        _, inputs = arch.build(BATCH)
        out.append(inputs)
    return out


def run_case(case: str) -> dict:
    import autoplan
    from autoplan.models.hf_catalog import get_arch
    from autoplan.runtime import apply
    from autoplan.plan import Plan

    name, mesh, force = (case.split(":") + ["", ""])[:3]
    arch = get_arch(name)
    model, example = arch.build(BATCH)
    ref = copy.deepcopy(model)
    data = batches(arch)
    t0 = time.perf_counter()
    plan = None
    if dist.get_rank() == 0:  # one rank plans (4 ranks share 2 cores), every rank applies its plan
        try:
            plan = autoplan.plan(model, example, cluster="cpu", devices=dist.get_world_size(), global_batch=BATCH,
                                 baselines=False, dtype="fp32", mesh=mesh.replace("+", ",") or None, force=force or None)
        except Exception as exc:  # noqa: BLE001 - every rank reports it (none waits for a plan that never comes)
            plan = f"{type(exc).__name__}: {exc}"
    box = [plan.data if hasattr(plan, "data") else plan]
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], str):
        raise RuntimeError(f"planning failed: {box[0]}")
    plan = Plan(box[0])
    plan_s = time.perf_counter() - t0
    pm = apply(model, plan, optimizer=lambda ps: torch.optim.SGD(ps, lr=LR))
    losses = [pm.train_step(batch) for batch in data]
    opt = torch.optim.SGD(ref.parameters(), lr=LR)
    ref_losses = []
    for batch in data:
        loss = ref(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ref_losses.append(float(loss))
    full = pm.full_state_dict()
    params = {n: max_abs(full[n], p.detach()) for n, p in ref.named_parameters()}
    worst = max(params, key=params.get)
    return {"case": case, "mesh": plan.mesh, "plan_s": plan_s, "runtime": plan.execution["runtime"],
            "losses": losses, "ref_losses": ref_losses,
            "loss_rel": max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses, ref_losses)),
            "param_abs": params[worst], "worst_param": worst,
            "state_keys_equal": sorted(full) == sorted(ref.state_dict()),
            "unplanned": getattr(pm, "unplanned", [])[:5],
            "params_sharded": sorted({"/".join(v) for v in plan.params.values()}),
            "inputs": {k: "/".join(v) for k, v in plan.data["inputs"].items()}}


def main() -> None:
    out_path, cases = sys.argv[1], sys.argv[2].split(",")
    dist.init_process_group("gloo", timeout=timedelta(seconds=180))
    if len(sys.argv) > 3:  # debugging a hang: every rank's stack after this many seconds
        import faulthandler

        faulthandler.dump_traceback_later(float(sys.argv[3]), exit=True)
    run_cases(cases, run_case, out_path)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
