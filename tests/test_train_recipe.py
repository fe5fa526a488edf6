"""Checkpoints and ``autoplan train`` for recipe plans (pipeline, ZeRO, FSDP2, tensor parallel).

Fast tests (one process, a one-rank gloo group): a recipe checkpoint has exactly the keys of a
per-op one (``get_model_state_dict`` / ``get_optimizer_state_dict`` of the plain model), round
trips exactly, ignores half-written checkpoints and refuses bad ones in one line.

Slow tests, two kinds of launches on 4 CPU ranks:

* ``tests/multirank/checkpoint_worker.py`` (one launch): the pipeline plan that ``autoplan
  estimate -o`` writes (pp=2 x dp=2) trains 20 steps uninterrupted (the reference); then a chain
  of fresh models, each of another layout or engine (tp=2 x dp=2 ZeRO-1 twice, a per-op DDP plan,
  ZeRO-3 x tp=2, pp=2 x dp=2 ZeRO-1, the pipeline plan), loads the previous one's checkpoint,
  must hold the same full parameters, and trains 2 steps with the reference's losses;
* ``autoplan train`` on that pipeline plan: killed after its step-10 checkpoint, restarted (it
  resumes at step 11 past a half-written and an unmarked checkpoint); together the two runs
  give the reference's 20 losses, which fall on the synthetic learnable stream.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

import autoplan.models as zoo
from autoplan.errors import AutoplanError
from autoplan.runtime.checkpoint import checkpoint_info, latest_checkpoint, load_checkpoint, save_checkpoint
from autoplan.runtime.recipe import Recipe, apply_recipe
from autoplan.runtime.train import TokenStream, synthetic_tokens

MODEL = "gpt-tiny:layers=4"


def build(name: str = MODEL) -> torch.nn.Module:
    torch.manual_seed(0)
    return zoo.resolve_model(name).build()


def adamw(params):
    return torch.optim.AdamW(params, lr=1e-3)


DATA = TokenStream(synthetic_tokens(256), 4, 16)


# ------------------------------------------------------------------------------ fast: no process group


def test_latest_checkpoint_ignores_half_written(tmp_path):
    assert latest_checkpoint(tmp_path / "none") is None
    for name in ("step-00000005", "step-00000010", ".tmp-step-00000015", "step-00000016", "step-junk"):
        (tmp_path / name).mkdir()
    for name in ("step-00000005", "step-00000010", "step-junk"):
        (tmp_path / name / "COMPLETE").write_text(json.dumps({"step": 0}))
    (tmp_path / ".tmp-step-00000015" / "COMPLETE").write_text("{}")  # marked but never renamed: a kill mid-save
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000010"


# ------------------------------------------------------------------------------ fast: one rank, in this process




def test_recipe_checkpoint_has_the_per_op_keys_and_round_trips(one_rank, tmp_path):
    rm = apply_recipe(build(), Recipe(recompute="full", micro_batches=2), optimizer=adamw)  # wrapped block names
    for step in range(2):
        rm.train_step(*DATA(step))
    path = save_checkpoint(rm, tmp_path, 2)
    assert checkpoint_info(path)["engine"] == "recipe"
    # the keys a per-op checkpoint of the same model has (both names of the tied weight, states by first name)
    plain = build()
    opt = adamw(plain.parameters())
    plain(DATA(0)[0]).sum().backward()
    opt.step()
    want, _ = flatten_state_dict({"model": get_model_state_dict(plain), "optim": get_optimizer_state_dict(plain, opt)})
    got = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    assert set(got) == set(want)
    full = rm.full_state_dict()
    again = apply_recipe(build(), Recipe(micro_batches=2), optimizer=adamw)  # another recompute: same keys
    assert load_checkpoint(again, tmp_path) == 2
    for name, value in again.full_state_dict().items():
        torch.testing.assert_close(value, full[name], rtol=0, atol=0)
    assert [again.train_step(*DATA(s)) for s in (2, 3)] == [rm.train_step(*DATA(s)) for s in (2, 3)]


def test_bad_checkpoints_are_refused_in_one_line(one_rank, tmp_path):
    rm = apply_recipe(build(), Recipe(), optimizer=adamw)
    rm.train_step(*DATA(0))
    rm.plan = SimpleNamespace(fingerprint="aaaa", mesh={"dp": 1})
    save_checkpoint(rm, tmp_path, 1)
    cases = {
        "another model": (apply_recipe(build(), Recipe(), optimizer=adamw), "bbbb", r"of another model.*point --checkpoint-dir"),
        "another shape": (apply_recipe(build("gpt-tiny:layers=4,hidden=32"), Recipe(), optimizer=adamw), None,
                          r"does not fit this model and optimizer.*resume with the model and optimizer that wrote it"),
        "another optimizer": (apply_recipe(build(), Recipe(), optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)),
                              None, r"does not fit .*momentum_buffer"),
    }
    for label, (other, fingerprint, pattern) in cases.items():
        other.plan = SimpleNamespace(fingerprint=fingerprint, mesh={}) if fingerprint else None
        with pytest.raises(AutoplanError, match=pattern) as info:
            load_checkpoint(other, tmp_path)
        assert "\n" not in str(info.value), (label, str(info.value))
    with pytest.raises(AutoplanError, match="no complete checkpoint under"):
        load_checkpoint(rm, tmp_path / "empty")


# ------------------------------------------------------------------------------ slow: 4 ranks


@pytest.fixture(scope="module")
def plans(tmp_path_factory) -> dict[str, str]:
    import autoplan
    from click.testing import CliRunner

    from autoplan.cli import main

    d = tmp_path_factory.mktemp("plans")
    est = d / "pipeline.json"
    run = CliRunner().invoke(main, ["estimate", MODEL, "--cluster", "cpu", "--pp", "2", "--dp", "2", "--global-batch", "8",
                                    "--seq-len", "32", "--dtype", "fp32", "-o", str(est)])
    assert run.exit_code == 0, run.output
    assert json.loads(est.read_text())["execution"]["recipe"]["pp"] == 2
    ddp = d / "ddp.json"
    autoplan.plan(MODEL, cluster="cpu", devices=4, global_batch=8, seq_len=32, baselines=False, force="ddp",
                  dtype="fp32").save(ddp)
    out = {"pipeline": str(est), "ddp": str(ddp)}
    (d / "plans.json").write_text(json.dumps(out))
    return {**out, "file": str(d / "plans.json")}


@pytest.fixture(scope="module")
def chain(plans, tmp_path_factory) -> dict:
    from test_runtime_multirank import torchrun  # type: ignore[import-not-found]  # tests/ is on sys.path

    d = tmp_path_factory.mktemp("chain")
    out = d / "report.json"
    proc = torchrun(4, "checkpoint_worker.py", str(out), str(d / "ck"), plans["file"])
    assert out.exists(), proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_checkpoints_reshard_across_layouts_and_engines(chain):
    ref = chain["reference"]
    assert chain["leg0_info"]["mesh"] == {"pp": 2, "dp": 2, "tp": 1} and chain["leg0_info"]["engine"] == "recipe"
    labels = [leg["leg"] for leg in chain["legs"]]
    assert labels == ["tp2_dp2_zero1", "tp2_dp2_zero1_again", "per_op_ddp", "zero3_dp2_tp2", "pp2_dp2_zero1",
                      "pipeline_plan"], chain["legs"][-1].get("traceback")
    for leg in chain["legs"]:
        assert "error" not in leg, leg.get("traceback")
        start = leg["start"]
        assert leg["loaded_step"] == start
        assert leg["param_max_diff"] == 0.0, leg  # exactly the parameters the previous leg saved
        for got, want in zip(leg["losses"], ref[start:start + 2]):  # the second loss shows the optimizer state came back
            assert abs(got - want) <= 1e-5 * abs(want), (leg["leg"], leg["losses"], ref[start:start + 2])


@pytest.mark.slow
def test_checkpoint_errors_are_one_line(chain):
    errors = chain["errors"]
    expected = {
        "other_model": r"does not fit this model and optimizer",  # the shapes differ
        "other_optimizer": r"does not fit this model and optimizer.*momentum_buffer",
        "empty": r"no complete checkpoint under",
    }
    for key, pattern in expected.items():
        assert re.search(pattern, errors[key]) and "\n" not in errors[key], (key, errors[key])


def train_cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from autoplan.runtime.launch import train_command; train_command()", *args]


LOSS = re.compile(r"step\s+(\d+)/\d+\s+loss ([0-9.]+)")


def losses(text: str) -> dict[int, float]:
    return {int(m.group(1)): float(m.group(2)) for m in LOSS.finditer(text)}


@pytest.mark.slow
def test_train_cli_pipeline_plan_kill_resume(plans, chain, tmp_path):
    ref = {i + 1: v for i, v in enumerate(chain["reference"][:20])}  # the same plan, data and seed, uninterrupted
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ck = tmp_path / "ck"
    args = [plans["pipeline"], "--model", MODEL, "--checkpoint-dir", str(ck)]
    proc = subprocess.Popen(train_cli(*args, "--steps", "20", "--checkpoint-every", "5"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    deadline = time.time() + 240
    while not (ck / "step-00000010" / "COMPLETE").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)  # torchrun's agent forwards it to the ranks
    first_out, first_err = proc.communicate(timeout=60)
    assert (ck / "step-00000010" / "COMPLETE").exists(), first_err[-3000:]
    first = losses(first_out)
    assert set(range(1, 11)) <= set(first), first_out
    assert "tok/s" in first_out and "measured/predicted" in first_out and "mesh {'pp': 2, 'dp': 2, 'tp': 1}" in first_out
    for late in ck.glob("step-*"):  # killed later than step 10: keep the step-10 state only
        if late.name > "step-00000010":
            shutil.rmtree(late)
    (ck / ".tmp-step-00000015").mkdir(exist_ok=True)  # a half-written checkpoint is never loaded
    (ck / "step-00000016").mkdir(exist_ok=True)  # nor one without its completion marker
    again = subprocess.run(train_cli(*args, "--steps", "20"), capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from step 10" in again.stdout
    second = losses(again.stdout)
    assert sorted(second) == list(range(11, 21))
    run = {**{k: v for k, v in first.items() if k <= 10}, **second}
    for step, value in run.items():
        assert abs(value - ref[step]) <= 1e-5 * abs(ref[step]), (step, value, ref[step])
    assert sum(run[k] for k in (18, 19, 20)) / 3 < run[1] - 0.5, run  # the loss falls on the learnable stream
