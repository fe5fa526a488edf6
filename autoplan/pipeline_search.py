"""Search over pipeline configurations (TP x PP x DP, micro-batch, interleaving, recompute).

Every candidate is priced by ``estimate`` (the same cost model as the per-op planner, with
Megatron-style tensor parallelism inside each stage); the per-layer pricing is shared between
candidates that differ only in their pipeline shape. Candidates whose parameters alone cannot
fit (a cheap lower bound) are skipped. Returns the fastest candidate that fits.
"""
from __future__ import annotations

from dataclasses import replace

from autoplan.cost.model import STATE_BYTES_PER_PARAM
from autoplan.errors import AutoplanError
from autoplan.estimate import Estimate, EstimateConfig, estimate
from autoplan.mesh import divisors
from autoplan.planner import Job


def pipeline_candidates(job: Job, *, max_micro_batch: int = 8, max_stages: int = 64, virtual: tuple[int, ...] = (1, 2, 4)):
    layers = job.tying.groups[0][1] if job.tying.groups else 1
    budget = job.cluster.device.usable_memory_bytes
    state_bytes = job.graph.num_params() * STATE_BYTES_PER_PARAM
    for tp in divisors(job.cluster.devices_per_node):
        if job.devices % tp:
            continue
        for pp in divisors(job.devices // tp):  # stages may differ by one layer (as Llama 3's 126 layers on 16 stages)
            if pp > min(max_stages, layers):
                continue
            dp = job.devices // (tp * pp)
            if job.global_batch % dp or state_bytes / (tp * pp) > budget:
                continue
            for mb in (1, 2, 4, 8, 16):
                if mb > max_micro_batch or (job.global_batch // dp) % mb:
                    continue
                for v in virtual:
                    if v > 1 and (pp == 1 or pp * v > layers):
                        continue
                    for rc in ("none", "full"):
                        yield EstimateConfig(tp=tp, pp=pp, dp=dp, virtual_stages=v, micro_batch=mb, recompute=rc)


def search_pipeline(job: Job, *, dtype: str = "bf16", attention: str = "flash", **limits) -> tuple[EstimateConfig, Estimate, int]:
    """(best config, its estimate, candidates priced); AutoplanError if none fits."""
    cache: dict = {}
    best: tuple[EstimateConfig, Estimate] | None = None
    n = 0
    for cfg in pipeline_candidates(job, **limits):
        cfg = replace(cfg, dtype=dtype, attention=attention)
        est = estimate(job, cfg, cache)
        n += 1
        if est.fits and (best is None or est.step_time_s < best[1].step_time_s):
            best = (cfg, est)
    if best is None:
        raise AutoplanError(f"no pipeline configuration of {job.model_name} fits on {job.devices} devices: add devices")
    return best[0], best[1], n
