"""The activation identification (passes/activation.py) on small graphs."""
import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from mxfp4_compile.passes.activation import identify_activation
from mxfp4_compile.passes.fx_utils import NoMatch


def _act_graph(fn, n=8):
    gm = make_fx(fn, tracing_mode="fake")(torch.randn(3, 2 * n))
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
