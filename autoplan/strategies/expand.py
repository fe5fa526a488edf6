"""Expand one-axis rules to strategies on an N-D mesh (every axis picks one rule).

A strategy is legal when every tensor dim is split evenly: the product of the sizes of the
axes that shard a dim divides it. The gradient placement of each input follows from the
forward one: a sharded input gets a sharded gradient, a partial input a replicated one, and a
replicated input whose op is split across the axis by another operand gets a partial gradient
(the weight gradient of data parallelism; the input gradient of a column-parallel linear).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from autoplan.strategies.placement import P, R, Partial, Placement, Placements, Replicate, Shard
from autoplan.ops import AxisRule, RuleCtx, get


@dataclass(frozen=True)
class Strategy:
    out: Placements  # output placement, one per mesh axis
    ins: tuple[Placements, ...]  # required placement of each tensor input
    grads: tuple[Placements, ...]  # placement of the gradient the op produces for each input
    compute_divisor: int  # the op's work is split this many ways
    comm: tuple[tuple[str, int, float, bool, str], ...]  # (collective, mesh axis, bytes per device, grows with the
    # batch, phase) issued by the op itself

    @property
    def name(self) -> str:
        return ",".join(str(p) for p in self.out)

    def describe(self) -> str:
        ins = " ".join("[" + ",".join(str(p) for p in i) + "]" for i in self.ins)
        return f"{ins} -> [{self.name}]"


def _replicate_rule(n_inputs: int) -> AxisRule:
    return AxisRule(R, (R,) * n_inputs)


def _splits(rule: AxisRule) -> bool:
    return any(isinstance(p, Shard) for p in (rule.out, *rule.ins))


def _grad_placement(inp: Placement, rule: AxisRule) -> Placement:
    if isinstance(inp, Shard):
        return inp
    if isinstance(inp, Partial):
        return R
    return P if _splits(rule) or isinstance(rule.out, Partial) else R


def _fits(shape: tuple[int, ...], placements: Placements, mesh_shape: tuple[int, ...]) -> bool:
    factors = [1] * len(shape)
    for p, size in zip(placements, mesh_shape):
        if isinstance(p, Shard):
            if p.dim >= len(shape):
                return False
            factors[p.dim] *= size
    return all(s % f == 0 for s, f in zip(shape, factors))


def expand(ctx: RuleCtx, kind: str, mesh_shape: tuple[int, ...], *, differentiable: tuple[bool, ...]) -> list[Strategy]:
    """All legal N-D strategies of one op. ``differentiable[i]``: input i carries a gradient."""
    n_in = len(ctx.in_shapes)
    one_axis = [r for r in get(kind).rule(ctx) if len(r.ins) == n_in]
    one_axis.append(_replicate_rule(n_in))
    out: dict[tuple, Strategy] = {}
    for combo in itertools.product(one_axis, repeat=len(mesh_shape)):
        out_pl = tuple(r.out for r in combo)
        ins_pl = tuple(tuple(r.ins[i] for r in combo) for i in range(n_in))
        if not _fits(ctx.out_shape, out_pl, mesh_shape):
            continue
        if not all(_fits(s, pl, mesh_shape) for s, pl in zip(ctx.in_shapes, ins_pl)):
            continue
        key = (out_pl, ins_pl)
        if key in out:
            continue
        divisor = math.prod(size for r, size in zip(combo, mesh_shape) if _splits(r))
        grads = tuple(
            tuple(_grad_placement(r.ins[i], r) if differentiable[i] else R for r in combo) for i in range(n_in)
        )
        comm = []
        for axis, (r, size) in enumerate(zip(combo, mesh_shape)):
            other = math.prod(s for a, (rr, s) in enumerate(zip(combo, mesh_shape)) if a != axis and _splits(rr))
            for coll, nbytes, *more in r.comm:  # (kind, bytes[, grows with the rows[, phase]])
                grows, phase = (list(more) + [True, "forward"][len(more):])[:2]
                comm.append((coll, axis, nbytes / other if grows else nbytes, bool(grows), str(phase)))
        out[key] = Strategy(out_pl, ins_pl, grads, divisor, tuple(comm))
    return list(out.values())


def replicated(mesh_ndim: int) -> Placements:
    return (Replicate(),) * mesh_ndim
