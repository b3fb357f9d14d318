"""Expert-parallel sentinel handling: guards on the expert ids that are the identity on ids in [0, E).

transformers 5.17 always guards against expert-parallel sentinel ids (>= E): batched_mm clamps the
flat ids to [0, E-1] before gathering weights, grouped_mm clamps the sorted ids to E-1 for the bias
gathers and zeroes the rows of ids >= E (masked_fill -> where) around each grouped GEMM. Without
expert parallelism every id is a top-k index over the E experts, so each of these is exact identity.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .fx_utils import aten, same, shape, strip, val


def id_clamp_source(n, E):
    """clamp_max(x, E-1), clamp_min(x, 0) or clamp(x, 0|None, E-1|None) on integer x -> x, else None."""
    if not (isinstance(n, fx.Node) and n.op == "call_function") or val(n) is None or \
            val(n).is_floating_point() or val(n).dtype is torch.bool:
        return None
    t = n.target
    if t is aten.clamp_max.default:
        lo, hi = None, n.args[1]
    elif t is aten.clamp_min.default:
        lo, hi = n.args[1], None
    elif t is aten.clamp.default:
        lo = n.args[1] if len(n.args) > 1 else n.kwargs.get("min")
        hi = n.args[2] if len(n.args) > 2 else n.kwargs.get("max")
    else:
        return None
    if lo is None and hi is None:
        return None
    if lo is not None and (isinstance(lo, bool) or lo != 0):
        return None
    if hi is not None and (isinstance(hi, bool) or not isinstance(hi, int) or hi != E - 1):
        return None
    return n.args[0]


def strip_ids(n, E):
    """strip() that also walks back through id clamps -> (chain, clamp nodes)."""
    chain, clamps = strip(n), []
    while (src := id_clamp_source(chain[-1], E)) is not None:
        clamps.append(chain[-1])
        chain = chain + strip(src)
    return chain, clamps


def sentinel_fill_source(n, ids, E):
    """where(ids >= E, fill, x) or masked_fill(x, ids >= E, fill) (``ids`` one of the given nodes,
    through views; the mask may be broadcast over the features) -> x, else None."""
    if not isinstance(n, fx.Node) or n.op != "call_function":
        return None
    if n.target is aten.where.self:
        mask, x = n.args[0], n.args[2]
    elif n.target in (aten.masked_fill.Scalar, aten.masked_fill.Tensor):
        mask, x = n.args[1], n.args[0]
    else:
        return None
    if not isinstance(x, fx.Node) or not isinstance(mask, fx.Node) or shape(x) is None or \
            len(shape(x)) != len(shape(n)) or not all(same(a, b) for a, b in zip(shape(x), shape(n))):
        return None
    m = strip(mask)[-1]
    if not ((m.target is aten.ge.Scalar and m.args[1] == E) or
            (m.target is aten.gt.Scalar and m.args[1] == E - 1)):
        return None
    return x if strip_ids(m.args[0], E)[0][-1] in ids else None
