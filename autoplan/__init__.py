"""autoplan: an automatic parallelization planner for PyTorch training.

    import autoplan
    plan = autoplan.plan("gpt2", cluster="dgx-h100", devices=8, global_batch=512, seq_len=1024)
    plan.predicted.step_time_s, plan.mesh
"""
__version__ = "0.1.0"

from autoplan.errors import AutoplanError  # noqa: E402
from autoplan.plan import Plan, Prediction  # noqa: E402


def plan(*args, **kwargs):  # noqa: D103 - documented in autoplan.api.plan
    from autoplan.api import plan as _plan

    return _plan(*args, **kwargs)


plan.__doc__ = "Plan the training of a model on a cluster (see autoplan.api.plan)."


def apply(*args, **kwargs):  # noqa: D103 - documented in autoplan.runtime.engine.apply
    from autoplan.runtime.engine import apply as _apply

    return _apply(*args, **kwargs)


def plan_and_train(*args, **kwargs):  # noqa: D103 - documented in autoplan.runtime.plan_and_train
    from autoplan.runtime import plan_and_train as _pt

    return _pt(*args, **kwargs)


apply.__doc__ = "Apply a plan to a model on every rank, with the engine the plan names (see autoplan.runtime.engine)."
plan_and_train.__doc__ = "Plan (or load a plan), apply, train, checkpoint (see autoplan.runtime.plan_and_train)."

__all__ = ["AutoplanError", "Plan", "Prediction", "apply", "plan", "plan_and_train", "__version__"]
