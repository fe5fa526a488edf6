"""Runtime tests in one process: a 64-rank fake process group (collectives as priced, plan
mismatches), local placement moves, data streams, checkpoint markers, the ``train`` command's
errors. The multi-rank numerical checks are in test_runtime_multirank.py."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
from click.testing import CliRunner

import autoplan
from autoplan.errors import AutoplanError, PlanMismatchError
from autoplan.models import resolve_model
from autoplan.runtime import apply
from autoplan.runtime.moves import move, to_dtensor_placements
from autoplan.runtime.checkpoint import MARKER, latest_checkpoint
from autoplan.runtime.comms import check_step
from autoplan.runtime.launch import torchrun_command, train_command
from autoplan.runtime.train import TokenStream, check_vocab, file_tokens, synthetic_tokens

WORLD = 64


@pytest.fixture(scope="module")
def fake_world():
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=WORLD)
    yield
    dist.destroy_process_group()


def tiny_plan(devices: int, **kw) -> autoplan.Plan:
    return autoplan.plan("gpt-tiny", cluster="cpu", devices=devices, global_batch=64, seq_len=32, baselines=False,
                         dtype="fp32", **kw)


def build(name: str = "gpt-tiny") -> torch.nn.Module:
    torch.manual_seed(0)
    return resolve_model(name).build()


def test_apply_needs_a_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is initialised")
    with pytest.raises(AutoplanError, match="process group"):
        apply(build(), tiny_plan(4, force="ddp"))


@pytest.mark.parametrize("force,mesh", [("fsdp", None), ("megatron", "dp=16,tp=4"), ("ddp", None)])
def test_collectives_as_priced_on_64_fake_ranks(fake_world, force, mesh):
    plan = tiny_plan(WORLD, force=force, mesh=mesh)
    pm = apply(build(), plan)
    x, y = torch.randint(0, 256, (64, 32)), torch.randint(0, 256, (64, 32))
    c = check_step(pm, x, y)
    assert not c["explained"]["unexplained"], c["explained"]["unexplained"]
    assert not pm.unplanned
    assert 0 < c["issued_bytes"] <= c["planned_bytes"]
    assert sum(c["comm_debug_mode"].values()) == c["issued"]  # CommDebugMode sees the same collectives
    planned_kinds = {(k["phase"], k["kind"], k["axis"]) for k in plan.data["collectives"]}
    assert {tuple(k.split(":")) for k in c["by_kind"]} <= planned_kinds


def test_refuses_another_world_size(fake_world):
    with pytest.raises(PlanMismatchError, match="4 ranks but the process group has 64") as info:
        apply(build(), tiny_plan(4, force="ddp"))
    assert "\n" not in str(info.value)


def test_refuses_another_model(fake_world):
    with pytest.raises(PlanMismatchError, match="another model") as info:
        apply(build("llama-tiny"), tiny_plan(WORLD, force="ddp"))
    assert "\n" not in str(info.value)


def test_local_moves_to_partial(fake_world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate

    mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("dp",))
    full = torch.arange(WORLD * 2, dtype=torch.float32)
    rep = DTensor.from_local(full, mesh, [Replicate()], run_check=False)
    part = move(rep, to_dtensor_placements(["P"]))  # rank 0 keeps the value, the others hold zeros
    assert part.placements[0].is_partial() and torch.equal(part.to_local(), full)
    shard = move(rep, to_dtensor_placements(["S(0)"]))  # R -> S: a local chunk
    padded = move(shard, to_dtensor_placements(["P"]))  # S -> P: the shard zero-padded
    assert padded.to_local().shape == full.shape and torch.equal(padded.to_local()[:2], full[:2])
    assert float(padded.to_local()[2:].abs().sum()) == 0.0


# ------------------------------------------------------------------------------ data


def test_synthetic_stream_is_learnable_and_deterministic():
    tokens = synthetic_tokens(256, 4096)
    assert tokens.max() < 256
    data = TokenStream(tokens, global_batch=8, seq_len=32)
    x0, y0 = data(0)
    assert x0.shape == (8, 32) and torch.equal(x0[:, 1:], y0[:, :-1])
    assert torch.equal(data(3)[0], data(3)[0])  # addressed by step: a resumed run sees the same batches
    # next token is determined by the previous 23 (the pattern's period): a model can learn it
    assert np.array_equal(tokens[23:46], tokens[0:23])


def test_token_file_errors(tmp_path):
    with pytest.raises(AutoplanError, match="no token file"):
        file_tokens(tmp_path / "missing.bin")
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x00\x01\x02")
    with pytest.raises(AutoplanError, match="odd size"):
        file_tokens(odd)
    good = tmp_path / "t.bin"
    np.arange(100, dtype="<u2").tofile(good)
    assert list(file_tokens(good)[:3]) == [0, 1, 2]
    with pytest.raises(AutoplanError, match="vocabulary"):
        check_vocab(np.array([0, 300]), 256)


# ------------------------------------------------------------------------------ checkpoints


def test_latest_checkpoint_ignores_half_written(tmp_path):
    assert latest_checkpoint(tmp_path / "none") is None
    for name, done in [("step-00000005", True), ("step-00000010", False), (".tmp-step-00000015", True)]:
        (tmp_path / name).mkdir()
        if done:
            (tmp_path / name / MARKER).write_text(json.dumps({"step": int(name.split("-")[-1])}))
    assert latest_checkpoint(tmp_path).name == "step-00000005"


# ------------------------------------------------------------------------------ the train command


def test_train_command_errors_are_one_line(tmp_path):
    runner = CliRunner()
    r = runner.invoke(train_command, [str(tmp_path / "nope.json"), "--model", "gpt-tiny"])
    assert r.exit_code == 2 and "no plan file" in r.output and len(r.output.strip().splitlines()) == 1
    plan = tmp_path / "p.json"
    tiny_plan(4, force="ddp").save(plan)
    r = runner.invoke(train_command, [str(plan), "--model", "no-such-model"])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1
    r = runner.invoke(train_command, [str(plan), "--model", "gpt-tiny", "--steps", "0"])
    assert r.exit_code == 2 and "--steps" in r.output
    r = runner.invoke(train_command, [str(plan), "--model", "gpt-tiny", "--data", str(tmp_path / "x.bin")])
    assert r.exit_code == 2 and "no token file" in r.output


def test_torchrun_command_uses_this_python():
    cmd = torchrun_command(4, ["--steps", "1"])
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"] and "--standalone" in cmd
    assert cmd[cmd.index("--nproc-per-node") + 1] == "4"
