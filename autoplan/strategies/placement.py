"""Placements of a tensor on one mesh axis, as in DTensor: Replicate, Shard(dim), Partial.

``repr`` is ``Shard(dim=0)``; ``str`` is the short form ``S(0)`` used in logs and plan files.
A tensor's placement on an N-D mesh is a tuple with one placement per mesh axis.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Union


@dataclass(frozen=True)
class Replicate:
    def __str__(self) -> str:
        return "R"


@dataclass(frozen=True)
class Shard:
    dim: int  # tensor dim split evenly across the mesh axis

    def __str__(self) -> str:
        return f"S({self.dim})"


@dataclass(frozen=True)
class Partial:
    """Each rank holds a summand of the full value (reduce op: sum)."""

    def __str__(self) -> str:
        return "P"


Placement = Union[Replicate, Shard, Partial]
Placements = tuple[Placement, ...]  # one per mesh axis

R = Replicate()
P = Partial()

_SHARD_RE = re.compile(r"^S\((\d+)\)$")


def parse_placement(text: str) -> Placement:
    """Inverse of ``str``: ``"R"``, ``"P"``, ``"S(1)"``."""
    text = text.strip()
    if text == "R":
        return R
    if text == "P":
        return P
    match = _SHARD_RE.match(text)
    if match:
        return Shard(int(match.group(1)))
    raise ValueError(f"bad placement {text!r}: expected R, P or S(dim)")


def format_placements(placements: Placements) -> list[str]:
    return [str(p) for p in placements]


def parse_placements(items: list[str]) -> Placements:
    return tuple(parse_placement(s) for s in items)


def shard_factor(placements: Placements, mesh_shape: tuple[int, ...], dim: int) -> int:
    """How many ways ``dim`` of a tensor is split by ``placements`` on a mesh of ``mesh_shape``."""
    factor = 1
    for placement, size in zip(placements, mesh_shape):
        if isinstance(placement, Shard) and placement.dim == dim:
            factor *= size
    return factor


def local_shape(shape: tuple[int, ...], placements: Placements, mesh_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of one rank's shard (shards are even: callers only build divisible placements)."""
    return tuple(s // shard_factor(placements, mesh_shape, d) for d, s in enumerate(shape))
