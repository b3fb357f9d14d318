"""Sort-by-expert + grouped GEMM with offsets (transformers grouped_mm, aten._grouped_mm)."""
import operator
import unittest

import pytest
import torch
from expecttest import TestCase
from torch.fx.experimental.proxy_tensor import make_fx

import moe_zoo as z
from mxfp4_compile.passes import grouped_mm
from mxfp4_compile.passes.fx_utils import NoMatch
from mxfp4_compile.passes.region import Context
from mxfp4_compile.passes.rewrite import rewrite
from recording_backend import aten, mxfp4

BF16 = torch.bfloat16
# the sort, the counts and the grouped GEMMs all go; one op call
GONE = {aten._grouped_mm: 0, aten.sort: 0, aten.histc: 0, mxfp4.moe: 1}


def x(T=5, dtype=BF16):
    return torch.randn(T, z.H, generator=torch.Generator().manual_seed(T)).to(dtype)


def test_grouped_aten_bf16():
    torch.manual_seed(0)
    c = z.check_rewrite_numerics(z.GroupedMoE().to(BF16), (x(),), {"w13": -1, "w2": -1}, n_moe=1)
    c.rec.assert_counts(before={aten._grouped_mm: 2, aten.sort: 1, aten.histc: 1, aten.topk: 1},
                        after={**GONE, aten.index: 0, aten.topk: 0, mxfp4.topk_softmax: 1})


@pytest.mark.slow
def test_grouped_transformers_fallback_fp32():
    pytest.importorskip("transformers.integrations.moe")
    torch.manual_seed(0)
    c = z.check_rewrite_numerics(z.GroupedMoE(fallback=True), (x(dtype=torch.float32),),
                                 {"w13": -1, "w2": -1}, n_moe=1, tight=1e-3)
    fallback = torch.ops.transformers.grouped_mm_fallback
    c.rec.assert_counts(before={fallback: 2, aten._grouped_mm: 0},
                        after={fallback: 0, aten.sort: 0, mxfp4.moe: 1, mxfp4.topk_softmax: 1})


def cuda_style_graph():
    """The grouped form as CUDA spells it (histc on int32, aten._grouped_mm), traced on the meta
    device: this CPU machine cannot run that histc, but the matcher only needs the graph."""
    def fn(x, ids, w, w13, w2):
        return z.grouped_experts(x, ids, w, w13, w2, histc_int=True)
    m = "meta"
    args = (torch.empty(5, z.H, dtype=BF16, device=m), torch.empty(5, z.K, dtype=torch.long, device=m),
            torch.empty(5, z.K, dtype=BF16, device=m), torch.empty(z.E, 2 * z.I, z.H, dtype=BF16, device=m),
            torch.empty(z.E, z.H, z.I, dtype=BF16, device=m))
    gm = make_fx(torch.func.functionalize(fn), tracing_mode="fake")(*args)
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return gm, Context(gm.graph, const={phs[3], phs[4]})


def test_cuda_spelling_matches_and_rewrites():
    gm, ctx = cuda_style_graph()
    assert any(n.target is aten.histc.default and n.args[0].kwargs.get("dtype") == torch.int32
               for n in gm.graph.nodes)
    (region, where), = grouped_mm.match(ctx)
    assert not isinstance(region, NoMatch), region
    assert region.activation.name == "silu_glu" and not region.activation.interleaved
    assert (region.num_experts, region.hidden_size, region.intermediate_size, region.top_k) == (4, 64, 32, 2)
    rewrite(gm.graph, region, kernel="reference", rounding="floor")
    gm.graph.eliminate_dead_code()
    targets = [n.target for n in gm.graph.nodes]
    assert torch.ops.mxfp4.moe.default in targets
    assert aten._grouped_mm.default not in targets and aten.sort.default not in targets


def test_wrong_histc_bins_is_not_rewritten():
    gm, ctx = cuda_style_graph()
    h = next(n for n in gm.graph.nodes if n.target is aten.histc.default)
    h.args = (h.args[0], 5, 0, 4)  # counts 5 bins for 4 experts: offsets would be wrong
    (region, _), = grouped_mm.match(ctx)
    assert isinstance(region, NoMatch) and "histc" in str(region)


@unittest.skipUnless(z.snapshot_torch_ok(), f"snapshots recorded with torch {z.SNAPSHOT_TORCH}")
class TestGroupedSnapshot(TestCase):
    def test_grouped_before_after(self):
        torch.manual_seed(0)
        (before, after), = z.record_pass_graphs(z.GroupedMoE().to(BF16), x())
        self.assertExpectedInline(before, """\
arg0_1 = input
arg1_1 = input
arg2_1 = input
arg3_1 = input
permute = aten.permute.default(arg2_1, [1, 0])
mm = aten.mm.default(arg3_1, permute)
convert_element_type_2 = prims.convert_element_type.default(mm, float32)
amax = aten.amax.default(convert_element_type_2, [-1], True)
sub = aten.sub.Tensor(convert_element_type_2, amax)
exp = aten.exp.default(sub)
sum_1 = aten.sum.dim_IntList(exp, [-1], True)
div = aten.div.Tensor(exp, sum_1)
topk = aten.topk.default(div, 2)
getitem = getitem(topk, 0)
getitem_1 = getitem(topk, 1)
sum_2 = aten.sum.dim_IntList(getitem, [-1], True)
div_1 = aten.div.Tensor(getitem, sum_2)
convert_element_type_3 = prims.convert_element_type.default(div_1, bfloat16)
view = aten.view.default(getitem_1, [-1])
sort = aten.sort.default(view)
getitem_2 = getitem(sort, 0)
getitem_3 = getitem(sort, 1)
div_2 = aten.div.Tensor_mode(getitem_3, 2, rounding_mode='floor')
index = aten.index.Tensor(arg3_1, [div_2])
convert_element_type_4 = prims.convert_element_type.default(getitem_2, float32)
histc = aten.histc.default(convert_element_type_4, 4, 0, 3)
cumsum = aten.cumsum.default(histc, 0, dtype=int32)
permute_1 = aten.permute.default(arg0_1, [0, 2, 1])
_grouped_mm = aten._grouped_mm.default(index, permute_1, cumsum)
split = aten.split.Tensor(_grouped_mm, 32, -1)
getitem_4 = getitem(split, 0)
getitem_5 = getitem(split, 1)
convert_element_type_5 = prims.convert_element_type.default(getitem_4, float32)
neg = aten.neg.default(convert_element_type_5)
exp_1 = aten.exp.default(neg)
add = aten.add.Tensor(exp_1, 1)
div_3 = aten.div.Tensor(convert_element_type_5, add)
convert_element_type_6 = prims.convert_element_type.default(div_3, bfloat16)
mul = aten.mul.Tensor(convert_element_type_6, getitem_5)
permute_2 = aten.permute.default(arg1_1, [0, 2, 1])
_grouped_mm_1 = aten._grouped_mm.default(mul, permute_2, cumsum)
view_1 = aten.view.default(convert_element_type_3, [-1])
index_1 = aten.index.Tensor(view_1, [getitem_3])
unsqueeze = aten.unsqueeze.default(index_1, -1)
mul_1 = aten.mul.Tensor(_grouped_mm_1, unsqueeze)
empty = aten.empty.memory_format([10], dtype=int64, device=cpu)
iota = prims.iota.default(10, start=0, step=1, dtype=int64, device=cpu, requires_grad=False)
index_put = aten.index_put.default(empty, [getitem_3], iota)
index_2 = aten.index.Tensor(mul_1, [index_put])
view_2 = aten.view.default(index_2, [5, 2, -1])
sum_3 = aten.sum.dim_IntList(view_2, [1])
return [sum_3]""")
        self.assertExpectedInline(after, """\
arg0_1 = input
arg1_1 = input
arg2_1 = input
arg3_1 = input
permute = aten.permute.default(arg2_1, [1, 0])
mm = aten.mm.default(arg3_1, permute)
convert_element_type_2 = prims.convert_element_type.default(mm, float32)
router = mxfp4.topk_softmax.default(convert_element_type_2, 2, True, True, out_dtype=bfloat16)
router_ids = getitem(router, 1)
router_weights = getitem(router, 0)
prepare_moe_weights_default = mxfp4.prepare_moe_weights.default([arg0_1], None, arg1_1, None, 'reference', 'silu_glu', rounding='floor', gate_up_interleaved=False, transposed=False, index=0, w2_transposed=False)
prepare_moe_weights_default_1 = mxfp4.prepare_moe_weights.default([arg0_1], None, arg1_1, None, 'reference', 'silu_glu', rounding='floor', gate_up_interleaved=False, transposed=False, index=1, w2_transposed=False)
prepare_moe_weights_default_2 = mxfp4.prepare_moe_weights.default([arg0_1], None, arg1_1, None, 'reference', 'silu_glu', rounding='floor', gate_up_interleaved=False, transposed=False, index=3, w2_transposed=False)
prepare_moe_weights_default_3 = mxfp4.prepare_moe_weights.default([arg0_1], None, arg1_1, None, 'reference', 'silu_glu', rounding='floor', gate_up_interleaved=False, transposed=False, index=4, w2_transposed=False)
moe_default = mxfp4.moe.default(arg3_1, router_ids, router_weights, prepare_moe_weights_default, prepare_moe_weights_default_1, None, prepare_moe_weights_default_2, prepare_moe_weights_default_3, None, 'reference', activation='silu_glu', alpha=1.702, limit=7)
return [moe_default]""")


@pytest.mark.parametrize("shared", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_torchtitan_style(shared):
    """Three grouped GEMMs (w1, w3, w2) and a scatter_add onto the shared expert's output (or zeros)
    become one op call on the top-k's own ids and scores (the sigmoid router stays torch ops: the
    op's router is a softmax), w1 and w3 passed as a pair to the weight transform; the shared expert
    is added."""
    torch.manual_seed(0)
    m = z.TitanStyleMoE(shared=shared).to(BF16)
    c = z.check_rewrite_numerics(m, (x(),), {"w1": -1, "w2": -1, "w3": -1}, n_moe=1)
    n_mm = 2 if shared else 1  # the router's gate (and the shared expert)
    c.rec.assert_counts(
        before={aten._grouped_mm: 3, aten.sort: 1, aten.histc: 1, aten.scatter_add: 1, aten.gather: 1,
                aten.topk: 1, aten.mm: n_mm},
        after={**GONE, aten.scatter_add: 0, aten.gather: 0, aten.topk: 1, mxfp4.topk_softmax: 0,
               aten.cat: 0, aten.mm: n_mm})
    (run,) = c.rec.runs
    nodes = list(run.after.nodes)
    (moe,) = [n for n in nodes if n.target is mxfp4.moe.default]
    (topk,) = [n for n in nodes if n.target is aten.topk.default]
    ids, weights = moe.args[1:3]
    assert (ids.target, ids.args, weights.target, weights.args) == \
        (operator.getitem, (topk, 1), operator.getitem, (topk, 0))  # unnormalized sigmoid scores
    preps = [n for n in nodes if n.target is mxfp4.prepare_moe_weights.default]
    assert preps and all([a.op for a in p.args[0]] == ["placeholder"] * 2 for p in preps)  # [w1, w3]
    (out,) = [n for n in nodes if n.op == "output"][0].args[0]
    if shared:
        assert out.target is aten.add.Tensor and moe in out.args, run.text()
        assert {a.target for a in out.args if a is not moe} == {aten.mm.default}, run.text()
    else:
        assert out is moe, run.text()


def test_torchtitan_score_before_experts_is_refused_and_correct():
    torch.manual_seed(0)
    m = z.TitanStyleMoE(score_before_experts=True).to(BF16)
    with torch.no_grad():
        ref = m(x())
    with pytest.warns(UserWarning, match="expert-shaped weights.*no MoE layer was rewritten"):
        out, code, rec = z.compile_record(m, x())  # the user hears of it, once
    assert z.moe_calls(code) == 0
    rec.assert_counts(before={aten._grouped_mm: 3}, after={aten._grouped_mm: 3, mxfp4.moe: 0})
    assert z.rel_err(out, ref) < 1e-2
    from mxfp4_compile import backend
    reasons = [c.reason for c in backend.last_compile_info[-1]["candidates"]]
    assert any("score before experts" in r for r in reasons), reasons


@pytest.mark.slow
@pytest.mark.parametrize("cls", ["GroupedMoE", "TitanStyleMoE"])
def test_top1_single_token(cls, monkeypatch):
    """T=1 and k=1: every row dim has size 1 (sorted rows R included)."""
    monkeypatch.setattr(z, "K", 1)
    torch.manual_seed(0)
    m = getattr(z, cls)().to(BF16)
    c = z.check_rewrite_numerics(m, (x(1),), {"w13": -1, "w2": -1, "w1": -1, "w3": -1}, n_moe=1)
    # the grouped GEMMs and the counts go; at R = T*k = 1 the pass leaves the (size-1, identity)
    # sort and its inverse permutation in place, so no count of aten.sort here
    c.rec.assert_counts(before={aten._grouped_mm: 2 if cls == "GroupedMoE" else 3, aten.sort: 1},
                        after={aten._grouped_mm: 0, aten.histc: 0, mxfp4.moe: 1})
