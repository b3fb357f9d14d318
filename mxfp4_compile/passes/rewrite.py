"""Replace a matched MoERegion by torch.ops.mxfp4.moe fed by six weight-transform calls.

The transform (torch.ops.mxfp4.prepare_moe_weights) reads only frozen parameters, so Inductor's
freeze() constant-folds it: it runs once per weight per compile and is absent from the output code.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils import _pytree as pytree

from .fx_utils import aten, prims, shape, val
from .region import MoERegion


def _fake_mode(graph):
    for n in graph.nodes:
        v = val(n)
        if isinstance(v, FakeTensor):
            return v.fake_mode
    return None


def call(graph: fx.Graph, target, args, kwargs=None, name=None) -> fx.Node:
    """Insert a call and give it a fake ``meta["val"]`` (Inductor lowers from it); `name`: the
    node's name (made unique), else one from the target."""
    kwargs = kwargs or {}
    node = graph.call_function(target, tuple(args), kwargs, name=name)
    mode = _fake_mode(graph)
    fa, fk = pytree.tree_map(lambda x: val(x) if isinstance(x, fx.Node) else x, (args, kwargs))
    if mode is not None:
        with mode:
            node.meta["val"] = target(*fa, **fk)
    return node


def rewrite(graph: fx.Graph, r: MoERegion, *, kernel: str, rounding: str,
            activations: str = "bf16") -> fx.Node:
    mx = torch.ops.mxfp4
    # activations="fp8" only where asked: the op's default keeps bf16 graphs as they were
    fp8 = {} if activations == "bf16" else dict(activations=activations)
    with graph.inserting_before(r.output):
        # the parameters themselves, not a concatenation or permutation of them: the store keys
        # the prepared weights by these tensors, which is what lets recompiles share them and the
        # backend refresh them when the parameters change
        w13 = list(r.w13)
        interleaved = r.activation.interleaved if len(w13) == 1 else False
        prep = {}
        for i, role in enumerate(("w13", "w13_scales", "w13_bias", "w2", "w2_scales", "w2_bias")):
            if role == "w13_bias" and r.w13_bias is None or role == "w2_bias" and r.w2_bias is None:
                prep[role] = None
                continue
            prep[role] = call(graph, mx.prepare_moe_weights.default,
                              (w13, r.w13_bias, r.w2, r.w2_bias, kernel, r.activation.name),
                              dict(rounding=rounding, gate_up_interleaved=interleaved,
                                   transposed=r.w13_transposed, index=i,
                                   w2_transposed=r.w2_transposed, **fp8))
        ids, weights = r.topk_ids, r.topk_weights
        for u in r.weights_chain:  # the router's ops after its scatter, now on the top-k values
            weights = call(graph, u.target, (weights, *u.args[1:]), dict(u.kwargs))
        if ids is None:  # dense: every expert on every token, weights [T, E]
            E = r.num_experts
            ar = call(graph, prims.iota.default, (E,),
                      dict(start=0, step=1, dtype=torch.int32, device=val(weights).device,
                           requires_grad=False))
            ids = call(graph, aten.expand.default, (ar, list(shape(weights))))
        out = call(graph, mx.moe.default,
                   (r.hidden, ids, weights, prep["w13"], prep["w13_scales"], prep["w13_bias"],
                    prep["w2"], prep["w2_scales"], prep["w2_bias"], kernel),
                   dict(activation=r.activation.name, alpha=float(r.activation.alpha),
                        limit=float(r.activation.limit), **fp8,
                        **(dict(weights_on_input=True) if r.weights_on_input else {})))
        want = val(r.output)
        if val(out).dtype != want.dtype:
            out = call(graph, prims.convert_element_type.default, (out, want.dtype))
        if r.residual is not None:  # scatter_add onto a base (e.g. the shared expert's output)
            out = call(graph, aten.add.Tensor, (r.residual, out))
    r.output.replace_all_uses_with(out)
    return out
