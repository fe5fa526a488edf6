"""User-facing errors: one line that names the problem and the fix.

The CLI prints ``str(err)`` and exits with code 2; the Python API raises these as is.
"""
from __future__ import annotations


class AutoplanError(Exception):
    """Base class for every error autoplan reports to a user (never a bare traceback)."""


class CaptureError(AutoplanError):
    """The model could not be traced or its shapes could not be propagated."""


class UnknownModelError(AutoplanError):
    """A model spec names no zoo model, family or importable factory."""


class UnknownClusterError(AutoplanError):
    """A cluster name or path names no hardware profile."""


class InfeasibleError(AutoplanError):
    """No plan fits in device memory.

    ``min_memory_bytes`` is the smallest peak memory per device that any plan in the search
    space needs, so the message can say how much memory would be enough.
    """

    def __init__(self, message: str, *, min_memory_bytes: float | None = None):
        super().__init__(message)
        self.min_memory_bytes = min_memory_bytes


class PlanMismatchError(AutoplanError):
    """A plan is applied to another model or another world size than it was made for."""
