"""Device meshes: the shapes the planner may choose and the link each axis crosses.

Axes are laid out row-major (the last axis varies fastest), as ``init_device_mesh`` does, so an
inner axis whose span fits in a node stays on NVLink. *Axis* names a mesh axis; *dim* names a
tensor dimension.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from autoplan.errors import AutoplanError
from autoplan.hardware import Cluster, Link


@dataclass(frozen=True)
class Mesh:
    shape: tuple[int, ...]  # devices along each axis
    axis_names: tuple[str, ...]

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def links(self, cluster: Cluster) -> tuple[Link, ...]:
        return tuple(
            cluster.link_for_axis(size, math.prod(self.shape[i + 1 :])) for i, size in enumerate(self.shape)
        )

    def as_dict(self) -> dict[str, int]:
        return dict(zip(self.axis_names, self.shape))

    def __str__(self) -> str:
        return "x".join(f"{n}{s}" for n, s in zip(self.axis_names, self.shape))


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_meshes(devices: int, devices_per_node: int) -> list[Mesh]:
    """Every 1-D mesh and every 2-D (outer, inner) mesh whose inner axis fits in one node.

    The inner axis (named ``tp``) is where tensor parallelism pays off (fast links); the outer
    one (``dp``) crosses nodes. The solver still decides what each axis shards.
    """
    meshes = [Mesh((devices,), ("dp",))]
    for inner in divisors(min(devices, devices_per_node)):
        if inner > 1 and devices % inner == 0 and devices // inner > 1:
            meshes.append(Mesh((devices // inner, inner), ("dp", "tp")))
    return meshes


def parse_mesh(text: str | dict[str, int], devices: int | None = None) -> Mesh:
    """``"dp=2,tp=4"`` or ``{"dp": 2, "tp": 4}`` -> Mesh; the last axis is the innermost."""
    if isinstance(text, dict):
        items = list(text.items())
    else:
        items = []
        for part in text.split(","):
            if "=" not in part:
                raise AutoplanError(f"bad mesh {text!r}: write axes as name=size, e.g. dp=2,tp=4")
            name, _, size = part.partition("=")
            if not size.strip().isdigit():
                raise AutoplanError(f"bad mesh {text!r}: size of axis {name.strip()!r} must be a whole number")
            items.append((name.strip(), int(size)))
    if not items or any(s < 1 for _, s in items):
        raise AutoplanError(f"bad mesh {text!r}: give at least one axis with size >= 1, e.g. dp=2,tp=4")
    if len({n for n, _ in items}) != len(items):
        raise AutoplanError(f"bad mesh {text!r}: axis names must differ")
    mesh = Mesh(tuple(s for _, s in items), tuple(n for n, _ in items))
    if devices is not None and mesh.size != devices:
        arith = " * ".join(f"{n}({s})" for n, s in items)
        raise AutoplanError(f"mesh {arith} = {mesh.size} != devices({devices}): make the axis sizes multiply to the device count")
    return mesh
