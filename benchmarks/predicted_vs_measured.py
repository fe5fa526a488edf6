"""Predicted vs measured step time of several plans on 4 CPU ranks (issue #5).

    python benchmarks/predicted_vs_measured.py [--cluster profiles/cpu-measured.yaml | --fresh-profile] [--steps 12] [--rounds 6]

Re-launches itself under torchrun on 4 CPU ranks (gloo). Rank 0 makes the plans (DDP, FSDP,
TP 4, DP 2 x TP 2, PP 2 x DP 2 (1F1B, 4 micro-batches, as ``autoplan estimate -o`` writes it),
the planner's choice (per-op and pipeline search), and DDP on a 2 x 2 mesh); all ranks run each
plan with ``autoplan.apply`` (the engine its ``execution`` names: native recipe or per-op
interpreter; printed per row) and time median steps (forward + backward + AdamW). Predictions: the cost model on ``--cluster``, and the
same with the compute of every op replaced by the op-level profile (``autoplan.profiler.ops``,
timed on every rank at once so the cores are as shared as in training, forward and backward).
Reports Spearman rank correlation, median relative error, and the planner's choice vs the
fastest measured plan. Micro-batches are pinned to 1 and recompute off. Numbers are noisy: 2 shared cores, few steps.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

PLANS = [  # name, force ("config": a fixed pipeline configuration), mesh
    ("ddp", "ddp", None),
    ("fsdp", "fsdp", None),
    ("tp", "megatron", "tp=4"),
    ("dp2xtp2", "megatron", "dp=2,tp=2"),
    ("pp2xdp2", "config", "pp=2,dp=2"),
    ("planner", None, None),
    ("ddp2x2", "ddp", "dp=2,dq=2"),  # an extra point (FSDP on 2 x 2 fails in DTensor's embedding mask)
]


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt-tiny:layers=4,hidden=128,seq=128")
    p.add_argument("--cluster", default=str(Path(__file__).resolve().parent.parent / "profiles" / "cpu-measured.yaml"))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=6, help="steps are taken in this many rounds over all plans")
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--fresh-profile", action="store_true",
                   help="run `autoplan profile` first and predict with that profile instead of --cluster")
    return p.parse_args()


def _data(step: int, batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    x = torch.randint(0, 256, (batch, seq + 1), generator=g)
    return x[:, :-1].contiguous(), x[:, 1:].contiguous()


def _spearman(a: list[float], b: list[float]) -> float:
    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        for pos, i in enumerate(order):
            r[i] = float(pos)
        return r

    ra, rb = ranks(a), ranks(b)
    n = len(a)
    ma, mb = sum(ra) / n, sum(rb) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = sum((x - ma) ** 2 for x in ra) ** 0.5
    vb = sum((y - mb) ** 2 for y in rb) ** 0.5
    return cov / (va * vb) if va and vb else float("nan")


def _median(v: list[float]) -> float:
    s = sorted(v)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def _make_plans(args: argparse.Namespace, workdir: Path) -> None:
    import autoplan

    from autoplan.api import prepare_job
    from autoplan.estimate import EstimateConfig
    from autoplan.planner import config_plan

    for name, force, mesh in PLANS:
        try:
            if force == "config":
                sizes = dict(part.split("=") for part in mesh.split(","))
                job = prepare_job(args.model, cluster=args.cluster, devices=args.nproc, global_batch=args.batch, seq_len=args.seq)
                p = config_plan(job, EstimateConfig(pp=int(sizes["pp"]), dp=int(sizes["dp"]), micro_batch=1, dtype="fp32"))
            else:
                p = autoplan.plan(args.model, cluster=args.cluster, devices=args.nproc, global_batch=args.batch,
                                  seq_len=args.seq, dtype="fp32", baselines=False, force=force, mesh=mesh,
                                  micro_batches=[1], recompute=False, pipeline=force is None)
            p.save(workdir / f"{name}.plan.json")
        except Exception as exc:  # noqa: BLE001 - report and go on
            (workdir / f"{name}.error").write_text(f"{type(exc).__name__}: {exc}")


def _op_prediction(plan, graph, times) -> tuple[float, int]:
    """Plan's predicted step time with each op's compute replaced by its profiled forward + backward."""
    from autoplan.strategies.expand import Strategy
    from autoplan.strategies.placement import parse_placements

    d = plan.data
    if not d["ops"]:
        return d["predicted"]["step_time_s"], 0  # a pipeline plan: priced per layer by ``estimate``, no per-op list
    mesh_shape = tuple(d["mesh"]["shape"])
    b = d["training"]["micro_batch"]
    step = d["predicted"]["step_time_s"]
    used = 0
    for op in d["ops"]:
        node = graph.nodes.get(op["name"])
        if node is None or not op.get("compute_s"):
            continue
        s = Strategy(parse_placements(op["output"]), tuple(parse_placements(i) for i in op["inputs"]), (), 1, ())
        t = times.seconds(graph, node, s, mesh_shape, b, "fp32")
        if t is None:
            continue
        step += t + times.backward_seconds(graph, node, s, mesh_shape, b, "fp32") - op["compute_s"]
        used += 1
    return step, used


def worker() -> None:
    args = _args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=300))
    rank, world = dist.get_rank(), dist.get_world_size()
    workdir = Path(args.workdir)
    if rank == 0:
        _make_plans(args, workdir)
    dist.barrier()

    from autoplan.capture import capture
    from autoplan.errors import AutoplanError
    from autoplan.graph import build_graph
    from autoplan.models import resolve_model
    from autoplan.plan import Plan
    from autoplan.profiler.ops import profile_ops
    from autoplan.runtime.engine import apply
    from autoplan.runtime.train import measure_steps

    plans = {n: Plan.load(workdir / f"{n}.plan.json") for n, _, _ in PLANS if (workdir / f"{n}.plan.json").is_file()}
    spec = resolve_model(args.model)
    with torch.device("meta"):
        meta_model = spec.build()

    graph = build_graph(capture(meta_model, spec.call_spec(args.seq)))
    meshes = sorted({tuple(p.data["mesh"]["shape"]) for p in plans.values() if p.ops})
    t0 = time.perf_counter()
    # micro-batches are pinned to 1: the micro-batch is the global batch, sharded by each strategy
    times = profile_ops(graph, meshes, args.batch, "fp32", workdir / f"ops-rank{rank}.json", threads=1, backward=True)
    op_s = time.perf_counter() - t0
    dist.barrier()

    engines: dict[str, str] = {}
    failed: dict[str, str] = {}
    models = {}
    for name, plan in plans.items():
        try:
            torch.manual_seed(0)
            models[name] = apply(spec.build(), plan, optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-3))
            engines[name] = "per-op" if hasattr(models[name], "program") else "recipe"
            measure_steps(models[name], lambda i: _data(i, args.batch, args.seq), 0, args.warmup)
        except AutoplanError as exc:  # raised alike on every rank before any step (an unsupported plan)
            failed[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        dist.barrier()
    # rounds: every plan runs a few steps per round, in turn, so a slow spell of the shared machine
    # falls on all plans alike instead of on whichever ran then; each round in another order (shuffled
    # with the same seed on every rank), so what one plan leaves behind (caches, threads, memory) does
    # not always fall on the same next plan
    samples: dict[str, list[float]] = {n: [] for n in models}
    per_round = max(1, -(-args.steps // args.rounds))
    for k in range(args.rounds):
        order = list(models)
        random.Random(k).shuffle(order)
        for name in order:
            pm = models[name]
            # one step discarded per round: the first after another plan's steps runs with cold caches
            ts = measure_steps(pm, lambda i: _data(i, args.batch, args.seq), per_round, 1)
            t = torch.tensor(ts)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)  # a step ends when its slowest rank does
            samples[name] += t.tolist()
            dist.barrier()
    measured = {n: _median(v) for n, v in samples.items()}

    if rank == 0:
        rows = []
        for name, plan in plans.items():
            if name not in measured:
                continue
            pred = plan.data["predicted"]["step_time_s"]
            pred_op, used = _op_prediction(plan, graph, times)
            rows.append({"plan": name, "mesh": plan.data["mesh"], "engine": engines[name], "measured_s": measured[name],
                         "predicted_s": pred,
                         "predicted_with_op_profile_s": pred_op, "ops_from_profile": used})
        print(f"model {args.model}, global batch {args.batch} x {args.seq}, {world} CPU ranks (gloo, 1 thread each), "
              f"cluster {args.cluster}; median of {args.steps} steps after {args.warmup} warm-up, taken in "
              f"{args.rounds} rounds over all plans. NOISY: 2 shared cores.")
        print(f"op-level profile: {len(times)} keys, {times.stats}, {op_s:.1f} s")
        print(f"{'plan':<9} {'mesh':<14} {'engine':<7} {'measured':>10} {'predicted':>10} {'+op prof':>10}")
        for r in rows:
            mesh = "x".join(f"{a}{s}" for a, s in zip(r["mesh"]["axis_names"], r["mesh"]["shape"]))
            print(f"{r['plan']:<9} {mesh:<14} {r['engine']:<7} {r['measured_s'] * 1e3:8.0f}ms {r['predicted_s'] * 1e3:8.0f}ms "
                  f"{r['predicted_with_op_profile_s'] * 1e3:8.0f}ms")
        summary = {}
        m = [r["measured_s"] for r in rows]
        for key, label in (("predicted_s", "cost model"), ("predicted_with_op_profile_s", "cost model + op profile")):
            p = [r[key] for r in rows]
            rho = _spearman(p, m)
            err = _median([abs(a - b) / b for a, b in zip(p, m)])
            summary[key] = {"spearman": rho, "median_abs_rel_error": err}
            print(f"{label:<26} Spearman {rho:+.2f}, median |error| {100 * err:.0f}%")
        fastest = min(rows, key=lambda r: r["measured_s"])
        choice = next((r for r in rows if r["plan"] == "planner"), None)
        if choice:
            ratio = choice["measured_s"] / fastest["measured_s"]
            summary["planner_vs_fastest"] = ratio
            print(f"planner's choice: {choice['measured_s'] * 1e3:.0f} ms, fastest {fastest['plan']} "
                  f"{fastest['measured_s'] * 1e3:.0f} ms ({ratio:.2f}x)")
        for n, _, _ in PLANS:
            err = workdir / f"{n}.error"
            if err.is_file():
                print(f"{n}: not planned: {err.read_text()[:200]}")
        for n, why in failed.items():
            print(f"{n}: not run by the runtime: {why}")
        if args.json:
            Path(args.json).write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))
    dist.destroy_process_group()


def main() -> None:
    if "LOCAL_RANK" in os.environ:
        worker()
        return
    args = _args()
    with tempfile.TemporaryDirectory(prefix="autoplan-pvm-") as tmp:
        argv = [a for a in sys.argv[1:] if a != "--fresh-profile"]
        if args.workdir is None:
            argv += ["--workdir", tmp]
        if args.fresh_profile:  # the machine as it is now (a shared VM drifts): measured before any plan runs
            fresh = str(Path(tmp) / "fresh.yaml")
            rc = subprocess.call([sys.executable, "-m", "autoplan.cli", "profile", "--nproc", str(args.nproc), "--repeat", "3",
                                  "-o", fresh])
            if rc:
                sys.exit(rc)
            argv += ["--cluster", fresh]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
               os.path.abspath(__file__), *argv]
        sys.exit(subprocess.call(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}))


if __name__ == "__main__":
    main()
