"""Baselines priced by the same cost model: DDP, FSDP (ZeRO-3), Megatron-style TP x DP.

Each is a restriction of the search space (some ops' strategies fixed), searched over the same
micro-batch and recompute choices, so the planner's own space always contains them. The same
restrictions let a user ask for one family on purpose (``autoplan.plan(..., force="fsdp")``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from autoplan.errors import AutoplanError
import numpy as np

from autoplan.graph import OpGraph, OpNode
from autoplan.mesh import Mesh
from autoplan.strategies import Replicate, Shard
from autoplan.strategies.expand import Strategy

Allow = Callable[[OpNode, Strategy], bool]
FAMILIES = ("ddp", "fsdp", "megatron")


@dataclass(frozen=True)
class Baseline:
    name: str
    description: str
    mesh: Mesh
    allow: Allow


def _batch_sharded(node: OpNode, s: Strategy, axes: tuple[int, ...]) -> bool:
    """Data inputs split along their batch dim on ``axes`` and replicated elsewhere."""
    if not node.out.batch_dims:
        return all(isinstance(p, Replicate) for p in s.out)
    bdim = min(node.out.batch_dims)
    return all((p == Shard(bdim)) if a in axes else isinstance(p, Replicate) for a, p in enumerate(s.out))


def _keeps_batch_split(node: OpNode, s: Strategy, axes: tuple[int, ...]) -> bool:
    """Activations stay split along the batch on the data-parallel ``axes`` (no gathering the batch)."""
    if not node.out.batch_dims or node.kind == "unknown" or not node.out.is_float:
        return True  # ops with no sharding rule, and integer/boolean masks, may stay replicated
    bdim = min(node.out.batch_dims)
    return all(s.out[a] == Shard(bdim) for a in axes)


def allow_for(family: str, mesh: Mesh) -> Allow:
    """The restriction that defines ``family`` on ``mesh`` (Megatron: the last axis is tensor parallel)."""
    every = tuple(range(mesh.ndim))
    if family == "ddp":

        def ddp(node: OpNode, s: Strategy) -> bool:
            if node.kind == "param":
                return all(isinstance(p, Replicate) for p in s.out)
            return _batch_sharded(node, s, every) if node.kind == "input" else _keeps_batch_split(node, s, every)

        return ddp
    if family == "fsdp":

        def fsdp(node: OpNode, s: Strategy) -> bool:
            if node.kind == "param":  # dim-0 sharding as FSDP2 does; too small to split: replicated
                dim0 = bool(node.out.base) and node.out.base[0] % mesh.size == 0
                return all((p == Shard(0)) if dim0 else isinstance(p, Replicate) for p in s.out)
            return _batch_sharded(node, s, every) if node.kind == "input" else _keeps_batch_split(node, s, every)

        return fsdp
    if family == "megatron":
        tp_axis = mesh.ndim - 1
        dp_axes = tuple(range(mesh.ndim - 1))

        def megatron(node: OpNode, s: Strategy) -> bool:
            if node.kind == "param":  # replicated across data-parallel ranks; matrices split on the tp axis
                split = isinstance(s.out[tp_axis], Shard) or len(node.out.base) < 2
                return split and all(isinstance(p, Replicate) for a, p in enumerate(s.out) if a != tp_axis)
            if node.kind == "input":
                return _batch_sharded(node, s, dp_axes)
            tp = s.out[tp_axis]  # no batch split on the tensor-parallel axis
            return _keeps_batch_split(node, s, dp_axes) and not (isinstance(tp, Shard) and tp.dim in node.out.batch_dims)

        return megatron
    raise AutoplanError(f"unknown plan family {family!r}: use one of {', '.join(FAMILIES)}")


def family_masks(graph: OpGraph, reps: list[str], strategies: list, allow: Allow, *, strict: bool = False) -> list[np.ndarray]:
    """Per node, the strategies a family allows. Unless ``strict`` (a fixed configuration that must hold
    exactly), an op none of whose strategies fits the family (a lookup that cannot keep the batch split)
    is left free rather than making the family infeasible."""
    masks = [np.array([allow(graph.nodes[n], s) for s in strats]) for n, strats in zip(reps, strategies)]
    return masks if strict else [m if m.any() else np.ones_like(m) for m in masks]


def baselines(devices: int, devices_per_node: int) -> list[Baseline]:
    flat = Mesh((devices,), ("dp",))
    out = [
        Baseline("ddp", "data parallel, replicated weights (DDP)", flat, allow_for("ddp", flat)),
        Baseline("fsdp", "fully sharded data parallel (FSDP / ZeRO-3)", flat, allow_for("fsdp", flat)),
    ]
    tp = min(devices_per_node, devices)
    if tp > 1:
        mesh = Mesh((devices // tp, tp), ("dp", "tp")) if devices // tp > 1 else Mesh((devices,), ("tp",))
        out.append(Baseline("megatron", f"tensor parallel {tp} inside a node, data parallel across", mesh,
                            allow_for("megatron", mesh)))
    return out
