"""Coverage of unmodified transformers models: captured, planned, run, equal to one process.

    python benchmarks/hf_coverage.py [--archs llama,bert,...] [--no-run] [--steps 2]

Every architecture of ``autoplan.models.hf_catalog`` (tiny configs, random weights) is passed to
``autoplan.plan`` as users have it (the model and its inputs dict with labels), first for a DGX H100
node (8 GPUs, global batch 64; the plan time is the row's "plan s"), then for 4 CPU ranks (global
batch 8, fp32, data parallel forced so the batch really splits), and that plan is applied and
trained ``--steps`` SGD steps on 4 gloo ranks (one torchrun launch for all) against one process.
Prints one row per architecture: family, feature, the H100 plan's mesh and predicted step time,
ops planned replicated for lack of a rule, plan seconds, whether the 4-rank run matched one
process (max relative loss error, max absolute parameter error), and a closing count.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import autoplan
from autoplan.models.hf_catalog import ARCHS

HERE = Path(__file__).resolve().parent.parent / "tests" / "multirank"
LOSS_TOL, PARAM_TOL = 1e-5, 1e-4


def plan_row(arch) -> dict:
    """Plan the architecture for 8 H100s, as a user would: what the planner says, and how long it took."""
    model, inputs = arch.build(8)
    t0 = time.perf_counter()
    try:
        plan = autoplan.plan(model, inputs, cluster="dgx-h100", devices=8, global_batch=64)
    except autoplan.AutoplanError as exc:
        return {"planned": False, "error": str(exc)[:120], "plan_s": time.perf_counter() - t0}
    return {"planned": True, "plan_s": time.perf_counter() - t0, "mesh": plan.mesh,
            "step_ms": plan.predicted.step_time_s * 1e3, "replicated_ops": len(plan.data["model"]["unsupported_ops"]),
            "runtime": plan.execution["runtime"]}


def run_all(names: list[str], steps: int) -> dict[str, dict]:
    """One torchrun launch: each architecture planned for 4 CPU ranks (DDP), trained, compared."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
               "hf_families_worker.py", str(out), ",".join(f"{n}:dp=4:ddp" for n in names)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE), "AUTOPLAN_STEPS": str(steps)}
        proc = subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True)
        if not out.exists():
            sys.exit(f"the 4-rank run failed:\n{proc.stderr[-3000:]}")
        return {r["case"].split(":")[0]: r for r in json.loads(out.read_text())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--archs", default=",".join(a.name for a in ARCHS))
    ap.add_argument("--no-run", action="store_true", help="plan only (no 4-rank training)")
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    archs = [a for a in ARCHS if a.name in args.archs.split(",")]
    rows = {a.name: plan_row(a) for a in archs}
    runs = {} if args.no_run else run_all([a.name for a in archs if rows[a.name]["planned"]], args.steps)
    print(f"{'model':<13} {'family':<16} {'feature':<32} {'planned':<8} {'plan s':>6} {'H100 mesh':<16} "
          f"{'step ms':>8} {'no rule':>7} {'ran':<4} {'equal':<6} {'loss err':>9} {'param err':>9}")
    equal = 0
    for a in archs:
        p, r = rows[a.name], runs.get(a.name, {})
        ran = bool(r) and "error" not in r
        same = ran and r["loss_rel"] < LOSS_TOL and r["param_abs"] < PARAM_TOL
        equal += same
        mesh = "x".join(f"{k}{v}" for k, v in p.get("mesh", {}).items()) or p.get("error", "")[:16]
        print(f"{a.name:<13} {a.family:<16} {a.feature[:32]:<32} {'yes' if p['planned'] else 'NO':<8} {p['plan_s']:>6.1f} "
              f"{mesh:<16} {p.get('step_ms', float('nan')):>8.3f} {p.get('replicated_ops', '-'):>7} "
              f"{('yes' if ran else 'NO') if runs else '-':<4} {('yes' if same else 'NO') if runs else '-':<6} "
              f"{r.get('loss_rel', float('nan')):>9.1e} {r.get('param_abs', float('nan')):>9.1e}")
        if r.get("error"):
            print(f"    {r['error'][:160]}")
    planned = sum(p["planned"] for p in rows.values())
    print(f"\n{len(archs)} architectures: {planned} planned"
          + (f", {sum(1 for r in runs.values() if 'error' not in r)} ran on 4 CPU ranks, {equal} equal to one process"
             if runs else "") + f"; plan time median {sorted(p['plan_s'] for p in rows.values())[len(rows) // 2]:.1f} s")


if __name__ == "__main__":
    main()
