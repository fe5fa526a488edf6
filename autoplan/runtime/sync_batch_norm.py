"""Batch norm on sharded inputs, as the op registry's rule prices it (``autoplan/ops/norm.py``).

Under a batch split the statistics of the GLOBAL batch are used (SyncBatchNorm semantics: the plan
computes what one process computes): each rank sums x and x^2 per channel over its samples, one
all-reduce of (sum, sum of squares, count) per row axis gives the global mean and variance, and in
backward one all-reduce of the two gradient sums (the count has none) gives their global values.
Under a channel split every rank normalises its own channels: nothing is exchanged.

Three spellings are run: ``F.batch_norm`` (fx traces; running statistics updated in place),
``aten.batch_norm`` (exported graphs; in place) and ``aten._native_batch_norm_legit_functional``
(functionalised exports: the updated running statistics are outputs).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.distributed.tensor import Partial as DPartial
from torch.distributed.tensor import Replicate as DReplicate
from torch.distributed.tensor import Shard as DShard

from autoplan.runtime.moves import Trace

aten = torch.ops.aten
FUNCTIONAL = (aten._native_batch_norm_legit_functional.default,)
SPELLINGS = (F.batch_norm, aten.batch_norm.default, *FUNCTIONAL)


@dataclass
class BatchNormArgs:
    x: DTensor
    weight: Any
    bias: Any
    running_mean: Any
    running_var: Any
    training: bool
    momentum: float
    eps: float


def parse(target: Any, args: tuple, kwargs: dict) -> BatchNormArgs:
    """The arguments of any of the three spellings, by name."""
    if target is F.batch_norm:
        names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
        defaults = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}
    else:
        names = ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps")
        defaults = {}
    v = {**defaults, **dict(zip(names, args)), **kwargs}
    return BatchNormArgs(v["input"], v["weight"], v["bias"], v["running_mean"], v["running_var"], bool(v["training"]),
                         float(v["momentum"] if v["momentum"] is not None else 0.1), float(v["eps"]))


class _AllReduceStats(torch.autograd.Function):
    """Sum (sum, sum of squares, count) per channel over ranks; backward sums the gradients of the first two."""

    @staticmethod
    def forward(ctx: Any, stats: torch.Tensor, groups: list, trace: Trace, name: str) -> torch.Tensor:  # type: ignore[override]
        stats = stats.clone()
        for g in groups:
            dist.all_reduce(stats, group=g)
        ctx.groups, ctx.trace, ctx.name = groups, trace, name
        return stats

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        sums = grad[:2].contiguous()
        with ctx.trace.scope("backward", ctx.name, ctx.name):
            for g in ctx.groups:
                dist.all_reduce(sums, group=g)
        return torch.cat([sums, torch.zeros_like(grad[2:])]), None, None, None


def _local(t: Any, grad_partial_axes: list[int]) -> Any:
    """A DTensor's local tensor; its gradient is partial over ``grad_partial_axes`` (a replicated weight
    used by ranks that hold different samples)."""
    if not isinstance(t, DTensor):
        return t
    grads = [DPartial() if a in grad_partial_axes else p for a, p in enumerate(t.placements)]
    return t.to_local(grad_placements=grads)


def batch_norm(target: Any, args: tuple, kwargs: dict, trace: Trace, name: str) -> Any:
    """Run one batch norm on its sharded input (see the module docstring)."""
    a = parse(target, args, kwargs)
    x = a.x
    mesh = x.device_mesh
    rows = [i for i, p in enumerate(x.placements) if isinstance(p, DShard) and p.dim % x.ndim == 0]
    chans = [i for i, p in enumerate(x.placements) if isinstance(p, DShard) and p.dim % x.ndim == 1]
    xl = x.to_local()
    w, b = _local(a.weight, rows), _local(a.bias, rows)
    rm, rv = (t.to_local() if isinstance(t, DTensor) else t for t in (a.running_mean, a.running_var))
    dims = [0] + list(range(2, xl.ndim))
    shape = [1, -1] + [1] * (xl.ndim - 2)
    if a.training:
        local = torch.stack([xl.float().sum(dims), (xl.float() * xl.float()).sum(dims),
                             torch.full((xl.shape[1],), xl.numel() / xl.shape[1], dtype=torch.float32)])
        stats = _AllReduceStats.apply(local, [mesh.get_group(i) for i in rows], trace, name) if rows else local
        count = stats[2]
        mean = stats[0] / count
        var = (stats[1] / count - mean * mean).clamp_min(0)
    else:
        mean, var, count = rm.float(), rv.float(), None
    rstd = torch.rsqrt(var + a.eps)
    y = (xl.float() - mean.view(shape)) * rstd.view(shape)
    if w is not None:
        y = y * w.view(shape)
    if b is not None:
        y = y + b.view(shape)
    y = y.to(xl.dtype)
    new_rm, new_rv = rm, rv
    if a.training and rm is not None:
        with torch.no_grad():
            unbiased = var.detach() * count / (count - 1).clamp_min(1)
            new_rm = ((1 - a.momentum) * rm + a.momentum * mean.detach()).to(rm.dtype)
            new_rv = ((1 - a.momentum) * rv + a.momentum * unbiased).to(rv.dtype)
            if target not in FUNCTIONAL:  # the in-place spellings update the module's buffers
                rm.copy_(new_rm)
                rv.copy_(new_rv)
    out = DTensor.from_local(y, mesh, list(x.placements), run_check=False)
    if target not in FUNCTIONAL:
        return out
    per_channel = [DShard(0) if i in chans else DReplicate() for i in range(mesh.ndim)]

    def wrap(t: Any) -> Any:
        return DTensor.from_local(t, mesh, per_channel, run_check=False) if isinstance(t, torch.Tensor) else t

    return out, wrap(mean.detach()), wrap(rstd.detach()), wrap(new_rm), wrap(new_rv)
