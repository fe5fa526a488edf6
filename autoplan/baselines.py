"""Baselines priced by the same cost model: DDP, FSDP (ZeRO-3), Megatron-style TP x DP.

Each is a restriction of the search space (some ops' strategies fixed), searched over the same
micro-batch and recompute choices, so the planner's own space always contains them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from autoplan.graph import OpNode
from autoplan.mesh import Mesh
from autoplan.strategies import Replicate, Shard, Strategy


@dataclass(frozen=True)
class Baseline:
    name: str
    description: str
    mesh: Mesh
    allow: Callable[[OpNode, Strategy], bool]


def _batch_sharded(node: OpNode, s: Strategy, axes: tuple[int, ...]) -> bool:
    """Data inputs split along their batch dim on ``axes`` and replicated elsewhere."""
    if not node.out.batch_dims:
        return all(isinstance(p, Replicate) for p in s.out)
    bdim = min(node.out.batch_dims)
    return all((p == Shard(bdim)) if a in axes else isinstance(p, Replicate) for a, p in enumerate(s.out))


def baselines(devices: int, devices_per_node: int) -> list[Baseline]:
    flat = Mesh((devices,), ("dp",))
    all_axes = (0,)

    def ddp(node: OpNode, s: Strategy) -> bool:
        if node.kind == "param":
            return all(isinstance(p, Replicate) for p in s.out)
        if node.kind == "input":
            return _batch_sharded(node, s, all_axes)
        return True

    def fsdp(node: OpNode, s: Strategy) -> bool:
        if node.kind == "param":
            # dim-0 sharding, as FSDP2 does; parameters too small to split stay replicated
            dim0 = node.out.base[0] % devices == 0 if node.out.base else False
            return all((p == Shard(0)) if dim0 else isinstance(p, Replicate) for p in s.out)
        if node.kind == "input":
            return _batch_sharded(node, s, all_axes)
        return True

    out = [
        Baseline("ddp", "data parallel, replicated weights (DDP)", flat, ddp),
        Baseline("fsdp", "fully sharded data parallel (FSDP / ZeRO-3)", flat, fsdp),
    ]
    tp = min(devices_per_node, devices)
    if tp > 1:
        if devices // tp > 1:
            mesh, dp_axes, tp_axis = Mesh((devices // tp, tp), ("dp", "tp")), (0,), 1
        else:
            mesh, dp_axes, tp_axis = Mesh((devices,), ("dp",)), (), 0

        def megatron(node: OpNode, s: Strategy) -> bool:
            if node.kind == "param":  # replicated across data-parallel ranks; any split inside the node
                return all(isinstance(p, Replicate) for a, p in enumerate(s.out) if a != tp_axis)
            if node.kind == "input":
                return _batch_sharded(node, s, dp_axes)
            # tensor parallel inside the node: no batch split on the tp axis
            return not any(isinstance(p, Shard) and p.dim in node.out.batch_dims for p in (s.out[tp_axis],))

        out.append(Baseline("megatron", f"tensor parallel {tp} inside a node, data parallel across", mesh, megatron))
    return out


__all__ = ["Baseline", "baselines"]
