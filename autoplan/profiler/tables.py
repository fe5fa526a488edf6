"""Measured curves: monotone smoothing, log-space interpolation, and the tables the cost model reads.

A *curve* is a list of (size, achieved rate) points measured by ``autoplan profile``: bytes and
bus bandwidth for a collective, FLOPs and FLOP/s for a matmul, bytes and bytes/s for a copy.
Measurements are noisy, so a curve is smoothed before use:

1. the rates are made non-decreasing in size by isotonic regression (pool-adjacent-violators, on
   log(rate), each point weighted by its size): a larger message never gets a lower bus
   bandwidth than a smaller one, and the rate stays at its plateau once reached. Where caches
   make mid sizes faster than large ones (CPU copies, gloo on loopback), the pooled plateau is
   dominated by the large sizes, which are the less noisy measurements and the ones that cost;
2. the implied times (size / rate) are made non-decreasing too (a larger message never takes
   less time); this keeps the rates non-decreasing.

Between measured sizes, log(time) is interpolated linearly in log(size) (equivalently log(rate)).
Below the smallest size, a collective's time is that of the smallest (its latency: the smallest
measured message is latency-bound); a matmul or a copy keeps the smallest size's rate (its time
shrinks with the work: the smallest measured size is not latency-bound, and a floor there would
price every small elementwise op like an 8 MiB copy). Above the largest
size x_L the time is ``x / plateau + floor_s * min(1, (x - x_L) / x_L)``: continuous at x_L and,
from 2 x_L on, affine with slope 1/plateau and intercept ``floor_s``. ``floor_s`` is the fixed
cost of one call: the smallest measured time for a collective (its latency), 0 for compute and
copies (whose smallest measured size is not latency-bound). The cost model fits every cost as
affine in the batch at a very large batch (``autoplan.cost.model._fit``), so batch-proportional
collectives and ops see the plateau rate plus that intercept; costs that do not grow with the
batch (gradient all-reduces, FSDP gathers: parameter-sized) see the curve at their true size.

Tables are immutable and hashable: a ``Link`` carrying them is a key of the cost model's
``lru_cache`` s, so two profiles with the same analytic numbers and different curves never
share cached prices. This module imports nothing heavier than ``math``, because
``autoplan.hardware`` imports it.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

COLLECTIVE_KINDS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv")


def bus_factor(kind: str, n: int) -> float:
    """Bytes through each device per byte of buffer (nccl-tests' busbw convention)."""
    if kind == "send_recv":
        return 1.0
    if n <= 1:
        return 0.0
    return 2.0 * (n - 1) / n if kind == "all_reduce" else (n - 1) / n


def isotonic_increasing(values: Sequence[float], weights: Sequence[float] | None = None) -> list[float]:
    """Least-squares non-decreasing fit (pool adjacent violators)."""
    w = list(weights) if weights is not None else [1.0] * len(values)
    blocks: list[list[float]] = []  # [mean, weight, count]
    for v, wi in zip(values, w):
        blocks.append([float(v), float(wi), 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, w2, c2 = blocks.pop()
            m1, w1, c1 = blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, c1 + c2])
    out: list[float] = []
    for m, _, c in blocks:
        out.extend([m] * c)
    return out


def smooth(sizes: Sequence[float], rates: Sequence[float]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Sorted, de-duplicated sizes and monotone rates (see the module docstring)."""
    pts: dict[float, list[float]] = {}
    for s, r in zip(sizes, rates):
        if s > 0 and r > 0 and math.isfinite(s) and math.isfinite(r):
            pts.setdefault(float(s), []).append(float(r))
    if not pts:
        raise ValueError("a measured curve needs at least one point with positive size and rate")
    xs = sorted(pts)
    # several measurements at one size: their geometric mean. Points are weighted by size: a
    # large measurement lasts longer (less relative noise) and stands for more of a step's time,
    # so when caches make mid sizes faster than large ones, the plateau follows the large sizes.
    logs = [sum(math.log(r) for r in pts[x]) / len(pts[x]) for x in xs]
    iso = isotonic_increasing(logs, [x * len(pts[x]) for x in xs])
    rs = [math.exp(v) for v in iso]
    times = [x / r for x, r in zip(xs, rs)]
    for i in range(1, len(times)):
        times[i] = max(times[i], times[i - 1])
    rs = [x / t for x, t in zip(xs, times)]
    return tuple(xs), tuple(rs)


@dataclass(frozen=True)
class Curve:
    """A smoothed curve: ``sizes`` ascending, ``rates`` non-decreasing, times non-decreasing."""

    sizes: tuple[float, ...]
    rates: tuple[float, ...]
    floor_s: float = 0.0  # fixed cost per call kept beyond the largest size (a collective's latency)

    @classmethod
    def from_points(cls, sizes: Iterable[float], rates: Iterable[float], *, latency_floor: bool = False) -> "Curve":
        xs, rs = smooth(list(sizes), list(rates))
        return cls(xs, rs, xs[0] / rs[0] if latency_floor else 0.0)

    @property
    def plateau(self) -> float:
        return self.rates[-1]

    def seconds(self, size: float) -> float:
        """Time to process ``size`` units (bytes, FLOPs) at the measured rates."""
        if size <= 0:
            return 0.0
        xs, rs = self.sizes, self.rates
        if size <= xs[0]:
            # collectives: the latency floor (nothing smaller was measured); compute: the same rate
            return xs[0] / rs[0] if self.floor_s > 0 else size / rs[0]
        if size >= xs[-1]:
            return size / rs[-1] + self.floor_s * min(1.0, (size - xs[-1]) / xs[-1])
        i = bisect.bisect_right(xs, size)
        x0, x1 = xs[i - 1], xs[i]
        lt0, lt1 = math.log(x0 / rs[i - 1]), math.log(x1 / rs[i])
        f = (math.log(size) - math.log(x0)) / (math.log(x1) - math.log(x0))
        return math.exp(lt0 + f * (lt1 - lt0))

    def rate(self, size: float) -> float:
        t = self.seconds(size)
        return size / t if t > 0 else self.rates[0]

    def to_dict(self) -> dict[str, list[float]]:
        return {"sizes": list(self.sizes), "rates": list(self.rates)}


def _curve_from_yaml(tree: Any, size_key: str, rate_key: str, where: str) -> Curve:
    if not isinstance(tree, dict) or size_key not in tree or rate_key not in tree:
        raise ValueError(f"{where} needs lists {size_key} and {rate_key}")
    sizes, rates = tree[size_key], tree[rate_key]
    if len(sizes) != len(rates) or not sizes:
        raise ValueError(f"{where}: {size_key} and {rate_key} must be non-empty lists of equal length")
    return Curve.from_points([float(s) for s in sizes], [float(r) for r in rates])


@dataclass(frozen=True)
class LinkTables:
    """Measured collectives of one link: ``curves[(kind, group size)]`` = bus bandwidth vs buffer bytes."""

    curves: tuple[tuple[tuple[str, int], Curve], ...]
    source: str = ""

    def __hash__(self) -> int:  # cached: a Link carrying this is hashed on every cost-model cache lookup
        h = self.__dict__.get("_hash")
        if h is None:
            h = hash((self.curves, self.source))
            object.__setattr__(self, "_hash", h)
        return h

    def get(self, kind: str, n: int) -> tuple[int, Curve] | None:
        """The curve for ``kind`` at group size ``n``, else the one at the nearest measured size."""
        cands = [(gn, c) for (k, gn), c in self.curves if k == kind]
        if not cands:
            return None
        exact = [x for x in cands if x[0] == n]
        if exact:
            return exact[0]
        return min(cands, key=lambda x: (abs(math.log(x[0]) - math.log(max(n, 1))), -x[0]))

    def seconds(self, kind: str, nbytes: float, n: int) -> float | None:
        """Time of one collective of ``nbytes`` per device over ``n`` ranks, or None if not measured.

        Curves store bus bandwidth against the buffer size at the measured group size ``m``; at
        another size ``n`` the buffer with the same bus bytes at ``m`` is looked up (ring
        algorithms: equal bus bytes take equal time), and its time is used.
        """
        if n <= 1 or nbytes <= 0:
            return 0.0
        got = self.get(kind, n)
        if got is None:
            return None
        _, curve = got
        return curve.seconds(nbytes * bus_factor(kind, n))

    def kinds(self) -> list[str]:
        return sorted({k for (k, _), _ in self.curves})


def link_tables_from_yaml(tree: Any, where: str) -> LinkTables | None:
    """``measured.links.<link>`` of a profile: {source:, collectives: {kind: {group_size: {bytes:, bus_bytes_per_s:}}}}."""
    if not tree:
        return None
    colls = tree.get("collectives", {}) if isinstance(tree, dict) else {}
    curves = []
    for kind, by_n in sorted(colls.items()):
        if not isinstance(by_n, dict):
            raise ValueError(f"{where}.collectives.{kind} must map group size -> curve")
        for n, pts in sorted(by_n.items(), key=lambda kv: int(kv[0])):
            if isinstance(pts, dict) and pts.get("unsupported"):
                continue
            c = _curve_from_yaml(pts, "bytes", "bus_bytes_per_s", f"{where}.collectives.{kind}.{n}")
            # stored on bus bytes so that curve.seconds(bus_bytes) is the time
            f = bus_factor(kind, int(n))
            c = Curve.from_points([s * f for s in c.sizes], c.rates, latency_floor=True) if f > 0 else c
            curves.append(((str(kind), int(n)), c))
    if not curves:
        return None
    return LinkTables(tuple(curves), str(tree.get("source", "")))


@dataclass(frozen=True)
class DeviceTables:
    """Measured device curves: matmul FLOP/s vs FLOPs per dtype, copy bytes/s vs bytes, and fused
    causal attention's forward-equivalent FLOP/s (3 x forward FLOPs over forward + backward time)."""

    matmul: tuple[tuple[str, Curve], ...]
    memory: Curve | None
    source: str = ""
    attention: tuple[tuple[str, Curve], ...] = ()
    reshard: tuple[tuple[int, float], ...] = ()  # group size -> the per-op runtime's cost per move beyond its collective

    def reshard_seconds(self, n: int) -> float | None:
        """At group size ``n``, or the nearest measured one (in log space)."""
        if not self.reshard:
            return None
        return min(self.reshard, key=lambda gs: (abs(math.log2(gs[0]) - math.log2(max(n, 1))), gs[0]))[1]

    def matmul_seconds(self, dtype: str, flops: float) -> float | None:
        return _seconds_of(self.matmul, dtype, flops)

    def attention_seconds(self, dtype: str, flops: float) -> float | None:
        return _seconds_of(self.attention, dtype, flops)

    def memory_seconds(self, nbytes: float) -> float | None:
        return None if self.memory is None else self.memory.seconds(nbytes)


def _seconds_of(curves: tuple[tuple[str, Curve], ...], dtype: str, size: float) -> float | None:
    return next((c.seconds(size) for d, c in curves if d == dtype), None)


def device_tables_from_yaml(tree: Any, where: str) -> DeviceTables | None:
    """``measured.device``: {source:, matmul: {dtype: {flops:, flops_per_s:}}, memory: {bytes:, bytes_per_s:},
    attention (optional): {dtype: {flops:, flops_per_s:}}}."""
    if not tree:
        return None
    mm = tuple(
        (str(d), _curve_from_yaml(c, "flops", "flops_per_s", f"{where}.matmul.{d}"))
        for d, c in sorted((tree.get("matmul") or {}).items())
    )
    att = tuple(
        (str(d), _curve_from_yaml(c, "flops", "flops_per_s", f"{where}.attention.{d}"))
        for d, c in sorted((tree.get("attention") or {}).items())
    )
    mem_tree = tree.get("memory")
    mem = _curve_from_yaml(mem_tree, "bytes", "bytes_per_s", f"{where}.memory") if mem_tree else None
    if not mm and mem is None:
        return None
    rs = tree.get("reshard") or {}
    sizes, secs = list(rs.get("group_sizes") or []), list(rs.get("seconds") or [])
    if len(sizes) != len(secs) or any(not isinstance(x, (int, float)) or x < 0 for x in [*sizes, *secs]):
        raise ValueError(f"{where}.reshard: want group_sizes and seconds, two lists of the same length "
                         "of non-negative numbers (re-run `autoplan profile`)")
    return DeviceTables(mm, mem, str(tree.get("source", "")), att, tuple(zip((int(g) for g in sizes), map(float, secs))))


def source_of(cluster: Any) -> str:
    """"measured" if the cluster's cost model uses measured curves (device or any link), else "analytic"."""
    dev = getattr(getattr(cluster, "device", None), "measured", None)
    links = [getattr(cluster, "intra_node", None), getattr(cluster, "inter_node", None)]
    if dev is not None or any(getattr(l, "measured", None) is not None for l in links):
        return "measured"
    return "analytic"


def describe_sources(cluster: Any) -> dict[str, str]:
    """Which curves a plan was priced with: per part, "measured" or "analytic" (for the plan JSON)."""
    dev = getattr(cluster.device, "measured", None)
    out = {
        "matmul": "measured" if dev is not None and dev.matmul else "analytic",
        "memory": "measured" if dev is not None and dev.memory is not None else "analytic",
    }
    for name in ("intra_node", "inter_node"):
        t = getattr(getattr(cluster, name), "measured", None)
        out[name] = "measured" if t is not None else "analytic"
    out["overall"] = source_of(cluster)
    return out
