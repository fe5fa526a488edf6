"""Data-parallel pieces of the recipe runtime that FSDP2 does not cover (ZeRO 0 and 1).

* :func:`all_reduce_mean`: DDP semantics without the wrapper (gradients averaged over the dp axis
  after backward, in flat buckets; not overlapped with backward);
* :class:`ShardedOptimizer`: ZeRO-1, optimizer states partitioned by whole parameter over dp.
Both work on the local tensors of DTensor parameters (tensor parallel), so they compose with TP.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor

from autoplan.cost.comm import BUCKET_BYTES  # gradient all-reduce / parameter broadcast bucket (DDP's default size)

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds: a DTensor's local shard itself (not a view), so in-place collectives write through."""
    return t._local_tensor if isinstance(t, DTensor) else t  # noqa: SLF001 - as autoplan.runtime.apply does


def _buckets(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Consecutive same-dtype groups of at most BUCKET_BYTES (a larger tensor gets a bucket of its own)."""
    buckets: list[list[torch.Tensor]] = []
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for same in by_dtype.values():
        current: list[torch.Tensor] = []
        nbytes = 0
        for t in same:
            size = t.numel() * t.element_size()
            if current and nbytes + size > BUCKET_BYTES:
                buckets.append(current)
                current, nbytes = [], 0
            current.append(t)
            nbytes += size
        if current:
            buckets.append(current)
    return buckets


def _unflatten_into(flat: torch.Tensor, bucket: list[torch.Tensor]) -> None:
    offset = 0
    for t in bucket:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def all_reduce_mean(tensors: list[torch.Tensor], group: dist.ProcessGroup, size: int) -> None:
    """In-place mean of ``tensors`` over ``group``, one flat all-reduce per bucket (DDP semantics)."""
    for bucket in _buckets(tensors):
        flat = torch.cat([t.reshape(-1) for t in bucket])
        dist.all_reduce(flat, group=group)
        flat.div_(size)
        _unflatten_into(flat, bucket)


class ShardedOptimizer:
    """ZeRO-1: each dp rank keeps optimizer state for its share of the parameters (greedy by size),
    steps them, and broadcasts the new values to the other dp ranks. Gradients stay replicated."""

    def __init__(self, params: list[nn.Parameter], factory: OptimizerFactory, group: dist.ProcessGroup):
        self.params, self.group = params, group
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        load = [0] * size
        self.owner: list[int] = [0] * len(params)
        for i in sorted(range(len(params)), key=lambda i: -local_tensor(params[i]).numel()):
            self.owner[i] = min(range(size), key=lambda r: (load[r], r))
            load[self.owner[i]] += local_tensor(params[i]).numel()
        mine = [p for p, o in zip(params, self.owner) if o == rank]
        self.inner = factory(mine) if mine else None

    @property
    def state(self) -> dict:
        return self.inner.state if self.inner is not None else {}

    @property
    def param_groups(self) -> list[dict]:
        """This rank's groups (learning-rate schedules must be applied on every rank alike)."""
        return self.inner.param_groups if self.inner is not None else []

    def step(self) -> None:
        if self.inner is not None:
            self.inner.step()
        with torch.no_grad():  # one flat broadcast per (owner, dtype) bucket
            for owner in range(dist.get_world_size(self.group)):
                owned = [local_tensor(p) for p, o in zip(self.params, self.owner) if o == owner]
                for bucket in _buckets(owned):
                    flat = torch.cat([t.reshape(-1) for t in bucket])
                    dist.broadcast(flat, group=self.group, group_src=owner)
                    _unflatten_into(flat, bucket)

    @property
    def owned(self) -> list[nn.Parameter]:
        """The parameters whose optimizer state this dp rank holds (and steps)."""
        rank = dist.get_rank(self.group)
        return [p for p, o in zip(self.params, self.owner) if o == rank]

    def state_dict(self) -> dict:
        """This rank's share, in ``torch.optim`` form (indices into :attr:`owned`). Checkpoints key the
        states by parameter name instead: ``autoplan.runtime.checkpoint`` saves each state from the
        rank that owns it and loads it into whichever rank owns it in the new layout."""
        return self.inner.state_dict() if self.inner is not None else {"state": {}, "param_groups": []}

    def load_state_dict(self, state: dict) -> None:
        """The inverse of :meth:`state_dict` for the same layout (same dp size and parameters)."""
        if self.inner is not None:
            self.inner.load_state_dict(state)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None
