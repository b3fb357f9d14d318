"""The "triton" kernel's FP8-activation path (triton_moe_details/_fp8.py, and _wgmma_fp8.py at
the prefill tiles) on a CUDA sm90 GPU (skipped elsewhere): against the plain-torch emulation of
what it computes (per-row e4m3 activations, exact weights: moe_torch(..., activations="fp8"))
and against the float32 reference, on NaN-poisoned memory, at gpt-oss's K with a masked tail
step (2880) and at decode, mid and prefill sizes; the Gluon prefill kernels against the Triton
ones. Run on the GPU machine:
pytest -q tests/ops/kernels/test_triton_moe_fp8_cuda.py"""
from __future__ import annotations

import pytest
import torch

from mxfp4_compile.ops.kernels import triton_moe as tm
from mxfp4_compile.ops.moe_torch import moe_torch
from mxfp4_compile.ops.weights import quantize_experts

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
    reason="needs an sm90 GPU")


def _poison():
    """Fill the allocator's free blocks with NaN, so that an output element the kernel never
    writes shows up."""
    free = torch.cuda.mem_get_info()[0]
    blocks = []
    try:
        while free > 256 << 20 and len(blocks) < 8:
            n = min(free // 2, 1 << 30) // 4
            blocks.append(torch.full((n,), float("nan"), device="cuda"))
            free = torch.cuda.mem_get_info()[0]
    finally:
        del blocks


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _problem(T, E, H, I, k, act, seed, n_global=None):
    """Random canonical MXFP4 weights on the GPU, x [T, H] bf16, top-k ids over n_global
    experts (default E) and weights -> (canon, x, ids, tw, the generator, for further draws)."""
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(E, 2 * I, H, generator=g) * 0.05
    w2 = torch.randn(E, H, I, generator=g) * 0.05
    b13 = torch.randn(E, 2 * I, generator=g) * 0.1
    b2 = torch.randn(E, H, generator=g) * 0.1
    canon = [t.cuda() for t in quantize_experts(w13, w2, b13, b2, activation=act,
                                                h_multiple=tm.H_MULTIPLE, i_multiple=tm.I_MULTIPLE)]
    x = torch.randn(T, H, generator=g).cuda().bfloat16()
    ids = torch.stack([torch.randperm(n_global or E, generator=g)[:k]
                       for _ in range(T)]).int().cuda()
    tw = torch.rand(T, k, generator=g).cuda()
    return canon, x, ids, tw, g


@pytest.mark.parametrize("T,E,H,I,k,act", [
    (1, 32, 2880, 2880, 4, "swiglu_oai"), (8, 32, 2880, 2880, 4, "swiglu_oai"),
    (64, 32, 2880, 2880, 4, "swiglu_oai"), (1000, 32, 2880, 2880, 4, "swiglu_oai"),
    (4096, 32, 2880, 2880, 4, "swiglu_oai"), (3, 8, 1024, 512, 2, "silu_glu"),
    (2048, 8, 1024, 512, 2, "silu_glu")])
@pytest.mark.parametrize("emap", [False, True])
def test_fp8_against_emulation_and_reference(T, E, H, I, k, act, emap):
    n_global = E + 4 if emap else E  # with a map: 4 global experts live elsewhere
    canon, x, ids, tw, g = _problem(T, E, H, I, k, act, T + E, n_global)
    prepared = tm.prepare(*canon, act, activations="fp8")
    m = None
    if emap:
        m = torch.full((n_global,), -1, dtype=torch.int32)
        m[torch.randperm(n_global, generator=g)[:E]] = torch.arange(E, dtype=torch.int32)
        m = m.cuda()
    _poison()
    out = tm.moe(x, ids, tw, *prepared, act, 1.702, 7.0, m, True, activations="fp8")
    torch.cuda.synchronize()
    assert out.isfinite().all()
    emu = moe_torch(x, ids, tw, *canon, act, 1.702, 7.0, m, True, sync_free=False,
                    activations="fp8", intermediate_dtype=torch.bfloat16)
    ref = moe_torch(x, ids, tw, *canon, act, 1.702, 7.0, m, True, sync_free=False)
    # against its emulation (with the kernel's bf16 intermediate): the output's bf16 rounding
    # and the accumulation order (H200: 1.6e-3...7e-3 over these cases); against exact math: as
    # far as the e4m3 activations take the emulation (4.0e-2...4.7e-2 here), no further
    assert _rel(out, emu) < 1e-2
    assert _rel(out, ref) < 1.1 * _rel(emu, ref) + 2e-3
    assert _rel(emu, ref) > 1e-2  # the emulation does quantize (the test can tell them apart)


# gpt-oss-20b and -120b prefill (128-row blocks, 120b with the part-filled block copies), a mid
# size, and a silu model whose K has no partial step
@pytest.mark.parametrize("T,E,H,I,k,act", [
    (4096, 32, 2880, 2880, 4, "swiglu_oai"), (4096, 128, 2880, 2880, 4, "swiglu_oai"),
    (1000, 32, 2880, 2880, 4, "swiglu_oai"), (4096, 8, 1024, 512, 2, "silu_glu")])
def test_gluon_prefill_kernels_against_the_triton_ones(T, E, H, I, k, act):
    """_wgmma_fp8 (the table's choice at these shapes) computes what _fp8.py's Triton kernels
    compute: the same operands, partial sums and promotion, up to the MMA's accumulation order
    inside a step."""
    from mxfp4_compile.ops.kernels.triton_moe_details import policy
    from mxfp4_compile.ops.kernels.triton_moe_details.launches import moe_launches

    canon, x, ids, tw, _ = _problem(T, E, H, I, k, act, T + E + 1)
    prepared = tm.prepare(*canon, act, activations="fp8")
    shape = dict(T=T, k=k, E=E, H=H, Hp=canon[0].shape[2] * 2, Ip=canon[3].shape[2] * 2,
                 activation=act, has_b13=True, has_b2=True, has_map=False, combine=True,
                 major=9, sms=torch.cuda.get_device_properties(0).multi_processor_count,
                 interpret=False, weights_aligned=True, x_bf16_aligned=True, fp8=True)
    assert moe_launches(policy.current(9), **shape).wgmma_fp8 == (True, True)
    _poison()
    out = tm.moe(x, ids, tw, *prepared, act, 1.702, 7.0, None, True, activations="fp8")
    again = tm.moe(x, ids, tw, *prepared, act, 1.702, 7.0, None, True, activations="fp8")
    with policy.override(fp8_wgmma=False):
        assert moe_launches(policy.current(9), **shape).wgmma_fp8 == (False, False)
        triton_out = tm.moe(x, ids, tw, *prepared, act, 1.702, 7.0, None, True,
                            activations="fp8")
    torch.cuda.synchronize()
    assert out.isfinite().all()
    assert torch.equal(out, again)  # deterministic
    assert _rel(out, triton_out) < 2e-3
    emu = moe_torch(x, ids, tw, *canon, act, 1.702, 7.0, None, True, sync_free=False,
                    activations="fp8", intermediate_dtype=torch.bfloat16)
    assert _rel(out, emu) < 1e-2
