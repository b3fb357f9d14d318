"""Decode GEMV form: a matmul of a few rows against a weight matrix the graph reads, i.e. a linear
layer in a batch-1 decode step (``addmm(bias, x[M, K], w.t())`` or ``mm(x, w.t())`` with M at most
the device's ``max_rows``), becomes a product and a sum over K that Inductor lowers to one
reduction kernel, with the bias and the output cast in its epilogue.

Why: on sm90, for one row, cuBLAS runs such a product as a split-K GEMV and a reduce kernel (two
launches) that read the weight at a third to a half of the stream rate (benchmarks/notes/e2e.md);
the attention projections of a decode step are the largest share of its weight bytes outside the
experts. A row reduction streams the weight once, whatever Inductor's tuning picks. Several rows
(a limit above 1): the sum is laid out [N, M] so that the programs of one weight row are
neighbours; on sm90 two rows still took twice one row's time (each re-read the weight), which is
why its limit is one row.

Numbers: products in float32 (a bf16 x bf16 product is exact there), a float32 sum, the bias
added in float32, one rounding to the output dtype: what cuBLAS computes, summed in another
order. The weight stays the parameter itself (no copy, no concatenation), so a user's update of
it is read by the next call as before.

Where the limits come from: ``LIMITS``, per device capability, measured; elsewhere the backend's
option ``decode_gemv="auto"`` leaves matmuls to Inductor (``True`` applies the default limits).
"""
from __future__ import annotations

import dataclasses
import logging

import torch
import torch.fx as fx

from .fx_utils import aten, prims, shape, strip, val
from .rewrite import call

log = logging.getLogger("mxfp4_compile")

FORM = "decode_gemv"


@dataclasses.dataclass(frozen=True)
class Limits:
    max_rows: int        # M at most this (a concrete size: a symbolic batch is left alone)
    min_n: int           # fewer output columns (a router's 32) gain nothing from a reduction
    max_elements: int    # N * K at most this: cuBLAS streams a large GEMV (an LM head) well


DEFAULT = Limits(max_rows=1, min_n=256, max_elements=64 << 20)
# per capability where measured (benchmarks/projections.py; two rows already lose to cuBLAS on
# sm90); "auto" rewrites only on these
LIMITS = {(9, 0): DEFAULT}


def limits_for(device: torch.device) -> Limits | None:
    """The limits "auto" uses on this device, or None (no measurement: leave matmuls alone)."""
    if device.type != "cuda":
        return None
    return LIMITS.get(tuple(torch.cuda.get_device_capability(device)))


def _weight(b):
    """mm's second operand is w.t() (w [N, K] read as a graph input or constant) -> w, else None."""
    chain = strip(b)
    if len(chain) != 2 or chain[0].target not in (aten.permute.default, aten.t.default):
        return None
    if chain[0].target is aten.permute.default and list(chain[0].args[1]) != [1, 0]:
        return None
    w = chain[1]
    return w if w.op in ("placeholder", "get_attr") else None


def _concrete(*sizes) -> bool:
    return all(isinstance(s, int) for s in sizes)


def match_one(n: fx.Node, lim: Limits):
    """A matmul this form rewrites -> (x, w, bias or None), else None."""
    if n.op != "call_function" or n.target not in (aten.mm.default, aten.addmm.default):
        return None
    if n.target is aten.addmm.default:
        if n.kwargs.get("beta", 1) != 1 or n.kwargs.get("alpha", 1) != 1:
            return None
        bias, x, b = n.args[:3]
    else:
        bias, (x, b) = None, n.args[:2]
    w = _weight(b)
    sx, sw = shape(x), shape(w)
    if w is None or sx is None or sw is None or not _concrete(*sx, *sw):
        return None
    (m, k), (nn, k2) = sx, sw
    if not (1 <= m <= lim.max_rows and k == k2 and nn >= lim.min_n and nn * k <= lim.max_elements):
        return None
    dt = val(n).dtype
    if val(x).dtype != dt or val(w).dtype != dt or dt not in (torch.bfloat16, torch.float16):
        return None
    if bias is not None and (not isinstance(bias, fx.Node) or shape(bias) not in ((nn,), (1, nn))
                             or val(bias).dtype != dt):
        return None
    return x, w, bias


def rewrite(graph: fx.Graph, lim: Limits) -> int:
    """Rewrite every match; -> how many. One at a time: a rewritten matmul (q) may be the input of
    the next (o)."""
    f32 = torch.float32
    found = []
    for n in [n for n in graph.nodes if n.target in (aten.mm.default, aten.addmm.default)]:
        m = match_one(n, lim)
        if m is None:
            continue
        x, w, bias = m
        found.append(w)
        with graph.inserting_before(n):
            x32 = call(graph, prims.convert_element_type.default, (x, f32))    # [M, K]
            xt = call(graph, aten.unsqueeze.default, (x32, 0))                   # [1, M, K]
            wk = call(graph, aten.unsqueeze.default, (w, 1))                     # [N, 1, K]
            prod = call(graph, aten.mul.Tensor, (wk, xt))                        # [N, M, K] f32
            acc = call(graph, aten.sum.dim_IntList, (prod, [2]))                 # [N, M]
            acc = call(graph, aten.permute.default, (acc, [1, 0]))               # [M, N]
            if bias is not None:
                acc = call(graph, aten.add.Tensor, (acc, bias))                  # f32 + bias
            y = call(graph, prims.convert_element_type.default, (acc, val(n).dtype))
            if shape(x)[0] > 1:  # the [N, M] sum viewed [M, N]: mm's callers expect rows
                y = call(graph, aten.clone.default, (y,), dict(memory_format=torch.contiguous_format))
        n.replace_all_uses_with(y)
        graph.erase_node(n)
    if found:
        log.info("mxfp4: %d decode matmul(s) of <= %d row(s) as reductions over K (%s)", len(found),
                 lim.max_rows, ", ".join(f"{shape(w)[0]}x{shape(w)[1]}" for w in found[:6])
                 + (", ..." if len(found) > 6 else ""))
    return len(found)
