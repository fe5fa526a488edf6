"""The model zoo: names, parameter counts, tracing, override parsing and user factories."""
from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.fx
from torch import nn

from autoplan.errors import AutoplanError, UnknownModelError
from autoplan.models import GPTConfig, LlamaConfig, ModelSpec, list_models, resolve_model

ZOO = [
    "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "gpt3-175b",
    "llama3-8b", "llama3-70b", "llama3-405b", "gpt-tiny", "llama-tiny", "mlp", "cnn",
]
SMALL = ["gpt-tiny", "llama-tiny", "mlp", "cnn"]


class NonLeafTracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return False


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # parameters() yields a tied weight once


def test_list_models_names() -> None:
    specs = list_models()
    assert [s.name for s in specs] == ZOO
    for s in specs:
        assert isinstance(s, ModelSpec)
        assert s.kind in ("lm", "classifier")
        assert s.description and "\n" not in s.description


@pytest.mark.parametrize("name", ZOO)
def test_zoo_builds_on_meta_with_exact_param_count(name: str) -> None:
    spec = resolve_model(name)
    assert spec.name == name
    with torch.device("meta"):
        model = spec.build()
        inputs = spec.example_inputs(2, 16)
        targets = spec.example_targets(2, 16)
    assert all(p.is_meta for p in model.parameters())
    assert count_params(model) == spec.num_params
    if spec.kind == "lm":
        assert inputs[0].shape == (2, 16) and inputs[0].dtype == torch.int64
        assert targets.shape == (2, 16) and targets.dtype == torch.int64
    else:
        assert inputs[0].shape[0] == 2 and inputs[0].is_floating_point()
        assert targets.shape == (2,) and targets.dtype == torch.int64


def test_known_param_counts() -> None:
    assert resolve_model("gpt2").num_params == 124_439_808
    assert resolve_model("gpt2-medium").num_params == 354_823_168
    assert resolve_model("gpt2-xl").num_params == 1_557_611_200
    assert resolve_model("llama3-8b").num_params == 8_030_261_248
    assert resolve_model("llama3-70b").num_params == pytest.approx(70.55e9, rel=1e-3)
    assert resolve_model("llama3-405b").num_params == pytest.approx(405.85e9, rel=1e-3)
    assert resolve_model("gpt3-175b").num_params == pytest.approx(174.6e9, rel=1e-3)


def test_parameter_names_and_tying() -> None:
    with torch.device("meta"):
        gpt = resolve_model("gpt2").build()
        llama = resolve_model("llama3-8b").build()
    names = dict(gpt.named_parameters())
    assert "blocks.0.attn.qkv.weight" in names and names["blocks.0.attn.qkv.weight"].shape == (2304, 768)
    assert gpt.lm_head.weight is gpt.tok_emb.weight
    assert llama.lm_head.weight is not llama.tok_emb.weight
    assert llama.blocks[0].attn.wk.weight.shape == (1024, 4096)
    assert llama.rope_cos.shape == (8192, 128)
    assert "rope_cos" not in llama.state_dict()


@pytest.mark.parametrize("name", SMALL)
def test_small_models_run_and_trace(name: str) -> None:
    torch.manual_seed(0)
    spec = resolve_model(name)
    model = spec.build().eval()
    inputs = spec.example_inputs(2, 16)
    out = model(*inputs)
    cfg = spec.config
    expected = (2, 16, cfg.vocab) if spec.kind == "lm" else (2, cfg.classes)
    assert out.shape == expected and torch.isfinite(out).all()

    traced = torch.fx.GraphModule(model, NonLeafTracer().trace(model))
    assert not any(n.op == "call_module" for n in traced.graph.nodes)
    assert torch.equal(traced(*inputs), out)

    exported = torch.export.export(model, inputs, strict=False)
    torch.testing.assert_close(exported.module()(*inputs), out)


def test_tiny_lm_trains_one_step_and_rejects_long_sequences() -> None:
    torch.manual_seed(0)
    spec = resolve_model("gpt-tiny")
    model = spec.build()
    x, y = spec.example_inputs(2, 8)[0], spec.example_targets(2, 8)
    loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
    loss.backward()
    assert model.tok_emb.weight.grad is not None
    assert loss.item() == pytest.approx(torch.log(torch.tensor(256.0)).item(), abs=0.5)  # near-uniform at init
    with pytest.raises(AutoplanError, match="seq=65"):
        spec.example_inputs(1, 65)


def test_meta_build_then_materialize_matches_rope_tables() -> None:
    with torch.device("meta"):
        model = resolve_model("llama-tiny").build()
    model.to_empty(device="cpu")
    model.init_weights()
    ref = resolve_model("llama-tiny").build()
    assert torch.equal(model.rope_cos, ref.rope_cos) and torch.equal(model.rope_sin, ref.rope_sin)
    assert torch.isfinite(model(torch.zeros(1, 4, dtype=torch.long))).all()


def test_overrides() -> None:
    spec = resolve_model("gpt:layers=48,hidden=6144,heads=64,vocab=51200,seq=2048,tie=0")
    assert spec.family == "gpt" and spec.kind == "lm"
    assert spec.config == GPTConfig(layers=48, hidden=6144, heads=64, vocab=51200, seq=2048, tie_embeddings=False)
    assert spec.name == "gpt:layers=48,hidden=6144,heads=64,vocab=51200,seq=2048,tie=0"

    small = resolve_model("gpt2:layers=2")
    assert small.config == GPTConfig(layers=2) and small.name == "gpt2:layers=2"
    with torch.device("meta"):
        assert count_params(small.build()) == small.num_params

    llama = resolve_model("llama: layers=3, hidden=128, heads=8, kv_heads=8, ffn=256, vocab=1000")
    assert llama.name == "llama:layers=3,hidden=128,heads=8,kv_heads=8,ffn=256,vocab=1000"
    assert llama.config == LlamaConfig(layers=3, hidden=128, heads=8, kv_heads=8, ffn=256, vocab=1000)
    assert resolve_model("llama3-8b:layers=2").config.hidden == 4096
    assert resolve_model("gpt").config == GPTConfig()
    assert resolve_model("mlp:hidden=32,layers=1").num_params == 784 * 32 + 32 + 32 * 10 + 10


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("gtp2", "did you mean 'gpt2'"),
        ("gtp:layers=2", "choose one of gpt2, gpt2-medium"),
        ("gpt:foo=1", "unknown key 'foo'"),
        ("gpt:layers=abc", "'layers'"),
        ("gpt:layers=1.5", "layers takes an integer"),
        ("gpt:heads=5", "heads=5 does not divide hidden=768"),
        ("llama:kv_heads=3", "kv_heads=3 does not divide heads=4"),
        ("gpt:layers", "key=value"),
        ("gpt:layers=0", "layers=0"),
        ("gpt:tie=maybe", "tie takes 0 or 1"),
        ("llama:layers=2,layers=3", "given twice"),
        ("model.py", "model.py:factory"),
        ("/no/such/file.py:make", "/no/such/file.py"),
        ("no_such_module_xyz:make", "no_such_module_xyz"),
    ],
)
def test_bad_specs_raise_one_line(spec: str, fragment: str) -> None:
    with pytest.raises(UnknownModelError) as info:
        resolve_model(spec)
    message = str(info.value)
    assert fragment in message and "\n" not in message


USER_MODELS = '''
import torch
from torch import nn


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.head = nn.Linear(16, 50)

    def forward(self, idx):
        return self.head(self.emb(idx))

    def example_inputs(self, batch, seq_len):
        return (torch.randint(0, 50, (batch, seq_len)),)


def make_lm():
    return TinyLM()


def make_classifier():
    model = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))
    return model, torch.randn(4, 12)


def make_bare():
    return nn.Linear(3, 3)


def make_broken():
    raise RuntimeError("no weights here")
'''


@pytest.fixture
def user_file(tmp_path: Path) -> Path:
    path = tmp_path / "user_models.py"
    path.write_text(textwrap.dedent(USER_MODELS))
    return path


def test_user_factory_with_example_inputs_method(user_file: Path) -> None:
    spec = resolve_model(f"{user_file}:make_lm")
    assert (spec.family, spec.kind, spec.config) == ("custom", "lm", None)
    assert spec.num_params == 50 * 16 + 16 * 50 + 50
    model = spec.build()
    x = spec.example_inputs(2, 7)
    assert model(*x).shape == (2, 7, 50)
    y = spec.example_targets(2, 7)
    assert y.shape == (2, 7) and int(y.max()) < 50
    with torch.device("meta"):
        assert all(p.is_meta for p in spec.build().parameters())
        assert spec.example_inputs(2, 7)[0].is_meta


def test_user_factory_with_input_template(user_file: Path) -> None:
    spec = resolve_model(f"{user_file}:make_classifier")
    assert spec.kind == "classifier" and spec.num_params == 12 * 8 + 8 + 8 * 3 + 3
    (x,) = spec.example_inputs(5, 999)
    assert x.shape == (5, 12) and x.dtype == torch.float32
    y = spec.example_targets(5, 999)
    assert y.shape == (5,) and int(y.max()) < 3
    assert spec.build()(x).shape == (5, 3)


def test_user_factory_from_module(user_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(user_file.parent))
    monkeypatch.delitem(sys.modules, "user_models", raising=False)
    spec = resolve_model("user_models:make_lm")
    assert spec.kind == "lm" and spec.name == "user_models:make_lm"


@pytest.mark.parametrize(
    "factory, fragment",
    [("make_broken", "no weights here"), ("make_bare", "example_inputs"), ("missing", "no callable 'missing'")],
)
def test_user_factory_errors(user_file: Path, factory: str, fragment: str) -> None:
    with pytest.raises(UnknownModelError) as info:
        resolve_model(f"{user_file}:{factory}")
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_user_file_that_fails_to_import(tmp_path: Path) -> None:
    path = tmp_path / "bad.py"
    path.write_text("raise ImportError('missing dependency\\nsecond line')\n")
    with pytest.raises(UnknownModelError) as info:
        resolve_model(f"{path}:make")
    assert str(path) in str(info.value) and "\n" not in str(info.value)
