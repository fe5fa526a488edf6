"""Cost of one training step (forward, backward, optimizer) per device, as a solver Problem.

For a mesh and the outer choices (micro-batches, recompute, dtype) every op gets an array of
costs, one per strategy, and every producer->consumer edge a matrix of resharding costs:

* compute: roofline of the op's local work, max(FLOPs / (peak * matmul_efficiency),
  bytes / (HBM bandwidth * memory_efficiency)); backward is 2x forward; full recompute of a
  block adds one forward.
* communication on edges: forward resharding of the activation, plus the backward resharding
  of its gradient (see ``strategies.expand`` for gradient placements). On a parameter edge this
  is the gradient synchronisation (all-reduce for replicated weights, once per step thanks to
  no_sync; reduce-scatter for sharded ones, per micro-batch) and the FSDP all-gathers (per
  micro-batch, again in backward after resharding).
* optimizer: AdamW streams ``OPTIMIZER_BYTES_PER_PARAM`` per local parameter through HBM.
* memory: parameters, gradients and optimizer states (``STATE_BYTES_PER_PARAM``) of the local
  shard, plus saved activations: the local output of every op whose output autograd keeps for backward
  (read by its own or a consumer's backward: ``graph.saved_fraction``), for one micro-batch.

Repeated blocks are tied (``repeats.Tying``): each term is counted once per copy.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch

from autoplan.cost.comm import BUCKET_BYTES, Bucket, Collective, dual, seconds, transition
from autoplan.graph import ALIAS_KINDS, OpGraph, OpNode, forward_flops, needs_value_in_backward, saved_fraction
from autoplan.hardware import Cluster
from autoplan.mesh import Mesh
from autoplan.repeats import Tying
from autoplan.solve import Problem
from autoplan.strategies.expand import Strategy, expand
from autoplan.strategies.placement import Placements, Replicate, Shard
from autoplan.ops import RuleCtx

STATE_BYTES_PER_PARAM = 16  # bf16 weight (2) + bf16 grad (2) + fp32 master, Adam m, v (12); fp32: 4+4+8 (ZeRO paper, sec. 3.1)
OPTIMIZER_BYTES_PER_PARAM = 32  # AdamW step reads grad, master, m, v, writes master, m, v, weight
BACKWARD_FACTOR = 2.0  # backward FLOPs and bytes per forward ones
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass(frozen=True)
class StepConfig:
    global_batch: int  # samples per optimizer step
    micro_batches: int  # gradient-accumulation steps per optimizer step
    recompute: bool  # full activation recompute of every repeated block
    dtype: str  # compute dtype: bf16 | fp16 | fp32
    reshard_after_forward: bool = True  # FSDP gathers a sharded parameter again for backward (ZeRO-3; not ZeRO-2)

    @property
    def micro_batch(self) -> int:
        return self.global_batch // self.micro_batches


@dataclass
class Priced:
    """A Problem plus what is needed to explain a solution of it."""

    problem: Problem
    nodes: list[str]  # representative node per problem index
    strategies: list[list[Strategy]]
    compute_s: list[np.ndarray]  # per node, per strategy
    optimizer_s: list[np.ndarray]
    param_bytes: list[np.ndarray]
    activation_bytes: list[np.ndarray]
    edge_info: list[tuple[int, int, int, np.ndarray, np.ndarray]]  # (u, v, input index, activation-comm matrix, grad-sync matrix)
    own_comm_s: list[np.ndarray] = field(default_factory=list)  # per node, per strategy: collectives the op issues itself
    collectives: dict[tuple[int, int, int], object] = field(default_factory=dict)


def elem_bytes(node: OpNode, dtype: str) -> int:
    if node.out.is_float:
        return DTYPE_BYTES[dtype]
    return torch.empty((), dtype=node.out.dtype).element_size()


def _local_numel(shape: tuple[int, ...], placements: Placements, mesh_shape: tuple[int, ...]) -> float:
    n = float(math.prod(shape))
    for p, size in zip(placements, mesh_shape):
        if isinstance(p, Shard):
            n /= size
    return n


@lru_cache(maxsize=1 << 16)
def _strategies_cached(kind: str, target: str, in_shapes, in_dtypes, out_shape, attrs_key, mesh_shape, differentiable):
    ctx = RuleCtx(in_shapes, in_dtypes, out_shape, dict(attrs_key), target)
    return tuple(expand(ctx, kind, mesh_shape, differentiable=differentiable))


def _attrs_key(attrs: dict) -> tuple:
    items = []
    for k, v in sorted(attrs.items()):
        try:
            hash(v)
            items.append((k, v))
        except TypeError:
            items.append((k, tuple(v) if isinstance(v, list) else repr(v)))
    return tuple(items)


def differentiable(node: OpNode) -> bool:
    return node.out.is_float and node.kind not in ("input", "buffer", "constant") and not node.constant


def node_strategies(graph: OpGraph, node: OpNode, mesh: Mesh, batch: int) -> tuple[Strategy, ...]:
    ins = [graph.nodes[i] for i in node.inputs]
    return _strategies_cached(
        node.kind,
        node.target,
        tuple(i.out.shape(batch) for i in ins),
        tuple(i.out.dtype for i in ins),
        node.out.shape(batch),
        _attrs_key(node.attrs),
        mesh.shape,
        tuple(differentiable(i) for i in ins),
    )


UNFUSED_SCORE_PASSES = 7  # unfused attention moves the (B, H, T, S) scores through HBM this many times in forward:
# QK^T writes them (1), the fused scale-mask-softmax reads and writes (2), dropout reads, writes and
# stores its mask (3), AV reads them (1) -- the kernel sequence of Megatron-LM before FlashAttention


def _compute_seconds(graph: OpGraph, node: OpNode, batch: int, cluster: Cluster, dtype: str, attention: str = "flash") -> float:
    """Forward time of the whole (unsharded) op; divided by the strategy's compute divisor.

    ``attention``: "flash" (fused kernel: scores never leave on-chip memory) or "unfused"
    (scores materialised: the matmuls, then memory-bound passes over the scores).
    """
    if node.kind in ALIAS_KINDS:
        return 0.0
    dev = cluster.device
    flops = forward_flops(graph, node, batch)
    nbytes = sum(graph.nodes[i].out.numel(batch) * elem_bytes(graph.nodes[i], dtype) for i in node.inputs)
    nbytes += node.out.numel(batch) * elem_bytes(node, dtype)
    t_flops = flops / (dev.flops_per_s(dtype) * dev.matmul_efficiency)
    bandwidth = dev.memory_bandwidth_bytes_per_s * dev.memory_efficiency
    t_bytes = nbytes / bandwidth
    if dev.measured is not None:  # measured: (issue #5) curves from `autoplan profile` replace the roofline's rates
        t_mm, t_mem = dev.measured.matmul_seconds(dtype, flops), dev.measured.memory_seconds(nbytes)
        if node.kind == "sdpa" and attention == "flash":  # the fused kernel's own measured rate, if profiled
            t_mm = dev.measured.attention_seconds(dtype, flops) or t_mm
        t_flops = t_flops if t_mm is None or flops <= 0 else t_mm
        if t_mem is not None and nbytes > 0:
            t_bytes, bandwidth = t_mem, nbytes / t_mem
    if node.kind == "sdpa" and attention == "unfused":
        q, k = (graph.nodes[i].out.shape(batch) for i in node.inputs[:2])
        scores = math.prod(q[:-1]) * k[-2] * DTYPE_BYTES.get(dtype, 2)
        return t_flops + UNFUSED_SCORE_PASSES * scores / bandwidth
    return max(t_flops, t_bytes)


GENERIC_BATCH = 720720 * 1024  # divisible by every mesh size up to 16384 and by 3, 5, 7, 9, 11, 13


@dataclass(frozen=True)
class Linear:
    """A cost that is affine in the micro-batch: value(b) = slope * b + intercept (arrays)."""

    slope: np.ndarray
    intercept: np.ndarray

    def at(self, batch: int) -> np.ndarray:
        return self.slope * batch + self.intercept


class Exact:
    """A cost evaluated at each micro-batch it is asked for (measured curves are not affine)."""

    def __init__(self, f):
        self._f = f
        self._memo: dict[int, np.ndarray] = {}

    def at(self, batch: int) -> np.ndarray:
        if batch not in self._memo:
            self._memo[batch] = np.asarray(self._f(batch), dtype=np.float64)
        return self._memo[batch]


def _fit(f, exact: bool = False, batch_free: bool = False) -> Linear | Exact:
    """Fit f(batch) (bytes and FLOPs are proportional to the batch, latencies constant) from two points.

    ``exact``: evaluate f at every micro-batch instead (profiles with measured, non-affine curves).
    """
    if exact:
        return Exact(f)
    g = GENERIC_BATCH
    if batch_free:  # nothing grows with the batch (parameter edges): one evaluation
        v = np.asarray(f(g), dtype=np.float64)
        return Linear(np.zeros_like(v), v)
    v1, v2 = np.asarray(f(g), dtype=np.float64), np.asarray(f(2 * g), dtype=np.float64)
    slope = (v2 - v1) / g
    return Linear(slope, v1 - slope * g)


@dataclass
class EdgeTerms:
    u: int
    v: int
    pos: int  # input position at the consumer
    weight: int  # number of graph edges this tied edge stands for
    param: bool  # the producer is a parameter
    consumers: int  # ops that read the producer (parameters: their gradient is reduced once)
    redo: bool  # consumer is in a recomputed block (its forward resharding runs twice)
    regather: bool  # a sharded parameter is gathered again in backward (its consumer's backward reads it)
    fwd: Linear | Exact  # (k_u, k_v) matrices, seconds per micro-batch
    bwd: Linear | Exact
    bwd_reduce: Linear | Exact  # the all-reduce part of bwd


@dataclass
class MeshPricing:
    """Everything about one mesh that does not depend on micro-batches or recompute."""

    mesh: Mesh
    reps: list[str]
    strategies: list[tuple[Strategy, ...]]
    fwd_compute: list[Linear | Exact]  # forward compute seconds per strategy (divided by its compute divisor)
    internal: list[Linear | Exact]  # forward collectives the op issues itself (re-issued when recomputed)
    internal_bwd: list[Linear | Exact]  # backward collectives the op issues itself (a synchronised batch norm's)
    optimizer_s: list[np.ndarray]
    param_bytes: list[np.ndarray]
    act_bytes: list[Linear | Exact]
    batch_constraints: list[list[tuple[tuple[int, int], ...]]]  # per strategy: (base, factor) of each sharded batch dim
    edges: list[EdgeTerms]


def _batch_constraints(shapes_nodes: list[OpNode], placements: list[Placements], mesh_shape) -> tuple[tuple[int, int], ...]:
    out = []
    for node, pl in zip(shapes_nodes, placements):
        for d in node.out.batch_dims:
            factor = 1
            for p, size in zip(pl, mesh_shape):
                if isinstance(p, Shard) and p.dim == d:
                    factor *= size
            if factor > 1:
                out.append((node.out.base[d], factor))
    return tuple(out)


def price_mesh(graph: OpGraph, tying: Tying, mesh: Mesh, cluster: Cluster, dtype: str, recompute_blocks: bool = True,
               attention: str = "flash") -> MeshPricing:
    links = mesh.links(cluster)
    reps = [n for n in graph.nodes if tying.rep[n] == n]
    index = {n: i for i, n in enumerate(reps)}
    dev = cluster.device
    mp = MeshPricing(mesh, reps, [], [], [], [], [], [], [], [], [])
    pinned = graph.constant_derived()
    # measured curves (autoplan profile) are not affine in the batch: price each micro-batch exactly
    exact = getattr(cluster.device, "measured", None) is not None or any(getattr(l, "measured", None) is not None for l in links)
    for name in reps:
        node = graph.nodes[name]
        strats = node_strategies(graph, node, mesh, GENERIC_BATCH)
        if name in pinned:
            strats = tuple(s for s in strats if all(isinstance(p, Replicate) for p in s.out)) or strats
        mp.strategies.append(strats)
        divs = np.array([s.compute_divisor for s in strats], dtype=np.float64)
        mp.fwd_compute.append(_fit(lambda b, node=node, divs=divs: _compute_seconds(graph, node, b, cluster, dtype, attention) / divs, exact))
        shapes = [node] + [graph.nodes[i] for i in node.inputs]

        def internal(b, strats=strats, phase="forward"):
            scale = b / GENERIC_BATCH  # collectives the op issues are sized by its (batch-proportional) rows
            return np.array([
                seconds(tuple(Collective(k, a, nb * scale if grows else nb) for k, a, nb, grows, ph in s.comm
                              if ph == phase), mesh.shape, links) for s in strats
            ])

        mp.internal.append(_fit(internal, exact))
        mp.internal_bwd.append(_fit(lambda b, strats=strats: internal(b, strats, "backward"), exact))
        eb = elem_bytes(node, dtype)
        local1 = np.array([_local_numel(node.out.shape(1), s.out, mesh.shape) for s in strats])
        if node.kind == "param":
            mp.param_bytes.append(local1 * STATE_BYTES_PER_PARAM)
            per_tensor = np.array([dev.optimizer_dtensor_s if any(isinstance(p, Shard) for p in s.out)
                                   else dev.optimizer_tensor_s for s in strats])  # a sharded parameter is a DTensor
            mp.optimizer_s.append(local1 * OPTIMIZER_BYTES_PER_PARAM / (dev.memory_bandwidth_bytes_per_s * dev.memory_efficiency)
                                  + per_tensor)
        elif node.kind == "buffer":
            mp.param_bytes.append(local1 * eb)
            mp.optimizer_s.append(np.zeros(len(strats)))
        else:
            mp.param_bytes.append(np.zeros(len(strats)))
            mp.optimizer_s.append(np.zeros(len(strats)))
        # what autograd keeps for backward: an output read by its own or a consumer's backward
        saves = 1.0 if node.kind == "input" else 0.0 if node.kind in ALIAS_KINDS else saved_fraction(graph, name, eb)
        mp.act_bytes.append(_fit(lambda b, strats=strats, node=node, eb=eb, saves=saves: np.array([
            _local_numel(node.out.shape(b), s.out, mesh.shape) * eb * saves for s in strats
        ])))
        mp.batch_constraints.append([_batch_constraints(shapes, [s.out, *s.ins], mesh.shape) for s in strats])
    weights: dict[tuple[str, str, int], int] = defaultdict(int)
    for u, v, data in graph.dag.edges(data=True):
        weights[(tying.rep[u], tying.rep[v], data["index"])] += 1
    memo: dict = {}
    buckets = param_buckets(graph, tying, dtype)
    for (ru, rv, pos), w in weights.items():
        u, v = graph.nodes[ru], graph.nodes[rv]
        su, sv = mp.strategies[index[ru]], mp.strategies[index[rv]]
        fwd, bwd, red = _edge_terms(u, pos, su, sv, mesh, links, dtype, exact, memo, buckets.get(ru))
        consumers = graph.dag.out_degree(ru) if u.kind == "param" else 1
        mp.edges.append(EdgeTerms(index[ru], index[rv], pos, w, u.kind == "param", consumers,
                                  recompute_blocks and rv in tying.in_block, needs_value_in_backward(v, pos), fwd, bwd, red))
    return mp


def param_buckets(graph: OpGraph, tying: Tying, dtype: str) -> dict[str, Bucket]:
    """Each parameter's collective grouping: DDP's 25 MiB gradient buckets (one bucket of the model's
    size when it is smaller), and as FSDP unit the parameters of one repeated block (for a parameter
    inside the blocks) or all the parameters outside them (the root unit)."""
    sizes = {n: math.prod(node.out.shape(1)) * elem_bytes(node, dtype)
             for n, node in graph.nodes.items() if node.kind == "param" and tying.rep[n] == n}
    block = sum(b for n, b in sizes.items() if n in tying.in_block)
    root = sum(b for n, b in sizes.items() if n not in tying.in_block)
    # a model smaller than one DDP bucket fills one bucket of its own size
    total = sum(b * (tying.count[n] if n in tying.in_block else 1) for n, b in sizes.items())
    grads = max(min(BUCKET_BYTES, total), 1.0)
    return {n: Bucket(grads=grads, unit=max(block if n in tying.in_block else root, 1.0)) for n in sizes}


def _legal(constraints: list[tuple[tuple[int, int], ...]], batch: int) -> np.ndarray:
    return np.array([all((base * batch) % f == 0 for base, f in c) for c in constraints])


def assemble(mp: MeshPricing, tying: Tying, cfg: StepConfig, mem_budget: float | None) -> Priced:
    """The solver Problem of one configuration, from a mesh's prices (numpy arithmetic only)."""
    b, m = cfg.micro_batch, cfg.micro_batches
    node_cost, node_mem, compute_l, opt_l, pb_l, ab_l, own_l = [], [], [], [], [], [], []
    for i, name in enumerate(mp.reps):
        count = tying.count[name]
        in_block = name in tying.in_block
        redo = 1 if (cfg.recompute and in_block) else 0
        comp = count * m * (1 + BACKWARD_FACTOR + redo) * mp.fwd_compute[i].at(b)
        comp = np.where(_legal(mp.batch_constraints[i], b), comp, np.inf)
        own = count * m * ((1 + redo) * mp.internal[i].at(b) + mp.internal_bwd[i].at(b))  # the op's own collectives
        keep = count if not (cfg.recompute and in_block) else (count if name in tying.boundary else 1)
        act = keep * mp.act_bytes[i].at(b)
        params = count * mp.param_bytes[i]
        opt = count * mp.optimizer_s[i]
        compute_l.append(comp)
        own_l.append(own)
        opt_l.append(opt)
        pb_l.append(params)
        ab_l.append(act)
        node_cost.append(comp + own + opt)
        node_mem.append(params + act)
    edges, edge_info = [], []
    for e in mp.edges:
        fwd, bwd = e.fwd.at(b), e.bwd.at(b)
        if e.param:
            red = e.bwd_reduce.at(b)
            act = np.zeros_like(fwd)
            # FSDP: forward, and again in backward after resharding (ZeRO-3; ZeRO-2 keeps the gathered weight)
            gathers = (2 if e.regather and cfg.reshard_after_forward else 1) * fwd
            # a tied weight's all-reduced gradient is summed locally and reduced once; sharded ones per edge
            sync = e.weight * (m * gathers + red / e.consumers + m * (bwd - red))
        else:
            redo = 1 if (cfg.recompute and e.redo) else 0
            act = e.weight * m * ((1 + redo) * fwd + bwd)
            sync = np.zeros_like(fwd)
        mat = act + sync
        if e.u == e.v:  # a block's output feeding its own copy in the next block
            node_cost[e.u] = node_cost[e.u] + np.diag(mat)
        else:
            edges.append((e.u, e.v, mat))
        edge_info.append((e.u, e.v, e.pos, act, sync))
    problem = Problem(tuple(node_cost), tuple(node_mem), tuple(edges), mem_budget=mem_budget)
    return Priced(problem, mp.reps, [list(s) for s in mp.strategies], compute_l, opt_l, pb_l, ab_l, edge_info, own_l)


def price(graph: OpGraph, tying: Tying, mesh: Mesh, cluster: Cluster, cfg: StepConfig, mem_budget: float | None) -> Priced:
    """Build the solver Problem for one mesh and one set of outer choices."""
    return assemble(price_mesh(graph, tying, mesh, cluster, cfg.dtype), tying, cfg, mem_budget)


@lru_cache(maxsize=1 << 18)
def _move_seconds(shape, eb, src, dst, mesh_shape, links, bucket=None) -> tuple[float, float]:
    """(seconds of all collectives, seconds of the all-reduces among them) to move src -> dst.

    ``bucket``: parameters' gathers and gradients' reductions are bucketed (``comm.Bucket``)."""
    colls = transition(shape, eb, src, dst, mesh_shape)
    total = seconds(colls, mesh_shape, links, bucket)
    reduce = seconds(tuple(c for c in colls if c.kind == "all_reduce"), mesh_shape, links, bucket)
    return total, reduce


def _unique(items: list) -> tuple[list, np.ndarray]:
    pos: dict = {}
    idx = np.array([pos.setdefault(x, len(pos)) for x in items], dtype=np.int64)
    return list(pos), idx


def _edge_terms(u: OpNode, pos: int, su, sv, mesh: Mesh, links, dtype: str, exact: bool = False,
                memo: dict | None = None, bucket: Bucket | None = None) -> tuple:
    """Forward resharding, backward gradient resharding and its all-reduce part, per strategy pair.

    ``memo`` (shared across a mesh's edges) maps placements to small ints and caches moves by
    (shape, ids): hashing placement tuples in the inner loop dominated pricing time.
    """
    memo = {} if memo is None else memo
    ids = memo.setdefault("ids", {})
    moves = memo.setdefault("moves", {})
    eb = elem_bytes(u, dtype)
    grads = differentiable(u)
    outs, ui = _unique([sa.out for sa in su])
    needs, vi = _unique([(sb.ins[pos], sb.grads[pos]) for sb in sv])
    out_ids = [ids.setdefault(o, len(ids)) for o in outs]
    back_ids = [ids.setdefault(dual(o), len(ids)) for o in outs]
    need_ids = [ids.setdefault(n, len(ids)) for n, _ in needs]
    grad_ids = [ids.setdefault(g, len(ids)) for _, g in needs]
    by_id = {i: p for p, i in ids.items()}
    bucket = (bucket or Bucket()) if u.kind == "param" else None

    def move(shape, src: int, dst: int) -> tuple[float, float]:
        key = (shape, eb, src, dst, bucket)
        if key not in moves:
            moves[key] = _move_seconds(shape, eb, by_id[src], by_id[dst], mesh.shape, links, bucket)
        return moves[key]

    tables = memo.setdefault("tables", {})  # edges alike in shape and placements share their tables

    def matrices(b: int) -> np.ndarray:
        shape = u.out.shape(b)
        key = (shape, eb, grads, bucket, tuple(out_ids), tuple(back_ids), tuple(need_ids), tuple(grad_ids))
        if key not in tables:
            tables[key] = unique_matrices(shape)
        return tables[key][:, ui][:, :, vi]

    def unique_matrices(shape: tuple[int, ...]) -> np.ndarray:
        res = np.zeros((3, len(outs), len(needs)))
        for a in range(len(outs)):
            o, back = out_ids[a], back_ids[a]
            for k in range(len(needs)):
                res[0, a, k] = move(shape, o, need_ids[k])[0]
                if grads:
                    res[1, a, k], res[2, a, k] = move(shape, grad_ids[k], back)
        return res

    fit = _fit(matrices, exact, batch_free=not u.out.batch_dims)
    if isinstance(fit, Exact):
        return tuple(Exact(lambda b, i=i: fit.at(b)[i]) for i in range(3))  # type: ignore[return-value]
    return tuple(Linear(fit.slope[i], fit.intercept[i]) for i in range(3))  # type: ignore[return-value]


def edge_collectives(u: OpNode, sa: Strategy, sb: Strategy, pos: int, batch: int, mesh: Mesh, dtype: str):
    """(forward collectives, backward collectives) of one edge under chosen strategies."""
    shape = u.out.shape(batch)
    eb = elem_bytes(u, dtype)
    fwd = transition(shape, eb, sa.out, sb.ins[pos], mesh.shape)
    bwd = transition(shape, eb, sb.grads[pos], dual(sa.out), mesh.shape) if differentiable(u) else ()
    return fwd, bwd
