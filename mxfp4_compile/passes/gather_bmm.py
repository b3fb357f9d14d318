"""Per-token gather of expert weights + batched GEMM.

OpenAI's gpt-oss reference MLPBlock (``W[topk_ids]`` + einsum), gpt-fast's Mixtral (separate gate/up
weights), transformers' ``batched_mm`` experts (``W[ids.view(-1)]`` + bmm); after AOT these are
``index(W, [ids]) -> view/permute -> bmm`` whatever the einsum spelling."""
from __future__ import annotations

from .fx_utils import NoMatch, aten, shape, strip, val
from .labels import Labels
from .region import Context, ExpertGemm, find_hidden, match_pair, match_pairs, routing_weights_in
from .sentinels import strip_ids

FORM = "gather_bmm"


def find_gemms(ctx: Context) -> list[ExpertGemm]:
    out = []
    for n in ctx.graph.nodes:
        if n.op != "call_function" or n.target not in (aten.bmm.default, aten.mm.default):
            continue
        for i in (0, 1):
            root = strip(n.args[i])[-1]
            if root.op == "call_function" and root.target is aten.index.Tensor \
                    and len(root.args[1]) == 1 and root.args[1][0] is not None:
                w, idx = root.args[0], root.args[1][0]
                if shape(w) is not None and len(shape(w)) == 3 and not val(idx).is_floating_point():
                    chain, clamps = strip_ids(idx, shape(w)[0])  # transformers 5.17 clamps the ids
                    out.append(ExpertGemm(n, w, n.args[1 - i], chain[-1], tuple(clamps)))
                    break
    return out


def match(ctx: Context):
    """-> list of (MoERegion | NoMatch, where)."""
    return match_pairs(ctx, find_gemms(ctx), _match_one)


def _match_one(ctx, firsts, g2):
    ids = firsts[0].ids
    if any(g.ids is not ids for g in firsts + [g2]):
        raise NoMatch("the two expert GEMMs gather weights with different indices")
    s = shape(ids)
    if s is None or len(s) != 2:
        raise NoMatch(f"expert ids {ids.name} are not [T, k]")
    T, k = s
    hidden = find_hidden(firsts[0].x, T)
    if hidden is None or any(find_hidden(g.x, T) is not hidden for g in firsts):
        raise NoMatch("the first GEMM does not read one [T, H] hidden tensor")
    labels = Labels(roots={}, sizes={"T": T, "S": k, "H": shape(hidden)[1]})
    labels.set_root(hidden, (("T",), ("H",)))
    labels.set_root(ids, (("T",), ("S",)))
    clamps = {c for g in firsts + [g2] for c in g.id_clamps}
    labels.identity.update({c: c.args[0] for c in clamps})
    region = match_pair(FORM, firsts, g2, labels, ctx, T=T, k=k, slot="S", ids_roots={ids} | clamps,
                        hidden=hidden,
                        weights_root_ok=lambda c, lab: routing_weights_in(c, lab, T, k, "S"))
    region.topk_ids = ids
    return region
