"""Communication: alpha-beta cost of collectives, and the collectives a resharding needs.

Bandwidth terms follow the ring algorithms NCCL and gloo use: an all-reduce moves
2(n-1)/n of the buffer through each device, an all-gather or reduce-scatter (n-1)/n, an
all-to-all (n-1)/n. The latency term counts ring steps, capped by a tree's 2*ceil(log2 n)
(collective libraries switch to trees when latency dominates).

Legal transitions on one mesh axis (as in DTensor's ``_redistribute.py``):

    S(d) -> R      all_gather            P -> R     all_reduce
    P -> S(d)      reduce_scatter        S(d) -> S(e)  all_to_all
    R -> S(d)      local chunk (free)    R|S -> P   local (free: zero-pad / keep one copy)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from autoplan.hardware import Cluster, Link
from autoplan.strategies.placement import Partial, Placement, Placements, Replicate, Shard


@dataclass(frozen=True)
class Collective:
    kind: str  # all_reduce | all_gather | reduce_scatter | all_to_all
    axis: int  # mesh axis
    nbytes: float  # bytes per device: the buffer reduced, the gathered output, the scattered input


def latency_steps(kind: str, n: int) -> int:
    ring = 2 * (n - 1) if kind == "all_reduce" else n - 1
    tree = 2 * math.ceil(math.log2(n)) if n > 1 else 0
    return min(ring, max(tree, 1))


BUCKET_BYTES = 25 * 2**20  # DDP's default gradient bucket


@dataclass(frozen=True)
class Bucket:
    """How a parameter's collectives are grouped: gradient all-reduces in DDP buckets of ``grads``
    bytes; parameter all-gathers and gradient reduce-scatters per FSDP unit (the parameters of one
    repeated block, or of everything outside the blocks), ``unit`` bytes."""

    grads: float = BUCKET_BYTES
    unit: float = BUCKET_BYTES

    def size(self, kind: str) -> float:
        return self.grads if kind == "all_reduce" else self.unit


def collective_seconds(kind: str, nbytes: float, n: int, link: Link, bucket: Bucket | None = None) -> float:
    """Seconds of one collective of ``nbytes`` per device over ``n`` devices on ``link``.

    ``bucket``: the collective is one piece of a bucket (gradient all-reduces are bucketed by DDP,
    gathers and reduce-scatters grouped per block by FSDP): it pays its share of the bucket's
    time, so the latency is paid once per bucket, not once per parameter.
    """
    if n <= 1 or nbytes <= 0:
        return 0.0
    size = bucket.size(kind) if bucket is not None else None
    if size is not None and nbytes < size:
        return collective_seconds(kind, size, n, link) * nbytes / size
    if link.measured is not None:  # measured: (issue #5) interpolated curve from `autoplan profile`, if it has this kind
        t = link.measured.seconds(kind, nbytes, n)
        if t is not None:
            return t
    factor = 2.0 * (n - 1) / n if kind == "all_reduce" else (n - 1) / n
    return factor * nbytes / link.effective_bytes_per_s + latency_steps(kind, n) * link.latency_s


REPORT_BYTES = 8.0  # the step's loss, one float64


def loss_report_seconds(cluster: Cluster, world: int) -> float:
    """Seconds a step spends reporting its loss: ``train_step`` returns the global mean loss, which
    every rank gets by one all-reduce of a scalar over all ranks (both runtimes issue exactly this)."""
    return collective_seconds("all_reduce", REPORT_BYTES, world, cluster.link_for_axis(world, 1))


def _local_bytes(shape: tuple[int, ...], elem_bytes: int, placements: Placements, mesh_shape: tuple[int, ...]) -> float:
    numel = math.prod(shape)
    for p, size in zip(placements, mesh_shape):
        if isinstance(p, Shard):
            numel /= size
    return numel * elem_bytes


def _axis_collective(src: Placement, dst: Placement) -> str | None:
    if src == dst:
        return None
    if isinstance(dst, Partial):
        return None  # local
    if isinstance(src, Replicate):
        return None  # chunk
    if isinstance(src, Partial):
        return "all_reduce" if isinstance(dst, Replicate) else "reduce_scatter"
    return "all_gather" if isinstance(dst, Replicate) else "all_to_all"


_ORDER = {None: 0, "reduce_scatter": 1, "all_reduce": 2, "all_to_all": 3, "all_gather": 4}


@lru_cache(maxsize=1 << 18)
def transition(
    shape: tuple[int, ...], elem_bytes: int, src: Placements, dst: Placements, mesh_shape: tuple[int, ...]
) -> tuple[Collective, ...]:
    """Collectives that turn a tensor placed ``src`` into ``dst``, one mesh axis at a time."""
    out = []
    state = list(src)
    # local moves (chunks) first so later collectives move less; reductions before gathers
    order = sorted(range(len(src)), key=lambda ax: _ORDER[_axis_collective(src[ax], dst[ax])])
    for axis in order:
        a, b = src[axis], dst[axis]
        kind = _axis_collective(a, b)
        before = _local_bytes(shape, elem_bytes, tuple(state), mesh_shape)
        state[axis] = b
        if kind is None:
            continue
        after = _local_bytes(shape, elem_bytes, tuple(state), mesh_shape)
        nbytes = after if kind == "all_gather" else before
        out.append(Collective(kind, axis, nbytes))
    return tuple(out)


def seconds(colls: tuple[Collective, ...], mesh_shape: tuple[int, ...], links: tuple[Link, ...],
            bucket: Bucket | None = None) -> float:
    return sum(collective_seconds(c.kind, c.nbytes, mesh_shape[c.axis], links[c.axis], bucket) for c in colls)


def dual(placements: Placements) -> Placements:
    """Placement a tensor's gradient must have to match the tensor: partial values have replicated gradients."""
    return tuple(Replicate() if isinstance(p, Partial) else p for p in placements)
