"""Terminal tables for ``show``, ``diff`` and ``explain``: ``rich`` when installed, plain text otherwise.

Every renderer returns a string (no colour codes unless ``color=True``), so the CLI can echo
it and tests can read it.
"""
from __future__ import annotations

import io
import math
from typing import Any

from autoplan.report import explain as E

try:  # optional: nicer tables
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    HAVE_RICH = True
except ImportError:  # pragma: no cover - exercised when rich is absent
    HAVE_RICH = False


class _Out:
    """Collects tables and lines; renders with rich or as plain columns."""

    def __init__(self, color: bool = False, width: int = 110, plain: bool = False):
        self.rich = HAVE_RICH and not plain
        self.color = color
        self.width = width
        self.parts: list[Any] = []

    def line(self, text: str = "", style: str = "") -> None:
        self.parts.append(Text(text, style=style) if self.rich else text)

    def table(self, title: str | None, headers: list[str], rows: list[list[str]], right: set[int] = frozenset(),
              highlight: set[int] = frozenset()) -> None:
        if self.rich:
            t = Table(title=title, title_justify="left", title_style="bold", box=box.SIMPLE_HEAD, pad_edge=False,
                      show_edge=False, header_style="bold")
            for i, h in enumerate(headers):
                t.add_column(h, justify="right" if i in right else "left", overflow="fold")
            for k, r in enumerate(rows):
                t.add_row(*[str(x) for x in r], style="bold" if k in highlight else None)
            self.parts.append(t)
            self.parts.append(Text(""))
            return
        widths = [max([len(h)] + [len(str(r[i])) for r in rows]) for i, h in enumerate(headers)]

        def fmt(r: list[str]) -> str:
            return "  ".join(str(x).rjust(w) if i in right else str(x).ljust(w) for i, (x, w) in enumerate(zip(r, widths))).rstrip()

        if title:
            self.parts.append(title)
        self.parts.append(fmt(headers))
        self.parts.append("  ".join("-" * w for w in widths))
        self.parts.extend(fmt(r) for r in rows)
        self.parts.append("")

    def render(self) -> str:
        if not self.rich:
            return "\n".join(self.parts).rstrip() + "\n"
        buf = io.StringIO()
        con = Console(file=buf, width=self.width, force_terminal=self.color, no_color=not self.color,
                      color_system="standard" if self.color else None, highlight=False, soft_wrap=False)
        for p in self.parts:
            con.print(p)
        return buf.getvalue()


def _bar(frac: float, width: int = 24) -> str:
    frac = 0.0 if not math.isfinite(frac) else max(0.0, min(1.0, frac))
    n = frac * width
    full = int(n)
    return "█" * full + ("▌" if n - full >= 0.5 else "")


def summary(data: dict[str, Any], *, color: bool = False, plain: bool = False, width: int = 110) -> str:
    """The compact terminal summary of a plan."""
    o = _Out(color, width, plain)
    m = data.get("model") or {}
    c = data.get("cluster") or {}
    t = data.get("training") or {}
    p = data.get("predicted") or {}
    o.line(f"{m.get('name', '?')} on {data.get('world_size', '?')} x {c.get('device', c.get('name', '?'))} "
           f"({c.get('name', '?')})", "bold")
    pipe = E.pipeline_layout(data) if E.is_pipeline(data) else None
    if pipe is not None:
        o.line(f"mesh {E.fmt_mesh(E.mesh_of(data))} · {E.pipeline_headline(pipe)} · {t.get('dtype', '')}")
    else:
        o.line(f"mesh {E.fmt_mesh(E.mesh_of(data))} · 1 pipeline stage · {t.get('micro_batches', 1)} micro-batch(es) of "
               f"{t.get('micro_batch', '?')} · recompute {t.get('recompute', 'none')} · {t.get('dtype', '')}")
    o.line(E.execution_line(data.get("execution")))
    fits = "fits" if p.get("fits") else "DOES NOT FIT"
    usable = float(c.get("usable_memory_bytes") or 0.0)
    share = f" ({100 * float(p.get('peak_memory_bytes') or 0) / usable:.0f}% of {E.fmt_bytes(usable)})" if usable else ""
    o.line(f"step {E.fmt_seconds(p.get('step_time_s'))} · MFU {E.fmt_pct(p.get('mfu'))} · "
           + (f"{float(p['tokens_per_s']):,.0f} tokens/s · " if p.get("tokens_per_s") else "")
           + f"memory {E.fmt_bytes(p.get('peak_memory_bytes'))}/device{share} · {fits}", "bold green" if p.get("fits") else "bold red")
    o.line()
    parts = E.step_breakdown(data)
    total = sum(v for _, v in parts) or 1.0
    o.table("step time", ["part", "time", "share", ""],
            [[n, E.fmt_seconds(v), f"{100 * v / total:.1f}%", _bar(v / total)] for n, v in parts], right={1, 2})
    mparts = E.memory_breakdown(p, t.get("dtype") or "bf16")
    cap = usable or float(p.get("peak_memory_bytes") or 1.0)
    o.table("memory per device", ["part", "bytes", "of usable", ""],
            [[n, E.fmt_bytes(v), f"{100 * v / cap:.1f}%", _bar(v / cap)] for n, v in mparts], right={1, 2})
    rows, hl = [], set()
    for k, r in enumerate(E.alternatives(data)):
        if r["role"] == "chosen":
            hl.add(k)
        rows.append([r["name"], E.fmt_mesh(r.get("mesh")), str(r.get("micro_batches", "-")), str(r.get("recompute", "-")),
                     E.fmt_seconds(r.get("step_time_s")), E.fmt_pct(r.get("mfu")), E.fmt_bytes(r.get("peak_memory_bytes")),
                     "yes" if r.get("fits") else "no"])
    o.table("plan vs runners-up and baselines", ["plan", "mesh", "mb", "recompute", "step", "MFU", "memory", "fits"],
            rows, right={2, 4, 5, 6}, highlight=hl)
    if pipe is not None:
        _pipeline_table(o, pipe)
    segs = E.segments(data) if pipe is None else []
    names = (data.get("mesh") or {}).get("axis_names") or []
    lrows = []
    for s in segs:
        main = [x for x in s["ops"] if x.get("kind") not in E.ALIAS_KINDS]
        pl: dict[str, int] = {}
        for x in main:
            key = ",".join(x.get("output") or [])
            pl[key] = pl.get(key, 0) + 1
        common = ", ".join(f"[{k}] x{v}" for k, v in sorted(pl.items(), key=lambda kv: -kv[1])[:3])
        lrows.append([s["label"], f"x{s['count']}" if s["count"] > 1 else "", str(len(main)), E.fmt_seconds(s["compute_s"]), common])
    if lrows or pipe is None:
        o.table(f"layers (output placement per axis {', '.join(names)})", ["layers", "", "ops", "compute", "placements"],
                lrows, right={2, 3})
    sharded = [g for g in E.group_params(data.get("params") or {}, E._containers(data)) if any(x != "R" for x in g["placements"])]
    if sharded:
        o.table("sharded weights", ["parameter", "tensors", "placement"],
                [[g["pattern"], str(g["count"]), E.fmt_pl(g["placements"])] for g in sharded[:16]], right={1})
        if len(sharded) > 16:
            o.line(f"... {len(sharded) - 16} more sharded parameter groups (autoplan show PLAN -o report.html)")
    s = data.get("solver") or {}
    o.line(f"solver {s.get('name', '?')} ({E.fmt_seconds(s.get('seconds'))}, gap {float(s.get('gap') or 0):.2g}); "
           f"search {E.fmt_seconds(s.get('search_seconds'))} over {s.get('configurations', '?')} configurations", "dim")
    return o.render()


MAX_STAGES = 16


def _pipeline_table(o: _Out, p: dict[str, Any]) -> None:
    """One row per pipeline stage: its ranks and what it holds (long pipelines: first and last stages)."""
    stages = p["stages"]
    shown = stages if len(stages) <= MAX_STAGES else stages[: MAX_STAGES // 2] + stages[-MAX_STAGES // 2 + 1:]
    rows = []
    for k, st in enumerate(shown):
        if k and st["stage"] != shown[k - 1]["stage"] + 1:
            rows.append(["...", f"{st['stage'] - shown[k - 1]['stage'] - 1} more", "", ""])
        rows.append([str(st["stage"]), E.fmt_ranks(st["ranks"]), str(st["blocks"]), st["holds"]])
    o.table(f"pipeline stages (tp={p['tp']} x dp={p['dp']} devices each; {p['pp'] * p['v']} chunks, chunk i on stage i % {p['pp']})",
            ["stage", "devices", p["container"] or "blocks", "holds"], rows, right={2})
    if p["pp"] > 1:
        o.line(f"pipeline bubble {E.fmt_seconds(p['bubble_s'])} ({100 * p['bubble_share']:.1f}% of the step): "
               f"every stage idles (pp-1)/v = {(p['pp'] - 1) / p['v']:.3g} micro-batch passes")
        o.line()


LABELS = {"step_time_s": "step time", "compute_s": "compute", "comm_s": "exposed communication", "optimizer_s": "optimizer",
          "bubble_s": "pipeline bubble",
          "peak_memory_bytes": "peak memory / device", "param_memory_bytes": "params+grads+optimizer",
          "activation_memory_bytes": "activations", "mfu": "MFU", "tokens_per_s": "tokens / s"}
MAX_ROWS = 40


def diff(d: dict[str, Any], name_a: str, name_b: str, *, color: bool = False, plain: bool = False, width: int = 110) -> str:
    o = _Out(color, width, plain)
    o.line(f"{name_a} -> {name_b}", "bold")
    for n in d["notes"]:
        o.line("note: " + n, "yellow")
    if d["same"]:
        o.line("the plans make the same choices")
    if d["config"]:
        o.table("configuration", ["", name_a, name_b], [list(r) for r in d["config"]])
    if d["params"]:
        o.table(f"parameter placements ({sum(r['count'] for r in d['params'])} of {max(d['n_params'])} tensors changed)",
                ["parameter", "tensors", "blocks", "before", "after"],
                [[r["what"], str(r["count"]), r["blocks"], E.fmt_pl(r["old"]) if r["old"] else "(absent)",
                  E.fmt_pl(r["new"]) if r["new"] else "(absent)"] for r in d["params"][:MAX_ROWS]], right={1})
        if len(d["params"]) > MAX_ROWS:
            o.line(f"... {len(d['params']) - MAX_ROWS} more groups of changed parameters")
    if d["ops"]:
        def pl(x: dict | None) -> str:
            if not x:
                return "(absent)"
            return " ".join(E.fmt_pl(i) for i in x.get("inputs") or []) + " -> " + E.fmt_pl(x.get("output"))

        o.table(f"op placements ({sum(r['count'] for r in d['ops'])} of {max(d['n_ops'])} ops changed)",
                ["op", "ops", "blocks", "before", "after"],
                [[r["what"], str(r["count"]), r["blocks"], pl(r["old"]), pl(r["new"])]
                 for r in d["ops"][:MAX_ROWS]], right={1})
        if len(d["ops"]) > MAX_ROWS:
            o.line(f"... {len(d['ops']) - MAX_ROWS} more groups of changed ops")
    rows = []
    for c in d["cost"]:
        a, b = c["a"], c["b"]
        if c["kind"] == "n":
            fa = f"{a:,.0f}" if a is not None else "-"
            fb = f"{b:,.0f}" if b is not None else "-"
            delta = f"{(b - a) / a * 100:+.1f}%" if a and b is not None else "-"
        else:
            f = {"s": E.fmt_seconds, "b": E.fmt_bytes, "pct": E.fmt_pct}[c["kind"]]
            fa, fb, delta = f(a), f(b), E.fmt_delta(a, b, c["kind"])
        rows.append([LABELS.get(c["field"], c["field"]), fa, fb, delta])
    fa, fb = d["fits"]
    rows.append(["fits", "yes" if fa else "no", "yes" if fb else "no", "" if fa == fb else "changed"])
    o.table("what it costs", ["", name_a, name_b, "change"], rows, right={1, 2, 3})
    return o.render()


def explain(e: dict[str, Any], *, color: bool = False, plain: bool = False, width: int = 110) -> str:
    o = _Out(color, width, plain)
    op = e["op"]
    names = list(e["mesh"])
    where = f" in {op.get('module')}" if op.get("module") else ""
    copies = f" (one of {e['copies']} identical blocks: same placement in all)" if e["copies"] > 1 else ""
    o.line(f"{op['name']}: {op.get('target')} ({op.get('kind')}){where}{copies}", "bold")
    o.line(f"output {E.fmt_pl(op.get('output'))} on mesh axes ({', '.join(names)}) · compute {E.fmt_seconds(op.get('compute_s'))} per step"
           f" · activations {E.fmt_bytes(op.get('activation_bytes'))}")
    o.line()
    if e["producers"]:
        o.table("inputs", ["#", "producer", "what", "it has", "op needs", ""],
                [[str(i), p["name"], p["kind"], E.fmt_pl(p["has"]) if p["has"] else "?", E.fmt_pl(p["needs"]),
                  "reshard" if p["reshard"] else ""] for i, p in enumerate(e["producers"])], right={0})
    if e["consumers"]:
        o.table("read by", ["consumer", "what", "needs"],
                [[c["name"], str(c["kind"]), E.fmt_pl(c["needs"])] for c in e["consumers"][:12]])
    if e["collectives"]:
        acc: dict[tuple, list[float]] = {}
        for c in e["collectives"]:
            k = (c.get("phase"), c.get("kind"), c.get("axis"), c.get("src") if c.get("dst") == op["name"] else "-> " + str(c.get("dst")))
            acc.setdefault(k, [0, 0.0])
            acc[k][0] += int(c.get("per_step") or 1)
            acc[k][1] += float(c.get("bytes") or 0.0) * int(c.get("per_step") or 1)
        o.table("collectives around it (per step)", ["phase", "collective", "axis", "tensor", "count", "bytes"],
                [[str(k[0]), str(k[1]), str(k[2]), str(k[3]), str(int(v[0])), E.fmt_bytes(v[1])] for k, v in acc.items()],
                right={4, 5})
    rows = e.get("candidates")
    if rows:
        legal = [r for r in rows if r["legal"]]
        shown = legal[:15]
        if not any(r["chosen"] for r in shown):
            shown += [r for r in legal if r["chosen"]]
        hl = {i for i, r in enumerate(shown) if r["chosen"]}
        o.table(f"candidates ({len(legal)} legal of {len(rows)}; seconds per step for one copy, neighbours as planned)",
                ["", "inputs -> output", "compute", "comm", "optimizer", "total", "vs chosen", "memory"],
                [["*" if r["chosen"] else "", " ".join(E.fmt_pl(i) for i in r["inputs"]) + " -> " + E.fmt_pl(r["output"]),
                  E.fmt_seconds(r["compute_s"]), E.fmt_seconds(r["comm_s"]), E.fmt_seconds(r["optimizer_s"]),
                  E.fmt_seconds(r["total_s"]), "chosen" if r["chosen"] else "+" + E.fmt_seconds(r["delta_s"]) if r["delta_s"] >= 0 else "-" + E.fmt_seconds(-r["delta_s"]),
                  E.fmt_bytes(r["memory_bytes"]) + ("" if r["fits"] else " (no fit)")] for r in shown],
                right={2, 3, 4, 5, 6, 7}, highlight=hl)
        if len(legal) > len(shown):
            o.line(f"... {len(legal) - len(shown)} more legal candidates")
        v = E.verdict(e)
        if v:
            o.line("why: " + v, "bold")
    if e.get("candidates_note"):
        o.line(("note: " if rows else "candidates: ") + e["candidates_note"], "yellow")
    return o.render()
