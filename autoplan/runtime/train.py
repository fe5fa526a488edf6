"""Training loop: data streams, ``plan_and_train`` (plan or load a plan, apply, train, checkpoint).

Data is addressed by step: ``data(step) -> (inputs, targets)`` returns the same GLOBAL batch on
every rank, so a resumed run sees exactly the batches an uninterrupted one would have seen.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from autoplan.errors import AutoplanError
from autoplan.plan import Plan
from autoplan.runtime.apply import OptimizerFactory, ParallelModel, meta_clone
from autoplan.runtime.engine import apply
from autoplan.runtime.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

Batch = tuple[torch.Tensor, torch.Tensor] | dict[str, torch.Tensor]  # (inputs, targets), or keyword inputs
DataFn = Callable[[int], Batch]
LogFn = Callable[[str], None]


@dataclass(frozen=True)
class TokenStream:
    """Next-token batches cut from a flat token array, addressed by step (deterministic)."""

    tokens: np.ndarray
    global_batch: int
    seq_len: int

    def __post_init__(self) -> None:
        if len(self.tokens) < self.seq_len + 2:
            raise AutoplanError(f"the token stream has {len(self.tokens)} tokens, fewer than one sequence of {self.seq_len + 1}")

    def __call__(self, step: int) -> Batch:
        span = self.seq_len + 1
        starts = (np.arange(self.global_batch) + step * self.global_batch) * self.seq_len % (len(self.tokens) - span)
        rows = np.stack([self.tokens[s:s + span] for s in starts]).astype(np.int64)
        x = torch.from_numpy(rows)
        return x[:, :-1].contiguous(), x[:, 1:].contiguous()


@dataclass(frozen=True)
class RepeatedBatch:
    """A model's own example (keyword inputs, labels inside) as every step's batch, its samples repeated to
    the global batch along each tensor's batch dim: the data of a user model trained without a data set
    (the loss falls as the model learns the batch)."""

    example: dict
    global_batch: int

    def __call__(self, step: int) -> dict:
        return {k: _repeat(v, self.global_batch) for k, v in self.example.items()}


def _repeat(value: object, batch: int) -> object:
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return value
    reps = -(-batch // value.shape[0])
    return value.repeat(reps, *([1] * (value.dim() - 1)))[:batch]


def samples_in(batch: Batch) -> int:
    """Tokens of a (tokens, targets) batch, else samples of the first tensor."""
    if isinstance(batch, dict):
        first = next(v for v in batch.values() if isinstance(v, torch.Tensor))
        return int(first.numel() if first.dim() == 2 and not first.is_floating_point() else first.shape[0])
    return int(batch[0].numel())


def synthetic_tokens(vocab: int, n_tokens: int = 1 << 16, *, patterns: int = 4, period: int = 23, seed: int = 0) -> np.ndarray:
    """A learnable stream: a few random token patterns, each repeated for a while, in turn.

    Within a pattern the next token is a function of the current position, so a small model
    learns it in a few dozen steps and the loss falls well below log(vocab).
    """
    rng = np.random.default_rng(seed)
    table = rng.integers(0, vocab, size=(patterns, period))
    block = period * 8
    idx = np.arange(n_tokens)
    return table[(idx // block) % patterns, idx % period].astype(np.int64)


def file_tokens(path: str | Path) -> np.ndarray:
    """A flat file of little-endian uint16 tokens (as nanoGPT's ``train.bin``)."""
    path = Path(path)
    if not path.is_file():
        raise AutoplanError(f"no token file at {path}: pass a flat file of uint16 tokens to --data")
    if path.stat().st_size % 2:
        raise AutoplanError(f"{path} has an odd size: it is not a flat file of uint16 tokens")
    return np.memmap(path, dtype=np.dtype("<u2"), mode="r")


def check_vocab(tokens: np.ndarray, vocab: int) -> None:
    top = int(tokens.max()) if len(tokens) else 0
    if top >= vocab:
        raise AutoplanError(f"the data has token id {top} but the model's vocabulary has {vocab}: use a matching tokenizer/model")


def resolve_plan(model: nn.Module, plan: Plan | str | Path | None, example: Batch, *, cluster: str | None,
                 global_batch: int, **plan_kwargs) -> Plan:
    if isinstance(plan, Plan):
        return plan
    if plan is not None:
        return Plan.load(plan)
    if cluster is None:
        raise AutoplanError("pass plan= (a Plan or a plan file) or cluster= to plan here")
    import autoplan

    world = dist.get_world_size() if dist.is_initialized() else 1
    made = None
    if _rank0():  # a meta copy that keeps tied weights tied, so the plan's fingerprint is the runtime's
        inputs, targets = (example, None) if isinstance(example, dict) else ((example[0],), example[1])
        made = autoplan.plan(meta_clone(model), inputs, cluster=cluster, devices=world, global_batch=global_batch,
                             targets=targets, baselines=False, **plan_kwargs)
    return broadcast_plan(made)


def broadcast_plan(plan: Plan | None) -> Plan:
    """Rank 0's plan on every rank (solvers with time limits need not give every rank the same plan)."""
    if not dist.is_initialized():
        assert plan is not None
        return plan
    box = [plan.data if dist.get_rank() == 0 and plan is not None else None]
    dist.broadcast_object_list(box, src=0)
    return Plan(box[0])


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def step_line(step: int, steps: int, loss: float, seconds: float, tokens: int, predicted: float) -> str:
    ratio = seconds / predicted if predicted > 0 else math.nan
    return (f"step {step:>5}/{steps}  loss {loss:.6f}  step {seconds * 1e3:8.1f} ms  {tokens / seconds:10.0f} tok/s  "
            f"measured/predicted {ratio:.2f}x")


def plan_and_train(
    model: nn.Module,
    data: DataFn,
    *,
    steps: int,
    optimizer: OptimizerFactory,
    cluster: str | None = None,
    plan: Plan | str | Path | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int | None = None,
    resume: bool = True,
    log: LogFn | None = None,
    plan_kwargs: dict | None = None,
) -> list[float]:
    """Plan (or load ``plan``), apply, train ``steps`` steps and checkpoint; returns this call's losses.

    Call it on every rank of an initialised process group (e.g. from your own torchrun script).
    With ``checkpoint_dir`` it resumes from the newest complete checkpoint there (any plan, engine
    (per-op or recipe) or world size: DCP reshards on load) and saves every ``checkpoint_every`` steps and at the end.
    """
    log = log or (lambda line: print(line, flush=True) if _rank0() else None)
    example = data(0)
    first = next(iter(example.values())) if isinstance(example, dict) else example[0]
    the_plan = resolve_plan(model, plan, example, cluster=cluster, global_batch=int(first.shape[0]), **(plan_kwargs or {}))
    pm = apply(model, the_plan, optimizer=optimizer)
    start = 0
    if checkpoint_dir is not None and resume and latest_checkpoint(checkpoint_dir) is not None:
        start = load_checkpoint(pm, checkpoint_dir)
        log(f"resumed from step {start} ({latest_checkpoint(checkpoint_dir)})")
        if start >= steps:
            log(f"nothing to train: the checkpoint is at step {start} and --steps is {steps}; pass more steps to go on")
    losses = train_loop(pm, data, start, steps, checkpoint_dir, checkpoint_every, log)
    return losses


def train_loop(pm: ParallelModel, data: DataFn, start: int, steps: int, checkpoint_dir: str | Path | None,
               checkpoint_every: int | None, log: LogFn) -> list[float]:
    predicted = float(pm.plan.predicted.step_time_s)
    losses: list[float] = []
    for step in range(start, steps):
        batch = data(step)
        t0 = time.perf_counter()
        loss = pm.train_step(batch) if isinstance(batch, dict) else pm.train_step(*batch)
        seconds = time.perf_counter() - t0
        losses.append(loss)
        log(step_line(step + 1, steps, loss, seconds, samples_in(batch), predicted))
        done = step + 1
        if checkpoint_dir is not None and ((checkpoint_every and done % checkpoint_every == 0) or done == steps):
            save_checkpoint(pm, checkpoint_dir, done)
    return losses


def measure_steps(pm: ParallelModel, data: DataFn, steps: int, warmup: int = 1) -> list[float]:
    """Wall time of ``steps`` training steps after ``warmup`` (for benchmarks)."""
    times = []
    for step in range(warmup + steps):
        batch = data(step)
        dist.barrier()
        t0 = time.perf_counter()
        pm.train_step(batch) if isinstance(batch, dict) else pm.train_step(*batch)
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def median(values: Sequence[float]) -> float:
    return float(np.median(np.asarray(values))) if values else math.nan
