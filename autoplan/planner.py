"""Planner: capture -> graph -> search -> predictions -> Plan. The one entry point is ``make_plan``."""
from __future__ import annotations

import datetime as _dt
from collections import defaultdict
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Iterator

from autoplan import __version__
from autoplan.baselines import allow_for, baselines
from autoplan.cost.comm import Bucket, Collective, collective_seconds, loss_report_seconds
from autoplan.cost.model import BACKWARD_FACTOR, GENERIC_BATCH, edge_collectives, param_buckets
from autoplan.errors import InfeasibleError
from autoplan.execution import lower, pipeline_execution
from autoplan.graph import OpGraph, forward_flops, needs_value_in_backward
from autoplan.hardware import Cluster
from autoplan.inputs import CallSpec
from autoplan.mesh import Mesh
from autoplan.plan import SCHEMA, Plan, Prediction
from autoplan.repeats import Tying
from autoplan.search import Evaluated, SearchOptions, memory_budget, search
from autoplan.strategies.expand import Strategy
from autoplan.strategies.placement import Shard, format_placements


@dataclass(frozen=True)
class Job:
    """What is being planned: a captured model on a cluster at a batch."""

    model_name: str
    graph: OpGraph
    tying: Tying
    cluster: Cluster
    devices: int
    global_batch: int
    seq_len: int | None  # tokens per sample, for tokens/s (None for non-LMs)
    recipe_family: str | None = None  # "gpt" | "llama" when the native recipes can run the model, else None
    call: CallSpec | None = None  # how the model is called and where its loss comes from (recorded in the plan)


def model_flops_per_step(graph: OpGraph, global_batch: int) -> float:
    """Forward + backward FLOPs of one step, no recompute (the MFU convention, PaLM appendix B)."""
    fwd = sum(forward_flops(graph, n, global_batch) for n in graph.nodes.values())
    return (1 + BACKWARD_FACTOR) * fwd


def predict(job: Job, ev: Evaluated, budget: float, overhead: float | None = None) -> Prediction:
    """The step as run: the solver's cost, the loss report, and the per-op runtime's overhead when the
    layout runs per-op (``overhead``: computed here when None)."""
    pr, choice = ev.priced, ev.solution.choice
    compute = sum(float(c[s]) for c, s in zip(pr.compute_s, choice))
    optimizer = sum(float(o[s]) for o, s in zip(pr.optimizer_s, choice))
    comm = sum(float(act[choice[u], choice[v]] + sync[choice[u], choice[v]]) for u, v, _, act, sync in pr.edge_info)
    comm += sum(float(o[s]) for o, s in zip(pr.own_comm_s, choice))  # the ops' own (loss statistics, batch norm)
    params = sum(float(b[s]) for b, s in zip(pr.param_bytes, choice))
    acts = sum(float(b[s]) for b, s in zip(pr.activation_bytes, choice))
    report = loss_report_seconds(job.cluster, job.devices)  # the same for every strategy: outside the solver
    comm += report
    step = ev.solution.cost + report + (runtime_overhead(job, ev) if overhead is None else overhead)
    peak = job.cluster.device.flops_per_s(ev.cfg.dtype)
    mfu = model_flops_per_step(job.graph, job.global_batch) / (step * job.devices * peak) if step > 0 else 0.0
    tokens = job.global_batch * job.seq_len / step if job.seq_len and step > 0 else None
    return Prediction(
        step_time_s=step,
        compute_s=compute,
        comm_s=comm,
        optimizer_s=optimizer,
        peak_memory_bytes=ev.solution.mem,
        param_memory_bytes=params,
        activation_memory_bytes=acts,
        mfu=mfu,
        fits=ev.solution.mem <= budget,
        tokens_per_s=tokens,
        mesh=ev.mesh.as_dict(),
        micro_batches=ev.cfg.micro_batches,
        recompute="full" if ev.cfg.recompute else "none",
    )


def _chosen(job: Job, ev: Evaluated) -> dict[str, Any]:
    """Strategy of every graph node (tied copies share their representative's)."""
    pr = ev.priced
    by_rep = {n: pr.strategies[i][s] for i, (n, s) in enumerate(zip(pr.nodes, ev.solution.choice))}
    return {n: by_rep[job.tying.rep[n]] for n in job.graph.nodes}


def _ops_and_collectives(job: Job, ev: Evaluated) -> tuple[list, dict, dict, list, list]:
    graph, mesh, cfg = job.graph, ev.mesh, ev.cfg
    chosen = _chosen(job, ev)
    pr = ev.priced
    index = {n: i for i, n in enumerate(pr.nodes)}
    ops, params, data_inputs = [], {}, {}
    per_layer: dict[str, dict[str, float]] = defaultdict(lambda: {"compute_s": 0.0, "comm_s": 0.0})
    for name, node in graph.nodes.items():
        st = chosen[name]
        rep = job.tying.rep[name]
        i = index[rep]
        s = ev.solution.choice[i]
        count = job.tying.count[rep]
        compute = float(pr.compute_s[i][s]) / count
        if node.kind == "param":
            params[node.param] = format_placements(st.out)
        if node.kind == "input":
            data_inputs[name] = format_placements(st.out)
        if node.kind in ("param", "buffer", "input"):
            continue
        layer = _layer(node.module)
        per_layer[layer]["compute_s"] += compute
        ops.append({
            "name": name, "kind": node.kind, "target": node.target, "module": node.module,
            "inputs": [format_placements(p) for p in st.ins], "producers": list(node.inputs),
            "output": format_placements(st.out), "compute_s": compute,
            "activation_bytes": float(pr.activation_bytes[i][s]) / count,
        })
    axis = mesh.axis_names
    m = cfg.micro_batches
    colls = [_coll(c, axis, phase, u, v, pos, graph.nodes[u].kind == "param", m)
             for phase, c, u, v, pos in edge_moves(job, ev, chosen)]
    for name, node in graph.nodes.items():
        redone = cfg.recompute and name in job.tying.in_block  # recompute issues the forward's again
        for kind, ax, nbytes, grows, phase in chosen[name].comm:
            size = nbytes * cfg.micro_batch / GENERIC_BATCH if grows else nbytes
            colls.append({"phase": phase, "kind": kind, "axis": axis[ax], "bytes": size, "src": name, "dst": name,
                          "input": -1, "per_step": m * (2 if redone and phase == "forward" else 1)})
    # communication per layer, from the collectives listed above (gradient sync goes with the parameter's layer)
    links = dict(zip(mesh.axis_names, mesh.links(job.cluster)))
    sizes = mesh.as_dict()
    buckets = param_buckets(graph, job.tying, cfg.dtype)
    for c in colls:
        owner = c["src"] if graph.nodes[c["src"]].kind == "param" else c["dst"]
        node = graph.nodes[owner]
        layer = _layer(node.param.rsplit(".", 1)[0] if node.kind == "param" and node.param else node.module)
        bucket = buckets.get(job.tying.rep[c["src"]], Bucket()) if graph.nodes[c["src"]].kind == "param" else None
        t = collective_seconds(c["kind"], c["bytes"], sizes[c["axis"]], links[c["axis"]], bucket)
        per_layer[layer]["comm_s"] += t * c["per_step"]
    report = loss_report_seconds(job.cluster, job.devices)
    if report:
        per_layer["(loss report)"]["comm_s"] += report
    layers = [{"layer": k, **v} for k, v in per_layer.items()]
    return ops, params, data_inputs, colls, layers


def edge_moves(job: Job, ev: Evaluated, chosen: dict[str, Strategy] | None = None) -> Iterator[tuple[str, Collective, str, str, int]]:
    """(phase, collective, producer, consumer, input position) of every collective an edge's
    resharding needs, per micro-batch, as the cost model priced them."""
    graph, mesh, cfg = job.graph, ev.mesh, ev.cfg
    chosen = _chosen(job, ev) if chosen is None else chosen
    reduced: set[str] = set()
    for u, v, data in graph.dag.edges(data=True):
        pos = data["index"]
        src = graph.nodes[u]
        fwd, bwd = edge_collectives(src, chosen[u], chosen[v], pos, cfg.micro_batch, mesh, cfg.dtype)
        regather = ()
        if src.kind == "param":
            if needs_value_in_backward(graph.nodes[v], pos):
                regather = fwd  # FSDP reshards after forward: gathers again for this backward
            if u in reduced:  # a tied weight's all-reduced gradients are summed locally and reduced once
                bwd = tuple(c for c in bwd if c.kind != "all_reduce")
            reduced.add(u)
        for phase, cs in (("forward", fwd), ("backward", regather), ("backward", bwd)):
            for c in cs:
                yield phase, c, u, v, pos


def _coll(c: Collective, axis_names, phase: str, u: str, v: str, pos: int, param: bool, m: int) -> dict[str, Any]:
    per_step = m
    if param and phase == "backward" and c.kind == "all_reduce":
        per_step = 1  # gradient all-reduce once per step (no_sync while accumulating)
    return {"phase": phase, "kind": c.kind, "axis": axis_names[c.axis], "bytes": c.nbytes, "src": u, "dst": v,
            "input": pos, "per_step": per_step}


def _layer(module: str) -> str:
    parts = module.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[: i + 1])
    return parts[0] if parts and parts[0] else "(top)"


def make_plan(job: Job, *, mesh: Mesh | None = None, options: SearchOptions = SearchOptions(),
              with_baselines: bool = True, force: str | None = None, pipeline: bool = False,
              progress=None) -> Plan:
    """Search, then price the baselines, then write everything into a Plan.

    ``force`` ("ddp", "fsdp", "megatron") restricts the plan to one family on ``mesh`` (or on
    that family's usual mesh), for what-if comparisons and for tests of the runtime.
    """
    budget = memory_budget(job.cluster, options)
    cache: dict = {}
    allow = None
    if force is not None:
        if mesh is None:
            mesh = next((b.mesh for b in baselines(job.devices, job.cluster.devices_per_node) if b.name == force),
                        Mesh((job.devices,), ("dp",)))
        allow = allow_for(force, mesh)
    result = search(job.graph, job.tying, job.cluster, devices=job.devices, global_batch=job.global_batch,
                    mesh=mesh, options=options, allow=allow, cache=cache, progress=progress)
    best = result.best
    base: dict[str, Any] = {}
    candidates = [best]
    if with_baselines:
        for b in baselines(job.devices, job.cluster.devices_per_node):
            try:
                r = search(job.graph, job.tying, job.cluster, devices=job.devices, global_batch=job.global_batch,
                           meshes=[b.mesh], options=options, allow=b.allow, cache=cache)
                candidates.append(r.best)
                entry = predict(job, r.best, budget).to_json()
            except InfeasibleError as exc:
                entry = {"fits": False, "step_time_s": None, "mfu": None, "peak_memory_bytes": exc.min_memory_bytes,
                         "mesh": b.mesh.as_dict(), "error": str(exc)}
            entry["description"] = b.description
            base[b.name] = entry
    if force is None:
        best = _best_as_run(job, candidates, options, cache, budget)
    ops, params, data_inputs, colls, layers = _ops_and_collectives(job, best)
    execution = _execution(job, best)
    overhead = engine_overhead(job, best) if execution["runtime"] == "per-op" else 0.0
    predicted = predict(job, best, budget, overhead)
    pipe = None
    if pipeline and job.tying.groups and job.recipe_family is None:
        # a pipeline runs only as a recipe, and no pipeline recipe knows this model: not searched (issue 14)
        pipe = {"found": False, "executable": False, "seconds": 0.0,
                "why_not": "pipeline stages are cut by the recipe runtime, which knows the zoo's GPT and Llama only; "
                           f"this model's plan runs {execution['runtime']}"}
    elif pipeline and job.tying.groups:
        pipe = _pipeline_alternative(job, options, predicted)
    pred = predicted.to_json()
    pred["per_layer"] = layers
    pred["runtime_overhead_s"] = overhead
    mesh_json = {"shape": list(best.mesh.shape), "axis_names": list(best.mesh.axis_names)}
    training = {
        "global_batch": job.global_batch, "seq_len": job.seq_len, "micro_batches": best.cfg.micro_batches,
        "micro_batch": best.cfg.micro_batch, "recompute": "full" if best.cfg.recompute else "none", "dtype": best.cfg.dtype,
    }
    per_op_alternative = None
    if pipe is not None and pipe["found"] and pipe["predicted"]["fits"] and (pipe["faster_than_plan"] or not predicted.fits):
        # the pipeline configuration wins: it is the plan; the per-op solution is kept for comparison
        cfg = pipe["config"]
        per_op_alternative = {"predicted": pred, "mesh": mesh_json, "execution": execution}
        pred = _pipeline_prediction(pipe["predicted"], cfg)
        execution = pipeline_execution(SimpleNamespace(**cfg), job.global_batch)
        mesh_json = {"shape": [cfg["pp"], cfg["dp"], cfg["tp"]], "axis_names": ["pp", "dp", "tp"]}
        training = {**training, "micro_batches": pipe["predicted"]["micro_batches"], "micro_batch": cfg["micro_batch"],
                    "recompute": cfg["recompute"], "dtype": cfg["dtype"], "pipeline_stages": cfg["pp"],
                    "virtual_stages": cfg["virtual_stages"], "zero": cfg["zero"], "sequence_parallel": cfg["sequence_parallel"]}
        ops, params, data_inputs, colls = [], {}, {}, []
    data = {
        **_header(job, budget),
        "mesh": mesh_json,
        "training": training,
        "execution": execution,
        "params": params,
        "inputs": data_inputs,
        "ops": ops,
        "collectives": colls,
        "predicted": pred,
        "baselines": base,
        "runners_up": [predict(job, e, budget).to_json() for e in result.evaluated[1:4]],
        "forced": force,
        "pipeline_alternative": pipe,
        "per_op_alternative": per_op_alternative,
        "solver": {
            "name": best.solution.solver, "seconds": best.solution.seconds, "gap": best.solution.gap,
            "search_seconds": result.seconds, "configurations": result.configurations, "solved_with_budget": result.solved,
            "solver_seconds": result.solvers,
        },
    }
    return Plan(data)


def engine_overhead(job: Job, ev: Evaluated) -> float:
    """Seconds per step the per-op runtime adds: its DTensor dispatch (``dtensor_dispatch_s``, measured
    by ``autoplan profile``; 0 on profiles without it) for every op, forward and backward, per micro-batch;
    its planned moves' machinery beyond the collectives (``reshard_overhead_s``) for every collective a
    move issues; each parameter gather's latency (priced as a share of its block's grouped gathers, as
    FSDP issues them; the per-op runtime gathers every parameter on its own); and the optimizer's
    DTensor cost for the parameters the cost model priced as plain (replicated) tensors."""
    dev = job.cluster.device
    ops = sum(1 for n in job.graph.nodes.values() if n.kind not in ("param", "buffer", "input"))
    # the cost model prices a replicated parameter's optimizer step as a plain tensor's (DDP); the
    # per-op runtime holds every parameter as a DTensor
    chosen = _chosen(job, ev) if dev.optimizer_dtensor_s > dev.optimizer_tensor_s else {}
    replicated = sum(1 for k, n in job.graph.nodes.items()
                     if n.kind == "param" and k in chosen and not any(isinstance(p, Shard) for p in chosen[k].out))
    table = dev.measured.reshard_seconds if dev.measured is not None and dev.measured.reshard else None
    links = ev.mesh.links(job.cluster)
    buckets = param_buckets(job.graph, job.tying, ev.cfg.dtype)
    moves = 0.0
    for phase, c, u, _, _ in edge_moves(job, ev):
        param = job.graph.nodes[u].kind == "param"
        if param and phase == "backward" and c.kind == "all_reduce":
            continue  # gradient all-reduces: bucketed by the per-op runtime too (``bucket_grads``)
        n, link = ev.mesh.shape[c.axis], links[c.axis]
        moves += table(n) if table else dev.reshard_overhead_s
        if param:  # priced as its share of a block's grouped gathers (FSDP); the per-op runtime issues it alone
            moves += (collective_seconds(c.kind, c.nbytes, n, link)
                      - collective_seconds(c.kind, c.nbytes, n, link, buckets.get(job.tying.rep[u], Bucket())))
    return (ops * ev.cfg.micro_batches * dev.dtensor_dispatch_s + moves * ev.cfg.micro_batches
            + replicated * (dev.optimizer_dtensor_s - dev.optimizer_tensor_s))


def _execution(job: Job, ev: Evaluated) -> dict[str, Any]:
    """How the layout runs (``execution.lower``): a native recipe or the per-op runtime."""
    chosen = _chosen(job, ev)
    params = {n.param: format_placements(chosen[k].out) for k, n in job.graph.nodes.items() if n.kind == "param"}
    return lower(job.graph, ev.mesh, chosen, params, micro_batches=ev.cfg.micro_batches,
                 recompute=ev.cfg.recompute, dtype=ev.cfg.dtype)


def runtime_overhead(job: Job, ev: Evaluated) -> float:
    """``engine_overhead`` if the layout runs per-op, else 0 (a native recipe)."""
    return engine_overhead(job, ev) if _execution(job, ev)["runtime"] == "per-op" else 0.0


def _best_as_run(job: Job, candidates: list[Evaluated], options: SearchOptions, cache: dict, budget: float) -> Evaluated:
    """The fastest candidate as it runs (the search's best, the baselines' layouts, and the best DDP and
    FSDP layouts: native recipes, no per-op overhead), once the per-op runtime's overhead
    (``engine_overhead``) is counted. The search's best wins ties."""
    def total(ev: Evaluated) -> float:
        return ev.solution.cost + runtime_overhead(job, ev)

    best = candidates[0]
    if runtime_overhead(job, best) == 0.0:
        return best  # a native recipe runs it already: nothing to add
    flat = Mesh((job.devices,), ("dp",))
    for family in ("ddp", "fsdp"):
        try:
            r = search(job.graph, job.tying, job.cluster, devices=job.devices, global_batch=job.global_batch,
                       meshes=[flat], options=options, allow=allow_for(family, flat), cache=cache)
        except InfeasibleError:
            continue
        candidates = [*candidates, r.best]
    fitting = [ev for ev in candidates if ev.solution.mem <= budget] or [best]
    return min(fitting, key=total)


def _header(job: Job, budget: float) -> dict[str, Any]:
    """The sections every plan starts with: schema, model, cluster, world size."""
    return {
        "schema": SCHEMA,
        "autoplan_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {
            "name": job.model_name, "fingerprint": job.graph.fingerprint, "num_params": job.graph.num_params(),
            "capture": job.graph.method, "unsupported_ops": job.graph.unsupported(),
            "repeated_blocks": [{"container": c, "count": n} for c, n in job.tying.groups],
        },
        "cluster": {**job.cluster.to_dict(), "usable_memory_bytes": budget},
        "world_size": job.devices,
        "call": job.call.to_json() if job.call is not None else None,
    }


def config_plan(job: Job, cfg: Any) -> Plan:
    """The plan of one fixed configuration (an ``EstimateConfig``: what ``autoplan estimate -o`` writes).

    It is priced by ``estimate`` and executed as a recipe; no search runs.
    """
    from dataclasses import asdict

    from autoplan.estimate import estimate

    started = _dt.datetime.now()
    est = estimate(job, cfg).to_json()
    c = asdict(cfg)
    training = {"global_batch": job.global_batch, "seq_len": job.seq_len, "micro_batches": est["micro_batches"],
                "micro_batch": cfg.micro_batch, "recompute": cfg.recompute, "dtype": cfg.dtype,
                "pipeline_stages": cfg.pp, "virtual_stages": cfg.virtual_stages, "zero": cfg.zero,
                "sequence_parallel": cfg.sequence_parallel}
    data = {
        **_header(job, job.cluster.device.usable_memory_bytes),
        "mesh": {"shape": [cfg.pp, cfg.dp, cfg.tp], "axis_names": ["pp", "dp", "tp"]},
        "training": training,
        "execution": {**pipeline_execution(cfg, job.global_batch), "from": "fixed configuration"},
        "params": {}, "inputs": {}, "ops": [], "collectives": [],
        "predicted": _pipeline_prediction(est, c),
        "baselines": {}, "runners_up": [], "forced": "configuration",
        "pipeline_alternative": {"found": True, "config": c, "predicted": est, "faster_than_plan": False,
                                 "candidates": 1, "seconds": 0.0, "executable": True},
        "per_op_alternative": None,
        "solver": {"name": "none (fixed configuration)", "seconds": 0.0, "gap": 0.0,
                   "search_seconds": (_dt.datetime.now() - started).total_seconds(), "configurations": 1,
                   "solved_with_budget": 0, "solver_seconds": {}},
    }
    return Plan(data)


def _pipeline_prediction(est: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    """An ``Estimate`` (JSON) as the plan's ``predicted`` section."""
    out = Prediction(
        step_time_s=est["step_time_s"], compute_s=est["compute_s"], comm_s=est["comm_s"], optimizer_s=est["optimizer_s"],
        peak_memory_bytes=est["peak_memory_bytes"], param_memory_bytes=est["param_memory_bytes"],
        activation_memory_bytes=est["activation_memory_bytes"], mfu=est["mfu"], fits=est["fits"],
        tokens_per_s=est["tokens_per_s"], mesh={"pp": cfg["pp"], "dp": cfg["dp"], "tp": cfg["tp"]},
        micro_batches=est["micro_batches"], recompute=cfg["recompute"],
    ).to_json()
    out["bubble_s"] = est["bubble_s"]
    hw, model = est["hardware_tflops_per_device"], est["model_tflops_per_device"]
    out["recompute_s"] = est["compute_s"] * (hw - model) / hw if hw > 0 else 0.0  # the redone forward's share
    return out


def _pipeline_alternative(job: Job, options: SearchOptions, predicted: Prediction) -> dict[str, Any]:
    """The best pipeline configuration (TP x PP x DP, interleaving, recompute), priced by ``estimate``.

    It becomes the plan (executed as a recipe) when it fits and is faster than the per-op plan.
    """
    import time
    from dataclasses import asdict

    from autoplan.errors import AutoplanError
    from autoplan.pipeline_search import search_pipeline

    started = time.perf_counter()
    try:
        cfg, est, n = search_pipeline(job, dtype=options.dtype, attention=options.attention)
    except AutoplanError as exc:
        return {"found": False, "error": str(exc), "seconds": time.perf_counter() - started}
    return {
        "found": True,
        "config": asdict(cfg),
        "predicted": est.to_json(),
        "faster_than_plan": est.step_time_s < predicted.step_time_s,
        "candidates": n,
        "seconds": time.perf_counter() - started,
        "executable": True,
    }
