"""Llama-3-style decoder (RMSNorm, rotary embeddings, grouped-query attention, SwiGLU).

Traceable with ``torch.fx`` (no leaf modules) and ``torch.export`` (strict=False): static
sizes come from the config, the rotary tables are buffers sliced to ``[:T]`` with ``narrow``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class LlamaConfig:
    """Shape of a Llama model; the default widths are the tiny test model, the context is Llama 3's."""

    layers: int = 2  # number of transformer blocks
    hidden: int = 64  # model width
    heads: int = 4  # query heads; must divide hidden
    kv_heads: int = 2  # key/value heads (grouped-query attention); must divide heads
    ffn: int = 128  # SwiGLU inner width (w1/w3 outputs)
    vocab: int = 256  # vocabulary size (logits' last dimension)
    seq: int = 8192  # max sequence length: rows of the rotary cos/sin tables
    rope_theta: float = 500000.0  # rotary embedding base
    norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_embeddings: bool = False  # lm_head shares its weight with the token embedding

    def __post_init__(self) -> None:
        for key in ("layers", "hidden", "heads", "kv_heads", "ffn", "vocab", "seq"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key}={value!r} must be a positive integer, e.g. {key}={getattr(LlamaConfig, key)}")
        if self.hidden % self.heads:
            raise ValueError(
                f"heads={self.heads} does not divide hidden={self.hidden}; "
                f"pick heads so that hidden % heads == 0 (e.g. heads={_divisor_near(self.hidden, self.heads)})"
            )
        if self.heads % self.kv_heads:
            raise ValueError(
                f"kv_heads={self.kv_heads} does not divide heads={self.heads}; "
                f"pick kv_heads so that heads % kv_heads == 0 (e.g. kv_heads={_divisor_near(self.heads, self.kv_heads)})"
            )
        if self.head_dim % 2:
            raise ValueError(
                f"head size hidden/heads={self.head_dim} is odd; rotary embeddings need an even head size, "
                f"change hidden or heads"
            )
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta={self.rope_theta!r} must be positive, e.g. theta=500000")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def _divisor_near(n: int, k: int) -> int:
    """The divisor of ``n`` closest to ``k`` (for error messages)."""
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - k), d))


def llama_num_params(cfg: LlamaConfig) -> int:
    """Exact parameter count of ``Llama(cfg)``; a tied lm_head is counted once."""
    h, kv = cfg.hidden, cfg.kv_heads * cfg.head_dim
    block = h + 2 * h * h + 2 * h * kv + h + 3 * h * cfg.ffn  # norms, wq/wo, wk/wv, w1/w2/w3
    head = 0 if cfg.tie_embeddings else cfg.vocab * h
    return cfg.vocab * h + cfg.layers * block + h + head


def rope_tables(cfg: LlamaConfig, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (seq, head_dim), halves repeated (rotate-half convention)."""
    half = cfg.head_dim // 2
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(half, device=device, dtype=torch.float32) / half))
    angles = torch.outer(torch.arange(cfg.seq, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, half: int) -> torch.Tensor:
    """Rotate (B, nh, T, hd) ``x`` by the (T, hd) tables; computed in float32."""
    xf = x.float()
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * cos + rotated * sin).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (self.dim,), self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.hidden, cfg.heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.hidden, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.hidden, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.heads * cfg.head_dim, cfg.hidden, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q = self.wq(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.wk(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.wv(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rope(q, cos, sin, self.head_dim // 2)
        k = apply_rope(k, cos, sin, self.head_dim // 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.kv_heads != self.heads)
        return self.wo(y.transpose(1, 2).contiguous().view(B, T, -1))  # -1: local width under tensor parallel


class FeedForward(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.hidden, cfg.ffn, bias=False)
        self.w3 = nn.Linear(cfg.hidden, cfg.ffn, bias=False)
        self.w2 = nn.Linear(cfg.ffn, cfg.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.mlp = FeedForward(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    """``forward(idx: (B, T) int64) -> logits (B, T, vocab)``; T <= config.seq."""

    rope_cos: torch.Tensor
    rope_sin: torch.Tensor

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab, cfg.hidden)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        cos, sin = rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        if not self.tok_emb.weight.is_meta:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0.02) weights (output projections scaled by 1/sqrt(2 * layers)), unit norms,
        fresh rotary tables. Called by the constructor on real devices; call it again after
        ``to_empty()`` of a meta-built model (the rotary buffers are not in the state dict)."""
        std = 0.02
        for name, mod in self.named_modules():
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                scale = 1 / math.sqrt(2 * self.config.layers) if name.endswith((".wo", ".w2")) else 1.0
                nn.init.normal_(mod.weight, mean=0.0, std=std * scale)
            elif isinstance(mod, RMSNorm):
                nn.init.ones_(mod.weight)
        cos, sin = rope_tables(self.config, device=self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.size()
        # == rope_cos[:T]; narrow() because fx cannot slice a real buffer with a traced length
        cos, sin = self.rope_cos.narrow(0, 0, T), self.rope_sin.narrow(0, 0, T)
        x = self.tok_emb(idx)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.lm_head(self.norm(x))
