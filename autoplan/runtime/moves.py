"""Moving DTensors between the plan's placements, and the ops the runtime runs on local shards.

``move`` performs one planned transition, one mesh axis at a time in the cost model's order
(DTensor's ``redistribute`` per axis, an all-to-all DTensor lacks on CPU, and the local R|S -> P
that DTensor refuses); ``_Reshard`` is its autograd node (forward: the planned move; backward:
the gradient's way back). ``Trace`` labels the collectives issued with the edge they serve.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor import Partial as DPartial
from torch.distributed.tensor import Replicate as DReplicate
from torch.distributed.tensor import Shard as DShard
from torch.distributed.tensor.placement_types import Placement as DPlacement

from autoplan.errors import AutoplanError
from autoplan.strategies.placement import Partial, Shard, parse_placement

DPlacements = tuple[DPlacement, ...]


# ------------------------------------------------------------------------------ placements


def to_dtensor_placements(items: Sequence[str]) -> DPlacements:
    out: list[DPlacement] = []
    for text in items:
        p = parse_placement(text)
        out.append(DShard(p.dim) if isinstance(p, Shard) else DPartial() if isinstance(p, Partial) else DReplicate())
    return tuple(out)


def placement_str(p: DPlacement) -> str:
    if isinstance(p, DShard):
        return f"S({p.dim})"
    return "P" if p.is_partial() else "R"


def normalize(placements: Sequence[DPlacement], ndim: int) -> DPlacements:
    """Shard(-1) -> Shard(ndim - 1); every Partial flavour -> Partial() (for comparisons)."""
    out: list[DPlacement] = []
    for p in placements:
        if isinstance(p, DShard) and p.dim < 0:
            out.append(DShard(p.dim + ndim))
        elif p.is_partial():
            out.append(DPartial())
        else:
            out.append(p)
    return tuple(out)


def grad_dual(placements: DPlacements) -> DPlacements:
    """Gradient placement matching a value's: a Partial value has a replicated gradient."""
    return tuple(DReplicate() if p.is_partial() else p for p in placements)


# ------------------------------------------------------------------------------ tracing of what is issued


@dataclass
class Trace:
    """Labels the collectives issued by the runtime: (phase, src node, dst node) of the current move.

    ``members``: a bucketed gradient all-reduce's parameters, as (parameter node, consumer node
    or "*", bytes) each: the per-parameter all-reduces the plan lists, merged into this one.
    """

    label: tuple[str, str, str] | None = None
    records: list[dict[str, Any]] = field(default_factory=list)
    enabled: bool = False
    members: tuple[tuple[str, str, int], ...] | None = None

    @contextlib.contextmanager
    def scope(self, phase: str, src: str, dst: str,
              members: tuple[tuple[str, str, int], ...] | None = None) -> Iterator[None]:
        old, old_members = self.label, self.members
        self.label, self.members = (phase, src, dst), members
        try:
            yield
        finally:
            self.label, self.members = old, old_members


# ------------------------------------------------------------------------------ moving a DTensor


def _pad_to_partial(x: DTensor, axis: int) -> DTensor:
    """R or S(d) on ``axis`` -> Partial, locally: keep one copy (R) or zero-pad the shard (S)."""
    mesh = x.device_mesh
    cur = x.placements[axis]
    local = x.to_local()
    coord = mesh.get_local_rank(axis)
    if isinstance(cur, DShard):
        d = cur.dim
        later = [a for a in range(axis + 1, mesh.ndim) if isinstance(x.placements[a], DShard) and x.placements[a].dim == d]
        if later:
            raise AutoplanError(f"cannot turn S({d}) into P on mesh axis {axis}: dim {d} is also split by an inner axis")
        n = mesh.size(axis)
        shape = list(local.shape)
        shape[d] *= n
        padded = local.new_zeros(shape)
        padded.narrow(d, coord * local.shape[d], local.shape[d]).copy_(local)
        local = padded
    elif coord != 0:
        local = torch.zeros_like(local)
    placements = list(x.placements)
    placements[axis] = DPartial()
    return DTensor.from_local(local, mesh, placements, run_check=False, shape=x.shape, stride=x.stride())


# the order the cost model (``autoplan.cost.comm.transition``) moves mesh axes in: local chunks
# first (later collectives then move less), reductions before all-to-alls before gathers
_ORDER = {None: 0, "reduce_scatter": 1, "all_reduce": 2, "all_to_all": 3, "all_gather": 4}


def _axis_kind(src: DPlacement, dst: DPlacement) -> str | None:
    """The collective one mesh axis needs for src -> dst (None: nothing, or local)."""
    if src == dst or dst.is_partial() or isinstance(src, DReplicate):
        return None
    if src.is_partial():
        return "all_reduce" if isinstance(dst, DReplicate) else "reduce_scatter"
    return "all_gather" if isinstance(dst, DReplicate) else "all_to_all"


def _all_to_all(x: DTensor, axis: int, dst: DShard) -> DTensor | None:
    """S(c) -> S(d) on one mesh axis with one all-to-all (DTensor falls back to all-gather + chunk on
    CPU process groups). None (DTensor's way) when an inner axis also splits dim c or d (the pieces
    would not be contiguous) or the shards are uneven."""
    import torch.distributed._functional_collectives as funcol

    mesh = x.device_mesh
    c, d, n = x.placements[axis].dim % x.ndim, dst.dim, mesh.size(axis)
    split = {c: 1, d: 1}  # how many pieces dims c and d are cut into, before and after
    for a, p in enumerate(x.placements):
        if isinstance(p, DShard) and p.dim % x.ndim in (c, d):
            if a > axis:
                return None
            split[p.dim % x.ndim] *= mesh.size(a)
    split[d] *= n
    if x.shape[c] % split[c] or x.shape[d] % split[d]:
        return None
    local = x.to_local()
    parts = [p.contiguous() for p in local.chunk(n, dim=d)]
    send = torch.cat([p.reshape(-1) for p in parts])
    recv = funcol.wait_tensor(funcol.all_to_all_single(send, None, None, group=(mesh, axis)))
    out = torch.cat([r.view(parts[0].shape) for r in recv.chunk(n)], dim=c)
    placements = list(x.placements)
    placements[axis] = dst
    # ``out`` is contiguous: so is the global view (the source's strides may describe another layout,
    # e.g. attention's output, and a later .contiguous() would trust them and keep a strided local)
    return DTensor.from_local(out, mesh, placements, run_check=False, shape=x.shape, stride=_contiguous_strides(x.shape))


def _contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides, acc = [], 1
    for size in reversed(shape):
        strides.append(acc)
        acc *= max(int(size), 1)
    return tuple(reversed(strides))


def move(x: DTensor, dst: DPlacements) -> DTensor:
    """The planned transition src -> dst, one mesh axis at a time in the cost model's order (DTensor's
    own order can gather first and chunk after: more bytes than priced), then the local R|S -> P."""
    cur = normalize(x.placements, x.ndim)
    if cur == dst:
        return x
    order = sorted(range(len(dst)), key=lambda a: (_ORDER[_axis_kind(cur[a], dst[a])], a))
    state = list(cur)
    for axis in order:
        d = dst[axis]
        if state[axis] == d or d.is_partial():
            continue
        kind = _axis_kind(state[axis], d)
        state[axis] = d
        moved = _all_to_all(x, axis, d) if kind == "all_to_all" else None
        x = moved if moved is not None else x.redistribute(x.device_mesh, tuple(state))
    for axis, d in enumerate(dst):
        if d.is_partial() and not x.placements[axis].is_partial():
            x = _pad_to_partial(x, axis)
    return x


PARAM_GRAD: DPlacements = ()  # marker: the gradient of a parameter edge (placement decided in backward)


def param_grad_placements(param: DPlacements, g: DTensor) -> DPlacements:
    """A parameter's gradient keeps its sharding; on replicated axes a Partial gradient stays
    Partial (all-reduced once per step, in ``sync_grads``) and a replicated one stays replicated."""
    have = normalize(g.placements, g.ndim)
    return tuple(p if isinstance(p, DShard) else (DPartial() if h.is_partial() else DReplicate()) for p, h in zip(param, have))


class _Reshard(torch.autograd.Function):
    """Forward: move to the consumer's placement; backward: move the gradient to ``grad_dst``."""

    @staticmethod
    def forward(ctx: Any, x: DTensor, dst: DPlacements, grad_dst: DPlacements, trace: Trace, names: tuple[str, str]) -> DTensor:  # type: ignore[override]
        ctx.grad_dst, ctx.trace, ctx.names = grad_dst, trace, names
        ctx.param_placements = normalize(x.placements, x.ndim)
        with trace.scope("forward", *names):
            out = move(x, dst)
        return out if out is not x else x.view_as(x)

    @staticmethod
    def backward(ctx: Any, g: DTensor) -> tuple[Any, ...]:  # type: ignore[override]
        dst = ctx.grad_dst
        if dst is PARAM_GRAD:
            dst = param_grad_placements(ctx.param_placements, g)
        with ctx.trace.scope("backward", *ctx.names):
            return move(g, dst), None, None, None, None


def reshard(x: DTensor, dst: DPlacements, grad_dst: DPlacements, trace: Trace, names: tuple[str, str]) -> DTensor:
    if not x.requires_grad:
        with trace.scope("forward", *names):
            return move(x, dst)
    return _Reshard.apply(x, dst, grad_dst, trace, names)


def _gathers(src: DPlacements, dst: DPlacements) -> bool:
    """The move src -> dst gathers a sharded axis (FSDP-style parameter all-gather)."""
    return any(isinstance(a, DShard) and a != b and not b.is_partial() for a, b in zip(src, dst))


def replicate(t: torch.Tensor, mesh: DeviceMesh) -> DTensor:
    return DTensor.from_local(t, mesh, [DReplicate()] * mesh.ndim, run_check=False)


# ------------------------------------------------------------------------------ ops run on local shards


def _local_sdpa(args: list[Any], kwargs: dict[str, Any], out_pl: DPlacements) -> DTensor:
    """SDPA has no CPU DTensor strategy: with batch or heads split (or all replicated) it is local."""
    q = args[0]
    n = q.ndim
    for t in args[:3]:
        for p in t.placements:
            if isinstance(p, DShard) and normalize([p], n)[0].dim >= n - 2:
                raise AutoplanError("the plan splits attention along the sequence: not supported by the runtime yet")
    local_args = [a.to_local() if isinstance(a, DTensor) else a for a in args]
    local_kwargs = {k: (v.to_local() if isinstance(v, DTensor) else v) for k, v in kwargs.items()}
    out = F.scaled_dot_product_attention(*local_args, **local_kwargs)
    return DTensor.from_local(out, q.device_mesh, list(q.placements), run_check=False)


def _local_cross_entropy(args: list[Any], kwargs: dict[str, Any]) -> DTensor:
    """Mean cross-entropy on sharded logits over the targets that count (not ``ignore_index``): rows split
    (each rank a partial sum over its rows, divided by the number of counted targets, all-reduced over
    the row axes: one fp32, as the rule prices it) and/or the vocabulary split (Megatron's vocab-parallel
    loss: three all-reduces of one fp32 per row on each vocabulary axis; backward is local)."""
    import torch.distributed as dist

    logits, targets = args[0], args[1]
    rest = {k: v for k, v in kwargs.items() if k not in ("reduction", "ignore_index")}
    ignore = kwargs.get("ignore_index", -100)
    bad = [p for p in logits.placements if isinstance(p, DShard) and p.dim % logits.ndim not in (0, 1)]
    if kwargs.get("reduction", "mean") != "mean" or bad or logits.ndim != 2:
        raise AutoplanError("the plan splits cross-entropy other than by rows or by the vocabulary: "
                            "not supported by the runtime yet")
    mesh = logits.device_mesh
    vocab_axes = [a for a, p in enumerate(logits.placements) if isinstance(p, DShard) and p.dim % 2 == 1]
    row_axes = [a for a, p in enumerate(logits.placements) if isinstance(p, DShard) and p.dim % 2 == 0]
    placements = [DPartial() if a in row_axes else DReplicate() for a in range(mesh.ndim)]
    t_local = targets.to_local() if isinstance(targets, DTensor) else targets
    valid = t_local != ignore
    count = valid.sum().to(torch.float32)
    for a in row_axes:
        dist.all_reduce(count, group=mesh.get_group(a))
    if not vocab_axes:
        loss = F.cross_entropy(logits.to_local(), t_local, reduction="sum", ignore_index=ignore, **rest) / count
        return DTensor.from_local(loss.to(logits.dtype), mesh, placements, run_check=False)
    if rest:
        raise AutoplanError(f"vocabulary-parallel cross-entropy takes no {sorted(rest)}: use the default loss")
    vocab = logits.shape[1]
    offset, width = 0, vocab
    for a in vocab_axes:  # nested splits of the vocabulary, in mesh order (DTensor's chunking)
        n = mesh.size(a)
        if width % n:
            raise AutoplanError(f"vocabulary of {vocab} does not split evenly over {n} ranks: pad the vocabulary")
        width //= n
        offset += mesh.get_local_rank(a) * width
    groups = [mesh.get_group(a) for a in vocab_axes]
    loss = _VocabParallelCE.apply(logits.to_local(), t_local, offset, groups, valid, count)
    return DTensor.from_local(loss, mesh, placements, run_check=False)


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, local: torch.Tensor, targets: torch.Tensor, offset: int, groups: list, valid: torch.Tensor,
                count: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        import torch.distributed as dist

        x = local.float()
        m = x.max(dim=1).values
        for g in groups:
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=g)
        shifted = x - m[:, None]
        exp = shifted.exp()
        sumexp = exp.sum(dim=1)
        t = targets - offset
        mine = (t >= 0) & (t < x.shape[1]) & valid
        idx = t.clamp(0, x.shape[1] - 1)
        picked = shifted.gather(1, idx[:, None]).squeeze(1) * mine
        for g in groups:
            dist.all_reduce(picked, group=g)
        for g in groups:
            dist.all_reduce(sumexp, group=g)
        weight = valid.to(x.dtype) / count
        ctx.save_for_backward(exp / sumexp[:, None], idx, mine, weight)
        ctx.dtype = local.dtype
        return ((sumexp.log() - picked) * weight).sum().to(local.dtype)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        softmax, idx, mine, weight = ctx.saved_tensors
        grad = softmax.clone()
        grad.scatter_add_(1, idx[:, None], -mine.to(grad.dtype)[:, None])
        return (grad * (weight[:, None] * g)).to(ctx.dtype), None, None, None, None, None


def _aten_ce_kwargs(rest: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """aten.cross_entropy_loss(self, target, weight, reduction (int), ignore_index, label_smoothing) -> F kwargs."""
    names = ("weight", "reduction", "ignore_index", "label_smoothing")
    out = {**dict(zip(names, rest)), **kwargs}
    out["reduction"] = {0: "none", 1: "mean", 2: "sum"}.get(out.get("reduction", 1), "mean")
    return {k: v for k, v in out.items() if v is not None}


def _is_dropout_noop(node: fx.Node) -> bool:
    p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
    training = node.kwargs.get("training", node.kwargs.get("train", node.args[2] if len(node.args) > 2 else True))
    return not training or p == 0.0
