"""Dense "every expert on every token, then mask" forms.

Every expert's GEMMs run on all T tokens (``einsum('th,enh->etn', x, W13)``: a bmm whose batch is
the expert dim), and the router's weights enter as a dense [T, E] matrix that is zero for the
experts a token did not pick. The op gets ids = all experts and the dense weights (or, when the dense
matrix is ``zeros.scatter(1, topk_ids, topk_weights)``, the top-k ids and weights themselves).

Llama 4's form scales the experts' *input* instead: ``x.repeat(E, 1) * w.T.reshape(-1, 1)``, viewed
[E, T, H], through both bmm's, summed over E with no weight (plus a shared expert beside it). Its
dense weights are ``sigmoid(full(-inf).scatter(1, topk_ids, topk_values))``: unary ops after the
scatter are kept (``weights_chain``) when they send the fill value to 0, and re-applied to the top-k
values at rewrite. A token's unpicked experts then read a zero input; without biases they give
exactly 0 (both activations vanish at 0), so the op runs the top-k experts only; with biases they
do not, and every expert runs (weights [T, E])."""
from __future__ import annotations

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from .fx_utils import DTYPE_OPS, NoMatch, aten, same, shape, strip, val
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


# unary ops a router may apply to its scattered scores (the fill value must come out as 0)
_UNARY = {aten.sigmoid.default, aten.clone.default, aten.alias.default, *DTYPE_OPS}


def _fill_value(b):
    if b.target in (aten.zeros.default, aten.zeros_like.default):
        return 0.0
    if b.target in (aten.full.default, aten.full_like.default):
        return b.args[1]
    return None


def _scatter_topk(n, T, E):
    """f(full([T, E], c).scatter(1, ids, w)) with f(c) == 0, f a chain of unary ops ->
    (ids, w, chain of f's nodes from the scatter on), else None."""
    chain = []
    while n.op == "call_function" and n.target in _UNARY and len(chain) < 8:
        chain.append(n)
        n = n.args[0]
    if n.op != "call_function" or n.target not in (aten.scatter.src, aten.scatter_add.default) \
            or n.args[1] != 1:
        return None
    base, ids, w = n.args[0], n.args[2], n.args[3]
    c = _fill_value(strip(base)[-1])
    if c is None or shape(ids) != shape(w):
        return None
    if n.target is aten.scatter_add.default and c != 0:
        return None  # adds onto the fill: the picked weights are not f(w)
    chain = tuple(reversed(chain))
    try:  # f(c) on the CPU, outside the compile's fake mode
        with unset_fake_temporarily():
            z = torch.tensor(float(c))
            for u in chain:
                z = u.target(z, *u.args[1:], **{k: v for k, v in u.kwargs.items() if k != "device"})
            if z.item() != 0:
                return None
    except (RuntimeError, TypeError, ValueError):
        return None
    return ids, w, chain


def _input_weights(x, T, E, labels):
    """The first GEMM reads ``x.repeat(E, 1) * w.T.reshape(-1, 1)`` (or x broadcast over E, times
    w's columns): -> (hidden [T, H], weights [T, E]) with their labels set, else None. The weights
    are the [T, E] tensor nearest the product whose labels make its rows (expert, token) pairs:
    the weights as the model applies them (after its dtype cast), also where T == E."""
    m = strip(x)[-1]
    for wi in (0, 1):
        other = strip(m.args[1 - wi])[-1]
        if other.op == "call_function" and other.target is aten.repeat.default:
            other = other.args[0]
        hidden = find_hidden(other, T)
        if hidden is None:
            continue
        for n in strip(m.args[wi]):
            s = shape(n)
            if s is None or len(s) != 2 or not same(s[0], T) or not same(s[1], E) or \
                    not val(n).is_floating_point():
                continue
            labels.set_root(hidden, (("T",), ("H",)))
            labels.set_root(n, (("T",), ("E",)))
            lab = labels.of(m)
            want = [a for a in ("E", "T", "H") if labels.norm((a,))]  # (T=1 drops out)
            if lab is not None and [a for d in lab for a in labels.norm(d)] == want:
                return hidden, n
            del labels.roots[n], labels.roots[hidden]
            labels.memo.clear()
    return None


def match(ctx: Context):
    """-> list of (MoERegion | NoMatch, where)."""
    return match_pairs(ctx, find_gemms(ctx), _match_one)


def _match_one(ctx, firsts, g2):
    E = shape(g2.weight)[0]
    on_input = None
    m, x = strip(firsts[0].x)[-1], firsts[0].x
    if m.op == "call_function" and m.target is aten.mul.Tensor and len(shape(x)) == 3 and \
            all(isinstance(a, fx.Node) for a in m.args[:2]):  # weights on the input rows?
        T = shape(x)[1]  # x: [E, T, H], the bmm's batch first
        labels = Labels(roots={}, sizes={"T": T, "E": E, "H": shape(x)[-1]})
        on_input = _input_weights(x, T, E, labels)
    if on_input is not None:
        hidden = on_input[0]
        T, H = shape(hidden)
    else:  # (a product that is not routing weights, e.g. a norm's scale, is the hidden itself)
        hidden = find_hidden(x, None)
        if hidden is None:
            raise NoMatch("the first GEMM does not read a [T, H] hidden tensor (nor the hidden "
                          "states times [T, E] routing weights)")
        T, H = shape(hidden)
        labels = Labels(roots={}, sizes={"T": T, "H": H, "E": E})
        labels.set_root(hidden, (("T",), ("H",)))
    region = match_pair(FORM, firsts, g2, labels, ctx, T=T, k=E, slot="E", ids_roots=set(),
                        hidden=hidden, row_atoms=("E", "T"),
                        weights_root_ok=lambda c, lab: routing_weights_in(c, lab, T, E, "E"),
                        input_weights=on_input and on_input[1])
    found = _scatter_topk(region.topk_weights, T, E)
    # with the weights on the input, an unpicked expert reads 0 and gives W2 act(b13) + b2
    if found is not None and not (on_input and (region.w13_bias is not None or
                                                region.w2_bias is not None)):
        region.topk_ids, region.topk_weights, region.weights_chain = found
        region.top_k = shape(found[0])[1]
    else:
        region.dense_experts = True
        region.note = ("every expert on every token: " + (
            "with the weights on the input, the biases make unpicked experts count"
            if found is not None else "the [T, E] weights are not a top-k scatter"))
    return region
