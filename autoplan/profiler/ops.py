"""Op-level profiling: time every distinct (op kind, local shapes, dtype) a plan can run, once.

The planner prices an op under a strategy from its *local* shapes: each input's placement on
the mesh (``Strategy.ins``) shards its global shape (``placement.local_shape``). Different ops,
strategies and meshes often produce the same local problem (the N blocks of a transformer;
``S(0)`` on a 4-mesh vs ``S(0),S(0)`` on 2x2), so the table is keyed by

    kind | dtype | local input shapes (and dtypes) -> local output shape | attrs that matter

(a readable, deterministic string), timed once on this device and cached in a JSON file that
later runs reuse. Forward is timed; backward is estimated as ``BACKWARD_FACTOR`` x forward
unless ``backward=True`` (then fwd+bwd is timed with autograd and the difference stored).

Interface for the cost model:

* ``OpTimes.seconds(graph, node, strategy, mesh_shape, batch, dtype)`` -> forward seconds or None;
* ``OpTimes.node_seconds(graph, node, strategies, mesh_shape, batch, dtype)`` -> array (NaN = not timed);
* ``apply_to_pricing(mp, graph, op_times, batch, dtype)`` replaces the forward compute of a
  ``MeshPricing`` (``cost.model.price_mesh``) by the measured times, strategy by strategy
  (``MeasuredCompute.at(b)``: exact at the profiled micro-batch, proportional elsewhere). Ops or
  strategies with no entry keep the cost model's value.

Timings are wall-clock on a shared machine: noisy; they are medians of a few repetitions, each
after the CPU caches are evicted (``_Flush``), as an op finds them in a training step.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from autoplan.graph import ALIAS_KINDS, OpGraph, OpNode
from autoplan.mesh import Mesh
from autoplan.strategies.expand import Strategy
from autoplan.strategies.placement import Placements, local_shape

CACHE_SCHEMA = "autoplan-op-cache/1"
BACKWARD_FACTOR = 2.0
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
KEY_ATTRS = ("dim", "is_causal", "stride", "padding", "dilation", "groups", "p", "approximate", "reduction")
UNARY = {"gelu", "silu", "relu", "tanh", "sigmoid", "exp", "rsqrt", "sqrt", "neg", "sin", "cos", "softplus"}
BINARY = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div, "truediv": torch.div,
          "iadd": torch.add, "imul": torch.mul, "radd": torch.add, "rmul": torch.mul, "pow": torch.pow}


def _dtype_tag(dt: torch.dtype, compute: str) -> str:
    return compute if dt.is_floating_point else str(dt).replace("torch.", "")


def _shape_str(shape: Sequence[int]) -> str:
    return "(" + ",".join(str(int(s)) for s in shape) + ")"


def _attr_key(node: OpNode) -> str:
    items = []
    for k in KEY_ATTRS:
        v = node.attrs.get(k)
        if v is not None:
            items.append(f"{k}={v!r}")
    # positional constant args: only the small scalars that change the work (a softmax dim, ...)
    for k, v in sorted(node.attrs.items()):
        if k.startswith("arg") and isinstance(v, (int, float, bool)):
            items.append(f"{k}={v!r}")
    return ",".join(items)


def op_key(kind: str, target: str, in_shapes: Sequence[Sequence[int]], in_dtypes: Sequence[str],
           out_shape: Sequence[int], dtype: str, attrs: str = "") -> str:
    """The cache key: readable and stable across processes and runs."""
    ins = "x".join(f"{_shape_str(s)}:{d}" for s, d in zip(in_shapes, in_dtypes))
    name = kind if kind not in ("elementwise", "reduce", "pool") else f"{kind}:{target}"
    return f"{name}|{dtype}|{ins}->{_shape_str(out_shape)}|{attrs}"


def local_problem(graph: OpGraph, node: OpNode, strategy: Strategy, mesh_shape: tuple[int, ...], batch: int,
                  dtype: str) -> tuple[str, list[tuple[int, ...]], list[torch.dtype], tuple[int, ...]] | None:
    """(key, local input shapes, input dtypes, local output shape); None if a shard would be uneven."""
    ins = [graph.nodes[i] for i in node.inputs]
    shapes, dtypes = [], []
    for inp, pl in zip(ins, strategy.ins):
        g = inp.out.shape(batch)
        if not _even(g, pl, mesh_shape):
            return None
        shapes.append(local_shape(g, pl, mesh_shape))
        dtypes.append(inp.out.dtype)
    g_out = node.out.shape(batch)
    if not _even(g_out, strategy.out, mesh_shape):
        return None
    out = local_shape(g_out, strategy.out, mesh_shape)
    key = op_key(node.kind, node.target, shapes, [_dtype_tag(d, dtype) for d in dtypes], out, dtype, _attr_key(node))
    return key, shapes, dtypes, out


def _even(shape: tuple[int, ...], placements: Placements, mesh_shape: tuple[int, ...]) -> bool:
    from autoplan.strategies.placement import shard_factor

    return all(s % shard_factor(placements, mesh_shape, d) == 0 for d, s in enumerate(shape))


def timed_kinds() -> frozenset[str]:
    return frozenset({"linear", "matmul", "embedding", "layer_norm", "rms_norm", "softmax", "sdpa", "dropout",
                      "cross_entropy", "conv", "elementwise", "reduce", "cat"})


# ----------------------------------------------------------------------------------------------
# building and running one op


def _make_inputs(node: OpNode, shapes, dtypes, compute: torch.dtype, grad: bool) -> list[torch.Tensor]:
    xs = []
    float_shapes = [s for s, d in zip(shapes, dtypes) if d.is_floating_point]
    for s, d in zip(shapes, dtypes):
        if d.is_floating_point:
            xs.append(torch.randn(s, dtype=compute).requires_grad_(grad))
        else:
            hi = 2
            if node.kind == "embedding" and float_shapes:
                hi = float_shapes[0][0]
            elif node.kind == "cross_entropy" and float_shapes:
                hi = float_shapes[0][-1] if len(float_shapes[0]) <= 2 else float_shapes[0][1]
            if d == torch.bool:
                xs.append(torch.ones(s, dtype=torch.bool).tril() if len(s) >= 2 else torch.ones(s, dtype=torch.bool))
            else:
                xs.append(torch.randint(0, max(1, hi), s, dtype=d))
    return xs


def _runner(node: OpNode, xs: list[torch.Tensor], out_shape: tuple[int, ...]) -> Callable[[], torch.Tensor] | None:
    k, a = node.kind, node.attrs
    fl = [x for x in xs if x.is_floating_point()]
    if k == "linear":
        return lambda: F.linear(*xs[:3])
    if k == "matmul":
        return lambda: torch.matmul(xs[0], xs[1])
    if k == "embedding":
        idx = next(x for x in xs if not x.is_floating_point())
        return lambda: F.embedding(idx, fl[0])
    if k == "layer_norm":
        d = fl[0].shape[-1]
        w = fl[1] if len(fl) > 1 else None
        b = fl[2] if len(fl) > 2 else None
        return lambda: F.layer_norm(fl[0], (d,), w, b)
    if k == "rms_norm":
        d = fl[0].shape[-1]
        w = fl[1] if len(fl) > 1 else None
        return lambda: F.rms_norm(fl[0], (d,), w)
    if k == "softmax":
        dim = a.get("dim", a.get("arg1", -1))
        dim = dim if isinstance(dim, int) else -1
        return lambda: torch.softmax(fl[0], dim)
    if k == "sdpa":
        q, kk, v = xs[:3]
        mask = xs[3] if len(xs) > 3 else None
        causal = bool(a.get("is_causal", False)) and mask is None
        return lambda: F.scaled_dot_product_attention(q, kk, v, attn_mask=mask, is_causal=causal)
    if k == "dropout":
        p = a.get("p", a.get("arg1", 0.1))
        p = p if isinstance(p, float) and 0 <= p < 1 else 0.1
        return lambda: F.dropout(fl[0], p, True)
    if k == "cross_entropy":
        logits, tgt = xs[0], xs[1]
        if logits.dim() > 2 and tgt.dim() == logits.dim() - 1 and tgt.shape[0] == logits.shape[0]:
            logits = logits.reshape(-1, logits.shape[-1])
            tgt = tgt.reshape(-1)
        return lambda: F.cross_entropy(logits, tgt)
    if k == "conv":
        kw = {n: a[n] for n in ("stride", "padding", "dilation", "groups") if n in a}
        conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[xs[1].dim()]
        return lambda: conv(*xs[:3], **kw)
    if k == "cat":
        dim = a.get("dim", a.get("arg1", 0))
        dim = dim if isinstance(dim, int) else 0
        return lambda: torch.cat(xs, dim)
    if k == "reduce":
        dims = tuple(d for d in range(fl[0].dim()) if d >= len(out_shape) or fl[0].shape[d] != out_shape[d]) if fl else ()
        mean = "mean" in node.target
        f = torch.mean if mean else torch.sum
        return lambda: f(fl[0], dims) if dims else f(fl[0])
    if k == "elementwise":
        name = node.target.strip("_").split(".")[-1].lower()
        if name in UNARY and fl:
            fn = getattr(F, name, None) or getattr(torch, name)
            return lambda: fn(fl[0])
        if len(fl) >= 2:
            fn2 = BINARY.get(name, torch.add)
            return lambda: fn2(fl[0], fl[1])
        if fl:
            if name in BINARY:
                fn2 = BINARY[name]
                return lambda: fn2(fl[0], 2.0)
            return lambda: fl[0] * 1.0  # casts, masked_fill, where...: one read, one write
    return None


FLUSH_BYTES = 32 * 2**20  # written before each timed CPU call: a server CPU's last-level cache
FLUSHED_REPS = 7  # timed calls per op on the CPU, each after a flush (the flush costs more than most ops)


@dataclass
class _Flush:
    """Evicts the caches before a timed call on the CPU: in a training step an op's weights were last
    touched a whole step ago and its inputs by other ops (and, with ranks sharing cores, other
    processes), so a call on warm caches (the same inputs again and again) is too fast; memory-bound
    ops most (2-2.5x here for an elementwise op of a few MiB)."""

    buf: torch.Tensor | None = None

    def __call__(self) -> None:
        if torch.cuda.is_available():
            return
        if self.buf is None:
            self.buf = torch.empty(FLUSH_BYTES // 4)
        self.buf.fill_(1.0)


_flush = _Flush()


def _time(fn: Callable[[], Any], budget_s: float, max_reps: int) -> float:
    fn()  # warm-up (allocator, one-time kernel set-up)
    _flush()
    t0 = time.perf_counter()
    fn()
    one = time.perf_counter() - t0
    reps = int(min(max_reps, max(1, math.ceil(budget_s / max(one, 1e-7)))))
    if not torch.cuda.is_available():
        reps = min(reps, FLUSHED_REPS)
    samples = [one]
    for _ in range(reps - 1):
        _flush()
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    samples.sort()
    return samples[len(samples) // 2]


def time_op(node: OpNode, shapes, dtypes, out_shape, dtype: str, *, backward: bool = False,
            budget_s: float = 0.03, max_reps: int = 20) -> tuple[float, float | None] | None:
    """(forward seconds, backward seconds or None) of one local op on this device; None if it cannot run."""
    compute = TORCH_DTYPES[dtype]
    try:
        with torch.no_grad():
            xs = _make_inputs(node, shapes, dtypes, compute, grad=False)
            fn = _runner(node, xs, out_shape)
            if fn is None:
                return None
            fwd = _time(fn, budget_s, max_reps)
        bwd = None
        if backward:
            xs = _make_inputs(node, shapes, dtypes, compute, grad=True)
            fn = _runner(node, xs, out_shape)
            leaves = [x for x in xs if x.requires_grad]
            if fn is not None and leaves:
                def fb():
                    y = fn()
                    y.float().sum().backward()
                    for x in leaves:
                        x.grad = None
                bwd = max(_time(fb, budget_s, max_reps) - fwd, 0.0)
        return fwd, bwd
    except (RuntimeError, TypeError, ValueError, IndexError, StopIteration):
        return None


# ----------------------------------------------------------------------------------------------
# the cache


def device_signature() -> dict[str, Any]:
    """What the timings depend on: entries measured elsewhere are not reused."""
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu x{os.cpu_count()}"
    return {"device": dev, "torch": torch.__version__, "threads": torch.get_num_threads()}


@dataclass
class OpTimes:
    """Measured op times: ``fwd[key]`` seconds (and ``bwd[key]`` when timed)."""

    fwd: dict[str, float] = field(default_factory=dict)
    bwd: dict[str, float] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=lambda: {"timed": 0, "reused": 0, "skipped": 0})

    def __len__(self) -> int:
        return len(self.fwd)

    def seconds(self, graph: OpGraph, node: OpNode, strategy: Strategy, mesh_shape: tuple[int, ...], batch: int,
                dtype: str) -> float | None:
        """Forward seconds of ``node`` under ``strategy`` on this device (None: not in the table)."""
        if node.kind in ALIAS_KINDS:
            return 0.0
        lp = local_problem(graph, node, strategy, tuple(mesh_shape), batch, dtype)
        return None if lp is None else self.fwd.get(lp[0])

    def backward_seconds(self, graph: OpGraph, node: OpNode, strategy: Strategy, mesh_shape, batch: int,
                         dtype: str) -> float | None:
        """Timed backward if profiled with ``backward=True``, else BACKWARD_FACTOR x forward."""
        lp = local_problem(graph, node, strategy, tuple(mesh_shape), batch, dtype)
        if lp is None or lp[0] not in self.fwd:
            return None
        return self.bwd.get(lp[0], BACKWARD_FACTOR * self.fwd[lp[0]])

    def node_seconds(self, graph: OpGraph, node: OpNode, strategies: Iterable[Strategy], mesh_shape, batch: int,
                     dtype: str) -> np.ndarray:
        vals = [self.seconds(graph, node, s, mesh_shape, batch, dtype) for s in strategies]
        return np.array([np.nan if v is None else v for v in vals], dtype=np.float64)


def load_op_times(cache_path: str | Path) -> OpTimes:
    path = Path(cache_path)
    if not path.is_file():
        return OpTimes(meta=device_signature())
    tree = json.loads(path.read_text())
    if tree.get("schema") != CACHE_SCHEMA:
        return OpTimes(meta=device_signature())
    ent = tree.get("entries", {})
    return OpTimes(
        fwd={k: float(v["fwd_s"]) for k, v in ent.items()},
        bwd={k: float(v["bwd_s"]) for k, v in ent.items() if v.get("bwd_s") is not None},
        meta=tree.get("meta", {}),
    )


def save_op_times(times: OpTimes, cache_path: str | Path) -> None:
    entries = {k: {"fwd_s": float(f"{v:.4g}"), **({"bwd_s": float(f"{times.bwd[k]:.4g}")} if k in times.bwd else {})}
               for k, v in sorted(times.fwd.items())}
    tree = {"schema": CACHE_SCHEMA, "meta": times.meta,
            "note": "wall-clock medians on this device, noisy; forward only unless bwd_s is present (else backward = 2 x forward)",
            "entries": entries}
    path = Path(cache_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(tree, indent=1))
    tmp.replace(path)


def _strategies(graph: OpGraph, node: OpNode, mesh_shape: tuple[int, ...]) -> tuple[Strategy, ...]:
    from autoplan.cost.model import GENERIC_BATCH, node_strategies

    names = tuple(f"a{i}" for i in range(len(mesh_shape)))
    return node_strategies(graph, node, Mesh(tuple(mesh_shape), names), GENERIC_BATCH)


def profile_ops(graph: OpGraph, mesh_shapes: Iterable[Sequence[int]], batch: int, dtype: str,
                cache_path: str | Path, *, backward: bool = False, budget_s: float = 0.03, max_reps: int = 20,
                threads: int | None = None, on_progress: Callable[[int, int, str], None] | None = None) -> OpTimes:
    """Time every distinct local op the candidate strategies produce on ``mesh_shapes`` at micro-batch ``batch``.

    Keys already in ``cache_path`` (measured on this device signature) are reused, new ones timed
    once and the file rewritten. Returns the table (``stats`` counts timed / reused / skipped).
    ``threads``: intra-op threads while timing (a CPU rank under torchrun has 1); default: as is.
    """
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _profile_ops(graph, mesh_shapes, batch, dtype, cache_path, backward, budget_s, max_reps, on_progress)
    finally:
        torch.set_num_threads(old_threads)


def _profile_ops(graph, mesh_shapes, batch, dtype, cache_path, backward, budget_s, max_reps, on_progress) -> OpTimes:
    times = load_op_times(cache_path)
    sig = device_signature()
    if any(times.meta.get(k) != sig[k] for k in ("device", "torch", "threads")):
        times = OpTimes(meta=sig)  # measured on another device or thread count: start over
    times.meta = {**sig, **{k: v for k, v in times.meta.items() if k not in sig}}
    todo: dict[str, tuple[OpNode, list, list, tuple]] = {}
    seen: set[str] = set()
    for shape in mesh_shapes:
        shape = tuple(int(s) for s in shape)
        for node in graph.nodes.values():
            if node.kind in ALIAS_KINDS or node.kind not in timed_kinds():
                continue
            for s in _strategies(graph, node, shape):
                lp = local_problem(graph, node, s, shape, batch, dtype)
                if lp is None:
                    continue
                key = lp[0]
                if key in seen:
                    continue
                seen.add(key)
                if key in times.fwd and (not backward or key in times.bwd):
                    times.stats["reused"] += 1
                else:
                    todo[key] = (node, lp[1], lp[2], lp[3])
    for i, (key, (node, shapes, dtypes, out)) in enumerate(todo.items()):
        if on_progress:
            on_progress(i + 1, len(todo), key)
        got = time_op(node, shapes, dtypes, out, dtype, backward=backward, budget_s=budget_s, max_reps=max_reps)
        if got is None:
            times.stats["skipped"] += 1
            continue
        times.fwd[key] = got[0]
        if got[1] is not None:
            times.bwd[key] = got[1]
        times.stats["timed"] += 1
    if todo:
        save_op_times(times, cache_path)
    return times


class MeasuredCompute:
    """Forward compute per strategy: the op-level profile where it has the strategy, else the model's.

    Same interface as ``cost.model.Linear`` / ``Exact`` (``at(batch)``): measured times are exact
    at the profiled micro-batch and scaled in proportion to the batch elsewhere.
    """

    def __init__(self, measured: np.ndarray, batch: int, fallback: Any) -> None:
        self.measured, self.batch, self.fallback = measured, batch, fallback
        self.have = ~np.isnan(measured)

    def at(self, batch: int) -> np.ndarray:
        scaled = np.nan_to_num(self.measured) * (batch / self.batch)
        return np.where(self.have, scaled, self.fallback.at(batch))


def apply_to_pricing(mp: Any, graph: OpGraph, times: OpTimes, batch: int, dtype: str) -> int:
    """Replace ``mp.fwd_compute`` (a ``cost.model.MeshPricing``) by measured times where the table has them.

    Each measured strategy of each op gets its profiled forward time at micro-batch ``batch``
    (``MeasuredCompute``); others keep the cost model's value. Returns the number of strategies
    replaced. The backward stays ``BACKWARD_FACTOR`` x forward, as in the analytic model.
    """
    replaced = 0
    for i, name in enumerate(mp.reps):
        node = graph.nodes[name]
        if node.kind in ALIAS_KINDS:
            continue
        meas = times.node_seconds(graph, node, mp.strategies[i], mp.mesh.shape, batch, dtype)
        have = ~np.isnan(meas)
        if not have.any():
            continue
        mp.fwd_compute[i] = MeasuredCompute(meas, batch, mp.fwd_compute[i])
        replaced += int(have.sum())
    return replaced
