"""Models planned as users have them: tensor, tuple or dict inputs, any output pytree, their own loss."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

import autoplan
from autoplan.cli import main
from autoplan.errors import AutoplanError
from autoplan.inputs import CallSpec, spec_from_example

tf = pytest.importorskip("transformers")


def tiny_llama():
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=64, use_cache=False)
    return tf.LlamaForCausalLM(cfg)


def test_a_transformers_model_with_labels_trains_on_its_own_loss():
    ids = torch.randint(0, 256, (4, 16))
    plan = autoplan.plan(tiny_llama(), {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids},
                         cluster="dgx-h100", devices=8, global_batch=32, baselines=False)
    call = plan.data["call"]
    assert call["loss"] == "model" and call["targets"] is None
    assert [s["key"] for s in call["slots"]] == ["input_ids", "attention_mask", "labels"]
    assert all(s["batch_dim"] == 0 for s in call["slots"])
    assert plan.predicted.fits and plan.data["model"]["num_params"] > 0


def test_a_model_output_without_loss_gets_next_token_cross_entropy():
    ids = torch.randint(0, 256, (4, 16))
    plan = autoplan.plan(tiny_llama(), {"input_ids": ids}, cluster="dgx-h100", devices=8, global_batch=32,
                         baselines=False)
    call = plan.data["call"]
    assert call["loss"] == "cross_entropy" and call["targets"]["shape"] == [4, 16]


class _TwoInputs(nn.Module):
    """Image and token inputs of different batch layouts, a dict output, no loss of its own."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.emb = nn.Embedding(32, 8)
        self.head = nn.Linear(16, 5)

    def forward(self, pixels, tokens, scale=1.0):
        image = self.conv(pixels).mean(dim=(2, 3))  # (B, 8)
        text = self.emb(tokens).mean(dim=1)  # (B, 8)
        return {"logits": self.head(torch.cat([image, text], dim=-1)) * scale, "aux": image}


def test_inputs_of_different_layouts_in_one_model_are_all_split_on_the_batch():
    x = {"pixels": torch.randn(4, 3, 8, 8), "tokens": torch.zeros(4, 6, dtype=torch.long), "scale": 2.0}
    plan = autoplan.plan(_TwoInputs(), x, cluster="dgx-h100", devices=4, global_batch=64, force="ddp", baselines=False)
    call = plan.data["call"]
    assert call["static"] == [["scale", 2.0]] and call["targets"]["shape"] == [4]
    assert {k: v for k, v in plan.data["inputs"].items()} == {"pixels": ["S(0)"], "tokens": ["S(0)"], "targets": ["S(0)"]}


def test_a_custom_loss_function_needs_targets_and_is_recorded():
    def mse(out, y):
        return ((out["logits"] - y) ** 2).mean()

    x = {"pixels": torch.randn(4, 3, 8, 8), "tokens": torch.zeros(4, 6, dtype=torch.long)}
    with pytest.raises(AutoplanError, match="targets="):
        autoplan.plan(_TwoInputs(), x, cluster="cpu", devices=2, loss_fn=mse)
    plan = autoplan.plan(_TwoInputs(), x, cluster="cpu", devices=2, loss_fn=mse, targets=torch.zeros(4, 5),
                         baselines=False)
    assert plan.data["call"]["loss"] == "custom"


def test_a_tensor_that_is_the_same_for_every_sample_is_not_split():
    spec = spec_from_example({"x": torch.zeros(4, 8), "pos": torch.arange(8)[None, :]})
    assert [s.batch_dim for s in spec.slots] == [0, None]
    assert [tuple(t.shape) for t in spec.meta_inputs(6)] == [(6, 8), (1, 8)]


def test_a_batch_missing_an_input_is_refused_naming_it():
    spec = spec_from_example({"input_ids": torch.zeros(2, 4, dtype=torch.long), "labels": torch.zeros(2, 4, dtype=torch.long)})
    with pytest.raises(AutoplanError, match="no labels"):
        spec.flatten({"input_ids": torch.zeros(2, 4, dtype=torch.long)})
    assert CallSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec


def test_example_inputs_of_the_wrong_kind_are_refused_in_one_line():
    with pytest.raises(AutoplanError, match="example_inputs must be"):
        spec_from_example(3)
    with pytest.raises(AutoplanError, match="is a list"):
        spec_from_example({"x": torch.zeros(2, 3), "bad": [1, 2]})


class _Unregistered(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return torch.special.i0(self.lin(x))  # an op with no registry entry


def test_an_op_without_a_rule_is_planned_replicated_with_a_warning_naming_it():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = autoplan.plan(_Unregistered(), torch.randn(4, 8), cluster="cpu", devices=2, baselines=False)
    assert any("i0" in str(w.message) and "replicated" in str(w.message) for w in caught)
    assert any("i0" in op for op in plan.data["model"]["unsupported_ops"])
    assert all(o["output"] == ["R"] for o in plan.ops if "i0" in o["target"])


FACTORY = '''
import torch, transformers as tf

def factory():
    cfg = tf.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        vocab_size=128, max_position_embeddings=32)
    ids = torch.randint(0, 128, (4, 8))
    return tf.BertForSequenceClassification(cfg), {"input_ids": ids, "labels": torch.zeros(4, dtype=torch.long)}
'''


def test_cli_plans_a_factory_that_returns_keyword_inputs(tmp_path):
    (tmp_path / "hfmodel.py").write_text(FACTORY)
    r = CliRunner().invoke(main, ["plan", f"{tmp_path / 'hfmodel.py'}:factory", "--cluster", "dgx-h100", "--devices", "4",
                                  "--global-batch", "16", "--no-baselines", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output[r.output.index("{"):])
    assert out["world_size"] == 4 and out["fits"]
