"""The activation between the two expert GEMMs, identified numerically: the subgraph runs on random
data and is compared with the op's activations (swiglu_oai with its alpha and limit, silu_glu, on
either gate/up order), which is robust to how Inductor's decompositions spell sigmoid/silu/clamp."""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.utils import _pytree as pytree

from ..formats import SWIGLU_ALPHA, SWIGLU_LIMIT, Activation
from .fx_utils import NoMatch, between, hint, shape, strip, val


@dataclasses.dataclass
class MatchedActivation:
    """The activation a region computes, as found in its graph."""
    name: Activation     # "swiglu_oai" | "silu_glu"
    interleaved: bool    # gate/up order of the GEMM output rows (input order for the weight transform)
    alpha: float = SWIGLU_ALPHA
    limit: float = SWIGLU_LIMIT


def _run_subgraph(nodes, env):
    def sub(x):
        if isinstance(x, fx.Node):
            return env[x]
        if isinstance(x, torch.SymInt):
            return hint(x)
        if isinstance(x, torch.device):
            return torch.device("cpu")  # the check runs on CPU whatever device the model is on
        return x
    for n in nodes:
        if n in env:
            continue
        if n.op != "call_function":
            raise NoMatch(f"activation reads {n.op} {n.name}")
        args, kwargs = pytree.tree_map(sub, (n.args, n.kwargs))
        env[n] = n.target(*args, **kwargs)
    return env


def _scalars(nodes):
    out = set()
    for n in nodes:
        for a in pytree.tree_leaves((n.args, n.kwargs)):
            if isinstance(a, float) and math.isfinite(a):
                out.add(abs(a))
    return out


def identify_activation(inputs, out) -> MatchedActivation:
    """``inputs``: [gate_up] (one [.., 2I] tensor) or [gate, up]; ``out`` [.., I] ->
    MatchedActivation.

    Runs the subgraph on random data and compares with the op's activations; raises NoMatch naming
    what it found when nothing fits."""
    nodes = between(inputs, out)
    if nodes is None or out not in nodes:
        raise NoMatch("activation: the second GEMM's input does not come from the first GEMM")
    nodes = [n for n in nodes if n not in inputs]
    for n in nodes:  # the activation may read only its inputs and constants
        for a in n.all_input_nodes:
            if a not in nodes and a not in inputs:
                root = strip(a)[-1]
                if root.op == "placeholder" and shape(root) == ():
                    raise NoMatch(f"activation reads a runtime scalar input ({root.name}): a Python "
                                  f"float (swiglu alpha/limit) became a graph input, as "
                                  f"torch.compile(dynamic=True) does; compile without dynamic=True "
                                  f"(token counts still become dynamic) or set "
                                  f"torch._dynamo.config.specialize_float = True")
                raise NoMatch(f"activation reads another tensor ({a.name}): not a plain GLU")
    shapes = [tuple(hint(s) for s in shape(i)) for i in inputs]
    dtypes = [val(i).dtype for i in inputs]
    dtype = dtypes[0]
    key = _signature(nodes, inputs, shapes[0][-1])
    if key in _identified:  # every layer of a model has the same activation subgraph: run it once
        return _identified[key]
    with unset_fake_temporarily():  # the pass runs under Inductor's fake mode; this needs real data
        g = torch.Generator().manual_seed(0)
        # values past every constant in the subgraph, so each clamp is exercised
        scale = min(max([5.0] + [1.5 * c for c in _scalars(nodes)]), 1e4)
        xs = [(torch.randn(s, generator=g) * scale).to(d) for s, d in zip(shapes, dtypes)]
        if any(d != torch.float32 for d in dtypes + [val(out).dtype]):
            dtype = torch.bfloat16  # tolerance of the lowest precision involved
        got = _run_subgraph(nodes, dict(zip(inputs, xs)))[out].float()
        act = _compare(xs, got, dtype, nodes)
    _identified[key] = act
    return act


_identified: dict = {}


def _signature(nodes, inputs, n_features):
    """What the activation computes, up to the row count: ops, scalars, feature-dim sizes."""
    def norm(a):
        if isinstance(a, fx.Node):
            return ("in", inputs.index(a)) if a in inputs else ("node", nodes.index(a))
        if isinstance(a, (list, tuple)):
            return tuple(norm(x) for x in a)
        if isinstance(a, torch.SymInt):
            return "rows"
        if isinstance(a, int) and not isinstance(a, bool) and a > 2 and a not in (
                n_features, n_features // 2):
            return "rows"  # a baked token count in a view shape
        return a if isinstance(a, (int, float, bool, str, type(None))) else str(a)
    return (tuple(str(val(i).dtype) for i in inputs), n_features,
            tuple((str(n.target), norm(n.args), norm(tuple(sorted(n.kwargs.items()))))
                  for n in nodes))


def _compare(xs, got, dtype, nodes):
    if len(xs) == 1:
        h = xs[0].float()
        pairs = {True: (h[..., 0::2], h[..., 1::2]), False: h.chunk(2, dim=-1)}
    else:
        pairs = {False: (xs[0].float(), xs[1].float())}
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    consts = _scalars(nodes)
    limits = sorted(consts) + [math.inf]
    alphas = sorted(consts)
    for interleaved, (gate, up) in pairs.items():
        cand = [MatchedActivation("silu_glu", interleaved)] + [
            MatchedActivation("swiglu_oai", interleaved, a, l) for a in alphas for l in limits]
        for act in cand:
            if act.name == "silu_glu":
                ref = torch.nn.functional.silu(gate) * up
            else:
                gc = gate.clamp(max=act.limit)
                ref = gc * torch.sigmoid(act.alpha * gc) * (up.clamp(-act.limit, act.limit) + 1)
            if ref.numel() == got.numel() and ref.numel() and \
                    torch.allclose(got.reshape(ref.shape), ref, rtol=tol, atol=tol * 4):
                return act
    raise NoMatch("activation is neither swiglu_oai (gate*sigmoid(alpha*gate)*(up+1), clamped) nor "
                  "silu_glu (silu(gate)*up) on either gate/up order")
