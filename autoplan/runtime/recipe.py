"""Recipe runtime: Megatron-style TP x PP x DP training (ZeRO 0-3, recompute, bf16) with native PyTorch.

A :class:`Recipe` is the narrow configuration the pipeline search prices (``autoplan.estimate``):
tp, pp, dp, schedule, virtual stages, micro-batches, recompute, ZeRO stage, sequence parallel,
dtype. :func:`apply_recipe` builds it from PyTorch's own parallelism, in torchtitan's order:

1. mesh ``(pp, dp, tp)`` (tp fastest-varying, as Megatron-LM);
2. pipeline split into stage modules (:mod:`autoplan.runtime.recipe_models`), stage ``i`` on pp
   rank ``i % pp`` (``virtual_stages`` chunks per rank for the interleaved schedule);
3. tensor parallel per block (``parallelize_module``), sequence parallel optionally;
4. activation checkpointing: ``full`` wraps every block, ``selective`` wraps the attention
   module with a selective-checkpoint policy that saves the projections' matmuls and
   collectives and recomputes the attention core (SDPA and the reshapes / rotary around it);
5. data parallel: zero 0 = bucketed gradient all-reduce (mean), zero 1 = that plus optimizer
   states partitioned by parameter over dp (owner steps, then broadcasts), zero 2/3 = FSDP2
   ``fully_shard`` per block and stage, ``reshard_after_forward`` False / True;
6. ``torch.distributed.pipelining`` schedules (GPipe, 1F1B, Interleaved1F1B) when pp > 1.

A tied embedding / lm_head (GPT) lives on the first and the last stage as two copies whose
gradients are summed over that pair of ranks (Megatron's embedding group), so they stay equal.
bf16 computes in bf16 with fp32 master weights and fp32 gradient reduction (FSDP2
``MixedPrecisionPolicy`` for zero >= 2, ``torch.autocast`` otherwise).

Checkpoints (``autoplan.runtime.checkpoint``) store the model's own names and layout (GPT's qkv
rows un-permuted), so they load into any other recipe, per-op plan or world size.

The model is changed in place: the modules of other pipeline ranks move to the meta device.
Under tp the embedding and lm_head are vocab-parallel and the loss runs under ``loss_parallel``.
Limits of this version: every rank first builds the whole model (no meta-device construction); dropout must be 0
under tp; a pipelined recipe keeps the global batch shape of its first step.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.parallel import SequenceParallel, loss_parallel, parallelize_module

from autoplan.errors import AutoplanError
from autoplan.runtime.recipe_dp import OptimizerFactory, ShardedOptimizer, all_reduce_mean, local_tensor
from autoplan.runtime.recipe_models import (
    Family,
    apply_recompute,
    build_stage,
    detect_family,
    head_checks,
    local_module,
    release_unused,
    tensor_parallel_block,
    unpermute_full,
    vocab_parallel_ends,
)

SCHEDULES = ("gpipe", "1f1b", "interleaved")
RECOMPUTE = ("none", "selective", "full")
DTYPES = ("fp32", "bf16")
_WRAPPED = "._checkpoint_wrapped_module"  # checkpoint_wrapper's prefix in parameter paths


@dataclass(frozen=True)
class Recipe:
    """A Megatron-style parallel training configuration; ``tp * pp * dp`` is the world size."""

    tp: int = 1
    """tensor-parallel size (Megatron column/row-parallel blocks)"""
    pp: int = 1
    """pipeline stages (pipeline ranks)"""
    dp: int = 1
    """data-parallel size"""
    schedule: str = "1f1b"
    """pipeline schedule: gpipe | 1f1b | interleaved (interleaved needs virtual_stages > 1)"""
    virtual_stages: int = 1
    """model chunks per pipeline rank (interleaved 1F1B)"""
    micro_batches: int = 1
    """micro-batches per pipeline per step (pp=1: gradient accumulation steps)"""
    recompute: str = "none"
    """activation recompute: none | selective (attention core) | full (every block)"""
    zero: int = 0
    """0 DDP, 1 optimizer states sharded, 2 + gradients, 3 + parameters (FSDP, reshard after forward)"""
    sequence_parallel: bool = False
    """shard norms and the residual stream along the sequence over tp"""
    dtype: str = "fp32"
    """fp32 | bf16 (bf16 compute; fp32 master weights, gradients reduced in fp32)"""
    stage_layers: tuple[int, ...] | None = None
    """blocks per (virtual) stage, in stage order; None = balanced (may differ by one)"""

    def __post_init__(self) -> None:
        for key in ("tp", "pp", "dp", "virtual_stages", "micro_batches"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise AutoplanError(f"recipe {key}={value!r} must be a positive integer, e.g. {key}=1")
        if self.schedule not in SCHEDULES:
            raise AutoplanError(f"recipe schedule={self.schedule!r} is unknown: use one of {', '.join(SCHEDULES)}")
        if self.recompute not in RECOMPUTE:
            raise AutoplanError(f"recipe recompute={self.recompute!r} is unknown: use one of {', '.join(RECOMPUTE)}")
        if self.dtype not in DTYPES:
            raise AutoplanError(f"recipe dtype={self.dtype!r} is unknown: use one of {', '.join(DTYPES)}")
        if isinstance(self.zero, bool) or self.zero not in (0, 1, 2, 3):
            raise AutoplanError(f"recipe zero={self.zero!r} must be 0, 1, 2 or 3")
        if self.schedule == "interleaved" and self.virtual_stages < 2:
            raise AutoplanError(f"schedule 'interleaved' needs virtual_stages > 1 (got {self.virtual_stages}): "
                                f"set virtual_stages=2 or use schedule '1f1b'")
        if self.schedule != "interleaved" and self.virtual_stages > 1:
            raise AutoplanError(f"virtual_stages={self.virtual_stages} needs schedule 'interleaved' "
                                f"(got {self.schedule!r}): set schedule='interleaved' or virtual_stages=1")
        if self.virtual_stages > 1 and self.pp < 2:
            raise AutoplanError(f"virtual_stages={self.virtual_stages} needs pp > 1 (got pp={self.pp}): set virtual_stages=1")
        if self.pp > 1 and self.schedule == "1f1b" and self.micro_batches < self.pp:
            raise AutoplanError(f"1F1B needs micro_batches >= pp: micro_batches({self.micro_batches}) < pp({self.pp}); "
                                f"use micro_batches={self.pp} or more, or schedule 'gpipe'")
        if self.schedule == "interleaved" and self.micro_batches % self.pp:
            raise AutoplanError(f"interleaved 1F1B needs micro_batches to be a multiple of pp: "
                                f"micro_batches({self.micro_batches}) % pp({self.pp}) != 0; use micro_batches={self.pp}")
        if self.stage_layers is not None:
            if not isinstance(self.stage_layers, tuple) or any(
                    isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in self.stage_layers):
                raise AutoplanError(f"recipe stage_layers={self.stage_layers!r} must be a tuple of positive block counts")
            if len(self.stage_layers) != self.num_stages:
                raise AutoplanError(f"recipe stage_layers has {len(self.stage_layers)} entries but pp({self.pp}) * "
                                    f"virtual_stages({self.virtual_stages}) = {self.num_stages} stages: give one count per stage")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def num_stages(self) -> int:
        """Pipeline stages in all (virtual stages included)."""
        return self.pp * self.virtual_stages

    @classmethod
    def from_json(cls, d: dict) -> Recipe:
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise AutoplanError(f"unknown recipe keys {unknown}: known keys are {[f.name for f in fields(cls)]}")
        kwargs = dict(d)
        if kwargs.get("stage_layers") is not None:
            kwargs["stage_layers"] = tuple(kwargs["stage_layers"])
        return cls(**kwargs)

    def to_json(self) -> dict:
        d = asdict(self)
        d["stage_layers"] = list(self.stage_layers) if self.stage_layers is not None else None
        return d


def recipe_from_estimate(cfg: Any, *, global_batch: int) -> Recipe:
    """The recipe that runs an ``autoplan.estimate.EstimateConfig`` (as priced) for ``global_batch`` samples.

    ``cfg.micro_batch`` is samples per micro-batch per dp rank; the recipe counts micro-batches.
    Interleaved 1F1B when ``virtual_stages > 1``, else 1F1B (GPipe when there are fewer
    micro-batches than stages, which 1F1B cannot run).
    """
    per_step = cfg.dp * cfg.micro_batch
    if global_batch % per_step:
        raise AutoplanError(f"global batch({global_batch}) is not a multiple of dp({cfg.dp}) * micro_batch({cfg.micro_batch})"
                            f" = {per_step}: change the batch or the micro-batch size")
    micro_batches = global_batch // per_step
    schedule = "interleaved" if cfg.virtual_stages > 1 else ("1f1b" if micro_batches >= cfg.pp else "gpipe")
    dtype = "bf16" if cfg.dtype in ("bf16", "fp16") else "fp32"  # fp16 runs as bf16 on CPU (no loss scaling here)
    return Recipe(tp=cfg.tp, pp=cfg.pp, dp=cfg.dp, schedule=schedule, virtual_stages=cfg.virtual_stages,
                  micro_batches=micro_batches, recompute=cfg.recompute, zero=cfg.zero,
                  sequence_parallel=bool(cfg.sequence_parallel) and cfg.tp > 1, dtype=dtype)


def split_layers(layers: int, stages: int) -> tuple[int, ...]:
    """Balanced blocks per stage; the extra blocks go to the last stages (the first stage of 1F1B
    holds the most micro-batches' activations and the embedding)."""
    if layers < stages:
        raise AutoplanError(f"layers({layers}) < pipeline stages({stages}): use fewer stages (pp * virtual_stages <= layers)")
    base, extra = divmod(layers, stages)
    return tuple(base + (1 if s >= stages - extra else 0) for s in range(stages))


def stage_block_ids(recipe: Recipe, layers: int) -> list[list[int]]:
    """Original block indices of every stage, in stage order."""
    counts = recipe.stage_layers or split_layers(layers, recipe.num_stages)
    if sum(counts) != layers:
        raise AutoplanError(f"recipe stage_layers {list(counts)} sum to {sum(counts)} but the model has {layers} blocks: "
                            f"make them sum to {layers}")
    ids, start = [], 0
    for n in counts:
        ids.append(list(range(start, start + n)))
        start += n
    return ids


def check_model(recipe: Recipe, family: Family) -> None:
    """Model-dependent requirements, as one-line errors naming the fix."""
    if recipe.num_stages > family.layers:
        raise AutoplanError(f"pp({recipe.pp}) * virtual_stages({recipe.virtual_stages}) = {recipe.num_stages} stages > "
                            f"layers({family.layers}): use fewer stages or a deeper model")
    for failed, message in head_checks(family, recipe.tp):
        if failed:
            raise AutoplanError(message)


# ------------------------------------------------------------------------------ apply


def _lm_loss(logits: torch.Tensor, targets: torch.Tensor, *, vocab_mesh: DeviceMesh | None = None) -> torch.Tensor:
    """Mean cross-entropy of (B, T, V) logits, in fp32 (as ``autoplan.inputs.cross_entropy``).

    With ``vocab_mesh`` the logits are this tp rank's vocabulary slice (B, T, V/tp) and the loss is
    computed under ``loss_parallel`` (which must also be active during backward)."""
    if vocab_mesh is None:
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))
    full = DTensor.from_local(logits.float(), vocab_mesh, [Shard(2)])
    loss = F.cross_entropy(full.flatten(0, 1), targets.reshape(-1))
    return loss.to_local() if isinstance(loss, DTensor) else loss


def _clean(path: str) -> str:
    return path.replace(_WRAPPED, "")


def apply_recipe(model: nn.Module, recipe: Recipe, *, optimizer: OptimizerFactory | None = None) -> RecipeModel:
    """Parallelize ``model`` (in place) by ``recipe`` on the current process group; call on every rank."""
    if not dist.is_initialized():
        raise AutoplanError("apply_recipe needs an initialised process group: launch with torchrun and call "
                            "torch.distributed.init_process_group first")
    world = dist.get_world_size()
    if world != recipe.world_size:
        raise AutoplanError(f"world size({world}) != tp({recipe.tp}) * pp({recipe.pp}) * dp({recipe.dp}) = "
                            f"{recipe.world_size}: launch {recipe.world_size} ranks or change the recipe")
    family = detect_family(model)
    check_model(recipe, family)
    blocks_of = stage_block_ids(recipe, family.layers)
    mesh = init_device_mesh("cpu", (recipe.pp, recipe.dp, recipe.tp), mesh_dim_names=("pp", "dp", "tp"))
    return RecipeModel(model, recipe, family, mesh, blocks_of, optimizer)


class RecipeModel:
    """A model parallelized by a :class:`Recipe`: ``train_step`` on the global batch, full states and gradients."""

    def __init__(self, model: nn.Module, recipe: Recipe, family: Family, mesh: DeviceMesh,
                 blocks_of: list[list[int]], optimizer: OptimizerFactory | None):
        self.recipe, self.family, self.mesh = recipe, family, mesh
        self.pp_rank = mesh.get_local_rank("pp")
        self.dp_rank = mesh.get_local_rank("dp")
        n = recipe.num_stages
        # canonical (deduplicated) names, their shapes, and the stage that reports each of them
        first_name: dict[int, str] = {}
        self.param_meta: dict[str, tuple[torch.Size, torch.dtype, bool]] = {}
        for name, p in model.named_parameters():
            first_name[id(p)] = name
            self.param_meta[name] = (p.shape, p.dtype, p.requires_grad)
        self.canonical = {path: first_name[id(p)] for path, p in model.named_parameters(remove_duplicate=False)}
        self.owner: dict[str, int] = {}
        all_stages = [build_stage(model, family, blocks_of[s], s == 0, s == n - 1) for s in range(n)]
        for s, stage in enumerate(all_stages):
            for path, _ in stage.named_parameters(remove_duplicate=False):
                self.owner.setdefault(self.canonical[path], s)
        self.stage_ids = [s for s in range(n) if s % recipe.pp == self.pp_rank]
        self.stages: list[nn.Module] = [all_stages[s] for s in self.stage_ids]
        release_unused(model, {id(p) for st in self.stages for p in st.parameters()})
        for stage in self.stages:
            self._parallelize(stage)
        self.params = list({id(p): p for st in self.stages for p in st.parameters()}.values())
        self.module = local_module(self.stages)  # this rank's parts under their original names
        self.plan: Any = None  # set by autoplan.apply when the recipe comes from a plan
        self.dp_group = mesh.get_group("dp")
        self.optimizer: Any = None
        if optimizer is not None:
            if recipe.zero == 1 and recipe.dp > 1:
                self.optimizer = ShardedOptimizer(self.params, optimizer, self.dp_group)
            else:
                self.optimizer = optimizer(self.params)
        vocab_mesh = mesh["tp"] if recipe.tp > 1 else None
        self._loss = functools.partial(_lm_loss, vocab_mesh=vocab_mesh)
        self._loss_context = loss_parallel if vocab_mesh is not None else contextlib.nullcontext
        self.tie_group = self._tie_group()
        self.schedule = self._schedule() if recipe.pp > 1 else None
        self._batch_shape: tuple[int, ...] | None = None

    # -------------------------------------------------------------- construction

    def _parallelize(self, stage: nn.Module) -> None:
        r, fam = self.recipe, self.family
        if r.tp > 1:
            tp_mesh = self.mesh["tp"]
            vocab_parallel_ends(stage, tp_mesh)
            for block in stage.blocks.values():
                tensor_parallel_block(block, fam, tp_mesh, sequence_parallel=r.sequence_parallel)
            if r.sequence_parallel:
                stage.sp_mesh = tp_mesh
                if stage.last:
                    parallelize_module(stage, tp_mesh, {"ln_f" if fam.name == "gpt" else "norm":
                                                        SequenceParallel(use_local_output=True)})
        apply_recompute(stage, r.recompute)
        if r.zero >= 2:
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if r.dtype == "bf16" \
                else MixedPrecisionPolicy()
            dp_mesh = self.mesh["dp"]
            for block in stage.blocks.values():
                fully_shard(block, mesh=dp_mesh, reshard_after_forward=r.zero == 3, mp_policy=mp)
            fully_shard(stage, mesh=dp_mesh, reshard_after_forward=r.zero == 3, mp_policy=mp)
        elif r.dtype == "bf16":
            stage.autocast_bf16 = True

    def _tie_group(self) -> dist.ProcessGroup | None:
        """Megatron's embedding group: the first and last pipeline rank of each (dp, tp) coordinate."""
        r = self.recipe
        if not self.family.tied or r.pp == 1:
            return None
        mine = None
        grid = self.mesh.mesh
        for d in range(r.dp):
            for t in range(r.tp):
                ranks = [int(grid[0, d, t]), int(grid[r.pp - 1, d, t])]
                group = dist.new_group(ranks)
                if dist.get_rank() in ranks:
                    mine = group
        return mine

    def _schedule(self) -> Any:
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

        r = self.recipe
        group = self.mesh.get_group("pp")
        pipe = [PipelineStage(st, s, r.num_stages, torch.device("cpu"), group=group)
                for s, st in zip(self.stage_ids, self.stages)]
        if r.schedule == "interleaved":
            return ScheduleInterleaved1F1B(pipe, r.micro_batches, loss_fn=self._loss)
        cls = Schedule1F1B if r.schedule == "1f1b" else ScheduleGPipe
        return cls(pipe[0], r.micro_batches, loss_fn=self._loss)

    # -------------------------------------------------------------- training

    def _check_batch(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        r = self.recipe
        if inputs.dim() != 2 or targets.shape != inputs.shape:
            raise AutoplanError(f"train_step wants (batch, seq) token ids and targets of the same shape, got "
                                f"{tuple(inputs.shape)} and {tuple(targets.shape)}")
        batch, seq = inputs.shape
        if batch % (r.dp * r.micro_batches):
            raise AutoplanError(f"global batch({batch}) is not divisible by dp({r.dp}) * micro_batches({r.micro_batches}) "
                                f"= {r.dp * r.micro_batches}: use a batch that is a multiple of it")
        if seq > self.family.max_seq:
            raise AutoplanError(f"sequence length({seq}) > the model's context({self.family.max_seq}): use shorter sequences")
        if r.sequence_parallel and r.tp > 1 and seq % r.tp:
            raise AutoplanError(f"sequence parallel needs seq({seq}) divisible by tp({r.tp}): pad or change seq")
        if self._batch_shape is not None and self._batch_shape != tuple(inputs.shape) and self.schedule is not None:
            raise AutoplanError(f"pipeline stages were set up for batches of shape {self._batch_shape}, got "
                                f"{tuple(inputs.shape)}: keep the global batch shape fixed")
        self._batch_shape = tuple(inputs.shape)

    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        """One step on the GLOBAL batch (the same on every rank); returns the global mean loss."""
        self._check_batch(inputs, targets)
        r = self.recipe
        for p in self.params:
            p.grad = None
        x = inputs.chunk(r.dp)[self.dp_rank]
        y = targets.chunk(r.dp)[self.dp_rank]
        loss_sum = torch.zeros((), dtype=torch.float64)
        with self._loss_context():  # vocab-parallel loss: forward and backward
            if self.schedule is None:
                stage = self.stages[0]
                for i, (xm, ym) in enumerate(zip(x.chunk(r.micro_batches), y.chunk(r.micro_batches))):
                    if isinstance(stage, FSDPModule):
                        stage.set_requires_gradient_sync(i == r.micro_batches - 1)
                    loss = self._loss(stage(xm), ym)
                    (loss / r.micro_batches).backward()
                    loss_sum += loss.detach().double()
            else:
                losses: list[torch.Tensor] = []
                has_first = 0 in self.stage_ids
                has_last = r.num_stages - 1 in self.stage_ids
                self.schedule.step(*((x,) if has_first else ()), target=y if has_last else None,
                                   losses=losses if has_last else None, return_outputs=False)
                for loss in losses:
                    loss_sum += loss.detach().double()
        self._sync_grads()
        if self.optimizer is not None:
            self.optimizer.step()
        dist.all_reduce(loss_sum)  # only last-stage ranks contribute; each (dp, tp) coordinate once per micro-batch
        return float(loss_sum) / (r.dp * r.tp * r.micro_batches)

    def _sync_grads(self) -> None:
        r = self.recipe
        for p in self.params:  # e.g. the vocab-parallel embedding's gradient comes back Replicate: keep this rank's rows
            if isinstance(p, DTensor) and isinstance(p.grad, DTensor) and p.grad.placements != p.placements:
                p.grad = p.grad.redistribute(p.device_mesh, p.placements)
        if r.zero < 2 and r.dp > 1:
            grads = [local_tensor(p.grad) for p in self.params if p.grad is not None]
            all_reduce_mean(grads, self.dp_group, r.dp)
        if self.tie_group is not None:
            tied = [p for st in self.stages for path, p in st.named_parameters()
                    if _clean(path) in ("tok_emb.weight", "lm_head.weight") and st.first != st.last]
            for p in tied:
                if p.grad is not None:
                    dist.all_reduce(local_tensor(p.grad), group=self.tie_group)

    # -------------------------------------------------------------- full views (collective)

    def _gather(self, pick: Callable[[nn.Parameter], torch.Tensor | None]) -> dict[str, torch.Tensor]:
        r = self.recipe
        local: dict[str, torch.Tensor] = {}
        for s, stage in zip(self.stage_ids, self.stages):
            for path, p in stage.named_parameters():
                name = self.canonical[_clean(path)]
                if self.owner[name] != s or name in local:
                    continue
                value = pick(p)
                if value is None:
                    value = torch.zeros(p.shape, dtype=p.dtype)
                value = value.full_tensor() if isinstance(value, DTensor) else value.detach().clone()
                local[name] = unpermute_full(name, value, self.family, r.tp)
        if r.pp == 1:
            return {name: local[name] for name in self.param_meta if name in local}
        out = {}
        group = self.mesh.get_group("pp")
        for name, (shape, dtype, _) in self.param_meta.items():
            src = self.owner[name] % r.pp
            t = local[name] if src == self.pp_rank else torch.empty(shape, dtype=dtype)
            dist.broadcast(t, group=group, group_src=src)
            out[name] = t
        return out

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Unsharded parameters under their original names, on every rank (collective)."""
        return self._gather(lambda p: p.detach())

    def full_grads(self) -> dict[str, torch.Tensor]:
        """Full gradients of the last train_step under the original names, on every rank (collective)."""
        return self._gather(lambda p: p.grad)

    # -------------------------------------------------------------- introspection

    def optimizer_state_numel(self) -> int:
        """Elements of optimizer state held by this rank (local shards)."""
        if self.optimizer is None:
            return 0
        return sum(local_tensor(v).numel() for st in self.optimizer.state.values() for v in st.values()
                   if isinstance(v, torch.Tensor) and v.dim() > 0)

    def local_param_numel(self) -> int:
        """Elements of parameters held by this rank right now (local shards)."""
        return sum(local_tensor(p).numel() for p in self.params)
