"""nanoGPT-style decoder-only transformer (GPT-2 / GPT-3 shapes).

The module is written so that it traces with ``torch.fx`` even when no nn module is a leaf
and exports with ``torch.export.export(..., strict=False)``: no data-dependent control flow,
no ``.item()``, all static sizes come from the config.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class GPTConfig:
    """Shape of a GPT model; the defaults are GPT-2 small (124M)."""

    layers: int = 12  # number of transformer blocks
    hidden: int = 768  # model width (embedding size)
    heads: int = 12  # attention heads; must divide hidden
    vocab: int = 50257  # vocabulary size (logits' last dimension)
    seq: int = 1024  # context length: size of the learned position embedding
    dropout: float = 0.0  # dropout probability of every dropout module and of attention
    tie_embeddings: bool = True  # lm_head shares its weight with the token embedding
    bias: bool = True  # Linear and LayerNorm layers carry a bias

    def __post_init__(self) -> None:
        for key in ("layers", "hidden", "heads", "vocab", "seq"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key}={value!r} must be a positive integer, e.g. {key}={getattr(GPTConfig, key)}")
        if self.hidden % self.heads:
            raise ValueError(
                f"heads={self.heads} does not divide hidden={self.hidden}; "
                f"pick heads so that hidden % heads == 0 (e.g. heads={_divisor_near(self.hidden, self.heads)})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout!r} must be in [0, 1), e.g. dropout=0.1")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def _divisor_near(n: int, k: int) -> int:
    """The divisor of ``n`` closest to ``k`` (for error messages)."""
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - k), d))


def gpt_num_params(cfg: GPTConfig) -> int:
    """Exact parameter count of ``GPT(cfg)``; a tied lm_head is counted once."""
    h, b = cfg.hidden, int(cfg.bias)
    ln = h + h * b
    block = (
        ln  # ln1
        + h * 3 * h + 3 * h * b  # attn.qkv
        + h * h + h * b  # attn.proj
        + ln  # ln2
        + h * 4 * h + 4 * h * b  # mlp.fc
        + 4 * h * h + h * b  # mlp.proj
    )
    head = 0 if cfg.tie_embeddings else cfg.vocab * h
    return cfg.vocab * h + cfg.seq * h + cfg.layers * block + ln + head


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.hidden, self.heads, self.head_dim = cfg.hidden, cfg.heads, cfg.head_dim
        self.p = cfg.dropout
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden, bias=cfg.bias)
        self.proj = nn.Linear(cfg.hidden, cfg.hidden, bias=cfg.bias)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.qkv(x).split(self.hidden, dim=2)
        q = q.view(B, T, self.heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.heads, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.p if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)  # -1: local width under tensor parallel
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.hidden, 4 * cfg.hidden, bias=cfg.bias)
        self.act = nn.GELU()
        self.proj = nn.Linear(4 * cfg.hidden, cfg.hidden, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(self.act(self.fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.hidden, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.hidden, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """``forward(idx: (B, T) int64) -> logits (B, T, vocab)``."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab, cfg.hidden)
        self.pos_emb = nn.Embedding(cfg.seq, cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.hidden, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if not self.tok_emb.weight.is_meta:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2 initialization (normal 0.02, residual projections scaled by 1/sqrt(2 * layers)).

        Called by the constructor on real devices; after ``to_empty()`` of a meta-built model
        call it again to get sane weights.
        """
        std = 0.02
        for name, mod in self.named_modules():
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                scale = 1 / math.sqrt(2 * self.config.layers) if name.endswith(".proj") else 1.0
                nn.init.normal_(mod.weight, mean=0.0, std=std * scale)
                if getattr(mod, "bias", None) is not None:
                    nn.init.zeros_(mod.bias)
            elif isinstance(mod, nn.LayerNorm):
                mod.reset_parameters()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.size()
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))
