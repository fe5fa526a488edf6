"""Model adapters of the recipe runtime: pipeline stage modules and tensor-parallel plans per family.

A stage module holds *references* to the original model's submodules (no copies): the
embedding part on the first stage, a range of blocks, the final norm and the head on the last
stage. Its parameter paths are the original ones (``blocks`` is a ``ModuleDict`` keyed by the
original block index), so ``blocks.3.attn.qkv.weight`` means the same parameter in both.

Tensor parallel follows Megatron-LM: column-parallel qkv / fc (w1, w3, wq, wk, wv), row-parallel
proj / wo / w2; the attention modules' head-count attributes are set to the local counts
(as torchtitan does). GPT's fused qkv weight is permuted before it is sharded so that tp rank r
holds ``[q_r; k_r; v_r]`` (:func:`qkv_permutation`); the full state undoes the permutation.
Embedding and lm_head are vocab-parallel (:func:`vocab_parallel_ends`).

Recompute (:func:`apply_recompute`): ``full`` wraps every block in ``checkpoint_wrapper``;
``selective`` wraps each attention module with a selective-checkpoint policy that saves the
projections' matmuls and the collectives and recomputes everything else in it (SDPA, reshapes, rotary).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from autoplan.errors import AutoplanError
from autoplan.models.gpt import GPT
from autoplan.models.gpt import MLP as GPTMLP
from autoplan.models.gpt import CausalSelfAttention
from autoplan.models.llama import Attention as LlamaAttention
from autoplan.models.llama import FeedForward as LlamaFeedForward
from autoplan.models.llama import Llama

ATTENTION_CLASSES = (CausalSelfAttention, LlamaAttention)  # recomputed by recompute="selective"
MLP_CLASSES = (GPTMLP, LlamaFeedForward)


@dataclass(frozen=True)
class Family:
    """What the recipe runtime needs to know about a supported model."""

    name: str  # "gpt" | "llama"
    layers: int  # transformer blocks
    heads: int  # query heads
    kv_heads: int  # key/value heads (== heads for GPT)
    ffn: int  # MLP inner width (column-parallel over tp)
    vocab: int
    max_seq: int  # longest sequence the position embedding / rotary tables cover
    dropout: float
    tied: bool  # lm_head.weight is tok_emb.weight


def detect_family(model: nn.Module) -> Family:
    """The adapter family of ``model``; a one-line error for anything else."""
    if isinstance(model, GPT):
        c = model.config
        return Family("gpt", c.layers, c.heads, c.heads, 4 * c.hidden, c.vocab, c.seq, c.dropout,
                      model.lm_head.weight is model.tok_emb.weight)
    if isinstance(model, Llama):
        c = model.config
        return Family("llama", c.layers, c.heads, c.kv_heads, c.ffn, c.vocab, c.seq, 0.0,
                      model.lm_head.weight is model.tok_emb.weight)
    raise AutoplanError(
        f"the recipe runtime supports the zoo's GPT and Llama models, not {type(model).__name__}: "
        f"build the model with autoplan.models.resolve_model(...) or run a per-op plan with autoplan.runtime.apply"
    )


# ------------------------------------------------------------------------------ stage modules


class _Stage(nn.Module):
    """Common part: blocks by original index; optional sequence-parallel scatter/gather."""

    def __init__(self, model: nn.Module, block_ids: list[int], first: bool, last: bool):
        super().__init__()
        self.first, self.last = first, last
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in block_ids})
        self.sp_mesh: DeviceMesh | None = None  # set by sequence parallel: activations are (B, T/tp, C) between blocks
        self.autocast_bf16 = False  # recipe dtype bf16 without FSDP mixed precision

    def _scatter_seq(self, x: torch.Tensor) -> torch.Tensor:
        if self.sp_mesh is None:
            return x
        return DTensor.from_local(x, self.sp_mesh, [Replicate()]).redistribute(self.sp_mesh, [Shard(1)]).to_local()

    def _gather_seq(self, x: torch.Tensor) -> torch.Tensor:
        if self.sp_mesh is None:
            return x
        return DTensor.from_local(x, self.sp_mesh, [Shard(1)]).redistribute(self.sp_mesh, [Replicate()]).to_local()

    def _full_seq(self, local_seq: int) -> int:
        return local_seq * (self.sp_mesh.size() if self.sp_mesh is not None else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast_bf16):
            return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class GPTStage(_Stage):
    """``forward(idx (B, T) on the first stage | hidden (B, T, C)) -> hidden | logits on the last stage``."""

    def __init__(self, model: GPT, block_ids: list[int], first: bool, last: bool):
        super().__init__(model, block_ids, first, last)
        if first:
            self.tok_emb, self.pos_emb, self.drop = model.tok_emb, model.pos_emb, model.drop
        if last:
            self.ln_f, self.lm_head = model.ln_f, model.lm_head

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first:
            pos = torch.arange(x.size(1), device=x.device)
            x = self._scatter_seq(self.drop(self.tok_emb(x) + self.pos_emb(pos)))
        for block in self.blocks.values():
            x = block(x)
        if self.last:
            return self.lm_head(self._gather_seq(self.ln_f(x)))
        return x


class LlamaStage(_Stage):
    """As :class:`GPTStage`; every stage holds the rotary tables (buffers, not parameters)."""

    rope_cos: torch.Tensor
    rope_sin: torch.Tensor

    def __init__(self, model: Llama, block_ids: list[int], first: bool, last: bool):
        super().__init__(model, block_ids, first, last)
        self.register_buffer("rope_cos", model.rope_cos, persistent=False)
        self.register_buffer("rope_sin", model.rope_sin, persistent=False)
        if first:
            self.tok_emb = model.tok_emb
        if last:
            self.norm, self.lm_head = model.norm, model.lm_head

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first:
            seq = x.size(1)
            x = self._scatter_seq(self.tok_emb(x))
        else:
            seq = self._full_seq(x.size(1))
        cos, sin = self.rope_cos.narrow(0, 0, seq), self.rope_sin.narrow(0, 0, seq)
        for block in self.blocks.values():
            x = block(x, cos, sin)
        if self.last:
            return self.lm_head(self._gather_seq(self.norm(x)))
        return x


def build_stage(model: nn.Module, family: Family, block_ids: list[int], first: bool, last: bool) -> _Stage:
    cls = GPTStage if family.name == "gpt" else LlamaStage
    return cls(model, block_ids, first, last)  # type: ignore[arg-type]


def local_module(stages: list[_Stage]) -> nn.Module:
    """One module holding this rank's stage parts under their original names (``tok_emb``,
    ``blocks.<i>``, ``ln_f`` / ``norm``, ``lm_head``), e.g. for ``model.state_dict()``-style views."""
    root = nn.Module()
    blocks: dict[str, nn.Module] = {}
    for stage in stages:
        for name, child in stage.named_children():
            if name == "blocks":
                blocks.update(child.items())  # type: ignore[union-attr]
            else:
                setattr(root, name, child)
    root.blocks = nn.ModuleDict({k: blocks[k] for k in sorted(blocks, key=int)})
    return root


def release_unused(model: nn.Module, keep: set[int]) -> None:
    """Move the parts of ``model`` that no local stage uses (no parameter id in ``keep``) to the meta
    device, so a pipeline rank holds about 1/pp of the weights. Shared (tied) parameters stay."""
    parts = [*model.blocks, *(child for name, child in model.named_children() if name != "blocks")]
    for part in parts:
        params = list(part.parameters())
        if params and all(id(p) not in keep for p in params):
            part.to("meta")


# ------------------------------------------------------------------------------ tensor parallel


def qkv_permutation(hidden: int, tp: int) -> torch.Tensor:
    """Row order of GPT's fused qkv weight (3C x C) such that a contiguous tp shard r is [q_r; k_r; v_r].

    ``w_tp = w[perm]``; the original is ``w_tp[inverse_permutation(perm)]``.
    """
    if hidden % tp:
        raise AutoplanError(f"hidden({hidden}) is not divisible by tp({tp}): pick tp dividing the model width")
    part = hidden // tp
    rows = [torch.arange(which * hidden + r * part, which * hidden + (r + 1) * part)
            for r in range(tp) for which in range(3)]
    return torch.cat(rows)


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel())
    return inv


def _permute_qkv_(block: nn.Module, tp: int) -> None:
    qkv = block.attn.qkv
    perm = qkv_permutation(block.attn.hidden, tp)
    with torch.no_grad():
        qkv.weight.copy_(qkv.weight[perm])
        if qkv.bias is not None:
            qkv.bias.copy_(qkv.bias[perm])


def tensor_parallel_block(block: nn.Module, family: Family, mesh: DeviceMesh, *, sequence_parallel: bool) -> None:
    """Megatron TP (optionally with sequence parallel) of one block, in place."""
    tp = mesh.size()
    out = Shard(1) if sequence_parallel else Replicate()
    if family.name == "gpt":
        _permute_qkv_(block, tp)
        plan: dict[str, object] = {
            "attn.qkv": ColwiseParallel(), "attn.proj": RowwiseParallel(output_layouts=out),
            "mlp.fc": ColwiseParallel(), "mlp.proj": RowwiseParallel(output_layouts=out),
        }
        norms, attn_args = ("ln1", "ln2"), 1
    else:
        plan = {
            "attn.wq": ColwiseParallel(), "attn.wk": ColwiseParallel(), "attn.wv": ColwiseParallel(),
            "attn.wo": RowwiseParallel(output_layouts=out),
            "mlp.w1": ColwiseParallel(), "mlp.w3": ColwiseParallel(), "mlp.w2": RowwiseParallel(output_layouts=out),
        }
        norms, attn_args = ("attn_norm", "mlp_norm"), 3
    if sequence_parallel:
        for norm in norms:
            plan[norm] = SequenceParallel(use_local_output=True)
        rest: tuple[None, ...] = (None,) * (attn_args - 1)
        plan["attn"] = PrepareModuleInput(input_layouts=(Shard(1), *rest), desired_input_layouts=(Replicate(), *rest),
                                          use_local_output=True)
        plan["mlp"] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                         use_local_output=True)
    parallelize_module(block, mesh, plan)  # type: ignore[arg-type]
    attn = block.attn
    attn.heads //= tp  # the local attention sees the local head count (as torchtitan)
    if family.name == "gpt":
        attn.hidden //= tp  # split size of the local fused qkv output
    else:
        attn.kv_heads //= tp


def vocab_parallel_ends(stage: _Stage, mesh: DeviceMesh) -> None:
    """Megatron's vocab-parallel embedding (rows of the table over tp, partial sums all-reduced) and
    lm_head (column-parallel: each tp rank computes a vocabulary slice of the logits; the loss runs
    under ``loss_parallel``). Both shard the (V, C) weight on dim 0, so a tie stays one parameter."""
    plan: dict[str, object] = {}
    if stage.first:
        plan["tok_emb"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    if stage.last:
        plan["lm_head"] = ColwiseParallel(input_layouts=Replicate(), output_layouts=Shard(-1))
    tied = stage.first and stage.last and stage.lm_head.weight is stage.tok_emb.weight
    parallelize_module(stage, mesh, plan)  # type: ignore[arg-type]
    if tied:
        stage.lm_head.weight = stage.tok_emb.weight  # both are Shard(0) over tp: the same local rows


def unpermute_full(name: str, value: torch.Tensor, family: Family, tp: int) -> torch.Tensor:
    """Undo :func:`_permute_qkv_` on a full (unsharded) GPT qkv weight/bias or its gradient."""
    if family.name != "gpt" or tp == 1 or not name.endswith((".attn.qkv.weight", ".attn.qkv.bias")):
        return value
    return value[inverse_permutation(qkv_permutation(value.size(0) // 3, tp))]


def head_checks(family: Family, tp: int) -> list[tuple[bool, str]]:
    """(failed, message) pairs for the model-dependent tensor-parallel requirements."""
    what = "heads" if family.name == "gpt" else "heads and kv_heads"
    return [
        (family.heads % tp != 0 or family.kv_heads % tp != 0,
         f"tp({tp}) does not divide {what} (heads={family.heads}, kv_heads={family.kv_heads}): "
         f"pick tp dividing the head counts"),
        (family.ffn % tp != 0, f"tp({tp}) does not divide the MLP width({family.ffn}): pick tp dividing it"),
        (family.vocab % tp != 0, f"tp({tp}) does not divide the vocabulary({family.vocab}) of the vocab-parallel "
                                 f"embedding and head: pad the vocabulary to a multiple of tp"),
        (tp > 1 and family.dropout > 0,
         f"dropout={family.dropout} under tp({tp}) would draw different masks on the tp ranks: build the model with dropout=0"),
    ]


# ------------------------------------------------------------------------------ recompute


_SAVED_IN_SELECTIVE = {
    torch.ops.aten.mm.default, torch.ops.aten.addmm.default,  # the q/k/v and output projections
    torch.ops._c10d_functional.all_gather_into_tensor.default, torch.ops._c10d_functional.reduce_scatter_tensor.default,
    torch.ops._c10d_functional.all_reduce.default, torch.ops._c10d_functional.wait_tensor.default,
}


def _attention_core_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """Selective recompute: keep the projections and collectives, recompute SDPA and what surrounds it."""
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_IN_SELECTIVE else CheckpointPolicy.PREFER_RECOMPUTE


def apply_recompute(stage: nn.Module, mode: str) -> None:
    if mode == "full":
        for key, block in list(stage.blocks.items()):
            stage.blocks[key] = checkpoint_wrapper(block)
    elif mode == "selective":
        context = functools.partial(create_selective_checkpoint_contexts, _attention_core_policy)
        for block in stage.blocks.values():
            block.attn = checkpoint_wrapper(block.attn, context_fn=context)
