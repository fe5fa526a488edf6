"""Predicted vs published: Narayanan et al. 2021 (Megatron-LM, SC21), Table 1, on DGX A100s.

    python benchmarks/validate_published.py [--rows 0:10]

Each row is priced with `autoplan estimate` at the paper's configuration (TP, PP, DP,
micro-batch, interleaving, full recompute, fp16, no sequence parallel, no ZeRO, unfused
attention as Megatron-LM ran before FlashAttention), on the shipped `dgx-a100-80gb` datasheet
profile; nothing is fitted to these numbers. The paper's TFLOP/s count the recompute forward
(Eq. 3): F = 96 B s l h^2 (1 + s/(6h) + V/(16 l h)); ours is F / (predicted step time * GPUs).
Then the planner's own plan for the same model, cluster and global batch is priced under the
same model: the better of its per-op search (meshes x micro-batches x recompute, no pipeline)
and its pipeline search (TP x PP x DP x micro-batch x interleaving x recompute).
Source of the rows: ../shared/MEGATRON-TABLE1.md (copied below).
"""
from __future__ import annotations

import argparse
import time

from autoplan.api import prepare_job
from autoplan.errors import InfeasibleError
from autoplan.estimate import EstimateConfig, estimate
from autoplan.hardware import load_cluster
from autoplan.pipeline_search import search_pipeline
from autoplan.search import SearchOptions, search

SEQ, VOCAB = 2048, 51200
# params (B), layers, hidden, heads, GPUs, TP, PP, DP, micro-batch, global batch, virtual stages, TFLOP/s per GPU
TABLE1 = [
    (1.7, 24, 2304, 24, 32, 1, 1, 32, 16, 512, 1, 137),
    (3.6, 30, 3072, 32, 64, 2, 1, 32, 16, 512, 1, 138),
    (7.5, 36, 4096, 32, 128, 4, 1, 32, 16, 512, 1, 142),
    (18.4, 40, 6144, 48, 256, 8, 1, 32, 8, 1024, 1, 135),
    (39.1, 48, 8192, 64, 512, 8, 2, 32, 4, 1536, 1, 138),
    (76.1, 60, 10240, 80, 1024, 8, 4, 32, 2, 1792, 3, 140),
    (145.6, 80, 12288, 96, 1536, 8, 8, 24, 2, 2304, 2, 148),
    (310.1, 96, 16384, 128, 1920, 8, 16, 15, 1, 2160, 2, 155),
    (529.6, 105, 20480, 128, 2520, 8, 35, 9, 1, 2520, 3, 163),
    (1008.0, 128, 25600, 160, 3072, 8, 64, 6, 1, 3072, 1, 163),
]


def eq3_flops(batch: int, layers: int, hidden: int) -> float:
    return 96 * batch * SEQ * layers * hidden**2 * (1 + SEQ / (6 * hidden) + VOCAB / (16 * layers * hidden))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="0:10", help="python slice of Table 1 rows")
    ap.add_argument("--no-plan", action="store_true", help="skip the planner's own plan per row")
    args = ap.parse_args()
    lo, hi = (int(x) for x in args.rows.split(":"))
    cluster = load_cluster("dgx-a100-80gb")
    print(f"{'params':>7} {'GPUs':>5} {'TP':>3} {'PP':>3} {'DP':>3} {'mb':>3} {'v':>2} | {'published':>9} {'predicted':>9} {'error':>7} {'fits':>5} | "
          f"{'plan step s':>11} {'published step s':>16} {'plan/published':>14}  plan")
    errors = []
    for row in TABLE1[lo:hi]:
        params, layers, hidden, heads, gpus, tp, pp, dp, mb, batch, v, published = row
        job = prepare_job(f"gpt:layers={layers},hidden={hidden},heads={heads},vocab={VOCAB},seq={SEQ}",
                          cluster=cluster, devices=gpus, global_batch=batch, seq_len=SEQ)
        graph, tying = job.graph, job.tying
        cfg = EstimateConfig(tp=tp, pp=pp, dp=dp, virtual_stages=v, micro_batch=mb, recompute="full",
                             dtype="fp16", attention="unfused")
        est = estimate(job, cfg)
        predicted = eq3_flops(batch, layers, hidden) / (est.step_time_s * gpus) / 1e12
        err = predicted / published - 1
        errors.append(abs(err))
        plan_txt, ratio, plan_step = "-", "-", "-"
        if not args.no_plan:
            t0 = time.perf_counter()
            options = []
            try:
                r = search(graph, tying, cluster, devices=gpus, global_batch=batch,
                           options=SearchOptions(dtype="fp16", attention="unfused"))
                options.append((r.best.solution.cost, f"per-op {r.best.mesh} m={r.best.cfg.micro_batches} rc={'full' if r.best.cfg.recompute else 'none'}"))
            except InfeasibleError:
                pass
            try:
                pc, pe, n = search_pipeline(job, dtype="fp16", attention="unfused")
                options.append((pe.step_time_s, f"pipeline tp{pc.tp} pp{pc.pp} dp{pc.dp} mb{pc.micro_batch} v{pc.virtual_stages} rc={pc.recompute} ({n} priced)"))
            except Exception as exc:  # noqa: BLE001 - reported in the table
                options.append((float("inf"), f"pipeline search failed: {exc}"))
            step, plan_txt = min(options)
            plan_step, ratio = f"{step:.2f}", f"{step / est.step_time_s:.3f}"
            plan_txt += f" ({time.perf_counter() - t0:.0f} s)"
        print(f"{params:>7.1f} {gpus:>5} {tp:>3} {pp:>3} {dp:>3} {mb:>3} {v:>2} | {published:>9.0f} {predicted:>9.1f} {100 * err:>+6.1f}% "
              f"{'yes' if est.fits else 'NO':>5} | {plan_step:>11} {est.step_time_s:>16.2f} {ratio:>14}  {plan_txt}", flush=True)
    within = sum(e <= 0.10 for e in errors)
    print(f"\n{within}/{len(errors)} rows within 10% of the published TFLOP/s; worst error {100 * max(errors):.1f}%")


if __name__ == "__main__":
    main()
