"""Graph IR: one node per tensor-producing op, with canonical kind, shapes, FLOPs and module path.

The fx graph from ``capture`` is normalised here: every torch/aten spelling of an op maps to
one *kind* ("linear", "sdpa", ...), non-tensor nodes (sizes, shapes) are dropped, multi-output
ops become one node per output, and parameters become nodes of their own. Shapes are stored per
unit of batch so any micro-batch size can be priced. Repeated layers (the N identical blocks of
a transformer) are found so the solver can price one block and reuse it.

Kinds, FLOPs and what each op saves for backward come from the op registry (``autoplan/ops``):
to support a new op, register it there.
"""
from __future__ import annotations

import hashlib
import math
import operator
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

import networkx as nx
import torch
import torch.fx as fx

from autoplan import ops
from autoplan.capture import Captured
from autoplan.errors import CaptureError
from autoplan.ops import ALIAS_KINDS, RuleCtx, base_name, kind_of

SPLIT_SPELLINGS = ("split", "chunk", "unbind", "tensor_split", torch.split, torch.chunk, torch.unbind, torch.tensor_split,
                   torch.ops.aten.split, torch.ops.aten.chunk, torch.ops.aten.unbind, torch.ops.aten.split_with_sizes,
                   torch.ops.aten.tensor_split)  # multi-output views: each part becomes a "split" node

def _is_split(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in SPLIT_SPELLINGS
    packet = getattr(node.target, "overloadpacket", node.target)
    try:
        return node.op == "call_function" and packet in SPLIT_SPELLINGS
    except TypeError:
        return False

@dataclass(frozen=True)
class Tensor:
    """Shape of a tensor per unit of batch: dims in ``batch_dims`` have size base[d] * batch."""

    base: tuple[int, ...]
    batch_dims: frozenset[int]
    dtype: torch.dtype

    def shape(self, batch: int) -> tuple[int, ...]:
        return tuple(s * batch if d in self.batch_dims else s for d, s in enumerate(self.base))

    def numel(self, batch: int) -> int:
        return math.prod(self.shape(batch))

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point

@dataclass
class OpNode:
    name: str  # fx node name
    kind: str  # canonical kind (see KINDS), or "param", "buffer", "input", "split", "slice", "unknown"
    target: str  # printable op name, for reports and the list of ops with no rule
    inputs: tuple[str, ...]  # producers of the tensor inputs, in argument order
    out: Tensor
    attrs: dict[str, Any] = field(default_factory=dict)
    module: str = ""  # owning module path, e.g. "blocks.3.attn.qkv"
    param: str | None = None  # qualified name for kind "param"/"buffer"
    trainable: bool = False
    constant: bool = False  # computed from buffers and constants only: carries no gradient

@dataclass
class OpGraph:
    nodes: dict[str, OpNode]  # topological order
    dag: nx.DiGraph  # producer -> consumer edges (key "index": input position)
    loss: str  # the node whose output is the scalar loss
    method: str  # capture method
    fingerprint: str  # sha256 of parameter names/shapes and op kinds

    def producers(self, name: str) -> tuple[OpNode, ...]:
        return tuple(self.nodes[i] for i in self.nodes[name].inputs)

    def params(self) -> list[OpNode]:
        return [n for n in self.nodes.values() if n.kind == "param"]

    def unsupported(self) -> list[str]:
        return sorted({n.target for n in self.nodes.values() if n.kind == "unknown"})

    def num_params(self) -> int:
        return sum(n.out.numel(1) for n in self.params())

    def constant_derived(self) -> frozenset[str]:
        """Nodes computed from buffers and constants alone (rotary tables, masks, positions).

        They carry no gradient and do not grow with the batch, and moving a replicated tensor
        to any placement is free, so replicating them loses nothing; the planner pins them.
        """
        out: set[str] = set()
        for n in self.nodes.values():
            if n.kind in ("buffer", "constant") or (
                n.kind != "input" and n.inputs and not n.out.batch_dims and all(i in out for i in n.inputs)
            ):
                out.add(n.name)
        return frozenset(out)

# ----------------------------------------------------------------------------------------------
# conversion from fx

def _target_name(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    return getattr(t, "__name__", None) or str(t)

def _classify(node: fx.Node) -> str:
    return kind_of(node.target) or "unknown"

def _tensor_from_metas(metas: list[Any], name: str, probes: tuple[int, ...]) -> Tensor:
    if len(probes) == 1:  # one propagation at a prime batch
        (shape, dtype), (prime,) = metas[0], probes
        dims = frozenset(d for d, x in enumerate(shape) if x % prime == 0)
        return Tensor(tuple(x // prime if d in dims else x for d, x in enumerate(shape)), dims, dtype)
    (s2, dtype), (s3, _) = metas[0], metas[1]
    b2, b3 = probes
    if len(s2) != len(s3):
        raise CaptureError(f"op {name} changes rank with the batch size: the model branches on the batch")
    base, batch_dims = [], set()
    for d, (x, y) in enumerate(zip(s2, s3)):
        if x == y:
            base.append(x)
        elif x * b3 == y * b2 and x % b2 == 0:
            base.append(x // b2)
            batch_dims.add(d)
        else:
            raise CaptureError(f"op {name} has dim {d} of size {x} at batch {b2} and {y} at batch {b3}: not proportional to the batch")
    return Tensor(tuple(base), frozenset(batch_dims), dtype)

def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1]
    path = path[0] if isinstance(path, tuple) else str(path)
    path = re.sub(r"^L\['self'\]\.?", "", path)
    return path.removeprefix("model.").removeprefix("model")

def _flatten_args(args: Iterable[Any]) -> list[Any]:
    out: list[Any] = []
    for a in args:
        if isinstance(a, (list, tuple)):
            out.extend(_flatten_args(a))
        elif isinstance(a, dict):
            out.extend(_flatten_args(a.values()))
        else:
            out.append(a)
    return out

def _const_args(node: fx.Node) -> dict[str, Any]:
    """Constant (non-Node) positional and keyword args, for rules that need a dim or an index."""
    def const(a: Any) -> bool:
        return not any(isinstance(x, fx.Node) for x in _flatten_args([a]))

    pos = {f"arg{i}": a for i, a in enumerate(node.args) if const(a)}
    kw = {k: v for k, v in node.kwargs.items() if const(v)}
    return {**pos, **kw}

def build_graph(cap: Captured) -> OpGraph:
    """Normalise a captured fx graph into the planner's IR."""
    gm = cap.graph_module
    metas2, metas3 = cap.metas[0], cap.metas[-1]
    nodes: dict[str, OpNode] = {}
    split_of: dict[str, tuple[str, Any]] = {}  # fx split node -> (its input, meta tuple)
    loss = ""
    for node in gm.graph.nodes:
        m2, m3 = metas2.get(node.name), metas3.get(node.name)
        if node.op == "output":
            src = _flatten_args([node.args])
            out = src[cap.loss_output] if cap.loss_output < len(src) else None
            loss = out.name if isinstance(out, fx.Node) and out.name in nodes else ""
            continue
        if node.op == "call_function" and node.target is operator.getitem and node.args[0].name in split_of:
            parent, idx = node.args[0].name, node.args[1]
            src_name, parts = split_of[parent]
            shapes = [p[0] for p in parts]
            in_shape = metas2[src_name][0]
            dim = next((d for d in range(len(in_shape)) if shapes[idx][d] != in_shape[d]), 0)
            start = sum(s[dim] for s in shapes[:idx])
            kind_attrs = {"dim": dim, "start2": start, "index": idx}
            out = _tensor_from_metas([metas2[parent][idx], metas3[parent][idx]], node.name, cap.probes)
            nodes[node.name] = OpNode(node.name, "split", "split", (src_name,), out, kind_attrs, _module_path(node))
            continue
        if _is_split(node) and isinstance(m2, tuple) and m2 and isinstance(m2[0], tuple) and isinstance(m2[0][0], tuple):
            src = next(a for a in _flatten_args([node.args]) if isinstance(a, fx.Node))
            split_of[node.name] = (src.name, m2)
            continue
        if m2 is None or m3 is None or not (isinstance(m2, tuple) and len(m2) == 2 and isinstance(m2[1], torch.dtype)):
            continue  # not a single tensor (sizes, tuples of ints, ...)
        out = _tensor_from_metas([m2, m3], node.name, cap.probes)
        inputs = tuple(a.name for a in _flatten_args([node.args, node.kwargs]) if isinstance(a, fx.Node) and a.name in nodes)
        module = _module_path(node)
        if node.op == "placeholder" or node.op == "get_attr":
            qual = cap.param_names.get(node.name)
            if qual is None:
                nodes[node.name] = OpNode(node.name, "input", "input", (), out, {}, "")
            else:
                trainable = qual in cap.trainable
                kind = "param" if trainable else "buffer"
                owner = qual.rsplit(".", 1)[0] if "." in qual else ""
                nodes[node.name] = OpNode(node.name, kind, kind, (), out, {}, owner, qual, trainable)
            continue
        if node.op == "call_module":
            kind, target = "unknown", type(gm.get_submodule(node.target)).__name__
        else:
            kind, target = _classify(node), _target_name(node)
        parent = _multi_output_parent(node)
        if parent is not None:  # an output of a multi-output op (native dropout, top-k): that op, on its inputs
            kind, target = _classify(parent), _target_name(parent)
            inputs = tuple(a.name for a in _flatten_args([parent.args, parent.kwargs])
                           if isinstance(a, fx.Node) and a.name in nodes)
        elif node.op == "call_function" and node.target is operator.getitem:
            kind = "slice"
        keep = ops.get(kind).data_inputs(base_name(target))
        inputs = inputs if keep is None else inputs[:keep]  # x.type_as(y), zeros_like(x): the rest lend a shape
        attrs = _const_args(parent if parent is not None else node)
        nodes[node.name] = OpNode(node.name, kind, target, inputs, out, attrs, module)
    if not loss:
        raise CaptureError("the traced graph has no tensor output: the model must return logits or a loss")
    _merge_duplicate_params(nodes)
    dag = nx.DiGraph()
    for n in nodes.values():
        dag.add_node(n.name)
        for i, src in enumerate(n.inputs):
            dag.add_edge(src, n.name, index=i)
    fingerprint = _fingerprint(nodes)
    graph = OpGraph(nodes, dag, loss, cap.method, fingerprint)
    for name in graph.constant_derived():
        nodes[name].constant = True
    return graph

def _multi_output_parent(node: fx.Node) -> fx.Node | None:
    """The op whose output ``node`` picks (``getitem(op, i)`` of a registered multi-output op), if any."""
    if node.op != "call_function" or node.target is not operator.getitem or not isinstance(node.args[0], fx.Node):
        return None
    parent = node.args[0]
    if parent.op != "call_function" or _is_split(parent) or kind_of(parent.target) is None:
        return None
    return parent


def _merge_duplicate_params(nodes: dict[str, OpNode]) -> None:
    """Tied weights traced as several get_attr nodes become one parameter node."""
    first: dict[str, str] = {}
    alias: dict[str, str] = {}
    for n in list(nodes.values()):
        if n.kind in ("param", "buffer") and n.param is not None:
            if n.param in first:
                alias[n.name] = first[n.param]
                del nodes[n.name]
            else:
                first[n.param] = n.name
    if alias:
        for n in nodes.values():
            n.inputs = tuple(alias.get(i, i) for i in n.inputs)

def _fingerprint(nodes: dict[str, OpNode]) -> str:
    h = hashlib.sha256()
    for n in nodes.values():
        if n.kind in ("param", "buffer"):
            h.update(f"{n.param}:{n.out.base}:{n.out.dtype};".encode())
        else:
            h.update(f"{n.kind}:{len(n.inputs)};".encode())
    return h.hexdigest()[:16]

# ----------------------------------------------------------------------------------------------
# FLOPs and bytes of one forward pass

def needs_value_in_backward(consumer: OpNode, pos: int) -> bool:
    """Does ``consumer``'s backward read input ``pos`` (so FSDP must gather that weight again)?

    A bias, an embedding table or a summand is not read: their gradients need only the output
    gradient (and the indices). The op's registry entry says (``OpKind.reads_weight``).
    """
    return ops.get(consumer.kind).reads_weight(base_name(consumer.target), pos)

def _reads_input(consumer: OpNode, pos: int) -> bool:
    """Does autograd keep ``consumer``'s input ``pos`` for backward (``OpKind.saves_input``)?"""
    return ops.get(consumer.kind).saves_input(base_name(consumer.target), pos)

def saved_fraction(graph: OpGraph, name: str, elem_bytes: int) -> float:
    """Fraction of ``name``'s output bytes kept alive for backward: 1 when the op itself or any consumer
    (looking through views) saves it, a dropout's mask (1 byte per element), else 0."""
    node = graph.nodes[name]
    if ops.get(node.kind).saves_output:
        return 1.0
    seen: set[str] = set()
    stack = [name]
    while stack:
        u = stack.pop()
        for _, v, data in graph.dag.out_edges(u, data=True):
            cons = graph.nodes[v]
            if cons.kind in ALIAS_KINDS and cons.kind not in ("param", "buffer", "input", "constant"):
                if v not in seen:  # a view of the output: saved if the view is
                    seen.add(v)
                    stack.append(v)
            elif _reads_input(cons, data["index"]):
                return 1.0
    if node.kind == "dropout" and float(node.attrs.get("p", node.attrs.get("arg1", 0.5)) or 0.0) > 0:
        return 1.0 / max(elem_bytes, 1)
    return 0.0

def op_context(graph: OpGraph, node: OpNode, batch: int) -> RuleCtx:
    """The op as its registry entry sees it: input and output shapes at ``batch``, constant arguments."""
    ins = [graph.nodes[i].out for i in node.inputs]
    return RuleCtx(tuple(t.shape(batch) for t in ins), tuple(t.dtype for t in ins), node.out.shape(batch), node.attrs,
                   node.target)

def forward_flops(graph: OpGraph, node: OpNode, batch: int) -> float:
    """FLOPs of the op's forward at ``batch`` (global, unsharded); backward is priced as 2x."""
    entry = ops.get(node.kind)
    if entry.alias:
        return 0.0
    return float(entry.flops(op_context(graph, node, batch)))
