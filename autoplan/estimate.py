"""What-if: price one fixed configuration (TP x PP x DP, micro-batch, recompute, ZeRO, SP).

The per-layer costs come from the same cost model as the planner: the model is priced on a
(dp, tp) mesh with Megatron-style tensor parallelism on the inner axis (the solver picks the
column/row split, as Megatron does), for one micro-batch. The pipeline is assembled around them:

* 1F1B: ``(m + p - 1) * t_stage``; interleaved 1F1B with ``v`` virtual stages:
  ``m * t_stage + (p - 1) / v * t_stage`` (Narayanan et al. 2021, sec. 2.2), ``m`` micro-batches
  per pipeline, ``t_stage`` the forward+backward time of the slowest stage for one micro-batch,
  including its point-to-point activation transfers (``v`` times more with interleaving);
* data-parallel gradient reduction and the optimizer step once per step, per stage;
* memory of the first stage, which holds ``min(m, p)`` micro-batches of activations in 1F1B
  (times ``1 + (p - 1) / (p v)`` when interleaved).

ZeRO-1/2 shard optimizer states (and gradients) over the data-parallel axis; ZeRO-3 shards the
parameters too (all-gathered per micro-batch). Sequence parallelism splits norms and dropouts
along the sequence inside the tensor-parallel group.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np

from autoplan.baselines import allow_for, family_masks

from autoplan.cost.comm import Bucket, collective_seconds, loss_report_seconds
from autoplan.cost.model import STATE_BYTES_PER_PARAM, DTYPE_BYTES, StepConfig, assemble, price_mesh
from autoplan.errors import AutoplanError
from autoplan.graph import OpNode, forward_flops
from autoplan.mesh import Mesh
from autoplan.planner import Job
from autoplan.solve import Problem
from autoplan.solve.reduce import solve_reduced
from autoplan.strategies import Replicate, Shard
from autoplan.strategies.expand import Strategy

OPTIMIZER_STATE_BYTES = 12  # fp32 master weight, Adam m and v (of STATE_BYTES_PER_PARAM)
GRAD_BYTES = 2


@dataclass(frozen=True)
class EstimateConfig:
    tp: int = 1  # tensor-parallel size (inside a node)
    pp: int = 1  # pipeline stages
    dp: int = 1  # data-parallel size
    virtual_stages: int = 1  # interleaved 1F1B model chunks per device (1 = plain 1F1B)
    micro_batch: int = 1  # samples per micro-batch per data-parallel rank
    recompute: str = "none"  # none | selective (attention core) | full (every block)
    sequence_parallel: bool = False  # split norms/dropouts along the sequence over tp
    zero: int = 0  # 0 (DDP), 1 (optimizer states), 2 (+ gradients), 3 (+ parameters: FSDP)
    dtype: str = "bf16"
    attention: str = "flash"  # flash (fused) | unfused (scores materialised, as Megatron-LM in 2021)


@dataclass(frozen=True)
class Estimate:
    step_time_s: float
    compute_s: float  # per step, slowest stage, including recompute
    comm_s: float  # tensor-parallel + pipeline p2p + data-parallel reduction, slowest stage; the loss report
    bubble_s: float  # pipeline bubble
    optimizer_s: float
    peak_memory_bytes: float  # first stage
    fits: bool
    mfu: float
    tokens_per_s: float | None
    model_tflops_per_device: float  # no recompute counted (the MFU convention)
    hardware_tflops_per_device: float  # recompute counted (as Megatron-LM reports)
    micro_batches: int  # per pipeline, per step
    mesh: dict[str, int]
    param_memory_bytes: float = 0.0  # parameters, gradients, optimizer states (fullest stage)
    activation_memory_bytes: float = 0.0  # activations held at the peak (fullest stage)

    def to_json(self) -> dict:
        return asdict(self)


def _check(cfg: EstimateConfig, job: Job, layers: int) -> int:
    if cfg.tp * cfg.pp * cfg.dp != job.devices:
        raise AutoplanError(f"tp({cfg.tp}) * pp({cfg.pp}) * dp({cfg.dp}) = {cfg.tp * cfg.pp * cfg.dp} != devices({job.devices})")
    if cfg.tp > job.cluster.devices_per_node:
        raise AutoplanError(f"tp({cfg.tp}) > devices per node({job.cluster.devices_per_node}): keep tensor parallel inside a node")
    if cfg.pp * cfg.virtual_stages > layers:
        raise AutoplanError(f"pp({cfg.pp}) * virtual stages({cfg.virtual_stages}) > layers({layers}): use fewer stages")
    per_step = cfg.dp * cfg.micro_batch
    if job.global_batch % per_step:
        raise AutoplanError(f"global batch {job.global_batch} is not a multiple of dp({cfg.dp}) * micro-batch({cfg.micro_batch})")
    if cfg.recompute not in ("none", "selective", "full"):
        raise AutoplanError(f"recompute {cfg.recompute!r}: use none, selective or full")
    if cfg.zero not in (0, 1, 2, 3):
        raise AutoplanError(f"zero stage {cfg.zero}: use 0, 1, 2 or 3")
    return job.global_batch // per_step


def _allow(cfg: EstimateConfig, mesh: Mesh):
    megatron = allow_for("megatron", mesh)
    fsdp_dim0 = cfg.zero >= 2  # ZeRO-2 and 3 run on FSDP: parameters sharded on dp between uses

    def allow(node: OpNode, s: Strategy) -> bool:
        if node.kind == "param" and fsdp_dim0 and cfg.dp > 1:
            tp_ok = isinstance(s.out[1], Shard) or len(node.out.base) < 2
            dp_p = s.out[0]
            return tp_ok and (isinstance(dp_p, Shard) or isinstance(dp_p, Replicate) and node.out.base[0] % cfg.dp)
        if not megatron(node, s):
            return False
        if node.kind in ("layer_norm", "rms_norm", "dropout") and len(node.out.base) == 3 and cfg.tp > 1:
            return s.out[1] == Shard(1) if cfg.sequence_parallel else isinstance(s.out[1], Replicate)
        return True

    return allow


@dataclass
class LayerCosts:
    """Per-micro-batch and per-step sums for one layer and for the ops before / after the blocks."""

    comp: dict[str, float]
    tp: dict[str, float]
    sync: dict[str, float]
    opt: dict[str, float]
    par: dict[str, float]
    act: dict[str, float]
    act_live: float


def layer_costs(job: Job, cfg: EstimateConfig, cache: dict | None = None) -> LayerCosts:
    """The expensive part of an estimate (pricing and solving the per-layer sharding); pipeline-independent."""
    cache = {} if cache is None else cache
    # ZeRO-1 changes memory, the optimizer's share and adds the weights' all-gather (in ``estimate``): priced as
    # ZeRO-0 here; ZeRO-2 and 3 are FSDP (sharded parameters), ZeRO-2 without the re-gather for backward
    key = ("layers", cfg.tp, cfg.dp, cfg.micro_batch, cfg.recompute, cfg.sequence_parallel, cfg.zero if cfg.zero >= 2 else 0,
           cfg.dtype, cfg.attention)
    if key in cache:
        return cache[key]
    mesh = Mesh((cfg.dp, cfg.tp), ("dp", "tp"))
    step_cfg = StepConfig(cfg.dp * cfg.micro_batch, 1, cfg.recompute == "full", cfg.dtype,
                          reshard_after_forward=cfg.zero == 3)
    mkey = ("mesh", mesh.shape, cfg.dtype, cfg.attention)
    if mkey not in cache:
        cache[mkey] = price_mesh(job.graph, job.tying, mesh, job.cluster, cfg.dtype, attention=cfg.attention)
    mp = cache[mkey]
    priced = assemble(mp, job.tying, step_cfg, None)
    allow = _allow(cfg, mesh)
    masks = family_masks(job.graph, mp.reps, mp.strategies, allow, strict=True)
    p = priced.problem
    costs = tuple(np.where(mask, c, np.inf) for c, mask in zip(p.node_cost, masks))
    choice = solve_reduced(Problem(costs, p.node_mem, p.edges)).choice

    in_block = [n in job.tying.in_block for n in priced.nodes]
    count = [job.tying.count[n] for n in priced.nodes]
    kinds = [job.graph.nodes[n].kind for n in priced.nodes]
    order = {n: k for k, n in enumerate(job.graph.nodes)}
    first_block = min((order[n] for n in job.tying.in_block), default=len(order))
    # where a non-block op runs: before the blocks -> first stage, after -> last stage
    side = ["layer" if in_block[i] else ("pre" if order[n] < first_block else "post") for i, n in enumerate(priced.nodes)]
    comp = {"layer": 0.0, "pre": 0.0, "post": 0.0}
    tp = dict(comp)
    sync = dict(comp)
    opt = dict(comp)
    par = dict(comp)
    act = dict(comp)
    act_live = 0.0
    for i, s in enumerate(choice):
        k = side[i]
        per = count[i] if k == "layer" else 1
        c, o = float(priced.compute_s[i][s]), float(priced.optimizer_s[i][s])
        pb, ab = float(priced.param_bytes[i][s]), float(priced.activation_bytes[i][s])
        if cfg.recompute == "selective" and kinds[i] == "sdpa":
            c *= 4 / 3  # the attention core runs forward once more in backward
            ab = 0.0  # and keeps nothing
        comp[k] += c / per
        tp[k] += float(priced.own_comm_s[i][s]) / per  # the op's own collectives (vocab-parallel loss, batch norm)
        opt[k] += o / per
        par[k] += pb / per
        if k == "layer" and cfg.recompute == "full" and priced.nodes[i] not in job.tying.boundary:
            act_live += ab  # one block's activations, live while it is recomputed
        else:
            act[k] += ab / per
    for u, v, _, a_mat, s_mat in priced.edge_info:  # activation comm goes with the consumer, gradient sync with the parameter
        tp[side[v]] += float(a_mat[choice[u], choice[v]]) / (count[v] if side[v] == "layer" else 1)
        sync[side[u]] += float(s_mat[choice[u], choice[v]]) / (count[u] if side[u] == "layer" else 1)

    cache[key] = LayerCosts(comp, tp, sync, opt, par, act, act_live)
    return cache[key]


def estimate(job: Job, cfg: EstimateConfig, cache: dict | None = None) -> Estimate:
    """Price ``cfg`` for ``job`` (a captured model on a cluster at a global batch)."""
    groups = job.tying.groups
    layers = groups[0][1] if groups else 1
    m = _check(cfg, job, layers)
    lc = layer_costs(job, cfg, cache)
    if cfg.zero == 2:  # FSDP's communication (no re-gather); memory and compute as replicated (scaled below)
        lc = replace(layer_costs(job, replace(cfg, zero=0), cache), sync=lc.sync)
    comp, tp, sync, opt, par, act, act_live = lc.comp, lc.tp, lc.sync, lc.opt, lc.par, lc.act, lc.act_live
    lps = -(-layers // cfg.pp)  # layers on the fullest stage (stages differ by at most one layer)
    dev = job.cluster
    seq = job.seq_len or 1
    eb = DTYPE_BYTES[cfg.dtype]
    p2p_bytes = cfg.micro_batch * seq * _hidden_size(job) * eb / (cfg.tp if cfg.sequence_parallel else 1)
    link = dev.inter_node if cfg.tp * cfg.dp >= dev.devices_per_node else dev.intra_node
    p2p = 0.0 if cfg.pp == 1 else 2 * cfg.virtual_stages * (p2p_bytes / link.effective_bytes_per_s + link.latency_s)
    layer_t = lps * (comp["layer"] + tp["layer"]) + p2p
    if cfg.pp == 1:
        stages = [layer_t + comp["pre"] + tp["pre"] + comp["post"] + tp["post"]]
        ends = [("pre", "post")]
    else:
        stages = [layer_t + comp["pre"] + tp["pre"], layer_t + comp["post"] + tp["post"]]
        ends = [("pre",), ("post",)]
    t_stage = max(stages)
    v = cfg.virtual_stages
    bubble = (cfg.pp - 1) / v * t_stage
    busy = m * t_stage
    zero_shards = cfg.zero in (1, 2) and cfg.dp > 1

    dp_link = dev.inter_node if cfg.tp * cfg.dp > dev.devices_per_node else dev.intra_node

    def stage_extra(parts: tuple[str, ...]) -> tuple[float, float, float, float]:
        s_sync = lps * sync["layer"] + sum(sync[k] for k in parts)
        s_opt = lps * opt["layer"] + sum(opt[k] for k in parts)
        s_par = lps * par["layer"] + sum(par[k] for k in parts)
        s_act = lps * act["layer"] + sum(act[k] for k in parts)
        if cfg.zero == 1 and cfg.dp > 1:
            # the runtime's ZeRO-1 all-reduces gradients (priced above) and then sends each updated
            # parameter from the rank that stepped it to the others: an all-gather of the weights
            weights = s_par / STATE_BYTES_PER_PARAM * eb
            s_sync += collective_seconds("all_gather", weights, cfg.dp, dp_link, Bucket(unit=weights))
        return s_sync, s_opt / (cfg.dp if zero_shards else 1), s_par, s_act

    extras = [stage_extra(e) for e in ends]
    sync_t = max(e[0] for e in extras)
    opt_t = max(e[1] for e in extras)
    report = loss_report_seconds(dev, job.devices)
    step = busy + bubble + sync_t + opt_t + report
    in_flight = min(m, cfg.pp) * ((1 + (cfg.pp - 1) / (cfg.pp * v)) if v > 1 else 1)
    peaks = []
    for _, _, s_par, s_act in extras:
        if zero_shards:
            sharded = OPTIMIZER_STATE_BYTES + (GRAD_BYTES if cfg.zero == 2 else 0)
            s_par *= (STATE_BYTES_PER_PARAM - sharded + sharded / cfg.dp) / STATE_BYTES_PER_PARAM
        peaks.append((s_par + in_flight * s_act + act_live, s_par))
    peak, peak_par = max(peaks)
    budget = dev.device.usable_memory_bytes

    fwd, sdpa_flops, block_flops = _flops(job, cache)
    redo_flops = {"none": 0.0, "selective": sdpa_flops, "full": block_flops}[cfg.recompute]
    model_flops = 3 * fwd
    hw_flops = model_flops + redo_flops
    peak_flops = dev.device.flops_per_s(cfg.dtype)
    return Estimate(
        step_time_s=step,
        compute_s=m * (lps * comp["layer"] + comp["pre"] + comp["post"]),
        comm_s=m * (lps * tp["layer"] + tp["pre"] + tp["post"] + p2p) + sync_t + report,
        bubble_s=bubble,
        optimizer_s=opt_t,
        peak_memory_bytes=peak,
        fits=peak <= budget,
        mfu=model_flops / (step * job.devices * peak_flops),
        tokens_per_s=job.global_batch * seq / step if job.seq_len else None,
        model_tflops_per_device=model_flops / (step * job.devices) / 1e12,
        hardware_tflops_per_device=hw_flops / (step * job.devices) / 1e12,
        micro_batches=m,
        mesh={"tp": cfg.tp, "pp": cfg.pp, "dp": cfg.dp},
        param_memory_bytes=peak_par,
        activation_memory_bytes=peak - peak_par,
    )


def _flops(job: Job, cache: dict | None) -> tuple[float, float, float]:
    """Forward FLOPs of one step: all ops, attention cores, ops inside the repeated blocks (cached)."""
    key = ("flops", job.global_batch)
    if cache is not None and key in cache:
        return cache[key]
    fwd = sdpa = block = 0.0
    for n in job.graph.nodes.values():
        f = forward_flops(job.graph, n, job.global_batch)
        fwd += f
        sdpa += f if n.kind == "sdpa" else 0.0
        block += f if job.tying.rep[n.name] in job.tying.in_block else 0.0
    if cache is not None:
        cache[key] = (fwd, sdpa, block)
    return fwd, sdpa, block


def _hidden_size(job: Job) -> int:
    """Width of the residual stream: the last dim of a block's output."""
    for name in job.tying.boundary:
        return job.graph.nodes[name].out.base[-1]
    loss_in = job.graph.producers(job.graph.loss)[0]
    return loss_in.out.base[-1]


__all__ = ["Estimate", "EstimateConfig", "estimate"]
