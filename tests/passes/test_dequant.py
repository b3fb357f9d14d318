"""A graph that dequantizes MXFP4 weights then multiplies: the dequant is folded (requantizing the
dequantized values is lossless), so the compiled model computes with exactly the checkpoint's
weights."""
import unittest

import torch
from expecttest import TestCase

import moe_zoo as z

BF16 = torch.bfloat16


def x(T=5):
    return torch.randn(T, z.H, generator=torch.Generator().manual_seed(T)).to(BF16)


def test_dequant_then_matmul_is_folded_and_lossless():
    torch.manual_seed(0)
    m = z.DequantMoE()
    with torch.no_grad():
        ref = m(x())
    out, code = z.compile_run(m, x())
    assert z.moe_calls(code) == 1
    assert "prepare_moe_weights" not in code
    # no weight dequantization left in the output code either (folded at compile time)
    assert "exp2" not in code
    assert z.rel_err(out, ref) < 1e-2  # same weight values: bf16 rounding only


@unittest.skipUnless(z.snapshot_torch_ok(), f"snapshots recorded with torch {z.SNAPSHOT_TORCH}")
class TestDequantSnapshot(TestCase):
    def test_dequant_before_after(self):
        torch.manual_seed(0)
        (before, after), = z.record_pass_graphs(z.DequantMoE(), x())
        self.assertExpectedInline(before, """\
arg0_1 = input
arg1_1 = input
arg2_1 = input
arg3_1 = input
arg4_1 = input
arg5_1 = input
arg6_1 = input
arg7_1 = input
arg8_1 = input
bitwise_and = aten.bitwise_and.Scalar(arg0_1, 15)
rshift = aten.__rshift__.Scalar(arg0_1, 4)
unsqueeze = aten.unsqueeze.default(bitwise_and, 3)
unsqueeze_1 = aten.unsqueeze.default(rshift, 3)
cat = aten.cat.default([unsqueeze, unsqueeze_1], -1)
view = aten.view.default(cat, [4, 64, 64])
convert_element_type = prims.convert_element_type.default(view, int64)
index = aten.index.Tensor(arg2_1, [convert_element_type])
convert_element_type_1 = prims.convert_element_type.default(arg1_1, float32)
sub = aten.sub.Tensor(convert_element_type_1, 127)
exp2 = aten.exp2.default(sub)
unsqueeze_2 = aten.unsqueeze.default(exp2, 3)
expand = aten.expand.default(unsqueeze_2, [4, 64, 2, 32])
clone = aten.clone.default(expand, memory_format=torch.contiguous_format)
view_1 = aten.view.default(clone, [4, 64, 64])
mul = aten.mul.Tensor(index, view_1)
convert_element_type_2 = prims.convert_element_type.default(mul, bfloat16)
bitwise_and_1 = aten.bitwise_and.Scalar(arg3_1, 15)
rshift_1 = aten.__rshift__.Scalar(arg3_1, 4)
unsqueeze_3 = aten.unsqueeze.default(bitwise_and_1, 3)
unsqueeze_4 = aten.unsqueeze.default(rshift_1, 3)
cat_1 = aten.cat.default([unsqueeze_3, unsqueeze_4], -1)
view_2 = aten.view.default(cat_1, [4, 64, 32])
convert_element_type_3 = prims.convert_element_type.default(view_2, int64)
index_1 = aten.index.Tensor(arg2_1, [convert_element_type_3])
convert_element_type_4 = prims.convert_element_type.default(arg4_1, float32)
sub_1 = aten.sub.Tensor(convert_element_type_4, 127)
exp2_1 = aten.exp2.default(sub_1)
unsqueeze_5 = aten.unsqueeze.default(exp2_1, 3)
expand_1 = aten.expand.default(unsqueeze_5, [4, 64, 1, 32])
clone_1 = aten.clone.default(expand_1, memory_format=torch.contiguous_format)
view_3 = aten.view.default(clone_1, [4, 64, 32])
mul_1 = aten.mul.Tensor(index_1, view_3)
convert_element_type_5 = prims.convert_element_type.default(mul_1, bfloat16)
permute = aten.permute.default(arg5_1, [1, 0])
mm = aten.mm.default(arg8_1, permute)
convert_element_type_8 = prims.convert_element_type.default(mm, float32)
amax = aten.amax.default(convert_element_type_8, [-1], True)
sub_2 = aten.sub.Tensor(convert_element_type_8, amax)
exp = aten.exp.default(sub_2)
sum_1 = aten.sum.dim_IntList(exp, [-1], True)
div = aten.div.Tensor(exp, sum_1)
topk = aten.topk.default(div, 2)
getitem = getitem(topk, 0)
getitem_1 = getitem(topk, 1)
sum_2 = aten.sum.dim_IntList(getitem, [-1], True)
div_1 = aten.div.Tensor(getitem, sum_2)
convert_element_type_9 = prims.convert_element_type.default(div_1, bfloat16)
index_2 = aten.index.Tensor(convert_element_type_2, [getitem_1])
unsqueeze_6 = aten.unsqueeze.default(arg8_1, 2)
unsqueeze_7 = aten.unsqueeze.default(unsqueeze_6, 3)
view_4 = aten.view.default(index_2, [5, 128, 64])
view_5 = aten.view.default(unsqueeze_7, [5, 64, 1])
bmm = aten.bmm.default(view_4, view_5)
view_6 = aten.view.default(bmm, [5, 2, 64, 1])
permute_5 = aten.permute.default(view_6, [0, 1, 2, 3])
view_7 = aten.view.default(permute_5, [5, 2, 64])
index_3 = aten.index.Tensor(arg6_1, [getitem_1])
add = aten.add.Tensor(view_7, index_3)
index_4 = aten.index.Tensor(convert_element_type_5, [getitem_1])
slice_1 = aten.slice.Tensor(add, 2, 0, 9223372036854775807, 2)
convert_element_type_12 = prims.convert_element_type.default(slice_1, float32)
clamp_max = aten.clamp_max.default(convert_element_type_12, 7)
convert_element_type_13 = prims.convert_element_type.default(clamp_max, bfloat16)
slice_2 = aten.slice.Tensor(add, 2, 1, 9223372036854775807, 2)
convert_element_type_14 = prims.convert_element_type.default(slice_2, float32)
clamp_min = aten.clamp_min.default(convert_element_type_14, -7)
clamp_max_1 = aten.clamp_max.default(clamp_min, 7)
convert_element_type_15 = prims.convert_element_type.default(clamp_max_1, bfloat16)
mul_2 = aten.mul.Tensor(convert_element_type_13, 1.702)
sigmoid = aten.sigmoid.default(mul_2)
mul_3 = aten.mul.Tensor(convert_element_type_13, sigmoid)
add_1 = aten.add.Tensor(convert_element_type_15, 1)
mul_4 = aten.mul.Tensor(mul_3, add_1)
unsqueeze_8 = aten.unsqueeze.default(mul_4, 3)
view_8 = aten.view.default(index_4, [10, 64, 32])
view_9 = aten.view.default(unsqueeze_8, [10, 32, 1])
bmm_1 = aten.bmm.default(view_8, view_9)
view_10 = aten.view.default(bmm_1, [5, 2, 64, 1])
permute_10 = aten.permute.default(view_10, [0, 1, 2, 3])
view_11 = aten.view.default(permute_10, [5, 2, 64])
index_5 = aten.index.Tensor(arg7_1, [getitem_1])
add_2 = aten.add.Tensor(view_11, index_5)
permute_11 = aten.permute.default(add_2, [0, 2, 1])
unsqueeze_9 = aten.unsqueeze.default(convert_element_type_9, 2)
permute_13 = aten.permute.default(permute_11, [0, 1, 2])
bmm_2 = aten.bmm.default(permute_13, unsqueeze_9)
permute_15 = aten.permute.default(bmm_2, [0, 1, 2])
view_15 = aten.view.default(permute_15, [5, 64])
return [view_15]""")
        self.assertExpectedInline(after, """\
arg0_1 = input
arg1_1 = input
arg2_1 = input
arg3_1 = input
arg4_1 = input
arg5_1 = input
arg6_1 = input
arg7_1 = input
arg8_1 = input
bitwise_and = aten.bitwise_and.Scalar(arg0_1, 15)
rshift = aten.__rshift__.Scalar(arg0_1, 4)
unsqueeze = aten.unsqueeze.default(bitwise_and, 3)
unsqueeze_1 = aten.unsqueeze.default(rshift, 3)
cat = aten.cat.default([unsqueeze, unsqueeze_1], -1)
view = aten.view.default(cat, [4, 64, 64])
convert_element_type = prims.convert_element_type.default(view, int64)
index = aten.index.Tensor(arg2_1, [convert_element_type])
convert_element_type_1 = prims.convert_element_type.default(arg1_1, float32)
sub = aten.sub.Tensor(convert_element_type_1, 127)
exp2 = aten.exp2.default(sub)
unsqueeze_2 = aten.unsqueeze.default(exp2, 3)
expand = aten.expand.default(unsqueeze_2, [4, 64, 2, 32])
clone = aten.clone.default(expand, memory_format=torch.contiguous_format)
view_1 = aten.view.default(clone, [4, 64, 64])
mul = aten.mul.Tensor(index, view_1)
convert_element_type_2 = prims.convert_element_type.default(mul, bfloat16)
bitwise_and_1 = aten.bitwise_and.Scalar(arg3_1, 15)
rshift_1 = aten.__rshift__.Scalar(arg3_1, 4)
unsqueeze_3 = aten.unsqueeze.default(bitwise_and_1, 3)
unsqueeze_4 = aten.unsqueeze.default(rshift_1, 3)
cat_1 = aten.cat.default([unsqueeze_3, unsqueeze_4], -1)
view_2 = aten.view.default(cat_1, [4, 64, 32])
convert_element_type_3 = prims.convert_element_type.default(view_2, int64)
index_1 = aten.index.Tensor(arg2_1, [convert_element_type_3])
convert_element_type_4 = prims.convert_element_type.default(arg4_1, float32)
sub_1 = aten.sub.Tensor(convert_element_type_4, 127)
exp2_1 = aten.exp2.default(sub_1)
unsqueeze_5 = aten.unsqueeze.default(exp2_1, 3)
expand_1 = aten.expand.default(unsqueeze_5, [4, 64, 1, 32])
clone_1 = aten.clone.default(expand_1, memory_format=torch.contiguous_format)
view_3 = aten.view.default(clone_1, [4, 64, 32])
mul_1 = aten.mul.Tensor(index_1, view_3)
convert_element_type_5 = prims.convert_element_type.default(mul_1, bfloat16)
permute = aten.permute.default(arg5_1, [1, 0])
mm = aten.mm.default(arg8_1, permute)
convert_element_type_8 = prims.convert_element_type.default(mm, float32)
router = mxfp4.topk_softmax.default(convert_element_type_8, 2, True, True)
router_ids = getitem(router, 1)
router_weights = getitem(router, 0)
convert_element_type_9 = prims.convert_element_type.default(router_weights, bfloat16)
prepare_moe_weights_default = mxfp4.prepare_moe_weights.default(convert_element_type_2, arg6_1, convert_element_type_5, arg7_1, 'reference', 'swiglu_oai', rounding='floor', gate_up_interleaved=True, transposed=False, index=0)
prepare_moe_weights_default_1 = mxfp4.prepare_moe_weights.default(convert_element_type_2, arg6_1, convert_element_type_5, arg7_1, 'reference', 'swiglu_oai', rounding='floor', gate_up_interleaved=True, transposed=False, index=1)
prepare_moe_weights_default_2 = mxfp4.prepare_moe_weights.default(convert_element_type_2, arg6_1, convert_element_type_5, arg7_1, 'reference', 'swiglu_oai', rounding='floor', gate_up_interleaved=True, transposed=False, index=2)
prepare_moe_weights_default_3 = mxfp4.prepare_moe_weights.default(convert_element_type_2, arg6_1, convert_element_type_5, arg7_1, 'reference', 'swiglu_oai', rounding='floor', gate_up_interleaved=True, transposed=False, index=3)
prepare_moe_weights_default_4 = mxfp4.prepare_moe_weights.default(convert_element_type_2, arg6_1, convert_element_type_5, arg7_1, 'reference', 'swiglu_oai', rounding='floor', gate_up_interleaved=True, transposed=False, index=4)
prepare_moe_weights_default_5 = mxfp4.prepare_moe_weights.default(convert_element_type_2, arg6_1, convert_element_type_5, arg7_1, 'reference', 'swiglu_oai', rounding='floor', gate_up_interleaved=True, transposed=False, index=5)
moe_default = mxfp4.moe.default(arg8_1, router_ids, convert_element_type_9, prepare_moe_weights_default, prepare_moe_weights_default_1, prepare_moe_weights_default_2, prepare_moe_weights_default_3, prepare_moe_weights_default_4, prepare_moe_weights_default_5, 'reference', activation='swiglu_oai', alpha=1.702, limit=7)
return [moe_default]""")


def test_packed_weights_in_buffers_fold_and_mutated_buffer_stays_live():
    torch.manual_seed(0)
    m = z.DequantBufferMoE()
    with torch.no_grad():
        ref = m(x())
    out, code = z.compile_run(m, x())
    assert z.moe_calls(code) == 1 and "prepare_moe_weights" not in code and "exp2" not in code
    assert z.rel_err(out, ref) < 1e-2
    assert m.steps.item() == 2  # eager call + compiled call: the counter buffer was not frozen
