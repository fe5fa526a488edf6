"""Matrix products: linear, addmm, matmul / mm / bmm / baddbmm, einsum (rules from the subscripts)."""
from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F

from autoplan.ops.registry import AxisRule, RuleCtx, op_kind
from autoplan.strategies.placement import P, R, Placement, Shard

aten = torch.ops.aten


def _second_is_weight(name: str, pos: int) -> bool:
    return pos == 1


@op_kind("linear", spellings=(F.linear, aten.linear), matmul=True, reads_weight=_second_is_weight,
         flops=lambda c: 2.0 * c.numel() * c.in_shapes[0][-1])
def linear_rules(c: RuleCtx) -> list[AxisRule]:
    """y = x W^T + b: batch-like dims of x, column parallel (W rows), row parallel (contraction)."""
    nx = len(c.in_shapes[0])
    has_bias = len(c.in_shapes) > 2
    rules = []
    for d in range(nx - 1):  # batch-like dims of x
        rules.append(AxisRule(Shard(d), (Shard(d), R) + ((R,) if has_bias else ())))
    rules.append(AxisRule(Shard(nx - 1), (R, Shard(0)) + ((Shard(0),) if has_bias else ())))  # column parallel
    rules.append(AxisRule(P, (Shard(nx - 1), Shard(1)) + ((P,) if has_bias else ())))  # row parallel
    rules.append(AxisRule(P, (P, R) + ((P,) if has_bias else ())))  # linear in a partial input
    return rules


@op_kind("matmul", spellings=(torch.matmul, operator.matmul, torch.bmm, torch.mm, aten.matmul, aten.mm, aten.bmm,
                              "matmul", "bmm", "mm"),
         matmul=True, flops=lambda c: 2.0 * c.numel() * c.in_shapes[0][-1])
def matmul_rules(c: RuleCtx) -> list[AxisRule]:
    """a @ b with broadcast batch dims: batch dims, rows of a, columns of b, the contraction (partial)."""
    a, b = c.in_shapes[0], c.in_shapes[1]
    out = c.out_shape
    if len(a) < 2 or len(b) < 2:
        return []
    rules = []
    for d in range(len(out) - 2):  # broadcast batch dims
        ins = []
        for shape in (a, b):
            di = d - (len(out) - len(shape))
            ins.append(Shard(di) if di >= 0 and shape[di] == out[d] else R)
        rules.append(AxisRule(Shard(d), tuple(ins)))
    rules.append(AxisRule(Shard(len(out) - 2), (Shard(len(a) - 2), R)))  # rows of a
    rules.append(AxisRule(Shard(len(out) - 1), (R, Shard(len(b) - 1))))  # columns of b
    rules.append(AxisRule(P, (Shard(len(a) - 1), Shard(len(b) - 2))))  # contraction
    rules.append(AxisRule(P, (P, R)))
    rules.append(AxisRule(P, (R, P)))
    return rules


def _addmm_weights(name: str, pos: int) -> bool:
    return pos in (1, 2)


@op_kind("addmm", spellings=(torch.addmm, aten.addmm), matmul=True, reads_weight=_addmm_weights,
         flops=lambda c: 2.0 * c.numel() * c.in_shapes[1][-1])
def addmm_rules(c: RuleCtx) -> list[AxisRule]:
    """addmm(bias, x, w) = bias + x @ w with x (M, K), w (K, N) (transformers' GPT-2 Conv1D)."""
    if len(c.in_shapes) != 3 or len(c.in_shapes[1]) != 2 or len(c.in_shapes[2]) != 2:
        return []
    bias_cols = Shard(len(c.in_shapes[0]) - 1) if c.in_shapes[0] else R
    return [
        AxisRule(Shard(0), (R, Shard(0), R)),  # rows
        AxisRule(Shard(1), (bias_cols, R, Shard(1))),  # columns
        AxisRule(P, (P, Shard(1), Shard(0))),  # contraction
        AxisRule(P, (P, P, R)),
    ]


@op_kind("baddbmm", spellings=(torch.baddbmm, aten.baddbmm, "baddbmm"), matmul=True,
         flops=lambda c: 2.0 * c.numel() * c.in_shapes[1][-1])
def baddbmm_rules(c: RuleCtx) -> list[AxisRule]:
    """baddbmm(input, a, b) = beta * input + alpha * a @ b, a (B, M, K), b (B, K, N) (ALiBi attention scores)."""
    if len(c.in_shapes) != 3 or len(c.in_shapes[1]) != 3 or len(c.in_shapes[2]) != 3:
        return []
    base, out = c.in_shapes[0], c.out_shape

    def like(d: int) -> Placement:  # the added input, broadcast against the (B, M, N) output
        di = d - (len(out) - len(base))
        return Shard(di) if di >= 0 and base[di] == out[d] and out[d] > 1 else R

    return [
        AxisRule(Shard(0), (like(0), Shard(0), Shard(0))),  # batch
        AxisRule(Shard(1), (like(1), Shard(1), R)),  # rows of a
        AxisRule(Shard(2), (like(2), R, Shard(2))),  # columns of b
    ]


def _einsum_spec(c: RuleCtx) -> tuple[list[str], str] | None:
    equation = c.attr("arg0", "equation")
    if not isinstance(equation, str) or "..." in equation or "->" not in equation:
        return None
    lhs, out = equation.replace(" ", "").split("->")
    ins = lhs.split(",")
    if len(ins) != len(c.in_shapes) or any(len(s) != len(sh) for s, sh in zip(ins, c.in_shapes)):
        return None
    return ins, out


def _einsum_flops(c: RuleCtx) -> float:
    spec = _einsum_spec(c)
    if spec is None:
        return float(c.numel())
    sizes = {ch: n for s, sh in zip(spec[0], c.in_shapes) for ch, n in zip(s, sh)}
    return 2.0 * math.prod(sizes.values())


@op_kind("einsum", spellings=(torch.einsum, aten.einsum), matmul=True, flops=_einsum_flops)
def einsum_rules(c: RuleCtx) -> list[AxisRule]:
    """Rules derived from the subscripts: each letter shards every operand that carries it (the others
    replicated); the output is sharded on it if it keeps the letter, else partial (the sum over the
    letter splits into per-rank sums: einsum is linear in each operand). Size-1 and diagonal letters never shard."""
    spec = _einsum_spec(c)
    if spec is None:
        return []
    ins, out = spec
    sizes = {ch: n for s, sh in zip(ins, c.in_shapes) for ch, n in zip(s, sh)}
    rules = []
    for ch in sorted(set("".join(ins))):
        if sizes[ch] <= 1 or any(s.count(ch) > 1 for s in (*ins, out)):  # size 1, or a diagonal
            continue
        placements = tuple(Shard(s.index(ch)) if ch in s else R for s in ins)
        rules.append(AxisRule(Shard(out.index(ch)) if ch in out else P, placements))
    for i in range(len(ins)):  # linear in each operand: a partial operand gives a partial product
        rules.append(AxisRule(P, tuple(P if j == i else R for j in range(len(ins)))))
    return rules
