"""Dense "every expert on every token, then mask" forms."""
import unittest

import pytest
import torch
import torch.nn.functional as F
from expecttest import TestCase

import moe_zoo as z
from recording_backend import aten, mxfp4

BF16 = torch.bfloat16
slow = pytest.mark.slow  # the rest of a matrix: the fast set keeps the most common case


def x(T=5):
    return torch.randn(T, z.H, generator=torch.Generator().manual_seed(T)).to(BF16)


@pytest.mark.parametrize("bias,combine,topk", [
    (False, "einsum", True),
    *[pytest.param(b, c, t, marks=slow) for b in (False, True) for c in ("einsum", "mask")
      for t in (True, False) if (b, c, t) != (False, "einsum", True)]])
def test_dense_forms(bias, combine, topk):
    """Both expert einsums (and an einsum combine) are bmm's over all E experts; after the pass
    none is left: one mxfp4.moe on the top-k (or all E) experts. The dense router's softmax is
    rounded to bf16 before its top-k, so the top-k stays a torch op."""
    torch.manual_seed(0)
    m = z.DenseMoE(bias=bias, combine=combine, topk=topk).to(BF16)
    c = z.check_rewrite_numerics(m, (x(),), {"w13": -1, "w2": -1}, n_moe=1)
    c.rec.assert_counts(
        before={aten.bmm: 3 if combine == "einsum" else 2, aten.topk: int(topk), aten.scatter: int(topk)},
        after={aten.bmm: 0, aten.scatter: 0, aten.topk: int(topk), mxfp4.moe: 1, mxfp4.topk_softmax: 0})


@unittest.skipUnless(z.snapshot_torch_ok(), f"snapshots recorded with torch {z.SNAPSHOT_TORCH}")
class TestDenseSnapshot(TestCase):
    def test_dense_before_after(self):
        torch.manual_seed(0)
        (before, after), = z.record_pass_graphs(z.DenseMoE().to(BF16), x())
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
convert_element_type_3 = prims.convert_element_type.default(div, bfloat16)
topk = aten.topk.default(convert_element_type_3, 2)
getitem = getitem(topk, 0)
getitem_1 = getitem(topk, 1)
full_default = aten.full.default([5, 4], 0, dtype=bfloat16, device=cpu)
sum_2 = aten.sum.dim_IntList(getitem, [-1], True)
div_1 = aten.div.Tensor(getitem, sum_2)
scatter = aten.scatter.src(full_default, 1, getitem_1, div_1)
unsqueeze = aten.unsqueeze.default(arg3_1, 2)
unsqueeze_1 = aten.unsqueeze.default(unsqueeze, 3)
unsqueeze_2 = aten.unsqueeze.default(arg0_1, 3)
permute_2 = aten.permute.default(unsqueeze_2, [0, 3, 1, 2])
view = aten.view.default(unsqueeze_1, [1, 5, 64])
permute_4 = aten.permute.default(permute_2, [3, 0, 2, 1])
view_1 = aten.view.default(permute_4, [1, 64, 256])
bmm = aten.bmm.default(view, view_1)
view_2 = aten.view.default(bmm, [5, 1, 4, 64])
permute_5 = aten.permute.default(view_2, [2, 0, 3, 1])
view_3 = aten.view.default(permute_5, [4, 5, 64])
slice_1 = aten.slice.Tensor(view_3, 2, 0, 32)
convert_element_type_6 = prims.convert_element_type.default(slice_1, float32)
neg = aten.neg.default(convert_element_type_6)
exp_1 = aten.exp.default(neg)
add = aten.add.Tensor(exp_1, 1)
div_2 = aten.div.Tensor(convert_element_type_6, add)
convert_element_type_7 = prims.convert_element_type.default(div_2, bfloat16)
slice_2 = aten.slice.Tensor(view_3, 2, 32, 9223372036854775807)
mul = aten.mul.Tensor(convert_element_type_7, slice_2)
unsqueeze_3 = aten.unsqueeze.default(mul, 3)
unsqueeze_4 = aten.unsqueeze.default(arg1_1, 3)
permute_7 = aten.permute.default(unsqueeze_4, [0, 3, 1, 2])
view_4 = aten.view.default(unsqueeze_3, [4, 5, 32])
permute_9 = aten.permute.default(permute_7, [0, 3, 2, 1])
view_5 = aten.view.default(permute_9, [4, 32, 64])
bmm_1 = aten.bmm.default(view_4, view_5)
view_6 = aten.view.default(bmm_1, [4, 5, 1, 64])
permute_10 = aten.permute.default(view_6, [0, 1, 3, 2])
view_7 = aten.view.default(permute_10, [4, 5, 64])
permute_11 = aten.permute.default(view_7, [1, 2, 0])
unsqueeze_5 = aten.unsqueeze.default(scatter, 2)
permute_13 = aten.permute.default(permute_11, [0, 1, 2])
bmm_2 = aten.bmm.default(permute_13, unsqueeze_5)
permute_15 = aten.permute.default(bmm_2, [0, 1, 2])
view_11 = aten.view.default(permute_15, [5, 64])
return [view_11]""")
        self.assertExpectedInline(after, """\
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
convert_element_type_3 = prims.convert_element_type.default(div, bfloat16)
topk = aten.topk.default(convert_element_type_3, 2)
getitem = getitem(topk, 0)
getitem_1 = getitem(topk, 1)
sum_2 = aten.sum.dim_IntList(getitem, [-1], True)
div_1 = aten.div.Tensor(getitem, sum_2)
prepare_moe_weights_default = mxfp4.prepare_moe_weights.default([arg0_1], None, arg1_1, None, 'reference', 'silu_glu', rounding='floor', gate_up_interleaved=False, transposed=False, index=0, w2_transposed=False)
prepare_moe_weights_default_1 = mxfp4.prepare_moe_weights.default([arg0_1], None, arg1_1, None, 'reference', 'silu_glu', rounding='floor', gate_up_interleaved=False, transposed=False, index=1, w2_transposed=False)
prepare_moe_weights_default_2 = mxfp4.prepare_moe_weights.default([arg0_1], None, arg1_1, None, 'reference', 'silu_glu', rounding='floor', gate_up_interleaved=False, transposed=False, index=3, w2_transposed=False)
prepare_moe_weights_default_3 = mxfp4.prepare_moe_weights.default([arg0_1], None, arg1_1, None, 'reference', 'silu_glu', rounding='floor', gate_up_interleaved=False, transposed=False, index=4, w2_transposed=False)
moe_default = mxfp4.moe.default(arg3_1, getitem_1, div_1, prepare_moe_weights_default, prepare_moe_weights_default_1, None, prepare_moe_weights_default_2, prepare_moe_weights_default_3, None, 'reference', activation='silu_glu', alpha=1.702, limit=7)
return [moe_default]""")

    def test_llama4_before_after(self):
        """Routing weights on the input: the repeat, the transposed weights and both bmm's go;
        the router's scatter too (sigmoid(-inf) = 0: the top-1 values carry the weights)."""
        torch.manual_seed(0)
        (before, after), = z.record_pass_graphs(z.InputWeightedMoE(shared=False).to(BF16), x())
        self.assertExpectedInline(before, """\
arg0_1 = input
arg1_1 = input
arg2_1 = input
arg3_1 = input
permute = aten.permute.default(arg3_1, [1, 0])
mm = aten.mm.default(arg2_1, permute)
topk = aten.topk.default(mm, 1, 1)
getitem = getitem(topk, 0)
getitem_1 = getitem(topk, 1)
full_default = aten.full.default([5, 4], -inf, dtype=bfloat16, device=cpu)
scatter = aten.scatter.src(full_default, 1, getitem_1, getitem)
convert_element_type_2 = prims.convert_element_type.default(scatter, float32)
sigmoid = aten.sigmoid.default(convert_element_type_2)
convert_element_type_3 = prims.convert_element_type.default(sigmoid, bfloat16)
repeat = aten.repeat.default(arg2_1, [4, 1])
permute_1 = aten.permute.default(convert_element_type_3, [1, 0])
clone = aten.clone.default(permute_1, memory_format=torch.contiguous_format)
view_1 = aten.view.default(clone, [20, 1])
mul = aten.mul.Tensor(repeat, view_1)
view_2 = aten.view.default(mul, [4, -1, 64])
bmm = aten.bmm.default(view_2, arg0_1)
split = aten.split.Tensor(bmm, 32, -1)
getitem_2 = getitem(split, 0)
getitem_3 = getitem(split, 1)
convert_element_type_6 = prims.convert_element_type.default(getitem_2, float32)
neg = aten.neg.default(convert_element_type_6)
exp = aten.exp.default(neg)
add = aten.add.Tensor(exp, 1)
div = aten.div.Tensor(convert_element_type_6, add)
convert_element_type_7 = prims.convert_element_type.default(div, bfloat16)
mul_1 = aten.mul.Tensor(getitem_3, convert_element_type_7)
bmm_1 = aten.bmm.default(mul_1, arg1_1)
sum_1 = aten.sum.dim_IntList(bmm_1, [0])
return [sum_1]""")
        self.assertExpectedInline(after, """\
arg0_1 = input
arg1_1 = input
arg2_1 = input
arg3_1 = input
permute = aten.permute.default(arg3_1, [1, 0])
mm = aten.mm.default(arg2_1, permute)
topk = aten.topk.default(mm, 1, 1)
getitem = getitem(topk, 0)
getitem_1 = getitem(topk, 1)
prepare_moe_weights_default = mxfp4.prepare_moe_weights.default([arg0_1], None, arg1_1, None, 'reference', 'silu_glu', rounding='floor', gate_up_interleaved=False, transposed=True, index=0, w2_transposed=True)
prepare_moe_weights_default_1 = mxfp4.prepare_moe_weights.default([arg0_1], None, arg1_1, None, 'reference', 'silu_glu', rounding='floor', gate_up_interleaved=False, transposed=True, index=1, w2_transposed=True)
prepare_moe_weights_default_2 = mxfp4.prepare_moe_weights.default([arg0_1], None, arg1_1, None, 'reference', 'silu_glu', rounding='floor', gate_up_interleaved=False, transposed=True, index=3, w2_transposed=True)
prepare_moe_weights_default_3 = mxfp4.prepare_moe_weights.default([arg0_1], None, arg1_1, None, 'reference', 'silu_glu', rounding='floor', gate_up_interleaved=False, transposed=True, index=4, w2_transposed=True)
convert_element_type_default = prims.convert_element_type.default(getitem, float32)
sigmoid_default = aten.sigmoid.default(convert_element_type_default)
convert_element_type_default_1 = prims.convert_element_type.default(sigmoid_default, bfloat16)
moe_default = mxfp4.moe.default(arg2_1, getitem_1, convert_element_type_default_1, prepare_moe_weights_default, prepare_moe_weights_default_1, None, prepare_moe_weights_default_2, prepare_moe_weights_default_3, None, 'reference', activation='silu_glu', alpha=1.702, limit=7, weights_on_input=True)
return [moe_default]""")


def test_input_weighted_llama4_form():
    """Llama 4's MoE (routing weights scale the experts' input; top-1 sigmoid router; all experts
    as bmm's over E; a shared expert beside): one mxfp4.moe with weights_on_input on the top-1
    experts; the router's sigmoid moves onto the top-1 values; the shared expert stays."""
    torch.manual_seed(0)
    m = z.InputWeightedMoE().to(BF16)
    c = z.check_rewrite_numerics(m, (x(),), {"gate_up_proj": 1, "down_proj": 1}, n_moe=1)
    c.rec.assert_counts(
        before={aten.bmm: 2, aten.repeat: 1, aten.scatter: 1, aten.sigmoid: 1},
        after={aten.bmm: 0, aten.repeat: 0, aten.scatter: 0, aten.sigmoid: 1, aten.topk: 1,
               mxfp4.moe: 1, mxfp4.topk_softmax: 0})
    (_, after), = c.rec.texts()
    assert "weights_on_input=True" in after


@pytest.mark.parametrize("k,bias,spelling,T", [
    (2, False, "repeat", 7), (1, False, "expand", 7), (1, False, "repeat", 1),
    pytest.param(1, False, "repeat", z.E, marks=slow), pytest.param(1, True, "repeat", 7, marks=slow),
    pytest.param(2, True, "expand", 7, marks=slow)])
def test_input_weighted_variants(k, bias, spelling, T):
    """Top-2, the broadcast spelling, one token (its T dim drops out of the views), T == E (the
    [T, E] weights and their [E, T] transpose look alike), and biases. With biases an unpicked
    expert reads 0 and still adds W2 act(b13) + b2, so every expert runs (ids = all E, the dense
    weights)."""
    torch.manual_seed(1)
    m = z.InputWeightedMoE(k=k, bias=bias, spelling=spelling).to(BF16)
    c = z.check_rewrite_numerics(m, (x(T),), {"gate_up_proj": 1, "down_proj": 1}, n_moe=1)
    c.rec.assert_counts(after={aten.bmm: 0, mxfp4.moe: 1, aten.scatter: int(bias)})
    (_, after), = c.rec.texts()
    moe_line = next(l for l in after.splitlines() if "mxfp4.moe.default" in l)
    assert "weights_on_input=True" in moe_line
    assert ("iota" in after) == bias, after  # all experts only where biases make them count
    if bias:
        from mxfp4_compile import explain
        with torch.no_grad():
            rep = explain(m, x(T))
        assert rep.regions[0].rewritten and "biases make unpicked experts count" in str(rep), rep
        assert "(routing weights on the input)" in str(rep)


def test_input_weighted_nonzero_fill_runs_every_expert():
    """Unpicked scores filled with -1 (sigmoid: 0.27, not 0): every expert counts, so the op
    runs all E with the dense weights rather than the top-k."""
    torch.manual_seed(2)
    m = z.InputWeightedMoE(fill=-1.0).to(BF16)
    c = z.check_rewrite_numerics(m, (x(7),), {"gate_up_proj": 1, "down_proj": 1}, n_moe=1)
    c.rec.assert_counts(after={mxfp4.moe: 1, aten.scatter: 1})
    (_, after), = c.rec.texts()
    assert "iota" in after


def test_input_weighted_with_output_weights_too_is_refused():
    """Weights on the input *and* on the output is not the op's math: no rewrite, and the
    report says where the combine stopped."""
    class Twice(z.InputWeightedMoE):
        def forward(self, x):
            logits = self.router(x)
            top_v, top_i = torch.topk(logits, 1, dim=1)
            s = torch.sigmoid(torch.full_like(logits, float("-inf")).scatter(1, top_i, top_v))
            rows = x.unsqueeze(0).expand(z.E, -1, -1) * s.t().unsqueeze(-1)
            g, u = torch.bmm(rows, self.gate_up_proj).chunk(2, dim=-1)
            y = torch.bmm(u * F.silu(g), self.down_proj)
            return (y * s.t().unsqueeze(-1)).sum(0)
    torch.manual_seed(0)
    from mxfp4_compile import explain
    with torch.no_grad():
        rep = explain(Twice().to(BF16), x())
    assert len(rep.regions) == 1 and not rep.regions[0].rewritten, rep
    assert "input already weighted" in rep.regions[0].reason, rep


def test_dense_input_scaled_by_a_norm_weight():
    """A product before the experts that is not routing weights (an RMSNorm's scale times the
    hidden states) is the hidden tensor itself, as before the input-weighted form existed."""
    class Normed(z.DenseMoE):
        def __init__(self):
            super().__init__()
            self.g = torch.nn.Parameter(torch.rand(z.H) + 0.5)

        def forward(self, x):
            return super().forward(x * self.g)
    torch.manual_seed(0)
    c = z.check_rewrite_numerics(Normed().to(BF16), (x(),), {"w13": -1, "w2": -1}, n_moe=1)
    (_, after), = c.rec.texts()
    assert "weights_on_input" not in after
