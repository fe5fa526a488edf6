"""Multi-rank runtime tests: real torchrun launches on 4 CPU ranks (gloo). Slow: few launches.

* one launch checks many (model, plan family) cases against a single process: gradients,
  losses of 3 AdamW steps, parameters, one SGD step, and the collectives as priced (exactly the
  plan's, per edge and per layer, with per-parameter and with bucketed gradient all-reduces);
* ``autoplan train`` trains 20 steps (loss falls), is killed after a checkpoint and restarted
  (same losses), and a 2-rank tensor-parallel plan resumes the 4-rank FSDP checkpoint.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import assert_as_priced

import autoplan

pytestmark = pytest.mark.slow

HERE = Path(__file__).parent / "multirank"
HF = importlib.util.find_spec("transformers") is not None
ZOO_CASES = [
    "gpt-tiny:ddp", "gpt-tiny:fsdp", "gpt-tiny:megatron:tp=4", "gpt-tiny:megatron:dp=2+tp=2",
    "llama-tiny:ddp", "llama-tiny:fsdp", "llama-tiny:megatron:tp=4", "llama-tiny:megatron:dp=2+tp=2",
    "gpt-tiny:fsdp::2", "llama-tiny:megatron:dp=2+tp=2:2",
]
HF_CASES = ["hf-gpt2:megatron:dp=2+tp=2", "hf-llama:megatron:dp=2+tp=2"] if HF else []


def torchrun(nproc: int, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    return subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("eq") / "report.json"
    proc = torchrun(4, "equivalence_worker.py", str(out), ",".join(["moves", "vocab_ce"] + ZOO_CASES + HF_CASES))
    assert out.exists(), proc.stderr[-3000:]
    return {c["case"]: c for c in json.loads(out.read_text())}


def test_moves_keep_values(report):
    """Every placement move on a 2x2 mesh (the runtime's axis order and all-to-all included) gives
    the same full tensor on 4 gloo ranks; only S -> P under a nested split is refused."""
    r = report["moves"]
    assert "error" not in r, r.get("traceback")
    assert r["wrong"] == [] and r["checked"] == 127, r


def test_vocab_parallel_cross_entropy_matches_one_process_and_issues_the_priced_all_reduces(report):
    r = report["vocab_ce"]
    assert "error" not in r, r.get("traceback")
    assert len(r["results"]) == 3
    for res in r["results"]:
        assert res["loss_rel"] < 1e-6 and res["grad_rel"] < 1e-6, res
        assert [list(i) for i in res["issued"]] == res["expected"], res


@pytest.mark.parametrize("case", ZOO_CASES)
def test_planned_run_matches_one_process(report, case):
    r = report[case]
    assert "error" not in r, r.get("traceback")
    assert r["grad_rel"] < 1e-5, r  # every full gradient of step 1, relative to its norm
    assert r["loss_rel"] < 1e-5, r  # losses of 3 AdamW steps
    assert r["param_abs"] < 1e-4, r  # every parameter after them (max abs difference)
    if "sgd_param_rel" in r:
        assert r["sgd_param_rel"] < 1e-5, r  # one SGD step: gradients are averaged, not summed
    assert not r["grads_missing"]
    assert not r["unplanned"], r["unplanned"]  # every op produced the planned placement




@pytest.mark.parametrize("case", ZOO_CASES)
def test_collectives_as_priced(report, case):
    r = report[case]
    assert "error" not in r, r.get("traceback")
    c = r["collectives"]  # one gradient all-reduce per parameter, as the plan lists them
    assert_as_priced(c)
    assert c["buckets"] == [] and c["issued"] == c["planned"]
    b = r["collectives_bucketed"]  # the same step as train_step runs it: gradient all-reduces bucketed
    assert_as_priced(b)
    if case.split(":")[1] == "ddp":
        assert b["buckets"] and b["issued"] < c["issued"]  # DDP: fewer, larger all-reduces
    assert r["loss_report"] == [1, 1]  # the step's loss: one all-reduce over all ranks, as priced


@pytest.mark.skipif(not HF, reason="transformers is not installed (pip install autoplan[hf])")
@pytest.mark.parametrize("case", HF_CASES)
def test_transformers_models(report, case):
    """torch.export graphs (batch and meta device baked in, tied embeddings, no-grad rotary regions)
    run per op and match one process as the zoo's symbolic traces do."""
    r = report[case]
    assert "error" not in r, r.get("traceback")
    assert r["grad_rel"] < 1e-5, r
    assert r["loss_rel"] < 1e-5, r
    assert r["param_abs"] < 1e-4, r
    assert r["sgd_param_rel"] < 1e-5, r
    assert not r["grads_missing"]
    assert not r["unplanned"], r["unplanned"]


@pytest.mark.skipif(not HF, reason="transformers is not installed (pip install autoplan[hf])")
@pytest.mark.parametrize("case", HF_CASES)
def test_transformers_collectives_as_priced(report, case):
    r = report[case]
    assert "error" not in r, r.get("traceback")
    assert_as_priced(r["collectives"])
    assert_as_priced(r["collectives_bucketed"])


# ------------------------------------------------------------------------------ autoplan train


def train_cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from autoplan.runtime.launch import train_command; train_command()", *args]


LOSS = re.compile(r"step\s+(\d+)/\d+\s+loss ([0-9.]+)")


def losses(text: str) -> dict[int, float]:
    return {int(m.group(1)): float(m.group(2)) for m in LOSS.finditer(text)}


def test_train_cli_checkpoint_kill_resume_reshard(tmp_path):
    fsdp4 = tmp_path / "fsdp4.json"
    autoplan.plan("gpt-tiny", cluster="cpu", devices=4, global_batch=8, seq_len=32, baselines=False, force="fsdp",
                  dtype="fp32").save(fsdp4)
    tp2 = tmp_path / "tp2.json"
    autoplan.plan("gpt-tiny", cluster="cpu", devices=2, global_batch=8, seq_len=32, baselines=False, force="megatron",
                  mesh="tp=2", dtype="fp32").save(tp2)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    # 1. 20 uninterrupted steps on 4 ranks: the loss falls on the learnable stream
    full = subprocess.run(train_cli(str(fsdp4), "--model", "gpt-tiny", "--steps", "20", "--checkpoint-dir",
                                    str(tmp_path / "a"), "--checkpoint-every", "10"),
                          capture_output=True, text=True, env=env, timeout=300)
    assert full.returncode == 0, full.stderr[-3000:]
    ref = losses(full.stdout)
    assert sorted(ref) == list(range(1, 21))
    assert sum(ref[k] for k in (18, 19, 20)) / 3 < ref[1] - 0.5, ref
    assert "tok/s" in full.stdout and "measured/predicted" in full.stdout

    # 2. killed after the step-10 checkpoint, restarted: continues at step 11 with the same losses
    ck = tmp_path / "b"
    proc = subprocess.Popen(train_cli(str(fsdp4), "--model", "gpt-tiny", "--steps", "20", "--checkpoint-dir", str(ck),
                                      "--checkpoint-every", "5"),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, start_new_session=True)
    deadline = time.time() + 240
    while not (ck / "step-00000010" / "COMPLETE").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)  # torchrun's agent forwards it to the ranks (their own sessions)
    proc.wait(timeout=60)
    assert (ck / "step-00000010" / "COMPLETE").exists()
    for late in ck.glob("step-*"):  # a run killed later than step 10: keep the step-10 state only
        if late.name > "step-00000010":
            shutil.rmtree(late)
    (ck / ".tmp-step-00000015").mkdir(exist_ok=True)  # a half-written checkpoint is never loaded
    (ck / "step-00000016").mkdir(exist_ok=True)  # nor one without its completion marker
    again = subprocess.run(train_cli(str(fsdp4), "--model", "gpt-tiny", "--steps", "14", "--checkpoint-dir", str(ck)),
                           capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = losses(again.stdout)
    assert sorted(resumed) == [11, 12, 13, 14] and "resumed from step 10" in again.stdout
    for step, value in resumed.items():
        assert abs(value - ref[step]) <= 1e-5 * abs(ref[step]), (step, value, ref[step])

    # 3. the 4-rank FSDP checkpoint of step 10 resumed by a 2-rank tensor-parallel plan (resharded on load)
    shutil.copytree(tmp_path / "a" / "step-00000010", tmp_path / "c" / "step-00000010")
    two = subprocess.run(train_cli(str(tp2), "--model", "gpt-tiny", "--steps", "12", "--checkpoint-dir",
                                   str(tmp_path / "c")), capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "resumed from step 10" in two.stdout
    moved = losses(two.stdout)
    assert sorted(moved) == [11, 12]
    for step, value in moved.items():
        assert abs(value - ref[step]) <= 1e-5 * abs(ref[step]), (step, value, ref[step])
