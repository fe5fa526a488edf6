"""autoplan show / diff / explain: terminal, HTML (in headless Chromium), PNG/SVG, errors."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import autoplan
from autoplan.report import explain as E
from autoplan.report import text as T
from autoplan.report.commands import diff, explain, show
from autoplan.report.html import SECTIONS, render_html


@click.group()
def cli() -> None:
    """The three commands as the real CLI registers them."""


for _cmd in (show, diff, explain):
    cli.add_command(_cmd)


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    d = tmp_path_factory.mktemp("plans")
    a = autoplan.plan("gpt-tiny", cluster="dgx-h100", devices=4, global_batch=8, seq_len=32)
    b = autoplan.plan("gpt-tiny", cluster="dgx-h100", devices=4, global_batch=8, seq_len=32, mesh="dp=4", baselines=False)
    a.save(d / "a.json")
    b.save(d / "b.json")
    return d / "a.json", d / "b.json"


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _chrome(args: list[str], url: str) -> subprocess.CompletedProcess:
    exe = _chromium()
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *args, url],
            capture_output=True, text=True, timeout=60)


# ---------------------------------------------------------------------------------------------- terminal

def test_show_prints_summary_and_writes_nothing(plans, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = run("show", str(plans[0]))
    assert r.exit_code == 0, r.output
    for word in ("gpt-tiny", "step time", "memory per device", "autoplan", "ddp", "fsdp", "megatron", "blocks.0-1", "x2"):
        assert word in r.output
    assert list(tmp_path.iterdir()) == []


def test_plain_text_fallback(plans):
    data = E.load_plan(plans[0])
    out = T.summary(data, plain=True)
    assert "step time" in out and "plan vs runners-up and baselines" in out and "blocks.0-1" in out


def test_segments_group_identical_blocks(plans):
    data = E.load_plan(plans[0])
    segs = E.segments(data)
    blocks = [s for s in segs if s["kind"] == "block"]
    assert len(blocks) == 1 and blocks[0]["count"] == 2 and blocks[0]["label"] == "blocks.0-1"
    total = sum(float(o["compute_s"]) for o in data["ops"])
    assert sum(s["compute_s"] for s in segs) == pytest.approx(total)
    parts = dict(E.step_breakdown(data))
    assert sum(parts.values()) == pytest.approx(data["predicted"]["step_time_s"], rel=1e-6)
    assert parts["pipeline bubble"] == 0


# ---------------------------------------------------------------------------------------------- HTML

def test_html_is_self_contained_with_every_section(plans, tmp_path):
    out = tmp_path / "report.html"
    r = run("show", str(plans[0]), "-o", str(out))
    assert r.exit_code == 0, r.output
    page = out.read_text()
    for sid, _ in SECTIONS:
        assert f'<section id="{sid}">' in page
    assert 'id="summary"' in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page), "no network references"
    assert "<link" not in page and "@import" not in page
    assert "1 stage" in page and "data-op=" in page


def test_html_loads_in_chromium_without_errors(plans, tmp_path):
    if _chromium() is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    out = tmp_path / "report.html"
    assert run("show", str(plans[0]), "-o", str(out)).exit_code == 0
    res = _chrome(["--dump-dom", "--virtual-time-budget=3000"], out.as_uri())
    dom = res.stdout
    m = re.search(r'<div id="report-status"[^>]*>', dom)
    assert m, res.stderr[-2000:]
    status = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', m.group(0)))
    assert status.get("ready") == "1", status
    assert status.get("errors") == "0", status
    assert status.get("empty") == "0", status
    assert int(status.get("sections", 0)) == len(SECTIONS)
    assert "Uncaught" not in res.stderr
    assert not re.search(r"CONSOLE.*(Error|error)", res.stderr), res.stderr[-2000:]
    shot = tmp_path / "shot.png"
    res = _chrome(["--hide-scrollbars", "--window-size=1300,2400", f"--screenshot={shot}"], out.as_uri())
    assert shot.exists() and shot.stat().st_size > 20_000, res.stderr[-2000:]
    assert "Uncaught" not in res.stderr


# ---------------------------------------------------------------------------------------------- pictures

@pytest.mark.parametrize("fmt", ["png", "svg"])
def test_static_picture(plans, tmp_path, fmt):
    pytest.importorskip("matplotlib")
    out = tmp_path / f"summary.{fmt}"
    r = run("show", str(plans[0]), "--format", fmt, "-o", str(out))
    assert r.exit_code == 0, r.output
    assert out.stat().st_size > 10_000
    if fmt == "svg":
        assert out.read_text().lstrip().startswith(("<?xml", "<svg"))
        return
    import numpy as np
    from matplotlib.image import imread

    img = imread(str(out))
    assert img.shape[0] > 400 and img.shape[1] > 800
    rgb = img[..., :3]
    non_white = (rgb < 0.95).any(axis=-1).mean()
    assert non_white > 0.05, "picture is blank"
    assert len(np.unique((rgb * 255).astype(np.uint8).reshape(-1, 3), axis=0)) > 20, "picture has almost no colours"


# ---------------------------------------------------------------------------------------------- diff

def test_diff_groups_repeated_layers_and_prices_the_change(plans):
    r = run("diff", str(plans[0]), str(plans[1]))
    assert r.exit_code == 0, r.output
    d = E.diff_plans(E.load_plan(plans[0]), E.load_plan(plans[1]))
    ma, mb = E.mesh_of(E.load_plan(plans[0])), E.mesh_of(E.load_plan(plans[1]))
    if ma != mb:
        assert "mesh" in r.output
    assert "what it costs" in r.output and "step time" in r.output
    for row in d["ops"] + d["params"]:
        if row["what"].startswith("blocks.*"):
            assert row["count"] >= 2 and row["blocks"] == "0-1"
    # a block pattern is one line, not one per block
    assert "blocks.1." not in r.output


def test_diff_of_a_plan_with_itself(plans):
    r = run("diff", str(plans[0]), str(plans[0]))
    assert r.exit_code == 0 and "same choices" in r.output


# ---------------------------------------------------------------------------------------------- explain

def test_explain_lists_priced_candidates(plans):
    data = E.load_plan(plans[0])
    linear = next(o for o in data["ops"] if o["kind"] == "linear" and o["module"].startswith("blocks.1."))
    r = run("explain", str(plans[0]), linear["name"])
    assert r.exit_code == 0, r.output
    assert "candidates" in r.output and "chosen" in r.output and "why:" in r.output
    exp = E.explain_op(data, linear["name"])
    assert exp["candidates_note"] is None, exp["candidates_note"]  # re-priced step time matches the plan
    chosen = [c for c in exp["candidates"] if c["chosen"]]
    assert len(chosen) == 1 and chosen[0]["output"] == linear["output"]
    assert exp["copies"] == 2


def test_explain_by_module_path_without_candidates(plans):
    data = E.load_plan(plans[0])
    module = next(o["module"] for o in data["ops"] if o["kind"] == "linear")
    r = run("explain", str(plans[0]), module, "--no-candidates")
    assert r.exit_code == 0, r.output
    assert "inputs" in r.output


# ---------------------------------------------------------------------------------------------- errors

def test_unknown_op_lists_close_matches(plans):
    r = run("explain", str(plans[0]), "linearr_1", "--no-candidates")
    assert r.exit_code == 2
    assert "did you mean" in r.output and "linear_1" in r.output
    assert len(r.output.strip().splitlines()) == 1


@pytest.mark.parametrize("content", [None, "{not json", json.dumps({"schema": "other"}), json.dumps([1, 2]), "DIR"])
def test_bad_plan_files_are_one_line_errors(tmp_path, content):
    path = tmp_path / "plan.json"
    if content == "DIR":
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    for args in (["show", str(path)], ["explain", str(path), "x"], ["diff", str(path), str(path)]):
        r = run(*args)
        assert r.exit_code == 2, (args, r.output)
        assert r.output.startswith("error: ") and len(r.output.strip().splitlines()) == 1


def test_output_folder_must_exist(plans, tmp_path):
    r = run("show", str(plans[0]), "-o", str(tmp_path / "nope" / "r.html"))
    assert r.exit_code == 2 and "does not exist" in r.output
