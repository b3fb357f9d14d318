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
from recording_backend import aten, mxfp4

BF16 = torch.bfloat16
E, K, H, I = z.E, z.K, z.H, z.I
KD = {"w13": -1, "w2": -1}
# after the pass: no GEMM of either form, no gather, sort or count; one op call, router fused
REWRITTEN = {aten.bmm: 0, aten._grouped_mm: 0, aten.index: 0, aten.sort: 0, aten.histc: 0,
             aten.topk: 0, mxfp4.moe: 1, mxfp4.topk_softmax: 1}


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


@pytest.mark.parametrize("T", [pytest.param(1, marks=pytest.mark.slow), 7])
@pytest.mark.parametrize("cls", [Batched517, Grouped517])
def test_transformers_517_sentinel_guards_rewritten(cls, T):
    torch.manual_seed(0)
    c = z.check_rewrite_numerics(cls().to(BF16).eval(), (_x(T),), KD, n_moe=1, tight=3e-2)
    gemm = aten.bmm if cls is Batched517 else aten._grouped_mm
    c.rec.assert_counts(before={gemm: 2}, after=REWRITTEN)
    # the op runs on the fused router's ids and (renormalized) weights
    (run,) = c.rec.runs
    (tks,) = [n for n in run.after.nodes if n.target is mxfp4.topk_softmax.default]
    (moe,) = [n for n in run.after.nodes if n.target is mxfp4.moe.default]
    assert tks.args[1:] == (2, True, True), run.text()  # k, softmax_first, renormalize
    assert moe.args[1].args == (tks, 1), run.text()
    assert moe.args[2].args == (tks, 0), run.text()  # the weights, stored as bf16 by the op
    assert tks.kwargs == {"out_dtype": torch.bfloat16}, run.text()


@pytest.mark.slow
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
        out, code, rec = z.compile_record(model, _x())
    assert z.moe_calls(code) == 0
    gemm = aten.bmm if isinstance(model, Batched517) else aten._grouped_mm
    rec.assert_counts(before={gemm: 2}, after={gemm: 2, mxfp4.moe: 0})
    assert why in str(rep), str(rep)
    assert z.rel_err(out, ref) < 1e-2


# ---- one-token decode (T=1) for the hand-written forms ------------------------------------------
@pytest.mark.parametrize("make,kd", [
    (lambda: z.GatherMoE(), KD),
    pytest.param(lambda: z.GatherMoE("silu_glu", bias=False, transposed=True), {"w13": 1, "w2": 1},
                 marks=pytest.mark.slow),
    pytest.param(lambda: z.GptFastMoE(), {"w1": -1, "w2": -1, "w3": -1}, marks=pytest.mark.slow),
    pytest.param(lambda: z.DenseMoE(), KD, marks=pytest.mark.slow),
    pytest.param(lambda: z.GroupedMoE(), KD, marks=pytest.mark.slow),
    pytest.param(lambda: z.TitanStyleMoE(), {"w1": -1, "w2": -1, "w3": -1}, marks=pytest.mark.slow),
])
def test_hand_written_forms_one_token(make, kd):
    torch.manual_seed(0)
    c = z.check_rewrite_numerics(make().to(BF16).eval(), (_x(1),), kd, n_moe=1, tight=3e-2)
    c.rec.assert_counts(after={aten.bmm: 0, aten._grouped_mm: 0, mxfp4.moe: 1})


@pytest.mark.slow
def test_dynamic_true_module_floats_become_guarded_constants():
    """torch.compile(dynamic=True) passes swiglu's Python floats (a module attribute, a function
    default) as 0-dim tensor inputs; the backend turns them back into constants guarded by value,
    so the layer is rewritten with T dynamic, and a new value recompiles with it."""
    import copy
    from mxfp4_compile import backend
    torch.manual_seed(0)
    model = z.GatherMoE().to(BF16).eval()
    kd = {"w13": -1, "w2": -1}
    torch._dynamo.reset()
    n = len(backend.last_compile_info)
    with torch.no_grad():
        cm = torch.compile(model, backend="mxfp4", dynamic=True)
        for T in (5, 9):
            want = z.quantize_experts_(copy.deepcopy(model), kd)(_x(T))
            assert z.rel_err(cm(_x(T)), want) < 2e-2, T
        assert len(backend.last_compile_info) - n == 1  # one graph for both T
        assert backend.last_compile_info[-1]["rewritten"] == 1
        model.limit = 0.5
        want = z.quantize_experts_(copy.deepcopy(model), kd)(_x(5))
        assert z.rel_err(cm(_x(5)), want) < 2e-2
    info = backend.last_compile_info[-1]
    assert len(backend.last_compile_info) - n == 2 and info["candidates"][0].details["limit"] == 0.5


@unittest.skipUnless(z.snapshot_torch_ok(), f"graph text recorded with torch {z.SNAPSHOT_TORCH}")
@pytest.mark.slow
class TestSentinelGraphs(TestCase):
    def test_517_forms_rewrite_to_the_same_graph(self):
        """Both 5.17 forms (batched_mm and grouped_mm, sentinel guards included) rewrite to the
        same graph: one op call on the routed ids and renormalized weights (the gather form's
        graph after the pass, see test_gather_bmm.py's snapshot)."""
        torch.manual_seed(0)
        (_, after), = z.record_pass_graphs(Batched517().to(BF16).eval(), _x())
        torch.manual_seed(0)
        (_, grouped_after), = z.record_pass_graphs(Grouped517().to(BF16).eval(), _x())
        self.assertEqual(grouped_after, after)
