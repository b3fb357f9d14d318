"""Dense "every expert on every token, then mask" forms.

Every expert's GEMMs run on all T tokens (``einsum('th,enh->etn', x, W13)``: a bmm whose batch is
the expert dim), and the router's weights enter as a dense [T, E] matrix that is zero for the
experts a token did not pick. The op gets ids = all experts and the dense weights (or, when the dense
matrix is ``zeros.scatter(1, topk_ids, topk_weights)``, the top-k ids and weights themselves)."""
from __future__ import annotations

from .fx_utils import NoMatch, aten, shape, strip, val
from .labels import Labels
from .region import Context, ExpertGemm, find_hidden, match_pair, match_pairs, routing_weights_in

FORM = "dense"


def find_gemms(ctx: Context) -> list[ExpertGemm]:
    out = []
    for n in ctx.graph.nodes:
        if n.op != "call_function" or n.target is not aten.bmm.default:
            continue
        for i in (0, 1):
            root = strip(n.args[i])[-1]
            s = shape(root)
            if s is not None and len(s) == 3 and (root in ctx.const or root.op == "placeholder") \
                    and val(root).is_floating_point():
                out.append(ExpertGemm(n, root, n.args[1 - i]))
                break
    return out


def _scatter_topk(n, T, E):
    """zeros([T, E]).scatter(1, ids, w) -> (ids, w), else None."""
    if n.target in (aten.scatter.src, aten.scatter_add.default) and n.args[1] == 1:
        base, ids, w = n.args[0], n.args[2], n.args[3]
        b = strip(base)[-1]
        if b.target in (aten.zeros.default, aten.full.default, aten.zeros_like.default) and \
                (b.target is not aten.full.default or b.args[1] == 0) and shape(ids) == shape(w):
            return ids, w
    return None


def match(ctx: Context):
    """-> list of (MoERegion | NoMatch, where)."""
    return match_pairs(ctx, find_gemms(ctx), _match_one)


def _match_one(ctx, firsts, g2):
    hidden = find_hidden(firsts[0].x, None)
    if hidden is None:
        raise NoMatch("the first GEMM does not read a [T, H] hidden tensor")
    T, H = shape(hidden)
    E = shape(g2.weight)[0]
    labels = Labels(roots={}, sizes={"T": T, "H": H, "E": E})
    labels.set_root(hidden, (("T",), ("H",)))
    region = match_pair(FORM, firsts, g2, labels, ctx, T=T, k=E, slot="E", ids_roots=set(),
                        hidden=hidden, row_atoms=("E", "T"),
                        weights_root_ok=lambda c, lab: routing_weights_in(c, lab, T, E, "E"))
    found = _scatter_topk(region.topk_weights, T, E)
    if found is not None:
        region.topk_ids, region.topk_weights = found
        region.top_k = shape(found[0])[1]
    else:
        region.dense_experts = True
    return region
