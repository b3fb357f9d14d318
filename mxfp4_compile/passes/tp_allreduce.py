"""Tensor-parallel MoE whose partial expert outputs are all-reduced before the combine.

OpenAI's gpt-oss reference MLPBlock with world_size > 1 holds I/world of every expert and does
``dist.all_reduce(y)`` on the uncombined [T, k, H] second-GEMM output, then adds the w2 bias and
combines. Dynamo turns the in-place collective into functional ones; after AOT:

    y [T, k, H] -> _c10d_functional.all_reduce(y, "sum", group) -> wait_tensor -> copy(y, waited)
      -> (views) -> add(., b2[ids]) -> combine with the routing weights

This form takes the collective out of the way while the gather_bmm matcher looks for the region
(and puts it back), and rewrites a region found with the reduce moved after the combine (k times less traffic):

    part = mxfp4.moe(hidden, ids, w, <this rank's shard>, w2_bias=None)     # [T, H]
    out  = wait_tensor(all_reduce(part, "sum", group)) + sum_k w[t,k] * b2[ids[t,k]]

sum_r sum_k w y_r + sum_k w b2 = sum_k w (sum_r y_r + b2): exact, the bias counted once and the same
on every rank without knowing the rank at compile time. The weight transform quantizes this rank's
shard (blocks follow the shard). Any other graph: no candidates here (the other forms see it)."""
from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from . import gather_bmm
from .fx_utils import NoMatch, aten, prims, val
from .region import Context, MoERegion
from .rewrite import call, rewrite as moe_rewrite

FORM = "tp_allreduce"
C10D = torch.ops._c10d_functional


@dataclasses.dataclass
class Site:
    """One ``all_reduce -> wait_tensor [-> copy back]`` on a 3-D tensor (detached while matching)."""
    y: fx.Node                  # the reduced tensor (partial expert outputs)
    reduce_op: str
    group: str
    copy_back: bool             # AOT's copy(y, waited) of the in-place dist.all_reduce
    metas: tuple                # meta of (all_reduce, wait[, copy]) to rebuild them
    users: list = dataclasses.field(default_factory=list)  # nodes that read the reduced value
    nodes: list = dataclasses.field(default_factory=list)  # the collective's nodes (reattached)


def _find_sites(graph: fx.Graph) -> list[tuple[fx.Node, fx.Node, fx.Node]]:
    out = []
    for ar in graph.nodes:
        if ar.op != "call_function" or ar.target is not C10D.all_reduce.default:
            continue
        y, op, group = ar.args[0], ar.args[1], ar.args[2]
        v = val(y)
        if op != "sum" or v is None or v.dim() != 3 or len(ar.users) != 1:
            continue
        wait = next(iter(ar.users))
        if wait.target is not C10D.wait_tensor.default:
            continue
        end = wait
        if len(wait.users) == 1:
            u = next(iter(wait.users))
            if u.target is aten.copy.default and u.args[0] is y and u.args[1] is wait:
                end = u
        out.append((ar, wait, end))
    return out


def _detach(graph, ar, wait, end) -> Site:
    y = ar.args[0]
    nodes = (ar, wait) + ((end,) if end is not wait else ())
    site = Site(y, ar.args[1], ar.args[2], end is not wait, tuple(dict(n.meta) for n in nodes),
                list(end.users))
    for u in site.users:
        u.replace_input_with(end, y)
    for n in reversed(nodes):
        graph.erase_node(n)
    return site


def _reattach(graph, site: Site) -> None:
    """Put the collective back between y and its readers (rewrite() erases it once the combine
    it fed is replaced: Inductor keeps a user-less wait_tensor alive, and with it the whole old
    expert chain, so dead-code elimination alone would leave both GEMMs and the collective)."""
    y = site.y
    first = min(site.users, key=_order(graph).__getitem__)
    with graph.inserting_before(first):
        ar = graph.call_function(C10D.all_reduce.default, (y, site.reduce_op, site.group))
        wait = graph.call_function(C10D.wait_tensor.default, (ar,))
        nodes = [ar, wait]
        if site.copy_back:
            nodes.append(graph.call_function(aten.copy.default, (y, wait)))
    for n, meta in zip(nodes, site.metas):
        n.meta.update(meta)
    for u in site.users:
        u.replace_input_with(y, nodes[-1])
    site.nodes = nodes


def _order(graph):
    return {n: i for i, n in enumerate(graph.nodes)}


def _on_chain(y: fx.Node, out: fx.Node) -> bool:
    """out is reached from y through single-user nodes (the path walk_combine took)."""
    cur = y
    while cur is not out and len(cur.users) == 1:
        cur = next(iter(cur.users))
    return cur is out


def match(ctx: Context):
    """Detach every candidate collective, let gather_bmm match, keep the regions that combine
    through one, and put every collective back: the graph is unchanged unless rewrite() runs
    (explain's report-only mode, a size the manager refuses and a failed rewrite stay correct)."""
    found = _find_sites(ctx.graph)
    if not found:
        return []
    sites = [_detach(ctx.graph, *f) for f in found]
    results, taken, errors = [], set(), []
    try:
        for r, where in gather_bmm.match(ctx):
            if not isinstance(r, MoERegion):
                errors.append(str(r))
                continue
            i = next((i for i, s in enumerate(sites) if i not in taken and _on_chain(s.y, r.output)),
                     None)
            if i is None:
                continue  # a region without a collective: the gather_bmm form rewrites it
            if r.residual is not None or r.topk_ids is None:
                errors.append(f"{where}: tensor-parallel region with a residual base or without "
                              f"top-k ids")
                continue
            taken.add(i)
            r.form = FORM
            r.tp_site = sites[i]
            results.append((r, f"{where} (all_reduce of {sites[i].y.name})"))
    finally:
        for s in sites:
            _reattach(ctx.graph, s)
    for i, s in enumerate(sites):
        if i not in taken:
            why = "; ".join(errors) or "no MoE region combines through it"
            results.append((NoMatch(f"all_reduce of {s.y.name} between the expert GEMMs and the "
                                    f"combine: {why}"), s.y.name))
    return results


def rewrite(graph: fx.Graph, r: MoERegion, *, kernel: str, rounding: str,
            activations: str = "bf16") -> fx.Node:
    """The op on this rank's shard without the w2 bias, all-reduce of [T, H], then the bias term."""
    site: Site = r.tp_site
    b2 = r.w2_bias
    r.w2_bias = None  # summed over ranks it would count world times
    part = moe_rewrite(graph, r, kernel=kernel, rounding=rounding,
                       activations=activations)  # [T, H], model dtype
    users = list(part.users)
    dtype = val(part).dtype
    f32 = torch.float32
    with graph.inserting_before(min(users, key=_order(graph).__getitem__)):
        ar = call(graph, C10D.all_reduce.default, (part, site.reduce_op, site.group))
        out = call(graph, C10D.wait_tensor.default, (ar,))
        if b2 is not None:  # sum_k w[t,k] * b2[ids[t,k]], in float32
            bias = call(graph, aten.index.Tensor, (b2, [r.topk_ids]))  # [T, k, H]
            bias = call(graph, prims.convert_element_type.default, (bias, f32))
            w = call(graph, prims.convert_element_type.default, (r.topk_weights, f32))
            w = call(graph, aten.unsqueeze.default, (w, -1))
            term = call(graph, aten.sum.dim_IntList, (call(graph, aten.mul.Tensor, (bias, w)), [1]))
            out = call(graph, prims.convert_element_type.default, (out, f32))
            out = call(graph, aten.add.Tensor, (out, term))
            out = call(graph, prims.convert_element_type.default, (out, dtype))
    for u in users:
        u.replace_input_with(part, out)
    graph.eliminate_dead_code()  # the old combine, down to the collective
    for n in reversed(site.nodes):
        if not n.users:
            graph.erase_node(n)
    graph.eliminate_dead_code()  # the old expert GEMMs
    return out
