"""``autoplan show plan.json --format png|svg``: one static picture of the plan's summary (matplotlib).

Panels: the headline numbers, step time of the plan beside its runners-up and baselines
(stacked compute / recompute / communication / optimizer), memory per device against capacity
(stacked weights / gradients / optimizer state / activations), and the layer strip: every op of
each layer group coloured by its output placement on each mesh axis; for a pipeline plan (no
per-op placements), the stage strip: the blocks every pipeline stage holds.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from autoplan.errors import AutoplanError
from autoplan.report import explain as E
from autoplan.report.html import AXIS_COLORS, PART_COLORS


def _mpl():
    try:
        import matplotlib
    except ImportError:
        raise AutoplanError("--format png/svg needs matplotlib: pip install matplotlib (or use -o report.html)") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def render_static(data: dict[str, Any], path: str | Path, fmt: str) -> Path:
    """Write the summary picture to ``path`` as ``fmt`` ('png' or 'svg'); returns the path."""
    if fmt not in ("png", "svg"):
        raise AutoplanError(f"unknown picture format {fmt!r}: use png or svg")
    plt = _mpl()
    from matplotlib.patches import Patch

    plt.rcParams.update({"font.size": 9, "axes.spines.top": False, "axes.spines.right": False,
                         "svg.fonttype": "none", "font.family": "DejaVu Sans"})
    model = data.get("model") or {}
    c = data.get("cluster") or {}
    t = data.get("training") or {}
    p = data.get("predicted") or {}
    rows = E.alternatives(data)
    fig = plt.figure(figsize=(12, 7.2), dpi=110)
    gs = fig.add_gridspec(2, 2, height_ratios=[1.6, 1.1], hspace=0.75, wspace=0.34, left=0.14, right=0.97, top=0.72, bottom=0.06)
    fig.patch.set_facecolor("white")
    # header
    title = f"{model.get('name', 'model')} on {data.get('world_size', '?')} x {c.get('device', c.get('name', '?'))}"
    fig.text(0.03, 0.965, title, fontsize=16, fontweight="bold", color="#0f1e3d", va="top")
    fig.text(0.03, 0.915, E.execution_line(data.get("execution")), fontsize=8.5, color="#4a5563", va="top")
    pipe = E.pipeline_layout(data) if E.is_pipeline(data) else None
    head = fig.add_axes((0.03, 0.80, 0.94, 0.095))
    head.axis("off")
    usable = float(c.get("usable_memory_bytes") or 0.0)
    kpis = [("step time", E.fmt_seconds(p.get("step_time_s"))), ("MFU", E.fmt_pct(p.get("mfu"))),
            ("tokens/s", f"{float(p['tokens_per_s']):,.0f}" if p.get("tokens_per_s") else "-"),
            ("memory/device", E.fmt_bytes(p.get("peak_memory_bytes")) + (f" of {E.fmt_bytes(usable)}" if usable else "")),
            ("mesh", E.fmt_mesh(E.mesh_of(data))),
            ("micro-batches x size", f"{t.get('micro_batches', 1)} x {t.get('micro_batch', '?')}"),
            ("recompute", str(t.get("recompute", "none")))]
    if pipe is not None:  # recompute is in the execution line
        kpis[-1] = ("pipeline stages", f"{pipe['pp']}" + (f" x {pipe['v']} virtual" if pipe["v"] > 1 else ""))
    for i, (k, v) in enumerate(kpis):
        x = i / len(kpis)
        head.add_patch(plt.Rectangle((x + 0.003, 0.0), 1 / len(kpis) - 0.01, 1.0, transform=head.transAxes,
                                     color="#eef3fb", ec="#c9d6ee", lw=0.8))
        head.text(x + 0.012, 0.72, k.upper(), transform=head.transAxes, fontsize=8, color="#5a6573")
        head.text(x + 0.012, 0.25, v, transform=head.transAxes, fontsize=12 if len(v) < 13 else (10 if len(v) < 17 else 8.5), fontweight="bold", color="#1c2430")
    # step time
    ax = fig.add_subplot(gs[0, 0])
    ok = [r for r in rows if r.get("step_time_s") is not None]
    bad = [r for r in rows if r.get("step_time_s") is None]
    ok.sort(key=lambda r: float(r["step_time_s"]))
    order = ok + bad
    labels = [r["name"] for r in order]
    ys = list(range(len(order)))[::-1]
    for y, r in zip(ys, order):
        if r.get("step_time_s") is None:
            ax.text(0, y, "  does not fit", va="center", color="#e5484d", fontweight="bold")
            continue
        left = 0.0
        for name, v in E.step_breakdown(data, None if r["role"] == "chosen" else r):
            if v > 0:
                ax.barh(y, v, left=left, color=PART_COLORS.get(name), height=0.62,
                        edgecolor="#1c2430" if r["role"] == "chosen" else "none", linewidth=0.8)
                left += v
        ax.text(left, y, f"  {E.fmt_seconds(r['step_time_s'])} · {E.fmt_pct(r.get('mfu'))}", va="center", fontsize=8, color="#4a5563")
    ax.set_yticks(ys, labels)
    for tl, r in zip(ax.get_yticklabels(), order):
        if r["role"] == "chosen":
            tl.set_fontweight("bold")
    mx = max((float(r["step_time_s"]) for r in ok), default=1.0)
    ax.set_xlim(0, mx * 1.45)
    ax.set_title("step time: plan vs runners-up and baselines", loc="left", fontweight="bold")
    ax.xaxis.set_major_formatter(lambda v, _: E.fmt_seconds(v))
    parts = ["compute", "recompute", "exposed communication", "optimizer"]
    if any(float(r.get("bubble_s") or 0.0) > 0 for r in ok):
        parts.append("pipeline bubble")
    ax.legend(handles=[Patch(color=PART_COLORS[n], label=n) for n in parts],
              fontsize=7.5, loc="upper center", bbox_to_anchor=(0.45, -0.12), ncol=len(parts), frameon=False)
    ax.set_ylim(-0.6, len(order) - 0.4)
    # memory
    ax = fig.add_subplot(gs[0, 1])
    dtype = t.get("dtype") or "bf16"
    for y, r in zip(ys, order):
        if r.get("step_time_s") is None:
            need = r.get("peak_memory_bytes")
            ax.text(0, y, f"  does not fit{' (needs ' + E.fmt_bytes(need) + ')' if need else ''}", va="center", color="#e5484d", fontweight="bold")
            continue
        left = 0.0
        for name, v in E.memory_breakdown(r, dtype):
            ax.barh(y, v, left=left, color=PART_COLORS.get(name), height=0.62)
            left += v
        ax.text(left, y, f"  {E.fmt_bytes(r.get('peak_memory_bytes'))}", va="center", fontsize=8, color="#4a5563")
    if usable:
        ax.axvline(usable, color="#e5484d", ls="--", lw=1.4)
        ax.text(usable, max(ys) + 0.55, f"usable {E.fmt_bytes(usable)}", ha="right", fontsize=8, color="#e5484d")
    ax.set_yticks(ys, labels)
    ax.set_xlim(0, max([usable] + [float(r.get("peak_memory_bytes") or 0) for r in ok]) * 1.2 or 1)
    ax.xaxis.set_major_formatter(lambda v, _: E.fmt_bytes(v))
    ax.set_title("memory per device", loc="left", fontweight="bold")
    ax.legend(handles=[Patch(color=PART_COLORS[n], label=n) for n in ("weights", "gradients", "optimizer state", "activations")],
              fontsize=7.5, loc="upper center", bbox_to_anchor=(0.45, -0.12), ncol=4, frameon=False)
    ax.set_ylim(-0.6, len(order) - 0.4)
    # layer strip (a pipeline plan: its stages)
    ax = fig.add_subplot(gs[1, :])
    if pipe is not None:
        _stage_strip(plt, ax, pipe)
        return _save(plt, fig, path, fmt)
    names = (data.get("mesh") or {}).get("axis_names") or []
    segs = E.segments(data)
    x = 0.0
    seen: set[str] = set()
    ticks = []
    for s in segs:
        ops = [o for o in s["ops"] if o.get("kind") not in E.ALIAS_KINDS] or s["ops"]
        start = x
        for o in ops:
            for a, pl in enumerate(o.get("output") or []):
                seen.add(pl)
                ax.add_patch(plt.Rectangle((x, len(names) - 1 - a), 0.92, 0.86, color=AXIS_COLORS.get(pl, "#d6409f")))
            x += 1
        ticks.append(((start + x) / 2, s["label"] + (f"  x{s['count']}" if s["count"] > 1 else "")))
        ax.axvline(x + 0.2, color="#1c2430", lw=1.0)
        x += 0.6
    ax.set_xlim(-0.3, max(x, 1))
    ax.set_ylim(-0.1, max(len(names), 1))
    ax.set_yticks([len(names) - 1 - a + 0.43 for a in range(len(names))], names)
    ax.set_xticks([tk for tk, _ in ticks], [lb for _, lb in ticks], fontsize=8)
    ax.tick_params(length=0)
    for sp in ax.spines.values():
        sp.set_visible(False)
    ax.set_title("layers: output placement of every op on each mesh axis (repeated blocks drawn once)", loc="left", fontweight="bold")
    order_pl = [q for q in ("R", "S(0)", "S(1)", "S(2)", "S(3)", "P") if q in seen] + sorted(seen - set(AXIS_COLORS))
    if order_pl:
        ax.legend(handles=[Patch(color=AXIS_COLORS.get(q, "#d6409f"), label=q) for q in order_pl], fontsize=7, ncol=len(order_pl),
                  loc="upper right", bbox_to_anchor=(1.0, 1.32), frameon=False)
    return _save(plt, fig, path, fmt)


def _save(plt, fig, path: str | Path, fmt: str) -> Path:
    path = Path(path)
    fig.savefig(path, format=fmt, facecolor="white")
    plt.close(fig)
    return path


def _stage_strip(plt, ax, pipe: dict[str, Any]) -> None:
    """One row per pipeline stage over the model's depth: the chunks of blocks it holds (coloured by
    virtual stage), the embedding on the first stage and the head on the last."""
    from matplotlib.patches import Patch

    from autoplan.report.html import CHUNK_COLORS, _shown_stages

    blocks = max(pipe["blocks"], 1)
    end = blocks * 0.06 + 0.5  # width of the embedding / head boxes, in blocks
    rows = _shown_stages(pipe["pp"], 8)
    n = len(rows)
    for ri, s in enumerate(rows):
        y = n - 1 - ri
        if s < 0:
            ax.text(blocks / 2, y + 0.4, f"... {pipe['pp'] - n + 1} more stages", ha="center", va="center", fontsize=8, color="#66707d")
            continue
        st = pipe["stages"][s]
        ax.add_patch(plt.Rectangle((0, y + 0.1), blocks, 0.7, color="#f1f4f8"))
        if st["embedding"]:
            ax.add_patch(plt.Rectangle((-end - 0.3, y + 0.1), end, 0.7, color="#9aa5b1"))
        if st["head"]:
            ax.add_patch(plt.Rectangle((blocks + 0.3, y + 0.1), end, 0.7, color="#9aa5b1"))
        for c in st["chunks"]:
            if c["count"] > 0:
                ax.add_patch(plt.Rectangle((c["first"], y + 0.1), c["count"] - 0.08 * min(1, c["count"]), 0.7,
                                           color=CHUNK_COLORS[c["virtual"] % len(CHUNK_COLORS)]))
        ax.text(blocks + end + 0.8, y + 0.45, f"{st['blocks']} blocks", va="center", fontsize=7, color="#4a5563")
    ax.set_xlim(-end - 0.6, blocks + end + blocks * 0.08 + 2)
    ax.set_ylim(-0.1, n)
    ax.set_yticks([n - 1 - ri + 0.45 for ri, s in enumerate(rows) if s >= 0],
                  [f"stage {s}" for s in rows if s >= 0], fontsize=7 if n > 8 else 8)
    ax.set_xlabel(f"{pipe['container'] or 'blocks'} 0-{blocks - 1} (embedding left, final norm + head right)", fontsize=8)
    ax.tick_params(length=0)
    for sp in ax.spines.values():
        sp.set_visible(False)
    sched = E.SCHEDULE_NAMES.get(pipe["schedule"], pipe["schedule"])
    ax.set_title(f"pipeline: {pipe['pp']} stages x {pipe['v']} virtual ({sched}), tp={pipe['tp']} x dp={pipe['dp']} each; "
                 f"bubble {E.fmt_seconds(pipe['bubble_s'])} ({100 * pipe['bubble_share']:.1f}%)", loc="left", fontweight="bold")
    handles = [Patch(color=CHUNK_COLORS[k % len(CHUNK_COLORS)], label=f"chunk {k}") for k in range(pipe["v"])] if pipe["v"] > 1 else []
    handles.append(Patch(color="#9aa5b1", label="embedding / head"))
    ax.legend(handles=handles, fontsize=7, ncol=len(handles), loc="upper right", bbox_to_anchor=(1.0, 1.32), frameon=False)
