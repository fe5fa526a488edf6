"""Python API: ``autoplan.plan(model, example_inputs, cluster=..., devices=...)``."""
from __future__ import annotations

import warnings
from typing import Any, Sequence

import torch
import torch.nn as nn

from autoplan.capture import capture, clone_to_meta
from autoplan.errors import AutoplanError
from autoplan.graph import build_graph
from autoplan.hardware import Cluster, load_cluster
from autoplan.inputs import LossFn, resolve_spec
from autoplan.mesh import parse_mesh
from autoplan.models import ModelSpec, recipe_family, resolve_model
from autoplan.plan import Plan
from autoplan.planner import Job, make_plan
from autoplan.repeats import find_repeats
from autoplan.search import SearchOptions


def resolve_devices(cluster: Cluster, nodes: int | None, devices: int | None) -> int:
    if (nodes is None) == (devices is None):
        raise AutoplanError("give exactly one of nodes or devices (e.g. --nodes 2 or --devices 16)")
    total = nodes * cluster.devices_per_node if nodes is not None else devices
    if total is None or total < 1:
        raise AutoplanError(f"the device count must be at least 1, got {total}")
    return total


def prepare_job(
    model: nn.Module | str,
    example_inputs: Any = None,
    *,
    cluster: str | Cluster,
    nodes: int | None = None,
    devices: int | None = None,
    global_batch: int | None = None,
    seq_len: int | None = None,
    targets: torch.Tensor | None = None,
    loss_fn: LossFn | None = None,
    capture_method: str = "auto",
    name: str | None = None,
) -> Job:
    """Capture ``model`` (an nn.Module with example inputs, or a zoo spec) for ``cluster``."""
    clus = cluster if isinstance(cluster, Cluster) else load_cluster(cluster)
    n_devices = resolve_devices(clus, nodes, devices)
    if isinstance(model, str) and resolve_model(model).example is not None:  # a factory with keyword inputs
        spec = resolve_model(model)
        with torch.device("meta"):
            model, example_inputs, name = spec.build(), spec.example, name or spec.name
    if isinstance(model, str):
        spec: ModelSpec = resolve_model(model)
        seq = seq_len or _default_seq(spec)
        batch = global_batch or 8
        with torch.device("meta"):
            module = spec.build()
        call = spec.call_spec(seq)
        cap = capture(module, call, method=capture_method)
        family = recipe_family(module)
        label = name or spec.name
        tokens = seq if spec.kind == "lm" else None
    else:
        if example_inputs is None:
            raise AutoplanError("pass example_inputs with the model: a tensor, a tuple of positional inputs or a dict "
                                "of keyword inputs (dim 0 is the batch)")
        meta_model = clone_to_meta(model)
        call = resolve_spec(meta_model, example_inputs, targets=targets, loss_fn=loss_fn)
        batch = global_batch or call.batch
        cap = capture(meta_model, call, loss_fn=loss_fn, method=capture_method)
        call = cap.call or call  # the loss source, decided while tracing
        family = recipe_family(model) if call.loss == "cross_entropy" and not call.static else None
        label = name or type(model).__name__
        tokens = call.seq_len
    graph = build_graph(cap)
    if graph.unsupported():
        warnings.warn(f"autoplan: no sharding rule for {', '.join(graph.unsupported())}: planned replicated "
                      f"(register them in autoplan/ops to shard them)", stacklevel=3)
    return Job(label, graph, find_repeats(graph), clus, n_devices, batch, tokens, family, call)


def plan(
    model: nn.Module | str,
    example_inputs: Any = None,
    *,
    cluster: str | Cluster,
    nodes: int | None = None,
    devices: int | None = None,
    global_batch: int | None = None,
    seq_len: int | None = None,
    mesh: str | dict[str, int] | None = None,
    targets: torch.Tensor | None = None,
    loss_fn: LossFn | None = None,
    dtype: str = "bf16",
    micro_batches: Sequence[int] | None = None,
    recompute: bool | None = None,
    memory_bytes: float | None = None,
    solver: str = "auto",
    baselines: bool = True,
    capture_method: str = "auto",
    name: str | None = None,
    force: str | None = None,
    pipeline: bool | None = None,
    progress=None,
) -> Plan:
    """Plan the training of ``model`` on ``cluster``; see the README for every option.

    ``model`` is an ``nn.Module`` (built on the meta device to plan without weights) with its
    ``example_inputs`` (a tensor, a tuple of positional inputs or a dict of keyword inputs, at any batch
    size; dim 0 is the batch), or a zoo spec such as ``"gpt2"``. The loss is the model's own ``loss``
    when its output has one (labels in the inputs), else ``loss_fn(output, targets)`` (default: the
    cross-entropy of the output's first floating tensor; targets made for you when not given).
    ``pipeline``: also search pipeline configurations; by default (None) when nothing fixes the
    layout (no ``force``, ``mesh``, ``micro_batches``, ``recompute`` or ``memory_bytes``: the
    pipeline search chooses those itself).
    """
    if pipeline is None:
        pipeline = force is None and mesh is None and micro_batches is None and recompute is None and memory_bytes is None
    if dtype not in ("bf16", "fp16", "fp32"):
        raise AutoplanError(f"unknown dtype {dtype!r}: use bf16, fp16 or fp32")
    job = prepare_job(model, example_inputs, cluster=cluster, nodes=nodes, devices=devices, global_batch=global_batch,
                      seq_len=seq_len, targets=targets, loss_fn=loss_fn, capture_method=capture_method, name=name)
    parsed_mesh = parse_mesh(mesh, job.devices) if mesh is not None else None
    options = SearchOptions(
        dtype=dtype,
        micro_batches=tuple(micro_batches) if micro_batches else None,
        recompute=(False, True) if recompute is None else (bool(recompute),),
        solver=solver,
        memory_bytes=memory_bytes,
    )
    return make_plan(job, mesh=parsed_mesh, options=options, with_baselines=baselines, force=force, pipeline=pipeline,
                     progress=progress)


def _default_seq(spec: ModelSpec) -> int:
    cfg: Any = spec.config
    return int(getattr(cfg, "seq", 1024) or 1024) if spec.kind == "lm" else 1
