"""The op registry: every op kind declared once, with all that the planner knows of it.

An ``OpKind`` holds an op's spellings (torch functions, aten overload packets, method names),
its forward FLOPs, what autograd saves of it for backward, whether its backward reads a weight,
and its sharding rule for ONE mesh axis (expanded to N-D meshes by ``strategies.expand``). The
graph classifier, the cost model and the strategies read these entries and nothing else, so a
new op is one ``@op_kind(...)`` in the family file it belongs to (``autoplan/ops/*.py``).

An op with no entry is classified "unknown": planned replicated, with a warning naming it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from autoplan.strategies.placement import Placement


@dataclass(frozen=True)
class AxisRule:
    """One way to run an op on one mesh axis: the placement of each tensor input and of the output,
    and the collectives the op itself issues on that axis (e.g. a vocabulary-parallel cross-entropy's
    statistics all-reduces, a synchronised batch norm's)."""

    out: Placement
    ins: tuple[Placement, ...]
    comm: tuple[tuple, ...] = ()  # (collective, global bytes[, grows with the rows[, phase]]) the op issues:
    # bytes growing with the rows in forward by default; (kind, bytes, False) a fixed size (a count, statistics)


@dataclass(frozen=True)
class RuleCtx:
    """An op as its rule, FLOP and saving functions see it: shapes at one batch, constant arguments."""

    in_shapes: tuple[tuple[int, ...], ...]
    in_dtypes: tuple[torch.dtype, ...]
    out_shape: tuple[int, ...]
    attrs: dict = field(hash=False)
    target: str = ""

    def attr(self, *names: str, default=None):
        for n in names:
            if n in self.attrs and self.attrs[n] is not None:
                return self.attrs[n]
        return default

    @property
    def name(self) -> str:
        """The target's base name: ``aten.add.Tensor``, ``add.Tensor``, ``add`` -> ``add``."""
        return base_name(self.target)

    def numel(self, i: int | None = None) -> int:
        """Elements of input ``i`` (of the output when None)."""
        return math.prod(self.out_shape if i is None else self.in_shapes[i])


RuleFn = Callable[[RuleCtx], list[AxisRule]]
FlopsFn = Callable[[RuleCtx], float]
SavesFn = Callable[[str, int], bool]  # (op's base name, input position) -> kept for backward


def base_name(target: str) -> str:
    """``aten.add.Tensor``, ``add.Tensor`` (an overload's __name__), ``add_`` -> ``add``; in-place as out-of-place."""
    name = target.removeprefix("aten.").split(".")[0]
    return name[:-1] if name.endswith("_") and not name.endswith("__") else name


def no_flops(c: RuleCtx) -> float:
    return 0.0


def elementwise_flops(c: RuleCtx) -> float:
    """One FLOP per element of the larger of the output and the first input."""
    return float(max(c.numel(), c.numel(0) if c.in_shapes else 0))


def saves_all(name: str, pos: int) -> bool:
    return True


def saves_none(name: str, pos: int) -> bool:
    return False


@dataclass(frozen=True)
class OpKind:
    name: str
    rule: RuleFn
    spellings: tuple[Any, ...] = ()
    flops: FlopsFn = no_flops  # forward FLOPs of the whole (unsharded) op; backward is priced as 2x
    saves_input: SavesFn = saves_all  # does autograd keep this input for backward (PyTorch's derivative formulas)
    saves_output: bool = False  # does the op keep its own output (softmax, flash attention's output and log-sum-exp)
    reads_weight: SavesFn = saves_all  # does backward read this input's value (FSDP must gather that weight again)
    data_inputs: Callable[[str], int | None] = lambda name: None  # how many leading tensor args carry data
    # (None: all); the rest lend a shape or a dtype only (``x.type_as(y)``, ``x.new_ones(...)``, ``zeros_like(x)``)
    alias: bool = False  # a view or a source: no data of its own, no compute
    matmul: bool = False  # priced by the matmul curve (GEMMs, convolutions, attention)
    doc: str = ""


OP_KINDS: dict[str, OpKind] = {}
_SPELLINGS: dict[Any, str] = {}


def op_kind(name: str, *, spellings: tuple[Any, ...] = (), **fields: Any) -> Callable[[RuleFn], RuleFn]:
    """Register the decorated rule as op kind ``name`` with its spellings and facts (``OpKind`` fields)."""

    def register(fn: RuleFn) -> RuleFn:
        if name in OP_KINDS:
            raise ValueError(f"op kind {name!r} is registered twice")
        doc = (fn.__doc__ or "").strip().splitlines()
        OP_KINDS[name] = OpKind(name, fn, tuple(spellings), doc=doc[0] if doc else "", **fields)
        for s in spellings:
            owner = _SPELLINGS.setdefault(_key(s), name)
            if owner != name:
                raise ValueError(f"spelling {s!r} is claimed by op kinds {owner!r} and {name!r}")
        return fn

    return register


def _key(target: Any) -> Any:
    """aten overloads (aten.add.Tensor) are looked up by their packet (aten.add)."""
    packet = getattr(target, "overloadpacket", None)
    return packet if packet is not None else target


def kind_of(target: Any) -> str | None:
    """The op kind a call target (function, aten overload, method name) is registered under, if any.

    In-place spellings (``add_``, ``aten.add_``) are their out-of-place kind's."""
    try:
        kind = _SPELLINGS.get(_key(target))
    except TypeError:  # unhashable target
        return None
    if kind is not None:
        return kind
    name = target if isinstance(target, str) else getattr(_key(target), "__name__", None)
    if isinstance(name, str) and name.endswith("_") and not name.endswith("__"):
        inplace = getattr(torch.ops.aten, name, None) if not isinstance(target, str) else None
        out_of_place = getattr(torch.ops.aten, name[:-1], None) if inplace is not None else name[:-1]
        return _SPELLINGS.get(out_of_place) if out_of_place is not None else None
    return None


def get(kind: str) -> OpKind:
    """The registry entry of ``kind`` ("unknown" for kinds with none)."""
    return OP_KINDS.get(kind) or OP_KINDS["unknown"]
