"""Which collectives a planned step issues, next to the ones the plan priced.

``CollectiveRecorder`` is a dispatch mode that sees every functional collective DTensor issues
(kind, bytes per device, mesh axis) and labels it with the runtime's current move (phase,
producer node, consumer node). ``compare`` matches them against ``plan.data["collectives"]``.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.debug import CommDebugMode
from torch.utils._python_dispatch import TorchDispatchMode

from autoplan.plan import Plan
from autoplan.runtime.moves import Trace

_KINDS = {
    "all_gather_into_tensor": "all_gather", "all_gather_into_tensor_out": "all_gather",
    "reduce_scatter_tensor": "reduce_scatter", "all_reduce": "all_reduce", "all_reduce_": "all_reduce",
    "all_to_all_single": "all_to_all", "allreduce_": "all_reduce", "_allgather_base_": "all_gather",
    "allgather_": "all_gather", "_reduce_scatter_base_": "reduce_scatter", "alltoall_base_": "all_to_all",
}


def _nbytes(t: Any) -> int:
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    if isinstance(t, (list, tuple)):
        return sum(_nbytes(x) for x in t)
    return 0


class CollectiveRecorder(TorchDispatchMode):
    """Records (phase, kind, axis, bytes, src, dst) of every collective run inside it."""

    def __init__(self, mesh: DeviceMesh, trace: Trace):
        super().__init__()
        self.trace = trace
        names = mesh.mesh_dim_names or tuple(str(i) for i in range(mesh.ndim))
        self.axis_of = {mesh.get_group(i).group_name: name for i, name in enumerate(names)}
        self.axis_of_ranks = {tuple(dist.get_process_group_ranks(mesh.get_group(i))): name for i, name in enumerate(names)}
        self.records: list[dict[str, Any]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        kind = _KINDS.get(func._overloadpacket.__name__)
        out = func(*args, **kwargs)
        if kind is not None:
            self.records.append(self._record(kind, args, out))
        return out

    def _record(self, kind: str, args: tuple, out: Any) -> dict[str, Any]:
        nbytes = _nbytes(out) if kind == "all_gather" else _nbytes(args[0])
        phase, src, dst = self.trace.label or ("unlabelled", "?", "?")
        return {"phase": phase, "kind": kind, "axis": self._axis(args), "bytes": nbytes, "src": src, "dst": dst}

    def _axis(self, args: tuple) -> str:
        """Mesh axis of a collective, from its group name (or, for a group made again, its ranks)."""
        for a in args:
            if isinstance(a, str) and a in self.axis_of:
                return self.axis_of[a]
        for a in args:
            if isinstance(a, str):
                try:
                    ranks = tuple(dist.get_process_group_ranks(_resolve_process_group(a)))
                except Exception:  # noqa: BLE001 - not a group name
                    continue
                if ranks in self.axis_of_ranks:
                    return self.axis_of_ranks[ranks]
        return "?"


def _key(c: dict[str, Any]) -> tuple:
    return (c["phase"], c["kind"], c["axis"], int(round(float(c["bytes"]))), c["src"], c["dst"])


def planned(plan: Plan) -> Counter:
    """The plan's collectives of one step, as a multiset (each repeated ``per_step`` times)."""
    out: Counter = Counter()
    for c in plan.data["collectives"]:
        out[_key(c)] += int(c.get("per_step", 1))
    return out


def compare(plan: Plan, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Planned vs issued: {"missing": [...], "extra": [...], "issued": n, "planned": n, "bytes": ...}."""
    want = planned(plan)
    got: Counter = Counter()
    wild: list[tuple] = []
    for r in records:
        if r["dst"] == "*":
            wild.append(_key(r))
        else:
            got[_key(r)] += 1
    missing = want - got
    extra = got - want
    for k in wild:  # a deferred all-reduce of a parameter with several consumers: match any of its edges
        hit = next((m for m in missing if m[:5] == k[:5]), None)
        if hit is not None:
            missing[hit] -= 1
            missing = +missing
        else:
            extra[k] += 1
    return {
        "planned": sum(want.values()), "issued": len(records),
        "planned_bytes": sum(k[3] * n for k, n in want.items()), "issued_bytes": sum(r["bytes"] for r in records),
        "missing": sorted([list(k) + [n] for k, n in missing.items()]),
        "extra": sorted([list(k) + [n] for k, n in extra.items()]),
    }


def by_kind(records: list[dict[str, Any]]) -> dict[str, int]:
    return dict(Counter(f"{r['phase']}:{r['kind']}:{r['axis']}" for r in records))


def total_bytes(plan: Plan) -> float:
    return math.fsum(float(c["bytes"]) * int(c.get("per_step", 1)) for c in plan.data["collectives"])


def explain(plan: Plan, result: dict[str, Any], constant_nodes: frozenset[str], params: frozenset[str]) -> dict[str, list]:
    """Sort every difference between planned and issued collectives into known causes.

    * ``tied``: the plan prices a parameter's gradient sync once per consumer edge; the
      runtime syncs the (summed) gradient of a tied parameter once.
    * ``not_saved``: the plan prices an FSDP re-gather in backward for every gathered
      parameter; the runtime re-gathers only those backward reads (not biases, embeddings).
    * ``no_grad``: the plan prices gradients of values derived from buffers/constants only.
    * ``smaller``: same edge and collective, fewer bytes issued (the runtime shards a gradient
      before all-reducing it; the cost model all-reduces first).
    * ``unexplained``: anything else (missing or extra).
    """
    by_src: Counter = Counter(c["src"] for c in plan.data["collectives"] if c["phase"] == "backward"
                              and c["kind"] in ("all_reduce", "reduce_scatter"))
    out: dict[str, list] = {"tied": [], "not_saved": [], "no_grad": [], "smaller": [], "unexplained": []}
    extra = [list(e) for e in result["extra"]]
    for m in result["missing"]:
        phase, kind, axis, nbytes, src, dst, n = m
        twin = next((e for e in extra if e[:3] == [phase, kind, axis] and e[4:6] == [src, dst] and e[3] < nbytes), None)
        if twin is not None:
            out["smaller"].append([m, twin])
            twin[6] -= n
            if twin[6] <= 0:
                extra.remove(twin)
        elif src in constant_nodes:
            out["no_grad"].append(m)
        elif phase == "backward" and kind == "all_gather" and src in params:
            out["not_saved"].append(m)
        elif phase == "backward" and kind in ("all_reduce", "reduce_scatter") and src in params and by_src[src] > 1:
            out["tied"].append(m)
        else:
            out["unexplained"].append(m)
    out["unexplained"] += [["extra", *e] for e in extra]
    return out


def check_step(pm: Any, *tensors: Any) -> dict[str, Any]:
    """Run one planned forward+backward under the recorder; the comparison and its explanation."""
    rec = CollectiveRecorder(pm.mesh, pm.trace)
    bucket, pm.bucket_grads = pm.bucket_grads, False  # one all-reduce per parameter, as the plan lists them
    debug = CommDebugMode()
    try:
        with debug, rec:
            loss = pm.forward_backward(*tensors)
    finally:
        pm.bucket_grads = bucket
    graph = pm.program.graph
    result = compare(pm.plan, rec.records)
    params = frozenset(n for n, node in graph.nodes.items() if node.kind == "param")
    result["explained"] = explain(pm.plan, result, graph.constant_derived(), params)
    result["by_kind"] = by_kind(rec.records)
    result["comm_debug_mode"] = {str(k): v for k, v in debug.get_comm_counts().items()}  # PyTorch's own count
    result["loss"] = loss
    return result
