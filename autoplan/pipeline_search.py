"""Search over pipeline configurations (TP x PP x DP, micro-batch, interleaving, recompute, ZeRO-1, SP).

Every candidate is priced by ``estimate`` (the same cost model as the per-op planner, with
Megatron-style tensor parallelism inside each stage); the per-layer pricing is shared between
candidates that differ only in their pipeline shape. Candidates whose parameters alone cannot
fit (a cheap lower bound) are skipped. Returns the fastest candidate that fits.
"""
from __future__ import annotations

from dataclasses import replace

from autoplan.cost.model import STATE_BYTES_PER_PARAM
from autoplan.errors import AutoplanError
from autoplan.estimate import OPTIMIZER_STATE_BYTES, Estimate, EstimateConfig, estimate
from autoplan.mesh import divisors
from autoplan.planner import Job


def pipeline_candidates(job: Job, *, max_micro_batch: int = 8, max_stages: int = 64, virtual: tuple[int, ...] = (1, 2, 4),
                        zero: tuple[int, ...] = (0, 1), sequence_parallel: tuple[bool, ...] = (False, True)):
    """Every configuration the search prices. ZeRO-1 (the distributed optimizer) and sequence
    parallelism are searched with the rest; ZeRO-3 is priced by ``autoplan estimate`` and the
    per-op search (FSDP), not here."""
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
            sharded = OPTIMIZER_STATE_BYTES * (1 - 1 / dp) if dp > 1 and any(zero) else 0.0
            if job.global_batch % dp or state_bytes * (1 - sharded / STATE_BYTES_PER_PARAM) / (tp * pp) > budget:
                continue
            for mb in (1, 2, 4, 8, 16):
                if mb > max_micro_batch or (job.global_batch // dp) % mb:
                    continue
                m = job.global_batch // (dp * mb)
                if pp > 1 and m < pp:
                    continue  # 1F1B needs at least one micro-batch per stage (torch.distributed.pipelining does)
                for v in virtual:
                    if v > 1 and (pp == 1 or pp * v > layers or m % pp):
                        continue  # interleaving: micro-batches in groups of pp (as Megatron-LM requires)
                    for rc in ("none", "full"):
                        for z in zero if dp > 1 else (0,):
                            for sp in sequence_parallel if tp > 1 else (False,):
                                yield EstimateConfig(tp=tp, pp=pp, dp=dp, virtual_stages=v, micro_batch=mb, recompute=rc,
                                                     zero=z, sequence_parallel=sp)


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
