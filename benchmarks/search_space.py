"""Whole-space search at scale: per-op sharding search + pipeline search, with their times.

    python benchmarks/search_space.py

For gpt3-175b on 1024 A100s and llama3-405b on 16384 H100s: capture time, per-op search time
(meshes x micro-batches x recompute, exact per-op sharding), pipeline search time (TP x PP x DP
x micro-batch x interleaving x recompute), the chosen configuration, and, where a published
configuration exists, that configuration priced by the same cost model (`estimate`).
Published: Llama 3 405B pre-training, Llama 3 paper (Dubey et al. 2024), Table 4: 16,384 H100,
TP 8, CP 1, PP 16, DP 128, sequence 8192, 16M tokens per batch, 400 TFLOP/s per GPU (41% BF16 MFU);
FSDP sharding optimizer states and gradients but not weights (ZeRO-2), sequence parallel with TP.
Target from the issue: each search under 30 s on this machine.
"""
from __future__ import annotations

import time
from dataclasses import replace

from autoplan.api import prepare_job
from autoplan.errors import AutoplanError
from autoplan.estimate import EstimateConfig, estimate
from autoplan.pipeline_search import search_pipeline
from autoplan.search import search

CASES = [
    ("gpt3-175b", "dgx-a100-80gb", 1024, 1536, 2048, None),
    ("llama3-405b", "dgx-h100", 16384, 2048, 8192,
     (EstimateConfig(tp=8, pp=16, dp=128, micro_batch=1, virtual_stages=1, recompute="none", zero=2,
                     sequence_parallel=True), 400.0)),
]


def main() -> None:
    for name, cluster, devices, batch, seq, published in CASES:
        t0 = time.perf_counter()
        job = prepare_job(name, cluster=cluster, devices=devices, global_batch=batch, seq_len=seq)
        t_cap = time.perf_counter() - t0
        t1 = time.perf_counter()
        per_op = search(job.graph, job.tying, job.cluster, devices=devices, global_batch=batch)
        t_op = time.perf_counter() - t1
        t2 = time.perf_counter()
        cfg, est, n = search_pipeline(job)
        t_pipe = time.perf_counter() - t2
        print(f"{name} on {devices} x {cluster}, global batch {batch} x {seq} tokens")
        print(f"  capture {t_cap:.1f} s | per-op search {t_op:.1f} s ({per_op.configurations} configurations) | "
              f"pipeline search {t_pipe:.1f} s ({n} configurations) | total {t_cap + t_op + t_pipe:.1f} s")
        b = per_op.best
        print(f"  per-op plan:   {b.mesh} micro-batches {b.cfg.micro_batches} recompute {'full' if b.cfg.recompute else 'none'}: "
              f"{b.solution.cost:.2f} s/step")
        print(f"  pipeline plan: tp {cfg.tp} pp {cfg.pp} dp {cfg.dp} micro-batch {cfg.micro_batch} v {cfg.virtual_stages} "
              f"recompute {cfg.recompute} zero {cfg.zero} sp {cfg.sequence_parallel}: {est.step_time_s:.2f} s/step, {est.model_tflops_per_device:.0f} model TFLOP/s/GPU, "
              f"MFU {100 * est.mfu:.1f}%, {est.peak_memory_bytes / 2**30:.1f} GiB")
        if published:
            pcfg, tflops = published
            print(f"  published:     tp {pcfg.tp} pp {pcfg.pp} dp {pcfg.dp} zero {pcfg.zero} sp {pcfg.sequence_parallel}, "
                  f"{tflops:.0f} TFLOP/s/GPU reported; the interleaving depth is not published, so each v is priced:")
            for v in (1, 2, 4, 8):
                try:
                    pub = estimate(job, replace(pcfg, virtual_stages=v))
                except AutoplanError as exc:  # pp x v > layers, or micro-batches not a multiple of pp
                    print(f"    v {v}: {exc}")
                    continue
                print(f"    v {v}: {pub.step_time_s:.2f} s/step, {pub.model_tflops_per_device:.0f} model TFLOP/s/GPU "
                      f"({pub.model_tflops_per_device / tflops - 1:+.0%} vs reported), bubble {pub.bubble_s:.2f} s, "
                      f"{pub.peak_memory_bytes / 2**30:.1f} GiB, fits {pub.fits}")
        print(flush=True)


if __name__ == "__main__":
    main()
