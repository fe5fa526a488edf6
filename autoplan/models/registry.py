"""Model specs: the named zoo, family overrides and user factories.

A model spec string is one of

* a zoo name: ``gpt2``, ``llama3-8b``, ``mlp`` ... (see :func:`list_models`);
* a family or zoo name with overrides: ``gpt:layers=48,hidden=6144,heads=64,vocab=51200,seq=2048,tie=0``,
  ``llama:layers=4,hidden=256,heads=8,kv_heads=2,ffn=512``, ``gpt2:layers=2``. Unspecified keys keep
  the base's values (family bases: ``gpt`` = gpt2, ``llama`` = llama-tiny with an 8192 context,
  ``mlp`` / ``cnn`` = the zoo models);
* a user factory: ``path/to/file.py:factory`` (file loaded with importlib) or ``package.module:factory``.

User factories are called with no arguments and return either

1. an ``nn.Module`` with a method ``example_inputs(batch, seq_len) -> tuple[Tensor, ...]`` (and optionally
   ``example_targets(batch, seq_len) -> Tensor``). The methods must create tensors on the current
   default device (no explicit ``device=``), as the built-in models do; or
2. a pair ``(module, example_inputs)`` where ``example_inputs`` is a tensor or tuple of tensors used as a
   template: new inputs keep its dtypes and shapes with dim 0 set to the batch and, for LMs, dim 1 set to
   the sequence length wherever it matched the first input's length. Float templates are refilled with
   ``randn``, integer ones with ``randint(0, vocab)`` for LMs (zeros for classifiers), bool ones with True.

The factory is called once under ``torch.device("meta")`` while resolving (to count parameters and probe
the inputs), and again by ``ModelSpec.build``. The model is an LM (kind ``"lm"``) when its first input is an
integer (B, T) tensor, else a classifier. Without ``example_targets``, targets are random class indices
below the logits' last dimension, found by running forward once on the meta device.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib
import importlib.util
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import nn

from autoplan.errors import AutoplanError, UnknownModelError
from autoplan.inputs import CallSpec, spec_from_example
from autoplan.models.gpt import GPT, GPTConfig, gpt_num_params
from autoplan.models.llama import Llama, LlamaConfig, llama_num_params
from autoplan.models.small import CNNClassifier, CNNConfig, MLPClassifier, MLPConfig, cnn_num_params, mlp_num_params


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model: how to build it and how to make example batches for it."""

    name: str  # canonical spec, e.g. "gpt2-medium" or "gpt:layers=48,hidden=6144,heads=64,vocab=51200"
    family: str  # "gpt", "llama", "mlp", "cnn" or "custom"
    config: object  # the family's frozen config dataclass (None for custom)
    kind: str  # "lm": inputs (B, T) int64, targets (B, T); "classifier": inputs (B, ...) float, targets (B,)
    build: Callable[[], nn.Module]  # builds the module on the current default device
    example_inputs: Callable[[int, int], tuple[torch.Tensor, ...]]  # (batch, seq_len) -> forward inputs
    example_targets: Callable[[int, int], torch.Tensor]  # (batch, seq_len) -> targets for cross-entropy
    num_params: int  # exact parameter count, tied weights counted once
    description: str  # one line for `autoplan models`
    example: Any = None  # a factory's example inputs as it gave them (a dict of keywords, on meta): planned as given
    build_with_inputs: Callable[[], tuple[nn.Module, Any]] | None = None  # the factory itself: model and real inputs

    def call_spec(self, seq_len: int, batch: int = 2) -> CallSpec:
        """How the model is called: its positional inputs, and targets for the cross-entropy."""
        with torch.device("meta"):  # only here: a default-device context slows every traced op
            return spec_from_example(self.example_inputs(batch, seq_len), targets=self.example_targets(batch, seq_len))


@dataclass(frozen=True)
class _Family:
    name: str  # family prefix in specs
    model: Callable[[Any], nn.Module]  # config -> module
    num_params: Callable[[Any], int]  # config -> exact parameter count
    kind: str  # "lm" or "classifier"
    keys: dict[str, tuple[str, str]]  # override key -> (config field, value type: "int", "bool" or "float")
    base: Any  # config used by "family:..." specs for unspecified keys
    example: str  # an example override spec for error messages


_FAMILIES: dict[str, _Family] = {
    f.name: f
    for f in (
        _Family("gpt", GPT, gpt_num_params, "lm",
                {"layers": ("layers", "int"), "hidden": ("hidden", "int"), "heads": ("heads", "int"),
                 "vocab": ("vocab", "int"), "seq": ("seq", "int"), "tie": ("tie_embeddings", "bool"),
                 "dropout": ("dropout", "float"), "bias": ("bias", "bool")},
                GPTConfig(), "gpt:layers=12,hidden=768,heads=12"),
        _Family("llama", Llama, llama_num_params, "lm",
                {"layers": ("layers", "int"), "hidden": ("hidden", "int"), "heads": ("heads", "int"),
                 "kv_heads": ("kv_heads", "int"), "ffn": ("ffn", "int"), "vocab": ("vocab", "int"),
                 "seq": ("seq", "int"), "tie": ("tie_embeddings", "bool"), "theta": ("rope_theta", "float")},
                LlamaConfig(), "llama:layers=2,hidden=64,heads=4,kv_heads=2,ffn=128"),
        _Family("mlp", MLPClassifier, mlp_num_params, "classifier",
                {"inputs": ("inputs", "int"), "hidden": ("hidden", "int"), "layers": ("layers", "int"),
                 "classes": ("classes", "int")},
                MLPConfig(), "mlp:hidden=1024,layers=2"),
        _Family("cnn", CNNClassifier, cnn_num_params, "classifier",
                {"channels": ("channels", "int"), "image": ("image", "int"), "width": ("width", "int"),
                 "classes": ("classes", "int")},
                CNNConfig(), "cnn:width=32,image=32"),
    )
}

_LLAMA3 = dict(vocab=128256, seq=8192, rope_theta=500000.0)

# name -> (family, config, title)
_ZOO: dict[str, tuple[str, Any, str]] = {
    "gpt2": ("gpt", GPTConfig(), "GPT-2 small"),
    "gpt2-medium": ("gpt", GPTConfig(layers=24, hidden=1024, heads=16), "GPT-2 medium"),
    "gpt2-large": ("gpt", GPTConfig(layers=36, hidden=1280, heads=20), "GPT-2 large"),
    "gpt2-xl": ("gpt", GPTConfig(layers=48, hidden=1600, heads=25), "GPT-2 XL"),
    "gpt3-175b": ("gpt", GPTConfig(layers=96, hidden=12288, heads=96, seq=2048), "GPT-3 175B"),
    "llama3-8b": ("llama", LlamaConfig(layers=32, hidden=4096, heads=32, kv_heads=8, ffn=14336, **_LLAMA3), "Llama 3 8B"),
    "llama3-70b": ("llama", LlamaConfig(layers=80, hidden=8192, heads=64, kv_heads=8, ffn=28672, **_LLAMA3), "Llama 3 70B"),
    "llama3-405b": ("llama", LlamaConfig(layers=126, hidden=16384, heads=128, kv_heads=8, ffn=53248, **_LLAMA3), "Llama 3 405B"),
    "gpt-tiny": ("gpt", GPTConfig(layers=2, hidden=64, heads=4, vocab=256, seq=64), "tiny GPT for CPU tests"),
    "llama-tiny": ("llama", LlamaConfig(seq=64), "tiny Llama for CPU tests"),
    "mlp": ("mlp", MLPConfig(), "MLP classifier"),
    "cnn": ("cnn", CNNConfig(), "CNN classifier"),
}


def list_models() -> list[ModelSpec]:
    """The named zoo, in display order."""
    return [_spec(name, family, cfg, title) for name, (family, cfg, title) in _ZOO.items()]


def resolve_model(spec: str) -> ModelSpec:
    """Resolve a model spec string (see the module docstring); raises UnknownModelError."""
    if not isinstance(spec, str) or not spec.strip():
        raise _unknown(str(spec))
    text = spec.strip()
    head, sep, tail = text.partition(":")
    head = head.strip()
    if head in _ZOO or head in _FAMILIES:
        if head in _ZOO:
            family, cfg, title = _ZOO[head]
        else:
            family, cfg, title = head, _FAMILIES[head].base, ""
        pairs = _parse_overrides(text, tail, _FAMILIES[family]) if sep else []
        if not pairs:
            return _spec(head, family, cfg, title)
        try:
            cfg = dataclasses.replace(cfg, **{field: value for _, _, field, value in pairs})
        except ValueError as err:
            raise UnknownModelError(f"bad model spec '{text}': {err}") from None
        name = head + ":" + ",".join(f"{key}={raw}" for key, raw, _, _ in pairs)
        return _spec(name, family, cfg, f"{title} with overrides" if title else "")
    target, sep, attr = text.rpartition(":")
    if sep and attr.strip().isidentifier():
        return _custom(text, target.strip(), attr.strip())
    if text.endswith(".py"):
        raise UnknownModelError(f"model spec '{text}' names a file but no factory; write {text}:factory")
    raise _unknown(text)


# ---------------------------------------------------------------------------------------------- helpers


def _unknown(text: str) -> UnknownModelError:
    choices = list(_ZOO) + list(_FAMILIES)
    close = difflib.get_close_matches(text.partition(":")[0], choices, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return UnknownModelError(
        f"unknown model '{_one_line(text)}'{hint}: choose one of {', '.join(_ZOO)}, or a family like "
        f"{_FAMILIES['gpt'].example} or {_FAMILIES['llama'].example}, or path/to/file.py:factory "
        f"or package.module:factory"
    )


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _parse_overrides(spec: str, tail: str, fam: _Family) -> list[tuple[str, str, str, Any]]:
    """``key=value,...`` -> [(key, raw value, config field, parsed value)]."""
    pairs: list[tuple[str, str, str, Any]] = []
    seen: set[str] = set()
    for item in tail.split(","):
        if not item.strip():
            continue
        key, eq, raw = (s.strip() for s in item.partition("="))
        if not eq or not key:
            raise UnknownModelError(
                f"bad override '{item.strip()}' in model spec '{spec}': write key=value pairs separated by commas, "
                f"e.g. {fam.example}"
            )
        if key not in fam.keys:
            raise UnknownModelError(
                f"unknown key '{key}' in model spec '{spec}': {fam.name} takes {', '.join(fam.keys)}"
            )
        if key in seen:
            raise UnknownModelError(f"key '{key}' is given twice in model spec '{spec}': keep one {key}=...")
        seen.add(key)
        field, kind = fam.keys[key]
        pairs.append((key, raw, field, _parse_value(spec, key, raw, kind, getattr(fam.base, field))))
    return pairs


def _parse_value(spec: str, key: str, raw: str, kind: str, default: Any) -> Any:
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            value = float(raw)
            if math.isfinite(value):
                return value
        elif raw.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return raw.lower() in ("1", "true", "yes", "on")
    except ValueError:
        pass
    what = {"int": "an integer", "float": "a number", "bool": "0 or 1"}[kind]
    example = int(default) if kind == "bool" else default
    raise UnknownModelError(f"bad value '{raw}' for '{key}' in model spec '{spec}': {key} takes {what}, e.g. {key}={example}")


def _fmt_count(n: int) -> str:
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


def _describe(family: str, cfg: Any) -> str:
    if isinstance(cfg, GPTConfig):
        tie = "" if cfg.tie_embeddings else ", untied head"
        return (f"GPT: {cfg.layers} layers, hidden {cfg.hidden}, {cfg.heads} heads, vocab {cfg.vocab}, "
                f"ctx {cfg.seq}{tie}")
    if isinstance(cfg, LlamaConfig):
        return (f"Llama: {cfg.layers} layers, hidden {cfg.hidden}, {cfg.heads} heads ({cfg.kv_heads} kv), "
                f"ffn {cfg.ffn}, vocab {cfg.vocab}, ctx {cfg.seq}")
    if isinstance(cfg, MLPConfig):
        return f"MLP: {cfg.inputs} -> {cfg.hidden} x{cfg.layers} (GELU) -> {cfg.classes} classes"
    return (f"CNN: {cfg.channels}x{cfg.image}x{cfg.image} images, 3 conv3x3+ReLU+pool stages "
            f"(widths {'/'.join(map(str, cfg.widths))}), {cfg.classes} classes")


def _spec(name: str, family: str, cfg: Any, title: str) -> ModelSpec:
    fam = _FAMILIES[family]
    n = fam.num_params(cfg)
    desc = f"{title} - " if title else ""
    desc += f"{_describe(family, cfg)}; {_fmt_count(n)} params"
    if fam.kind == "lm":
        max_seq, vocab = cfg.seq, cfg.vocab

        def lm_tokens(batch: int, seq_len: int) -> torch.Tensor:
            if seq_len > max_seq:
                raise AutoplanError(
                    f"sequence length {seq_len} exceeds model '{name}' context {max_seq}; "
                    f"use a shorter sequence or a model spec with seq={seq_len}"
                )
            return torch.randint(0, vocab, (batch, seq_len))

        inputs: Callable[[int, int], tuple[torch.Tensor, ...]] = lambda b, s: (lm_tokens(b, s),)
        targets: Callable[[int, int], torch.Tensor] = lm_tokens
    elif family == "mlp":
        inputs = lambda b, s: (torch.randn(b, cfg.inputs),)
        targets = lambda b, s: torch.randint(0, cfg.classes, (b,))
    else:
        inputs = lambda b, s: (torch.randn(b, cfg.channels, cfg.image, cfg.image),)
        targets = lambda b, s: torch.randint(0, cfg.classes, (b,))
    return ModelSpec(name=name, family=family, config=cfg, kind=fam.kind, build=lambda: fam.model(cfg),
                     example_inputs=inputs, example_targets=targets, num_params=n, description=desc)


# ------------------------------------------------------------------------------------------ user models


def _load_factory(spec: str, target: str, attr: str) -> Callable[[], Any]:
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target).expanduser()
        if not path.is_file():
            raise UnknownModelError(f"model file '{target}' does not exist (model spec '{spec}'); "
                                    f"give an existing path/to/file.py:factory")
        modname = "_autoplan_user_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
        loader_spec = importlib.util.spec_from_file_location(modname, path)
        if loader_spec is None or loader_spec.loader is None:
            raise UnknownModelError(f"model file '{target}' cannot be loaded as Python (model spec '{spec}')")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[modname] = module  # dataclasses and pickling look the module up here
        try:
            loader_spec.loader.exec_module(module)
        except BaseException as err:  # noqa: BLE001 - user code: report any failure as one line
            sys.modules.pop(modname, None)
            raise UnknownModelError(f"model file '{target}' raised {type(err).__name__} while loading: "
                                    f"{_one_line(str(err))} (model spec '{spec}')") from None
    elif target and all(part.isidentifier() for part in target.split(".")):
        try:
            module = importlib.import_module(target)
        except BaseException as err:  # noqa: BLE001
            raise UnknownModelError(f"cannot import module '{target}' for model spec '{spec}': "
                                    f"{type(err).__name__}: {_one_line(str(err))}; check PYTHONPATH "
                                    f"or use path/to/file.py:factory") from None
    else:
        raise _unknown(spec)
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UnknownModelError(f"'{target}' has no callable '{attr}' (model spec '{spec}'); "
                                f"define {attr}() returning an nn.Module there")
    return factory


def _as_tuple(x: Any) -> tuple[torch.Tensor, ...]:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _custom(spec: str, target: str, attr: str) -> ModelSpec:
    factory = _load_factory(spec, target, attr)
    label = f"{target}:{attr}"

    def call() -> tuple[nn.Module, tuple[torch.Tensor, ...] | None]:
        try:
            result = factory()
        except BaseException as err:  # noqa: BLE001
            raise UnknownModelError(f"model factory '{label}' raised {type(err).__name__}: "
                                    f"{_one_line(str(err))}") from None
        if isinstance(result, nn.Module):
            module, template = result, None
        elif isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module) \
                and isinstance(result[1], Mapping):
            return result[0], dict(result[1])  # keyword inputs (labels inside for a model with its own loss)
        elif (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module)):
            module, template = result[0], _as_tuple(result[1])
        else:
            raise UnknownModelError(f"model factory '{label}' returned {type(result).__name__}; "
                                    f"return an nn.Module or (module, example_inputs)")
        if template is None and not callable(getattr(module, "example_inputs", None)):
            raise UnknownModelError(f"model factory '{label}' returned a module without example inputs; "
                                    f"give it an example_inputs(batch, seq_len) method or return (module, inputs)")
        if template is not None and not all(isinstance(t, torch.Tensor) for t in template):
            raise UnknownModelError(f"model factory '{label}' returned example inputs that are not tensors")
        return module, template

    with torch.device("meta"):
        meta_module, template = call()
        num_params = sum(p.numel() for p in meta_module.parameters())
    if isinstance(template, dict):  # planned with the inputs as given (meta tensors): no sizing, no targets of ours
        def keyword_inputs(batch: int, seq_len: int) -> tuple[torch.Tensor, ...]:
            raise AutoplanError(f"model factory '{label}' gives keyword inputs: plan it with them (they are its example)")

        return ModelSpec(name=spec, family="custom", config=None, kind="call", build=lambda: call()[0],
                         example_inputs=keyword_inputs, example_targets=keyword_inputs, num_params=num_params,
                         description=f"user model {label} (keyword inputs); {_fmt_count(num_params)} params",
                         example=template, build_with_inputs=call)
    with torch.device("meta"):
        probe = template if template is not None else _as_tuple(meta_module.example_inputs(2, 8))
    first = probe[0] if probe else None
    is_lm = (isinstance(first, torch.Tensor) and first.dim() == 2 and first.dtype != torch.bool
             and not first.is_floating_point() and not first.is_complex())
    kind = "lm" if is_lm else "classifier"

    own_targets = getattr(meta_module, "example_targets", None)
    out_dim = 0
    if not callable(own_targets) or (template is not None and is_lm):
        try:
            with torch.device("meta"), torch.no_grad():
                out = meta_module(*(torch.empty_like(t, device="meta") for t in probe))
        except BaseException as err:  # noqa: BLE001
            raise UnknownModelError(f"model factory '{label}': forward failed on the meta device "
                                    f"({type(err).__name__}: {_one_line(str(err))}); add an example_targets"
                                    f"(batch, seq_len) method or make forward device-agnostic") from None
        out = out[0] if isinstance(out, (tuple, list)) else out
        if not isinstance(out, torch.Tensor) or out.dim() < 2:
            raise UnknownModelError(f"model factory '{label}': forward must return logits (B, ..., classes)")
        out_dim = int(out.shape[-1])

    if template is None:
        def inputs(batch: int, seq_len: int) -> tuple[torch.Tensor, ...]:
            return _as_tuple(meta_module.example_inputs(batch, seq_len))
    else:
        seq0 = int(first.shape[1]) if is_lm and first is not None else -1
        fill_high = out_dim if is_lm else 1

        def inputs(batch: int, seq_len: int) -> tuple[torch.Tensor, ...]:
            made = []
            for t in template:
                shape = list(t.shape)
                if shape:
                    shape[0] = batch
                if is_lm and len(shape) >= 2 and shape[1] == seq0:
                    shape[1] = seq_len
                if t.dtype == torch.bool:
                    made.append(torch.ones(shape, dtype=torch.bool))
                elif t.is_floating_point() or t.is_complex():
                    made.append(torch.randn(shape, dtype=t.dtype))
                else:
                    made.append(torch.randint(0, fill_high, shape, dtype=t.dtype))
            return tuple(made)

    if callable(own_targets):
        targets: Callable[[int, int], torch.Tensor] = lambda b, s: meta_module.example_targets(b, s)
    elif is_lm:
        targets = lambda b, s: torch.randint(0, out_dim, (b, s))
    else:
        targets = lambda b, s: torch.randint(0, out_dim, (b,))

    return ModelSpec(name=spec, family="custom", config=None, kind=kind, build=lambda: call()[0],
                     example_inputs=inputs, example_targets=targets, num_params=num_params,
                     description=f"user model {label} ({kind}); {_fmt_count(num_params)} params")
