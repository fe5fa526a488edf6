"""``autoplan.apply``: run a plan with the engine its ``execution`` names (see ``autoplan.execution``).

* ``per-op``: ``autoplan.runtime.apply`` (fx interpreter over DTensor, any captured model);
* ``recipe``: ``autoplan.runtime.recipe`` (native TP x PP x DP, ZeRO, recompute) for the model
  structures it knows. A per-op plan lowered to a recipe falls back to the per-op engine when the
  model is not one of them; a pipeline plan has no per-op form and says so.

Both engines check the plan against the model (fingerprint) and the process group (world size)
before touching a parameter, and return an object with ``train_step``, ``full_state_dict``,
``full_grads``, ``module``, ``optimizer`` and ``plan``.
"""
from __future__ import annotations

from typing import Any

import torch.nn as nn

from autoplan.errors import AutoplanError
from autoplan.inputs import LossFn
from autoplan.plan import Plan
from autoplan.runtime.apply import OptimizerFactory
from autoplan.runtime.apply import apply as apply_per_op

RUNTIMES = ("auto", "per-op", "recipe")


def recipe_supports(model: nn.Module) -> str | None:
    """None if the recipe engine knows ``model``'s structure, else why not (one line)."""
    from autoplan.runtime.recipe_models import detect_family

    try:
        detect_family(model)
    except AutoplanError as exc:
        return str(exc)
    return None


def _check_model(model: nn.Module, plan: Plan, example_inputs: Any) -> None:
    """The per-op engine's fingerprint and world-size checks, for a plan the recipe engine runs."""
    import torch.distributed as dist

    from autoplan.graph import build_graph
    from autoplan.runtime.apply import check_plan, recapture

    if not dist.is_initialized():
        raise AutoplanError("autoplan.apply needs an initialised process group: run under torchrun and call "
                            "torch.distributed.init_process_group('gloo') first")
    check_plan(plan, build_graph(recapture(model, plan, example_inputs)), dist.get_world_size())


def apply(model: nn.Module, plan: Plan | str, *, optimizer: OptimizerFactory | None = None,
          example_inputs: Any = None, loss_fn: LossFn | None = None, runtime: str = "auto") -> Any:
    """Distribute ``model`` per ``plan`` on the current process group (call on every rank).

    ``runtime``: ``auto`` (the plan's execution, falling back to per-op where the plan allows),
    ``per-op`` or ``recipe`` (force one engine; an error if the plan has no such form).
    """
    if runtime not in RUNTIMES:
        raise AutoplanError(f"unknown runtime {runtime!r}: use one of {', '.join(RUNTIMES)}")
    plan = plan if isinstance(plan, Plan) else Plan.load(plan)
    ex = plan.execution
    if runtime == "per-op" or (runtime == "auto" and ex["runtime"] == "per-op"):
        if not plan.ops:
            raise AutoplanError("this plan is a pipeline plan with no per-op form: run it with runtime='auto' or 'recipe'")
        return apply_per_op(model, plan, optimizer=optimizer, example_inputs=example_inputs, loss_fn=loss_fn)
    if ex["runtime"] != "recipe":
        raise AutoplanError("this plan has no recipe form (its execution is per-op): run it with runtime='auto' or 'per-op'")
    why = recipe_supports(model)
    if why is not None:
        if runtime == "auto" and ex.get("fallback") == "per-op" and plan.ops:
            return apply_per_op(model, plan, optimizer=optimizer, example_inputs=example_inputs, loss_fn=loss_fn)
        raise AutoplanError(why)
    from autoplan.runtime.recipe import Recipe, apply_recipe

    _check_model(model, plan, example_inputs)
    rm = apply_recipe(model, Recipe.from_json(ex["recipe"]), optimizer=optimizer)
    rm.plan = plan
    return rm


__all__ = ["RUNTIMES", "apply", "recipe_supports"]
