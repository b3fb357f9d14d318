"""The "triton" MoE kernel on a CUDA GPU (skipped without one): the decode GEMMs in Gluon
(_mma2) and the Triton kernels they stand in for, against the float32 reference on the same
MXFP4 bytes, at a K with a masked tail step (2880) and without (1024), 8- and 16-row blocks, split
K; and the inputs _mma2 does not take (fp16 and misaligned bf16 activations) falling back to the
Triton kernels. Run on the GPU machine: pytest -q tests/ops/kernels/test_triton_moe_cuda.py"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from mxfp4_compile.ops.kernels import triton_moe as tm
from mxfp4_compile.ops.kernels.triton_moe_details import planner, policy
from mxfp4_compile.ops.moe_torch import moe_torch
from mxfp4_compile.ops.weights import quantize_experts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _weights(E, H, I, act, seed=0):
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(E, 2 * I, H, generator=g) * 0.05
    w2 = torch.randn(E, H, I, generator=g) * 0.05
    b13 = torch.randn(E, 2 * I, generator=g) * 0.1
    b2 = torch.randn(E, H, generator=g) * 0.1
    canon = quantize_experts(w13, w2, b13, b2, activation=act, h_multiple=tm.H_MULTIPLE,
                             i_multiple=tm.I_MULTIPLE)
    canon = [t.cuda() if t is not None else None for t in canon]
    return canon, tm.prepare(*canon, act)


class _Counted:
    """A kernel whose launches (kernel[grid](...)) are counted."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def _run(canon, prepared, x, ids, tw, act, monkeypatch, mma2=True):
    """-> (output, float32 reference, number of _mma2 GEMM launches)."""
    from mxfp4_compile.ops.kernels.triton_moe_details import _mma2

    counted = [_Counted(_mma2._gemm1_kernel), _Counted(_mma2._gemm2_kernel)]
    with monkeypatch.context() as m, policy.override(mma2=mma2):
        m.setattr(_mma2, "_gemm1_kernel", counted[0])
        m.setattr(_mma2, "_gemm2_kernel", counted[1])
        out = tm.moe(x, ids, tw, *prepared, act, 1.702, 7.0, None, True)
        torch.cuda.synchronize()
    ref = moe_torch(x.float(), ids, tw, *canon, act, 1.702, 7.0, None, True).float()
    return out.float(), ref, [c.launches for c in counted]


@pytest.mark.parametrize("T,E,H,I,k,act", [
    (1, 32, 2880, 2880, 4, "swiglu_oai"), (8, 32, 2880, 2880, 4, "swiglu_oai"),
    (64, 32, 2880, 2880, 4, "swiglu_oai"),  # 8 rows per expert: 16-row blocks
    (1, 8, 1024, 2048, 2, "silu_glu"), (8, 8, 1024, 2048, 2, "silu_glu"),
    (1, 8, 1024, 512, 2, "silu_glu")])  # GEMM2: 4 K steps, which Triton 3.6 cannot compile
def test_decode_against_reference_and_the_triton_kernels(T, E, H, I, k, act, monkeypatch):
    canon, prepared = _weights(E, H, I, act)
    g = torch.Generator().manual_seed(T)
    x = torch.randn(T, H, generator=g).to(torch.bfloat16).cuda()
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).cuda()
    tw = torch.rand(T, k, generator=g).cuda()
    # poison the memory the kernels allocate next: an unwritten element shows as NaN
    torch.empty(1 << 28, dtype=torch.uint8, device="cuda").fill_(0xFF)
    out, ref, launches = _run(canon, prepared, x, ids, tw, act, monkeypatch)
    err = ((out - ref).norm() / ref.norm()).item()
    assert torch.isfinite(out).all() and err < 1e-2, err
    # the GEMMs the plan gives _mma2 (sm80+, bf16, aligned): all of them but the 3-4 step K
    # loops (planner.mma2_broken) of the I = 512 shape's GEMM2
    major = torch.cuda.get_device_capability()[0]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    Hp, Ip = prepared[0].shape[2] * 64, prepared[3].shape[2] * 64  # [E, N/16, K/64, 16, 32] tiles
    pol = policy.current(major)
    c1, c2 = planner.pick(pol, T, k, E, Hp, Ip, mma2=True)
    want = [int(planner.plan_gemm(pol, c, T * k, E, N, K, sms, w, True, major)[2])
            for c, N, K, w in ((c1, 2 * Ip, Hp, "gemm1"), (c2, H, Ip, "gemm2"))]
    assert launches == want
    assert want == ([1, 0] if I == 512 else [1, 1])
    out_triton, _, launches = _run(canon, prepared, x, ids, tw, act, monkeypatch, mma2=False)
    assert launches == [0, 0]
    assert ((out - out_triton).norm() / ref.norm()).item() < 1e-2


@pytest.mark.parametrize("T,E,H,I,k,act", [
    (4096, 32, 2880, 2880, 4, "swiglu_oai"),  # 256-row blocks and their BM/2, BM/4 copies
    (4096, 128, 2880, 2880, 4, "swiglu_oai"),  # 128-row blocks (merged ones split)
    (2048, 8, 2048, 2048, 2, "silu_glu"),  # 128-row blocks, no part-filled copies
    (5000, 8, 2048, 320, 2, "silu_glu")])  # GEMM2: 5 K steps (one loop trip + an odd step)
@pytest.mark.parametrize("wide", [False, True])
def test_prefill_wgmma_equals_the_triton_kernels(T, E, H, I, k, act, wide, monkeypatch):
    # _wgmma (opt-in: policy `wgmma`) runs the same wgmma slices in the same K order as the
    # Triton kernels, so its outputs are bit-equal to theirs (128 x 128 and 256 x 128 tiles;
    # the wide 128 x 256 tiles too), and repeated calls are bit-stable (a register race in
    # flight would not be)
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("_wgmma runs on sm90 only")
    canon, prepared = _weights(E, H, I, act)
    g = torch.Generator().manual_seed(T)
    x = torch.randn(T, H, generator=g).to(torch.bfloat16).cuda()
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).cuda()
    tw = torch.rand(T, k, generator=g).cuda()
    from mxfp4_compile.ops.kernels.triton_moe_details import _wgmma

    outs, counted = [], [_Counted(_wgmma._gemm1_kernel), _Counted(_wgmma._gemm2_kernel)]
    for on in (False, True, True):
        torch.empty(1 << 28, dtype=torch.uint8, device="cuda").fill_(0xFF)  # NaN poison
        with monkeypatch.context() as m, policy.override(
                wgmma=frozenset({"gemm1", "gemm2"} if on else ()), wgmma_wide=wide):
            m.setattr(_wgmma, "_gemm1_kernel", counted[0])
            m.setattr(_wgmma, "_gemm2_kernel", counted[1])
            outs.append(tm.moe(x, ids, tw, *prepared, act, 1.702, 7.0, None, True))
    # GEMM2 runs on _wgmma in both calls; GEMM1 too but for the short-K shape (its grid of 5
    # weight tiles splits K, which _wgmma does not)
    assert [c.launches for c in counted] == [0 if I == 320 else 2, 2]
    ref = moe_torch(x.float(), ids, tw, *canon, act, 1.702, 7.0, None, True).float()
    err = ((outs[1].float() - ref).norm() / ref.norm()).item()
    assert torch.isfinite(outs[1]).all() and err < 1e-2, err
    assert torch.equal(outs[1], outs[2])
    if not wide:
        assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("case", ["fp16", "misaligned"])
def test_activations_mma2_cannot_copy_fall_back(case, monkeypatch):
    E, H, I, k, T, act = 8, 1024, 2048, 2, 8, "silu_glu"
    canon, prepared = _weights(E, H, I, act)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, H, generator=g).cuda()
    if case == "fp16":
        x = x.half()
    else:  # bf16 two bytes off a 16-byte boundary
        x = torch.empty(T * H + 1, dtype=torch.bfloat16, device="cuda")[1:].view(T, H).copy_(x)
        assert x.data_ptr() % 16 != 0
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).cuda()
    tw = torch.rand(T, k, generator=g).cuda()
    out, ref, launches = _run(canon, prepared, x, ids, tw, act, monkeypatch)
    assert launches[0] == 0  # GEMM1 on the Triton kernels; GEMM2 reads our own bf16 buffer
    err = ((out - ref).norm() / ref.norm()).item()
    assert torch.isfinite(out).all() and err < 1e-2, err


@pytest.mark.parametrize("emap", [False, True])
@pytest.mark.parametrize("combine", [True, False])
def test_one_token_reads_the_ids_without_the_route_kernel(emap, combine, monkeypatch):
    # T=1: the _mma2 GEMMs take each assignment's expert from the ids (DIRECT), no route launch;
    # the same numbers, bit for bit, as through the route kernel. With an expert map (48 global
    # experts, 16 not on this rank) the token picks two experts of another rank
    from mxfp4_compile.ops.kernels.triton_moe_details import _route

    E, H, I, k, act = 32, 2880, 2880, 4, "swiglu_oai"
    canon, prepared = _weights(E, H, I, act)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, H, generator=g).to(torch.bfloat16).cuda()
    tw = torch.rand(1, k, generator=g).cuda()
    expert_map = None
    ids = torch.randperm(E, generator=g)[:k].view(1, k)
    if emap:
        glob = torch.randperm(48, generator=g)
        expert_map = torch.full((48,), -1, dtype=torch.int32)
        expert_map[glob[:E]] = torch.arange(E, dtype=torch.int32)
        ids = torch.cat([glob[:2], glob[E:E + 2]]).view(1, k)  # two here, two elsewhere
        expert_map = expert_map.cuda()
    ids = ids.cuda()
    outs = []
    for direct in (True, False):
        routes = _Counted(_route._route_kernel)
        with monkeypatch.context() as m, policy.override(mma2_direct=direct):
            m.setattr(_route, "_route_kernel", routes)
            torch.empty(1 << 28, dtype=torch.uint8, device="cuda").fill_(0xFF)  # poison
            outs.append(tm.moe(x, ids, tw, *prepared, act, 1.702, 7.0, expert_map, combine))
            torch.cuda.synchronize()
        assert routes.launches == (0 if direct else 1)
    ref = moe_torch(x.float(), ids, tw, *canon, act, 1.702, 7.0, expert_map, combine).float()
    out = outs[0].float()
    assert torch.isfinite(out).all()
    assert ((out - ref).norm() / ref.norm()).item() < 1e-2
    assert torch.equal(outs[0], outs[1])


def _ids_case(T: int, emap: bool) -> float:
    """One out-of-range-ids case on the GPU -> rel-L2 against moe_torch (nan if not finite)."""
    # -3, just past the map (or E) and 2**40 (past int32) contribute zero, as in moe_torch; with
    # an expert map no id reads past it (before the range test, 2**40 read far out of bounds)
    E, H, I, k, act = 32, 2880, 2880, 4, "swiglu_oai"
    canon, prepared = _weights(E, H, I, act)
    g = torch.Generator().manual_seed(11)
    e_global = 48 if emap else E
    expert_map = None
    if emap:
        expert_map = torch.full((e_global,), -1, dtype=torch.int32)
        expert_map[torch.randperm(e_global, generator=g)[:E]] = torch.arange(E, dtype=torch.int32)
        expert_map = expert_map.cuda()
    ids = torch.stack([torch.randperm(e_global, generator=g)[:k] for _ in range(T)])
    ids[0, 0], ids[0, 1] = -3, 2 ** 40
    ids[-1, 2] = e_global
    x = torch.randn(T, H, generator=g).to(torch.bfloat16).cuda()
    tw = torch.rand(T, k, generator=g).cuda()
    ids = ids.cuda()
    torch.empty(1 << 28, dtype=torch.uint8, device="cuda").fill_(0xFF)  # poison
    out = tm.moe(x, ids, tw, *prepared, act, 1.702, 7.0, expert_map, True).float()
    torch.cuda.synchronize()
    ref = moe_torch(x.float(), ids, tw, *canon, act, 1.702, 7.0, expert_map, True).float()
    if not torch.isfinite(out).all():
        return float("nan")
    return ((out - ref).norm() / ref.norm()).item()


@pytest.mark.subprocess
@pytest.mark.parametrize("T", [1, 8])  # T=1: DIRECT reads the ids in the GEMMs themselves
@pytest.mark.parametrize("emap", [False, True])
def test_ids_out_of_range_are_not_on_this_rank(T, emap):
    """Each case in its own process: an out-of-bounds read would kill the CUDA context (and every
    later test with it) instead of failing this one."""
    here = os.path.dirname(os.path.abspath(__file__))
    code = (f"import sys; sys.path.insert(0, {here!r}); import test_triton_moe_cuda as t; "
            f"print(t._ids_case({T}, {emap}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rel = float(r.stdout.strip().splitlines()[-1])
    assert rel < 1e-2, rel  # nan (a non-finite output) fails too
