"""The "triton" kernel's planner (triton_moe_details/planner.py) on the sm90 launch policy: which
tile each shape gets, how decode grids split K and pair tiles, which launches use TMA, and the
policy's override scope. Pure host-side arithmetic: no kernel runs here."""
from __future__ import annotations

import dataclasses
import logging

import pytest

from mxfp4_compile.ops.kernels.triton_moe_details import planner, policy

P = policy.SM90


def test_tile_table_covers_every_T():
    for E, Hp, Ip, k in ((32, 2880, 2880, 4), (128, 2880, 2880, 4), (8, 4096, 14336, 2), (5, 96, 64, 2)):
        for T in (1, 2, 7, 8, 64, 100, 512, 4096, 16384):
            for c, K in zip(planner.pick(P, T, k, E, Hp, Ip), (Hp, Ip)):
                assert c.BK % 32 == 0 and c.BM >= 16 and c.BN >= 16
            assert planner.pick(P, T, k, E, Hp, Ip)[0].BN % 16 == 0  # GEMM1: whole gate/up row groups
    # decode steps K by 128; gpt-oss K = 2880 ends with one 64-code tail step, Mixtral's none
    assert [c.BK for c in planner.pick(P, 8, 4, 32, 2880, 2880)] == [128, 128]
    assert planner.tail(2880, 128) == 64 and planner.tail(4096, 128) == 0
    assert planner.tail(14336, 256) == 0 and planner.tail(2880, 256) == 64
    assert planner.tail(2880 + 128, 256) == 0  # a 192-code remainder: masked steps instead
    # prefill: part-filled last blocks on half the rows where they are many (120b: 128 experts)
    assert all(c.HALF for c in planner.pick(P, 4096, 4, 128, 2880, 2880))
    assert not any(c.HALF for c in planner.pick(P, 16384, 2, 8, 4096, 14336))  # Mixtral: few


def test_split_k_chunks_cover_k_once():
    for programs in (1, 4, 90, 180, 1000, 5000):
        for K, BK in ((2880, 64), (14336, 256), (192, 64), (64, 64)):
            n, chunk = planner.split_k(P, programs, K, BK, 132)
            steps = -(-K // BK)
            assert chunk % BK == 0 and 1 <= n <= steps
            assert (n - 1) * chunk < K <= n * chunk  # every chunk non-empty, K covered once
            if n > 1:
                assert chunk // BK >= P.min_steps_per_chunk
    # gpt-oss decode (4 experts x 90 tiles on 132 SMs) splits; a full prefill grid does not
    assert planner.split_k(P, 4 * 90, 2880, 64, 132)[0] > 1
    assert planner.split_k(P, 256 * 45, 2880, 64, 132)[0] == 1


def test_plan_pairs_tiles_only_where_it_splits():
    c1, c2 = planner.pick(P, 1, 4, 32, 2880, 2880)  # gpt-oss T=1: 4 row blocks
    c, _, n, *_ = planner.plan(P, c1, 4, 5760, 2880, 132, "gemm1")
    assert c.PAIR and c.BK == 64 and n > 1  # small grid: split K, 64-code steps, paired tiles
    assert c.maxnreg is None  # the 64-register cap was measured on the 128-code config only
    c1, c2 = planner.pick(P, 8, 4, 32, 2880, 2880)  # T=8: 32 blocks x 90 tiles fill the GPU
    c, _, n, *_ = planner.plan(P, c1, 32, 5760, 2880, 132, "gemm1")
    assert not c.PAIR and c.BK == 128 and n == 1 and c.maxnreg == 64
    c1 = planner.pick(P, 4096, 4, 32, 2880, 2880)[0]
    c, _, n, *_ = planner.plan(P, c1, 96, 5760, 2880, 132, "gemm1")
    assert not c.PAIR and n == 1  # prefill tiles are never paired
    c1, c2 = planner.pick(P, 1, 2, 8, 4096, 14336)  # Mixtral T=1 GEMM2: 2 blocks x 64 tiles
    c, _, n, *_ = planner.plan(P, c2, 2, 4096, 14336, 132, "gemm2")
    assert c.PAIR and c.BK == 64 and n > 1
    c, _, n, *_ = planner.plan(P, c1, 2, 2 * 14336, 4096, 132, "gemm1")  # 896 programs: one BK 64 wave
    assert not c.PAIR and c.BK == 64 and n == 1 and c.maxnreg is None
    c1, c2 = planner.pick(P, 64, 2, 8, 4096, 14336)  # Mixtral T=64 GEMM2: 16 x 64 in the grid
    assert planner.plan(P, c2, 16, 4096, 14336, 132, "gemm2").config.BK == 128
    # Mixtral T=8 GEMM2 (9 blocks x 64 tiles: 3-5 programs per SM) splits K in 8 at 3 stages,
    # into no fewer than MIN_STEPS_PER_CHUNK steps a chunk; GEMM1 of a grid that size does not
    c2 = planner.pick(P, 8, 2, 8, 4096, 14336)[1]
    p = planner.plan(P, c2, 9, 4096, 14336, 132, "gemm2")
    assert (p.config.BK, p.config.num_stages, p.split, p.even_k) == (128, 3, 8, True)
    assert p.chunk == 14 * 128
    assert planner.plan(P, c2, 9, 4096, 1024, 132, "gemm2").split == 8 // P.min_steps_per_chunk
    p = planner.plan(P, planner.pick(P, 8, 2, 8, 4096, 14336)[0], 9, 4096, 4096, 132, "gemm1")
    assert p.split == 1


def test_tma_loads_the_unpaired_128_code_decode_steps():
    c1, c2 = planner.pick(P, 8, 2, 8, 4096, 14336)  # Mixtral T=8
    p1 = planner.plan(P, c1, 9, 2 * 14336, 4096, 132, "gemm1")
    p2 = planner.plan(P, c2, 9, 4096, 14336, 132, "gemm2")
    assert planner.use_tma(p1.config, 9, True) and planner.use_tma(p2.config, 9, True)
    for major in (0, 8, 10):  # interpreter, Ampere; Blackwell is not measured
        assert not planner.use_tma(p2.config, major, True)
    assert not planner.use_tma(p2.config, 9, False)  # weights not 16-byte aligned
    g = planner.plan(P, planner.pick(P, 8, 4, 32, 2880, 2880)[0], 34, 5760, 2880, 132, "gemm1")
    assert g.tail == 64 and planner.use_tma(g.config, 9, True)  # gpt-oss: a tail descriptor
    t1 = planner.plan(P, planner.pick(P, 1, 2, 8, 4096, 14336)[1], 2, 4096, 14336, 132, "gemm2")
    assert t1.config.PAIR and not planner.use_tma(t1.config, 9, True)  # T=1: paired, BK 64
    big = planner.pick(P, 4096, 2, 8, 4096, 14336)[0]  # prefill: 64-code steps
    assert not planner.use_tma(big, 9, True)


def test_prefill_block_rows_follow_rows_per_expert():
    # 120b T=4096: about 128 rows per expert -> 128-row blocks, with the half and quarter copies
    assert [(c.BM, c.HALF) for c in planner.pick(P, 4096, 4, 128, 2880, 2880)] == [(128, 2)] * 2
    # ... and an expert's last <= 32 rows merged into its block before (129-160 rows: one block)
    assert [c.EXTRA for c in planner.pick(P, 4096, 4, 128, 2880, 2880)] == [32, 32]
    # 20b T=4096 (512 rows per expert) and 120b T=16384 keep 256-row blocks, unmerged
    assert planner.pick(P, 4096, 4, 32, 2880, 2880)[0].BM == 256
    assert planner.pick(P, 16384, 4, 128, 2880, 2880)[0].BM == 256
    assert not any(c.EXTRA for c in planner.pick(P, 4096, 4, 32, 2880, 2880))


def test_override_is_scoped_and_checks_names():
    assert policy.current(9) is policy.SM90
    with policy.override(programs_per_sm=7):
        assert policy.current(9).programs_per_sm == 7
        with policy.override(mma2=False):  # nested blocks stack
            assert (policy.current(9).programs_per_sm, policy.current(9).mma2) == (7, False)
        assert policy.current(9).mma2
    assert policy.current(9) is policy.SM90
    with pytest.raises(TypeError):
        with policy.override(no_such_knob=1):
            pass
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.SM90.programs_per_sm = 1


def test_untuned_capabilities_get_the_sm90_values_marked_untuned(caplog):
    policy.policy_for.cache_clear()
    with caplog.at_level(logging.INFO, logger="mxfp4_compile"):
        for cap in ((8, 0), (8, 9), (10, 0), (8, 0)):
            got = policy.policy_for(*cap)
            assert got.tuned_on is None and got == dataclasses.replace(P, tuned_on=None)
        assert policy.policy_for(9, 0).tuned_on is not None
    said = [r.getMessage() for r in caplog.records if "untuned" in r.getMessage()]
    assert len(said) == 3 and "sm80" in said[0]  # once per capability


def test_forced_tiles_and_split_win_over_the_table():
    t = (P.mid, P.prefill)
    forced = dataclasses.replace(P, tiles=t, split=(3, 2))
    assert planner.pick(forced, 1, 4, 32, 2880, 2880) == t
    assert planner.split_k(forced, 10_000, 2880, 64, 132, "gemm1")[0] == 3
    assert planner.split_k(forced, 10_000, 2880, 64, 132, "gemm2")[0] == 2


@pytest.mark.parametrize("T", [1, 8, 64, 512, 4096, 16384])
@pytest.mark.parametrize("model", [(32, 2880, 2880, 4), (8, 4096, 14336, 2)])
def test_fp8_launches_use_the_fp8_tiles(T, model):
    """FP8 activations: no _mma2, no TMA, no paired tiles or merged blocks, fp8_bk steps, at
    most fp8_max_bm rows per block, a row quantizer before each GEMM, and the bf16 plan of the
    same shape unchanged by the flag's existence. The 128 x 128 tiles run _wgmma_fp8 (its
    argument list is _mma2's), every other tile the Triton kernels."""
    from mxfp4_compile.ops.kernels.triton_moe_details import launches

    E, H, I, k = model
    P = policy.SM90
    common = dict(T=T, k=k, E=E, H=H, Hp=H, Ip=I, activation="swiglu_oai", has_b13=True,
                  has_b2=True, has_map=False, combine=True, major=9, sms=132, interpret=False,
                  weights_aligned=True, x_bf16_aligned=True)
    L = launches.moe_launches(P, **common, fp8=True)
    assert L.mma2 == L.wgmma_fp8 and L.tma == (False, False) and not L.direct
    assert L.wgmma == (False, False)
    for g, p, gluon in ((L.gemm1, L.p1, L.wgmma_fp8[0]), (L.gemm2, L.p2, L.wgmma_fp8[1])):
        c = p.config
        assert gluon == (c.BM == 128 and c.BN == 128 and p.split == 1)
        assert g.module == ("_wgmma_fp8" if gluon else "_gemm1" if g is L.gemm1 else "_gemm2")
        assert gluon or g.constexprs["FP8"]
        assert c.BK == P.fp8_bk and c.BM <= P.fp8_max_bm
        assert not c.PAIR and not c.EXTRA and c.maxnreg is None
    # prefill sizes take _wgmma_fp8 for both GEMMs; off in the policy: the Triton kernels
    assert L.wgmma_fp8 == ((True, True) if T >= 512 else (False, False))
    off = launches.moe_launches(dataclasses.replace(P, fp8_wgmma=False), **common, fp8=True)
    assert off.wgmma_fp8 == (False, False) and off.gemm1.constexprs["FP8"]
    assert L.quant1.constexprs["KP"] == H and L.quant2.constexprs["KP"] == I
    bf16 = launches.moe_launches(P, **common)
    assert bf16.quant1 is None and not bf16.gemm1.constexprs.get("FP8")
