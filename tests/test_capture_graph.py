"""Capture (fx, export fallback, meta shapes) and the graph IR (kinds, batch dims, repeated blocks)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from autoplan.capture import capture
from autoplan.errors import CaptureError
from autoplan.graph import build_graph
from autoplan.inputs import spec_from_example
from autoplan.repeats import find_repeats
from tests.conftest import capture_zoo


def test_gpt_tiny_is_captured_by_symbolic_trace_with_every_op_classified(gpt_tiny_graph):
    g = gpt_tiny_graph
    assert g.method == "symbolic_trace"
    assert g.unsupported() == []
    kinds = {n.kind for n in g.nodes.values()}
    assert {"linear", "sdpa", "layer_norm", "embedding", "cross_entropy", "param", "input", "split"} <= kinds
    assert g.nodes[g.loss].kind == "cross_entropy"


def test_tied_embedding_is_one_parameter_node(gpt_tiny_graph):
    names = [n.param for n in gpt_tiny_graph.params()]
    assert len(names) == len(set(names))
    assert "tok_emb.weight" in names


def test_batch_dims_scale_with_the_batch_and_nothing_else(gpt_tiny_graph):
    g = gpt_tiny_graph
    emb = next(n for n in g.nodes.values() if n.kind == "embedding" and 0 in n.out.batch_dims)
    assert emb.out.shape(8) == (8, 32, 64)
    for p in g.params():
        assert not p.out.batch_dims
    logits_flat = g.producers(g.loss)[0]
    assert logits_flat.out.shape(4) == (4 * 32, 256)


def test_export_fallback_gives_the_same_ops_and_parameters(gpt_tiny_graph):
    exported = capture_zoo("gpt-tiny", 32, method="export")
    assert exported.method == "export"
    count = lambda g, k: sum(1 for n in g.nodes.values() if n.kind == k)  # noqa: E731
    for kind in ("linear", "sdpa", "layer_norm", "embedding", "param"):
        assert count(exported, kind) == count(gpt_tiny_graph, kind), kind
    assert exported.num_params() == gpt_tiny_graph.num_params()


def test_repeated_blocks_are_tied_to_one_representative():
    g = capture_zoo("gpt2:layers=4,hidden=64,heads=4,vocab=128,seq=32", 32)
    ty = find_repeats(g)
    assert ty.groups == (("blocks", 4),)
    reps = {ty.rep[n] for n in g.nodes}
    assert len(reps) < len(g.nodes) / 2
    assert all(ty.count[r] == 4 for r in ty.in_block)


def test_llama_rotary_tables_are_constant_derived_and_gqa_attention_is_classified(llama_tiny_graph):
    g = llama_tiny_graph
    const = g.constant_derived()
    assert any(g.nodes[n].kind == "buffer" for n in const)
    assert any(n.kind == "sdpa" for n in g.nodes.values())
    assert find_repeats(g).groups == (("blocks", 2),)


class _Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: neither tracer can follow it
            return self.lin(x)
        return -self.lin(x)


def test_capture_failure_is_one_line_naming_both_tracers_the_module_the_line_and_the_fix():
    model = _Branchy()
    with pytest.raises(CaptureError) as err:
        capture(model, spec_from_example((torch.randn(2, 4),), targets=torch.zeros(2, dtype=torch.long)))
    msg = str(err.value)
    assert "\n" not in msg and "symbolic_trace" in msg and "export" in msg and "control flow" in msg
    line = next(i for i, text in enumerate(open(__file__).read().splitlines(), 1) if "if x.sum() > 0" in text)
    assert f"in _Branchy at {__file__}:{line}" in msg


def test_a_model_with_real_weights_is_captured_on_fake_tensors_without_copying_data():
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))
    cap = capture(model, spec_from_example((torch.randn(2, 16),), targets=torch.zeros(2, dtype=torch.long)))
    g = build_graph(cap)
    assert sum(1 for n in g.nodes.values() if n.kind == "linear") == 2
    assert g.num_params() == sum(p.numel() for p in model.parameters())
