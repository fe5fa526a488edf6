"""Click commands ``show``, ``diff`` and ``explain`` (registered in ``autoplan.cli``).

Errors are one line on stderr with exit code 2, as everywhere in the CLI.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from autoplan.clitools import fail_cleanly
from autoplan.errors import AutoplanError


_fail_cleanly = fail_cleanly


def _color() -> bool:
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    except OSError as exc:
        raise AutoplanError(f"cannot write {path}: {exc.strerror or exc}") from None


@click.command("show")
@click.argument("plan", type=click.Path(dir_okay=True))
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the report here (report.html, or .png/.svg); without it, print a summary.")
@click.option("--format", "fmt", type=click.Choice(["html", "png", "svg"]), help="Report format (default: from the -o suffix, else html).")
@_fail_cleanly
def show(plan: str, output: str | None, fmt: str | None) -> None:
    """Show PLAN: a terminal summary, or a self-contained HTML report (-o report.html) or picture (--format png|svg)."""
    from autoplan.report.explain import load_plan

    data = load_plan(plan)
    if output is None and fmt is None:
        from autoplan.report.text import summary

        click.echo(summary(data, color=_color()), nl=False)
        return
    if fmt is None:
        suffix = Path(output).suffix.lower().lstrip(".") if output else ""
        fmt = suffix if suffix in ("png", "svg") else "html"
    out = Path(output) if output else Path(plan).with_suffix("." + fmt)
    if out.resolve() == Path(plan).resolve():
        raise AutoplanError(f"-o {out} would overwrite the plan itself: pick another file name")
    if not out.parent.exists():
        raise AutoplanError(f"cannot write {out}: folder {out.parent} does not exist")
    if fmt == "html":
        from autoplan.report.html import render_html

        _write_atomic(out, render_html(data, source=str(plan)))
    else:
        from autoplan.report.static import render_static

        tmp = out.with_name(out.name + ".tmp")
        render_static(data, tmp, fmt)
        tmp.replace(out)
    click.echo(f"report written to {out} ({out.stat().st_size / 1024:.0f} KiB)")


@click.command("diff")
@click.argument("a", type=click.Path(dir_okay=True))
@click.argument("b", type=click.Path(dir_okay=True))
@_fail_cleanly
def diff(a: str, b: str) -> None:
    """What changed from plan A to plan B (mesh, schedule, placements, grouped by layer) and what it costs."""
    from autoplan.report.explain import diff_plans, load_plan
    from autoplan.report.text import diff as render

    da, db = load_plan(a), load_plan(b)
    click.echo(render(diff_plans(da, db), Path(a).name, Path(b).name, color=_color()), nl=False)


@click.command("explain")
@click.argument("plan", type=click.Path(dir_okay=True))
@click.argument("op")
@click.option("--no-candidates", is_flag=True, help="Do not re-price the op's candidate placements (faster).")
@_fail_cleanly
def explain(plan: str, op: str, no_candidates: bool) -> None:
    """Why OP (an op name or its module path) got its placement in PLAN: its inputs, collectives and candidates."""
    from autoplan.report.explain import explain_op, load_plan
    from autoplan.report.text import explain as render

    data = load_plan(plan)
    click.echo(render(explain_op(data, op, with_candidates=not no_candidates), color=_color()), nl=False)
