"""Measure the machine (``autoplan profile``) and feed the measurements to the cost model.

* ``measure``: the multi-rank worker (matmul, memory bandwidth, collectives) and the profile writer;
* ``tables``: smoothing and interpolation of measured curves, and ``source_of(cluster)``;
* ``ops``: op-level timing of a model's local shapes, cached in JSON;
* ``command``: the click command ``profile``.

Kept import-light: ``autoplan.hardware`` imports ``autoplan.profiler.tables``.
"""
from autoplan.profiler.tables import source_of

__all__ = ["source_of"]
