"""explain(): every candidate MoE region, rewritten or not, and why."""
import pytest
import torch

import moe_zoo as z
from mxfp4_compile.explain import explain

BF16 = torch.bfloat16


def x(T=5, H=z.H):
    return torch.randn(T, H, generator=torch.Generator().manual_seed(T)).to(BF16)


def test_rewritten_region_is_listed():
    torch.manual_seed(0)
    with torch.no_grad():
        r = explain(z.GatherMoE().to(BF16), x())
    assert not r.grad_enabled and [g.rewritten for g in r.regions] == [True]
    d = r.regions[0].details
    assert (d["experts"], d["hidden"], d["intermediate"], d["top_k"], d["activation"]) == \
        (4, 64, 32, 2, "swiglu_oai")
    assert d["alpha"] == pytest.approx(1.702) and d["limit"] == 7.0
    assert d["weights"] == ["w13", "w2"]  # module names, not Dynamo source strings
    assert r.kernel == "reference" and "REWRITTEN" in str(r)


def test_unsupported_activation_says_so():
    torch.manual_seed(0)
    r = explain(z.GatherMoE("gelu").to(BF16), x())
    assert [g.rewritten for g in r.regions] == [False]
    assert "activation" in r.regions[0].reason and "silu_glu" in r.regions[0].reason


def test_grad_enabled_explains_the_no_grad_compile_and_says_so():
    """What explain reports is what a compile under no_grad does (the README's usage); called with
    grad enabled it also says that a compile in that mode rewrites nothing."""
    torch.manual_seed(0)
    with torch.enable_grad():
        r = explain(z.GatherMoE().to(BF16), x())
    assert r.grad_enabled and [g.rewritten for g in r.regions] == [True]
    assert any("grad enabled" in n and "torch.no_grad()" in n for n in r.notes), r.notes
    assert "under torch.no_grad()" in str(r)


def test_leaves_the_callers_compiled_model_alone():
    from mxfp4_compile import backend
    torch.manual_seed(0)
    m = z.GatherMoE().to(BF16)
    torch._dynamo.reset()
    with torch.no_grad():
        cm = torch.compile(m, backend="mxfp4")
        cm(x())
        r = explain(m, x())
        n = len(backend.last_compile_info)
        cm(x())
    assert r.rewritten == 1
    assert len(backend.last_compile_info) == n  # no recompile: explain did not reset Dynamo


def test_size_not_multiple_of_32_is_padded():
    torch.manual_seed(0)
    with torch.no_grad():
        r = explain(z.GatherMoE(hidden=48, inter=40).to(BF16), x(H=48))
    assert [g.rewritten for g in r.regions] == [True]
    assert r.regions[0].details["padded"] == "H 48->64, I 40->64"


def test_weight_not_frozen():
    from test_backend import moe_with_weights_as_inputs
    torch.manual_seed(0)
    m = z.GatherMoE("silu_glu", bias=False).to(BF16)
    r = explain(moe_with_weights_as_inputs, x(), m.gate.weight.detach(), m.w13.detach(), m.w2.detach())
    assert [g.rewritten for g in r.regions] == [False]
    assert "not a frozen parameter" in r.regions[0].reason


@pytest.mark.slow
def test_transformers_eager_experts_loop():
    pytest.importorskip("transformers")
    m = z.hf_model("mixtral", "eager", layers=1)
    r = explain(m, z.token_ids())
    assert r.rewritten == 0
    assert any("batched_mm" in n for n in r.notes), str(r)
