"""The op registry (``registry.py``) and its entries, one file per family of ops.

To add an op: find its family's file (or start one and import it here), and register its
spellings, FLOPs, what it saves and its one-axis sharding rule with ``@op_kind``. Nothing else in
autoplan names an op kind; ``tests/test_ops.py`` checks each rule numerically on shards.
"""
from autoplan.ops.registry import OP_KINDS, AxisRule, OpKind, RuleCtx, base_name, get, kind_of, op_kind

# the families: importing a file registers its entries
from autoplan.ops import attention, conv, elementwise, index, loss, matmul, norm, reduce, shape, sources  # noqa: E402,F401,I001

ALIAS_KINDS = frozenset(k for k, o in OP_KINDS.items() if o.alias)  # no data of their own: free, hidden in reports

__all__ = ["ALIAS_KINDS", "OP_KINDS", "AxisRule", "OpKind", "RuleCtx", "base_name", "get", "kind_of", "op_kind"]
