"""Hardware profiles: what a device computes and holds, and how fast its links move bytes.

A profile is a YAML file in ``profiles/`` (or any path). Every number is written as
``{value: ..., source: ...}`` so that the file says where it came from (a datasheet, a paper,
or ``measured`` by ``autoplan profile``); units are in the field names (``_bytes``,
``_bytes_per_s``, ``_flops_per_s``, ``_s``). To add a machine, copy a profile and edit it;
no code changes.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from autoplan.errors import UnknownClusterError
from autoplan.profiler.tables import DeviceTables, LinkTables, device_tables_from_yaml, link_tables_from_yaml  # measured: (issue #5)

SCHEMA = "autoplan-profile/1"
PROFILES_DIR = Path(__file__).resolve().parent.parent / "profiles"


@dataclass(frozen=True)
class Link:
    """One kind of link a collective can cross, priced by the alpha-beta model."""

    bandwidth_bytes_per_s: float  # per device, one direction
    latency_s: float  # alpha: fixed cost of one collective step
    efficiency: float  # fraction of bandwidth_bytes_per_s a collective achieves
    measured: LinkTables | None = None  # measured: (issue #5) curves from `autoplan profile`; None = alpha-beta only

    @property
    def effective_bytes_per_s(self) -> float:
        return self.bandwidth_bytes_per_s * self.efficiency


@dataclass(frozen=True)
class Device:
    name: str
    memory_bytes: float  # capacity of one device
    usable_memory_fraction: float  # what training may use (context, comm buffers, fragmentation)
    peak_flops_per_s: dict[str, float]  # dtype name -> dense peak
    memory_bandwidth_bytes_per_s: float
    matmul_efficiency: float  # fraction of peak a large matmul reaches
    memory_efficiency: float  # fraction of memory bandwidth a streaming kernel reaches
    measured: DeviceTables | None = field(default=None, compare=False)  # measured: (issue #5) matmul/copy curves
    # per-op cost of the per-op runtime's DTensor dispatch (forward + backward), beyond the op itself;
    # measured by `autoplan profile`; 0 where not measured (GPU launches overlap with the host's work)
    dtensor_dispatch_s: float = 0.0
    # the optimizer's fixed cost per parameter tensor and step (AdamW's per-tensor ops), for a plain
    # tensor and for a sharded DTensor (FSDP, tensor parallel); measured by `autoplan profile`, else 0
    optimizer_tensor_s: float = 0.0
    optimizer_dtensor_s: float = 0.0
    # per collective a planned move of the per-op runtime issues (``runtime.moves.move``): its DTensor and
    # functional-collective machinery beyond the collective itself; measured by `autoplan profile`, else 0
    reshard_overhead_s: float = 0.0

    @property
    def usable_memory_bytes(self) -> float:
        return self.memory_bytes * self.usable_memory_fraction

    def flops_per_s(self, dtype: str) -> float:
        if dtype not in self.peak_flops_per_s:
            known = ", ".join(sorted(self.peak_flops_per_s))
            raise UnknownClusterError(f"device {self.name} has no peak for dtype {dtype}: use one of {known}")
        return self.peak_flops_per_s[dtype]


@dataclass(frozen=True)
class Cluster:
    name: str
    description: str
    device: Device
    devices_per_node: int
    intra_node: Link
    inter_node: Link
    sources: dict[str, str] = field(default_factory=dict, compare=False)  # field path -> source

    def link_for_axis(self, axis_size: int, inner_devices: int) -> Link:
        """The slowest link a mesh axis crosses.

        ``inner_devices`` is the product of the sizes of the mesh axes inside this one (axes are
        laid out row-major, the last axis fastest-varying, as ``init_device_mesh`` does). An axis
        whose members all sit in one node uses the intra-node link; otherwise the inter-node one.
        """
        if axis_size * inner_devices <= self.devices_per_node:
            return self.intra_node
        return self.inter_node

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "device": self.device.name,
            "devices_per_node": self.devices_per_node,
            "memory_bytes": self.device.memory_bytes,
            "peak_flops_per_s": dict(self.device.peak_flops_per_s),
            "intra_node_bytes_per_s": self.intra_node.bandwidth_bytes_per_s,
            "inter_node_bytes_per_s": self.inter_node.bandwidth_bytes_per_s,
        }


def _num(tree: dict[str, Any], path: str, sources: dict[str, str], where: str) -> float:
    node: Any = tree
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            raise UnknownClusterError(f"profile {where} lacks {path}: add it as {{value: ..., source: ...}}")
        node = node[key]
    if isinstance(node, dict):
        if "value" not in node or "source" not in node:
            raise UnknownClusterError(f"profile {where}: {path} needs both value and source")
        sources[path] = str(node["source"])
        node = node["value"]
    try:
        return float(node)
    except (TypeError, ValueError):
        raise UnknownClusterError(f"profile {where}: {path} is {node!r}, not a number") from None


def _link(tree: dict[str, Any], key: str, sources: dict[str, str], where: str) -> Link:
    return Link(
        bandwidth_bytes_per_s=_num(tree, f"links.{key}.bandwidth_bytes_per_s", sources, where),
        latency_s=_num(tree, f"links.{key}.latency_s", sources, where),
        efficiency=_num(tree, f"links.{key}.efficiency", sources, where),
    )


def _measured(tree: dict[str, Any], where: str) -> tuple[DeviceTables | None, LinkTables | None, LinkTables | None]:
    """The optional ``measured:`` section (issue #5): curves written by ``autoplan profile``."""
    m = tree.get("measured")
    if not m:
        return None, None, None
    if not isinstance(m, dict):
        raise UnknownClusterError(f"profile {where}: measured must be a mapping (see profiles/cpu-measured.yaml)")
    try:
        dev = device_tables_from_yaml(m.get("device"), f"{where}: measured.device")
        links = m.get("links") or {}
        intra = link_tables_from_yaml(links.get("intra_node"), f"{where}: measured.links.intra_node")
        inter_tree = links.get("inter_node")
        if isinstance(inter_tree, dict) and inter_tree.get("same_as") == "intra_node":
            inter = intra
        else:
            inter = link_tables_from_yaml(inter_tree, f"{where}: measured.links.inter_node")
    except (ValueError, TypeError, AttributeError) as exc:
        raise UnknownClusterError(f"profile {where}: bad measured section ({exc})") from None
    return dev, intra, inter


def cluster_from_dict(tree: dict[str, Any], where: str = "<dict>") -> Cluster:
    if tree.get("schema") != SCHEMA:
        raise UnknownClusterError(f"profile {where} has schema {tree.get('schema')!r}: expected {SCHEMA}")
    sources: dict[str, str] = {}
    dev = tree.get("device", {})
    peaks = dev.get("peak_flops_per_s", {})
    if not peaks:
        raise UnknownClusterError(f"profile {where} lacks device.peak_flops_per_s: add bf16/fp32 peaks")
    device = Device(
        name=str(dev.get("name", "device")),
        memory_bytes=_num(tree, "device.memory_bytes", sources, where),
        usable_memory_fraction=_num(tree, "device.usable_memory_fraction", sources, where),
        peak_flops_per_s={k: _num(tree, f"device.peak_flops_per_s.{k}", sources, where) for k in peaks},
        memory_bandwidth_bytes_per_s=_num(tree, "device.memory_bandwidth_bytes_per_s", sources, where),
        matmul_efficiency=_num(tree, "device.matmul_efficiency", sources, where),
        memory_efficiency=_num(tree, "device.memory_efficiency", sources, where),
        **{k: _num(tree, f"device.{k}", sources, where)
           for k in ("dtensor_dispatch_s", "optimizer_tensor_s", "optimizer_dtensor_s", "reshard_overhead_s") if k in dev},
    )
    m_dev, m_intra, m_inter = _measured(tree, where)  # measured: (issue #5)
    if m_dev is not None:
        device = replace(device, measured=m_dev)
    intra, inter = _link(tree, "intra_node", sources, where), _link(tree, "inter_node", sources, where)
    if m_intra is not None:
        intra = replace(intra, measured=m_intra)
    if m_inter is not None:
        inter = replace(inter, measured=m_inter)
    return Cluster(
        name=str(tree.get("name", where)),
        description=str(tree.get("description", "")),
        device=device,
        devices_per_node=int(_num(tree, "devices_per_node", sources, where)),
        intra_node=intra,
        inter_node=inter,
        sources=sources,
    )


def list_clusters(profiles_dir: Path = PROFILES_DIR) -> list[str]:
    return sorted(p.stem for p in profiles_dir.glob("*.yaml"))


def load_cluster(name_or_path: str | Path, profiles_dir: Path = PROFILES_DIR) -> Cluster:
    """A shipped profile by name (``dgx-h100``) or a YAML file by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = profiles_dir / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(list_clusters(profiles_dir))
        raise UnknownClusterError(f"unknown cluster {str(name_or_path)!r}: use one of {known}, or a path to a profile .yaml")
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UnknownClusterError(f"profile {path} is not valid YAML ({exc.__class__.__name__}): fix the file") from None
    if not isinstance(tree, dict):
        raise UnknownClusterError(f"profile {path} is not a mapping: see profiles/dgx-h100.yaml for the format")
    return cluster_from_dict(tree, str(path))
