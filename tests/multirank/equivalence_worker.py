"""Run by torchrun (4 ranks): planned runs vs one process, and planned vs issued collectives.

usage: python -m torch.distributed.run --standalone --nproc-per-node 4 equivalence_worker.py OUT.json CASES
CASES: comma-separated model:family[:mesh[:micro_batches]] (family ddp|fsdp|megatron|auto; mesh like
dp=2+tp=2), or "moves" (every placement move on a 2x2 mesh keeps the value), or "vocab_ce"
(vocabulary-parallel cross-entropy: values, gradients, collectives). Models: zoo names, or
hf-gpt2 / hf-llama (transformers).
Rank 0 writes a JSON report: per case, gradient / loss / parameter relative errors and the
collectives comparison (step 1 with one gradient all-reduce per parameter, step 2 with the
bucketed all-reduces ``train_step`` issues).
"""
from __future__ import annotations

import copy
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from common import run_cases, token_batches  # type: ignore[import-not-found]

torch.set_num_threads(1)


def build(name: str):
    if name.startswith("hf-"):
        from tests_hf_models import build_hf  # type: ignore[import-not-found]

        model, example = build_hf(name)
        return model, example
    import autoplan.models as zoo

    spec = zoo.resolve_model(name)
    torch.manual_seed(0)
    return spec.build(), None


def sgd_check(model_name: str, plan, batch) -> float:
    """Gradient scale check beyond Adam: one SGD step, planned vs one process (max relative param error)."""
    from autoplan.inputs import cross_entropy
    from autoplan.runtime import apply

    model, example = build(model_name)
    ref = copy.deepcopy(model)
    pm = apply(model, plan, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.5),
               example_inputs=(example,) if example is not None else None)
    pm.train_step(*batch)
    opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    cross_entropy(ref(batch[0]), batch[1]).backward()
    opt.step()
    full = pm.full_state_dict()
    return max(rel(full[n], p.detach()) for n, p in ref.named_parameters())


def share_plan(plan):
    from autoplan.runtime.train import broadcast_plan

    return broadcast_plan(plan)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def run_moves() -> dict:
    """Every placement move on a 2x2 mesh keeps the tensor's value (the runtime's own all-to-all and
    axis order included): the full tensor after the move equals the one before, on every rank."""
    import itertools

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    from autoplan.runtime.moves import move, normalize, to_dtensor_placements

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    full = torch.arange(8 * 12, dtype=torch.float32).reshape(8, 12)
    wrong, checked = [], 0
    for src in itertools.product(["R", "S(0)", "S(1)"], repeat=2):
        for dst in itertools.product(["R", "S(0)", "S(1)", "P"], repeat=2):
            if src == dst:
                continue
            x = distribute_tensor(full, mesh, list(to_dtensor_placements(src)))
            try:
                out = move(x, to_dtensor_placements(dst))
            except Exception as exc:  # noqa: BLE001 - refused moves (S -> P under a nested split)
                if "cannot turn" not in str(exc):
                    wrong.append([list(src), list(dst), f"{type(exc).__name__}: {exc}"])
                continue
            checked += 1
            if normalize(out.placements, out.ndim) != to_dtensor_placements(dst) or not torch.equal(out.full_tensor(), full):
                wrong.append([list(src), list(dst)])
    return {"case": "moves", "checked": checked, "wrong": wrong}


def run_case(case: str, batches, seq: int) -> dict:
    import autoplan
    from autoplan.inputs import cross_entropy
    from autoplan.runtime import apply
    from torch.distributed.tensor.debug import CommDebugMode

    from autoplan.runtime.apply import global_loss
    from autoplan.runtime.comms import check_step

    parts = case.split(":")
    name, family = parts[0], parts[1]
    mesh = parts[2].replace("+", ",") if len(parts) > 2 and parts[2] else None
    micro = [int(parts[3])] if len(parts) > 3 else None
    model, example = build(name)
    ref = copy.deepcopy(model)
    force = None if family == "auto" else family
    t0 = time.perf_counter()
    if example is None:
        plan = autoplan.plan(name, cluster="cpu", devices=dist.get_world_size(), global_batch=batches[0][0].shape[0],
                             seq_len=seq, baselines=False, force=force, mesh=mesh, dtype="fp32",
                             micro_batches=micro)
    else:
        plan = autoplan.plan(model, (example,), cluster="cpu", devices=dist.get_world_size(),
                             global_batch=batches[0][0].shape[0], baselines=False, force=force, mesh=mesh, dtype="fp32",
                             targets=torch.zeros(2, seq, dtype=torch.long), micro_batches=micro)
    plan = share_plan(plan)  # every rank applies rank 0's plan (the solver need not be deterministic)
    plan_s = time.perf_counter() - t0
    pm = apply(model, plan, optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-3), example_inputs=(example,) if example is not None else None)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    out = {"case": case, "mesh": plan.mesh, "plan_s": plan_s, "params": sorted({"/".join(v) for v in plan.params.values()}),
           "micro_batches": plan.data["training"]["micro_batches"]}
    losses, ref_losses = [], []
    for step, (x, y) in enumerate(batches):
        if step < 2:  # step 1: one all-reduce per parameter, as the plan lists them; step 2: bucketed, as trained
            checked = check_step(pm, x, y, bucket=step == 1)
            loss_dt = checked.pop("loss")
            out["collectives" if step == 0 else "collectives_bucketed"] = checked
            if step == 0:
                grads = pm.full_grads()
            with CommDebugMode() as report:  # the loss report train_step makes, as priced: one all-reduce
                loss = global_loss(loss_dt)
            out.setdefault("loss_report", []).append(report.get_total_counts())
            pm.optimizer.step()
            pm.optimizer.zero_grad(set_to_none=True)
        else:
            loss = pm.train_step(x, y)
        ref_loss = cross_entropy(ref(x), y)
        ref_loss.backward()
        if step == 0:
            ref_grads = {n: p.grad.detach().clone() for n, p in ref.named_parameters()}
            out["grad_rel"] = max(rel(grads[n], ref_grads[n]) for n in ref_grads)
            out["grads_missing"] = sorted(set(ref_grads) - set(grads))
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        losses.append(loss)
        ref_losses.append(float(ref_loss.detach()))
    full = pm.full_state_dict()
    out["losses"], out["ref_losses"] = losses, ref_losses
    out["loss_rel"] = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses))
    out["param_rel"] = max(rel(full[n], p.detach()) for n, p in ref.named_parameters())
    out["param_abs"] = max(float((full[n] - p.detach()).abs().max()) for n, p in ref.named_parameters())
    out["unplanned"] = pm.unplanned
    if micro is None and (family == "fsdp" or (mesh and "," in mesh)):
        out["sgd_param_rel"] = sgd_check(name, plan, batches[0])  # gradient scale, beyond Adam
    return out


def run_vocab_ce() -> dict:
    """Cross-entropy on logits split by rows and/or the vocabulary (Megatron's vocab-parallel loss):
    the loss and the logits' gradient equal one process's, and each vocabulary axis issues the three
    all-reduces of one fp32 per local row the cost model prices, and where the rows are split, the one
    all-reduce of the number of targets that count; nothing else."""
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from autoplan.runtime.comms import CollectiveRecorder
    from autoplan.runtime.moves import Trace, _local_cross_entropy

    gen = torch.Generator().manual_seed(3)
    full = torch.randn(8, 12, generator=gen) * 4
    targets = torch.randint(0, 12, (8,), generator=gen)
    want_loss = F.cross_entropy(full, targets)
    ref = full.clone().requires_grad_()
    F.cross_entropy(ref, targets).backward()
    results = []
    for shape, names, pl in [((4,), ("tp",), [Shard(1)]), ((2, 2), ("dp", "tp"), [Shard(0), Shard(1)]),
                             ((2, 2), ("dp", "tp"), [Replicate(), Shard(1)])]:
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
        logits = distribute_tensor(full, mesh, pl).requires_grad_()
        tpl = [Shard(0) if isinstance(p, Shard) and p.dim == 0 else Replicate() for p in pl]
        tgt = distribute_tensor(targets, mesh, tpl)
        trace = Trace()
        rec = CollectiveRecorder(mesh, trace)
        with rec, trace.scope("forward", "ce", "ce"):
            loss = _local_cross_entropy([logits, tgt], {})
        issued = sorted((r["kind"], r["axis"], r["bytes"]) for r in rec.records)
        rows = 8 // (2 if isinstance(pl[0], Shard) and pl[0].dim == 0 else 1)
        loss.full_tensor().backward()
        results.append({"placements": [str(p) for p in pl],
                        "loss_rel": abs(float(loss.full_tensor()) - float(want_loss)) / abs(float(want_loss)),
                        "grad_rel": rel(logits.grad.full_tensor(), ref.grad),
                        "issued": issued,
                        "expected": sorted([["all_reduce", "tp", rows * 4]] * 3  # the row max, target logit, sum of exps
                                           + ([["all_reduce", "dp", 4]] if rows < 8 else []))})  # rows split: the count
    return {"case": "vocab_ce", "results": results}


def main() -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    out_path, cases = sys.argv[1], sys.argv[2].split(",")
    seq = 32
    batches = token_batches(seq=seq)
    special = {"moves": run_moves, "vocab_ce": run_vocab_ce}
    run_cases(cases, lambda case: special[case]() if case in special else run_case(case, batches, seq), out_path)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
