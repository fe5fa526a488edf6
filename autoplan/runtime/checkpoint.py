"""Checkpoints with ``torch.distributed.checkpoint`` (DCP): sharded, atomic, reshardable.

Layout: ``DIR/step-00000010/`` holds DCP's files and a ``COMPLETE`` marker (JSON: step, world
size, mesh). A checkpoint is written to ``DIR/.tmp-step-00000010``, marked, then renamed:
a run killed mid-save leaves only a ``.tmp-*`` directory, which is never loaded (and is
removed by the next save). Loading into another plan or world size reshards (DTensor).

Both engines write the same keys, so a checkpoint of one loads into the other:

* ``model.<name>``: every parameter under its original name (a tied one under each of its
  names, e.g. ``tok_emb.weight`` and ``lm_head.weight``), with its full (global) shape;
* ``optim.state.<name>.<key>``: optimizer state under the parameter's first name;
* ``optim.param_groups.<i>.<hyper-parameter>`` and ``.params`` (first names), as
  ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` writes them.

The per-op engine's state comes from ``get_model_state_dict`` / ``get_optimizer_state_dict``.
The recipe engine's (:class:`autoplan.runtime.recipe.RecipeModel`) is built here: each pipeline
rank contributes its stages' parameters (the tied embedding / head copy of the last stage under
``lm_head.weight``), each ZeRO-1 data-parallel rank the optimizer states it owns, FSDP2 and
tensor-parallel parameters their DTensor shards; GPT's fused qkv rows, permuted for tensor
parallelism, are stored in the model's own (canonical) order, so the checkpoint does not depend on tp.
Loading writes into the parameters and optimizer states in place.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    _init_optim_state,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor, Replicate

from autoplan.errors import AutoplanError

MARKER = "COMPLETE"


def _name(step: int) -> str:
    return f"step-{step:08d}"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _is_recipe(pm: Any) -> bool:
    return hasattr(pm, "recipe") and hasattr(pm, "stages")


def _state(pm: Any) -> dict[str, Any]:
    """The per-op engine's state (the whole model, DTensor parameters)."""
    state: dict[str, Any] = {"model": get_model_state_dict(pm.module)}
    if pm.optimizer is not None:
        state["optim"] = get_optimizer_state_dict(pm.module, pm.optimizer)
    return state


def _mesh_of(pm: Any) -> Any:
    plan = getattr(pm, "plan", None)
    if plan is not None:
        return plan.mesh
    r = pm.recipe
    return {"pp": r.pp, "dp": r.dp, "tp": r.tp}


def save_checkpoint(pm: Any, directory: str | Path, step: int) -> Path:
    """Save model and optimizer state at ``step`` (collective: call on every rank)."""
    root = Path(directory)
    final, tmp = root / _name(step), root / f".tmp-{_name(step)}"
    if _rank0():
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    state = RecipeState(pm, for_load=False).state if _is_recipe(pm) else _state(pm)
    dcp.save(state, checkpoint_id=str(tmp))
    _barrier()
    if _rank0():
        plan = getattr(pm, "plan", None)
        info = {"step": step, "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                "mesh": _mesh_of(pm), "fingerprint": plan.fingerprint if plan is not None else None,
                "engine": "recipe" if _is_recipe(pm) else "per-op"}
        marker = tmp / MARKER
        marker.write_text(json.dumps(info))
        with open(marker) as fh:
            os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    _barrier()
    return final


def _step_of(path: Path) -> int | None:
    try:
        return int(path.name.split("-", 1)[1])
    except (IndexError, ValueError):
        return None


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest complete checkpoint under ``directory`` (half-written ones are ignored)."""
    root = Path(directory)
    if not root.is_dir():
        return None
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and _step_of(p) is not None
            and (p / MARKER).is_file()]
    return max(done, key=lambda p: _step_of(p) or 0, default=None)


def checkpoint_info(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / MARKER).read_text())


def _one_line(exc: BaseException) -> str:
    """The first root cause of a (DCP) exception, on one line."""
    failures = getattr(exc, "failures", None)
    if failures:
        exc = next(iter(failures.values()))[0]
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text[:300] + ("..." if len(text) > 300 else "")


def load_checkpoint(pm: Any, directory: str | Path) -> int:
    """Load the newest complete checkpoint into ``pm`` (resharding as needed); returns its step."""
    path = latest_checkpoint(directory)
    if path is None:
        raise AutoplanError(f"no complete checkpoint under {directory}")
    info = checkpoint_info(path)
    plan = getattr(pm, "plan", None)
    if plan is not None and info.get("fingerprint") not in (None, plan.fingerprint):
        raise AutoplanError(f"the checkpoint at {path} is of another model (fingerprint {info['fingerprint']}): "
                            f"point --checkpoint-dir elsewhere")
    try:
        if _is_recipe(pm):
            loader = RecipeState(pm, for_load=True)
            dcp.load(loader.state, checkpoint_id=str(path))
            loader.finish()
        else:
            state = _state(pm)
            dcp.load(state, checkpoint_id=str(path))
            set_model_state_dict(pm.module, state["model"], options=StateDictOptions(strict=True))
            if pm.optimizer is not None and "optim" in state:
                set_optimizer_state_dict(pm.module, pm.optimizer, state["optim"])
    except AutoplanError:
        raise
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - DCP's errors are long and multi-line
        raise AutoplanError(f"the checkpoint at {path} does not fit this model and optimizer ({_one_line(exc)}): "
                            f"resume with the model and optimizer that wrote it, or point --checkpoint-dir elsewhere"
                            ) from exc
    return int(info["step"])


# ------------------------------------------------------------------------------ the recipe engine's state


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if isinstance(t, DTensor) else t  # noqa: SLF001 - the tensor this rank holds


class RecipeState:
    """The checkpoint state of a ``RecipeModel`` in the per-op engine's layout (see the module doc).

    ``state`` holds this rank's parameters and optimizer states themselves (DCP saves from and
    loads into them in place), except GPT's tensor-parallel qkv tensors: full canonical copies,
    permuted back into the local shard by :meth:`finish` after a load.
    """

    def __init__(self, rm: Any, *, for_load: bool):
        from autoplan.runtime.recipe import _clean
        from autoplan.runtime.recipe_dp import ShardedOptimizer

        self.rm, self.for_load = rm, for_load
        self._fixups: list[Callable[[], None]] = []
        opt = rm.optimizer
        inner = opt.inner if isinstance(opt, ShardedOptimizer) else opt
        self.inner: torch.optim.Optimizer | None = inner
        if for_load and inner is not None:
            _init_optim_state(inner)  # optimizer states exist before DCP loads into them
        opt_state = inner.state if inner is not None else {}
        model: dict[str, Any] = {}
        states: dict[str, dict[str, Any]] = {}
        self._opt_entries: list[tuple[torch.Tensor, str, str]] = []  # (param, canonical name, key) of non-tensor states
        self._names: dict[int, str] = {}
        for s, stage in zip(rm.stage_ids, rm.stages):
            for raw, p in stage.named_parameters(remove_duplicate=False):
                path = _clean(raw)
                name = rm.canonical[path]
                self._names[id(p)] = name
                if path not in model:
                    model[path] = self._canonical(path, p.detach())
                st = opt_state.get(p)
                if st is None or name in states or (not for_load and rm.owner[name] != s):
                    continue  # a tied copy's state is saved once (by the stage that owns it), loaded by both
                states[name] = {}
                for key, value in st.items():
                    if isinstance(value, torch.Tensor):
                        states[name][key] = self._canonical(name, value) if value.dim() > 0 else value
                    else:
                        states[name][key] = value
                        self._opt_entries.append((p, name, key))
        self._states = states
        self.state: dict[str, Any] = {"model": model}
        if opt is not None:
            self.state["optim"] = {"state": states, "param_groups": self._param_groups()}

    # qkv under tensor parallelism: full canonical copies
    def _permuted(self, name: str) -> bool:
        rm = self.rm
        return (rm.family.name == "gpt" and rm.recipe.tp > 1
                and name.endswith((".attn.qkv.weight", ".attn.qkv.bias")))

    def _canonical(self, name: str, t: torch.Tensor) -> torch.Tensor:
        if not self._permuted(name):
            return t
        from autoplan.runtime.recipe_models import qkv_permutation, unpermute_full

        if not self.for_load:
            full = t.full_tensor() if isinstance(t, DTensor) else t
            return unpermute_full(name, full.detach().clone(), self.rm.family, self.rm.recipe.tp)
        buf = torch.empty(t.shape, dtype=t.dtype)  # DTensor.shape is the global one

        def write_back() -> None:
            permuted = buf[qkv_permutation(buf.size(0) // 3, self.rm.recipe.tp)]
            if isinstance(t, DTensor):
                mesh = t.device_mesh
                shard = DTensor.from_local(permuted, mesh, [Replicate()] * mesh.ndim, run_check=False)
                value = shard.redistribute(mesh, t.placements).to_local()
            else:
                value = permuted
            with torch.no_grad():
                _local(t).copy_(value)

        self._fixups.append(write_back)
        return buf

    def _param_groups(self) -> list[dict[str, Any]]:
        """Hyper-parameters of every group and the first names of all its parameters (over all ranks)."""
        local: list[tuple[dict[str, Any], list[str]]] = []
        if self.inner is not None:
            for g in self.inner.param_groups:
                local.append(({k: v for k, v in g.items() if k != "params"}, [self._names[id(p)] for p in g["params"]]))
        everyone: list[Any] = [local]
        if dist.is_initialized() and dist.get_world_size() > 1:
            everyone = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, local)
        groups = []
        for i in range(max(len(x) for x in everyone)):
            have = [x[i] for x in everyone if len(x) > i]
            names = set().union(*(set(h[1]) for h in have))
            groups.append({**have[0][0], "params": [n for n in self.rm.param_meta if n in names]})
        return groups

    def finish(self) -> None:
        """After ``dcp.load``: permute qkv copies into place, restore non-tensor states and hyper-parameters."""
        for fix in self._fixups:
            fix()
        if self.inner is None:
            return
        for p, name, key in self._opt_entries:
            self.inner.state[p][key] = self._states[name][key]
        loaded = self.state["optim"]["param_groups"]
        for group, saved in zip(self.inner.param_groups, loaded):
            for key, value in saved.items():
                if key != "params":
                    group[key] = value


__all__ = ["MARKER", "RecipeState", "checkpoint_info", "latest_checkpoint", "load_checkpoint", "save_checkpoint"]
