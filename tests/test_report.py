"""autoplan show / diff / explain: terminal, HTML (in headless Chromium), PNG/SVG, errors."""
from __future__ import annotations

import copy
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
from autoplan.report.html import PIPELINE_SECTIONS, SECTIONS, render_html


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


def _page_status(page: Path) -> dict[str, str]:
    """The report's #report-status attributes after it loaded in headless Chromium (no script errors)."""
    res = _chrome(["--dump-dom", "--virtual-time-budget=3000"], page.as_uri())
    m = re.search(r'<div id="report-status"[^>]*>', res.stdout)
    assert m, res.stderr[-2000:]
    status = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', m.group(0)))
    assert status.get("ready") == "1", status
    assert status.get("errors") == "0", status
    assert "Uncaught" not in res.stderr
    assert not re.search(r"CONSOLE.*(Error|error)", res.stderr), res.stderr[-2000:]
    return status


def test_html_loads_in_chromium_without_errors(plans, tmp_path):
    if _chromium() is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    out = tmp_path / "report.html"
    assert run("show", str(plans[0]), "-o", str(out)).exit_code == 0
    status = _page_status(out)
    assert status.get("empty") == "0", status
    assert int(status.get("sections", 0)) == len(SECTIONS)
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


# ---------------------------------------------------------------------------------------------- pipeline plans

def _as_pipeline(data: dict, *, pp: int = 2, dp: int = 2, tp: int = 1, v: int = 1, micro_batch: int = 1,
                 zero: int = 1, recompute: str = "full") -> dict:
    """A per-op plan turned into the plan make_plan writes when the pipeline search wins.

    The estimate is made up from the per-op prediction (cheap); the rest is the planner's own code.
    """
    from types import SimpleNamespace

    from autoplan.execution import pipeline_execution
    from autoplan.planner import _pipeline_prediction

    d = copy.deepcopy(data)
    t, p = d["training"], d["predicted"]
    cfg = {"tp": tp, "pp": pp, "dp": dp, "virtual_stages": v, "micro_batch": micro_batch, "recompute": recompute,
           "sequence_parallel": False, "zero": zero, "dtype": t["dtype"], "attention": "flash"}
    m = t["global_batch"] // (dp * micro_batch)
    compute, comm, opt = p["compute_s"] * 1.2, p["comm_s"] * 0.5, p["optimizer_s"]
    bubble = (pp - 1) / v * (compute + comm) / m
    step = compute + comm + opt + bubble
    est = {"step_time_s": step, "compute_s": compute, "comm_s": comm, "bubble_s": bubble, "optimizer_s": opt,
           "peak_memory_bytes": p["peak_memory_bytes"] * 0.7, "fits": True, "mfu": p["mfu"] * 0.9,
           "tokens_per_s": p["tokens_per_s"], "model_tflops_per_device": 3.0,
           "hardware_tflops_per_device": 4.0 if recompute == "full" else 3.0, "micro_batches": m,
           "mesh": {"tp": tp, "pp": pp, "dp": dp}, "param_memory_bytes": p["param_memory_bytes"] * 0.5,
           "activation_memory_bytes": p["peak_memory_bytes"] * 0.7 - p["param_memory_bytes"] * 0.5}
    d["per_op_alternative"] = {"predicted": p, "mesh": d["mesh"], "execution": d.get("execution")}
    d["pipeline_alternative"] = {"found": True, "config": cfg, "predicted": est, "faster_than_plan": True, "candidates": 3,
                                 "seconds": 0.1, "executable": True}
    d["predicted"] = _pipeline_prediction(est, cfg)
    d["execution"] = pipeline_execution(SimpleNamespace(**cfg), t["global_batch"])
    d["mesh"] = {"shape": [pp, dp, tp], "axis_names": ["pp", "dp", "tp"]}
    d["training"] = {**t, "micro_batches": m, "micro_batch": micro_batch, "recompute": recompute, "dtype": cfg["dtype"],
                     "pipeline_stages": pp, "virtual_stages": v, "zero": zero, "sequence_parallel": False}
    d["ops"], d["params"], d["inputs"], d["collectives"] = [], {}, {}, []
    return d


@pytest.fixture(scope="module")
def pipe_plan(plans, tmp_path_factory):
    from autoplan.plan import Plan

    path = tmp_path_factory.mktemp("pipe") / "pipe.json"
    Plan(_as_pipeline(E.load_plan(plans[0]))).save(path)
    return path


def test_pipeline_layout_splits_blocks_over_stages_and_chunks(plans):
    data = _as_pipeline(E.load_plan(plans[0]), pp=2, dp=1, v=2)
    data["model"]["repeated_blocks"] = [{"container": "blocks", "count": 5}]
    lay = E.pipeline_layout(data)
    assert (lay["pp"], lay["v"], lay["schedule"], lay["zero"]) == (2, 2, "interleaved", 1)
    assert [c["count"] for c in lay["chunks"]] == [1, 1, 1, 2]  # balanced, chunk i on stage i % pp
    s0, s1 = lay["stages"]
    assert s0["holds"] == "embedding, blocks 0, 2" and s0["blocks"] == 2 and s0["ranks"] == (0, 0)
    assert s1["holds"] == "blocks 1, 3-4, final norm + head" and s1["blocks"] == 3
    for blocks, pp, v in [(96, 16, 4), (7, 3, 1), (10, 4, 2), (3, 3, 1)]:
        counts = E.split_blocks(blocks, pp * v)
        assert sum(counts) == blocks and max(counts) - min(counts) <= 1
    # the simulated schedule ends after (m + (pp-1)/v) stage passes, the estimate's formula
    sched = E.pipeline_schedule(4, 2, 8, 1.0, 2.0)
    assert max(op[4] for row in sched for op in row) == pytest.approx((8 + 3 / 2) * 3 * 2)


def test_pipeline_plan_breakdown_and_alternatives(pipe_plan):
    data = E.load_plan(pipe_plan)
    assert E.is_pipeline(data) and not E.segments(data)
    p = data["predicted"]
    parts = dict(E.step_breakdown(data))
    assert parts["recompute"] == pytest.approx(p["recompute_s"]) and parts["recompute"] > 0
    assert parts["pipeline bubble"] == pytest.approx(p["bubble_s"]) and p["bubble_s"] > 0
    assert sum(parts.values()) == pytest.approx(p["step_time_s"])
    old = copy.deepcopy(data)
    del old["predicted"]["recompute_s"]  # plans written before recompute_s: from the estimate's TFLOP/s
    assert dict(E.step_breakdown(old))["recompute"] == pytest.approx(p["compute_s"] / 4)
    rows = {r["name"]: r for r in E.alternatives(data)}
    assert rows["per-op plan (not chosen)"]["step_time_s"] == data["per_op_alternative"]["predicted"]["step_time_s"]
    assert "native recipe" in E.execution_line(data["execution"]) and "pipeline search" in E.execution_line(data["execution"])


def test_pipeline_plan_text_summary_names_the_stages(pipe_plan):
    for plain in (True, False):
        out = T.summary(E.load_plan(pipe_plan), plain=plain)
        assert "2 pipeline stages" in out and "1 pipeline stage " not in out
        assert "pipeline stages" in out and "embedding, blocks 0" in out and "blocks 1, final norm + head" in out
        assert "runs as a native recipe: tp=1 pp=2 dp=2, ZeRO 1, 4 micro-batches, 1F1B" in out
        assert "per-op plan (not chosen)" in out and "pipeline bubble" in out
        assert "layers (output placement" not in out  # no empty per-op layer table
    r = run("show", str(pipe_plan))
    assert r.exit_code == 0 and "stage" in r.output


def test_pipeline_plan_html_has_the_stages_and_no_empty_section(pipe_plan, tmp_path):
    out = tmp_path / "pipe.html"
    r = run("show", str(pipe_plan), "-o", str(out))
    assert r.exit_code == 0, r.output
    page = out.read_text()
    for sid, _ in PIPELINE_SECTIONS:
        assert f'<section id="{sid}">' in page
    for sid in ("graph", "params", "collectives"):
        assert f'<section id="{sid}">' not in page
    assert 'aria-label="pipeline stages"' in page and "per-op plan (not chosen)" in page
    assert "runs as a native recipe" in page and "1 pipeline stage" not in page and "{v}" not in page
    if _chromium() is None:
        return
    status = _page_status(out)
    assert status.get("empty") == "0", status
    assert int(status.get("sections", 0)) == len(PIPELINE_SECTIONS)


@pytest.mark.parametrize("fmt", ["png", "svg"])
def test_pipeline_plan_static_picture(pipe_plan, tmp_path, fmt):
    pytest.importorskip("matplotlib")
    out = tmp_path / f"pipe.{fmt}"
    r = run("show", str(pipe_plan), "--format", fmt, "-o", str(out))
    assert r.exit_code == 0, r.output
    assert out.stat().st_size > 10_000
    if fmt == "svg":
        text = out.read_text()
        assert "stage 0" in text and "per-op plan (not chosen)" in text


def test_pipeline_plan_explain_and_diff(pipe_plan, plans):
    r = run("explain", str(pipe_plan), "linear", "--no-candidates")
    assert r.exit_code == 2 and "pipeline recipe" in r.output and len(r.output.strip().splitlines()) == 1
    r = run("diff", str(plans[0]), str(pipe_plan))
    assert r.exit_code == 0, r.output
    assert "pipeline-stages" in r.output and "no per-op placements" in r.output and "pipeline bubble" in r.output


def test_plans_without_execution_and_with_a_pipeline_alternative(plans, pipe_plan, tmp_path):
    from autoplan.plan import Plan

    data = E.load_plan(plans[0])
    data.pop("execution", None)  # plans from before execution existed run per-op
    data["pipeline_alternative"] = E.load_plan(pipe_plan)["pipeline_alternative"]
    data["pipeline_alternative"]["faster_than_plan"] = False
    path = tmp_path / "old.json"
    Plan(data).save(path)
    out = T.summary(E.load_plan(path), plain=True)
    assert "runs with the per-op runtime" in out and "1 pipeline stage" in out and "pipeline (not chosen)" in out
    page = render_html(E.load_plan(path))
    assert all(f'<section id="{sid}">' in page for sid, _ in SECTIONS) and "pipeline (not chosen)" in page
    assert run("show", str(path), "--format", "svg", "-o", str(tmp_path / "old.svg")).exit_code == 0
