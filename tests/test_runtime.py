"""Runtime tests in one process: a 64-rank fake process group (collectives as priced, plan
mismatches), local placement moves, data streams, checkpoint markers, the ``train`` command's
errors. The multi-rank numerical checks are in test_runtime_multirank.py."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from conftest import assert_as_priced
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




@pytest.mark.parametrize("model", ["gpt-tiny", "llama-tiny"])
@pytest.mark.parametrize("force,mesh,micro", [("fsdp", None, None), ("megatron", "dp=16,tp=4", None), ("ddp", None, None),
                                              ("fsdp", None, 2), ("megatron", "dp=16,tp=4", 2)])
def test_collectives_as_priced_on_64_fake_ranks(fake_world, model, force, mesh, micro):
    batch = 64 * (micro or 1)
    plan = autoplan.plan(model, cluster="cpu", devices=WORLD, global_batch=batch, seq_len=32, baselines=False,
                         dtype="fp32", force=force, mesh=mesh, micro_batches=[micro] if micro else None)
    assert plan.data["training"]["micro_batches"] == (micro or 1)
    pm = apply(build(model), plan)
    x, y = torch.randint(0, 256, (batch, 32)), torch.randint(0, 256, (batch, 32))
    c = check_step(pm, x, y)  # one gradient all-reduce per parameter, as the plan lists them
    assert_as_priced(c)
    assert not pm.unplanned
    assert c["issued_bytes"] > 0 and c["buckets"] == [] and c["issued"] == c["planned"]
    planned_kinds = {(k["phase"], k["kind"], k["axis"]) for k in plan.data["collectives"]}
    assert {tuple(k.split(":")) for k in c["by_kind"]} <= planned_kinds
    for p in pm.params.values():
        p.grad = None
    b = check_step(pm, x, y, bucket=True)  # as train_step runs it: DDP-style gradient buckets
    assert_as_priced(b)
    if force == "ddp":
        assert b["buckets"] and b["issued"] < c["issued"]


def test_compare_reports_every_difference():
    from types import SimpleNamespace

    from autoplan.runtime.comms import compare

    def coll(src, dst, nbytes, kind="all_reduce", per_step=1):
        return {"phase": "backward", "kind": kind, "axis": "dp", "bytes": nbytes, "src": src, "dst": dst, "per_step": per_step}

    plan = SimpleNamespace(data={"collectives": [coll("w1", "mm1", 64), coll("w2", "mm2", 32), coll("x", "mm2", 16, "all_gather", 2)]})
    layer = {"w1": "blocks.0", "mm1": "blocks.0", "w2": "blocks.1", "mm2": "blocks.1", "x": "blocks.1"}
    layer_of = lambda src, dst: layer[src] if src.startswith("w") else layer[dst]  # noqa: E731
    bucket = {**coll("bucket", "*", 96), "members": [["w1", "mm1", 64], ["w2", "*", 32]]}
    same = compare(plan, [bucket, coll("x", "mm2", 16, "all_gather"), coll("x", "mm2", 16, "all_gather")], layer_of)
    assert same["missing"] == same["extra"] == same["layer_diff"] == []
    assert (same["issued"], same["issued_unbucketed"], same["planned"]) == (3, 4, 4)
    assert same["buckets"] == [{"axis": "dp", "bytes": 96, "params": ["w1", "w2"], "members_bytes": 96}]
    # a gather issued once instead of twice per step, a gradient with fewer bytes: both reported, per layer too
    off = compare(plan, [coll("w1", "mm1", 64), coll("w2", "mm2", 16), coll("x", "mm2", 16, "all_gather")], layer_of)
    assert off["missing"] == [["backward", "all_gather", "dp", 16, "x", "mm2", 1], ["backward", "all_reduce", "dp", 32, "w2", "mm2", 1]]
    assert off["extra"] == [["backward", "all_reduce", "dp", 16, "w2", "mm2", 1]]
    assert off["layer_diff"] == [["blocks.1 backward:all_gather:dp", [2, 32], [1, 16]],
                                 ["blocks.1 backward:all_reduce:dp", [1, 32], [1, 16]]]
    # a bucket bigger than the parameters it says it carries
    big = compare(plan, [{**bucket, "bytes": 100}, coll("x", "mm2", 16, "all_gather"), coll("x", "mm2", 16, "all_gather")])
    assert big["missing"] == [] and big["extra"] == [["backward", "all_reduce", "dp", 4, "bucket", "*", 1]]


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


def _nested(src: tuple[str, ...], dst: tuple[str, ...]) -> bool:
    """Moves the cost model orders differently from what the runtime can issue: a dim split by two
    mesh axes on the way (``transition`` chunks first and prices gathers as if the order of nested
    splits were free), or a shard turned Partial (priced before the other axes' collectives, which
    then move the whole tensor; the runtime pads last and moves the shard)."""
    dims = [p for p in src + dst if p.startswith("S")]
    return any(dims.count(d) > 1 and sum(d in (a, b) for a, b in zip(src, dst)) > 1 for d in set(dims)) \
        or any(a.startswith("S") and b == "P" for a, b in zip(src, dst))


@pytest.mark.parametrize("shape", [(8,), (8, 8)])
def test_moves_issue_the_priced_collectives(fake_world, shape):
    """Every placement move the planner can price (1-D and 2-D meshes, a 2-D tensor) issues exactly
    the collectives ``transition`` lists, per axis and bytes: chunks before collectives, all-to-all
    for S(c) -> S(d) (not DTensor's CPU all-gather + chunk), in the cost model's axis order."""
    import itertools

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    from autoplan.cost.comm import transition
    from autoplan.runtime.comms import CollectiveRecorder
    from autoplan.runtime.moves import Trace, normalize
    from autoplan.strategies.placement import parse_placement

    names = ("dp", "tp")[: len(shape)]
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
    tensor = (64, 128)
    checked, wrong = 0, []
    for src in itertools.product(["R", "S(0)", "S(1)"], repeat=len(shape)):
        for dst in itertools.product(["R", "S(0)", "S(1)", "P"], repeat=len(shape)):
            if src == dst or _nested(src, dst):
                continue
            x = distribute_tensor(torch.randn(tensor), mesh, list(to_dtensor_placements(src)))
            trace = Trace()
            rec = CollectiveRecorder(mesh, trace)
            with rec, trace.scope("forward", "a", "b"):
                out = move(x, to_dtensor_placements(dst))
            assert normalize(out.placements, out.ndim) == to_dtensor_placements(dst), (src, dst)
            got = sorted((r["kind"], r["axis"], r["bytes"]) for r in rec.records)
            priced = transition(tensor, 4, tuple(map(parse_placement, src)), tuple(map(parse_placement, dst)), shape)
            want = sorted((c.kind, names[c.axis], int(c.nbytes)) for c in priced)
            checked += 1
            if got != want:
                wrong.append((src, dst, "issued", got, "priced", want))
    assert not wrong, wrong
    assert checked == (7 if len(shape) == 1 else 47)  # of 9 and 135 moves


def test_an_all_to_all_move_of_a_strided_tensor_keeps_its_strides_true(fake_world):
    """Attention's output is a transposed view; after S(1) -> S(2) by all-to-all its local shard is
    contiguous, and the DTensor must say so: ``.contiguous()`` trusts the global strides, and a
    strided local under contiguous global strides broke the ``view`` after it (a 2 x 2 plan)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("tp",))
    x = distribute_tensor(torch.randn(2, 128, 64, 8).transpose(1, 2), mesh, [Shard(1)])  # (B, T, nh, hd) memory
    out = move(x, to_dtensor_placements(["S(2)"])).transpose(1, 2).contiguous()
    assert out.to_local().is_contiguous()
    assert out.view(2, 64, -1).to_local().shape == (2, 1, 128 * 8)


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
