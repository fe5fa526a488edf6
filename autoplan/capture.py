"""Capture: trace a model (with its loss) into an fx graph and propagate shapes on meta/fake tensors.

``torch.fx`` symbolic tracing is tried first (it keeps shapes generic); ``torch.export``
(non-strict) is the fallback for models that symbolic tracing cannot follow. Shapes are
propagated twice, at two batch sizes, so that every tensor dim that scales with the batch is
known: the planner then prices any micro-batch size without tracing again.
"""
from __future__ import annotations

import contextlib
import dataclasses
import copy
import io
import logging
import operator
from pathlib import Path
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp

from autoplan.errors import AutoplanError, CaptureError
from autoplan.inputs import CallSpec, LossFn, NeedsTargets, TrainingLoss, with_default_targets

PROBE_BATCHES = (2, 3)  # two batch sizes whose ratio reveals batch-proportional dims
PRIME_PROBE = 8191  # one propagation at this (prime) batch: dims divisible by it scale with the batch


@dataclass(frozen=True)
class Captured:
    """A traced training graph: the model's forward plus its loss, with shapes at two batches."""

    graph_module: fx.GraphModule
    method: str  # "symbolic_trace" or "export"
    param_names: dict[str, str]  # fx node name -> qualified parameter/buffer name
    trainable: frozenset[str]  # qualified names of parameters that get gradients
    metas: tuple[dict[str, object], ...]  # per probe batch: node name -> tensor meta (shape, dtype) or None
    probes: tuple[int, ...] = PROBE_BATCHES  # the batch sizes of ``metas``
    call: CallSpec | None = None  # how the model was called (its loss source decided: never "auto")
    loss_output: int = 0  # position of the loss among the graph's outputs
    buffer_updates: tuple[tuple[int, str], ...] = ()  # (output position, buffer name): new values of updated buffers


class _FlatTracer(fx.Tracer):
    """Trace through every module so parameters appear as get_attr nodes beside their ops.

    Parameter look-ups go through a dict (fx's default scans ``named_parameters()`` for every
    access: quadratic, 10 s for a 96-layer model).
    """

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return False

    def trace(self, root, concrete_args=None):  # type: ignore[override]
        self._param_names = {id(p): n for n, p in root.named_parameters()} if isinstance(root, nn.Module) else {}
        return super().trace(root, concrete_args)

    def getattr(self, attr, attr_val, parameter_proxy_cache):  # type: ignore[override]
        name = self._param_names.get(id(attr_val)) if isinstance(attr_val, nn.Parameter) else None
        if name is None:
            return super().getattr(attr, attr_val, parameter_proxy_cache)
        if name not in parameter_proxy_cache:
            parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
        return parameter_proxy_cache[name]


InputsFn = Callable[[int], tuple[torch.Tensor, ...]]  # batch -> inputs + targets (meta or fake)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _tensor_meta(value: object) -> object:
    if isinstance(value, torch.Tensor):
        return (tuple(int(s) for s in value.shape), value.dtype)
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return tuple((tuple(int(s) for s in v.shape), v.dtype) for v in value)
    return None


def _propagate(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...]) -> dict[str, object]:
    real = next((t.device for t in list(gm.parameters()) + list(gm.buffers()) if t.device.type != "meta"), None)
    if real is not None:  # real weights: fake inputs on their device (no memory allocated)
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode = FakeTensorMode(allow_non_fake_inputs=True)
        with mode:
            fake_inputs = tuple(torch.empty(t.shape, dtype=t.dtype, device=real) for t in inputs)
        ShapeProp(gm, fake_mode=mode).propagate(*fake_inputs)
    else:
        ShapeProp(gm).propagate(*inputs)
    out: dict[str, object] = {}
    for node in gm.graph.nodes:
        tm = node.meta.get("tensor_meta")
        if tm is None:
            out[node.name] = None
        elif hasattr(tm, "shape"):  # TensorMetadata (itself a NamedTuple: test it first)
            out[node.name] = (tuple(int(s) for s in tm.shape), tm.dtype)
        elif isinstance(tm, (tuple, list)):
            out[node.name] = tuple((tuple(int(s) for s in t.shape), t.dtype) for t in tm if hasattr(t, "shape")) or None
        else:
            out[node.name] = None
    return out


def choose_probes(model: nn.Module, inputs_fn: InputsFn) -> tuple[int, ...]:
    """One propagation at a prime batch when no other dim could be mistaken for a multiple of it.

    Shape propagation dominates capture time for big models; one pass instead of two halves
    it. If any parameter, buffer or non-batch input dim is a multiple of the prime, fall back
    to two passes (at batches 2 and 3), which are exact for every model.
    """
    dims = [d for t in list(model.parameters()) + list(model.buffers()) for d in t.shape]
    dims += [d for t in inputs_fn(PRIME_PROBE) for d in t.shape[1:]]
    return PROBE_BATCHES if any(d % PRIME_PROBE == 0 for d in dims) else (PRIME_PROBE,)


def _trace_symbolic(model: nn.Module, spec: CallSpec, loss_fn: LossFn | None) -> Captured:
    wrapped, inputs_fn = TrainingLoss.of(model, spec, loss_fn), spec.meta_inputs
    graph = _FlatTracer().trace(wrapped)
    gm = fx.GraphModule(wrapped, graph)
    names = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            names[node.name] = str(node.target).removeprefix("model.")
    probes = choose_probes(wrapped, inputs_fn)
    metas = tuple(_propagate(gm, inputs_fn(b)) for b in probes)
    trainable = frozenset(n.removeprefix("model.") for n, p in wrapped.named_parameters() if p.requires_grad)
    return Captured(gm, "symbolic_trace", names, trainable, metas, probes, spec)


@contextlib.contextmanager
def _quiet_torch_logs():
    """torch.export logs guards and whole graphs as warnings when it fails: the user gets our one line."""
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            yield
    finally:
        logger.setLevel(level)


_WRAP_GRAD = getattr(torch.ops.higher_order, "wrap_with_set_grad_enabled", None)
_WRAP_AUTOCAST = getattr(torch.ops.higher_order, "wrap_with_autocast", None)


def _attr(root: nn.Module, path: str) -> object:
    obj: object = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
    return obj


def _export_names(wrapped: nn.Module, ep: torch.export.ExportedProgram) -> dict[str, str]:
    """Lifted placeholder -> qualified parameter/buffer/constant name (without the ``model.`` prefix).

    A tied parameter is named as ``named_parameters()`` names it (its first name), whichever alias
    torch.export lifted: the graph then reads one trainable parameter, as a symbolic trace does.
    """
    first: dict[int, str] = {}
    for n, t in list(wrapped.named_parameters()) + list(wrapped.named_buffers()):
        first.setdefault(id(t), n)
    names = {}
    for spec in ep.graph_signature.input_specs:
        if spec.target is not None and hasattr(spec.arg, "name"):
            target = str(spec.target)
            names[spec.arg.name] = first.get(id(_attr(wrapped, target)), target).removeprefix("model.")
    return names


def _inline_wrappers(gm: fx.GraphModule) -> None:
    """Inline torch.export's grad-mode wrappers (``wrap_with_set_grad_enabled``, and autocast wrappers
    that disable autocast) so that the planner sees the ops inside them (rotary tables computed from
    buffers and positions). A no-grad region's outputs are detached: they carry no gradient. Wrappers
    whose body reads attributes (nested wrappers) or whose output is used whole stay as they are."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if _WRAP_GRAD is not None and node.target is _WRAP_GRAD:
            enabled, body_node, *args = node.args
        elif _WRAP_AUTOCAST is not None and node.target is _WRAP_AUTOCAST and node.args[2] is False:
            enabled, (body_node, *args) = True, node.args[4:]
        else:
            continue
        body = getattr(gm, str(body_node.target), None)
        if not isinstance(body, fx.GraphModule) or any(b.op == "get_attr" for b in body.graph.nodes) \
                or any(u.target is not operator.getitem for u in node.users):
            continue
        env: dict[fx.Node, object] = {}
        inputs = iter(args)
        outputs: object = None
        with graph.inserting_before(node):
            for b in body.graph.nodes:
                if b.op == "placeholder":
                    env[b] = next(inputs)
                elif b.op == "output":
                    outputs = fx.node.map_arg(b.args[0], lambda n: env[n])
                else:
                    env[b] = graph.node_copy(b, lambda n: env[n])
        outs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
        for user in list(node.users):
            value = outs[user.args[1]]
            if not enabled and isinstance(value, fx.Node):  # no_grad: the value carries no gradient
                name = user.name
                with graph.inserting_before(user):
                    det = graph.call_function(torch.ops.aten.detach.default, (value,))
                det.meta = dict(user.meta)
                user.replace_all_uses_with(det)
                graph.erase_node(user)
                det.name = name  # keep the name export gave the region's output
            else:
                user.replace_all_uses_with(value)
                graph.erase_node(user)
        graph.erase_node(node)
        if not body_node.users:
            graph.erase_node(body_node)
            if not any(n.op == "get_attr" and n.target == body_node.target for n in graph.nodes):
                delattr(gm, str(body_node.target))
    gm.recompile()


def export_graph(wrapped: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[fx.GraphModule, dict[str, str],
                                                                                   torch.export.ExportedProgram]:
    """torch.export (non-strict) of ``wrapped`` at these inputs: the graph with its grad-mode wrappers
    inlined, and the placeholder -> qualified name map. The runtime exports the same way."""
    with _quiet_torch_logs():
        ep = torch.export.export(wrapped, inputs, strict=False)
        if _mutates(ep.graph_module):  # in-place writes (x[..., 1:] = y, x += y, running statistics): made functional,
            ep = ep.run_decompositions({})  # so that every op's output is a new value the planner may place anywhere
    gm = ep.graph_module
    if any(n.target in (_WRAP_GRAD, _WRAP_AUTOCAST) for n in gm.graph.nodes if n.op == "call_function"):
        _inline_wrappers(gm)
    return gm, _export_names(wrapped, ep), ep


def _mutates(gm: fx.GraphModule) -> bool:
    return any(isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable
               for n in gm.graph.nodes if n.op == "call_function")


def exported_outputs(ep: torch.export.ExportedProgram) -> tuple[int, tuple[tuple[int, str], ...]]:
    """(position of the loss among the graph's outputs, (position, buffer name) of each buffer it updates)."""
    kinds = torch.export.graph_signature.OutputKind
    loss = next(i for i, o in enumerate(ep.graph_signature.output_specs) if o.kind == kinds.USER_OUTPUT)
    updates = tuple((i, str(o.target).removeprefix("model.")) for i, o in enumerate(ep.graph_signature.output_specs)
                    if o.kind == kinds.BUFFER_MUTATION)
    return loss, updates


def _trace_export(model: nn.Module, spec: CallSpec, loss_fn: LossFn | None) -> Captured:
    wrapped, inputs_fn = TrainingLoss.of(model, spec, loss_fn), spec.meta_inputs
    exported = []
    probes = choose_probes(wrapped, inputs_fn)
    for b in probes:
        exported.append(export_graph(wrapped, inputs_fn(b)))
    first, names, ep = exported[0]
    loss_output, buffer_updates = exported_outputs(ep)
    metas = []
    for gm, _, _ in exported:
        nodes = list(gm.graph.nodes)
        if [n.name for n in nodes] != [n.name for n in first.graph.nodes]:
            raise CaptureError("torch.export gave different graphs at two batch sizes: the model branches on the batch size")
        metas.append({n.name: _tensor_meta(n.meta.get("val")) for n in nodes})
    trainable = frozenset(n.removeprefix("model.") for n, p in wrapped.named_parameters() if p.requires_grad)
    return Captured(first, "export", names, trainable, tuple(metas), probes, spec, loss_output, buffer_updates)


_OWN_CODE = (str(Path(torch.__file__).parent), str(Path(__file__).parent))


def _user_frame(exc: BaseException) -> tuple[str, str] | None:
    """(``file:line`` of the innermost frame of the failure outside torch and autoplan, the class of the
    innermost module whose forward it happened in)."""
    line, module = None, None
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if not frame.f_code.co_filename.startswith(_OWN_CODE):
            line = f"{frame.f_code.co_filename}:{tb.tb_lineno}"
            owner = frame.f_locals.get("self")
            if isinstance(owner, nn.Module):
                module = type(owner).__name__
        tb = tb.tb_next
    return (line, module or "forward") if line else None


def _fix_for(exc: BaseException) -> str:
    text = f"{type(exc).__name__} {exc}"
    if "data-dependent" in text or "GuardOnDataDependent" in text or "Could not guard" in text:
        return "replace Python control flow on tensor values there (if/for on .item(), .tolist(), bool(x)) " \
               "with tensor ops (torch.where), or move it out of forward()"
    if "device" in text and ("cuda" in text or "meta" in text):
        return "make forward device-agnostic there (create tensors with device=x.device, no .cuda())"
    return "remove data-dependent Python control flow from forward() there, or pass use_cache=False / " \
           "return_dict=False to library models"


def capture_failure(errors: list[tuple[str, BaseException]]) -> str:
    """One line for a model neither tracer could capture: the tracers' errors, where in the model, the fix."""
    causes = "; ".join(f"{how}: {_one_line(exc)}" for how, exc in errors)
    last = errors[-1][1]
    where = _user_frame(last)
    at = f" in {where[1]} at {where[0]}" if where else ""
    return f"could not capture the model{at} ({causes}): {_fix_for(last)}"


def capture(model: nn.Module, spec: CallSpec, *, loss_fn: LossFn | None = None, method: str = "auto") -> Captured:
    """Trace ``model`` with its loss, called as ``spec`` says (``spec.meta_inputs(batch)`` at each probe).

    ``method``: "symbolic_trace", "export", or "auto" (symbolic first, export on failure).
    Raises CaptureError with one line naming the cause when neither works.
    """
    order = {"auto": ("symbolic_trace", "export"), "symbolic_trace": ("symbolic_trace",), "export": ("export",)}
    if method not in order:
        raise CaptureError(f"unknown capture method {method!r}: use auto, symbolic_trace or export")
    errors: list[tuple[str, BaseException]] = []
    for how in order[method]:
        trace = _trace_symbolic if how == "symbolic_trace" else _trace_export
        try:
            try:
                cap = trace(model, spec, loss_fn)
                if spec.loss == "auto":  # traced without needing targets: the output had its own loss
                    cap = dataclasses.replace(cap, call=dataclasses.replace(spec, loss="model"))
                return cap
            except NeedsTargets as need:  # no loss in the output: the default cross-entropy, traced again
                if need.logits_shape is None and not spec.is_lm:  # fx does not know the logits' shape: export does
                    errors.append((how, need))
                    continue
                spec = with_default_targets(spec, need.logits_shape)
                return trace(model, spec, loss_fn)
        except AutoplanError:
            raise
        except Exception as exc:  # noqa: BLE001 - any tracer failure becomes one line
            errors.append((how, exc))
    raise CaptureError(capture_failure(errors))


def clone_to_meta(model: nn.Module) -> nn.Module:
    """A weightless copy of ``model`` for planning; tied parameters stay tied (``Module.to("meta")`` unties them)."""
    if all(p.device.type == "meta" for p in model.parameters()):
        return model
    memo: dict[int, object] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in memo:
            empty = torch.empty_like(t, device="meta")
            memo[id(t)] = nn.Parameter(empty, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else empty
    return copy.deepcopy(model, memo)
