"""Step time of an applied plan vs a hand-written DTensor/FSDP2/DDP version of the same sharding.

    python benchmarks/runtime_overhead.py [--model gpt-tiny:layers=4,hidden=128] [--steps 5]

Re-launches itself under torchrun on 4 CPU ranks (gloo) and prints, for each plan family, the
median step time (forward + backward + AdamW) of ``autoplan.apply`` (the engine the plan names:
DDP and FSDP layouts are lowered to native recipes) beside the hand-written version, their ratio
(target: within 10%), and the same plan forced through the per-op interpreter (what a plan with
no native recipe pays). All numbers come from one run.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn

FAMILIES = ("ddp", "fsdp")


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt-tiny:layers=4,hidden=128,seq=128")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--nproc", type=int, default=4)
    return p.parse_args()


def _build(spec: str) -> nn.Module:
    from autoplan.models import resolve_model

    torch.manual_seed(0)
    return resolve_model(spec).build()


def _data(step: int, batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    x = torch.randint(0, 256, (batch, seq + 1), generator=g)
    return x[:, :-1].contiguous(), x[:, 1:].contiguous()


def _time(step_fn, args: argparse.Namespace) -> float:
    times = []
    for i in range(args.warmup + args.steps):
        x, y = _data(i, args.batch, args.seq)
        dist.barrier()
        t0 = time.perf_counter()
        step_fn(x, y)
        dist.barrier()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    t = torch.tensor(sorted(times)[len(times) // 2])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def planned_step(args: argparse.Namespace, family: str, runtime: str = "auto"):
    import autoplan
    from autoplan.runtime.engine import apply

    plan = autoplan.plan(args.model, cluster="cpu", devices=dist.get_world_size(), global_batch=args.batch,
                         seq_len=args.seq, baselines=False, force=family, dtype="fp32")
    pm = apply(_build(args.model), plan, optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-3), runtime=runtime)
    return pm.train_step


def hand_step(args: argparse.Namespace, family: str):
    """The same sharding written by hand: DDP, or FSDP2 (fully_shard per block, reshard after forward)."""
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    from autoplan.inputs import cross_entropy

    model = _build(args.model)
    if family == "ddp":
        model = DistributedDataParallel(model)
    else:
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rank, world = dist.get_rank(), dist.get_world_size()

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        sl = slice(rank * x.shape[0] // world, (rank + 1) * x.shape[0] // world)
        loss = cross_entropy(model(x[sl]), y[sl])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def worker() -> None:
    args = _args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rows = []
    for family in FAMILIES:
        planned = _time(planned_step(args, family), args)
        hand = _time(hand_step(args, family), args)
        per_op = _time(planned_step(args, family, "per-op"), args)
        rows.append((family, planned, hand, per_op))
    if dist.get_rank() == 0:
        print(f"model {args.model}, global batch {args.batch} x {args.seq}, {dist.get_world_size()} CPU ranks (gloo), "
              f"median of {args.steps} steps after {args.warmup} warm-up")
        print(f"{'plan':<6} {'autoplan.apply':>15} {'hand-written':>13} {'ratio':>7} | {'per-op engine':>14} {'ratio':>7}")
        for family, planned, hand, per_op in rows:
            label = "DDP" if family == "ddp" else "FSDP2"
            print(f"{family:<6} {planned * 1e3:12.1f} ms {hand * 1e3:10.1f} ms {planned / hand:6.2f}x | "
                  f"{per_op * 1e3:11.1f} ms {per_op / hand:6.2f}x   (vs {label})")
    dist.destroy_process_group()


def main() -> None:
    if "LOCAL_RANK" in os.environ:
        worker()
        return
    args = _args()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
           os.path.abspath(__file__), *sys.argv[1:]]
    sys.exit(subprocess.call(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}))


if __name__ == "__main__":
    main()
