"""Shared by the torchrun workers in this folder (on PYTHONPATH when the tests launch them)."""
from __future__ import annotations

import json
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist


def token_batches(n: int = 3, batch: int = 8, seq: int = 32, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` (inputs, next-token targets) batches of random tokens below 256, the same on every rank."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(0, 256, (batch, seq + 1), generator=gen)
        out.append((x[:, :-1].contiguous(), x[:, 1:].contiguous()))
    return out


def error_of(fn: Callable[[], Any]) -> str:
    """What ``fn`` raised, as the tests compare it: an AutoplanError's message, anything else marked."""
    from autoplan.errors import AutoplanError

    try:
        fn()
        return "no error"
    except AutoplanError as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - reported
        return f"NOT AutoplanError: {type(exc).__name__}: {exc}"


def run_cases(cases: list[str], run: Callable[[str], dict], out_path: str, extra: list[dict] | None = None) -> None:
    """Run every case (an exception is reported as that case's error), then rank 0 writes the report."""
    report = []
    for case in cases:
        try:
            report.append(run(case))
        except Exception as exc:  # noqa: BLE001 - reported per case
            report.append({"case": case.split("|")[0], "error": f"{type(exc).__name__}: {exc}",
                           "traceback": traceback.format_exc()[-3000:]})
        dist.barrier()
    report += extra() if callable(extra) else (extra or [])
    if dist.get_rank() == 0:
        with open(out_path, "w") as fh:
            json.dump(report, fh, indent=1)
