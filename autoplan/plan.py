"""The plan file: a versioned JSON document that says everything needed to run, and what it predicts.

Schema ``autoplan-plan/1`` (never pickle). Top-level keys:

* ``model``: name, fingerprint (parameter names/shapes and op kinds), parameter count, capture
  method, ops with no sharding rule (replicated);
* ``cluster``, ``world_size``, ``mesh`` (``shape``, ``axis_names``);
* ``training``: global batch, sequence length, micro-batches, recompute, dtype;
* ``params``: qualified parameter name -> placement per mesh axis (``"S(0)"``, ``"R"``);
* ``ops``: every op with its input and output placements, its predicted compute and memory;
* ``collectives``: the collectives the plan issues per step (phase, kind, mesh axis, bytes);
* ``predicted``, ``baselines``, ``runners_up``: step time (compute / communication / optimizer
  split, per layer), peak memory per device, MFU, fits;
* ``solver``: which solver ran, its time and optimality gap, and the search's size;
* ``execution``: how the runtime runs it: ``per-op`` (every op's placements, the ops above), or
  ``recipe`` (native TP x PP x DP, ZeRO, recompute; ``autoplan.execution``). A plan whose pipeline
  configuration won has a recipe and no per-op placements; ``per_op_alternative`` keeps the
  per-op solution's prediction beside it.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from autoplan.errors import AutoplanError

SCHEMA = "autoplan-plan/1"


@dataclass(frozen=True)
class Prediction:
    step_time_s: float  # one optimizer step (all micro-batches)
    compute_s: float  # forward + backward (+ recompute) compute
    comm_s: float  # exposed communication (activations resharding + gradient sync + FSDP gathers + the loss report)
    optimizer_s: float  # optimizer step
    peak_memory_bytes: float  # per device
    param_memory_bytes: float  # parameters, gradients, optimizer states
    activation_memory_bytes: float  # saved activations of one micro-batch
    mfu: float  # model FLOPs (no recompute) / (step time * devices * peak)
    fits: bool  # peak memory within the device's usable memory
    tokens_per_s: float | None = None  # LMs only
    mesh: dict[str, int] = field(default_factory=dict)
    micro_batches: int = 1
    recompute: str = "none"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(d: dict[str, Any]) -> "Prediction":
        """Missing numbers (a baseline that fits nowhere has no step time) come back as None."""
        values = {f.name: d.get(f.name) for f in fields(Prediction)}
        values = {k: v for k, v in values.items() if v is not None or k not in ("mesh", "micro_batches", "recompute")}
        return Prediction(**values)


@dataclass
class Plan:
    """A parallelization plan: load it, inspect it, apply it (``autoplan.apply``)."""

    data: dict[str, Any]

    @property
    def mesh(self) -> dict[str, int]:
        m = self.data["mesh"]
        return dict(zip(m["axis_names"], m["shape"]))

    @property
    def predicted(self) -> Prediction:
        return Prediction.from_json(self.data["predicted"])

    @property
    def baselines(self) -> dict[str, Prediction]:
        return {k: Prediction.from_json(v) for k, v in self.data.get("baselines", {}).items()}

    @property
    def world_size(self) -> int:
        return int(self.data["world_size"])

    @property
    def fingerprint(self) -> str:
        return self.data["model"]["fingerprint"]

    @property
    def params(self) -> dict[str, list[str]]:
        return self.data["params"]

    @property
    def ops(self) -> list[dict[str, Any]]:
        return self.data["ops"]

    def summary(self) -> dict[str, Any]:
        """The fields ``autoplan plan --json`` prints."""
        p = self.data["predicted"]
        return {
            "model": self.data["model"]["name"],
            "cluster": self.data["cluster"]["name"],
            "world_size": self.world_size,
            "mesh": self.mesh,
            "micro_batches": self.data["training"]["micro_batches"],
            "recompute": self.data["training"]["recompute"],
            "step_time_s": p["step_time_s"],
            "mfu": p["mfu"],
            "peak_memory_bytes": p["peak_memory_bytes"],
            "fits": p["fits"],
            "tokens_per_s": p.get("tokens_per_s"),
            "baselines": {
                k: {f: v.get(f) for f in ("step_time_s", "mfu", "peak_memory_bytes", "fits", "mesh", "micro_batches", "recompute")}
                for k, v in self.data.get("baselines", {}).items()
            },
            "solver": self.data["solver"],
            "unsupported_ops": self.data["model"].get("unsupported_ops", []),
            "pipeline_alternative": self.data.get("pipeline_alternative"),
            "execution": self.execution,
        }

    @property
    def execution(self) -> dict[str, Any]:
        """How the runtime runs the plan (``autoplan.execution``); plans from before it: per-op."""
        return self.data.get("execution") or {"runtime": "per-op"}

    def save(self, path: str | Path) -> None:
        """Write atomically: a crash never leaves a half-written plan behind."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=_json_default))
        tmp.replace(path)

    @staticmethod
    def load(path: str | Path) -> "Plan":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise AutoplanError(f"no plan file at {path}: make one with `autoplan plan ... -o {path}`") from None
        except json.JSONDecodeError as exc:
            raise AutoplanError(f"{path} is not valid JSON (line {exc.lineno}): re-run `autoplan plan`") from None
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            found = data.get("schema") if isinstance(data, dict) else type(data).__name__
            raise AutoplanError(f"{path} is not an autoplan plan (schema {found!r}, expected {SCHEMA})")
        return Plan(data)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"cannot serialise {type(obj).__name__}")
