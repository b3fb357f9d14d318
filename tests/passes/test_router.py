"""Router form (passes/router.py): the top-k routing of a rewritten MoE becomes one
torch.ops.mxfp4.topk_softmax call, for the gpt-oss, Mixtral and Qwen3 router spellings; what it
must leave alone stays torch ops, with the reason in explain."""
import copy

import pytest
import torch
import torch.nn.functional as F

import mxfp4_compile
import moe_zoo as z
from recording_backend import aten, mxfp4

BF16 = torch.bfloat16


def gpt_oss(x, gate, k):  # transformers' GptOssTopKRouter
    v, ids = torch.topk(gate(x), k, dim=-1)
    return F.softmax(v, dim=1, dtype=v.dtype), ids


def qwen3_unnormalized(x, gate, k):  # norm_topk_prob=False
    w, ids = torch.topk(F.softmax(gate(x), dim=1, dtype=torch.float), k, dim=-1)
    return w.to(x.dtype), ids


def rounded_between(x, gate, k):  # softmax rounded to bf16 before the top-k
    w, ids = torch.topk(F.softmax(gate(x).float(), dim=-1).to(x.dtype), k, dim=-1)
    return w / w.sum(-1, keepdim=True), ids


def smallest(x, gate, k):  # not a router the op computes
    w, ids = torch.topk(F.softmax(gate(x).float(), dim=-1), k, dim=-1, largest=False)
    return (w / w.sum(-1, keepdim=True)).to(x.dtype), ids


def x(T=5):
    return torch.randn(T, z.H, generator=torch.Generator().manual_seed(T)).to(BF16)


def _model(router):
    torch.manual_seed(0)
    return z.GatherMoE(router=router).to(BF16)


@pytest.mark.parametrize("router,flags", [
    (gpt_oss, "False, True"),
    pytest.param(None, "True, True", marks=pytest.mark.slow),
    pytest.param(qwen3_unnormalized, "True, False", marks=pytest.mark.slow)])
def test_routers_fused(router, flags):
    m = _model(router)
    c = z.check_rewrite_numerics(m, (x(),), {"w13": -1, "w2": -1}, n_moe=1)
    c.rec.assert_counts(before={aten.topk: 1, mxfp4.topk_softmax: 0},
                        after={aten.topk: 0, mxfp4.topk_softmax: 1, mxfp4.moe: 1})
    (tks,) = [n for n in c.rec.runs[0].after.nodes if n.target is mxfp4.topk_softmax.default]
    assert ", ".join(map(str, tks.args[1:])) == f"2, {flags}"  # k, softmax_first, renormalize
    code = c.code
    assert f"mxfp4.topk_softmax.default(" in code and "aten.topk" not in code
    # the weights stored in the model's dtype by the op itself: no cast between it and the moe
    assert f", 2, {flags}, out_dtype=torch.bfloat16)" in code
    moe = next(n for n in c.rec.runs[0].after.nodes if n.target is mxfp4.moe.default)
    assert moe.args[2].args[0] is tks, moe.args[2]
    r = mxfp4_compile.explain(m, x())
    assert r.regions[0].details["router"] == (
        f"topk_softmax(k=2, softmax_first={flags.split(', ')[0]}, "
        f"renormalize={flags.split(', ')[1]})"), r.regions[0].details
    assert "router: topk_softmax" in str(r)


@pytest.mark.parametrize("router,reason", [
    (rounded_between, "rounds to torch.bfloat16"),
    pytest.param(smallest, "k largest", marks=pytest.mark.slow)])
def test_routers_left_alone_say_why(router, reason):
    m = _model(router)
    c = z.check_rewrite_numerics(m, (x(),), {"w13": -1, "w2": -1}, n_moe=1)
    c.rec.assert_counts(before={aten.topk: 1}, after={aten.topk: 1, mxfp4.topk_softmax: 0, mxfp4.moe: 1})
    assert "topk_softmax" not in c.code
    d = mxfp4_compile.explain(m, x()).regions[0].details
    assert d["router"].startswith("left as torch ops") and reason in d["router"], d


@pytest.mark.slow
def test_option_off_keeps_the_torch_router():
    m = _model(gpt_oss)
    _, code, rec = z.compile_record(m, x(), options={"fuse_router": False})
    assert z.moe_calls(code) == 1 and "topk_softmax" not in code
    rec.assert_counts(after={aten.topk: 1, mxfp4.topk_softmax: 0, mxfp4.moe: 1})


@pytest.mark.slow
def test_symbolic_tokens():
    # the second token count recompiles with T symbolic, and the router is fused there too; a
    # third count reuses that graph
    from torch._dynamo.utils import counters
    from torch._inductor.utils import run_and_get_code
    m = _model(gpt_oss)
    qm = z.quantize_experts_(copy.deepcopy(m), {"w13": -1, "w2": -1})  # same MXFP4 weights, eager
    with torch.no_grad():
        torch._dynamo.reset()
        counters.clear()
        cm = torch.compile(m, backend="mxfp4")
        graphs = []
        for T in (3, 7, 11):
            assert z.rel_err(cm(x(T)), qm(x(T))) < 2e-2
            graphs.append(counters["stats"]["unique_graphs"])
        assert graphs == [1, 2, 2]
        torch._dynamo.reset()
        cm = torch.compile(m, backend="mxfp4")
        cm(x(3))
        _, code = run_and_get_code(lambda: cm(x(7)))
    code = "\n".join(code)
    assert "topk_softmax" in code and "aten.topk" not in code


@pytest.mark.slow
@pytest.mark.parametrize("family,flags", [("gpt_oss", (False, True)), ("mixtral", (True, True)),
                                          ("qwen3_moe", (True, False))])
def test_transformers_routers_fused(family, flags):
    # the routers as transformers writes them (every layer of a 2-layer model)
    pytest.importorskip("transformers")
    m = z.hf_model(family, "grouped_mm")
    with torch.no_grad():
        r = mxfp4_compile.explain(m, z.token_ids())
    want = f"topk_softmax(k=2, softmax_first={flags[0]}, renormalize={flags[1]})"
    assert [(g.rewritten, g.details.get("router")) for g in r.regions] == [(True, want)] * 2
