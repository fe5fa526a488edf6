"""Apply a plan: distribute parameters with DTensor and run the captured graph op by op.

``apply(model, plan)`` re-captures the real model (the fx node names are the plan's op names),
checks the fingerprint and world size, builds the device mesh, turns every parameter into a
DTensor with its planned placements, and returns a ``ParallelModel``. Its forward walks the
fx graph: before each op every tensor input is moved to the placement the plan chose for that
op (``_Reshard``: forward = the planned transition, backward = the gradient's way back), the
op runs under DTensor dispatch (or locally on shards for ops without a CPU DTensor strategy:
SDPA, cross-entropy), and its output is checked against the planned placement.

Gradient synchronisation follows the cost model: gradients of parameters replicated on an
axis stay Partial while micro-batches accumulate and are all-reduced once per step; sharded
parameters are gathered in forward, gathered again in backward (saved-tensor hooks), and
their gradients reduce-scattered per micro-batch.
"""
from __future__ import annotations

import contextlib
import operator
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.distributed.tensor import Partial as DPartial
from torch.distributed.tensor import Replicate as DReplicate
from torch.distributed.tensor import Shard as DShard
from torch.utils._python_dispatch import _disable_current_modes

from autoplan.capture import Captured, capture, clone_to_meta, export_graph, exported_outputs
from autoplan.errors import AutoplanError, PlanMismatchError
from autoplan.graph import OpGraph, build_graph
from autoplan.inputs import CallSpec, LossFn, TrainingLoss, resolve_spec, spec_from_example
from autoplan.plan import Plan
from autoplan.runtime import sync_batch_norm
from autoplan.runtime.moves import (
    PARAM_GRAD,
    DPlacements,
    Trace,
    _aten_ce_kwargs,
    _gathers,
    _is_dropout_noop,
    _local_cross_entropy,
    _local_sdpa,
    grad_dual,
    move,
    normalize,
    placement_str,
    replicate,
    reshard,
    to_dtensor_placements,
)

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


# ------------------------------------------------------------------------------ the planned program


@dataclass
class OpPlan:
    inputs: list[DPlacements]
    producers: list[str]
    output: DPlacements


@dataclass
class Program:
    """Everything the runtime needs from the plan, indexed by fx node name."""

    mesh: DeviceMesh
    gm: fx.GraphModule
    graph: OpGraph
    param_of: dict[str, str]  # fx node -> qualified parameter/buffer name
    ops: dict[str, OpPlan]
    inputs: dict[str, DPlacements]
    params: dict[str, DPlacements]
    consumers: dict[str, list[str]]  # parameter node -> consumer nodes
    split_nodes: dict[str, fx.Node]
    backward_edges: frozenset[tuple[str, str, int]]  # (producer, consumer, input) with a planned gradient move
    export_at: Callable[[int], "RunGraph"] | None = None  # export graphs: the graph to run at a global batch
    call: CallSpec | None = None  # how the model takes a batch (slots, batch dims, targets)
    loss_output: int = 0  # the captured graph's outputs: the loss's position, and buffers it updates
    buffer_updates: tuple[tuple[int, str], ...] = ()


@dataclass
class RunGraph:
    """The fx graph the interpreter walks, with what it derives from it.

    Symbolic traces are generic in the batch: the planner's graph runs at any batch. torch.export
    graphs bake the batch size (and the planning device, meta) into op arguments: they are exported
    again, at the global micro-batch the step runs, with the same node names as the plan's graph.
    """

    gm: fx.GraphModule
    param_of: dict[str, str]  # placeholder/get_attr node -> qualified parameter/buffer/constant name
    split_nodes: dict[str, fx.Node]
    constants: dict[str, torch.Tensor]  # lifted tensor constants of an export (qualified name -> value)
    loss_output: int = 0  # position of the loss among the graph's outputs
    buffer_updates: tuple[tuple[int, str], ...] = ()  # (output position, buffer name): a functional graph's new buffers


_EXPORT_ASSERTS = tuple(
    getattr(torch.ops.aten, name).default
    for name in ("_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range_for_size")
    if hasattr(torch.ops.aten, name)
)


def meta_clone(model: nn.Module) -> nn.Module:
    """A weightless copy that keeps tied parameters tied (see ``autoplan.capture.clone_to_meta``)."""
    return clone_to_meta(model)


def call_spec_for(model: nn.Module, plan: Plan, example_inputs: Any = None, targets: torch.Tensor | None = None,
                  loss_fn: LossFn | None = None) -> CallSpec:
    """How the planner called the model: the plan's record, else (older plans) from the example inputs or
    the plan's sequence length (a language model on token ids)."""
    recorded = plan.data.get("call")
    if recorded:
        spec = CallSpec.from_json(recorded)
        if spec.loss == "custom" and loss_fn is None:
            raise AutoplanError("this plan was made with a custom loss_fn: pass the same loss_fn= to autoplan.apply")
        return spec
    if example_inputs is not None:
        return resolve_spec(meta_clone(model), example_inputs, targets=targets, loss_fn=loss_fn)
    seq = plan.data["training"].get("seq_len")
    if not seq:
        raise AutoplanError("this plan records no inputs and is not for a language model: pass example_inputs= "
                            "to autoplan.apply, or re-plan it")
    with torch.device("meta"):
        tokens = torch.zeros(2, int(seq), dtype=torch.long)
    return spec_from_example((tokens,), targets=tokens)


def recapture(model: nn.Module, plan: Plan, example_inputs: Any = None, targets: torch.Tensor | None = None,
              loss_fn: LossFn | None = None) -> Captured:
    """Capture the real model the way the planner did (names and fingerprint must match)."""
    method = plan.data["model"].get("capture", "auto")
    spec = call_spec_for(model, plan, example_inputs, targets, loss_fn)
    return capture(meta_clone(model), spec, loss_fn=loss_fn, method=method)


# ------------------------------------------------------------------------------ export graphs

_WRAP_GRAD = getattr(torch.ops.higher_order, "wrap_with_set_grad_enabled", None)
_WRAP_AUTOCAST = getattr(torch.ops.higher_order, "wrap_with_autocast", None)


def _split_nodes(gm: fx.GraphModule, ops: dict[str, "OpPlan"], graph: OpGraph) -> dict[str, fx.Node]:
    """fx split nodes (split/chunk/unbind) whose parts the plan places one getitem at a time."""
    return {n.name: n for n in gm.graph.nodes
            if any(u.target is operator.getitem and u.name in ops and ops[u.name] and graph.nodes[u.name].kind == "split"
                   for u in n.users)}


def _retarget_devices(gm: fx.GraphModule, device: torch.device) -> None:
    """Ops of a graph captured on meta create tensors on meta (arange, masks, .to): run them on ``device``."""

    def fix(a: Any) -> Any:
        if isinstance(a, torch.device) and a.type == "meta":
            return device
        if isinstance(a, (list, tuple)):
            return type(a)(fix(x) for x in a)
        return a

    for mod in gm.modules():
        if not isinstance(mod, fx.GraphModule):
            continue
        for node in mod.graph.nodes:
            if node.op != "call_function":
                continue
            args = fix(node.args)
            kwargs = {k: (device if k == "device" and v == "meta" else fix(v)) for k, v in node.kwargs.items()}
            if node.target is _WRAP_AUTOCAST and args and args[0] == "meta":
                args = (device.type, *args[1:])
            if args != node.args:
                node.args = args
            if kwargs != node.kwargs:
                node.kwargs = kwargs


def exporter(meta: nn.Module, spec: CallSpec, loss_fn: LossFn | None, reference: fx.GraphModule,
             device: torch.device) -> Callable[[int], RunGraph]:
    """batch -> the model (with its loss) exported at that global batch, ready to interpret.

    The node names must be the planner's (same ops at every batch size): else the plan does not apply.
    """
    want = [n.name for n in reference.graph.nodes]

    def export_at(batch: int) -> RunGraph:
        inputs = spec.meta_inputs(batch)
        wrapped = TrainingLoss.of(meta, spec, loss_fn)
        # outside the caller's dispatch modes (collective recorders, CommDebugMode): they change the trace
        with _disable_current_modes(), torch.enable_grad():
            gm, param_of, ep = export_graph(wrapped, inputs)
        got = [n.name for n in gm.graph.nodes]
        if got != want:
            diff = next((f"{a} != {b}" for a, b in zip(got, want) if a != b), f"{len(got)} != {len(want)} nodes")
            raise PlanMismatchError(f"torch.export gives another graph at batch {batch} than the plan's ({diff}): "
                                    f"the model branches on the batch size")
        constants: dict[str, torch.Tensor] = {}
        for inp in ep.graph_signature.input_specs:
            value = ep.constants.get(inp.target) if inp.target is not None else None
            if isinstance(value, torch.Tensor) and value.device.type != "meta" and hasattr(inp.arg, "name"):
                constants[param_of[inp.arg.name]] = value  # made in forward from Python data: real at trace time
        _retarget_devices(gm, device)
        return RunGraph(gm, param_of, {}, constants, *exported_outputs(ep))

    return export_at


def check_plan(plan: Plan, graph: OpGraph, world_size: int) -> None:
    if graph.fingerprint != plan.fingerprint:
        raise PlanMismatchError(
            f"the plan was made for another model (fingerprint {plan.fingerprint}, this model {graph.fingerprint}): "
            f"re-plan it with `autoplan plan`"
        )
    if plan.world_size != world_size:
        raise PlanMismatchError(
            f"the plan is for {plan.world_size} ranks but the process group has {world_size}: "
            f"launch {plan.world_size} ranks or re-plan for {world_size}"
        )


def build_program(plan: Plan, cap: Captured, graph: OpGraph, mesh: DeviceMesh) -> Program:
    ops = {o["name"]: OpPlan([to_dtensor_placements(p) for p in o["inputs"]], list(o["producers"]),
                             to_dtensor_placements(o["output"])) for o in plan.ops}
    params = {q: to_dtensor_placements(p) for q, p in plan.params.items()}
    consumers: dict[str, list[str]] = {}
    for name, op in ops.items():
        for src in op.producers:
            if graph.nodes.get(src) is not None and graph.nodes[src].kind == "param":
                consumers.setdefault(src, []).append(name)
    splits = _split_nodes(cap.graph_module, ops, graph)
    return Program(mesh, cap.graph_module, graph, dict(cap.param_names), ops,
                   {k: to_dtensor_placements(v) for k, v in plan.data["inputs"].items()}, params, consumers, splits,
                   frozenset((c["src"], c["dst"], int(c["input"])) for c in plan.data["collectives"] if c["phase"] == "backward"))


def make_mesh(plan: Plan) -> DeviceMesh:
    m = plan.data["mesh"]
    return init_device_mesh("cpu", tuple(m["shape"]), mesh_dim_names=tuple(m["axis_names"]))


def distribute_parameters(model: nn.Module, params: dict[str, DPlacements], mesh: DeviceMesh) -> dict[str, nn.Parameter]:
    """Swap every parameter for a DTensor parameter with its planned placements (tied ones stay tied)."""
    new: dict[int, nn.Parameter] = {}
    by_name: dict[str, nn.Parameter] = {}
    aliases: dict[int, list[str]] = {}
    for qual, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(qual)
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for pname, p in list(mod._parameters.items()):
            if p is None:
                continue
            qual = f"{mod_name}.{pname}" if mod_name else pname
            if id(p) not in new:
                placements = next((params[a] for a in aliases.get(id(p), [qual]) if a in params), (DReplicate(),) * mesh.ndim)
                new[id(p)] = nn.Parameter(distribute_tensor(p.detach(), mesh, list(placements)), requires_grad=p.requires_grad)
            setattr(mod, pname, new[id(p)])
            by_name[qual] = new[id(p)]
    return by_name


# ------------------------------------------------------------------------------ the parallel model


class ParallelModel:
    """A model with its parameters distributed per a plan; ``train_step`` runs one planned step."""

    def __init__(self, model: nn.Module, plan: Plan, program: Program, params: dict[str, nn.Parameter],
                 optimizer: torch.optim.Optimizer | None):
        self.module = model
        self.plan = plan
        self.program = program
        self.mesh = program.mesh
        self.params = params
        self.optimizer = optimizer
        self.trace = Trace()
        self._gathered: dict[int, tuple[nn.Parameter, DPlacements, str]] = {}
        self.unplanned: list[str] = []  # ops whose output placement had to be fixed after the op
        self._buffers = {n: replicate(b, self.mesh) for n, b in model.named_buffers(remove_duplicate=False)}
        self.micro_batches = int(plan.data["training"].get("micro_batches", 1) or 1)
        self.bucket_grads = True  # one all-reduce per bucket instead of per parameter (same bytes)
        self._rg = RunGraph(program.gm, program.param_of, program.split_nodes, {}, program.loss_output,
                            program.buffer_updates)  # the graph being run
        self._run_graphs: dict[int, RunGraph] = {}  # export graphs, by global micro-batch
        self._last_uses_by_graph: dict[int, dict[str, list[str]]] = {}

    def _run_graph(self, batch: int) -> RunGraph:
        """The graph to interpret for a global (micro-)batch: the plan's, or an export at that batch."""
        export_at = self.program.export_at
        if export_at is None:
            return self._rg
        rg = self._run_graphs.get(batch)
        if rg is None:
            rg = export_at(batch)
            rg.split_nodes = _split_nodes(rg.gm, self.program.ops, self.program.graph)
            self._run_graphs[batch] = rg
        return rg

    # -------------------------------------------------------------------------- inputs

    def shard_inputs(self, *tensors: torch.Tensor) -> list[DTensor]:
        """The same global batch on every rank -> DTensors with the plan's input placements (local chunks)."""
        names = [n.name for n in self.program.gm.graph.nodes if n.op == "placeholder" and n.name not in self.program.param_of]
        out = []
        for name, t in zip(names, tensors):
            dst = self.program.inputs.get(name, (DReplicate(),) * self.mesh.ndim)
            out.append(move(replicate(t, self.mesh), dst))
        return out

    # -------------------------------------------------------------------------- forward

    def _value_of_attr(self, qual: str) -> DTensor:
        if qual in self.params:
            return self.params[qual]
        if qual in self._buffers:
            return self._buffers[qual]
        value = self._constant(qual)
        if value is None:
            raise AutoplanError(f"the graph reads {qual}, which the model has no parameter or buffer for")
        return value

    def _constant(self, qual: str) -> DTensor | None:
        """A tensor constant of an export graph: a plain tensor attribute of the model (its real value,
        not the planning copy's meta one), or a tensor made from Python data in forward."""
        cache = self.__dict__.setdefault("_constants", {})
        if qual in cache:
            return cache[qual]
        owner, _, attr = qual.rpartition(".")
        try:
            value = getattr(self.module.get_submodule(owner), attr)
        except AttributeError:
            value = self._rg.constants.get(qual)
        if not isinstance(value, torch.Tensor) or value.device.type == "meta":
            return None
        cache[qual] = replicate(value.detach(), self.mesh)
        return cache[qual]

    def _get_attr(self, gm: fx.GraphModule, node: fx.Node) -> Any:
        """get_attr: a parameter/buffer of the model, or a submodule of the graph (a higher-order op's body)."""
        target = str(node.target)
        qual = self._rg.param_of.get(node.name, target.removeprefix("model."))
        if qual in self.params or qual in self._buffers:
            return self._value_of_attr(qual)
        owner, _, attr = target.rpartition(".")
        sub = getattr(gm.get_submodule(owner), attr, None)
        if isinstance(sub, nn.Module):
            return sub
        return self._value_of_attr(qual)

    def _grad_dst(self, src: str, value: DTensor) -> DPlacements:
        pl = normalize(value.placements, value.ndim)
        graph = self.program.graph
        if src in graph.nodes and graph.nodes[src].kind == "param":
            return PARAM_GRAD
        return grad_dual(pl)

    def _prepare(self, value: Any, src: str, dst_pl: DPlacements, dst: str, pos: int) -> Any:
        if not isinstance(value, DTensor):
            if not isinstance(value, torch.Tensor):
                return value
            value = replicate(value, self.mesh)
        if self._nothing_to_do(value, src, dst_pl, dst, pos):
            return value
        out = reshard(value, dst_pl, self._grad_dst(src, value), self.trace, (src, dst))
        if isinstance(value, nn.Parameter) and _gathers(normalize(value.placements, value.ndim), dst_pl):
            self._gathered[out._local_tensor.untyped_storage().data_ptr()] = (value, dst_pl, src)
        return out

    def _nothing_to_do(self, value: DTensor, src: str, dst_pl: DPlacements, dst: str, pos: int) -> bool:
        """No move in forward, and none planned for the gradient: skip the autograd node (fast path).

        A parameter's gradient then reaches AccumulateGrad as the op made it (Partial on the axes
        where it is replicated: all-reduced once per step by ``sync_grads``)."""
        if normalize(value.placements, value.ndim) != dst_pl:
            return False
        node = self.program.graph.nodes.get(src)
        return (node is not None and node.kind == "param") or (src, dst, pos) not in self.program.backward_edges

    def _args_for(self, node: fx.Node, env: dict[str, Any], op: OpPlan | None, dst: str | None = None) -> tuple[Any, Any]:
        """Node args with each planned tensor input moved to the op's planned placement (``dst``: the plan's name
        of the op, when it is another node's: an output of a multi-output op)."""
        dst = dst or node.name
        counter = [0]
        graph_nodes = self.program.graph.nodes

        def fetch(n: fx.Node) -> Any:
            value = env[n.name]
            if op is None or n.name not in graph_nodes and n.name not in self._rg.split_nodes \
                    and n.name not in self._rg.param_of:  # (a tied parameter's other node: merged in the plan)
                return value
            i = counter[0]
            counter[0] += 1
            if i >= len(op.inputs):  # past the op's data inputs: a shape or dtype lender (x.type_as(y))
                return value
            return self._prepare(value, op.producers[i], op.inputs[i], dst, i)

        args = fx.node.map_arg(node.args, fetch)
        kwargs = fx.node.map_arg(node.kwargs, fetch)
        return args, kwargs

    def _call(self, node: fx.Node, args: Any, kwargs: Any, op: OpPlan | None, label: str | None = None) -> Any:
        """Run one op (``label``: the plan's name of it, for the collectives it issues itself)."""
        target, label = node.target, label or node.name
        if target in _EXPORT_ASSERTS:
            return None  # torch.export's metadata checks record the planning (meta) device: not a computation
        if node.op == "call_method":
            self_obj, *rest = args
            return getattr(self_obj, target)(*rest, **kwargs)
        if node.op == "call_module":
            raise AutoplanError(f"module {target} was traced as a leaf: the runtime needs a flat trace")
        if target in (F.scaled_dot_product_attention, torch.ops.aten.scaled_dot_product_attention.default):
            return _local_sdpa(list(args), dict(kwargs), op.output if op else ())
        if target in (F.cross_entropy, torch.ops.aten.cross_entropy_loss.default) and isinstance(args[0], DTensor):
            ce_args, ce_kwargs = ((list(args), dict(kwargs)) if target is F.cross_entropy
                                  else (list(args[:2]), _aten_ce_kwargs(args[2:], kwargs)))
            with self.trace.scope("forward", label, label):  # the loss's own all-reduces (count, vocab-parallel)
                return _local_cross_entropy(ce_args, ce_kwargs)
        if target in (F.dropout, torch.dropout, torch.ops.aten.dropout.default) and _is_dropout_noop(node):
            return args[0]
        if target in sync_batch_norm.SPELLINGS and isinstance(args[0], DTensor):
            with self.trace.scope("forward", label, label):  # the statistics' all-reduces, as priced
                return sync_batch_norm.batch_norm(target, args, kwargs, self.trace, label)
        if target is _WRAP_GRAD or target is _WRAP_AUTOCAST:
            return self._call_wrapped(target, args)
        kind = self.program.graph.nodes[label].kind if label in self.program.graph.nodes else None
        if op is not None and kind in ("constant", "fill_like"):  # reads no values: made at its planned placement
            return make_at(target, args, kwargs, op.output, self.mesh)
        if target is torch.ops.aten.copy.default:  # a functional graph's x.copy_(src): src as x's shape and
            dst, src = args[0], args[1]  # dtype (aten.copy itself has no derivative)
            return src.to(dst.dtype).expand(dst.shape) if isinstance(src, torch.Tensor) else target(*args, **kwargs)
        if op is not None and kind in LOCAL_KINDS:  # DTensor's support is partial (no backward strategy)
            return run_locally(target, args, kwargs, op.inputs, op.output)
        if isinstance(target, torch._ops.OpOverload):  # a plain tensor beside DTensors: the same on every rank
            args, kwargs = _replicate_plain(args, kwargs, self.mesh)
        try:
            return target(*args, **kwargs)
        except NotImplementedError:  # DTensor has no strategy for it: the planned rule, on local shards
            if op is None:
                raise
            return run_locally(target, args, kwargs, op.inputs, op.output)

    def _call_wrapped(self, target: Any, args: Sequence[Any]) -> Any:
        """torch.export's higher-order wrappers (rotary code under no_grad / autocast): run the body
        graph under the same grad or autocast mode (its values are replicated: no placements planned)."""
        if target is _WRAP_GRAD:
            enabled, body, *rest = args
            ctx: contextlib.AbstractContextManager = torch.set_grad_enabled(bool(enabled))
        else:
            device_type, dtype, enabled, cache_enabled, body, *rest = args
            ctx = torch.autocast(device_type=device_type, dtype=dtype, enabled=bool(enabled),
                                 cache_enabled=cache_enabled)
        with ctx:
            return self._run_body(body, rest)

    def _run_body(self, body: fx.GraphModule, args: Sequence[Any]) -> Any:
        env: dict[str, Any] = {}
        inputs = iter(args)
        for node in body.graph.nodes:
            if node.op == "placeholder":
                env[node.name] = next(inputs)
            elif node.op == "get_attr":
                owner, _, attr = str(node.target).rpartition(".")
                env[node.name] = getattr(body.get_submodule(owner), attr)
            elif node.op == "output":
                return fx.node.map_arg(node.args[0], lambda n: env[n.name])
            else:
                a = fx.node.map_arg(node.args, lambda n: env[n.name])
                k = fx.node.map_arg(node.kwargs, lambda n: env[n.name])
                env[node.name] = self._call(node, a, k, None)
        raise AutoplanError("a higher-order op's body has no output")

    def _regather_hooks(self, name: str) -> contextlib.AbstractContextManager:
        """FSDP semantics: a gathered parameter is not kept for backward; backward gathers it again."""
        gathered = dict(self._gathered)
        self._gathered.clear()
        if not gathered:
            return contextlib.nullcontext()
        trace = self.trace

        def pack(t: torch.Tensor) -> Any:
            if isinstance(t, DTensor):
                key = t._local_tensor.untyped_storage().data_ptr()
                if key in gathered:
                    loc = t._local_tensor
                    return ("regather", gathered[key], loc.size(), loc.stride(), loc.storage_offset(),
                            t.placements, t.shape, t.stride(), t.requires_grad)
            return t

        def unpack(saved: Any) -> torch.Tensor:
            if not (isinstance(saved, tuple) and saved and saved[0] == "regather"):
                return saved
            _, (param, dst, src), size, stride, offset, placements, shape, gstride, _rg = saved
            with torch.no_grad(), trace.scope("backward", src, name):
                full = move(param.detach(), dst)
            local = full._local_tensor.as_strided(size, stride, offset)
            return DTensor.from_local(local, param.device_mesh, placements, run_check=False, shape=shape, stride=gstride)

        return torch.autograd.graph.saved_tensors_hooks(pack, unpack)

    def _fix_output(self, node: fx.Node, out: Any, op: OpPlan) -> Any:
        if isinstance(out, torch.Tensor) and not isinstance(out, DTensor):
            out = replicate(out, self.mesh)
        if not isinstance(out, DTensor):
            return out
        have = normalize(out.placements, out.ndim)
        if have != op.output:
            self.unplanned.append(f"{node.name}: {[placement_str(p) for p in have]} -> {[placement_str(p) for p in op.output]}")
            out = reshard(out, op.output, grad_dual(have), self.trace, (node.name, node.name))
        return out

    def loss(self, *inputs: DTensor) -> DTensor:
        """Run the planned forward on sharded inputs (from ``shard_inputs``): the loss as a DTensor."""
        env: dict[str, Any] = {}
        placeholders = iter(inputs)
        rg = self._rg = self._run_graph(self._batch_of(inputs)) if inputs else self._rg
        last_uses = self._last_uses
        for node in rg.gm.graph.nodes:
            if node.op == "placeholder" and node.name in rg.param_of:  # torch.export lifts parameters
                env[node.name] = self._value_of_attr(rg.param_of[node.name])
            elif node.op == "placeholder":
                env[node.name] = next(placeholders)
            elif node.op == "get_attr":
                env[node.name] = self._get_attr(rg.gm, node)
            elif node.op == "output":
                out = fx.node.map_arg(node.args[0], lambda n: env[n.name])
                outs = list(out) if isinstance(out, (tuple, list)) else [out]  # export: (new buffers..., loss)
                self._update_buffers(rg, outs)
                return outs[rg.loss_output]
            elif node.name in rg.split_nodes:
                env[node.name] = node  # evaluated per getitem, after moving its source
            else:
                env[node.name] = self._run(node, env)
            for freed in last_uses.get(node.name, ()):
                env.pop(freed, None)
        raise AutoplanError("the traced graph has no output")

    def _update_buffers(self, rg: RunGraph, outs: list[Any]) -> None:
        """A functional graph returns the new values of the buffers it updates (running statistics): store them."""
        with torch.no_grad():
            for i, qual in rg.buffer_updates:
                value = outs[i]
                local = value.full_tensor() if isinstance(value, DTensor) else value
                self.module.get_buffer(qual).copy_(local)

    def _picked_by(self, node: fx.Node) -> fx.Node | None:
        """The first planned output of a multi-output op (``getitem(op, i)``): its plan moves the op's inputs."""
        ops = self.program.ops
        return next((u for u in node.users if u.target is operator.getitem and u.name in ops), None)

    def _run(self, node: fx.Node, env: dict[str, Any]) -> Any:
        prog = self.program
        op = prog.ops.get(node.name)
        splits = self._rg.split_nodes
        picker = self._picked_by(node) if op is None and node.op == "call_function" else None
        if picker is not None:  # a multi-output op the plan places through its outputs
            args, kwargs = self._args_for(node, env, prog.ops[picker.name], dst=picker.name)
            return self._call(node, args, kwargs, prog.ops[picker.name], label=picker.name)
        if node.target is operator.getitem and isinstance(node.args[0], fx.Node) and node.args[0].name in splits:
            split = splits[node.args[0].name]
            src = split.args[0]
            value = env[src.name]
            if op is not None:
                value = self._prepare(value, op.producers[0], op.inputs[0], node.name, 0)
            args = (value, *fx.node.map_arg(split.args[1:], lambda n: env[n.name]))
            kwargs = fx.node.map_arg(split.kwargs, lambda n: env[n.name])
            out = self._split_part(split, args, kwargs, int(node.args[1]))
        else:
            args, kwargs = self._args_for(node, env, op)
            with self._regather_hooks(node.name):
                out = self._call(node, args, kwargs, op)
        return self._fix_output(node, out, op) if op is not None else out

    def _split_part(self, split: fx.Node, args: tuple, kwargs: dict, idx: int) -> Any:
        """Part ``idx`` of a split as a narrow/select of its source (a split's backward would mix in
        plain zero tensors for the parts this getitem does not use)."""
        value = args[0]
        with torch.no_grad():
            parts = self._call(split, args, kwargs, None)
        part = parts[idx]
        if part.ndim == value.ndim:
            dim = next((d for d in range(value.ndim) if part.shape[d] != value.shape[d]), 0)
            start = sum(int(p.shape[dim]) for p in parts[:idx])
            return value.narrow(dim, start, int(part.shape[dim]))
        dim = int(kwargs.get("dim", args[1] if len(args) > 1 else 0))
        return value.select(dim, idx)

    @property
    def _last_uses(self) -> dict[str, list[str]]:
        rg = self._rg
        cached = self._last_uses_by_graph.get(id(rg.gm))
        if cached is None:
            seen: set[str] = set()
            cached = {}
            splits = rg.split_nodes
            for node in reversed(list(rg.gm.graph.nodes)):
                deps = list(node.all_input_nodes)
                if node.name in splits or node.op == "output":
                    deps = []  # split nodes are read through their source by each getitem
                if node.target is operator.getitem and node.args and isinstance(node.args[0], fx.Node) \
                        and node.args[0].name in splits:
                    deps = list(splits[node.args[0].name].all_input_nodes)
                for d in deps:
                    if d.name not in seen:
                        seen.add(d.name)
                        cached.setdefault(node.name, []).append(d.name)
            self._last_uses_by_graph[id(rg.gm)] = cached
        return cached

    # -------------------------------------------------------------------------- training

    def micro_slices(self, batch: int) -> list[slice]:
        m = self.micro_batches
        if batch % m:
            raise AutoplanError(f"the batch of {batch} samples does not split into the plan's {m} micro-batches")
        size = batch // m
        return [slice(i * size, (i + 1) * size) for i in range(m)]

    def _batch_of(self, tensors: Sequence[torch.Tensor]) -> int:
        call = self.program.call
        return call.batch_size(tensors) if call is not None else int(tensors[0].shape[0])

    def _slice(self, tensors: Sequence[torch.Tensor], sl: slice) -> tuple[torch.Tensor, ...]:
        call = self.program.call
        return call.slice(tensors, sl) if call is not None else tuple(t[sl] for t in tensors)

    def forward_backward(self, *tensors: torch.Tensor) -> DTensor:
        """Forward and backward of every micro-batch of a GLOBAL batch, then the gradient sync.

        Returns the summed (over micro-batches, already averaged) loss as a DTensor, not reduced.
        """
        total: DTensor | None = None
        scale = 1.0 / self.micro_batches
        for sl in self.micro_slices(self._batch_of(tensors)):
            inputs = self.shard_inputs(*self._slice(tensors, sl))
            loss = self.loss(*inputs) * scale if self.micro_batches > 1 else self.loss(*inputs)
            pl = normalize(loss.placements, loss.ndim)
            loss.to_local(grad_placements=grad_dual(pl)).backward()
            total = loss.detach() if total is None else total + loss.detach()
        self.sync_grads()
        assert total is not None
        return total

    def sync_grads(self) -> None:
        """The deferred gradient all-reduces: Partial gradients of replicated parameters -> Replicate.

        With ``bucket_grads`` (the default) the gradients that need the same all-reduces are
        flattened into one buffer per group of mesh axes (as DDP buckets them): the same bytes
        in fewer collectives. Without it, one all-reduce per parameter, as the plan lists them.
        """
        buckets: dict[tuple, list[tuple[str, nn.Parameter]]] = {}
        seen: set[int] = set()
        for qual, p in self.params.items():
            if id(p) in seen:  # a tied parameter: one gradient, synced once
                continue
            seen.add(id(p))
            if p.grad is None or not isinstance(p.grad, DTensor):
                continue
            want = normalize(p.placements, p.ndim)
            have = normalize(p.grad.placements, p.ndim)
            if have == want:
                continue
            axes = tuple(a for a, (h, w) in enumerate(zip(have, want)) if h != w)
            if self.bucket_grads and all(have[a].is_partial() and isinstance(want[a], DReplicate) for a in axes):
                buckets.setdefault((axes, p.grad.dtype), []).append((qual, p))
                continue
            with self.trace.scope("backward", *self._grad_edge(qual)):
                p.grad = p.grad.redistribute(p.device_mesh, list(want))
        for (axes, _), members in buckets.items():
            self._all_reduce_bucket(axes, members)

    def _all_reduce_bucket(self, axes: tuple[int, ...], members: list[tuple[str, nn.Parameter]]) -> None:
        import torch.distributed as dist

        locals_ = [p.grad.to_local().reshape(-1) for _, p in members]
        flat = torch.cat(locals_)
        # the per-parameter all-reduces (as the plan lists them) this bucket merges, for the recorder
        labels = tuple((*self._grad_edge(qual), loc.numel() * loc.element_size()) for (qual, _), loc in zip(members, locals_))
        with self.trace.scope("backward", "bucket", "*", members=labels):
            for axis in axes:
                dist.all_reduce(flat, group=self.mesh.get_group(axis))
        offset = 0
        for (_, p), loc in zip(members, locals_):
            piece = flat[offset:offset + loc.numel()].view(p.grad.to_local().shape)
            offset += loc.numel()
            p.grad = DTensor.from_local(piece, p.device_mesh, list(p.placements), run_check=False,
                                        shape=p.shape, stride=p.stride())

    def _param_node(self, qual: str) -> str:
        """The graph node of a parameter (by identity: tied names share one node)."""
        by_id = self.__dict__.get("_node_by_id")
        if by_id is None:
            by_id = self._node_by_id = {id(self.params[q]): node for node, q in self.program.param_of.items()
                                        if q in self.params and node in self.program.graph.nodes}
        return by_id.get(id(self.params[qual]), qual)

    def _grad_edge(self, qual: str) -> tuple[str, str]:
        """(parameter node, consumer node) the plan lists a parameter's deferred gradient all-reduce
        under: its one consumer, or "*" (any of its edges) when several ops read it."""
        node = self._param_node(qual)
        cons = self.program.consumers.get(node, [])
        return node, cons[0] if len(cons) == 1 else "*"

    def batch_tensors(self, batch: Any, targets: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """The flat tensors of a user's batch (dict / tuple / tensor, then targets), in the graph's order."""
        call = self.program.call
        if call is None:
            return (batch, targets) if targets is not None else tuple(batch)
        return call.flatten(batch, targets)

    def train_step(self, batch: Any, targets: torch.Tensor | None = None) -> float:
        """One step on the same GLOBAL batch on every rank; returns the global mean loss.

        ``batch`` as the model was planned: a dict of keyword inputs (``train_step(batch_dict)``, labels
        inside when the model returns its own loss), or inputs then targets (``train_step(inputs, targets)``).
        """
        loss = self.forward_backward(*self.batch_tensors(batch, targets))
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return global_loss(loss)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Unsharded parameters and buffers, on every rank (collective: call it on all ranks)."""
        out: dict[str, torch.Tensor] = {}
        for name, value in self.module.state_dict(keep_vars=True).items():
            out[name] = value.full_tensor().detach() if isinstance(value, DTensor) else value.detach()
        return out

    def full_grads(self) -> dict[str, torch.Tensor]:
        return {n: p.grad.full_tensor() for n, p in self.params.items() if p.grad is not None}


LOCAL_KINDS = frozenset({"pool", "scatter_view"})  # run on each rank's shards as their rule says, forward and backward


def _replicate_plain(args: Any, kwargs: Any, mesh: DeviceMesh) -> tuple[Any, Any]:
    """Plain tensors among an op's DTensor arguments (values made outside the plan: lifted constants,
    unplanned ops' outputs) as replicated DTensors; unchanged when no argument is a DTensor."""
    if not any(isinstance(a, DTensor) for a in _flatten(args, kwargs)):
        return args, kwargs

    def wrap(a: Any) -> Any:
        return replicate(a, mesh) if isinstance(a, torch.Tensor) and not isinstance(a, DTensor) else a

    return fx.node.map_aggregate(args, wrap), fx.node.map_aggregate(kwargs, wrap)


def run_locally(target: Any, args: Any, kwargs: Any, ins: list[DPlacements], out: DPlacements) -> Any:
    """An op run on each rank's shards, its output wrapped with the planned placement: what a one-axis rule
    promises (``tests/test_rules.py`` checks every rule so). For ops DTensor has no strategy for (``aten.copy``);
    inputs are already at their planned placements. A replicated input of an op split across an axis gets a
    partial gradient there (a weight's gradient under data parallelism)."""
    mesh = next(a.device_mesh for a in _flatten(args, kwargs) if isinstance(a, DTensor))
    split = {a for pl in (*ins, out) for a, p in enumerate(pl) if isinstance(p, DShard)}

    def local(t: Any) -> Any:
        if not isinstance(t, DTensor):
            return t
        grads = [DPartial() if a in split and isinstance(p, DReplicate) else
                 DReplicate() if isinstance(p, DPartial) else p for a, p in enumerate(t.placements)]
        return t.to_local(grad_placements=grads)

    args, kwargs = fx.node.map_aggregate(args, local), fx.node.map_aggregate(kwargs, local)
    args, kwargs = _local_groups(target, args, kwargs)
    result = target(*args, **kwargs)
    return fx.node.map_aggregate(result, lambda r: DTensor.from_local(r, mesh, list(out), run_check=False)
                                 if isinstance(r, torch.Tensor) else r)


_FILLS = {"zeros_like": 0.0, "ones_like": 1.0, "empty_like": 0.0}


def make_at(target: Any, args: Any, kwargs: Any, out: DPlacements, mesh: DeviceMesh) -> Any:
    """A tensor made from sizes and fills (``x.new_zeros(size)``, ``torch.arange``, ``zeros_like(x)``), whose
    tensor arguments lend only a dtype and a shape: made directly at its planned placement, no collective."""
    from torch.distributed.tensor import full as dfull

    name = getattr(target, "__name__", str(target)).split(".")[0]
    like = args[0] if args and isinstance(args[0], DTensor) else None
    if like is not None and name in ("zeros_like", "ones_like", "empty_like", "full_like"):
        value = args[1] if name == "full_like" else _FILLS[name]
        dtype = kwargs.get("dtype") or like.dtype
        return dfull(tuple(like.shape), value, dtype=dtype, device_mesh=mesh, placements=list(out))
    plain = fx.node.map_aggregate(args, lambda a: a.to_local() if isinstance(a, DTensor) else a)
    result = target(*plain, **kwargs)
    if isinstance(result, DTensor) or not isinstance(result, torch.Tensor):
        return result
    made = replicate(result, mesh)  # every rank made the same tensor: a split is a local chunk
    return made if all(isinstance(p, DReplicate) for p in out) else made.redistribute(mesh, list(out))


_CONV_GROUPS = {torch.ops.aten.convolution.default: 8, torch.ops.aten._convolution.default: 8}  # else 6


def _local_groups(target: Any, args: Any, kwargs: Any) -> tuple[Any, Any]:
    """A depthwise convolution split on its channels: each rank convolves its own channels (groups = local channels)."""
    if getattr(target, "__name__", "").split(".")[0] not in ("conv1d", "conv2d", "conv3d", "convolution", "_convolution"):
        return args, kwargs
    pos = _CONV_GROUPS.get(target, 6)
    groups = kwargs.get("groups", args[pos] if len(args) > pos else 1)
    x = args[0]
    if not isinstance(groups, int) or groups <= 1 or x.shape[1] >= groups:
        return args, kwargs
    local = int(x.shape[1])  # fewer channels here than the op's groups: a channel-split depthwise convolution
    if "groups" in kwargs:
        return args, {**kwargs, "groups": local}
    return (*args[:pos], local, *args[pos + 1:]), kwargs


def _flatten(args: Any, kwargs: Any) -> list[Any]:
    found: list[Any] = []
    fx.node.map_aggregate((args, kwargs), lambda a: found.append(a) or a)
    return found


def global_loss(loss: DTensor) -> float:
    """The global mean of a scalar DTensor loss in ONE all-reduce over all ranks, as the cost model
    prices the step's loss report (``full_tensor`` would all-reduce once per partial mesh axis)."""
    import torch.distributed as dist
    from torch.distributed.tensor import Partial

    mesh = loss.device_mesh
    if loss.ndim or mesh.size() != dist.get_world_size() or mesh.size() == 1:
        return float(loss.full_tensor())
    value = loss.to_local().detach().double().reshape(())
    for size, p in zip(mesh.shape, loss.placements):
        if isinstance(p, DReplicate) or (isinstance(p, Partial) and p.reduce_op == "avg"):
            value = value / size  # the world sum counts a replicated value once per rank of this axis
        elif not (isinstance(p, Partial) and p.reduce_op == "sum"):
            return float(loss.full_tensor())
    dist.all_reduce(value)
    return float(value)


def apply(model: nn.Module, plan: Plan | str, *, optimizer: OptimizerFactory | None = None,
          example_inputs: Any = None, loss_fn: LossFn | None = None) -> ParallelModel:
    """Distribute ``model`` per ``plan`` on the current process group (call on every rank).

    ``optimizer`` is a factory, e.g. ``lambda params: torch.optim.AdamW(params, lr=1e-3)``.
    ``example_inputs`` is needed only for plans that do not record their inputs (older plans);
    ``loss_fn`` only for plans made with a custom ``loss_fn``.
    """
    import torch.distributed as dist

    plan = plan if isinstance(plan, Plan) else Plan.load(plan)
    if not dist.is_initialized():
        raise AutoplanError("autoplan.apply needs an initialised process group: run under torchrun and call "
                            "torch.distributed.init_process_group('gloo') first")
    method = plan.data["model"].get("capture", "auto")
    spec = call_spec_for(model, plan, example_inputs, None, loss_fn)
    meta = meta_clone(model)
    cap = capture(meta, spec, loss_fn=loss_fn, method=method)
    spec = cap.call or spec
    graph = build_graph(cap)
    check_plan(plan, graph, dist.get_world_size())
    mesh = make_mesh(plan)
    program = build_program(plan, cap, graph, mesh)
    program.call = spec
    program.loss_output, program.buffer_updates = cap.loss_output, cap.buffer_updates
    if cap.method == "export":  # the batch (and the meta device) are baked into the ops: export per batch
        program.export_at = exporter(meta, spec, loss_fn, cap.graph_module, torch.device(mesh.device_type))
    params = distribute_parameters(model, program.params, mesh)
    pm = ParallelModel(model, plan, program, params, None)
    training = plan.data["training"]
    if program.export_at is not None and training.get("global_batch"):  # export now for the planned micro-batch
        pm._run_graph(int(training["global_batch"]) // int(training.get("micro_batches", 1) or 1))
    pm.optimizer = optimizer(list(dict.fromkeys(params.values()))) if optimizer is not None else None
    return pm
