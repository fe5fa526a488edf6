"""The model zoo: named models, family specs with overrides, and user factories.

``resolve_model("gpt2")``, ``resolve_model("llama:layers=4,hidden=256,heads=8,kv_heads=2,ffn=512")``,
``resolve_model("path/to/file.py:factory")``; see :mod:`autoplan.models.registry` for the spec grammar
and the user-factory protocol. Every model's ``forward(*inputs)`` returns logits.
"""
from __future__ import annotations

from autoplan.models.gpt import GPT, GPTConfig
from autoplan.models.llama import Llama, LlamaConfig
from autoplan.models.registry import ModelSpec, list_models, resolve_model
from autoplan.models.small import CNNClassifier, CNNConfig, MLPClassifier, MLPConfig


def recipe_family(module: object) -> str | None:
    """"gpt" or "llama" for the zoo models the native recipe runtime knows, else None."""
    return "gpt" if isinstance(module, GPT) else "llama" if isinstance(module, Llama) else None

__all__ = [
    "ModelSpec",
    "resolve_model",
    "list_models",
    "GPT",
    "GPTConfig",
    "Llama",
    "LlamaConfig",
    "MLPClassifier",
    "MLPConfig",
    "CNNClassifier",
    "CNNConfig",
    "recipe_family",
]
