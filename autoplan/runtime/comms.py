"""Which collectives a planned step issues, next to the ones the plan priced.

``CollectiveRecorder`` is a dispatch mode that sees every collective the runtime issues
(kind, bytes per device, mesh axis) and labels it with the runtime's current move (phase,
producer node, consumer node). ``compare`` matches them against ``plan.data["collectives"]``:
edge by edge (phase, kind, axis, bytes, src, dst, count per step), and summed per layer.

The one normalisation: a bucketed gradient all-reduce (``ParallelModel.bucket_grads``, as DDP
buckets gradients) is one collective that carries several parameters' deferred all-reduces;
it is compared as the per-parameter all-reduces it merges (the plan prices those; the bytes
are the same), and ``buckets`` says which ones each bucket carried.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Any, Callable

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
        rec = {"phase": phase, "kind": kind, "axis": self._axis(args), "bytes": nbytes, "src": src, "dst": dst}
        if self.trace.members:
            rec["members"] = [list(m) for m in self.trace.members]
        return rec

    def _axis(self, args: tuple) -> str:
        """Mesh axis of a collective, from its group (functional collectives pass its name, c10d ones
        the group itself) or, for a group made again, its ranks."""
        groups: list[Any] = []
        for a in args:
            if isinstance(a, (str, dist.ProcessGroup)):
                groups.append(a)
            elif isinstance(a, torch.ScriptObject):  # c10d ops (dist.all_reduce) pass the group boxed
                try:
                    groups.append(dist.ProcessGroup.unbox(a))
                except RuntimeError:  # another class (a ReduceOp)
                    continue
        for g in groups:
            name = g if isinstance(g, str) else getattr(g, "group_name", None)
            if name in self.axis_of:
                return self.axis_of[name]
        for g in groups:
            try:
                ranks = tuple(dist.get_process_group_ranks(_resolve_process_group(g) if isinstance(g, str) else g))
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


def unbucketed(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records with every bucketed all-reduce replaced by the per-parameter all-reduces it merges."""
    out = []
    for r in records:
        if r.get("members"):
            base = {k: v for k, v in r.items() if k != "members"}
            out += [{**base, "src": node, "dst": dst, "bytes": nbytes} for node, dst, nbytes in r["members"]]
        else:
            out.append(r)
    return out


def layer_of(graph: Any) -> Callable[[str, str], str]:
    """(src, dst) -> the layer a collective belongs to, as the plan's per-layer split counts it: a
    parameter's gathers and gradient sync go with the parameter's layer, other moves with the consumer's."""
    from autoplan.planner import _layer

    def of(src: str, dst: str) -> str:
        node = graph.nodes.get(src)
        if node is None or node.kind != "param":
            node = graph.nodes.get(dst)
        if node is None:
            return "?"
        return _layer(node.param.rsplit(".", 1)[0] if node.kind == "param" and node.param else node.module)

    return of


def per_layer(keys: Counter, layer: Callable[[str, str], str]) -> dict[str, list[int]]:
    """{"layer phase:kind:axis": [collectives per step, bytes per step]} of a multiset of keys."""
    out: dict[str, list[int]] = {}
    for (phase, kind, axis, nbytes, src, dst), n in keys.items():
        entry = out.setdefault(f"{layer(src, dst)} {phase}:{kind}:{axis}", [0, 0])
        entry[0] += n
        entry[1] += n * nbytes
    return dict(sorted(out.items()))


def compare(plan: Plan, records: list[dict[str, Any]], layer: Callable[[str, str], str] | None = None) -> dict[str, Any]:
    """Planned vs issued collectives of one step.

    ``missing`` / ``extra``: [phase, kind, axis, bytes, src, dst, count] the plan lists and the
    step did not issue, or the reverse (a bucket compared as its members); ``by_layer``: planned
    and issued [count, bytes] per layer and (phase, kind, axis), and ``layer_diff`` where they
    differ; ``issued``: the collectives really issued (a bucket counts once), ``issued_unbucketed``
    as the plan counts them; ``buckets``: each bucketed all-reduce, its bytes and parameters.
    """
    layer = layer or (lambda src, dst: "?")
    want = planned(plan)
    flat = unbucketed(records)
    got: Counter = Counter()
    wild: list[tuple] = []
    for r in flat:
        if r["dst"] == "*":
            wild.append(_key(r))
        else:
            got[_key(r)] += 1
    missing = want - got
    extra = got - want
    for k in wild:  # a deferred all-reduce of a parameter with several consumers: match any of its edges
        hit = next((m for m in sorted(missing) if m[:5] == k[:5]), None)
        if hit is not None:
            missing[hit] -= 1
            missing = +missing
            got[hit] += 1
        else:
            extra[k] += 1
            got[k] += 1
    buckets = [{"axis": r["axis"], "bytes": r["bytes"], "params": [m[0] for m in r["members"]],
                "members_bytes": sum(m[2] for m in r["members"])} for r in records if r.get("members")]
    for b in buckets:  # the bucket's own size against what it says it carries
        if b["members_bytes"] != b["bytes"]:
            extra[("backward", "all_reduce", b["axis"], b["bytes"] - b["members_bytes"], "bucket", "*")] += 1
    planned_layers, issued_layers = per_layer(want, layer), per_layer(got, layer)
    layer_diff = [[k, planned_layers.get(k, [0, 0]), issued_layers.get(k, [0, 0])]
                  for k in sorted(set(planned_layers) | set(issued_layers)) if planned_layers.get(k) != issued_layers.get(k)]
    return {
        "planned": sum(want.values()), "issued": len(records), "issued_unbucketed": len(flat),
        "planned_bytes": sum(k[3] * n for k, n in want.items()), "issued_bytes": sum(r["bytes"] for r in records),
        "missing": sorted([list(k) + [n] for k, n in missing.items()]),
        "extra": sorted([list(k) + [n] for k, n in extra.items()]),
        "by_layer": {"planned": planned_layers, "issued": issued_layers},
        "layer_diff": layer_diff,
        "buckets": buckets,
    }


def by_kind(records: list[dict[str, Any]]) -> dict[str, int]:
    return dict(Counter(f"{r['phase']}:{r['kind']}:{r['axis']}" for r in records))


def total_bytes(plan: Plan) -> float:
    return math.fsum(float(c["bytes"]) * int(c.get("per_step", 1)) for c in plan.data["collectives"])


def check_step(pm: Any, *tensors: Any, bucket: bool = False) -> dict[str, Any]:
    """Run one planned forward+backward (and gradient sync) under the recorder: the comparison.

    ``bucket=False`` issues one gradient all-reduce per parameter, as the plan lists them;
    ``bucket=True`` runs the step as ``train_step`` does (DDP-style buckets), compared through
    the buckets' members. ``exact`` says whether the step issued exactly the plan's collectives.
    """
    rec = CollectiveRecorder(pm.mesh, pm.trace)
    saved, pm.bucket_grads = pm.bucket_grads, bucket
    debug = CommDebugMode()
    try:
        with debug, rec:
            loss = pm.forward_backward(*tensors)
    finally:
        pm.bucket_grads = saved
    result = compare(pm.plan, rec.records, layer_of(pm.program.graph))
    result["exact"] = (not result["missing"] and not result["extra"] and not result["layer_diff"]
                       and result["issued_unbucketed"] == result["planned"]
                       and result["issued_bytes"] == result["planned_bytes"])
    result["by_kind"] = by_kind(rec.records)
    result["comm_debug_mode"] = {str(k): v for k, v in debug.get_comm_counts().items()}  # PyTorch's own count
    result["loss"] = loss
    return result
