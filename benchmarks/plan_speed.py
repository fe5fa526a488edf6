"""Capture and solve time of the zoo across cluster sizes (8 to 16384 devices).

    python benchmarks/plan_speed.py [--models gpt2,llama3-8b,gpt3-175b,llama3-405b] [--devices 8,64,...]

Prints one row per (model, devices): capture seconds (trace + shape propagation, once per
model), search seconds (all meshes x micro-batches x recompute), configurations, how many needed
a memory-constrained solve, and the chosen mesh and predicted step time. Target from the issue:
gpt3-175b on 1024 GPUs in under 10 s (capture + search).
"""
from __future__ import annotations

import argparse
import time

from autoplan.api import prepare_job
from autoplan.errors import InfeasibleError
from autoplan.search import search

BATCH = {"gpt2": 512, "llama3-8b": 512, "gpt3-175b": 1536, "llama3-405b": 2048}
SEQ = {"gpt2": 1024, "llama3-8b": 8192, "gpt3-175b": 2048, "llama3-405b": 8192}
CLUSTER = {"gpt3-175b": "dgx-a100-80gb"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="gpt2,llama3-8b,gpt3-175b,llama3-405b")
    ap.add_argument("--devices", default="8,64,512,1024,4096,16384")
    args = ap.parse_args()
    print(f"{'model':<12} {'devices':>7} {'capture s':>9} {'search s':>9} {'total s':>8} {'configs':>7} {'budgeted':>8}  {'mesh':<14} {'step s':>8}")
    for name in args.models.split(","):
        t0 = time.perf_counter()
        job = prepare_job(name, cluster=CLUSTER.get(name, "dgx-h100"), devices=8, seq_len=SEQ.get(name, 1024))
        graph, tying, cluster = job.graph, job.tying, job.cluster
        t_capture = time.perf_counter() - t0
        for devices in (int(d) for d in args.devices.split(",")):
            t1 = time.perf_counter()
            try:
                r = search(graph, tying, cluster, devices=devices, global_batch=BATCH.get(name, 512))
                mesh, step, configs, solved = str(r.best.mesh), f"{r.best.solution.cost:.3f}", r.configurations, r.solved
            except InfeasibleError:
                mesh, step, configs, solved = "does not fit", "-", "-", "-"
            t_search = time.perf_counter() - t1
            print(f"{name:<12} {devices:>7} {t_capture:>9.2f} {t_search:>9.2f} {t_capture + t_search:>8.2f} {configs:>7} {solved:>8}  {mesh:<14} {step:>8}", flush=True)


if __name__ == "__main__":
    main()
