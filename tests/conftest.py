"""Shared fixtures: small captured graphs (module scope: capture costs a second or two)."""
from __future__ import annotations

import pytest

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
