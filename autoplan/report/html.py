"""``autoplan show plan.json -o report.html``: one self-contained HTML page (inline CSS, JS, SVG).

No network, no CDN, no fonts to fetch: the page opens offline. Sections have stable ids:
``summary``, ``mesh``, ``graph``, ``memory``, ``step-time``, ``timeline``, ``compare``,
``params``, ``collectives``; a pipeline plan (no per-op placements) has ``pipeline`` instead of
``graph`` and no ``params`` / ``collectives`` (``sections_for``). Repeated layers are drawn once (``blocks.0-125 x126``), so the
page stays small for any model size. ``#report-status`` carries ``data-ready``,
``data-errors`` (script errors seen by the page) and ``data-load-ms`` for tests.
"""
from __future__ import annotations

import html
import json
import math
from typing import Any

from autoplan.report import explain as E

AXIS_COLORS = {"R": "#cfd8e3", "P": "#e5484d", "S(0)": "#3e7bfa", "S(1)": "#12a594", "S(2)": "#f5a524",
               "S(3)": "#8e4ec6", "S(4)": "#d6409f"}
PART_COLORS = {"compute": "#3e7bfa", "recompute": "#93b4fd", "exposed communication": "#f5a524",
               "optimizer": "#8e4ec6", "pipeline bubble": "#cfd8e3",
               "weights": "#3e7bfa", "gradients": "#12a594", "optimizer state": "#8e4ec6",
               "activations": "#f5a524", "other": "#9aa5b1"}
PLACEMENT_MEANING = {"R": "replicated", "P": "partial sums (pending reduce)", "S(0)": "sharded on dim 0",
                     "S(1)": "sharded on dim 1", "S(2)": "sharded on dim 2", "S(3)": "sharded on dim 3"}


def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def pcolor(p: str) -> str:
    return AXIS_COLORS.get(p, "#d6409f")


def _num(x: Any) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return 0.0
    return v if math.isfinite(v) else 0.0


# ---------------------------------------------------------------------------------------------- sections

def _kpis(data: dict[str, Any]) -> str:
    p = data.get("predicted") or {}
    c = data.get("cluster") or {}
    t = data.get("training") or {}
    usable = _num(c.get("usable_memory_bytes") or c.get("memory_bytes"))
    peak = _num(p.get("peak_memory_bytes"))
    ddp = (data.get("baselines") or {}).get("ddp") or {}
    speed = ""
    best_base = min((b for b in (data.get("baselines") or {}).values() if b.get("fits") and b.get("step_time_s")),
                    key=lambda b: b["step_time_s"], default=None)
    if best_base and p.get("step_time_s"):
        speed = f"{best_base['step_time_s'] / p['step_time_s']:.2f}x vs best baseline"
    elif (data.get("baselines") or {}) and p.get("step_time_s"):
        speed = "no baseline fits"
    del ddp
    pipe = E.pipeline_layout(data) if E.is_pipeline(data) else None
    if pipe is not None:
        v = f" x {pipe['v']} virtual" if pipe["v"] > 1 else ""
        stages = f"{data.get('world_size', '?')} devices, {pipe['pp']} pipeline stage{'s' if pipe['pp'] != 1 else ''}{v}"
        mb_sub = (f"of {t.get('micro_batch', '?')} samples, {E.SCHEDULE_NAMES.get(pipe['schedule'], pipe['schedule'])}, "
                  f"recompute {t.get('recompute', 'none')}")
    else:
        stages = f"{data.get('world_size', '?')} devices, 1 pipeline stage"
        mb_sub = f"of {t.get('micro_batch', '?')} samples, recompute {t.get('recompute', 'none')}"
    cards = [
        ("step time", E.fmt_seconds(p.get("step_time_s")), speed),
        ("MFU", E.fmt_pct(p.get("mfu")), f"of {c.get('device', 'device')} peak"),
        ("tokens / s", f"{_num(p.get('tokens_per_s')):,.0f}" if p.get("tokens_per_s") else "-", f"global batch {t.get('global_batch', '?')} x {t.get('seq_len', '?')}"),
        ("memory / device", E.fmt_bytes(peak), f"{100 * peak / usable:.0f}% of {E.fmt_bytes(usable)} usable" if usable else ""),
        ("mesh", E.fmt_mesh(E.mesh_of(data)), stages),
        ("micro-batches", f"{t.get('micro_batches', 1)}", mb_sub),
    ]
    fits = p.get("fits")
    badge = '<span class="badge ok">fits in memory</span>' if fits else '<span class="badge bad">does NOT fit</span>'
    out = ['<div class="kpis">']
    for label, value, sub in cards:
        out.append(f'<div class="kpi"><div class="kl">{esc(label)}</div><div class="kv{" sm" if len(value) > 11 else ""}">{esc(value)}</div><div class="ks">{esc(sub)}</div></div>')
    out.append("</div>")
    run = f'<div class="run">{esc(E.execution_line(data.get("execution")))}</div>'
    return badge + run + "".join(out)


def _mesh_svg(data: dict[str, Any]) -> str:
    mesh = data.get("mesh") or {}
    names, shape = list(mesh.get("axis_names") or []), [int(s) for s in mesh.get("shape") or []]
    world = int(math.prod(shape)) if shape else int(data.get("world_size") or 1)
    per_node = int((data.get("cluster") or {}).get("devices_per_node") or 0)
    if len(shape) >= 2:
        width = shape[-1]
        row_label = " x ".join(f"{n}={s}" for n, s in zip(names[:-1], shape[:-1]))
        col_label = f"{names[-1]} = {shape[-1]}"
    else:
        width = min(world, per_node or 8, 16)
        row_label = f"{names[0] if names else 'dp'} = {world} (continues across rows)" if world > width else ""
        col_label = f"{names[0] if names else 'dp'} = {world}" if world <= width else ""
    rows = max(1, world // max(width, 1))
    shown_cols = list(range(width)) if width <= 16 else list(range(12)) + [-1] + [width - 2, width - 1]
    shown_rows = list(range(rows)) if rows <= 6 else [0, 1, 2, 3, -1, rows - 1]
    cw, ch, gap = 46, 34, 6
    left, top = 130, 34
    W = left + len(shown_cols) * (cw + gap) + 40
    H = top + len(shown_rows) * (ch + gap) + 30
    out = [f'<svg class="mesh" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" aria-label="device mesh">']
    inner = shape[-1] if len(shape) >= 2 else 1
    for ri, r in enumerate(shown_rows):
        y = top + ri * (ch + gap)
        if r < 0:
            out.append(f'<text x="{left + 4}" y="{y + ch / 2 + 4}" class="ell">&#8942; {rows - 5:,} more rows</text>')
            continue
        if len(shape) >= 2:
            coords, rest = [], r
            for n, size in reversed(list(zip(names[:-1], shape[:-1]))):
                coords.append(f"{n} {rest % size}")
                rest //= size
            shown = [c for c, size in zip(reversed(coords), shape[:-1]) if size > 1] or [coords[-1]]
            out.append(f'<text x="{left - 10}" y="{y + ch / 2 + 4}" text-anchor="end" class="axl">{esc(" · ".join(shown))}</text>')
        for ci, c in enumerate(shown_cols):
            x = left + ci * (cw + gap)
            if c < 0:
                out.append(f'<text x="{x + cw / 2}" y="{y + ch / 2 + 4}" text-anchor="middle" class="ell">&#8230;</text>')
                continue
            rank = r * width + c
            shard = (c % inner) if len(shape) >= 2 else 0
            hue = 205 + shard * 135 / max(inner - 1, 1) if len(shape) >= 2 else 215
            node = rank // per_node if per_node else 0
            tip = f"rank {rank} · node {node}" + "".join(
                f" · {n}={(rank // int(math.prod(shape[i + 1:]))) % s}" for i, (n, s) in enumerate(zip(names, shape)))
            out.append(f'<g data-tip="{esc(tip)}"><rect x="{x}" y="{y}" width="{cw}" height="{ch}" rx="6" '
                       f'fill="hsl({hue},70%,{62 if len(shape) >= 2 else 64}%)" stroke="#fff"/>'
                       f'<text x="{x + cw / 2}" y="{y + ch / 2 + 4}" text-anchor="middle" class="rk">{rank}</text></g>')
        if per_node and width * 1 >= 1:
            # node boundaries on this row
            for ci, c in enumerate(shown_cols):
                if c >= 0 and (r * width + c) % per_node == 0 and c != 0:
                    x = left + ci * (cw + gap) - gap / 2
                    out.append(f'<line x1="{x}" y1="{y - 2}" x2="{x}" y2="{y + ch + 2}" class="nodeline"/>')
            if r > 0 and ri > 0 and shown_rows[ri - 1] >= 0 and (r * width) % per_node == 0 and width < per_node:
                out.append(f'<line x1="{left - 4}" y1="{y - gap / 2}" x2="{left + len(shown_cols) * (cw + gap)}" y2="{y - gap / 2}" class="nodeline"/>')
    if col_label:
        out.append(f'<text x="{left}" y="{top - 12}" class="axt">&#8594; {esc(col_label)}</text>')
    if row_label:
        out.append(f'<text x="12" y="{top - 12}" class="axt">&#8595; {esc(row_label)}</text>')
    out.append("</svg>")
    return "".join(out)


def _mesh_section(data: dict[str, Any]) -> str:
    roles = E.axis_roles(data)
    c = data.get("cluster") or {}
    per_node = c.get("devices_per_node")
    rows = "".join(f"<tr><td><b>{esc(r['axis'])}</b></td><td class=num>{r['size']:,}</td><td>{esc(r['link'])}</td><td>{esc(r['role'])}</td></tr>" for r in roles)
    params = E.group_params(data.get("params") or {}, E._containers(data))
    sharded = [p for p in params if any(x != "R" for x in p["placements"])]
    names = (data.get("mesh") or {}).get("axis_names") or []
    maps = "".join(
        f"<tr><td class=mono>{esc(p['pattern'])}</td><td class=num>{'x' + str(p['count']) if p['count'] > 1 else ''}</td><td>"
        + " ".join(_pill(a, x) for a, x in zip(names, p["placements"])) + "</td></tr>" for p in sharded[:24])
    more = f"<p class=muted>{len(sharded) - 24} more sharded parameter groups in <a href='#params'>Parameters</a>.</p>" if len(sharded) > 24 else ""
    if not sharded:
        maps = "<tr><td colspan=3 class=muted>every weight is replicated on every axis (pure data parallelism)</td></tr>"
    shape = [int(x) for x in (data.get("mesh") or {}).get("shape") or [1]]
    width = shape[-1] if len(shape) >= 2 else min(int(data.get("world_size") or 1), int(per_node or 8), 16)
    node_note = (f"Each row is one node ({per_node} devices)." if per_node and width == per_node
                 else f"Dashed lines mark node boundaries ({per_node} devices per node)." if per_node else "")
    stages = "<b>1 stage</b>: no pipeline parallelism — every device runs every layer, so there is no pipeline bubble."
    if E.is_pipeline(data):
        pipe = E.pipeline_layout(data)
        stages = (f"<b>{pipe['pp']} stage{'s' if pipe['pp'] != 1 else ''}</b>"
                  + (f" x {pipe['v']} virtual" if pipe["v"] > 1 else "")
                  + f" ({esc(E.SCHEDULE_NAMES.get(pipe['schedule'], pipe['schedule']))}): each row of {pipe['dp'] * pipe['tp']} devices "
                  "with the same pp index is one stage; see <a href='#pipeline'>Pipeline stages</a>.")
        maps = "".join(f"<tr><td>{esc(what)}</td><td></td><td>{esc(how)}</td></tr>" for what, how in _recipe_weights(pipe))
        more = ""
    return (f'<div class="two"><div>{_mesh_svg(data)}<p class="muted">Each cell is a device (rank); colour = position on the innermost axis '
            f"(devices of one colour hold the same weight shard). {esc(node_note)}</p></div>"
            f'<div><table class="t"><tr><th>axis</th><th>size</th><th>link</th><th>what it splits</th></tr>{rows}</table>'
            f'<p>Pipeline: {stages}</p><h4>How the weights map onto the mesh</h4>'
            f'<table class="t"><tr><th>parameter</th><th></th><th>placement per axis</th></tr>{maps}</table>{more}</div></div>')


def _recipe_weights(pipe: dict[str, Any]) -> list[tuple[str, str]]:
    """How a pipeline recipe places the weights (the plan has no per-parameter placements)."""
    rows = [("layers", f"split over pp: each stage holds {pipe['pp'] * pipe['v'] // max(pipe['pp'], 1)} chunk(s) of "
                       f"{pipe['container'] or 'blocks'} (embedding on the first stage, head on the last)")]
    if pipe["tp"] > 1:
        rows.append(("block weights", f"Megatron split over tp={pipe['tp']}: column-parallel input projections, "
                                      "row-parallel output projections"))
    rows.append(("over dp", f"dp={pipe['dp']}: " + E.ZERO_MEANING.get(pipe["zero"], f"ZeRO {pipe['zero']}")
                 if pipe["dp"] > 1 else "dp=1: one copy per stage and tp shard"))
    return rows


def _pill(axis: str, p: str) -> str:
    dark = p not in ("R",)
    return (f'<span class="pill" style="background:{pcolor(p)};color:{"#fff" if dark else "#334"}" '
            f'data-tip="{esc(axis)}: {esc(PLACEMENT_MEANING.get(p, p))}">{esc(axis)}:{esc(p)}</span>')


def _legend_placements(data: dict[str, Any]) -> str:
    seen = set()
    for o in data.get("ops") or []:
        seen.update(o.get("output") or [])
    order = [p for p in ("R", "S(0)", "S(1)", "S(2)", "S(3)", "S(4)", "P") if p in seen] + sorted(seen - set(AXIS_COLORS))
    return '<div class="legend">' + "".join(
        f'<span><i style="background:{pcolor(p)}"></i>{esc(p)} {esc(PLACEMENT_MEANING.get(p, ""))}</span>' for p in order) + "</div>"


def _graph_layout(seg: dict[str, Any]) -> tuple[list[dict[str, Any]], list[tuple[str, str, bool]]]:
    """Layered layout of one segment's computing ops; alias ops (views...) collapsed into edges."""
    ops = seg["ops"]
    by_name = {o["name"]: o for o in ops}
    alias = {o["name"] for o in ops if o.get("kind") in E.ALIAS_KINDS}
    # effective producers of an op: walk through alias ops; remember whether any hop reshards
    memo: dict[str, list[tuple[str, bool]]] = {}

    def eff(name: str) -> list[tuple[str, bool]]:
        if name in memo:
            return memo[name]
        memo[name] = []
        o = by_name[name]
        res: list[tuple[str, bool]] = []
        for i, p in enumerate(o.get("producers") or []):
            if p not in by_name:
                continue
            need = (o.get("inputs") or [None] * (i + 1))[i] if i < len(o.get("inputs") or []) else None
            resh = need is not None and by_name[p].get("output") != need
            if p in alias:
                res.extend((q, r or resh) for q, r in eff(p))
            else:
                res.append((p, resh))
        memo[name] = res
        return res

    nodes = [o for o in ops if o["name"] not in alias] or ops
    keep = {o["name"] for o in nodes}
    depth: dict[str, int] = {}
    edges = []
    for o in nodes:
        ps = [(p, r) for p, r in (eff(o["name"]) if o["name"] not in alias else []) if p in keep]
        d = 0
        seen = {}
        for p, r in ps:
            d = max(d, depth.get(p, 0) + 1)
            seen[p] = seen.get(p, False) or r
        depth[o["name"]] = d
        edges += [(p, o["name"], r) for p, r in seen.items()]
    layers: dict[int, list[dict[str, Any]]] = {}
    for o in nodes:
        layers.setdefault(depth[o["name"]], []).append(o)
    placed = []
    for d in sorted(layers):
        for k, o in enumerate(layers[d]):
            placed.append({"op": o, "row": d, "col": k, "ncol": len(layers[d])})
    return placed, edges


def _op_label(o: dict[str, Any], seg: dict[str, Any]) -> str:
    mod = o.get("module") or ""
    if seg["kind"] == "block":
        prefix = f"{seg['container']}.{seg['indices'][0]}"
        mod = mod[len(prefix) + 1:] if mod.startswith(prefix) else mod
    tail = mod.split(".")[-1] if mod else ""
    tgt = o.get("target") or o.get("kind") or ""
    return f"{tail} · {tgt}" if tail and tail != tgt else tgt


def _graph_section(data: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    segs = E.segments(data)
    names = (data.get("mesh") or {}).get("axis_names") or []
    details: dict[str, Any] = {}
    parts = [_legend_placements(data),
             '<p class="muted">Each box is an op of the forward graph (views, transposes and splits are folded into the arrows). '
             'The coloured stripes are its output placement on each mesh axis ('
             + ", ".join(esc(n) for n in names) + '); the grey bar is its compute time. '
             '<span style="color:#e5484d">Red dashed arrows</span> need a resharding collective. Hover for details; click to pin.</p>']
    bw, bh, gx, gy = 176, 40, 14, 22
    for si, seg in enumerate(segs):
        placed, edges = _graph_layout(seg)
        max_c = max((_num(o.get("compute_s")) for o in seg["ops"]), default=0.0) or 1.0
        ncols = max((p["ncol"] for p in placed), default=1)
        nrows = max((p["row"] for p in placed), default=0) + 1
        W = max(ncols * (bw + gx) + gx, 420)
        H = nrows * (bh + gy) + gy
        pos = {}
        for p in placed:
            off = (W - p["ncol"] * (bw + gx) + gx) / 2
            x = off + p["col"] * (bw + gx)
            y = gy / 2 + p["row"] * (bh + gy)
            pos[p["op"]["name"]] = (x, y)
        svg = [f'<svg class="g" viewBox="0 0 {W:.0f} {H:.0f}" width="{W:.0f}" height="{H:.0f}">']
        for u, v, resh in edges:
            if u not in pos or v not in pos:
                continue
            x1, y1 = pos[u][0] + bw / 2, pos[u][1] + bh
            x2, y2 = pos[v][0] + bw / 2, pos[v][1]
            cls = "e r" if resh else "e"
            my = (y1 + y2) / 2
            svg.append(f'<path class="{cls}" d="M{x1:.1f},{y1:.1f} C{x1:.1f},{my:.1f} {x2:.1f},{my:.1f} {x2:.1f},{y2 - 4:.1f}" marker-end="url(#{"ar" if resh else "a"})"/>')
        for p in placed:
            o = p["op"]
            x, y = pos[o["name"]]
            key = f"{si}:{o['name']}"
            out = o.get("output") or []
            stripe = ""
            sw = 8
            for a, pl in enumerate(out):
                stripe += f'<rect x="{x + a * sw}" y="{y}" width="{sw}" height="{bh}" fill="{pcolor(pl)}"/>'
            frac = _num(o.get("compute_s")) / max_c
            label = _op_label(o, seg)
            lab = label if len(label) <= 24 else label[:23] + "…"
            pl_txt = ",".join(out)
            svg.append(
                f'<g class="op" data-op="{esc(key)}" tabindex="0">'
                f'<rect class="box" x="{x}" y="{y}" width="{bw}" height="{bh}" rx="5"/>{stripe}'
                f'<rect x="{x + sw * len(out) + 6}" y="{y + bh - 7}" width="{max(1.5, frac * (bw - sw * len(out) - 12)):.1f}" height="3" rx="1.5" class="cbar"/>'
                f'<text x="{x + sw * len(out) + 6}" y="{y + 15}" class="ol">{esc(lab)}</text>'
                f'<text x="{x + sw * len(out) + 6}" y="{y + 28}" class="os">[{esc(pl_txt)}] {esc(E.fmt_seconds(o.get("compute_s")))}</text></g>')
            prods = []
            for i, pr in enumerate(o.get("producers") or []):
                need = (o.get("inputs") or [])[i] if i < len(o.get("inputs") or []) else None
                prods.append([pr, need])
            details[key] = {"name": o["name"], "kind": o.get("kind"), "target": o.get("target"), "module": o.get("module"),
                            "out": out, "ins": prods, "c": o.get("compute_s"), "a": o.get("activation_bytes"),
                            "n": seg["count"], "seg": seg["label"]}
        svg.append("</svg>")
        hidden = sum(1 for o in seg["ops"] if o.get("kind") in E.ALIAS_KINDS)
        head = (f'<div class="sh"><b>{esc(seg["label"])}</b>'
                + (f' <span class="x">x{seg["count"]}</span> <span class="muted">identical blocks drawn once; costs per block</span>' if seg["count"] > 1 else "")
                + f'<span class="sr">{len(seg["ops"]) - hidden} ops (+{hidden} views) · compute {esc(E.fmt_seconds(seg["compute_s"]))}'
                + (f' total · activations {esc(E.fmt_bytes(seg["activation_bytes"]))}' if seg["activation_bytes"] else "") + "</span></div>")
        parts.append(f'<div class="seg{" blk" if seg["kind"] == "block" else ""}">{head}<div class="gs">{"".join(svg)}</div></div>')
        if si < len(segs) - 1:
            parts.append('<div class="down">&#8595;</div>')
    parts.append('<div id="op-detail" class="detail muted">Click an op to see its placements and cost.</div>')
    return "".join(parts), details


CHUNK_COLORS = ["#3e7bfa", "#12a594", "#f5a524", "#8e4ec6", "#d6409f", "#0091ff", "#e5484d", "#30a46c"]
MAX_STAGE_ROWS = 16


def _shown_stages(n: int, cap: int = MAX_STAGE_ROWS) -> list[int]:
    """Stage indices to draw; -1 marks the elided middle of a long pipeline."""
    if n <= cap:
        return list(range(n))
    head = cap // 2
    return list(range(head)) + [-1] + list(range(n - (cap - head - 1), n))


def _pipeline_section(data: dict[str, Any]) -> str:
    """The stages of a pipeline plan: which blocks each holds (diagram over the model's depth) and a table."""
    pipe = E.pipeline_layout(data)
    pp, v, blocks = pipe["pp"], pipe["v"], pipe["blocks"]
    cont = pipe["container"] or "blocks"
    shown = _shown_stages(pp)
    left, width, rh, gap, endw = 150, 640, 26, 6, 46
    unit = width / max(blocks, 1)
    top = 34
    H = top + len(shown) * (rh + gap) + 34
    W = left + endw * 2 + width + 190
    svg = [f'<svg class="chart pipe" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" aria-label="pipeline stages">']
    x0 = left + endw
    svg.append(f'<text x="{left}" y="16" class="lab s">embedding</text>'
               f'<text x="{x0 + width / 2:.1f}" y="16" text-anchor="middle" class="lab s">{esc(cont)} 0-{max(blocks - 1, 0)} '
               f'(model depth &#8594;)</text><text x="{x0 + width + 4}" y="16" class="lab s">norm + head</text>')
    for ri, s_ in enumerate(shown):
        y = top + ri * (rh + gap)
        if s_ < 0:
            svg.append(f'<text x="{left - 10}" y="{y + rh / 2 + 4}" text-anchor="end" class="ell">&#8942; {pp - len(shown) + 1} more stages</text>')
            continue
        st = pipe["stages"][s_]
        svg.append(f'<text x="{left - 10}" y="{y + 11}" text-anchor="end" class="lab b">stage {s_}</text>'
                   f'<text x="{left - 10}" y="{y + 24}" text-anchor="end" class="lab s">{esc(E.fmt_ranks(st["ranks"]))}</text>'
                   f'<rect x="{x0}" y="{y}" width="{width}" height="{rh}" fill="#f1f4f8"/>')
        if st["embedding"]:
            svg.append(f'<rect x="{left}" y="{y}" width="{endw - 4}" height="{rh}" rx="4" fill="#9aa5b1" data-tip="stage {s_}: embedding"/>')
        if st["head"]:
            svg.append(f'<rect x="{x0 + width + 4}" y="{y}" width="{endw - 4}" height="{rh}" rx="4" fill="#9aa5b1" '
                       f'data-tip="stage {s_}: final norm + head"/>')
        for c in st["chunks"]:
            if c["count"] <= 0:
                continue
            cx = x0 + c["first"] * unit
            tip = (f"stage {s_}, chunk {c['chunk']} (virtual stage {c['virtual']}): {cont} "
                   + (f"{c['first']}-{c['last']}" if c["count"] > 1 else f"{c['first']}") + f" ({c['count']} block{'s' if c['count'] > 1 else ''})")
            svg.append(f'<rect x="{cx:.2f}" y="{y}" width="{max(c["count"] * unit - 0.8, 1.2):.2f}" height="{rh}" '
                       f'fill="{CHUNK_COLORS[c["virtual"] % len(CHUNK_COLORS)]}" data-tip="{esc(tip)}"/>')
        svg.append(f'<text x="{x0 + width + endw + 8}" y="{y + 15}" class="val">{st["blocks"]} block{"s" if st["blocks"] != 1 else ""}'
                   f'{" + embedding" if st["embedding"] else ""}{" + head" if st["head"] else ""}</text>')
    svg.append("</svg>")
    legend = ""
    if v > 1:
        legend = '<div class="legend">' + "".join(
            f'<span><i style="background:{CHUNK_COLORS[k % len(CHUNK_COLORS)]}"></i>chunk {k} of each stage (virtual stage {k})</span>'
            for k in range(v)) + '<span><i style="background:#9aa5b1"></i>embedding / head</span></div>'
    rows = []
    for k, s_ in enumerate(_shown_stages(pp, 32)):
        if s_ < 0:
            rows.append(f"<tr><td colspan=5 class=muted>&#8942; {pp - 31} more stages</td></tr>")
            continue
        st = pipe["stages"][s_]
        rows.append(f"<tr><td class=num>{s_}</td><td class=nw>{esc(E.fmt_ranks(st['ranks']))}</td><td class=num>{st['blocks']}</td>"
                    f"<td class=mono>{esc(st['holds'])}</td><td class=num>{len([c for c in st['chunks'] if c['count']])}</td></tr>")
    sched = E.SCHEDULE_NAMES.get(pipe["schedule"], pipe["schedule"])
    facts = [("stages (pp)", str(pp)), ("virtual stages per device (v)", str(v)), ("schedule", sched),
             ("micro-batches per step", f"{pipe['micro_batches']} of {pipe['micro_batch']} sample{'s' if pipe['micro_batch'] != 1 else ''}"),
             ("devices per stage", f"tp={pipe['tp']} x dp={pipe['dp']}"),
             ("ZeRO", f"ZeRO-{pipe['zero']}: {E.ZERO_MEANING.get(pipe['zero'], '')}"),
             ("sequence parallel", "yes" if pipe["sequence_parallel"] else "no"), ("recompute", str(pipe["recompute"])),
             ("pipeline bubble", f"{E.fmt_seconds(pipe['bubble_s'])} ({100 * pipe['bubble_share']:.1f}% of the step)")]
    ftbl = "".join(f"<tr><td>{esc(k)}</td><td>{esc(val)}</td></tr>" for k, val in facts)
    split = (f"The {blocks} {esc(cont)} are cut into {pp * v} balanced chunks (they differ by at most one block); chunk <i>i</i> runs on "
             f"stage <i>i</i> mod {pp}" + (f", so every stage holds {v} chunks spread over the depth (interleaved schedule)" if v > 1 else "")
             + ". The first stage also holds the embedding, the last the final norm and the head." if blocks else
             "The model's repeated blocks are not recorded in the plan, so the split is not drawn.")
    return (f'<p class="muted">{split} Activations pass from stage to stage (point-to-point); gradients flow back the same way.</p>'
            + legend + "".join(svg)
            + f'<div class="two"><table class="t"><tr><th>configuration</th><th></th></tr>{ftbl}</table>'
            f'<table class="t"><tr><th>stage</th><th>devices</th><th>blocks</th><th>holds</th><th>chunks</th></tr>{"".join(rows)}</table></div>')


def _hbar(segments: list[tuple[str, float]], total: float, width: int, height: int, x0: float, y: float, tipfmt) -> str:
    out, x = [], x0
    for name, v in segments:
        if v <= 0 or total <= 0:
            continue
        w = v / total * width
        out.append(f'<rect x="{x:.2f}" y="{y}" width="{max(w, 0.8):.2f}" height="{height}" fill="{PART_COLORS.get(name, "#999")}" '
                   f'data-tip="{esc(name)}: {esc(tipfmt(v))}"/>')
        x += w
    return "".join(out)


def _legend(names: list[str]) -> str:
    return '<div class="legend">' + "".join(f'<span><i style="background:{PART_COLORS.get(n, "#999")}"></i>{esc(n)}</span>' for n in names) + "</div>"


def _memory_section(data: dict[str, Any]) -> str:
    c = data.get("cluster") or {}
    usable = _num(c.get("usable_memory_bytes"))
    physical = _num(c.get("memory_bytes")) or usable
    dtype = (data.get("training") or {}).get("dtype") or "bf16"
    rows = E.alternatives(data)
    scale = max([usable, physical] + [_num(r.get("peak_memory_bytes")) for r in rows if r.get("fits")] +
                [_num(data.get("predicted", {}).get("peak_memory_bytes"))]) * 1.08 or 1.0
    left, width, bh, gap = 170, 620, 22, 10
    H = 30 + len(rows) * (bh + gap) + 20
    svg = [f'<svg viewBox="0 0 {left + width + 150} {H}" width="{left + width + 150}" height="{H}" class="chart">']
    for i, r in enumerate(rows):
        y = 24 + i * (bh + gap)
        cls = "lab b" if r["role"] == "chosen" else "lab"
        svg.append(f'<text x="{left - 10}" y="{y + 15}" text-anchor="end" class="{cls}">{esc(r["name"])}</text>')
        peak = r.get("peak_memory_bytes")
        if r.get("step_time_s") is None and not r.get("fits"):
            need = f"needs {E.fmt_bytes(peak)}" if peak else "no legal sharding"
            svg.append(f'<text x="{left + 6}" y="{y + 15}" class="bad">does not fit ({esc(need)})</text>')
            continue
        parts = E.memory_breakdown(r, dtype)
        svg.append(_hbar(parts, scale, width, bh, left, y, E.fmt_bytes))
        end = left + _num(peak) / scale * width
        svg.append(f'<text x="{end + 6}" y="{y + 15}" class="val">{esc(E.fmt_bytes(peak))}</text>')
    for val, label, cls, ty in ((usable, "usable", "cap", 11), (physical, "physical", "cap2", H - 2)):
        if val and (cls == "cap" or abs(physical - usable) > 1):
            x = left + val / scale * width
            anchor = "end" if cls == "cap" else "start"
            svg.append(f'<line x1="{x:.1f}" y1="14" x2="{x:.1f}" y2="{H - 12}" class="{cls}"/>'
                       f'<text x="{x:.1f}" y="{ty}" text-anchor="{anchor}" class="capt">{label} {esc(E.fmt_bytes(val))}</text>')
    svg.append("</svg>")
    p = data.get("predicted") or {}
    parts = E.memory_breakdown(p, dtype)
    tbl = "".join(f"<tr><td><i class=sw style='background:{PART_COLORS.get(n)}'></i>{esc(n)}</td><td class=num>{esc(E.fmt_bytes(v))}</td>"
                  f"<td class=num>{100 * v / max(_num(p.get('peak_memory_bytes')), 1):.0f}%</td></tr>" for n, v in parts)
    share = f"{100 * _num(p.get('peak_memory_bytes')) / usable:.0f}% of usable" if usable else ""
    return (_legend([n for n, _ in parts]) + "".join(svg) +
            f'<table class="t narrow"><tr><th>per device (chosen plan)</th><th>bytes</th><th>share</th></tr>{tbl}'
            f"<tr><td><b>peak</b></td><td class=num><b>{esc(E.fmt_bytes(p.get('peak_memory_bytes')))}</b></td><td class=num>"
            f"{share}</td></tr></table>")


def _step_section(data: dict[str, Any]) -> str:
    p = data.get("predicted") or {}
    parts = E.step_breakdown(data)
    total = sum(v for _, v in parts) or 1.0
    width = 760
    svg = [f'<svg viewBox="0 0 {width + 20} 46" width="{width + 20}" height="46" class="chart">',
           _hbar(parts, total, width, 30, 10, 8, E.fmt_seconds), "</svg>"]
    tbl = "".join(f"<tr><td><i class=sw style='background:{PART_COLORS.get(n)}'></i>{esc(n)}</td><td class=num>{esc(E.fmt_seconds(v))}</td>"
                  f"<td class=num>{100 * v / total:.1f}%</td></tr>" for n, v in parts)
    note = []
    if p.get("recompute", "none") != "none" or (data.get("training") or {}).get("recompute", "none") != "none":
        note.append("Recompute re-runs every repeated block's forward during backward (a quarter of its compute).")
    if E.is_pipeline(data):
        pipe = E.pipeline_layout(data)
        note.append(f"Compute, communication and bubble are those of the slowest stage. The pipeline bubble is the time every stage idles "
                    f"while the {pipe['pp']} stages fill and drain: (pp-1)/v = {(pipe['pp'] - 1) / pipe['v']:.3g} passes of one "
                    "micro-batch through a stage.")
        mx = max((st["blocks"] for st in pipe["stages"]), default=0) or 1
        seg_rows = "".join(
            f"<tr><td class=mono>stage {st['stage']}</td><td class='num nw'>{st['blocks']}{' + emb' if st['embedding'] else ''}"
            f"{' + head' if st['head'] else ''}</td><td><div class=bar style='width:{max(1, 300 * st['blocks'] / mx):.0f}px'></div></td></tr>"
            for st in (pipe["stages"][i] for i in _shown_stages(pipe["pp"]) if i >= 0))
        where = f'<table class="t"><tr><th>where the compute goes</th><th>{esc(pipe["container"] or "blocks")}</th><th></th></tr>{seg_rows}</table>'
    else:
        note.append("Communication is the part the cost model does not overlap with compute; the pipeline bubble is 0 with one stage.")
        segs = E.segments(data)
        mx = max((s["compute_s"] for s in segs), default=0.0) or 1.0
        seg_rows = "".join(
            f"<tr><td class=mono>{esc(s['label'])}{' x' + str(s['count']) if s['count'] > 1 else ''}</td><td class=num>{esc(E.fmt_seconds(s['compute_s']))}</td>"
            f"<td><div class=bar style='width:{max(1, 300 * s['compute_s'] / mx):.0f}px'></div></td></tr>" for s in segs)
        where = f'<table class="t"><tr><th>where the compute goes</th><th>compute</th><th></th></tr>{seg_rows}</table>'
    return (_legend([n for n, v in parts if v > 0 or n != "pipeline bubble"]) + "".join(svg) +
            f'<div class="two"><table class="t"><tr><th>part of one step</th><th>time</th><th>share</th></tr>{tbl}'
            f"<tr><td><b>step</b></td><td class=num><b>{esc(E.fmt_seconds(p.get('step_time_s')))}</b></td><td></td></tr></table>"
            f'{where}</div><p class="muted">{" ".join(note)}</p>')


MAX_SCHEDULE_OPS = 20000  # forward/backward boxes drawn at most (longer schedules are drawn with fewer micro-batches)


def _pipeline_timeline(data: dict[str, Any]) -> str:
    """The simulated pipeline schedule: one row per stage, a forward and a backward box per micro-batch and chunk."""
    pipe = E.pipeline_layout(data)
    p = data.get("predicted") or {}
    pp, v, m = pipe["pp"], pipe["v"], max(1, pipe["micro_batches"])
    parts = dict(E.step_breakdown(data))
    busy = parts["compute"] + parts["recompute"] + parts["exposed communication"]
    opt = parts["optimizer"]
    # a unit = one micro-batch through one chunk; backward = 2x forward (+ the redone forward)
    comp = parts["compute"] or 1.0
    ratio_b = (comp * E.BACKWARD_FACTOR / (1 + E.BACKWARD_FACTOR) + parts["recompute"]) / (comp / (1 + E.BACKWARD_FACTOR))
    unit = busy / (m * v) if busy > 0 else 1.0 / (m * v)
    fwd = unit / (1 + ratio_b)
    bwd = unit - fwd
    shown_m = m
    while shown_m > pp and 2 * shown_m * v * pp > MAX_SCHEDULE_OPS:
        shown_m = max(pp, shown_m // 2 // pp * pp or pp)
    sched = E.pipeline_schedule(pp, v, shown_m, fwd, bwd)
    end = max((op[4] for row in sched for op in row), default=0.0) or 1.0
    rows = _shown_stages(pp)
    left, width, rh, gap = 150, 800, 20, 4
    top = 12
    H = top + len(rows) * (rh + gap) + 60
    scale = width / (end + opt) if end + opt > 0 else 1.0
    svg = [f'<svg viewBox="0 0 {left + width + 30} {H}" width="{left + width + 30}" height="{H}" class="chart">']
    for ri, s_ in enumerate(rows):
        y = top + ri * (rh + gap)
        if s_ < 0:
            svg.append(f'<text x="{left - 10}" y="{y + 14}" text-anchor="end" class="ell">&#8942; {pp - len(rows) + 1} more</text>')
            continue
        svg.append(f'<text x="{left - 10}" y="{y + 14}" text-anchor="end" class="lab">stage {s_}</text>'
                   f'<rect x="{left}" y="{y}" width="{end * scale:.1f}" height="{rh}" fill="#eef1f5" data-tip="stage {s_}: idle (bubble)"/>')
        # one path per (kind, chunk): thousands of boxes stay a few hundred KiB
        paths: dict[tuple[str, int], list[str]] = {}
        for kind, mb, c, t0, t1 in sched[s_]:
            yy = y + (0 if kind == "F" else rh / 2)
            w = max((t1 - t0) * scale - 0.3, 0.4)
            paths.setdefault((kind, c), []).append(f"M{left + t0 * scale:.1f} {yy:g}h{w:.1f}v{rh / 2:g}h-{w:.1f}z")
        for (kind, c), d in sorted(paths.items()):
            n = len(d)
            tip = (f"stage {s_}: {'forwards' if kind == 'F' else 'backwards'}" + (f" of chunk {c}" if v > 1 else "")
                   + f", {n} micro-batch{'es' if n != 1 else ''} of {E.fmt_seconds(fwd if kind == 'F' else bwd)} each")
            svg.append(f'<path d="{"".join(d)}" fill="{CHUNK_COLORS[c % len(CHUNK_COLORS)]}" fill-opacity="{1 if kind == "F" else 0.6}" '
                       f'data-tip="{esc(tip)}"/>')
        svg.append(f'<rect x="{left + end * scale:.2f}" y="{y}" width="{max(opt * scale, 1.5):.2f}" height="{rh}" fill="#8e4ec6" '
                   f'data-tip="optimizer step {esc(E.fmt_seconds(opt))}"/>')
    ay = top + len(rows) * (rh + gap) + 4
    real = _num(p.get("step_time_s")) or (end + opt)
    svg.append(f'<line x1="{left}" y1="{ay}" x2="{left + width}" y2="{ay}" class="axis"/>')
    for i in range(6):
        tx = left + i * width / 5
        label = E.fmt_seconds((end + opt) * i / 5) if shown_m == m else f"{100 * i / 5:.0f}%"
        svg.append(f'<line x1="{tx:.1f}" y1="{ay}" x2="{tx:.1f}" y2="{ay + 5}" class="axis"/>'
                   f'<text x="{tx:.1f}" y="{ay + 18}" text-anchor="middle" class="tick">{esc(label)}</text>')
    svg.append(f'<text x="{left}" y="{ay + 38}" class="lab s">pipeline bubble {esc(E.fmt_seconds(pipe["bubble_s"]))} '
               f'({100 * pipe["bubble_share"]:.1f}% of the {esc(E.fmt_seconds(real))} step): the grey gaps at the start and end of each row</text></svg>')
    legend = '<div class="legend">' + "".join(
        f'<span><i style="background:{CHUNK_COLORS[k % len(CHUNK_COLORS)]}"></i>{"chunk " + str(k) + ": " if v > 1 else ""}forward (top) / backward (bottom)</span>'
        for k in range(v)) + '<span><i style="background:#eef1f5"></i>idle (bubble)</span><span><i style="background:#8e4ec6"></i>optimizer</span></div>'
    sched_name = E.SCHEDULE_NAMES.get(pipe["schedule"], pipe["schedule"])
    note = (f"{sched_name} schedule of {m} micro-batches over {pp} stages" + (f" with {v} chunks per stage" if v > 1 else "")
            + ", simulated with equal stage times (compute and exposed communication of the slowest stage)."
            + (f" Drawn with {shown_m} of the {m} micro-batches (the steady state repeats); the time axis is in % of the drawn schedule."
               if shown_m != m else ""))
    return legend + "".join(svg) + f'<p class="muted">{esc(note)}</p>'


def _timeline_section(data: dict[str, Any]) -> str:
    if E.is_pipeline(data):
        return _pipeline_timeline(data)
    p = data.get("predicted") or {}
    t = data.get("training") or {}
    m = max(1, int(t.get("micro_batches") or 1))
    parts = dict(E.step_breakdown(data))
    comp, redo = parts["compute"], parts["recompute"]
    comm, opt = parts["exposed communication"], parts["optimizer"]
    fwd = comp / (1 + E.BACKWARD_FACTOR)
    bwd = comp - fwd + redo
    step = _num(p.get("step_time_s")) or (comp + redo + comm + opt) or 1.0
    left, width = 150, 800
    scale = width / step
    shown = min(m, 64)
    group = math.ceil(m / shown)
    H = 120
    svg = [f'<svg viewBox="0 0 {left + width + 30} {H}" width="{left + width + 30}" height="{H}" class="chart">']
    world = data.get("world_size", "?")
    svg.append(f'<text x="{left - 10}" y="42" text-anchor="end" class="lab b">stage 0</text>'
               f'<text x="{left - 10}" y="56" text-anchor="end" class="lab s">all {esc(world)} devices</text>')
    x = left
    per = [("forward", fwd / m, "#3e7bfa"), ("backward" + (" + recompute" if redo else ""), bwd / m, "#1d4ed8"),
           ("communication", comm / m, "#f5a524")]
    for j in range(0, m, group):
        k = min(group, m - j)
        x0 = x
        for name, dur, col in per:
            w = dur * k * scale
            if w <= 0:
                continue
            tip = f"micro-batch {j + 1}{'-' + str(j + k) if k > 1 else ''}: {name} {E.fmt_seconds(dur * k)}"
            svg.append(f'<rect x="{x:.2f}" y="28" width="{max(w, 0.6):.2f}" height="34" fill="{col}" data-tip="{esc(tip)}"/>')
            x += w
        if (x - x0) > 26:
            svg.append(f'<text x="{(x0 + x) / 2:.1f}" y="49" text-anchor="middle" class="inbar">mb {j + 1}{"-" + str(j + k) if k > 1 else ""}</text>')
        svg.append(f'<line x1="{x:.2f}" y1="26" x2="{x:.2f}" y2="64" stroke="#fff" stroke-width="1"/>')
    w = opt * scale
    svg.append(f'<rect x="{x:.2f}" y="28" width="{max(w, 1.5):.2f}" height="34" fill="#8e4ec6" data-tip="optimizer step {esc(E.fmt_seconds(opt))}"/>')
    # axis
    svg.append(f'<line x1="{left}" y1="74" x2="{left + width}" y2="74" class="axis"/>')
    for i in range(6):
        tx = left + i * width / 5
        svg.append(f'<line x1="{tx:.1f}" y1="74" x2="{tx:.1f}" y2="79" class="axis"/>'
                   f'<text x="{tx:.1f}" y="92" text-anchor="middle" class="tick">{esc(E.fmt_seconds(step * i / 5))}</text>')
    svg.append(f'<text x="{left}" y="112" class="lab s">pipeline bubble: none (1 stage)</text></svg>')
    legend = '<div class="legend">' + "".join(f'<span><i style="background:{c}"></i>{esc(n)}</span>' for n, _, c in per) + \
             '<span><i style="background:#8e4ec6"></i>optimizer</span></div>'
    note = (f"{m} micro-batch{'es' if m > 1 else ''} of {t.get('micro_batch', '?')} samples run one after another on every device "
            "(gradient accumulation), then the optimizer steps once." + (f" Drawn in groups of {group}." if group > 1 else "")
            + " Communication is drawn where the cost model charges it (not overlapped).")
    return legend + "".join(svg) + f'<p class="muted">{esc(note)}</p>'


def _compare_section(data: dict[str, Any]) -> str:
    rows = E.alternatives(data)
    ok = [r for r in rows if r.get("step_time_s") is not None]
    bad = [r for r in rows if r.get("step_time_s") is None]
    ok.sort(key=lambda r: _num(r.get("step_time_s")))
    scale = max((_num(r.get("step_time_s")) for r in ok), default=1.0) * 1.05 or 1.0
    left, width, bh, gap = 170, 560, 24, 10
    allr = ok + bad
    H = 10 + len(allr) * (bh + gap) + 10
    svg = [f'<svg viewBox="0 0 {left + width + 260} {H}" width="{left + width + 260}" height="{H}" class="chart">']
    for i, r in enumerate(allr):
        y = 10 + i * (bh + gap)
        cls = "lab b" if r["role"] == "chosen" else "lab"
        svg.append(f'<text x="{left - 10}" y="{y + 11}" text-anchor="end" class="{cls}">{esc(r["name"])}</text>'
                   f'<text x="{left - 10}" y="{y + 23}" text-anchor="end" class="lab s">{esc(E.fmt_mesh(r.get("mesh")))}</text>')
        if r.get("step_time_s") is None:
            peak = r.get("peak_memory_bytes")
            svg.append(f'<text x="{left + 6}" y="{y + 16}" class="bad">does not fit{esc(" (needs " + E.fmt_bytes(peak) + ")" if peak else ": no legal sharding")}</text>')
            continue
        parts = [(n if n != "recompute" else "recompute", v) for n, v in E.step_breakdown(data, r if r["role"] != "chosen" else None)]
        svg.append(_hbar(parts, scale, width, bh, left, y, E.fmt_seconds))
        if r["role"] == "chosen":
            svg.append(f'<rect x="{left - 2}" y="{y - 2}" width="{_num(r["step_time_s"]) / scale * width + 4:.1f}" height="{bh + 4}" class="hl"/>')
        end = left + _num(r["step_time_s"]) / scale * width
        fits = "" if r.get("fits", True) else " · over memory"
        svg.append(f'<text x="{end + 6}" y="{y + 16}" class="val">{esc(E.fmt_seconds(r["step_time_s"]))} · MFU {esc(E.fmt_pct(r.get("mfu")))} · '
                   f'{esc(E.fmt_bytes(r.get("peak_memory_bytes")))}{fits}</text>')
    svg.append("</svg>")
    tr = "".join(
        f"<tr{' class=chosen' if r['role'] == 'chosen' else ''}><td>{esc(r['name'])}</td><td>{esc(r.get('description') or r['role'])}</td>"
        f"<td>{esc(E.fmt_mesh(r.get('mesh')))}</td><td class=num>{esc(r.get('micro_batches', '-'))}</td><td>{esc(r.get('recompute', '-'))}</td>"
        f"<td class=num>{esc(E.fmt_seconds(r.get('step_time_s')))}</td><td class=num>{esc(E.fmt_pct(r.get('mfu')))}</td>"
        f"<td class=num>{esc(E.fmt_bytes(r.get('peak_memory_bytes')))}</td><td>{'yes' if r.get('fits') else '<b class=badt>no</b>'}</td></tr>"
        for r in allr)
    bubble = ["pipeline bubble"] if any(_num(r.get("bubble_s")) > 0 for r in allr) else []
    return (_legend(["compute", "recompute", "exposed communication", "optimizer"] + bubble) + "".join(svg) +
            '<table class="t"><tr><th>plan</th><th>what</th><th>mesh</th><th>micro-batches</th><th>recompute</th><th>step</th><th>MFU</th><th>memory</th><th>fits</th></tr>'
            + tr + "</table>")


def _params_section(data: dict[str, Any]) -> str:
    names = (data.get("mesh") or {}).get("axis_names") or []
    rows = E.group_params(data.get("params") or {}, E._containers(data))
    body = "".join(
        f"<tr><td class=mono>{esc(r['pattern'])}</td><td class=num>{r['count']}</td><td class=mono>{esc(r['blocks'])}</td><td>"
        + " ".join(_pill(a, x) for a, x in zip(names, r["placements"])) + "</td></tr>" for r in rows)
    n = len(data.get("params") or {})
    return (f'<p class="muted">{n:,} parameter tensors in {len(rows)} groups (a group = the same parameter in every repeated block, with the same placement).</p>'
            f'<table class="t"><tr><th>parameter</th><th>tensors</th><th>blocks</th><th>placement per axis</th></tr>{body}</table>')


def _collectives_section(data: dict[str, Any]) -> str:
    rows = E.collective_summary(data)
    if not rows:
        return '<p class="muted">This plan issues no collectives (every op runs on replicated data or is local).</p>'
    mx = max(r["bytes"] for r in rows) or 1.0
    body = "".join(
        f"<tr><td>{esc(r['phase'])}</td><td>{esc(r['kind'].replace('_', '-'))}</td><td>{esc(r['axis'])}</td><td class=num>{r['count']:,}</td>"
        f"<td class=num>{esc(E.fmt_bytes(r['bytes']))}</td><td><div class='bar o' style='width:{max(1, 260 * r['bytes'] / mx):.0f}px'></div></td></tr>"
        for r in rows[:40])
    return ('<p class="muted">Collectives issued per optimizer step, per device, summed by phase, kind and mesh axis.</p>'
            f'<table class="t"><tr><th>phase</th><th>collective</th><th>axis</th><th>count</th><th>bytes / step</th><th></th></tr>{body}</table>')


CSS = """
*{box-sizing:border-box}body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#1c2430;background:#f4f6f9}
header{background:linear-gradient(120deg,#0f1e3d,#23407a);color:#fff;padding:22px 32px 18px}
header h1{margin:0 0 2px;font-size:24px;font-weight:650}header .sub{opacity:.8}
nav{position:sticky;top:0;z-index:5;background:#fff;border-bottom:1px solid #dde3ea;padding:8px 32px;display:flex;gap:18px;flex-wrap:wrap}
nav a{color:#23407a;text-decoration:none;font-weight:550}nav a:hover{text-decoration:underline}
main{max-width:1240px;margin:0 auto;padding:10px 24px 40px}
section{background:#fff;border:1px solid #e1e6ee;border-radius:12px;margin:18px 0;padding:18px 22px;box-shadow:0 1px 2px rgba(20,30,60,.04);overflow-x:auto}
section h2{margin:0 0 10px;font-size:18px}h4{margin:14px 0 6px}
.kpis{display:grid;grid-template-columns:repeat(auto-fit,minmax(160px,1fr));gap:12px;margin-top:14px}
.kpi{background:rgba(255,255,255,.1);border-radius:10px;padding:10px 14px}.kl{font-size:12px;text-transform:uppercase;letter-spacing:.05em;opacity:.75}
.kv{font-size:22px;font-weight:650}.kv.sm{font-size:17px;padding:3px 0}.ks{font-size:12px;opacity:.75}
.badge{display:inline-block;border-radius:99px;padding:2px 10px;font-size:12px;font-weight:600;margin-top:8px}.run{margin-top:8px;font-size:13px;opacity:.9}.badge.ok{background:#30a46c}.badge.bad{background:#e5484d}
.muted{color:#66707d}.nw{white-space:nowrap}.mono{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12.5px}
.t{border-collapse:collapse;margin:8px 0;min-width:320px}.t th{text-align:left;font-weight:600;color:#4a5563;border-bottom:2px solid #e1e6ee;padding:4px 10px 4px 0;font-size:12.5px}
.t td{border-bottom:1px solid #eef1f5;padding:4px 12px 4px 0;vertical-align:middle}.t .num{text-align:right;font-variant-numeric:tabular-nums}
.t tr.chosen td{background:#eef4ff;font-weight:600}.narrow{max-width:480px}
.two{display:grid;grid-template-columns:minmax(0,1fr) minmax(0,1fr);gap:24px;align-items:start}@media(max-width:900px){.two{grid-template-columns:1fr}}
.pill{display:inline-block;border-radius:5px;padding:0 6px;margin:1px 2px;font:12px ui-monospace,Menlo,Consolas,monospace}
.legend{display:flex;flex-wrap:wrap;gap:14px;margin:4px 0 8px;font-size:12.5px;color:#4a5563}.legend i,.sw{display:inline-block;width:12px;height:12px;border-radius:3px;margin-right:5px;vertical-align:-1px}
.bar{height:10px;background:#3e7bfa;border-radius:3px}.bar.o{background:#f5a524}
svg text{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif}
.mesh .rk{font-size:11px;fill:#fff;font-weight:600}.mesh .axt{font-size:12.5px;fill:#23407a;font-weight:600}.mesh .axl{font-size:11px;fill:#66707d}.ell{font-size:13px;fill:#66707d}
.nodeline{stroke:#1c2430;stroke-width:2;stroke-dasharray:3 2}
.seg{border:1px solid #e1e6ee;border-radius:10px;margin:4px 0;background:#fbfcfe}.seg.blk{border:2px solid #b8c7e6;background:#f6f9ff;box-shadow:4px 4px 0 #dfe7f7,8px 8px 0 #eef2fb}
.sh{padding:8px 12px;border-bottom:1px solid #e1e6ee;display:flex;gap:8px;align-items:baseline;flex-wrap:wrap}.sh .x{background:#23407a;color:#fff;border-radius:99px;padding:0 8px;font-weight:650}.sh .sr{margin-left:auto;color:#66707d;font-size:12.5px}
.gs{overflow-x:auto;padding:4px}.gs svg{display:block;margin:0 auto}.down{text-align:center;color:#9aa5b1;font-size:18px;line-height:1.2}
.g .box{fill:#fff;stroke:#c5cfdb}.g .op{cursor:pointer}.g .op:hover .box,.g .op.sel .box{stroke:#23407a;stroke-width:2}.g .ol{font-size:12px;font-weight:600;fill:#1c2430}.g .os{font-size:10.5px;fill:#66707d;font-family:ui-monospace,Menlo,Consolas,monospace}
.g .cbar{fill:#9aa5b1}.g .e{fill:none;stroke:#9aa5b1;stroke-width:1.3}.g .e.r{stroke:#e5484d;stroke-dasharray:4 3;stroke-width:1.6}
.detail{margin-top:12px;border:1px solid #e1e6ee;border-radius:10px;padding:10px 14px;background:#fbfcfe;min-height:44px}
.chart .lab{font-size:12.5px;fill:#1c2430}.chart .lab.b{font-weight:700}.chart .lab.s{font-size:11px;fill:#66707d}.chart .val{font-size:12px;fill:#4a5563}.chart .bad,.badt{fill:#e5484d;color:#e5484d;font-size:12.5px;font-weight:600}
.chart .cap{stroke:#e5484d;stroke-width:2;stroke-dasharray:5 3}.chart .cap2{stroke:#9aa5b1;stroke-width:1.5;stroke-dasharray:2 3}.chart .capt{font-size:11px;fill:#4a5563}
.chart .hl{fill:none;stroke:#1c2430;stroke-width:1.5;rx:3}.chart .axis{stroke:#9aa5b1}.chart .tick{font-size:11px;fill:#66707d}.chart .inbar{font-size:11px;fill:#fff;font-weight:600}
#tip{position:fixed;pointer-events:none;background:#1c2430;color:#fff;padding:6px 9px;border-radius:6px;font-size:12px;max-width:420px;display:none;z-index:10;white-space:pre-line}
footer{color:#66707d;font-size:12px;text-align:center;padding:0 0 30px}
"""

JS = r"""
(function(){
var D=JSON.parse(document.getElementById('plan-data').textContent);
var tip=document.getElementById('tip');
function fmtS(s){if(s==null)return '-';var a=Math.abs(s);if(a===0)return '0';if(a<1e-3)return (s*1e6).toFixed(1)+' us';if(a<1)return (s*1e3).toFixed(1)+' ms';return s.toFixed(2)+' s';}
function fmtB(n){if(n==null)return '-';var u=[['TiB',1099511627776],['GiB',1073741824],['MiB',1048576],['KiB',1024]];for(var i=0;i<u.length;i++){if(Math.abs(n)>=u[i][1])return (n/u[i][1]).toFixed(1)+' '+u[i][0];}return n.toFixed(0)+' B';}
function pl(p){return '['+(p||[]).join(', ')+']';}
function opText(d){var s=d.name+'  ('+d.target+')\nmodule '+(d.module||'(top)')+'\noutput '+pl(d.out)+'\ncompute '+fmtS(d.c)+' / step'+(d.n>1?' per block (x'+d.n+')':'')+'\nactivations '+fmtB(d.a);
 for(var i=0;i<d.ins.length;i++){s+='\ninput '+i+' '+d.ins[i][0]+' needs '+pl(d.ins[i][1]);}return s;}
function show(e,t){tip.textContent=t;tip.style.display='block';move(e);}
function move(e){var x=e.clientX+14,y=e.clientY+14;if(x+tip.offsetWidth>innerWidth-8)x=e.clientX-tip.offsetWidth-10;if(y+tip.offsetHeight>innerHeight-8)y=e.clientY-tip.offsetHeight-10;tip.style.left=x+'px';tip.style.top=y+'px';}
document.addEventListener('mouseover',function(e){var g=e.target.closest('[data-op]');if(g){show(e,opText(D.ops[g.getAttribute('data-op')]));return;}var t=e.target.closest('[data-tip]');if(t){show(e,t.getAttribute('data-tip'));}else{tip.style.display='none';}});
document.addEventListener('mousemove',function(e){if(tip.style.display==='block')move(e);});
function pin(g){var d=D.ops[g.getAttribute('data-op')];var old=document.querySelectorAll('.op.sel');for(var i=0;i<old.length;i++)old[i].classList.remove('sel');g.classList.add('sel');
 var box=document.getElementById('op-detail');box.classList.remove('muted');box.innerHTML='';var h=document.createElement('b');h.textContent=d.name+' — '+d.kind+' ('+d.seg+')';box.appendChild(h);
 var pre=document.createElement('pre');pre.className='mono';pre.textContent=opText(d)+'\n\nwhy this placement: autoplan explain '+D.file+' '+d.name;box.appendChild(pre);}
document.addEventListener('click',function(e){var g=e.target.closest('[data-op]');if(g)pin(g);});
document.addEventListener('keydown',function(e){if(e.key==='Enter'){var g=e.target.closest&&e.target.closest('[data-op]');if(g)pin(g);}});
var st=document.getElementById('report-status');
function done(){var secs=document.querySelectorAll('section[id]');var empty=0;for(var i=0;i<secs.length;i++){if(secs[i].textContent.trim().length<20)empty++;}
 st.setAttribute('data-sections',String(secs.length));st.setAttribute('data-empty',String(empty));st.setAttribute('data-load-ms',String(Math.round(performance.now())));
 st.setAttribute('data-errors',String(window.__errs.length));st.setAttribute('data-error-text',window.__errs.join(' | ').slice(0,500));st.setAttribute('data-ready','1');}
if(document.readyState==='complete')done();else window.addEventListener('load',done);
})();
"""

SECTIONS = [("mesh", "Device mesh"), ("graph", "Layer graph"), ("memory", "Memory per device"),
            ("step-time", "Step time"), ("timeline", "Schedule"), ("compare", "Plan vs baselines"),
            ("params", "Parameters"), ("collectives", "Communication")]
# a pipeline plan (executed as a recipe) has no per-op placements: its stages replace the layer graph,
# and there are no per-parameter placements or per-op collectives to list
PIPELINE_SECTIONS = [("mesh", "Device mesh"), ("pipeline", "Pipeline stages"), ("memory", "Memory per device"),
                     ("step-time", "Step time"), ("timeline", "Schedule"), ("compare", "Plan vs alternatives")]


def sections_for(data: dict[str, Any]) -> list[tuple[str, str]]:
    """The report's sections (id, title) for this plan."""
    return PIPELINE_SECTIONS if E.is_pipeline(data) else SECTIONS


def render_html(data: dict[str, Any], *, source: str = "plan.json") -> str:
    """The whole report page as one string."""
    model = data.get("model") or {}
    c = data.get("cluster") or {}
    sections = sections_for(data)
    builders = {
        "mesh": _mesh_section, "pipeline": _pipeline_section, "memory": _memory_section, "step-time": _step_section,
        "timeline": _timeline_section, "compare": _compare_section, "params": _params_section,
        "collectives": _collectives_section,
    }
    details: dict[str, Any] = {}
    bodies = {}
    for sid, _ in sections:
        if sid == "graph":
            bodies[sid], details = _graph_section(data)
        else:
            bodies[sid] = builders[sid](data)
    solver = data.get("solver") or {}
    payload = json.dumps({"ops": details, "file": source}, separators=(",", ":"), default=str).replace("</", "<\\/")
    title = f"{model.get('name', 'model')} on {data.get('world_size', '?')} x {c.get('device', c.get('name', 'device'))}"
    nparams = _num(model.get("num_params"))
    sub = (f"{nparams / 1e9:.2f}B parameters · cluster {c.get('name', '?')} · planned {data.get('created', '')}"
           if nparams >= 1e8 else f"{nparams:,.0f} parameters · cluster {c.get('name', '?')} · planned {data.get('created', '')}")
    nav = "".join(f'<a href="#{sid}">{esc(name)}</a>' for sid, name in sections)
    secs = "".join(f'<section id="{sid}"><h2>{esc(name)}</h2>{bodies[sid]}</section>' for sid, name in sections)
    foot = (f"autoplan {esc(data.get('autoplan_version', ''))} · solver {esc(solver.get('name', '?'))} "
            f"({esc(E.fmt_seconds(solver.get('seconds')))}, gap {_num(solver.get('gap')):.2g}) · search {esc(E.fmt_seconds(solver.get('search_seconds')))} over "
            f"{esc(solver.get('configurations', '?'))} configurations · model fingerprint {esc(model.get('fingerprint', ''))}")
    unsupported = model.get("unsupported_ops") or []
    warn = (f'<section id="warnings"><h2>Replicated ops</h2><p>No sharding rule for: {esc(", ".join(unsupported))} (kept replicated).</p></section>'
            if unsupported else "")
    return (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
        "<meta name=viewport content='width=device-width,initial-scale=1'>"
        f"<title>autoplan: {esc(title)}</title>"
        "<script>window.__errs=[];window.addEventListener('error',function(e){window.__errs.push(String(e.message||e));});</script>"
        f"<style>{CSS}</style></head><body>"
        f'<header id="summary"><h1>{esc(title)}</h1><div class="sub">{esc(sub)}</div>{_kpis(data)}</header>'
        f"<nav>{nav}</nav><main>{warn}{secs}</main><footer>{foot}</footer>"
        '<div id="tip"></div><div id="report-status" hidden data-ready="0" data-errors="0"></div>'
        '<svg width="0" height="0" style="position:absolute"><defs>'
        '<marker id="a" viewBox="0 0 8 8" refX="6" refY="4" markerWidth="7" markerHeight="7" orient="auto"><path d="M0,0L8,4L0,8z" fill="#9aa5b1"/></marker>'
        '<marker id="ar" viewBox="0 0 8 8" refX="6" refY="4" markerWidth="7" markerHeight="7" orient="auto"><path d="M0,0L8,4L0,8z" fill="#e5484d"/></marker>'
        "</defs></svg>"
        f'<script type="application/json" id="plan-data">{payload}</script>'
        f"<script>{JS}</script></body></html>"
    )
