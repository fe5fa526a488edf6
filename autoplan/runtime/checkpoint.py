"""Checkpoints with ``torch.distributed.checkpoint`` (DCP): sharded, atomic, reshardable.

Layout: ``DIR/step-00000010/`` holds DCP's files and a ``COMPLETE`` marker (JSON: step, world
size, mesh). A checkpoint is written to ``DIR/.tmp-step-00000010``, marked, then renamed:
a run killed mid-save leaves only a ``.tmp-*`` directory, which is never loaded (and is
removed by the next save). Loading into another plan or world size reshards (DTensor).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from autoplan.errors import AutoplanError

MARKER = "COMPLETE"


def _name(step: int) -> str:
    return f"step-{step:08d}"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _state(pm: Any) -> dict[str, Any]:
    state: dict[str, Any] = {"model": get_model_state_dict(pm.module)}
    if pm.optimizer is not None:
        state["optim"] = get_optimizer_state_dict(pm.module, pm.optimizer)
    return state


def save_checkpoint(pm: Any, directory: str | Path, step: int) -> Path:
    """Save model and optimizer state at ``step`` (collective: call on every rank)."""
    root = Path(directory)
    final, tmp = root / _name(step), root / f".tmp-{_name(step)}"
    if _rank0():
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    dcp.save(_state(pm), checkpoint_id=str(tmp))
    _barrier()
    if _rank0():
        info = {"step": step, "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                "mesh": pm.plan.mesh, "fingerprint": pm.plan.fingerprint}
        marker = tmp / MARKER
        marker.write_text(json.dumps(info))
        with open(marker) as fh:
            os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    _barrier()
    return final


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest complete checkpoint under ``directory`` (half-written ones are ignored)."""
    root = Path(directory)
    if not root.is_dir():
        return None
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / MARKER).is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def checkpoint_info(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / MARKER).read_text())


def load_checkpoint(pm: Any, directory: str | Path) -> int:
    """Load the newest complete checkpoint into ``pm`` (resharding as needed); returns its step."""
    path = latest_checkpoint(directory)
    if path is None:
        raise AutoplanError(f"no complete checkpoint under {directory}")
    info = checkpoint_info(path)
    if info.get("fingerprint") not in (None, pm.plan.fingerprint):
        raise AutoplanError(f"the checkpoint at {path} is of another model (fingerprint {info['fingerprint']}): "
                            f"point --checkpoint-dir elsewhere")
    state = _state(pm)
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(pm.module, state["model"], options=StateDictOptions(strict=True))
    if pm.optimizer is not None and "optim" in state:
        set_optimizer_state_dict(pm.module, pm.optimizer, state["optim"])
    return int(info["step"])
