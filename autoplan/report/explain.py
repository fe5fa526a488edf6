"""What a plan says, digested for people: grouped layers, breakdowns, diffs and per-op explanations.

Everything here reads the plan JSON (schema ``autoplan-plan/1``) defensively (``.get``) and
returns plain dicts and lists; ``text``, ``html`` and ``static`` only render them.

* ``segments``: the op sequence cut into top-level runs and repeated blocks, where identical
  consecutive blocks (same ops, same placements) collapse into one group (``blocks.0-95 x96``).
* ``step_breakdown`` / ``memory_breakdown``: the step time and per-device memory split.
* ``diff_plans``: what changed between two plans, grouped the same way, and what it costs.
* ``explain_op``: an op's placements, neighbours, collectives and, when the model is a zoo
  name, its candidate strategies priced by the planner's own cost model with every other op
  held at the plan's choice (``candidates``).
"""
from __future__ import annotations

import difflib
import json
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from autoplan.errors import AutoplanError

# cost/model.py STATE_BYTES_PER_PARAM split: (weights, gradients, optimizer states) bytes per parameter
STATE_SPLIT = {"bf16": (2, 2, 12), "fp16": (2, 2, 12), "fp32": (4, 4, 8)}
BACKWARD_FACTOR = 2.0  # cost/model.py: backward = 2x forward
ALIAS_KINDS = ("view", "transpose", "split", "slice", "constant", "input")  # zero-cost ops, hidden by default

PRED_FIELDS = ("step_time_s", "compute_s", "comm_s", "optimizer_s", "peak_memory_bytes", "param_memory_bytes",
               "activation_memory_bytes", "mfu", "tokens_per_s")


# ---------------------------------------------------------------------------------------------- loading

def load_plan(path: str | Path) -> dict[str, Any]:
    """The plan JSON as a dict; every problem is one AutoplanError line."""
    from autoplan.plan import Plan

    path = Path(path)
    if path.is_dir():
        raise AutoplanError(f"{path} is a directory, not a plan file: give the .json written by `autoplan plan -o`")
    try:
        data = Plan.load(path).data
    except UnicodeDecodeError:
        raise AutoplanError(f"{path} is not a text file: give the .json written by `autoplan plan -o`") from None
    except OSError as exc:
        raise AutoplanError(f"cannot read {path}: {exc.strerror or exc}") from None
    for key in ("mesh", "predicted"):
        if not isinstance(data.get(key), dict):
            raise AutoplanError(f"{path} has no {key!r} section: it is damaged, re-run `autoplan plan`")
    return data


# ---------------------------------------------------------------------------------------------- formatting

def fmt_bytes(n: float | None) -> str:
    if n is None or (isinstance(n, float) and not math.isfinite(n)):
        return "-"
    n = float(n)
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def fmt_seconds(s: float | None) -> str:
    if s is None or (isinstance(s, float) and not math.isfinite(s)):
        return "-"
    a = abs(s)
    if a == 0:
        return "0"
    if a < 1e-3:
        return f"{s * 1e6:.1f} us"
    if a < 1:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"


def fmt_pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def fmt_mesh(mesh: dict[str, int] | None) -> str:
    return " x ".join(f"{k}={v}" for k, v in (mesh or {}).items()) or "-"


def fmt_pl(pl: list[str] | tuple[str, ...] | None) -> str:
    return "[" + ",".join(pl or []) + "]"


def fmt_delta(a: float | None, b: float | None, kind: str) -> str:
    """'b (+x, +y%)' style change from a to b."""
    if a is None or b is None:
        return "-"
    f = {"s": fmt_seconds, "b": fmt_bytes, "pct": fmt_pct}[kind]
    d = b - a
    sign = "+" if d > 0 else ("-" if d < 0 else "±")
    rel = f", {sign}{abs(d) / abs(a) * 100:.1f}%" if a else ""
    if kind == "pct":
        return f"{sign}{abs(d) * 100:.1f} pt"
    return f"{sign}{f(abs(d))}{rel}"


def mesh_of(data: dict[str, Any]) -> dict[str, int]:
    m = data.get("mesh") or {}
    return dict(zip(m.get("axis_names", []), m.get("shape", [])))


# ---------------------------------------------------------------------------------------------- grouping

_BLOCK_RE = re.compile(r"^(.*?)\.(\d+)(?:\.|$)")


def _containers(data: dict[str, Any]) -> set[str]:
    return {g.get("container") for g in (data.get("model") or {}).get("repeated_blocks") or [] if g.get("container")}


def block_of(path: str, containers: set[str] | None = None) -> tuple[str, int] | None:
    """(container, index) of a module or parameter path inside a ModuleList, else None."""
    m = _BLOCK_RE.match(path or "")
    if not m:
        return None
    if containers is not None and containers and m.group(1) not in containers:
        return None
    return m.group(1), int(m.group(2))


def pattern_of(path: str, containers: set[str] | None = None) -> str:
    """'blocks.7.attn.qkv' -> 'blocks.*.attn.qkv'."""
    b = block_of(path, containers)
    if b is None:
        return path
    c, i = b
    return f"{c}.*{path[len(c) + 1 + len(str(i)):]}"


def fmt_ranges(idx: list[int]) -> str:
    """[0,1,2,5,7,8] -> '0-2, 5, 7-8'."""
    idx = sorted(set(idx))
    out, start, prev = [], None, None
    for i in idx:
        if start is None:
            start = prev = i
        elif i == prev + 1:
            prev = i
        else:
            out.append(f"{start}-{prev}" if prev != start else f"{start}")
            start = prev = i
    if start is not None:
        out.append(f"{start}-{prev}" if prev != start else f"{start}")
    return ", ".join(out)


def _op_sig(op: dict[str, Any], container: str, index: int) -> tuple:
    module = op.get("module") or ""
    rel = module[len(container) + 1 + len(str(index)):]
    return (op.get("kind"), op.get("target"), rel, json.dumps(op.get("inputs")), json.dumps(op.get("output")))


def segments(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The ops in order, cut into top-level runs and blocks; identical consecutive blocks merged.

    Each segment: ``{"kind": "top"|"block", "label", "container", "indices", "count", "ops"}``;
    a block segment's ``ops`` are those of its first block (per copy costs).
    """
    containers = _containers(data)
    raw: list[dict[str, Any]] = []
    for op in data.get("ops") or []:
        b = block_of(op.get("module") or "", containers)
        if b is None:
            if raw and raw[-1]["kind"] == "top":
                raw[-1]["ops"].append(op)
            else:
                raw.append({"kind": "top", "container": None, "indices": [], "ops": [op]})
        else:
            c, i = b
            if raw and raw[-1]["kind"] == "block" and raw[-1]["container"] == c and raw[-1]["indices"] == [i]:
                raw[-1]["ops"].append(op)
            else:
                raw.append({"kind": "block", "container": c, "indices": [i], "ops": [op]})
    merged: list[dict[str, Any]] = []
    for seg in raw:
        if seg["kind"] == "block":
            sig = tuple(_op_sig(o, seg["container"], seg["indices"][0]) for o in seg["ops"])
            seg["sig"] = sig
            prev = merged[-1] if merged else None
            if (prev is not None and prev["kind"] == "block" and prev["container"] == seg["container"]
                    and prev["sig"] == sig and seg["indices"][0] == prev["indices"][-1] + 1):
                prev["indices"].append(seg["indices"][0])
                continue
        merged.append(seg)
    out = []
    for seg in merged:
        seg.pop("sig", None)
        n = len(seg["indices"])
        if seg["kind"] == "block":
            first, last = seg["indices"][0], seg["indices"][-1]
            seg["label"] = f"{seg['container']}.{first}" if n == 1 else f"{seg['container']}.{first}-{last}"
            seg["count"] = n
        else:
            mods = sorted({(o.get("module") or "").split(".")[0] for o in seg["ops"] if o.get("module")})
            seg["label"] = ", ".join(mods) if mods else "(top level)"
            seg["count"] = 1
        seg["compute_s"] = sum(float(o.get("compute_s") or 0.0) for o in seg["ops"]) * seg["count"]
        seg["activation_bytes"] = sum(float(o.get("activation_bytes") or 0.0) for o in seg["ops"]) * seg["count"]
        out.append(seg)
    return out


def group_params(params: dict[str, list[str]], containers: set[str] | None = None) -> list[dict[str, Any]]:
    """Parameters with the same pattern and placements as one row: blocks.*.attn.qkv.weight x96."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    order: list[tuple] = []
    for name, pl in (params or {}).items():
        b = block_of(name, containers)
        key = (pattern_of(name, containers), tuple(pl or []))
        if key not in groups:
            order.append(key)
        groups[key].append(b[1] if b else -1)
    rows = []
    for key in order:
        idx = [i for i in groups[key] if i >= 0]
        rows.append({"pattern": key[0], "placements": list(key[1]), "count": len(groups[key]),
                     "blocks": fmt_ranges(idx) if idx else ""})
    return rows


def param_node_names(params: dict[str, Any]) -> dict[str, str]:
    """Graph node name ('model_blocks_0_attn_qkv_weight') -> qualified parameter name."""
    out = {}
    for name in params or {}:
        flat = re.sub(r"[^0-9a-zA-Z_]", "_", name)
        out["model_" + flat] = name
        out[flat] = name
    return out


# ---------------------------------------------------------------------------------------------- breakdowns

def _tflops_redo(pred: dict[str, Any]) -> float | None:
    """The recompute share of ``compute_s`` from an estimate's hardware vs model TFLOP/s, if it has them."""
    hw, model = pred.get("hardware_tflops_per_device"), pred.get("model_tflops_per_device")
    if hw is None or model is None or float(hw) <= 0:
        return None
    return float(pred.get("compute_s") or 0.0) * max(0.0, float(hw) - float(model)) / float(hw)


def _pipeline_estimate(data: dict[str, Any]) -> dict[str, Any]:
    """The pipeline search's estimate behind a pipeline plan's ``predicted`` (has the TFLOP/s fields)."""
    pipe = data.get("pipeline_alternative") or {}
    return pipe.get("predicted") or {} if pipe.get("found") else {}


def _block_compute(data: dict[str, Any]) -> tuple[float, float, str]:
    """(compute in repeated blocks, total compute, recompute of that split) from the ops, or for a
    pipeline plan from the per-op alternative's per-layer prediction."""
    containers = _containers(data)
    ops = data.get("ops") or []
    if ops:
        block = sum(float(o.get("compute_s") or 0.0) for o in ops if block_of(o.get("module") or "", containers) is not None)
        total = sum(float(o.get("compute_s") or 0.0) for o in ops)
        return block, total, (data.get("training") or {}).get("recompute") or "none"
    alt = ((data.get("per_op_alternative") or {}).get("predicted")) or {}
    layers = alt.get("per_layer") or []
    block = sum(float(x.get("compute_s") or 0.0) for x in layers if block_of(x.get("layer") or "", containers) is not None)
    total = sum(float(x.get("compute_s") or 0.0) for x in layers)
    return block, total, alt.get("recompute") or "none"


def recompute_seconds(data: dict[str, Any]) -> float:
    """Compute spent re-running forwards (full recompute adds one forward to every block op).

    A pipeline plan has no ops: its ``predicted["recompute_s"]`` when present, else the estimate's
    ``compute_s * (hardware - model TFLOP/s) / hardware`` (the redone forwards' share).
    """
    training = data.get("training") or {}
    pred = data.get("predicted") or {}
    if pred.get("recompute_s") is not None:
        return float(pred["recompute_s"])
    if (training.get("recompute") or "none") == "none":
        return 0.0
    if is_pipeline(data):
        est = _pipeline_estimate(data)
        redo = _tflops_redo({**est, "compute_s": pred.get("compute_s", est.get("compute_s"))}) if est else None
        if redo is not None:
            return redo
        full = (training.get("recompute") or "none") == "full"
        return float(pred.get("compute_s") or 0.0) / (2.0 + BACKWARD_FACTOR) if full else 0.0
    containers = _containers(data)
    in_block = sum(float(o.get("compute_s") or 0.0) for o in data.get("ops") or []
                   if block_of(o.get("module") or "", containers) is not None)
    return in_block / (2.0 + BACKWARD_FACTOR)  # (1 fwd + 2 bwd + 1 redo) per op: a quarter is the redo


def step_breakdown(data: dict[str, Any], pred: dict[str, Any] | None = None) -> list[tuple[str, float]]:
    """[(part, seconds)]: compute, recompute, exposed communication, optimizer, pipeline bubble.

    The recompute share is exact for the plan itself (from its ops) and estimated for the
    baselines and runners-up (same share of block compute as the plan).
    """
    main = data.get("predicted") or {}
    pred = main if pred is None else pred
    compute = float(pred.get("compute_s") or 0.0)
    if pred is main:
        redo = recompute_seconds(data)
    elif pred.get("recompute_s") is not None:
        redo = float(pred["recompute_s"])
    elif (pred.get("recompute") or "none") == "none":
        redo = 0.0
    elif _tflops_redo(pred) is not None:
        redo = _tflops_redo(pred) or 0.0
    else:
        block, total, recompute = _block_compute(data)
        total = total or 1.0
        if recompute != "none":
            share = block / 4 / total
        else:
            share = (block / 3) / (total + block / 3)
        redo = compute * share
    redo = min(redo, compute)
    return [
        ("compute", compute - redo),
        ("recompute", redo),
        ("exposed communication", float(pred.get("comm_s") or 0.0)),
        ("optimizer", float(pred.get("optimizer_s") or 0.0)),
        ("pipeline bubble", float(pred.get("bubble_s") or 0.0)),
    ]


def memory_breakdown(pred: dict[str, Any], dtype: str = "bf16") -> list[tuple[str, float]]:
    """[(part, bytes)] per device: weights, gradients, optimizer states, activations, other."""
    w, g, o = STATE_SPLIT.get(dtype, STATE_SPLIT["bf16"])
    total = w + g + o
    params = float(pred.get("param_memory_bytes") or 0.0)
    acts = float(pred.get("activation_memory_bytes") or 0.0)
    peak = float(pred.get("peak_memory_bytes") or 0.0)
    other = max(0.0, peak - params - acts)
    parts = [("weights", params * w / total), ("gradients", params * g / total),
             ("optimizer state", params * o / total), ("activations", acts)]
    if other > 0.001 * max(peak, 1.0):
        parts.append(("other", other))
    return parts


def alternatives(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The chosen plan, the solution of the other search (per-op or pipeline) that lost, the
    runners-up and the baselines, as rows {name, role, ...prediction}."""
    rows = [{"name": "autoplan", "role": "chosen", **(data.get("predicted") or {})}]
    if is_pipeline(data):
        rows[0]["description"] = "chosen: pipeline"
    alt = data.get("per_op_alternative") or {}
    if alt.get("predicted"):
        rows.append({"name": "per-op plan (not chosen)", "role": "alternative", **alt["predicted"],
                     "description": execution_line(alt.get("execution") or {"runtime": "per-op"})})
    pipe = data.get("pipeline_alternative") or {}
    if pipe.get("found") and pipe.get("predicted") and not is_pipeline(data):
        c = pipe.get("config") or {}
        rows.append({"name": "pipeline (not chosen)", "role": "alternative", **pipe["predicted"],
                     "mesh": {"pp": c.get("pp"), "dp": c.get("dp"), "tp": c.get("tp")},
                     "recompute": c.get("recompute", pipe["predicted"].get("recompute")),
                     "description": f"pipeline search: {pipeline_config_text(c, pipe['predicted'].get('micro_batches'))}"})
    for i, r in enumerate(data.get("runners_up") or []):
        rows.append({"name": f"runner-up {i + 1}", "role": "runner-up", **r})
    for name, b in (data.get("baselines") or {}).items():
        rows.append({"name": name, "role": "baseline", **b})
    return rows


def collective_summary(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Collectives per step by (phase, kind, axis): count and bytes per device."""
    acc: dict[tuple, list[float]] = defaultdict(lambda: [0, 0.0])
    for c in data.get("collectives") or []:
        key = (c.get("phase", "?"), c.get("kind", "?"), c.get("axis", "?"))
        n = int(c.get("per_step") or 1)
        acc[key][0] += n
        acc[key][1] += float(c.get("bytes") or 0.0) * n
    rows = [{"phase": k[0], "kind": k[1], "axis": k[2], "count": v[0], "bytes": v[1]} for k, v in acc.items()]
    rows.sort(key=lambda r: -r["bytes"])
    return rows


def placement_counts(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Per mesh axis: how many parameters are sharded / replicated on it."""
    names = (data.get("mesh") or {}).get("axis_names") or []
    out = []
    for a, axis in enumerate(names):
        sharded = sum(1 for pl in (data.get("params") or {}).values() if a < len(pl) and pl[a].startswith("S"))
        out.append({"axis": axis, "sharded": sharded, "total": len(data.get("params") or {})})
    return out


def axis_roles(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Per mesh axis: size, link, and what it splits (batch / weights / both) judged from placements."""
    mesh = data.get("mesh") or {}
    names, shape = mesh.get("axis_names") or [], mesh.get("shape") or []
    per_node = int((data.get("cluster") or {}).get("devices_per_node") or 0)
    inputs = data.get("inputs") or {}
    out = []
    inner = 1
    spans = []
    for size in reversed(shape):
        spans.append(inner * size)
        inner *= size
    spans = list(reversed(spans))
    pipe = pipeline_layout(data) if is_pipeline(data) else None
    for a, (axis, size) in enumerate(zip(names, shape)):
        if pipe is not None:
            link = "intra-node (NVLink)" if per_node and spans[a] <= per_node else ("inter-node" if per_node else "")
            if per_node and spans[a] > per_node and (spans[a] // size) < per_node:
                link = "crosses nodes"
            out.append({"axis": axis, "size": size, "role": _recipe_axis_role(axis, size, pipe), "link": link})
            continue
        weights = [(float(o.get("compute_s") or 0.0), (o.get("output") or [])) for o in data.get("ops") or []]
        total_c = sum(w for w, _ in weights) or 1.0
        batch = any(a < len(pl) and pl[a] == "S(0)" for pl in inputs.values()) or (
            sum(w for w, pl in weights if a < len(pl) and pl[a] == "S(0)") / total_c > 0.5)
        wsh = sum(1 for pl in (data.get("params") or {}).values() if a < len(pl) and pl[a].startswith("S"))
        ntot = len(data.get("params") or {})
        if size == 1:
            role = "unused (size 1)"
        elif batch and wsh:
            role = f"splits the batch and shards {wsh}/{ntot} weight tensors (FSDP/ZeRO-3 style)"
        elif batch:
            role = "data parallel: splits the batch, weights replicated"
        elif wsh:
            role = f"tensor parallel: shards {wsh}/{ntot} weight tensors"
        else:
            role = "replicated work"
        link = "intra-node (NVLink)" if per_node and spans[a] <= per_node else ("inter-node" if per_node else "")
        if per_node and spans[a] > per_node and (spans[a] // size) < per_node:
            link = "crosses nodes"
        out.append({"axis": axis, "size": size, "role": role, "link": link})
    return out


# ---------------------------------------------------------------------------------------------- execution

ZERO_MEANING = {0: "weights, gradients and optimizer states replicated over dp (DDP)",
                1: "optimizer states sharded over dp (ZeRO-1)",
                2: "optimizer states and gradients sharded over dp (ZeRO-2)",
                3: "weights, gradients and optimizer states sharded over dp (ZeRO-3 / FSDP)"}
SCHEDULE_NAMES = {"1f1b": "1F1B", "interleaved": "interleaved 1F1B", "gpipe": "GPipe"}
FROM_TEXT = {"pipeline search": "from the pipeline search",
             "fixed configuration": "a fixed configuration (autoplan estimate -o)",
             "ddp": "from the per-op plan, a DDP layout",
             "fsdp": "from the per-op plan, an FSDP layout",
             "megatron": "from the per-op plan, a Megatron tensor-parallel layout"}


def execution_line(execution: dict[str, Any] | None) -> str:
    """One line: how ``autoplan train`` runs the plan (see ``autoplan.execution``)."""
    if not execution or execution.get("runtime", "per-op") == "per-op":
        why = f", not a native recipe: {execution['reason']}" if execution and execution.get("reason") else ""
        return f"runs with the per-op runtime{why}"
    r = execution.get("recipe") or {}
    parts = [f"tp={r.get('tp', 1)} pp={r.get('pp', 1)} dp={r.get('dp', 1)}", f"ZeRO {r.get('zero', 0)}",
             f"{r.get('micro_batches', 1)} micro-batch{'es' if r.get('micro_batches', 1) != 1 else ''}"]
    if int(r.get("pp") or 1) > 1:
        v = int(r.get("virtual_stages") or 1)
        parts.append(f"{SCHEDULE_NAMES.get(r.get('schedule'), r.get('schedule'))}" + (f" (v={v})" if v > 1 else ""))
    parts.append(f"recompute {r.get('recompute', 'none')}")
    if r.get("sequence_parallel"):
        parts.append("sequence parallel")
    src = execution.get("from")
    where = f" ({FROM_TEXT.get(src, 'from ' + str(src))})" if src else ""
    return f"runs as a native recipe: {', '.join(parts)}{where}"


def is_pipeline(data: dict[str, Any]) -> bool:
    """True for a plan executed only as a recipe (the pipeline search won): no per-op placements."""
    if data.get("ops"):
        return False
    ex = data.get("execution") or {}
    return (ex.get("runtime") == "recipe" and bool(ex.get("recipe"))) or "pipeline_stages" in (data.get("training") or {})


def split_blocks(blocks: int, chunks: int) -> list[int]:
    """Balanced blocks per chunk (they differ by at most one; the extra blocks go to the last
    chunks, as ``autoplan.runtime.recipe.split_layers`` places them)."""
    if chunks <= 0:
        return []
    base, extra = divmod(max(blocks, 0), chunks)
    return [base + (1 if c >= chunks - extra else 0) for c in range(chunks)]


def pipeline_config_text(c: dict[str, Any], micro_batches: int | None = None) -> str:
    v = int(c.get("virtual_stages") or 1)
    out = f"tp={c.get('tp', 1)} pp={c.get('pp', 1)} dp={c.get('dp', 1)}"
    if v > 1:
        out += f" v={v}"
    if micro_batches:
        out += f", {micro_batches} micro-batches of {c.get('micro_batch', '?')}"
    return out + f", ZeRO {c.get('zero', 0)}, recompute {c.get('recompute', 'none')}"


def pipeline_layout(data: dict[str, Any]) -> dict[str, Any]:
    """A pipeline plan's configuration and what every stage holds.

    ``{pp, v, tp, dp, schedule, micro_batches, micro_batch, zero, sequence_parallel, recompute,
    container, blocks, chunks: [{chunk, stage, virtual, first, last, count}], stages: [{stage,
    ranks, chunks, blocks, embedding, head, holds}], bubble_s, bubble_share}``. The repeated
    blocks are cut into ``pp * v`` balanced chunks (or ``recipe.stage_layers``), chunk ``i`` on
    stage ``i % pp``; the first stage also holds the embedding, the last the final norm and head.
    """
    t = data.get("training") or {}
    r = ((data.get("execution") or {}).get("recipe")) or {}
    cfg = ((data.get("pipeline_alternative") or {}).get("config")) or {}
    mesh = mesh_of(data)

    def pick(key: str, *alts: Any, default: Any = 1) -> Any:
        for x in (r.get(key), *alts):
            if x is not None:
                return x
        return default

    pp = int(pick("pp", t.get("pipeline_stages"), mesh.get("pp"), cfg.get("pp")))
    v = int(pick("virtual_stages", t.get("virtual_stages"), cfg.get("virtual_stages")))
    tp = int(pick("tp", mesh.get("tp"), cfg.get("tp")))
    dp = int(pick("dp", mesh.get("dp"), cfg.get("dp")))
    m = int(pick("micro_batches", t.get("micro_batches")))
    schedule = pick("schedule", default="interleaved" if v > 1 else "1f1b")
    groups = (data.get("model") or {}).get("repeated_blocks") or []
    container = groups[0].get("container") if groups else None
    blocks = int(groups[0].get("count") or 0) if groups else 0
    n = pp * v
    counts = r.get("stage_layers")
    if not (isinstance(counts, list) and len(counts) == n and sum(counts) == blocks):
        counts = split_blocks(blocks, n)
    chunks, start = [], 0
    for i, cnt in enumerate(counts):
        chunks.append({"chunk": i, "stage": i % pp, "virtual": i // pp, "first": start, "last": start + cnt - 1, "count": cnt})
        start += cnt
    per_stage = tp * dp
    stages = []
    for s in range(pp):
        mine = [c for c in chunks if c["stage"] == s]
        held = [c for c in mine if c["count"] > 0]
        idx = [i for c in held for i in range(c["first"], c["last"] + 1)]
        parts = (["embedding"] if s == 0 else []) + (
            [f"{container or 'blocks'} {fmt_ranges(idx)}"] if idx else ([] if blocks else ["(blocks unknown)"])) + (
            ["final norm + head"] if s == pp - 1 else [])
        stages.append({"stage": s, "ranks": (s * per_stage, (s + 1) * per_stage - 1), "chunks": mine,
                       "blocks": sum(c["count"] for c in mine), "embedding": s == 0, "head": s == pp - 1,
                       "holds": ", ".join(parts)})
    pred = data.get("predicted") or {}
    bubble = float(pred.get("bubble_s") or 0.0)
    step = float(pred.get("step_time_s") or 0.0)
    return {"pp": pp, "v": v, "tp": tp, "dp": dp, "schedule": schedule, "micro_batches": m,
            "micro_batch": t.get("micro_batch", cfg.get("micro_batch")), "zero": int(pick("zero", t.get("zero"), cfg.get("zero"), default=0)),
            "sequence_parallel": bool(pick("sequence_parallel", t.get("sequence_parallel"), cfg.get("sequence_parallel"), default=False)),
            "recompute": pick("recompute", t.get("recompute"), cfg.get("recompute"), default="none"),
            "container": container, "blocks": blocks, "chunks": chunks, "stages": stages,
            "bubble_s": bubble, "bubble_share": bubble / step if step else 0.0}


def fmt_ranks(ranks: tuple[int, int]) -> str:
    a, b = ranks
    return f"rank {a}" if a == b else f"ranks {a}-{b}"


def pipeline_headline(p: dict[str, Any]) -> str:
    """'16 pipeline stages x 4 virtual (interleaved 1F1B), 64 micro-batches of 1'."""
    v = f" x {p['v']} virtual" if p["v"] > 1 else ""
    stages = f"{p['pp']} pipeline stage{'s' if p['pp'] != 1 else ''}{v}"
    return (f"{stages} ({SCHEDULE_NAMES.get(p['schedule'], p['schedule'])}) · {p['micro_batches']} micro-batch"
            f"{'es' if p['micro_batches'] != 1 else ''} of {p['micro_batch']}")


def _recipe_axis_role(axis: str, size: int, p: dict[str, Any]) -> str:
    if size == 1:
        return "unused (size 1)"
    if axis == "pp":
        return f"pipeline: splits the layers into {size} stages" + (f" ({p['v']} chunks each, interleaved)" if p["v"] > 1 else "")
    if axis == "dp":
        return "data parallel: splits the batch; " + ZERO_MEANING.get(p["zero"], f"ZeRO {p['zero']}")
    if axis == "tp":
        return ("tensor parallel (Megatron): splits every block's weights" +
                (", norms split along the sequence (sequence parallel)" if p["sequence_parallel"] else ""))
    return "?"


def pipeline_schedule(pp: int, v: int, m: int, fwd: float, bwd: float) -> list[list[tuple[str, int, int, float, float]]]:
    """Simulated (1F1B / interleaved 1F1B) schedule: per stage, [(F|B, micro-batch, chunk, start, end)].

    Every chunk's forward of one micro-batch takes ``fwd``, its backward ``bwd``; an op starts when
    its stage is free and the previous (forward) or next (backward) chunk of that micro-batch is
    done. Megatron's order per stage (warm-up forwards, one forward one backward, cool-down); when
    that order cannot run (interleaving needs ``m`` a multiple of ``pp``), all forwards then all
    backwards.
    """
    def order(s: int, interleaved: bool) -> list[tuple[str, int, int]]:
        total = m * v
        if interleaved:
            def unit(k: int, fw: bool) -> tuple[int, int]:
                c = (k % (pp * v)) // pp
                return (k // (pp * v)) * pp + k % pp, (c if fw else v - 1 - c)
            warm = min(total, (pp - s - 1) * 2 + (v - 1) * pp)
        else:
            def unit(k: int, fw: bool) -> tuple[int, int]:
                return k, 0
            warm = min(total, pp - s - 1)
        seq, f, b = [], 0, 0
        for _ in range(warm):
            seq.append(("F", *unit(f, True)))
            f += 1
        while f < total:
            seq.append(("F", *unit(f, True)))
            f += 1
            seq.append(("B", *unit(b, False)))
            b += 1
        while b < total:
            seq.append(("B", *unit(b, False)))
            b += 1
        return seq

    def gpipe(s: int) -> list[tuple[str, int, int]]:
        return [("F", i, c) for c in range(v) for i in range(m)] + [("B", i, c) for c in reversed(range(v)) for i in range(m)]

    def simulate(orders: list[list[tuple[str, int, int]]]):
        done: dict[tuple[str, int, int], float] = {}  # (kind, micro-batch, global chunk) -> end
        free = [0.0] * pp
        pos = [0] * pp
        out: list[list[tuple[str, int, int, float, float]]] = [[] for _ in range(pp)]
        last = pp * v - 1
        remaining = sum(len(o) for o in orders)
        while remaining:
            progressed = False
            for s in range(pp):
                while pos[s] < len(orders[s]):
                    kind, mb, c = orders[s][pos[s]]
                    g = c * pp + s
                    if kind == "F":
                        dep = ("F", mb, g - 1) if g > 0 else None
                    else:
                        dep = ("B", mb, g + 1) if g < last else ("F", mb, g)
                    if dep is not None and dep not in done:
                        break
                    start = max(free[s], done[dep] if dep is not None else 0.0)
                    end = start + (fwd if kind == "F" else bwd)
                    done[(kind, mb, g)] = end
                    free[s] = end
                    out[s].append((kind, mb, c, start, end))
                    pos[s] += 1
                    remaining -= 1
                    progressed = True
            if not progressed:
                return None
        return out

    res = None
    if v == 1 or m % pp == 0:
        res = simulate([order(s, v > 1) for s in range(pp)])
    return res if res is not None else simulate([gpipe(s) for s in range(pp)]) or [[] for _ in range(pp)]


# ---------------------------------------------------------------------------------------------- diff

def _group_changes(items: list[tuple[str, str, Any, Any]], containers: set[str], suffix: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """(name, path for grouping, old, new) -> grouped rows; ``suffix[name]`` is appended to block patterns."""
    groups: dict[tuple, list[tuple[str, int]]] = {}
    suffix = suffix or {}
    for name, path, old, new in items:
        b = block_of(path, containers)
        what = pattern_of(path, containers) + suffix.get(name, "") if b else (f"{name}{suffix.get(name, '')}" if suffix else name)
        key = (what, json.dumps(old), json.dumps(new))
        groups.setdefault(key, []).append((name, b[1] if b else -1))
    rows = []
    for (pat, old, new), members in groups.items():
        idx = [i for _, i in members if i >= 0]
        rows.append({"what": pat, "names": [n for n, _ in members], "count": len(members),
                     "blocks": fmt_ranges(idx) if idx else "", "old": json.loads(old), "new": json.loads(new)})
    return rows


def diff_plans(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """What changed between plans a and b, grouped, and its cost (b - a)."""
    containers = _containers(a) | _containers(b)
    ma, mb = a.get("model") or {}, b.get("model") or {}
    notes = []
    if ma.get("fingerprint") != mb.get("fingerprint"):
        notes.append(f"different models: {ma.get('name')} ({ma.get('fingerprint')}) vs {mb.get('name')} ({mb.get('fingerprint')})")
    if a.get("world_size") != b.get("world_size"):
        notes.append(f"world size {a.get('world_size')} -> {b.get('world_size')}")
    if (a.get("cluster") or {}).get("name") != (b.get("cluster") or {}).get("name"):
        notes.append(f"cluster {(a.get('cluster') or {}).get('name')} -> {(b.get('cluster') or {}).get('name')}")
    config = []
    ta, tb = a.get("training") or {}, b.get("training") or {}
    if mesh_of(a) != mesh_of(b):
        config.append(("mesh", fmt_mesh(mesh_of(a)), fmt_mesh(mesh_of(b))))
    for key in ("micro_batches", "micro_batch", "recompute", "dtype", "global_batch", "seq_len", "pipeline_stages",
                "virtual_stages", "zero", "sequence_parallel"):
        if ta.get(key) != tb.get(key):
            config.append((key.replace("_", "-"), str(ta.get(key, "-")), str(tb.get(key, "-"))))
    ea, eb = execution_line(a.get("execution")), execution_line(b.get("execution"))
    if ea != eb:
        config.append(("runs", ea.removeprefix("runs "), eb.removeprefix("runs ")))
    pa, pb = a.get("params") or {}, b.get("params") or {}
    oa = {o.get("name"): o for o in a.get("ops") or []}
    ob = {o.get("name"): o for o in b.get("ops") or []}
    if is_pipeline(a) or is_pipeline(b):
        notes.append("a pipeline plan has no per-op placements: only the configuration and the cost are compared")
        pa, pb, oa, ob = {}, {}, {}, {}
    pitems = [(n, n, pa.get(n), pb.get(n)) for n in list(pa) + [n for n in pb if n not in pa] if pa.get(n) != pb.get(n)]
    oitems = []
    suffix = {}
    for name in list(oa) + [n for n in ob if n not in oa]:
        x, y = oa.get(name), ob.get(name)
        px = {"inputs": x.get("inputs"), "output": x.get("output")} if x else None
        py = {"inputs": y.get("inputs"), "output": y.get("output")} if y else None
        if px != py:
            op = x or y
            suffix[name] = f" ({op.get('kind')})"
            oitems.append((name, op.get("module") or "", px, py))
    cost = []
    for field, kind in (("step_time_s", "s"), ("compute_s", "s"), ("comm_s", "s"), ("optimizer_s", "s"),
                        ("peak_memory_bytes", "b"), ("param_memory_bytes", "b"), ("activation_memory_bytes", "b"),
                        ("mfu", "pct"), ("tokens_per_s", "n")):
        va, vb = (a.get("predicted") or {}).get(field), (b.get("predicted") or {}).get(field)
        if va is None and vb is None:
            continue
        cost.append({"field": field, "kind": kind, "a": va, "b": vb})
    ba, bb = (a.get("predicted") or {}).get("bubble_s"), (b.get("predicted") or {}).get("bubble_s")
    if ba or bb:
        cost.insert(4, {"field": "bubble_s", "kind": "s", "a": ba or 0.0, "b": bb or 0.0})
    fa, fb = (a.get("predicted") or {}).get("fits"), (b.get("predicted") or {}).get("fits")
    return {"notes": notes, "config": config, "params": _group_changes(pitems, containers),
            "ops": _group_changes(oitems, containers, suffix), "cost": cost, "fits": (fa, fb),
            "n_params": (len(pa), len(pb)), "n_ops": (len(oa), len(ob)),
            "same": not (config or pitems or oitems or notes)}


# ---------------------------------------------------------------------------------------------- explain

def find_op(data: dict[str, Any], query: str) -> dict[str, Any]:
    """The op named ``query`` (an op name, or a module path that owns exactly one computing op)."""
    ops = data.get("ops") or []
    if not ops and is_pipeline(data):
        raise AutoplanError(f"this plan runs as a pipeline recipe ({pipeline_config_text(pipeline_layout(data))}) and has no "
                            "per-op placements to explain: `autoplan show PLAN` shows its stages")
    by_name = {o.get("name"): o for o in ops}
    if query in by_name:
        return by_name[query]
    owned = [o for o in ops if o.get("module") == query]
    computing = [o for o in owned if o.get("kind") not in ALIAS_KINDS] or owned
    if len(computing) == 1:
        return computing[0]
    if len(computing) > 1:
        names = ", ".join(o["name"] for o in computing[:8])
        raise AutoplanError(f"module {query!r} has {len(computing)} ops: pick one of {names}")
    pool = list(by_name) + sorted({o.get("module") for o in ops if o.get("module")})
    close = difflib.get_close_matches(query, pool, n=5, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else "; `autoplan show PLAN` lists the ops"
    raise AutoplanError(f"no op {query!r} in this plan{hint}")


def _producer_placement(data: dict[str, Any], name: str, pnames: dict[str, str], ops: dict[str, Any]) -> tuple[str, list[str] | None]:
    if name in ops:
        return ops[name].get("kind", "op"), ops[name].get("output")
    if name in (data.get("inputs") or {}):
        return "input", data["inputs"][name]
    if name in pnames:
        return "param " + pnames[name], (data.get("params") or {}).get(pnames[name])
    return "buffer", None


def explain_op(data: dict[str, Any], query: str, *, with_candidates: bool = True) -> dict[str, Any]:
    op = find_op(data, query)
    name = op["name"]
    ops = {o.get("name"): o for o in data.get("ops") or []}
    pnames = param_node_names(data.get("params") or {})
    producers = []
    for i, p in enumerate(op.get("producers") or []):
        kind, pl = _producer_placement(data, p, pnames, ops)
        need = (op.get("inputs") or [None] * (i + 1))[i] if i < len(op.get("inputs") or []) else None
        producers.append({"name": p, "kind": kind, "has": pl, "needs": need, "reshard": pl is not None and need is not None and pl != need})
    consumers = [{"name": o["name"], "kind": o.get("kind"), "needs": (o.get("inputs") or [])[i] if i < len(o.get("inputs") or []) else None}
                 for o in data.get("ops") or [] for i, p in enumerate(o.get("producers") or []) if p == name]
    colls = [c for c in data.get("collectives") or [] if c.get("dst") == name or c.get("src") == name]
    containers = _containers(data)
    b = block_of(op.get("module") or "", containers)
    copies = 1
    if b:
        for g in (data.get("model") or {}).get("repeated_blocks") or []:
            if g.get("container") == b[0]:
                copies = int(g.get("count") or 1)
    result: dict[str, Any] = {"op": op, "producers": producers, "consumers": consumers, "collectives": colls,
                              "block": b, "copies": copies, "mesh": mesh_of(data), "candidates": None, "candidates_note": None}
    if with_candidates:
        try:
            result["candidates"], result["candidates_note"] = candidates(data, name)
        except AutoplanError as exc:
            result["candidates_note"] = str(exc)
    return result


def _rebuild(data: dict[str, Any]):
    """(graph, tying, cluster, mesh, cfg) of the plan's model; zoo models only."""
    import torch

    from autoplan.capture import capture
    from autoplan.cost.model import StepConfig
    from autoplan.graph import build_graph
    from autoplan.hardware import load_cluster
    from autoplan.mesh import Mesh
    from autoplan.models import resolve_model
    from autoplan.repeats import find_repeats

    model = data.get("model") or {}
    training = data.get("training") or {}
    try:
        spec = resolve_model(model.get("name") or "")
    except AutoplanError:
        raise AutoplanError(f"model {model.get('name')!r} is not a zoo name, so its candidates cannot be re-priced "
                            "(only the chosen placement is in the plan)") from None
    cluster = data.get("cluster") or {}
    try:
        clus = load_cluster(cluster.get("name") or "")
    except AutoplanError:
        raise AutoplanError(f"cluster profile {cluster.get('name')!r} is not shipped: cannot re-price candidates") from None
    seq = training.get("seq_len") or 1
    with torch.device("meta"):
        module = spec.build()

    cap = capture(module, spec.call_spec(seq), method=model.get("capture") or "auto")
    graph = build_graph(cap)
    if model.get("fingerprint") and graph.fingerprint != model["fingerprint"]:
        raise AutoplanError(f"zoo model {spec.name} changed since the plan was made (fingerprint {graph.fingerprint} "
                            f"!= {model['fingerprint']}): re-plan to see candidates")
    tying = find_repeats(graph)
    m = data["mesh"]
    mesh = Mesh(tuple(int(s) for s in m["shape"]), tuple(m["axis_names"]))
    cfg = StepConfig(int(training["global_batch"]), int(training.get("micro_batches") or 1),
                     (training.get("recompute") or "none") != "none", training.get("dtype") or "bf16")
    return graph, tying, clus, mesh, cfg


def _chosen_index(strats, node, data, ops, pnames_rev, inputs) -> int | None:
    from autoplan.strategies.placement import format_placements

    want_out, want_ins = None, None
    if node.name in ops:
        want_out, want_ins = ops[node.name].get("output"), ops[node.name].get("inputs")
    elif node.kind == "param" and node.param in (data.get("params") or {}):
        want_out = data["params"][node.param]
    elif node.name in inputs:
        want_out = inputs[node.name]
    for k, s in enumerate(strats):
        if want_out is not None and format_placements(s.out) != want_out:
            continue
        if want_ins is not None and [format_placements(p) for p in s.ins] != want_ins:
            continue
        if want_out is None and any(str(p) != "R" for p in s.out):
            continue
        return k
    return None


def candidates(data: dict[str, Any], name: str) -> tuple[list[dict[str, Any]], str | None]:
    """Every strategy of op ``name`` priced with all other ops at the plan's choice (per copy).

    Uses the planner's own pricing (``cost.model.price_mesh`` + ``assemble``) on the recaptured
    zoo model; costs are seconds per step of one copy of the op: its compute (forward, backward,
    recompute), its own and its edges' communication, and its optimizer step.
    """
    import numpy as np

    from autoplan.cost.comm import loss_report_seconds
    from autoplan.cost.model import BACKWARD_FACTOR as BF, assemble, price_mesh
    from autoplan.strategies.placement import format_placements

    graph, tying, clus, mesh, cfg = _rebuild(data)
    if name not in graph.nodes:
        raise AutoplanError(f"op {name!r} is not in the recaptured model")
    budget = float((data.get("cluster") or {}).get("usable_memory_bytes") or clus.device.usable_memory_bytes)
    mp = price_mesh(graph, tying, mesh, clus, cfg.dtype)
    pr = assemble(mp, tying, cfg, budget)
    ops = {o.get("name"): o for o in data.get("ops") or []}
    inputs = data.get("inputs") or {}
    choice = []
    unmatched = 0
    for rep, strats in zip(pr.nodes, pr.strategies):
        k = _chosen_index(strats, graph.nodes[rep], data, ops, None, inputs)
        if k is None:
            unmatched += 1
            k = int(np.argmin(pr.problem.node_cost[len(choice)]))
        choice.append(k)
    note = None
    cost, mem = pr.problem.evaluate(choice)
    pred = data.get("predicted") or {}
    # the solver's cost, plus what every strategy pays alike: the loss report and the per-op runtime's overhead
    cost += loss_report_seconds(clus, int(data.get("world_size") or mesh.size)) + float(pred.get("runtime_overhead_s") or 0.0)
    planned = float(pred.get("step_time_s") or 0.0)
    if unmatched or (planned and abs(cost - planned) > 1e-6 * planned + 1e-12):
        note = (f"re-priced step time {fmt_seconds(cost)} differs from the plan's {fmt_seconds(planned)}"
                + (f" ({unmatched} ops not matched)" if unmatched else "") + ": the cost model or profile changed since planning")
    rep = tying.rep[name]
    i = pr.nodes.index(rep)
    count = tying.count[rep]
    b, m = cfg.micro_batch, cfg.micro_batches
    redo = 1 if (cfg.recompute and rep in tying.in_block) else 0
    pure = count * m * (1 + BF + redo) * mp.fwd_compute[i].at(b)
    rows = []
    chosen = choice[i]
    for s, st in enumerate(pr.strategies[i]):
        comp = float(pr.compute_s[i][s])
        own = float(pr.own_comm_s[i][s]) if math.isfinite(comp) else 0.0  # the op's own collectives
        edge = 0.0
        for u, v, _pos, act, sync in pr.edge_info:
            mat = act + sync
            if u == i and v == i:
                edge += float(mat[s, s])
            elif v == i:
                edge += float(mat[choice[u], s])
            elif u == i:
                edge += float(mat[s, choice[v]])
        opt = float(pr.optimizer_s[i][s])
        memb = float(pr.param_bytes[i][s] + pr.activation_bytes[i][s])
        total = comp + own + edge + opt
        rows.append({
            "index": s, "output": format_placements(st.out), "inputs": [format_placements(p) for p in st.ins],
            "compute_s": float(pure[s]) / count if math.isfinite(comp) else math.inf,
            "comm_s": (own + edge) / count, "optimizer_s": opt / count, "total_s": total / count,
            "memory_bytes": memb / count, "legal": math.isfinite(total), "chosen": s == chosen,
        })
    base = rows[chosen]
    peak = float((data.get("predicted") or {}).get("peak_memory_bytes") or mem)
    for r in rows:
        r["delta_s"] = r["total_s"] - base["total_s"] if r["legal"] else math.inf
        r["delta_memory_bytes"] = (r["memory_bytes"] - base["memory_bytes"]) * count
        r["fits"] = peak + r["delta_memory_bytes"] <= budget * (1 + 1e-9)
    rows.sort(key=lambda r: (not r["legal"], r["total_s"]))
    return rows, note


def verdict(exp: dict[str, Any]) -> str:
    """One sentence: why the chosen candidate won."""
    rows = exp.get("candidates")
    if not rows:
        return ""
    chosen = next((r for r in rows if r["chosen"]), None)
    legal = [r for r in rows if r["legal"]]
    if chosen is None or not legal:
        return ""
    cheaper = [r for r in legal if r["total_s"] < chosen["total_s"] * (1 - 1e-9) - 1e-15]
    if not cheaper:
        nxt = next((r for r in legal if not r["chosen"]), None)
        if nxt is None:
            return "it is the only legal placement."
        return (f"it is the cheapest of {len(legal)} legal placements with its neighbours as planned; "
                f"the next, {fmt_pl(nxt['output'])}, costs {fmt_seconds(nxt['delta_s'])} more per copy.")
    unfit = [r for r in cheaper if not r["fits"]]
    if len(unfit) == len(cheaper):
        return (f"{len(cheaper)} cheaper placement(s) would not fit in memory "
                f"(e.g. {fmt_pl(cheaper[0]['output'])}: {fmt_bytes(cheaper[0]['delta_memory_bytes'])} more per device).")
    return (f"{len(cheaper)} placement(s) are cheaper in isolation (e.g. {fmt_pl(cheaper[0]['output'])}, "
            f"{fmt_seconds(-cheaper[0]['delta_s'])} less per copy): the solver traded them for memory or for its neighbours' choices.")
