"""FX graph helpers every matcher uses: a node's fake value and shape, symbolic size tests, the
view ops labels pass through (and walking back through them), the GEMM op sets, the nodes between
two others, and NoMatch (a region left as it is, with the reason)."""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

aten = torch.ops.aten
prims = torch.ops.prims

# ops that only re-lay out a tensor (or change its dtype): labels pass through them
VIEW_OPS = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.clone.default,
    aten.alias.default, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
    aten.squeeze.default, aten.permute.default, aten.transpose.int, aten.t.default,
    aten.expand.default, prims.convert_element_type.default, aten._to_copy.default,
    aten.slice.Tensor, aten.contiguous.default,
}
DTYPE_OPS = {prims.convert_element_type.default, aten._to_copy.default}
GEMM_OPS = {aten.bmm.default, aten.mm.default}


def grouped_mm_ops():
    """aten._grouped_mm and transformers' opaque fallback (same semantics), where they exist."""
    ops = []
    if hasattr(aten, "_grouped_mm"):
        ops.append(aten._grouped_mm.default)
    try:
        ops.append(torch.ops.transformers.grouped_mm_fallback.default)
    except (AttributeError, RuntimeError):
        pass
    return ops


class NoMatch(Exception):
    """A candidate region that is not rewritten; the message is the reason explain() shows."""


def val(n):
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def shape(n):
    v = val(n)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def same(a, b) -> bool:
    """Sizes equal for every value of the symbols (never adds a guard)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return bool(statically_known_true(a == b))


def hint(x):
    """A concrete int for a size (symbolic sizes -> their example value)."""
    if isinstance(x, torch.SymInt):
        return x.node.hint if x.node.hint is not None else x.node.shape_env.size_hint(x.node.expr)
    return x


def is_view(n) -> bool:
    if not (isinstance(n, fx.Node) and n.op == "call_function" and n.target in VIEW_OPS):
        return False
    if n.target is aten.slice.Tensor:  # only a full slice is a pure view
        s_in, dim = shape(n.args[0]), n.args[1] if len(n.args) > 1 else 0
        start = n.args[2] if len(n.args) > 2 else 0
        step = n.args[4] if len(n.args) > 4 else 1
        return s_in is not None and start in (0, None) and step == 1 and same(shape(n)[dim], s_in[dim])
    if n.target is aten._to_copy.default:
        return set(n.kwargs) <= {"dtype"}
    return True


def strip(n):
    """Walk back through view ops: -> [n, parent, grandparent, ...] (the last is the root)."""
    chain = [n]
    while is_view(chain[-1]):
        chain.append(chain[-1].args[0])
    return chain


def between(srcs, dst, limit=2000):
    """Nodes on paths from any of ``srcs`` to ``dst`` (topological order), or None if too many."""
    order = {n: i for i, n in enumerate(dst.graph.nodes)}
    stop = order[dst]
    desc, stack = set(), list(srcs)
    while stack:  # forward from the sources, never past dst
        x = stack.pop()
        if x in desc or order[x] > stop:
            continue
        desc.add(x)
        if len(desc) > limit:
            return None
        stack.extend(x.users)
    if dst not in desc:
        return []
    keep, stack = set(), [dst]
    while stack:  # backward from dst, inside the forward set
        x = stack.pop()
        if x in keep or x not in desc:
            continue
        keep.add(x)
        stack.extend(x.all_input_nodes)
    return sorted(keep, key=order.__getitem__)
