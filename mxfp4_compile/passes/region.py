"""An MoE region (MoERegion: what every form's matcher produces) and the part of matching every form
shares: pair the expert GEMMs, check the activation between them, follow the result to the weighted
combine. A form (gather_bmm.py, grouped_mm.py, dense.py) only says which nodes are its expert GEMMs
and what their operands' dimensions mean (Labels roots/rules)."""
from __future__ import annotations

import dataclasses
import heapq

import torch.fx as fx

from .activation import MatchedActivation, identify_activation
from .fx_utils import DTYPE_OPS, NoMatch, aten, is_view, same, shape, strip, val
from .labels import Labels


@dataclasses.dataclass
class MoERegion:
    """What a form's matcher found: the nodes torch.ops.mxfp4.moe reads and the one it replaces."""
    form: str                     # which matcher found it
    hidden: fx.Node               # [T, H]
    topk_ids: fx.Node | None      # [T, k] int (None: dense form without top-k; built at rewrite)
    topk_weights: fx.Node         # [T, k] (or [T, E] dense)
    w13: list                     # [W13] or [W_gate, W_up] (weight-constant nodes, 3-D)
    w13_bias: fx.Node | None
    w2: fx.Node
    w2_bias: fx.Node | None
    w13_transposed: bool          # [E, H, 2I] instead of [E, 2I, H]
    w2_transposed: bool           # [E, I, H] instead of [E, H, I]
    activation: MatchedActivation
    output: fx.Node               # [T, H] node the op's result replaces
    dense_experts: bool = False   # weights are [T, E] over every expert
    residual: fx.Node | None = None  # a tensor the combine adds the expert sum to (scatter_add base)
    weights_on_input: bool = False  # each expert reads w * x; outputs summed unweighted
    weights_chain: tuple = ()     # unary ops the model applies to the weights after its scatter
    #                               (dense forms), re-applied to topk_weights at rewrite
    note: str = ""                # what a report should say about how the op runs it
    num_experts: int = 0
    hidden_size: int = 0
    intermediate_size: int = 0
    top_k: int = 0


@dataclasses.dataclass
class ExpertGemm:
    node: fx.Node                 # the GEMM (bmm, mm, grouped mm)
    weight: fx.Node               # 3-D expert weight it reads ([E, ., .], before any gather)
    x: fx.Node                    # its activation operand
    ids: fx.Node | None = None    # gather index root ([T, k] ids) for the gather form
    id_clamps: tuple = ()         # identity clamps between ids and the gather (sentinels.strip_ids)


@dataclasses.dataclass
class Context:
    graph: fx.Graph
    const: set                    # nodes Inductor's freeze folds (parameter-only)
    names: list | None = None     # parameter source names by placeholder index (reports)


def match_pairs(ctx: Context, gemms: list[ExpertGemm], match_one) -> list:
    """Pair ``gemms`` and run ``match_one(ctx, firsts, g2)`` on each pair -> [(MoERegion | NoMatch,
    where)], where names the pair's GEMM nodes."""
    results = []
    for firsts, g2 in pair_gemms(gemms):
        where = f"{firsts[0].node.name}..{g2.node.name}"
        try:
            results.append((match_one(ctx, firsts, g2), where))
        except NoMatch as e:
            results.append((e, where))
    return results


def routing_weights_in(chain, labels: Labels, T, k, slot):
    """The first [T, k] float tensor of ``chain`` (nearest the use first: the weights as the model
    applies them), labelled (T, ``slot``) -> it, else None."""
    for n in chain:
        s = shape(n)
        if s is not None and len(s) == 2 and same(s[0], T) and same(s[1], k) \
                and val(n).is_floating_point():
            labels.set_root(n, (("T",), (slot,)))
            return n
    return None


def pair_gemms(gemms: list[ExpertGemm], limit=300):
    """-> [(first GEMMs (1 or 2: fused gate_up, or gate and up), second GEMM)], in graph order.

    A second GEMM is one whose activation operand comes from not-yet-paired expert GEMMs (the
    backward search stops at every expert GEMM), so layer n+1's first GEMM, which also depends on
    layer n's GEMMs through the residual stream, is never taken for a second GEMM."""
    order = {n: i for i, n in enumerate(gemms[0].node.graph.nodes)} if gemms else {}
    gemms = sorted(gemms, key=lambda g: order[g.node])
    by_node = {g.node: g for g in gemms}
    pairs, used = [], set()
    for g2 in gemms:
        if g2.node in used:
            continue
        seen, heap, firsts = set(), [(-order[g2.x], id(g2.x), g2.x)], []
        while heap and len(seen) < limit:  # latest nodes first: the activation sits right before
            _, _, n = heapq.heappop(heap)
            if firsts and order[n] < min(order[g.node] for g in firsts) - 100:
                break  # a separate gate/up GEMM sits next to the first one found, not far back
            if n in seen:
                continue
            seen.add(n)
            if n in by_node and n is not g2.node:
                if n not in used:
                    firsts.append(by_node[n])
                continue
            for a in n.all_input_nodes:
                heapq.heappush(heap, (-order[a], id(a), a))
        if firsts:
            firsts.sort(key=lambda g: order[g.node])
            pairs.append((firsts, g2))
            used.update(g.node for g in firsts)
            used.add(g2.node)
    return pairs


def find_hidden(x_operand, T):
    """The [T, H] tensor a first GEMM reads (before the broadcast/gather that feeds the GEMM): the
    one nearest the root of its view chain, so that gate and up GEMMs reached through different
    views (at T=1 a GPU's batch-1 bmm -> squeeze -> mm gives each its own [1, H] squeeze) agree."""
    chain = strip(x_operand)
    for n in reversed(chain):
        s = shape(n)
        if s is not None and len(s) == 2 and (T is None or same(s[0], T)):
            return n
    return None


def _is_bias_gather(n, ctx, ids_roots):
    """index(B [E, N], [ids]) (or B itself, broadcast: dense form) with B parameter-only ->
    (B, node), else None. The caller's labels check that B's rows line up with the GEMM rows."""
    root = strip(n)[-1]
    if root in ctx.const and shape(root) is not None and len(shape(root)) == 2:
        return root, root
    if root.op == "call_function" and root.target is aten.index.Tensor:
        b, idx = root.args[0], root.args[1]
        if len(idx) == 1 and b in ctx.const and len(shape(b)) == 2 and strip(idx[0])[-1] in ids_roots:
            return b, root
    return None


def follow_gemm_output(g, labels: Labels, ctx, ids_roots, out_label):
    """From a GEMM, through views and an optional per-expert bias add, to the last node before the
    next computation. -> (node, bias or None)."""
    cur, bias = g, None
    while len(cur.users) == 1:
        u = next(iter(cur.users))
        if is_view(u) and u.target not in DTYPE_OPS and labels.of(u) is not None:
            cur = u
            continue
        if labels.identity.get(u) is cur:  # a sentinel mask (identity: see sentinels.py)
            cur = u
            continue
        if u.target is aten.add.Tensor and bias is None and len(u.args) == 2:
            other = u.args[1] if u.args[0] is cur else u.args[0]
            found = _is_bias_gather(other, ctx, ids_roots) if isinstance(other, fx.Node) else None
            if found is not None:
                b, gathered = found
                labels.set_root(b, (("E",), out_label))
                lab = labels.of(u)
                if lab is not None and lab == labels.of(cur):
                    cur, bias = u, b
                    continue
        break
    return cur, bias


def gemm_roles(g, labels, x_label, w_labels):
    """Check a GEMM contracts the activations' ``x_label`` with one of the weight's two non-expert
    dims. -> (output label of the weight, transposed) ; transposed = weight is [E, K, N]."""
    if g.target in (aten.bmm.default, aten.mm.default):
        out, contracted = labels.gemm_labels(g)
    else:
        out, contracted = labels.of(g), labels.contracted.get(g)
    if out is None or contracted is None:
        raise NoMatch(f"{g.name}: operand dimensions do not line up as tokens x expert weight")
    a, b = labels.norm(contracted[0]), labels.norm(contracted[1])
    pair = {a, b}
    wa, wb = w_labels
    if pair == {(x_label,), (wb,)}:
        return wa, False
    if pair == {(x_label,), (wa,)}:
        return wb, True
    raise NoMatch(f"{g.name}: contracts {a} with {b}, not the features with an expert weight dim")


def check_rows(lab, row_atoms, n_label, where, labels):
    atoms = [x for d in lab for x in labels.norm(d)]
    need = [x for x in list(row_atoms) + [n_label] if labels.norm((x,))]
    for x in need:
        if atoms.count(x) != 1:
            raise NoMatch(f"{where}: rows are not one (token, expert) pair each ({lab})")
    if labels.norm(lab[-1]) != (n_label,):
        raise NoMatch(f"{where}: the GEMM's output features are not the last dim")
    for x in atoms:
        if x not in need and not x.startswith("*"):
            raise NoMatch(f"{where}: unexpected dim {x} in {lab}")


def walk_combine(start, labels: Labels, slot, weights_root_ok, ctx, ids_roots, out_label,
                 input_weights=None):
    """From the second GEMM (its output labels hold T, ``slot``, H) to the [T, H] weighted sum
    (``input_weights``: the weights the experts' input was scaled by; then the sum is unweighted
    and a second weighting is no match). -> (output node, weights root, w2 bias or None)."""
    cur, weights, bias = start, input_weights, None
    on_input = input_weights is not None
    summed = on_input and not labels.norm((slot,))  # top-1 with input weights: nothing to sum
    while True:
        if len(cur.users) != 1:
            raise NoMatch(f"{cur.name}: expert output used {len(cur.users)} times before the combine")
        u = next(iter(cur.users))
        if u in labels.residual or (u.target is aten.scatter_add.default and u in labels.rules
                                     and labels.of(u) is not None):
            if weights is None or summed:
                raise NoMatch(f"{u.name}: scatter-add combine of unweighted expert outputs")
            summed, cur = True, u  # base.scatter_add(token rows, weighted outputs)
        elif (is_view(u) or u in labels.rules or labels.identity.get(u) is cur) and \
                labels.of(u) is not None:
            cur = u  # a re-layout (view, un-permute of sorted rows) or a sentinel mask (identity)
        elif u.target is aten.add.Tensor and bias is None and (weights is None or on_input) \
                and not summed:
            other = u.args[1] if u.args[0] is cur else u.args[0]
            found = _is_bias_gather(other, ctx, ids_roots) if isinstance(other, fx.Node) else None
            if found is None:
                raise NoMatch(f"{u.name}: adds something other than a per-expert bias to the output")
            labels.set_root(found[0], (("E",), out_label))
            if labels.of(u) is None:
                raise NoMatch(f"{u.name}: bias does not line up with the expert rows")
            bias, cur = found[0], u
        elif u.target is aten.mul.Tensor and weights is None:
            other = u.args[1] if u.args[0] is cur else u.args[0]
            if not isinstance(other, fx.Node):
                raise NoMatch(f"{u.name}: output scaled by a constant, not by routing weights")
            root = weights_root_ok(strip(other), labels)
            if root is None:
                raise NoMatch(f"{u.name}: output scaled by a tensor that is not [T, k] routing weights")
            if labels.of(u) is None:
                raise NoMatch(f"{u.name}: routing weights do not line up with the expert rows")
            weights, cur = root, u
            summed = not labels.norm((slot,))  # top-1: weighting is the whole combine
        elif u.target is aten.sum.dim_IntList and weights is not None and not summed:
            lab = labels.of(cur)
            dims = {d % len(lab) for d in u.args[1]}
            if [labels.norm(lab[d]) for d in dims] != [labels.norm((slot,))]:
                raise NoMatch(f"{u.name}: sums over {[lab[d] for d in dims]}, not over the experts")
            summed, cur = True, u
        elif u.target in (aten.bmm.default, aten.mm.default) and weights is None and not summed:
            # (mm: Inductor's joint graph turns a batch-1 bmm into squeeze -> mm -> unsqueeze on
            # GPUs, so at T=1 the combine einsum reaches us as an mm)
            other = u.args[1] if u.args[0] is cur else u.args[0]
            root = weights_root_ok(strip(other), labels)
            if root is None:
                raise NoMatch(f"{u.name}: combine GEMM with something other than routing weights")
            out, contracted = labels.gemm_labels(u)
            if out is None or labels.norm(contracted[0]) != labels.norm((slot,)) or \
                    labels.norm(contracted[1]) != labels.norm((slot,)):
                raise NoMatch(f"{u.name}: combine GEMM does not sum over the experts")
            weights, summed, cur = root, True, u
        else:
            break
        if summed:
            lab = labels.of(cur)
            if lab is not None and [labels.norm(d) for d in lab if labels.norm(d)] == \
                    [labels.norm(d) for d in (("T",), out_label) if labels.norm(d)] \
                    and len(shape(cur)) == 2:
                return cur, weights, bias
    what = "sum_k y (input already weighted)" if on_input else "sum_k w[t,k] * y"
    raise NoMatch(f"{cur.name}: expert outputs are not combined as {what} (stopped at "
                  f"{next(iter(cur.users)).name if cur.users else 'output'})")


def match_pair(form, firsts, g2: ExpertGemm, labels: Labels, ctx, *, T, k, slot, ids_roots,
               hidden, weights_root_ok, row_atoms=None, input_weights=None) -> MoERegion:
    """The shared part of every form; ``labels`` already has the form's roots for hidden/ids/rows
    (and, with ``input_weights``, the weights the experts' input rows were scaled by)."""
    if len(firsts) > 2:
        raise NoMatch(f"{len(firsts)} expert GEMMs feed one activation")
    # -- first GEMM(s): gate_up fused, or gate and up separate
    w13 = [g.weight for g in firsts]
    shapes13 = {tuple(shape(w)) for w in w13}
    if len(shapes13) != 1:
        raise NoMatch("gate and up weights have different shapes")
    outs, trans13 = [], None
    for i, g in enumerate(firsts):
        wl = (f"w13a{i}", f"w13b{i}")
        E, A, B = shape(g.weight)
        labels.set_root(g.weight, (("E",), (wl[0],), (wl[1],)), {"E": E, wl[0]: A, wl[1]: B})
        n_label, tr = gemm_roles(g.node, labels, "H", wl)
        if trans13 is not None and tr != trans13:
            raise NoMatch("gate and up weights are stored in different orders")
        trans13 = tr
        out, bias = follow_gemm_output(g.node, labels, ctx, ids_roots, (n_label,))
        if bias is not None and len(firsts) > 1:
            raise NoMatch("biases on separate gate/up GEMMs are not supported")
        lab = labels.of(out)
        if lab is None:
            raise NoMatch(f"{out.name}: lost track of the GEMM rows")
        check_rows(lab, row_atoms or ("T", slot), n_label, out.name, labels)
        outs.append((out, bias, n_label))
    bias13 = outs[0][1]
    act_in = strip(g2.x)[-1]
    nodes_in = [o[0] for o in outs]
    act = None
    if len(nodes_in) == 1:
        act = identify_activation(nodes_in, act_in)
    else:
        for order in (nodes_in, nodes_in[::-1]):
            try:
                act = identify_activation(order, act_in)
                if order is not nodes_in:
                    w13 = w13[::-1]
                break
            except NoMatch as e:
                err = e
        if act is None:
            raise err
    p_lab = labels.of(nodes_in[0])
    s_p = shape(nodes_in[0])
    N = s_p[-1]
    I = N // 2 if len(nodes_in) == 1 else N
    s_a = shape(act_in)
    p_dims = [l for l, n in zip(p_lab, s_p) if not same(n, 1)]
    a_dims = [i for i, n in enumerate(s_a) if not same(n, 1)]
    if not same(s_a[-1], I) or len(p_dims) != len(a_dims):
        raise NoMatch(f"{act_in.name}: activation output {s_a} is not the GEMM rows x {I}")
    a_lab = [()] * len(s_a)
    for i, l in zip(a_dims, p_dims[:-1] + [("I",)]):
        a_lab[i] = l
    labels.set_root(act_in, a_lab, {"I": I})
    # -- second GEMM
    E2, A2, B2 = shape(g2.weight)
    labels.set_root(g2.weight, (("E",), ("w2a",), ("w2b",)), {"w2a": A2, "w2b": B2})
    h_label, trans2 = gemm_roles(g2.node, labels, "I", ("w2a", "w2b"))
    if not same(labels.sizes[h_label], labels.sizes["H"]):
        raise NoMatch("the second GEMM's output size is not the hidden size")
    # -- combine
    out, weights, bias2 = walk_combine(g2.node, labels, slot, weights_root_ok, ctx, ids_roots,
                                       (h_label,), input_weights)
    for w in w13 + [g2.weight]:
        if w not in ctx.const:
            raise NoMatch(f"expert weight {w.name} is not a frozen parameter (is grad enabled, or is "
                          f"the weight a forward input?)")
    if not same(shape(out)[0], shape(hidden)[0]):
        raise NoMatch("output rows differ from the tokens")
    E = shape(g2.weight)[0]
    residual = labels.residual.get(out)
    if residual is not None and _is_zeros(residual):
        residual = None
    return MoERegion(form=form, hidden=hidden, topk_ids=None, topk_weights=weights, w13=w13,
                     w13_bias=bias13, w2=g2.weight, w2_bias=bias2, w13_transposed=trans13,
                     w2_transposed=trans2, activation=act, output=out, num_experts=E,
                     hidden_size=shape(hidden)[1], intermediate_size=I, top_k=k,
                     residual=residual, weights_on_input=input_weights is not None)


def _is_zeros(n):
    r = strip(n)[-1]
    return r.target in (aten.zeros_like.default, aten.zeros.default, aten.new_zeros.default) or \
        (r.target in (aten.full.default, aten.full_like.default) and r.args[1] == 0)

