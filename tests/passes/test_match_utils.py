"""The shared matching machinery on small graphs: dimension labels through views, the activation
identification."""
import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from mxfp4_compile.passes.match_utils import Labels, NoMatch, identify_activation


def trace(fn, *shapes):
    return make_fx(fn, tracing_mode="fake")(*[torch.randn(s) for s in shapes])


def nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function"]


def test_labels_follow_merge_split_permute():
    gm = trace(lambda w: w.permute(0, 3, 1, 2).reshape(3, 5, 2 * 7).view(3, 5, 2, 7).permute(0, 2, 3, 1),
               (3, 2, 7, 5))
    ph = next(n for n in gm.graph.nodes if n.op == "placeholder")
    lab = Labels(roots={}, sizes={"T": 3, "S": 2, "N": 7, "K": 5})
    lab.set_root(ph, (("T",), ("S",), ("N",), ("K",)))
    assert lab.of(nodes(gm)[-1]) == (("T",), ("S",), ("N",), ("K",))
    assert lab.of(nodes(gm)[1]) == (("T",), ("K",), ("S", "N"))


def test_labels_drop_size_one_dims():
    gm = trace(lambda w: w.permute(3, 1, 2, 0).reshape(1, 5, 14), (1, 2, 7, 5))
    ph = next(n for n in gm.graph.nodes if n.op == "placeholder")
    lab = Labels(roots={}, sizes={"T": 1, "S": 2, "N": 7, "K": 5})
    lab.set_root(ph, (("T",), ("S",), ("N",), ("K",)))
    assert lab.of(nodes(gm)[-1]) == ((), ("K",), ("S", "N"))


def _act_graph(fn, n=8):
    gm = trace(fn, (3, 2 * n))
    ph = next(x for x in gm.graph.nodes if x.op == "placeholder")
    out = next(x for x in gm.graph.nodes if x.op == "output").args[0]
    out = out[0] if isinstance(out, (list, tuple)) else out
    return [ph], out


@pytest.mark.parametrize("alpha,limit", [(1.702, 7.0), (1.0, 3.0)])
def test_identify_swiglu_oai_constants(alpha, limit):
    def f(h):
        g, u = h[..., ::2].clamp(max=limit), h[..., 1::2].clamp(-limit, limit)
        return g * torch.sigmoid(alpha * g) * (u + 1)
    act = identify_activation(*_act_graph(f))
    assert (act.name, act.interleaved, act.alpha, act.limit) == ("swiglu_oai", True, alpha, limit)


def test_identify_silu_glu_concatenated():
    act = identify_activation(*_act_graph(lambda h: torch.nn.functional.silu(h[..., :8]) * h[..., 8:]))
    assert (act.name, act.interleaved) == ("silu_glu", False)


def test_identify_rejects_gelu_glu():
    with pytest.raises(NoMatch, match="neither"):
        identify_activation(*_act_graph(lambda h: torch.nn.functional.gelu(h[..., :8]) * h[..., 8:]))
