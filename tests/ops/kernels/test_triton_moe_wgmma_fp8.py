"""The Gluon FP8 prefill GEMMs (triton_moe_details/_wgmma_fp8.py) compiled for sm90 here, without a
GPU (Gluon has no interpreter: the H100 checks their results, test_triton_moe_fp8_cuda.py; the
decode PTX is checked on host ints in test_triton_moe_fp8.py). For the launches
`launches.moe_launches` sends to them at the FP8 prefill shapes of the three benchmark models:
fp8 wgmma (QGMMA) with the decoded tile as its register operand and no trip through shared
memory, no byte-by-byte repacking of that operand, step i+1 decoded while wgmma i runs into
registers wgmma i does not read, and the kernel waits for the one before it.
"""
from __future__ import annotations

import os
import re

import pytest

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("needs the real Triton compiler, not the interpreter", allow_module_level=True)
gluon_rt = pytest.importorskip("triton.experimental.gluon._runtime")

from mxfp4_compile.ops.kernels.triton_moe_details import launches, planner  # noqa: E402
from mxfp4_compile.ops.kernels.triton_moe_details.policy import SM90 as P  # noqa: E402
from test_triton_moe_sass import _CUOBJDUMP, _k_loop, _sass_of  # noqa: E402
from test_triton_moe_wgmma import _mma_loops, _waits_first, _written  # noqa: E402

# (T, k, E, H, I): gpt-oss-20b / -120b / Mixtral prefill and gpt-oss-20b at T=512
SHAPES = [(4096, 4, 32, 2880, 2880), (4096, 4, 128, 2880, 2880), (4096, 2, 8, 4096, 14336),
          (512, 4, 32, 2880, 2880)]
_PTR = {"x_ptr": "*fp8e4nv", "sorted_ptr": "*i32", "es_ptr": "*i32", "ids_ptr": "*i64",
        "emap_ptr": "*i32", "w_ptr": "*i32", "s_ptr": "*u8", "b_ptr": "*fp32", "p_ptr": "*fp32",
        "y_ptr": "*bf16", "rs_ptr": "*fp32"}


def _moe_launches(T, k, E, H, I, pol=P, aligned=True):
    return launches.moe_launches(pol, T=T, k=k, E=E, H=H, Hp=H, Ip=I, activation="swiglu_oai",
                                 has_b13=True, has_b2=True, has_map=False, combine=True, major=9,
                                 sms=132, interpret=False, weights_aligned=aligned,
                                 x_bf16_aligned=True, fp8=True)


def _fp8_launches():
    """Distinct (gemm, Launch) that an H100 call of the SHAPES sends to _wgmma_fp8."""
    out = {}
    for shape in SHAPES:
        L = _moe_launches(*shape)
        for gemm, launch, wg in ((1, L.gemm1, L.wgmma_fp8[0]), (2, L.gemm2, L.wgmma_fp8[1])):
            if wg:
                out.setdefault((gemm, tuple(sorted(launch.constexprs.items()))), (gemm, launch))
    return list(out.values())


def _sass(gemm, launch):
    # GEMM1 writes the bf16 intermediate; GEMM2 reads it as e4m3 rows
    ptr = dict(_PTR, a_ptr="*bf16" if gemm == 1 else "*fp8e4nv")
    scalars = (dict(E="i32", n_map="i32", k_top="i32", alpha="fp32", limit="fp32", p_rows="i32")
               if gemm == 1 else dict(E="i32", n_map="i32", M="i32"))
    return _sass_of(launch, dict(ptr, **scalars), 90, gluon_rt.GluonASTSource)


@pytest.fixture(scope="module")
def ptxas_works():
    if not os.path.exists(_CUOBJDUMP):
        pytest.skip("triton's cuobjdump is missing")


def test_the_fp8_prefill_shapes_reach_wgmma_fp8():
    seen = set()
    for shape in SHAPES:
        L = _moe_launches(*shape)
        assert L.wgmma_fp8 == (True, True) and L.mma2 == (True, True), shape
        assert L.gemm1.module == L.gemm2.module == "_wgmma_fp8" and L.wgmma == (False, False)
        assert L.quant1 is not None and L.quant2 is not None  # e4m3 rows before each GEMM
        c = L.p1.config
        assert (c.BM, c.BN, c.BK, c.num_warps) == (128, 128, 128, 8)
        # gpt-oss's K = 2880 is 22.5 steps: the last one masked
        assert L.gemm1.constexprs["MASK_K"] == (shape[3] % 128 != 0)
        seen.add(c.HALF)
    assert seen == {0, 2}  # with and without the part-filled block copies (120b)
    # unaligned weights, another GPU, or off in the policy: _fp8.py's Triton kernels
    assert _moe_launches(*SHAPES[0], aligned=False).wgmma_fp8 == (False, False)
    # e4m3 rows past int32 element offsets (_issue's X_OFFS): GEMM1 at T * Hp >= 2**31, GEMM2
    # at T * k * Ip >= 2**31
    assert _moe_launches(2 ** 31 // 2880 + 1, 4, 32, 2880, 2880).wgmma_fp8 == (False, False)
    assert _moe_launches(2 ** 31 // 2880 // 4 + 1, 4, 32, 2880, 2880).wgmma_fp8 == (True, False)
    plan = _moe_launches(*SHAPES[0]).p1
    assert planner.use_wgmma_fp8(P, plan, 9) and not planner.use_wgmma_fp8(P, plan, 8)
    assert not planner.use_wgmma_fp8(P, plan, 10)


@pytest.mark.slow
@pytest.mark.parametrize("gemm,launch", _fp8_launches(),
                         ids=lambda v: str(v) if isinstance(v, int) else
                         f"H{v.constexprs['H']}_I{v.constexprs['Ip']}_HALF{v.constexprs['HALF']}")
def test_k_loop(ptxas_works, gemm, launch):
    sass = _sass(gemm, launch)
    loop = _k_loop(sass, full=True)
    # fp8 wgmma with the decoded tile as its register operand (B: a shared-memory descriptor)
    qgmma = [op for op in loop if op.startswith("QGMMA")]
    assert qgmma and all(re.match(r"QGMMA\.64x\d+x32\.F32\.E4M3\.E4M3 R\d+, R\d+, gdesc", op)
                         for op in qgmma)
    # the decoded tile never goes through shared memory (only cp.async fills it) and is not
    # unpacked to bytes and packed again (what an fp8 tensor carried across the loop's back
    # edge costs: byte-pair PRMTs, 0x3340, ~30 per step)
    assert not [op for op in loop if op.startswith(("STS", "STSM"))]
    assert not [op for op in loop if re.match(r"PRMT R\d+, R\d+(\.reuse)?, 0x3340,", op)]
    loops = _mma_loops(sass, "QGMMA")
    copies = 1 + min(launch.constexprs["HALF"], 2)
    assert len(loops) == copies  # a loop per body copy (BM, BM/2, BM/4 rows)
    # the promotion: one FFMA per accumulator register and step (64 at 128 x 128 over 8 warps,
    # 32 and 16 in the BM/2 and BM/4 copies)
    assert sorted(sum(op.startswith("FFMA") for op in body) for body, _ in loops) == sorted(
        4 * 64 >> h for h in range(copies))
    for body, steps in loops:
        assert len(steps) == 4  # the loop unrolled by its 4 stages
        for regs, after in steps:
            # nothing in flight may have its A registers overwritten before the wait
            clobbered = [op for op in after if _written(op) & regs]
            assert not clobbered, clobbered[:3]
        # step i+1's tile is decoded (its prmt table lookups) while wgmma i runs, in at least
        # 3 of the 4 unrolled steps of the BM-row copy (ptxas serializes the one before the
        # back edge), 2 of 4 in the BM/2 and BM/4 copies (their wgmma is 2x and 4x shorter)
        overlapped = [sum(op.startswith("PRMT") for op in after) for _, after in steps]
        full = sum(op.startswith("FFMA") for op in body) == 4 * 64
        assert sum(n >= 16 for n in overlapped) >= (3 if full else 2), overlapped


@pytest.mark.slow
@pytest.mark.parametrize("gemm", [1, 2])
def test_waits_for_the_previous_kernel_before_touching_memory(ptxas_works, gemm):
    g, launch = next(v for v in _fp8_launches() if v[0] == gemm)
    assert _waits_first(_sass(g, launch))


@pytest.mark.slow
@pytest.mark.parametrize("K", [128, 256, 384, 512, 640, 896, 1152])
def test_short_k_compiles(ptxas_works, K):
    # 1 to 9 K steps: every remainder of the 4-stage unroll, and fewer steps than stages
    for gemm, (H, I) in ((1, (K, 2880)), (2, (2880, K))):  # this GEMM's K short
        L = _moe_launches(4096, 4, 32, H, I)
        assert L.wgmma_fp8[gemm - 1]
        assert "QGMMA" in _sass(gemm, L.gemm1 if gemm == 1 else L.gemm2)
