"""Sort-by-expert + grouped GEMM with offsets.

torchtitan's MoE (argsort of the ids, ``gather(x, 0, perm // k)``, counts from histc of the unsorted
ids, separate w1/w3/w2 grouped GEMMs, ``out.scatter_add(0, rows, weighted outputs)`` onto zeros or the
shared expert's output) is the same computation; only with ``score_before_experts=False``, since
scaling the expert *inputs* by the routing weights is not what the op computes.

transformers' ``grouped_mm`` experts: ``sort(ids.view(-1))``, ``hidden[perm // k]``, offsets =
``cumsum(histc(sorted_ids))`` (histc on float on CPU, on int on CUDA), ``aten._grouped_mm`` (CUDA
and CPU in bf16) or the opaque ``transformers::grouped_mm_fallback`` (other dtypes), un-permute with
``index_put(empty, [perm], arange)``, then ``view(T, k, H).sum(1)``. Rows here are "R": the (t, s)
pairs in sorted order; the labels turn them back into (T, S) at the un-permute."""
from __future__ import annotations

import operator

from .fx_utils import NoMatch, aten, grouped_mm_ops, is_view, prims, same, shape, strip, val
from .labels import Labels
from .region import Context, ExpertGemm, match_pair, match_pairs, routing_weights_in
from .sentinels import id_clamp_source, sentinel_fill_source

FORM = "grouped_mm"


def find_gemms(ctx: Context) -> list[ExpertGemm]:
    ops = set(grouped_mm_ops())
    out = []
    for n in ctx.graph.nodes:
        if n.op == "call_function" and n.target in ops:
            w = strip(n.args[1])[-1]
            if shape(w) is not None and len(shape(w)) == 3:
                out.append(ExpertGemm(n, w, n.args[0]))
    return out


def _offs(g):
    return g.args[2] if len(g.args) > 2 else g.kwargs.get("offs")


def _getitem(node, i):
    for u in node.users:
        if u.target is operator.getitem and u.args[1] == i:
            return u
    return None


def analyze_offsets(offs, E, sort, ids):
    """offs = cumsum(histc(ids, E, 0, E-1 or E)) (or bincount) of the sorted or the unsorted flat
    ids (the counts do not depend on the order); else NoMatch."""
    if offs is None or offs.target is not aten.cumsum.default:
        raise NoMatch("grouped GEMM offsets are not a cumulative sum of per-expert counts")
    h = strip(offs.args[0])[-1]
    if h.target is aten.histc.default:
        bins = h.args[1] if len(h.args) > 1 else h.kwargs.get("bins", 100)
        lo = h.args[2] if len(h.args) > 2 else h.kwargs.get("min", 0)
        hi = h.args[3] if len(h.args) > 3 else h.kwargs.get("max", 0)
        if bins != E or lo != 0 or hi not in (E - 1, E):
            raise NoMatch(f"token counts histc(bins={bins}, min={lo}, max={hi}) do not count the "
                          f"{E} experts one per bin")
    elif h.target is aten.bincount.default:
        pass
    else:
        raise NoMatch(f"grouped GEMM offsets come from {h.target}, not a per-expert count")
    counted = strip(h.args[0])[-1]
    if counted is not ids and not (counted.target is operator.getitem and counted.args[0] is sort
                                   and counted.args[1] == 0):
        raise NoMatch("per-expert counts are not taken from the routed expert ids")


def _is_floordiv_by(n, perm, k):
    if n.target is aten.div.Tensor_mode and n.kwargs.get("rounding_mode") == "floor":
        return n.args[0] is perm and n.args[1] == k
    if n.target is aten.floor_divide.default:
        return n.args[0] is perm and n.args[1] == k
    return False


def _is_inverse_perm(n, perm, S):
    """index_put(empty(S), [perm], arange(S))."""
    if n.target not in (aten.index_put.default, aten.index_put_.default):
        return False
    idx, values = n.args[1], n.args[2]
    if len(idx) != 1 or idx[0] is not perm:
        return False
    v = strip(values)[-1]
    return v.target in (prims.iota.default, aten.arange.default, aten.arange.start) and same(shape(v)[0], S)


def _users_through_views(n, depth=4):
    out, frontier = [], [n]
    for _ in range(depth):
        nxt = []
        for x in frontier:
            for u in x.users:
                (nxt if is_view(u) else out).append(u)
        frontier = nxt
    return out


def _sentinel_identities(sorted_ids, E):
    """transformers 5.17's sentinel guards on the sorted ids: clamp_max(ids, E-1) for the bias
    gathers, where(ids >= E, 0, rows) around the GEMMs -> {node: the node it equals when ids < E}."""
    out = {}
    for u in _users_through_views(sorted_ids):
        src = id_clamp_source(u, E)
        if src is not None and strip(src)[-1] is sorted_ids:
            out[u] = src
        elif u.target in (aten.ge.Scalar, aten.gt.Scalar):
            for w in _users_through_views(u):
                x = sentinel_fill_source(w, {sorted_ids}, E)
                if x is not None:
                    out[w] = x
    return out


def match(ctx: Context):
    """-> list of (MoERegion | NoMatch, where)."""
    return match_pairs(ctx, find_gemms(ctx), _match_one)


def _rows_index(xg):
    """hidden[q] (index) or gather(hidden, 0, q.view(-1, 1).expand(-1, H)) -> (hidden, q)."""
    if xg.target is aten.index.Tensor and len(xg.args[1]) == 1:
        return xg.args[0], xg.args[1][0]
    if xg.target is aten.gather.default and xg.args[1] == 0:
        return xg.args[0], strip(xg.args[2])[-1]
    return None, None


def _match_one(ctx, firsts, g2):
    E = shape(g2.weight)[0]
    for g in firsts + [g2]:
        if (len(g.node.args) > 3 and g.node.args[3] is not None) or g.node.kwargs.get("bias") is not None:
            raise NoMatch(f"{g.node.name}: grouped GEMM with a fused bias is not supported")
    offs = _offs(firsts[0].node)
    if any(_offs(g.node) is not offs for g in firsts + [g2]):
        raise NoMatch("the expert GEMMs use different offsets")
    # rows of the first GEMM: hidden[perm // k], perm from sorting the flat top-k ids
    xg = strip(firsts[0].x)[-1]
    if any(strip(g.x)[-1] is not xg for g in firsts):
        raise NoMatch("gate and up GEMMs read different rows")
    masked_x = None
    if xg.target in (aten.where.self, aten.masked_fill.Scalar):  # 5.17 zeroes sentinel rows; checked below
        masked_x = xg
        xg = strip(xg.args[2] if xg.target is aten.where.self else xg.args[0])[-1]
    hidden, q = _rows_index(xg)
    if hidden is None and xg.target is aten.mul.Tensor:
        raise NoMatch("routing weights are applied to the expert inputs (score before experts): "
                      "not the op's math (weights scale the expert outputs)")
    if hidden is None or q.target not in (aten.div.Tensor_mode, aten.floor_divide.default):
        raise NoMatch("the first grouped GEMM does not read hidden[perm // k]")
    perm = q.args[0]
    if perm.target is not operator.getitem or perm.args[1] != 1 or \
            perm.args[0].target not in (aten.sort.default, aten.sort.stable):
        raise NoMatch("rows are not ordered by sorting the expert ids")
    sort = perm.args[0]
    if sort.kwargs.get("descending", False) or (sort.target is aten.sort.default and len(sort.args) > 2
                                                and sort.args[2]):
        raise NoMatch("rows are not sorted by expert id (ascending)")
    flat = strip(sort.args[0])
    ids = flat[-1]
    if shape(ids) is None or len(shape(ids)) != 2:
        raise NoMatch("sorted ids are not the flattened [T, k] top-k ids")
    T, k = shape(ids)
    if not _is_floordiv_by(q, perm, k):
        raise NoMatch("the first grouped GEMM does not read hidden[perm // k]")
    analyze_offsets(offs, E, sort, ids)
    sorted_ids = _getitem(sort, 0)
    S = shape(sort.args[0])[0]
    identity = _sentinel_identities(sorted_ids, E) if sorted_ids is not None else {}
    if masked_x is not None and masked_x not in identity:
        raise NoMatch("the first grouped GEMM does not read hidden[perm // k]")
    if shape(hidden) is None or len(shape(hidden)) != 2 or not same(shape(hidden)[0], T):
        raise NoMatch("the first grouped GEMM does not read a [T, H] hidden tensor")
    labels = Labels(roots={}, sizes={"T": T, "S": k, "H": shape(hidden)[1], "R": S})
    labels.set_root(hidden, (("T",), ("H",)))
    labels.set_root(ids, (("T",), ("S",)))
    if sorted_ids is not None:
        labels.set_root(sorted_ids, (("R",),))
    labels.set_root(perm, (("R",),))
    labels.set_root(xg, (("R",), ("H",)))
    labels.identity.update(identity)

    def by_perm(n, lab):  # index(src, [perm]): (T,S)-ordered rows -> sorted rows
        src = lab.of(n.args[0])
        # norm: at T=1 (or k=1) the size-1 atom is gone from a view of the [T, k] tensor
        return (("R",),) + src[1:] if src is not None and src and \
            lab.norm(src[0]) == lab.norm(("T", "S")) else None

    def unpermute(n, lab):  # index(src, [inverse perm]): sorted rows -> (T,S) order
        src = lab.of(n.args[0])
        return (("T", "S"),) + src[1:] if src is not None and src and \
            lab.norm(src[0]) == lab.norm(("R",)) else None

    for u in perm.users:
        if u.target is aten.index.Tensor and len(u.args[1]) == 1 and u.args[1][0] is perm:
            labels.rules[u] = by_perm
        if _is_inverse_perm(u, perm, S):
            for v in u.users:
                if v.target is aten.index.Tensor and v.args[1][0] is u:
                    labels.rules[v] = unpermute

    def grouped(n, lab):  # out[r] = x[r] @ W[expert of r]
        lx, lw = lab.of(n.args[0]), lab.of(n.args[1])
        if lx is None or lw is None or not lx or lab.norm(lx[0]) != lab.norm(("R",)) \
                or lw[0] != ("E",):
            return None
        lab.contracted[n] = (lx[1], lw[1])
        return (("R",), lw[2])

    for g in firsts + [g2]:
        labels.rules[g.node] = grouped

    def scatter_combine(n, lab):  # base.scatter_add(0, (perm // k) expanded, y): the sum over k
        src = lab.of(n.args[3])
        if n.args[1] != 0 or strip(n.args[2])[-1] is not q or src is None or not src or \
                lab.norm(src[0]) != lab.norm(("R",)):
            return None
        lab.residual[n] = n.args[0]
        return (("T",),) + src[1:]

    for u in _users_through_views(q):
        if u.target is aten.scatter_add.default:
            labels.rules[u] = scatter_combine

    def weights_ok(chain, lab):
        root = chain[-1]
        if root.target is aten.index.Tensor and root.args[1][0] is perm:  # weights[perm]
            return routing_weights_in(strip(root.args[0]), lab, T, k, "S")
        return None

    ids_roots = {ids} | ({sorted_ids} if sorted_ids is not None else set()) | \
        {n for n in identity if not val(n).is_floating_point()}  # the clamped ids of the bias gathers
    region = match_pair(FORM, firsts, g2, labels, ctx, T=T, k=k, slot="S", ids_roots=ids_roots,
                        hidden=hidden, weights_root_ok=weights_ok, row_atoms=("R",))
    region.topk_ids = ids
    return region
