"""Per-token gather + einsum/bmm forms (gpt-oss reference style, gpt-fast, transformers batched_mm)."""
import unittest

import pytest
import torch
from expecttest import TestCase

import moe_zoo as z
from recording_backend import aten, mxfp4

BF16 = torch.bfloat16
slow = pytest.mark.slow  # the rest of a matrix: the fast set keeps one case per feature
# after the pass: no weight gather (aten.index) and no bmm left, one op call, the router fused
REWRITTEN = {aten.bmm: 0, aten.index: 0, aten.topk: 0, mxfp4.moe: 1, mxfp4.topk_softmax: 1}


def x(T=5, dtype=BF16):
    return torch.randn(T, z.H, generator=torch.Generator().manual_seed(T)).to(dtype)


FAST_GATHER = [("swiglu_oai", True, False), ("silu_glu", False, True)]  # gpt-oss; [E, K, N] no bias


@pytest.mark.parametrize("activation,bias,transposed", [
    *FAST_GATHER,
    *[pytest.param(a, b, t, marks=slow) for a in ("swiglu_oai", "silu_glu") for b in (True, False)
      for t in (False, True) if (a, b, t) not in FAST_GATHER]])
def test_gather_forms(activation, bias, transposed):
    torch.manual_seed(0)
    m = z.GatherMoE(activation, bias=bias, transposed=transposed).to(BF16)
    kd = 1 if transposed else -1
    c = z.check_rewrite_numerics(m, (x(),), {"w13": kd, "w2": kd}, n_moe=1)
    # two expert einsums and the combine einsum are bmm's; w13, w2 (and the biases) gathered per token
    c.rec.assert_counts(before={aten.bmm: 3, aten.index: 4 if bias else 2, aten.topk: 1},
                        after=REWRITTEN)


@pytest.mark.slow
def test_gather_fp32():
    torch.manual_seed(0)
    m = z.GatherMoE("swiglu_oai")
    c = z.check_rewrite_numerics(m, (x(dtype=torch.float32),), {"w13": -1, "w2": -1}, n_moe=1,
                                 tight=1e-3)
    c.rec.assert_counts(before={aten.bmm: 3}, after=REWRITTEN)


@pytest.mark.slow
@pytest.mark.parametrize("limit", [3.0, float("inf")])
def test_swiglu_limit_read_from_graph(limit):
    """alpha/limit are the graph's constants, not the defaults (inf: a swiglu without clamps)."""
    torch.manual_seed(0)
    m = z.GatherMoE("swiglu_oai", limit=limit).to(BF16)
    with torch.no_grad():
        m.w13.mul_(20)  # make the clamp matter
    z.check_rewrite_numerics(m, (x(),), {"w13": -1, "w2": -1}, n_moe=1).rec.assert_counts(
        after=REWRITTEN)


def test_gpt_fast_separate_gate_up():
    torch.manual_seed(0)
    m = z.GptFastMoE().to(BF16)
    c = z.check_rewrite_numerics(m, (x(),), {"w1": -1, "w2": -1, "w3": -1}, n_moe=1)
    # w1, w3, w2 gathered and multiplied separately; after: the weight transform takes w1 and w3
    # as a pair (no concatenation in the graph: the prepared-weight store keys on the parameters)
    c.rec.assert_counts(before={aten.bmm: 4, aten.index: 3, aten.cat: 0},
                        after={**REWRITTEN, aten.cat: 0})
    (run,) = c.rec.runs
    preps = [n for n in run.after.nodes if n.target is mxfp4.prepare_moe_weights.default]
    assert preps and all(len(n.args[0]) == 2 for n in preps), run.text()


def test_unsupported_activation_left_alone_and_correct():
    torch.manual_seed(0)
    m = z.GatherMoE("gelu").to(BF16)
    with torch.no_grad():
        ref = m(x())
    with pytest.warns(UserWarning, match="expert-shaped weights.*no MoE layer was rewritten"):
        out, code, rec = z.compile_record(m, x())  # the user hears of it, once
    assert z.moe_calls(code) == 0
    rec.assert_counts(before={aten.bmm: 3, aten.index: 4},
                      after={aten.bmm: 3, aten.index: 4, mxfp4.moe: 0, mxfp4.topk_softmax: 0})
    assert z.rel_err(out, ref) < 1e-2


@unittest.skipUnless(z.snapshot_torch_ok(), f"snapshots recorded with torch {z.SNAPSHOT_TORCH}")
class TestGatherSnapshot(TestCase):
    def test_gpt_oss_style_before_after(self):
        torch.manual_seed(0)
        (before, after), = z.record_pass_graphs(z.GatherMoE().to(BF16), x())
        self.assertExpectedInline(before, """\
arg0_1 = input
arg1_1 = input
arg2_1 = input
arg3_1 = input
arg4_1 = input
arg5_1 = input
permute = aten.permute.default(arg4_1, [1, 0])
mm = aten.mm.default(arg5_1, permute)
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
index = aten.index.Tensor(arg0_1, [getitem_1])
unsqueeze = aten.unsqueeze.default(arg5_1, 2)
unsqueeze_1 = aten.unsqueeze.default(unsqueeze, 3)
view = aten.view.default(index, [5, 128, 64])
view_1 = aten.view.default(unsqueeze_1, [5, 64, 1])
bmm = aten.bmm.default(view, view_1)
view_2 = aten.view.default(bmm, [5, 2, 64, 1])
permute_5 = aten.permute.default(view_2, [0, 1, 2, 3])
view_3 = aten.view.default(permute_5, [5, 2, 64])
index_1 = aten.index.Tensor(arg1_1, [getitem_1])
add = aten.add.Tensor(view_3, index_1)
slice_1 = aten.slice.Tensor(add, 2, 0, 9223372036854775807, 2)
convert_element_type_6 = prims.convert_element_type.default(slice_1, float32)
clamp_max = aten.clamp_max.default(convert_element_type_6, 7)
convert_element_type_7 = prims.convert_element_type.default(clamp_max, bfloat16)
slice_2 = aten.slice.Tensor(add, 2, 1, 9223372036854775807, 2)
convert_element_type_8 = prims.convert_element_type.default(slice_2, float32)
clamp_min = aten.clamp_min.default(convert_element_type_8, -7)
clamp_max_1 = aten.clamp_max.default(clamp_min, 7)
convert_element_type_9 = prims.convert_element_type.default(clamp_max_1, bfloat16)
mul = aten.mul.Tensor(convert_element_type_7, 1.702)
sigmoid = aten.sigmoid.default(mul)
mul_1 = aten.mul.Tensor(convert_element_type_7, sigmoid)
add_1 = aten.add.Tensor(convert_element_type_9, 1)
mul_2 = aten.mul.Tensor(mul_1, add_1)
index_2 = aten.index.Tensor(arg2_1, [getitem_1])
unsqueeze_2 = aten.unsqueeze.default(mul_2, 3)
view_4 = aten.view.default(index_2, [10, 64, 32])
view_5 = aten.view.default(unsqueeze_2, [10, 32, 1])
bmm_1 = aten.bmm.default(view_4, view_5)
view_6 = aten.view.default(bmm_1, [5, 2, 64, 1])
permute_10 = aten.permute.default(view_6, [0, 1, 2, 3])
view_7 = aten.view.default(permute_10, [5, 2, 64])
index_3 = aten.index.Tensor(arg3_1, [getitem_1])
add_2 = aten.add.Tensor(view_7, index_3)
permute_11 = aten.permute.default(add_2, [0, 2, 1])
unsqueeze_3 = aten.unsqueeze.default(convert_element_type_3, 2)
permute_13 = aten.permute.default(permute_11, [0, 1, 2])
bmm_2 = aten.bmm.default(permute_13, unsqueeze_3)
permute_15 = aten.permute.default(bmm_2, [0, 1, 2])
view_11 = aten.view.default(permute_15, [5, 64])
return [view_11]""")
        self.assertExpectedInline(after, """\
arg0_1 = input
arg1_1 = input
arg2_1 = input
arg3_1 = input
arg4_1 = input
arg5_1 = input
permute = aten.permute.default(arg4_1, [1, 0])
mm = aten.mm.default(arg5_1, permute)
convert_element_type_2 = prims.convert_element_type.default(mm, float32)
router = mxfp4.topk_softmax.default(convert_element_type_2, 2, True, True, out_dtype=bfloat16)
router_ids = getitem(router, 1)
router_weights = getitem(router, 0)
prepare_moe_weights_default = mxfp4.prepare_moe_weights.default([arg0_1], arg1_1, arg2_1, arg3_1, 'reference', 'swiglu_oai', rounding='floor', gate_up_interleaved=True, transposed=False, index=0, w2_transposed=False)
prepare_moe_weights_default_1 = mxfp4.prepare_moe_weights.default([arg0_1], arg1_1, arg2_1, arg3_1, 'reference', 'swiglu_oai', rounding='floor', gate_up_interleaved=True, transposed=False, index=1, w2_transposed=False)
prepare_moe_weights_default_2 = mxfp4.prepare_moe_weights.default([arg0_1], arg1_1, arg2_1, arg3_1, 'reference', 'swiglu_oai', rounding='floor', gate_up_interleaved=True, transposed=False, index=2, w2_transposed=False)
prepare_moe_weights_default_3 = mxfp4.prepare_moe_weights.default([arg0_1], arg1_1, arg2_1, arg3_1, 'reference', 'swiglu_oai', rounding='floor', gate_up_interleaved=True, transposed=False, index=3, w2_transposed=False)
prepare_moe_weights_default_4 = mxfp4.prepare_moe_weights.default([arg0_1], arg1_1, arg2_1, arg3_1, 'reference', 'swiglu_oai', rounding='floor', gate_up_interleaved=True, transposed=False, index=4, w2_transposed=False)
prepare_moe_weights_default_5 = mxfp4.prepare_moe_weights.default([arg0_1], arg1_1, arg2_1, arg3_1, 'reference', 'swiglu_oai', rounding='floor', gate_up_interleaved=True, transposed=False, index=5, w2_transposed=False)
moe_default = mxfp4.moe.default(arg5_1, router_ids, router_weights, prepare_moe_weights_default, prepare_moe_weights_default_1, prepare_moe_weights_default_2, prepare_moe_weights_default_3, prepare_moe_weights_default_4, prepare_moe_weights_default_5, 'reference', activation='swiglu_oai', alpha=1.702, limit=7)
return [moe_default]""")


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 4])
def test_top1_and_all_experts(k):
    """k=1 (Switch/Llama-4 style) makes the slot dim size 1; k=E routes every token everywhere."""
    torch.manual_seed(0)
    m = z.GatherMoE("silu_glu", k=k).to(BF16)
    c = z.check_rewrite_numerics(m, (x(),), {"w13": -1, "w2": -1}, n_moe=1)
    # k=1: the combine over one slot is a multiply, not a bmm
    c.rec.assert_counts(before={aten.bmm: 2 if k == 1 else 3}, after=REWRITTEN)


def test_sizes_not_multiple_of_32_are_zero_padded():
    torch.manual_seed(0)
    m = z.GatherMoE("swiglu_oai", hidden=48, inter=40).to(BF16)
    xx = torch.randn(5, 48, generator=torch.Generator().manual_seed(0)).to(BF16)
    c = z.check_rewrite_numerics(m, (xx,), {"w13": -1, "w2": -1}, n_moe=1)
    c.rec.assert_counts(before={aten.bmm: 3}, after=REWRITTEN)


@pytest.mark.parametrize("make,k_dims", [
    (lambda: z.GatherMoE(), {"w13": -1, "w2": -1}),
    (lambda: z.GatherMoE("silu_glu", bias=False, transposed=True), {"w13": 1, "w2": 1}),
    (lambda: z.GptFastMoE(), {"w1": -1, "w2": -1, "w3": -1}),
])
def test_one_token_as_a_gpu_compiles_it(make, k_dims):
    """On a GPU, Inductor's joint graph turns every batch-1 bmm into squeeze -> mm -> unsqueeze,
    so at T=1 the gather form's GEMMs and its combine reach the pass as mm. The same rewrite is
    forced here on CPU (its device check patched)."""
    from unittest import mock
    import torch._inductor.fx_passes.joint_graph as jg
    torch.manual_seed(0)
    m = make().to(BF16)
    with mock.patch.object(jg, "check_device", lambda *a: True):
        c = z.check_rewrite_numerics(m, (x(1),), k_dims, n_moe=1)
    assert c.rec.count(aten.mm) >= 1, c.rec.texts()  # the batch-1 bmm did become an mm
