"""Shared fixtures and checks: small captured graphs (session scope: capture costs a second or two),
a one-rank process group, and the "collectives as priced" assertion."""
from __future__ import annotations

import pytest
import torch.distributed as dist

from autoplan.api import prepare_job
from autoplan.graph import OpGraph


def capture_zoo(spec_name: str, seq: int, method: str = "auto") -> OpGraph:
    return prepare_job(spec_name, cluster="cpu", devices=1, seq_len=seq, capture_method=method).graph


@pytest.fixture(scope="session")
def gpt_tiny_graph() -> OpGraph:
    return capture_zoo("gpt-tiny", 32)


@pytest.fixture(scope="session")
def llama_tiny_graph() -> OpGraph:
    return capture_zoo("llama-tiny", 32)


@pytest.fixture(scope="module")
def one_rank():
    """A one-rank gloo process group in this process (skipped if another test module left one)."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def assert_as_priced(c: dict) -> None:
    """The step issued exactly the plan's collectives: edge by edge (phase, kind, axis, bytes, src,
    dst, count per step) and summed per layer; a bucketed gradient all-reduce is compared as the
    per-parameter all-reduces it merges (same bytes, one collective)."""
    diff = {"missing": c["missing"], "extra": c["extra"], "per layer [count, bytes] planned, issued": c["layer_diff"]}
    assert not c["missing"] and not c["extra"], diff
    assert not c["layer_diff"] and c["by_layer"]["issued"] == c["by_layer"]["planned"], diff
    assert c["issued_unbucketed"] == c["planned"] and c["issued_bytes"] == c["planned_bytes"], diff
    assert all(b["bytes"] == b["members_bytes"] for b in c["buckets"]), c["buckets"]
    assert c["issued"] == c["planned"] - sum(len(b["params"]) - 1 for b in c["buckets"])
    assert sum(c["comm_debug_mode"].values()) == c["issued"]  # CommDebugMode counts the same collectives
    assert c["exact"]
