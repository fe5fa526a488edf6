"""Runtime: apply a plan with DTensor, train it, checkpoint it, launch it (``autoplan train``)."""
from autoplan.runtime.apply import ParallelModel, apply

__all__ = ["ParallelModel", "apply", "plan_and_train"]


def plan_and_train(*args, **kwargs):  # noqa: D103 - documented in autoplan.runtime.train
    from autoplan.runtime.train import plan_and_train as _impl

    return _impl(*args, **kwargs)


plan_and_train.__doc__ = "Plan (or load a plan), apply it, train and checkpoint (see autoplan.runtime.train)."
