"""Scaled dot-product attention, every backend's spelling (math, flash, efficient, cuDNN, CPU flash)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from autoplan.ops.registry import AxisRule, RuleCtx, op_kind
from autoplan.strategies.placement import R, Placement, Shard

aten = torch.ops.aten
# the backends' own ops return (output, log-sum-exp, ...) tuples: captured graphs keep the composite op above
_BACKENDS = ()


def _sdpa_flops(c: RuleCtx) -> float:
    q, k = c.in_shapes[0], c.in_shapes[1]
    return 4.0 * math.prod(q[:-2]) * q[-2] * k[-2] * q[-1]  # QK^T and AV (no causal discount, as Megatron counts)


def _qkv(name: str, pos: int) -> bool:
    return pos < 3


@op_kind("sdpa", spellings=(F.scaled_dot_product_attention, aten.scaled_dot_product_attention, *_BACKENDS),
         matmul=True, flops=_sdpa_flops, saves_input=_qkv, saves_output=True)
def sdpa_rules(c: RuleCtx) -> list[AxisRule]:
    """softmax(Q K^T / sqrt(d) + mask) V: batch dims, heads (query and key/value heads), the queries'
    sequence with K and V gathered. The mask follows the dim it shares with the scores."""
    q = c.in_shapes[0]
    n = len(q)
    extra = len(c.in_shapes) - 3  # attention mask

    def mask(dim: int | None) -> tuple[Placement, ...]:
        if not extra:
            return ()
        m = c.in_shapes[3]
        if dim is None:
            return (R,) * extra
        dm = dim - (n - len(m))
        return ((Shard(dm) if dm >= 0 and m[dm] == q[dim] and m[dm] > 1 else R),) * extra

    rules = [AxisRule(Shard(d), (Shard(d),) * 3 + mask(d)) for d in range(n - 3)]  # batch
    if n >= 3:
        rules.append(AxisRule(Shard(n - 3), (Shard(n - 3),) * 3 + mask(n - 3)))  # heads (q and kv heads)
    rules.append(AxisRule(Shard(n - 2), (Shard(n - 2), R, R) + mask(n - 2)))  # queries' sequence, K/V gathered
    return rules
