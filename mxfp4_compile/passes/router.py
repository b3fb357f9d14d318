"""Router form: the top-k routing that feeds a rewritten torch.ops.mxfp4.moe becomes one
torch.ops.mxfp4.topk_softmax call (one launch on CUDA instead of aten.topk's several plus
Inductor's softmax kernel; ops/topk_softmax.py).

Matched on the graph the pass sees (softmax decomposed into amax, sub, exp, sum, div over the last
dim, or still aten._softmax), for the three routers the op computes:
  gpt-oss          logits -> topk -> values -> softmax                   softmax_first=False
  Mixtral, Qwen3   logits -> softmax -> topk -> values / values.sum(-1)  softmax_first=True
  Qwen3 option     logits -> softmax -> topk -> values                   renormalize=False
Only upcasts may sit between the steps (a bf16 round trip would change the numbers), top-k must be
the largest k along the last dim, sorted, and the op's ids and weights must be that top-k's ids
and those weights. Anything else stays as it is, with the reason in the moe region's details.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..ops.topk_softmax import MAX_EXPERTS
from .fx_utils import DTYPE_OPS, NoMatch, aten, shape, strip, val
from .rewrite import call

FORM = "router"


def _upcasts(n):
    """Walk back through dtype conversions that lose nothing -> the first other node."""
    while isinstance(n, fx.Node) and n.op == "call_function" and n.target in DTYPE_OPS:
        src = n.args[0]
        a, b = val(src), val(n)
        if a is None or b is None or torch.finfo(b.dtype).bits < torch.finfo(a.dtype).bits:
            raise NoMatch(f"{n.name}: the router rounds to {b.dtype if b is not None else '?'} "
                          f"between its steps")
        n = src
    return n


def _last_dim(n, dims) -> bool:
    nd = len(shape(n))
    dims = list(dims) if isinstance(dims, (list, tuple)) else [dims]
    return len(dims) == 1 and dims[0] in (-1, nd - 1)


def _reduces_last(n, target, of) -> bool:
    """n = target(of, [last dim], keepdim=True) (aten.sum.dim_IntList or aten.amax)."""
    return (isinstance(n, fx.Node) and n.target is target and n.args[0] is of
            and _last_dim(of, n.args[1]) and len(n.args) > 2 and bool(n.args[2]))


def _softmax_of(n):
    """n = softmax(a) over the last dim -> a, else None."""
    if n.op != "call_function":
        return None
    if n.target is aten._softmax.default:
        return n.args[0] if _last_dim(n.args[0], n.args[1]) else None
    if n.target is not aten.div.Tensor or not all(isinstance(a, fx.Node) for a in n.args):
        return None
    ex, total = n.args
    if ex.target is not aten.exp.default or ex.args[0].target is not aten.sub.Tensor:
        return None
    a, m = ex.args[0].args
    if not (_reduces_last(total, aten.sum.dim_IntList, ex)
            and _reduces_last(m, aten.amax.default, a)):
        return None
    return a


def _softmax_user(n):
    """The softmax over the last dim that consumes n (through upcasts) -> its output, or None."""
    frontier = [n]
    while frontier:
        x = frontier.pop()
        for u in x.users:
            if u.target in DTYPE_OPS:
                frontier.append(u)
            elif u.target is aten._softmax.default and _softmax_of(u) is x:
                return u
            elif u.target is aten.amax.default:
                for d in u.users:  # sub -> exp -> div
                    for e in d.users:
                        for s in e.users:
                            if s.target is aten.div.Tensor and _softmax_of(s) is x:
                                return s
    return None


def _renormalized(v):
    """v / v.sum(-1, keepdim=True) among v's users -> that division, or None."""
    for u in v.users:
        if (u.target is aten.div.Tensor and u.args[0] is v
                and _reduces_last(u.args[1], aten.sum.dim_IntList, v)):
            return u
    return None


def match(moe: fx.Node):
    """The router feeding `moe` -> (logits, k, softmax_first, renormalize, weights node, ids node).
    Raises NoMatch with the reason otherwise."""
    ids_root = strip(moe.args[1])[-1]
    w_root = strip(moe.args[2])[-1]
    if not (ids_root.op == "call_function" and ids_root.target is operator.getitem
            and ids_root.args[1] == 1 and ids_root.args[0].target is aten.topk.default):
        raise NoMatch("the expert ids do not come straight from aten.topk")
    topk = ids_root.args[0]
    x, k = topk.args[0], topk.args[1]
    dim = topk.args[2] if len(topk.args) > 2 else topk.kwargs.get("dim", -1)
    largest = topk.args[3] if len(topk.args) > 3 else topk.kwargs.get("largest", True)
    ordered = topk.args[4] if len(topk.args) > 4 else topk.kwargs.get("sorted", True)
    if len(shape(x)) != 2 or not _last_dim(x, dim) or not largest or not ordered:
        raise NoMatch("top-k is not the k largest along the last dim of [T, E] logits")
    if not isinstance(k, int) or not isinstance(shape(x)[1], int) or shape(x)[1] > MAX_EXPERTS:
        raise NoMatch(f"top-k needs a static k and at most {MAX_EXPERTS} experts")
    values = [u for u in topk.users if u.target is operator.getitem and u.args[1] == 0]
    if len(values) != 1:
        raise NoMatch("the top-k values are not used once")
    v = values[0]
    probs = _softmax_of(_upcasts(x))
    if probs is not None:  # softmax over the experts, then top-k
        logits, first = probs, True
        w = _renormalized(v)
        renorm = w is not None
        w = w if renorm else v
    else:  # top-k of the logits, then softmax over the k values
        logits, first, renorm = x, False, True
        w = _softmax_user(v)
        if w is None:
            raise NoMatch("no softmax over the top-k values, and top-k is not of a softmax")
    if _upcasts(w_root) is not w:
        raise NoMatch(f"the op's routing weights ({w_root.name}) are not the router's "
                      f"({w.name})")
    if not val(logits).dtype.is_floating_point:
        raise NoMatch("the logits are not floats")
    return logits, k, first, renorm, w, ids_root


def rewrite(graph: fx.Graph, moe: fx.Node) -> str:
    """Fuse the router of one moe call -> a line for the region's details."""
    logits, k, first, renorm, w, ids = match(moe)
    # the weights in the dtype the model rounds them to (its .to(dtype) after the router, or a
    # router computed in that dtype): the kernel stores them so, instead of a cast kernel
    # between it and the op
    dt, targets = torch.float32, [w]
    casts = list(w.users)
    if val(w).dtype != torch.float32:
        dt = val(w).dtype
    elif casts and all(u.target in DTYPE_OPS and u.args[0] is w and set(u.kwargs) <= {"dtype"}
                       for u in casts):
        low = {val(u).dtype for u in casts}
        if len(low) == 1 and low <= {torch.bfloat16, torch.float16}:
            dt, targets = low.pop(), casts
    with graph.inserting_after(ids.args[0]):  # right after the top-k: before all its users
        fused = call(graph, torch.ops.mxfp4.topk_softmax.default, (logits, k, first, renorm),
                     {} if dt == torch.float32 else dict(out_dtype=dt), name="router")
    with graph.inserting_after(fused):
        new_ids = call(graph, operator.getitem, (fused, 1), name="router_ids")
    with graph.inserting_after(new_ids):
        new_w = call(graph, operator.getitem, (fused, 0), name="router_weights")
    for t in targets:
        t.replace_all_uses_with(new_w)
    ids.replace_all_uses_with(new_ids)
    return f"topk_softmax(k={k}, softmax_first={first}, renormalize={renorm})"
