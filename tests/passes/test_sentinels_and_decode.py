"""transformers 5.17's experts code paths (sentinel guards for expert parallelism), written here from
its semantics so the tests run whatever transformers is installed, and one-token decode (T=1) for
the hand-written forms.

5.17 batched_mm: ``ids.reshape(-1).clamp(0, E-1)`` before gathering the weights. 5.17 grouped_mm:
``mask = sorted_ids >= E``, ``sorted_ids.clamp_(max=E-1)`` for the bias gathers, ``masked_fill`` of
the masked rows before the first GEMM and after each GEMM. Without expert parallelism every id is
< E, so all of it is the identity and the region is the op's math."""
import unittest

import pytest
import torch
import torch.nn as nn
from expecttest import TestCase

import moe_zoo as z
from mxfp4_compile import explain

BF16 = torch.bfloat16
E, K, H, I = z.E, z.K, z.H, z.I
KD = {"w13": -1, "w2": -1}


def _swiglu(h):  # transformers GptOss-style gate: interleaved rows, alpha 1.702, limit 7
    return z.swiglu_oai(h)


class Batched517(nn.Module):
    """transformers 5.17 ``batched_mm_experts_forward`` (gate_up with bias, [E, N, K] weights)."""

    def __init__(self, clamp_hi=E - 1, clamp_lo=0):
        super().__init__()
        self.gate = nn.Linear(H, E, bias=False)
        self.w13 = nn.Parameter(torch.randn(E, 2 * I, H) * .05)
        self.b13 = nn.Parameter(torch.randn(E, 2 * I) * .05)
        self.w2 = nn.Parameter(torch.randn(E, H, I) * .05)
        self.b2 = nn.Parameter(torch.randn(E, H) * .05)
        self.clamp_hi, self.clamp_lo = clamp_hi, clamp_lo

    def forward(self, x):  # [T, H]
        w, ids = z._router(x, self.gate, K)
        T, k = ids.shape
        xs = x.repeat_interleave(k, dim=0)
        sw, flat = w.reshape(-1), ids.reshape(-1)
        flat = flat.clamp(self.clamp_lo, self.clamp_hi)
        h = torch.bmm(xs.unsqueeze(1), self.w13[flat].transpose(-2, -1)).squeeze(1) + self.b13[flat]
        y = torch.bmm(_swiglu(h).unsqueeze(1), self.w2[flat].transpose(-2, -1)).squeeze(1) + self.b2[flat]
        return (y * sw.unsqueeze(-1)).view(T, k, -1).sum(dim=1)


class Grouped517(nn.Module):
    """transformers 5.17 ``grouped_mm_experts_forward`` (gate_up with bias, [E, N, K] weights)."""

    def __init__(self, mask_at=E, clamp_hi=E - 1):
        super().__init__()
        self.gate = nn.Linear(H, E, bias=False)
        self.w13 = nn.Parameter(torch.randn(E, 2 * I, H) * .05)
        self.b13 = nn.Parameter(torch.randn(E, 2 * I) * .05)
        self.w2 = nn.Parameter(torch.randn(E, H, I) * .05)
        self.b2 = nn.Parameter(torch.randn(E, H) * .05)
        self.mask_at, self.clamp_hi = mask_at, clamp_hi

    def forward(self, x):  # [T, H]
        w, ids = z._router(x, self.gate, K)
        T, k = ids.shape
        sw, flat = w.reshape(-1), ids.reshape(-1)
        ids_g, perm = torch.sort(flat)
        xs = x[perm // k]
        sw_g = sw[perm]
        counts = torch.histc(ids_g.float(), bins=E, min=0, max=E - 1)
        offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
        mask = (ids_g >= self.mask_at).unsqueeze(-1)
        ids_g.clamp_(max=self.clamp_hi)
        xs.masked_fill_(mask, 0.0)
        h = torch._grouped_mm(xs, self.w13.transpose(-2, -1), offs=offs) + self.b13[ids_g]
        h = h.masked_fill(mask, 0.0)
        y = torch._grouped_mm(_swiglu(h), self.w2.transpose(-2, -1), offs=offs) + self.b2[ids_g]
        y = y.masked_fill(mask, 0.0)
        y = y * sw_g.unsqueeze(-1)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.size(0), device=x.device)
        return y[inv].view(T, k, -1).sum(dim=1)


def _x(T=7):
    return torch.randn(T, H, generator=torch.Generator().manual_seed(3)).to(BF16)


@pytest.mark.parametrize("T", [1, 7])
@pytest.mark.parametrize("cls", [Batched517, Grouped517])
def test_transformers_517_sentinel_guards_rewritten(cls, T):
    torch.manual_seed(0)
    z.check_rewrite_numerics(cls().to(BF16).eval(), (_x(T),), KD, n_moe=1, tight=3e-2)


@pytest.mark.parametrize("m,why", [
    (lambda: Batched517(clamp_hi=E - 2), "not [T, k]"),    # clamps a valid id: not the identity
    (lambda: Batched517(clamp_lo=1), "not [T, k]"),
    (lambda: Grouped517(mask_at=E - 1), "hidden[perm // k]"),  # masks rows of a valid expert
])
def test_clamp_or_mask_of_valid_ids_not_rewritten(m, why):
    torch.manual_seed(0)
    model = m().to(BF16).eval()
    with torch.no_grad():
        ref = model(_x())
        rep = explain(model, _x())
        out, code = z.compile_run(model, _x())
    assert z.moe_calls(code) == 0
    assert why in str(rep), str(rep)
    assert z.rel_err(out, ref) < 1e-2


# ---- one-token decode (T=1) for the hand-written forms ------------------------------------------
@pytest.mark.parametrize("make,kd", [
    (lambda: z.GatherMoE(), KD),
    (lambda: z.GatherMoE("silu_glu", bias=False, transposed=True), {"w13": 1, "w2": 1}),
    (lambda: z.GptFastMoE(), {"w1": -1, "w2": -1, "w3": -1}),
    (lambda: z.DenseMoE(), KD),
    (lambda: z.GroupedMoE(), KD),
    (lambda: z.TitanStyleMoE(), {"w1": -1, "w2": -1, "w3": -1}),
])
def test_hand_written_forms_one_token(make, kd):
    torch.manual_seed(0)
    z.check_rewrite_numerics(make().to(BF16).eval(), (_x(1),), kd, n_moe=1, tight=3e-2)


def test_dynamic_true_float_input_explained_and_correct():
    """torch.compile(dynamic=True) turns swiglu's Python floats into graph inputs: the op needs them
    as constants, so the region stays bf16, and explain says why and what to do."""
    torch.manual_seed(0)
    model = z.GatherMoE().to(BF16).eval()
    with torch.no_grad():
        ref = model(_x(5))
        rep = explain(model, _x(5), dynamic=True)
    assert "runtime scalar input" in str(rep) and "specialize_float" in str(rep), str(rep)
    out, code = z.compile_run(model, _x(5), dynamic=True)
    assert z.moe_calls(code) == 0 and z.rel_err(out, ref) < 1e-2


@unittest.skipUnless(z.snapshot_torch_ok(), f"snapshots recorded with torch {z.SNAPSHOT_TORCH}")
class TestSentinelSnapshots(TestCase):
    def test_517_after(self):
        """Both 5.17 forms (batched_mm and grouped_mm, sentinel guards included) rewrite to the
        same graph: one op call on the routed ids and renormalized weights."""
        torch.manual_seed(0)
        (_, after), = z.record_pass_graphs(Batched517().to(BF16).eval(), _x())
        torch.manual_seed(0)
        (_, grouped_after), = z.record_pass_graphs(Grouped517().to(BF16).eval(), _x())
        self.assertEqual(grouped_after, after)
        self.assertExpectedInline(after, """\
arg0_1 = input
arg1_1 = input
arg2_1 = input
arg3_1 = input
arg4_1 = input
arg5_1 = input
permute = aten.permute.default(arg0_1, [1, 0])
mm = aten.mm.default(arg5_1, permute)
convert_element_type_2 = prims.convert_element_type.default(mm, float32)
router = mxfp4.topk_softmax.default(convert_element_type_2, 2, True, True)
router_ids = getitem(router, 1)
router_weights = getitem(router, 0)
convert_element_type_3 = prims.convert_element_type.default(router_weights, bfloat16)
prepare_moe_weights_default = mxfp4.prepare_moe_weights.default(arg1_1, arg2_1, arg3_1, arg4_1, 'reference', 'swiglu_oai', rounding='floor', gate_up_interleaved=True, transposed=False, index=0)
prepare_moe_weights_default_1 = mxfp4.prepare_moe_weights.default(arg1_1, arg2_1, arg3_1, arg4_1, 'reference', 'swiglu_oai', rounding='floor', gate_up_interleaved=True, transposed=False, index=1)
prepare_moe_weights_default_2 = mxfp4.prepare_moe_weights.default(arg1_1, arg2_1, arg3_1, arg4_1, 'reference', 'swiglu_oai', rounding='floor', gate_up_interleaved=True, transposed=False, index=2)
prepare_moe_weights_default_3 = mxfp4.prepare_moe_weights.default(arg1_1, arg2_1, arg3_1, arg4_1, 'reference', 'swiglu_oai', rounding='floor', gate_up_interleaved=True, transposed=False, index=3)
prepare_moe_weights_default_4 = mxfp4.prepare_moe_weights.default(arg1_1, arg2_1, arg3_1, arg4_1, 'reference', 'swiglu_oai', rounding='floor', gate_up_interleaved=True, transposed=False, index=4)
prepare_moe_weights_default_5 = mxfp4.prepare_moe_weights.default(arg1_1, arg2_1, arg3_1, arg4_1, 'reference', 'swiglu_oai', rounding='floor', gate_up_interleaved=True, transposed=False, index=5)
moe_default = mxfp4.moe.default(arg5_1, router_ids, convert_element_type_3, prepare_moe_weights_default, prepare_moe_weights_default_1, prepare_moe_weights_default_2, prepare_moe_weights_default_3, prepare_moe_weights_default_4, prepare_moe_weights_default_5, 'reference', activation='swiglu_oai', alpha=1.702, limit=7)
return [moe_default]""")

