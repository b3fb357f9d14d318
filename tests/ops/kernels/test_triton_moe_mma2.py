"""The Gluon decode GEMMs (triton_moe_details/_mma2.py) compiled for sm90 and sm80 here, without a
GPU (Gluon has no interpreter: the H100 checks their results, test_triton_moe_cuda.py and
benchmarks/gpu_check.py). For every launch `planner.plan_gemm` sends to them at the decode
shapes of the three benchmark models: the K loop must issue clearly fewer instructions than the
Triton kernel's for the same tile (the reason this kernel exists), use mma.sync with the words
and the activations loaded by ldmatrix, keep nothing in local memory, and wait for the previous
kernel (programmatic dependent launch) before touching global memory.
"""
from __future__ import annotations

import dataclasses
import os
import re

import pytest

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("needs the real Triton compiler, not the interpreter", allow_module_level=True)
gluon_rt = pytest.importorskip("triton.experimental.gluon._runtime")

from mxfp4_compile.ops.kernels.triton_moe_details import planner  # noqa: E402
from mxfp4_compile.ops.kernels.triton_moe_details.policy import SM90 as P  # noqa: E402
from test_triton_moe_sass import _CUOBJDUMP, _gemm_launch, _k_loop, _sass_of  # noqa: E402
from test_triton_moe_sass import _compile as _compile_triton  # noqa: E402

# (T, k, E, H, I) decode shapes: gpt-oss-20b, -120b (K = 2880: a masked tail step) and Mixtral
SHAPES = [(1, 4, 32, 2880, 2880), (8, 4, 32, 2880, 2880), (64, 4, 32, 2880, 2880),
          (1, 4, 128, 2880, 2880), (64, 4, 128, 2880, 2880), (1, 2, 8, 4096, 14336),
          (8, 2, 8, 4096, 14336)]


def _launches():
    """Distinct (gemm, planned config, split, chunk, mask, H, I, direct) that an H100 launch of
    the SHAPES sends to _mma2 (as launches.moe_launches plans them; direct: one token, DIRECT)."""
    return list(dict.fromkeys(launch for launch, _ in _launches_with_shapes()))


def _launches_with_shapes():
    """_launches' entries, each with its shape from SHAPES (repeated where shapes share one)."""
    out = []
    for T, k, E, H, I in SHAPES:
        M = T * k
        plans = [planner.plan_gemm(P, c, M, E, N, K, 132, f"gemm{gemm}", True, 9)
                 for gemm, c, N, K in zip((1, 2), planner.pick(P, T, k, E, H, I, mma2=True),
                                          (2 * I, H), (H, I))]
        direct = T == 1 and all(mma2 for _, _, mma2 in plans) and P.mma2_direct
        for gemm, (p, _, mma2) in zip((1, 2), plans):
            if mma2:
                key = (gemm, p.config, p.split, p.chunk, p.tail > 0 or not p.even_k, H, I,
                       direct)
                out.append((key, (T, k, E, H, I)))
    return out


def _compile(gemm, cfg, split, chunk, mask, H, I, direct=False, arch=90):
    """SASS of one _mma2 kernel as triton_moe.moe launches it (sm90: with programmatic launch and
    GEMM1's late trigger). `mask`: K steps past K, as a plan with a tail or an uneven split."""
    tail = 64 if mask and split == 1 else 0
    pl = planner.Plan(cfg, -(-(2 * I if gemm == 1 else H) // cfg.BN), split, chunk, tail,
                      not mask)
    launch = _gemm_launch(gemm, pl, H, I, mma2=True, direct=direct, late=arch >= 90, arch=arch)
    assert launch.constexprs["MASK_K"] == mask
    ptr = {"x_ptr": "*bf16", "a_ptr": "*bf16", "sorted_ptr": "*i32", "es_ptr": "*i32",
           "ids_ptr": "*i64", "emap_ptr": "*i32",
           "w_ptr": "*i32", "s_ptr": "*u8", "b_ptr": "*fp32", "p_ptr": "*fp32", "y_ptr": "*fp32"}
    if gemm == 1:
        types = dict(ptr, E="i32", n_map="i32", k_top="i32", alpha="fp32", limit="fp32",
                     p_rows="i32")
    else:
        types = dict(ptr, E="i32", n_map="i32", M="i32")
    return _sass_of(launch, types, arch, gluon_rt.GluonASTSource)


@pytest.fixture(scope="module")
def ptxas_works():
    if not os.path.exists(_CUOBJDUMP):
        pytest.skip("triton's cuobjdump is missing")


def test_the_decode_shapes_reach_mma2():
    # both GEMMs; GEMM2 split (T=1, Mixtral T=8) and not; GEMM1 is never split here
    launches = _launches()
    assert {(g, s > 1) for g, _, s, *_ in launches} == {(1, False), (2, False), (2, True)}
    assert {v[4] for v in launches} == {True, False}  # masked K steps and not
    assert {v[7] for v in launches} == {True, False}  # T=1 reads the ids (DIRECT)
    assert all(not c.PAIR and c.BK == 128 for _, c, *_ in launches)
    assert {c.BM for _, c, *_ in launches} == {8, 16}  # 8-row blocks where m_e <= 2
    # 4 pipeline stages for the grids of fewer than mma2_deep_per_sm programs per SM: T=1's
    # but Mixtral's GEMM1 (896 programs on 132 SMs); 3 at T > 1
    stages = {(T, k, gemm): c.num_stages for (gemm, c, *_), (T, k, *_) in _launches_with_shapes()}
    assert {key: n for key, n in stages.items() if n == 4} == {
        (1, 4, 1): 4, (1, 4, 2): 4, (1, 2, 2): 4}, stages


@pytest.mark.parametrize("launch", _launches(),
                         ids=lambda v: f"gemm{v[0]}_split{v[2]}_mask{int(v[4])}_K{v[5 + v[0] % 2]}"
                                       f"{'_direct' if v[7] else ''}")
@pytest.mark.slow
def test_k_loop(ptxas_works, launch):
    gemm, cfg, split, chunk, mask, H, I, direct = launch
    sass = _compile(gemm, cfg, split, chunk, mask, H, I, direct)
    loop = _k_loop(sass)
    # the loop runs one K step per pipeline stage per iteration (_mma2._k_loop)
    hmma = (cfg.BK // 16) * (cfg.BM // 8)  # one mma.sync m16n8k16 per 16 codes and 8 rows
    steps = loop.count("HMMA.16816.F32.BF16") // hmma
    assert steps == cfg.num_stages and loop.count("HMMA.16816.F32.BF16") == steps * hmma
    assert not [op for op in loop if op.startswith(("HGMMA", "WARPGROUP"))]
    # one barrier per step; the only shared-memory stores are the cp.async copies; words and
    # activations arrive by ldmatrix (2 + BM/2 per 128-code step), the scale bytes by 16-bit loads
    assert loop.count("BAR.SYNC.DEFER_BLOCKING") == steps
    assert not [op for op in loop if op.startswith(("STS", "STSM"))], "a layout change in the loop"
    assert loop.count("LDSM.16.M88.4") == steps * (cfg.BK // 64 + cfg.BK * cfg.BM // 256)
    assert "STL" not in sass and "LDL" not in sass, "register spills"
    # fewer instructions per step than the Triton kernel's loop for the same tile (sm90, as
    # launched: TMA where it uses it); 183 against 295 for Mixtral's GEMM1 when written
    triton_loop = _k_loop(_compile_triton(gemm, dataclasses.replace(cfg, maxnreg=64), H, I))
    assert len(loop) / steps < 0.85 * len(triton_loop), (len(loop) / steps, len(triton_loop))


@pytest.mark.slow
@pytest.mark.parametrize("gemm", [1, 2])
@pytest.mark.parametrize("direct", [False, True])
def test_waits_for_the_previous_kernel_before_touching_memory(ptxas_works, gemm, direct):
    # DIRECT reads the top-k ids, which the kernel before it may still be writing
    launch = next(v for v in _launches() if v[0] == gemm and v[4] and v[7] == direct)
    ops = [m.group(1) for m in re.finditer(r"/\*[0-9a-f]{4,}\*/\s*(?:@!?U?P\w+\s+)?([A-Z][\w.]*)",
                                           _compile(*launch))]
    assert ops.count("ACQBULK") == 1 and ops.count("PREEXIT") == 1, "no griddepcontrol pair"
    wait = ops.index("ACQBULK")
    memory = [i for i, op in enumerate(ops) if op.startswith(("LDG", "STG", "LDGSTS"))]
    assert memory and min(memory) > wait, f"global memory access before the wait: {ops[:wait]}"
    assert ops.index("PREEXIT") > wait


@pytest.mark.slow
def test_compiles_for_sm80_without_griddepcontrol(ptxas_works):
    # Ampere runs the same kernels (mma.sync and cp.async are sm80 features), without PDL
    launch = next(v for v in _launches() if v[0] == 1 and v[4])
    sass = _compile(*launch, arch=80)
    assert "HMMA.16816.F32.BF16" in sass and "ACQBULK" not in sass


def test_plan_for_mma2():
    dec = P.decode
    # T=1, gpt-oss-20b: GEMM1 (4 experts x 90 tiles, 2.7 programs per SM) runs unsplit with its
    # activation fused; GEMM2 (4 x 45) splits K; both unpaired 128-code steps on _mma2, where
    # the Triton kernels pair 64-code tiles
    p1 = planner.plan(P, dec, 4, 5760, 2880, 132, "gemm1", True)
    p2 = planner.plan(P, dec, 4, 2880, 2880, 132, "gemm2", True)
    assert (p1.config.BK, p1.config.PAIR, p1.split) == (128, False, 1)
    assert (p2.config.BK, p2.config.PAIR, p2.split > 1, p2.even_k) == (128, False, True, False)
    assert planner.use_mma2(p2.config, 9) and planner.use_mma2(p2.config, 8)
    q = planner.plan(P, dec, 4, 5760, 2880, 132, "gemm1", False)
    assert q.config.PAIR and q.split > 1 and not planner.use_mma2(q.config, 9)
    # never under the interpreter, nor for tiles it does not implement
    assert not planner.use_mma2(dec, 0)
    assert not planner.use_mma2(P.decode32, 9)  # 32-row blocks: measured slower on _mma2
    assert not planner.use_mma2(P.mid128, 9)
    # 8-row blocks only for _mma2 (Triton's dot needs 16) and where experts hold <= 2 rows
    assert planner.pick(P, 1, 4, 32, 2880, 2880, mma2=True)[0].BM == 8
    assert planner.pick(P, 1, 4, 32, 2880, 2880)[0].BM == 16
    assert planner.pick(P, 64, 4, 32, 2880, 2880, mma2=True)[0].BM == 16  # m_e = 8
    assert planner.mma2_possible(P, 9) and not planner.mma2_possible(P, 7)
    assert not planner.mma2_possible(dataclasses.replace(P, mma2=False), 9)


@pytest.mark.parametrize("stages,steps", [(3, 1), (3, 2), (3, 5), (3, 6), (3, 7), (4, 1),
                                          (4, 2), (4, 3), (4, 7), (4, 8)])
@pytest.mark.slow
def test_step_counts_it_runs_compile(ptxas_works, stages, steps):
    # K chunks of 3-4 steps at 3 stages and 4-6 at 4 crash Triton 3.6's compiler
    # (planner.mma2_broken); the others must compile, masked or not
    assert not planner.mma2_broken(steps, stages)
    cfg = dataclasses.replace(P.decode8, num_stages=stages)
    for mask in (False, True):
        assert "HMMA" in _compile(2, cfg, 2, steps * 128, mask, 1024, 2048)


def test_broken_step_counts():
    assert [s for s in range(1, 20) if planner.mma2_broken(s, 3)] == [3, 4]
    assert [s for s in range(1, 20) if planner.mma2_broken(s, 4)] == [4, 5, 6]
    # a small grid (4 stages) with a 6-step K runs _mma2 at 3 stages instead
    p, _, mma2 = planner.plan_gemm(P, P.decode8, 2, 8, 2048, 768, 132, "gemm2", True, 9)
    assert mma2 and p.config.num_stages == 3 and planner.mma2_steps(p, 768) == 6


def test_broken_step_counts_run_the_triton_kernels():
    # a 4-step K (GEMM2 of a 512-wide expert at T=1, too short to split): the Triton kernels,
    # on 16-row blocks (they have no 8-row tiles), planned as they plan for themselves
    p, blocks, mma2 = planner.plan_gemm(P, P.decode8, 2, 8, 2048, 512, 132, "gemm2",
                                        True, 9)
    assert not mma2 and p.config.BM == 16 and blocks == 2
    assert p == planner.plan(P, P.decode, 2, 2048, 512, 132, "gemm2")
    p = planner.plan(P, P.decode8, 2, 2048, 512, 132, "gemm2", True)
    assert planner.mma2_broken(planner.mma2_steps(p, 512), p.config.num_stages)


def test_mma2_chunks_are_not_short():
    # gpt-oss T=1 GEMM2 (4 x 45 programs, 23 steps of 128): 2 chunks (mma2_min_steps_per_chunk),
    # where the Triton kernels' rule would make 3 of 8 steps; Mixtral's 112 steps still split 4
    assert planner.plan(P, P.decode8, 4, 2880, 2880, 132, "gemm2", True).split == 2
    assert planner.split_k(P, 180, 2880, 128, 132)[0] == 3
    assert planner.plan(P, P.decode8, 2, 4096, 14336, 132, "gemm2", True).split == 4
