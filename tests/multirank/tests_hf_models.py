"""Small transformers models (random weights, use_cache=False) for the runtime tests."""
from __future__ import annotations

import torch
import torch.nn as nn


class CausalLM(nn.Module):
    """idx -> logits (a tensor, as the planner needs) around a transformers causal LM."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.inner(input_ids=idx, use_cache=False, return_dict=False)[0]


def build_hf(name: str, attn: str = "sdpa") -> tuple[nn.Module, torch.Tensor]:
    import transformers as tf

    torch.manual_seed(0)
    if name == "hf-gpt2":
        cfg = tf.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=64, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False)
        model = tf.GPT2LMHeadModel(cfg)
    elif name == "hf-llama":
        cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=256, max_position_embeddings=64, use_cache=False)
        model = tf.LlamaForCausalLM(cfg)
    else:
        raise ValueError(name)
    model.config._attn_implementation = attn
    return CausalLM(model).train(), torch.zeros(2, 32, dtype=torch.long)
