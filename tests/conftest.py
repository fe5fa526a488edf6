"""Shared fixtures: small captured graphs (module scope: capture costs a second or two)."""
from __future__ import annotations

import pytest
import torch

from autoplan.capture import capture
from autoplan.graph import OpGraph, build_graph
from autoplan.models import resolve_model


def capture_zoo(spec_name: str, seq: int, method: str = "auto") -> OpGraph:
    spec = resolve_model(spec_name)
    with torch.device("meta"):
        model = spec.build()

    def inputs_fn(b: int):
        with torch.device("meta"):
            return (*spec.example_inputs(b, seq), spec.example_targets(b, seq))

    return build_graph(capture(model, inputs_fn, method=method))


@pytest.fixture(scope="session")
def gpt_tiny_graph() -> OpGraph:
    return capture_zoo("gpt-tiny", 32)


@pytest.fixture(scope="session")
def llama_tiny_graph() -> OpGraph:
    return capture_zoo("llama-tiny", 32)
