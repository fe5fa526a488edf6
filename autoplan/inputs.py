"""How a model is called and what it is trained on: example inputs as users have them.

``example_inputs`` may be a tensor, a tuple of positional arguments, or a dict of keyword
arguments (``input_ids``, ``attention_mask``, ``pixel_values``, ``labels``, ...); non-tensor values
(flags such as ``use_cache=False``) are kept as they are. A ``CallSpec`` records, for every tensor
argument, its name, shape, dtype and *batch dim* (found from the example: the dims whose size is
the example's batch), so that the planner can make inputs at any batch size on the meta device,
and the runtime can cut a user's batch into micro-batches and shards.

The training loss is the model's own ``loss`` when its output carries one (a ``ModelOutput`` or a
dict with labels in the inputs, as ``transformers`` does), else ``loss_fn(output, targets)``;
the default is the cross-entropy of the output's first floating tensor against the targets.

A ``CallSpec`` is stored in the plan (``to_json``), so a plan can be applied without example inputs.
"""
from __future__ import annotations

import keyword
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from autoplan.errors import AutoplanError

LossFn = Callable[[Any, torch.Tensor], torch.Tensor]  # (model output, targets) -> scalar loss
Key = str | int  # keyword name, or position of a positional argument
_JSON_SCALARS = (bool, int, float, str, type(None))


@dataclass(frozen=True)
class Slot:
    """One tensor argument: ``shape`` at the example batch; ``batch_dim`` None when it is the same for every sample."""

    key: Key
    shape: tuple[int, ...]
    dtype: torch.dtype
    batch_dim: int | None

    def meta(self, batch: int) -> torch.Tensor:
        shape = list(self.shape)
        if self.batch_dim is not None:
            shape[self.batch_dim] = batch
        return torch.empty(shape, dtype=self.dtype, device="meta")

    @property
    def label(self) -> str:
        return self.key if isinstance(self.key, str) else f"argument {self.key}"

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "shape": list(self.shape), "dtype": str(self.dtype).removeprefix("torch."),
                "batch_dim": self.batch_dim}

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> "Slot":
        dtype = getattr(torch, str(d["dtype"]), None)
        if not isinstance(dtype, torch.dtype):
            raise AutoplanError(f"the plan's inputs name an unknown dtype {d['dtype']!r}: re-plan the model")
        return Slot(d["key"], tuple(int(s) for s in d["shape"]), dtype, d["batch_dim"])


@dataclass(frozen=True)
class CallSpec:
    """The model's tensor arguments (in graph order), its flags, and where its loss comes from."""

    slots: tuple[Slot, ...]
    static: tuple[tuple[Key, Any], ...] = ()  # non-tensor arguments, passed as given
    targets: Slot | None = None  # the loss function's targets; None when the model returns its own loss
    loss: str = "cross_entropy"  # "model" (output.loss), "cross_entropy", "custom" (a loss_fn), or "auto" (not yet known)
    batch: int = 1  # the example's batch size

    # ------------------------------------------------------------------------------ making inputs

    def meta_inputs(self, batch: int) -> tuple[torch.Tensor, ...]:
        """Meta tensors at ``batch``: every slot, then the targets (if any)."""
        return tuple(s.meta(batch) for s in self.all_slots)

    @property
    def all_slots(self) -> tuple[Slot, ...]:
        return self.slots + ((self.targets,) if self.targets is not None else ())

    @property
    def is_lm(self) -> bool:
        """Token ids (B, T) in, next-token targets (B, T) or labels (B, T): a language model."""
        first = self.slots[0] if self.slots else None
        return first is not None and first.dtype in (torch.int64, torch.int32) and len(first.shape) == 2 \
            and first.batch_dim == 0

    @property
    def seq_len(self) -> int | None:
        return self.slots[0].shape[1] if self.is_lm else None

    # ------------------------------------------------------------------------------ calling the model

    def call(self, model: nn.Module, tensors: Sequence[torch.Tensor]) -> Any:
        """``model(*args, **kwargs)`` from the flat tensors (slot order) and the static arguments."""
        values: dict[Key, Any] = dict(self.static)
        values.update({s.key: t for s, t in zip(self.slots, tensors)})
        n_pos = max((k + 1 for k in values if isinstance(k, int)), default=0)
        args = [values.pop(i, None) for i in range(n_pos)]
        return model(*args, **values)

    def flatten(self, batch: Any, targets: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """A user's batch (dict of keywords, tuple of positional tensors, or one tensor), then the
        targets, as the flat tensors the graph takes."""
        if isinstance(batch, Mapping):
            by_key = dict(batch)
        elif isinstance(batch, torch.Tensor):
            by_key = {0: batch}
        elif isinstance(batch, (tuple, list)):
            by_key = dict(enumerate(batch))
        else:
            raise AutoplanError(f"a batch must be a dict of tensors, a tuple of tensors or a tensor, "
                                f"not {type(batch).__name__}")
        missing = [s.label for s in self.slots if s.key not in by_key]
        if missing:
            raise AutoplanError(f"the batch has no {', '.join(missing)}: give the model's inputs as it was planned "
                                f"({', '.join(s.label for s in self.slots)})")
        out = [by_key[s.key] for s in self.slots]
        if self.targets is not None:
            if targets is None:
                raise AutoplanError("this plan trains on a loss of the model's output against targets: "
                                    "call train_step(inputs, targets)")
            out.append(targets)
        bad = [s.label for s, t in zip(self.all_slots, out) if not isinstance(t, torch.Tensor)]
        if bad:
            raise AutoplanError(f"the batch's {', '.join(bad)} must be tensors")
        return tuple(out)

    def batch_size(self, tensors: Sequence[torch.Tensor]) -> int:
        s = next((s for s in self.all_slots if s.batch_dim is not None), None)
        return int(tensors[self.all_slots.index(s)].shape[s.batch_dim]) if s is not None else 1

    def slice(self, tensors: Sequence[torch.Tensor], sl: slice) -> tuple[torch.Tensor, ...]:
        """The samples ``sl`` of flat tensors (each cut on its own batch dim)."""
        return tuple(t if s.batch_dim is None else t.narrow(s.batch_dim, sl.start, sl.stop - sl.start)
                     for s, t in zip(self.all_slots, tensors))

    # ------------------------------------------------------------------------------ the plan file

    def to_json(self) -> dict[str, Any]:
        return {"slots": [s.to_json() for s in self.slots],
                "static": [[k, v] for k, v in self.static],
                "targets": self.targets.to_json() if self.targets is not None else None,
                "loss": self.loss, "batch": self.batch}

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> "CallSpec":
        try:
            return CallSpec(tuple(Slot.from_json(s) for s in d["slots"]),
                            tuple((k, v) for k, v in d.get("static", [])),
                            Slot.from_json(d["targets"]) if d.get("targets") else None,
                            str(d.get("loss", "cross_entropy")), int(d.get("batch", 1)))
        except (KeyError, TypeError, ValueError) as exc:
            raise AutoplanError(f"the plan's 'call' section is malformed ({exc}): re-plan the model") from None


# ------------------------------------------------------------------------------ building a CallSpec


def _as_keyed(example_inputs: Any) -> list[tuple[Key, Any]]:
    if isinstance(example_inputs, torch.Tensor):
        return [(0, example_inputs)]
    if isinstance(example_inputs, Mapping):
        if not all(isinstance(k, str) for k in example_inputs):
            raise AutoplanError("example_inputs as a dict must have keyword names (str) as keys")
        return list(example_inputs.items())
    if isinstance(example_inputs, (tuple, list)):
        return list(enumerate(example_inputs))
    raise AutoplanError(f"example_inputs must be a tensor, a tuple of positional arguments or a dict of keyword "
                        f"arguments, not {type(example_inputs).__name__}")


def _batch_dim(t: torch.Tensor, batch: int, first: bool) -> int | None:
    """Dim 0 when it is the batch (the first tensor's dim 0 defines it); None for per-model tensors."""
    if t.dim() == 0:
        return None
    return 0 if first or t.shape[0] == batch else None


def spec_from_example(example_inputs: Any, *, targets: torch.Tensor | None = None,
                      loss: str = "cross_entropy") -> CallSpec:
    """The CallSpec of an example (tensor / tuple / dict). ``loss``: how the caller will make the loss."""
    keyed = _as_keyed(example_inputs)
    tensors = [(k, v) for k, v in keyed if isinstance(v, torch.Tensor)]
    if not tensors:
        raise AutoplanError("example_inputs has no tensor: give the model's inputs (dim 0 is the batch)")
    static = []
    for k, v in keyed:
        if isinstance(v, torch.Tensor):
            continue
        if not isinstance(v, _JSON_SCALARS):
            raise AutoplanError(f"example input {k!r} is a {type(v).__name__}: pass tensors, or flags "
                                f"(bool, int, float, str, None)")
        static.append((k, v))
    batch = int(tensors[0][1].shape[0]) if tensors[0][1].dim() else 1
    slots = tuple(Slot(k, tuple(int(s) for s in v.shape), v.dtype, _batch_dim(v, batch, i == 0))
                  for i, (k, v) in enumerate(tensors))
    tslot = None
    if targets is not None:
        tslot = Slot("targets", tuple(int(s) for s in targets.shape), targets.dtype, _batch_dim(targets, batch, False))
    return CallSpec(slots, tuple(static), tslot, loss, batch)


def output_loss(output: Any) -> torch.Tensor | None:
    """The model's own loss: ``output.loss`` / ``output["loss"]`` when present and a tensor."""
    value = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    return value if isinstance(value, torch.Tensor) else None


def first_float(output: Any) -> torch.Tensor:
    """The first floating tensor of an output pytree (the logits of a ``ModelOutput`` without loss)."""
    if not isinstance(output, (tuple, list, Mapping)):
        return output  # a tensor (or an fx Proxy of one)
    values = output.values() if isinstance(output, Mapping) else output
    for v in values:
        if isinstance(v, torch.fx.Proxy) or (isinstance(v, torch.Tensor) and v.is_floating_point()):
            return v
        if isinstance(v, (tuple, list, Mapping)):
            try:
                return first_float(v)
            except AutoplanError:
                continue
    raise AutoplanError(f"the model's output ({type(output).__name__}) has no floating tensor to take a loss of: "
                        f"return logits, or a loss")


def cross_entropy(output: Any, targets: torch.Tensor, flatten: bool | None = None) -> torch.Tensor:
    """Mean cross-entropy of the output's logits; (B, T, V) logits against (B, T) targets are flattened
    (``flatten``: decided by the caller when tracing, where ``targets.dim()`` is not a number)."""
    logits = first_float(output)
    if targets.dim() >= 2 if flatten is None else flatten:
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
    return F.cross_entropy(logits, targets)


class NeedsTargets(AutoplanError):
    """Raised while tracing a model whose loss source was unknown ("auto") and whose output has no loss:
    the caller adds targets shaped like ``logits_shape`` without its last dim, and traces again."""

    def __init__(self, logits_shape: tuple[int, ...] | None):
        super().__init__("the model returned no loss: targets are needed for the default cross-entropy")
        self.logits_shape = logits_shape


def with_default_targets(spec: CallSpec, logits_shape: tuple[int, ...] | None) -> CallSpec:
    """The spec with targets for the default cross-entropy: next-token ids for token inputs, else class
    indices shaped like the logits (at the example batch) without their last dim."""
    if spec.is_lm:
        tslot = Slot("targets", spec.slots[0].shape, torch.long, 0)
    elif logits_shape is not None:
        tslot = Slot("targets", (spec.batch, *logits_shape[1:-1]), torch.long, 0)
    else:
        raise AutoplanError("the model returns no loss and its logits' shape is unknown: pass targets= (or labels "
                            "in the inputs, for a model that computes its own loss)")
    return CallSpec(spec.slots, spec.static, tslot, "cross_entropy", spec.batch)


def meta_forward(model: nn.Module, spec: CallSpec) -> Any:
    """One forward of the (meta) model on meta inputs at the example batch; None when it cannot run on meta."""
    try:
        with torch.no_grad():
            return spec.call(model, [s.meta(spec.batch) for s in spec.slots])
    except Exception:  # noqa: BLE001 - e.g. .item() on meta (transformers' mask checks): decided while tracing
        return None


def resolve_spec(model: nn.Module, example_inputs: Any, *, targets: torch.Tensor | None,
                 loss_fn: LossFn | None) -> CallSpec:
    """The CallSpec for a user's model on its (meta) weights: the model's own loss when it returns one.

    Decided by one forward on the meta device where the model runs there; otherwise the spec says
    "auto" and the tracer decides (``NeedsTargets``)."""
    if loss_fn is not None:
        spec = spec_from_example(example_inputs, targets=targets, loss="custom")
        if spec.targets is None:
            raise AutoplanError("loss_fn= needs targets=: the loss is loss_fn(output, targets)")
        return spec
    spec = spec_from_example(example_inputs, targets=targets)
    if targets is not None:
        return spec
    out = meta_forward(model, spec)
    if out is None:
        return CallSpec(spec.slots, spec.static, None, "auto", spec.batch)
    if output_loss(out) is not None:
        return CallSpec(spec.slots, spec.static, None, "model", spec.batch)
    return with_default_targets(spec, None if spec.is_lm else tuple(first_float(out).shape))


def _identifier(key: Key) -> str:
    name = re.sub(r"\W", "_", key) if isinstance(key, str) else f"arg{key}"
    return name if name.isidentifier() and not keyword.iskeyword(name) else f"in_{name}"


class TrainingLoss(nn.Module):
    """The traced unit: ``model`` called per its CallSpec, then its loss (one scalar output).

    Built with ``TrainingLoss.of(model, spec, loss_fn)``: its forward takes the flat tensors (slots, then
    targets) as named arguments (``input_ids``, ``labels``, ``arg0``, ``targets``), so fx and
    torch.export see one placeholder per tensor argument, in the spec's order, named as the user names it.
    """

    def __init__(self, model: nn.Module, spec: CallSpec, loss_fn: LossFn | None = None):
        super().__init__()
        self.model = model
        self.spec = spec
        self.loss_fn = loss_fn

    @staticmethod
    def of(model: nn.Module, spec: CallSpec, loss_fn: LossFn | None = None) -> "TrainingLoss":
        names = list(dict.fromkeys(_identifier(s.key) for s in spec.all_slots))
        if len(names) != len(spec.all_slots):
            raise AutoplanError(f"two inputs have the same name once made identifiers ({names}): rename them")
        params = ", ".join(names)
        namespace: dict[str, Any] = {}
        exec(f"def forward(self, {params}):\n    return self.loss_of(({params},))\n", namespace)  # noqa: S102
        cls = type("TrainingLoss", (TrainingLoss,), {"forward": namespace["forward"]})
        return cls(model, spec, loss_fn)

    def loss_of(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        n = len(self.spec.slots)
        output = self.spec.call(self.model, tensors[:n])
        if self.spec.loss in ("model", "auto"):
            loss = output_loss(output)
            if loss is not None:
                return loss
            if self.spec.loss == "auto":
                logits = first_float(output)
                raise NeedsTargets(tuple(int(d) for d in logits.shape) if isinstance(logits, torch.Tensor) else None)
            raise AutoplanError("the model returned no loss: give labels in the inputs, or plan with loss_fn=")
        if self.loss_fn is not None:
            return self.loss_fn(output, tensors[n])
        return cross_entropy(output, tensors[n], flatten=len(self.spec.targets.shape) >= 2)
