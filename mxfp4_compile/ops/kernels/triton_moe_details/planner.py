"""How one call of the "triton" MoE kernel launches: small pure functions of the shapes, the
device and a LaunchPolicy (policy.py), run on the host at every call.

  pick       rows per expert -> the (GEMM1, GEMM2) tile configs of the policy's table
  plan       one GEMM's grid: K split into chunks, paired tiles, 64-code steps, stages, a tail
  plan_gemm  plan, then whether the Gluon decode kernels (_mma2) take the launch
  use_wgmma  whether the Gluon prefill kernels (_wgmma) take a planned launch
  use_wgmma_fp8  whether the Gluon FP8 prefill kernels (_wgmma_fp8) take one
Shape legend: T tokens, k top-k, E local experts, M = T*k sorted rows, N weight rows, K the
reduction length (padded), `blocks` row blocks of BM rows, `sms` streaming multiprocessors (0:
the interpreter, where nothing is split or paired unless the policy forces it).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

from .policy import LaunchPolicy, TileConfig


class Plan(NamedTuple):
    """How one GEMM launches (`plan`)."""
    config: TileConfig
    tiles: int    # weight tiles along N per row block (BN rows each, 2 BN with PAIR)
    split: int    # K chunks (grid axis 1)
    chunk: int    # K elements per chunk, a multiple of BK
    tail: int     # the narrower last K step of an unsplit GEMM (`tail`), 0: none
    even_k: bool  # whole steps only: no K mask in the loop


def rows_per_expert(T: int, k: int, E: int) -> float:
    m = T * k
    return m / max(1, min(E, m))


def pick(pol: LaunchPolicy, T: int, k: int, E: int, Hp: int, Ip: int, interpret: bool = False,
         mma2: bool = False) -> tuple[TileConfig, TileConfig]:
    """-> (GEMM1 config, GEMM2 config) for this call's shape. GEMM1's BN counts weight rows
    (gate and up: BN/2 intermediate columns); its K is Hp, GEMM2's is Ip. mma2: both GEMMs can
    run _mma2 (mma2_possible, bf16 activations), which has 8-row decode blocks."""
    if pol.tiles is not None:
        return pol.tiles
    if interpret:
        return pol.interpret
    m_e = rows_per_expert(T, k, E)
    if mma2 and m_e <= pol.mma2_bm8_max_rows:
        return pol.decode8, pol.decode8
    if m_e <= pol.decode_max_rows:
        return pol.decode, pol.decode
    if m_e <= pol.decode32_max_rows and Hp % 128 == 0 and Ip % 128 == 0:
        return pol.decode32, pol.decode32
    if m_e > pol.prefill_min_rows_per_expert and T * k >= pol.prefill_min_rows:
        c = pol.prefill if m_e > pol.prefill128_max_rows else pol.mid128
        if E / (T * k / c.BM + E) >= pol.half_share:  # share of blocks that are an expert's last
            c = dataclasses.replace(c, HALF=pol.half_levels)
        if pol.merge_div and c.BM == 128:
            c = dataclasses.replace(c, EXTRA=c.BM // pol.merge_div)
        return c, c
    c = pol.mid if m_e <= pol.mid_max_rows else pol.mid128
    return c, c


def tail(K: int, BK: int) -> int:
    """The K step an unsplit GEMM adds after its whole BK steps (0: none). K a multiple of 64
    whose remainder is 64 or 128 (gpt-oss 2880 at BK 128: 22 steps + 64) runs every whole step
    unmasked and one narrower step at the end; other remainders, and split K, mask every step."""
    r = K % BK
    return r if r in (64, 128) else 0


def split_k(pol: LaunchPolicy, programs: int, K: int, BK: int, sms: int, which: str = "gemm1",
            want: int | None = None, mma2: bool = False) -> tuple[int, int]:
    """-> (K chunks, chunk length in elements, a multiple of BK). `want`: this many chunks (the
    plan's choice) unless the policy forces a split; otherwise none for grids of at least
    programs_per_sm (mma2_programs_per_sm) programs per SM, else enough chunks for
    split_target_per_sm programs per SM, each of at least min_steps_per_chunk
    (mma2_min_steps_per_chunk) steps."""
    steps = -(-K // BK)
    if pol.split is not None:
        want = pol.split[0 if which == "gemm1" else 1]
    elif want is None:
        per_sm = pol.mma2_programs_per_sm if mma2 else pol.programs_per_sm
        min_steps = pol.mma2_min_steps_per_chunk if mma2 else pol.min_steps_per_chunk
        if programs >= per_sm * sms:
            return 1, steps * BK
        want = -(-pol.split_target_per_sm * sms // max(1, programs))
        want = min(want, steps // min_steps)
    want = max(1, min(want, steps))
    per = -(-steps // want)
    return -(-steps // per), per * BK


def fp8_config(pol: LaunchPolicy, c: TileConfig, interpret: bool) -> TileConfig:
    """The table's config `c` for the FP8 GEMMs (_fp8.py): fp8_bk steps, at most fp8_max_bm
    rows, no merged blocks and no register cap (the step's partial sum is a second
    accumulator). The interpreter's configs stay as they are."""
    if interpret or pol.tiles is not None:
        return dataclasses.replace(c, EXTRA=0, PAIR=False)
    bm = min(c.BM, pol.fp8_max_bm)
    return dataclasses.replace(c, BM=bm, BK=pol.fp8_bk, EXTRA=0, PAIR=False, maxnreg=None,
                               HALF=c.HALF if bm == c.BM else 0)


def plan(pol: LaunchPolicy, c: TileConfig, blocks: int, N: int, K: int, sms: int, which: str,
         mma2: bool = False, fp8: bool = False) -> Plan:
    """-> the Plan of one GEMM of `blocks` row blocks x N weight rows over K, for table config
    `c` on decode blocks (BM 8 or 16) grown or cut to fit the GPU:
    - fewer than programs_per_sm programs per SM: split K; the Triton kernels also step K by 64
      and pair weight tiles (two per program: one loop's bookkeeping for both), _mma2 keeps
      128-code steps;
    - a GEMM2 grid of programs_per_sm..resident_per_sm per SM: K in up to gemm2_mid_split
      chunks at 3 stages (one wave of long programs cannot even out slow SMs);
    - resident_per_sm..one_wave_per_sm per SM (Triton kernels): 64-code steps, one wave;
    - _mma2 grids below mma2_deep_per_sm per SM: 4 cp.async stages.
    Ledger rows of the same names hold the measurements."""
    force_split = None
    if pol.tiles is None and c.BM in (pol.decode8.BM, pol.decode.BM) and not c.PAIR:
        programs = blocks * -(-N // c.BN)
        if programs < (pol.mma2_programs_per_sm if mma2 else pol.programs_per_sm) * sms:
            if not mma2 and not fp8:
                c = dataclasses.replace(c, BK=64, PAIR=True, maxnreg=None)
        elif (which == "gemm2" and programs < pol.resident_per_sm * sms
              and K >= 2 * pol.min_steps_per_chunk * c.BK):
            c = dataclasses.replace(c, num_stages=3)
            force_split = min(pol.gemm2_mid_split, -(-K // c.BK) // pol.min_steps_per_chunk)
        elif (pol.resident_per_sm * sms <= programs < pol.one_wave_per_sm * sms and not mma2
              and not fp8):
            c = dataclasses.replace(c, BK=64, maxnreg=None)
    tiles = -(-N // (c.BN * (2 if c.PAIR else 1)))
    split, chunk = split_k(pol, blocks * tiles, K, c.BK, sms, which, force_split, mma2)
    if mma2 and blocks * tiles * split < pol.mma2_deep_per_sm * sms:
        c = dataclasses.replace(c, num_stages=4)
    t = tail(K, c.BK) if split == 1 else 0  # split chunks mask their steps instead
    return Plan(c, tiles, split, chunk, t, split * chunk == K or t > 0)


def row_blocks(M: int, E: int, BM: int) -> int:
    """Row blocks a GEMM grid is sized for: the worst case (surplus programs exit at once)."""
    return min(M, M // BM + E)


def plan_gemm(pol: LaunchPolicy, c: TileConfig, M: int, E: int, N: int, K: int, sms: int,
              which: str, mma2: bool, major: int, fp8: bool = False) -> tuple[Plan, int, bool]:
    """-> (Plan, row blocks, whether _mma2 runs it) for one GEMM of M sorted rows over E
    experts with table config `c`; mma2: _mma2 can run here (mma2_possible, aligned inputs). A
    launch _mma2 cannot take is planned again for the Triton kernels, on 16-row blocks at least
    (their dot has no 8-row tiles)."""
    blocks = row_blocks(M, E, c.BM)
    p = plan(pol, c, blocks, N, K, sms, which, mma2, fp8)
    steps = mma2_steps(p, K)
    if mma2 and mma2_broken(steps, p.config.num_stages) and not mma2_broken(steps, 3):
        p = p._replace(config=dataclasses.replace(p.config, num_stages=3))  # (a 4-stage loop)
    if mma2 and use_mma2(p.config, major) and not mma2_broken(steps, p.config.num_stages):
        return p, blocks, True
    if c.BM < pol.decode.BM:
        c = fp8_config(pol, pol.decode, sms == 0) if fp8 else pol.decode
        blocks = row_blocks(M, E, c.BM)
    return plan(pol, c, blocks, N, K, sms, which, fp8=fp8), blocks, False


def use_tma(c: TileConfig, major: int, aligned: bool) -> bool:
    """Whether a GEMM with planned config `c` loads its weight tiles by TMA on a GPU of major
    capability `major`: unpaired 128-code steps (the decode rows) on sm90; the descriptor needs
    a 16-byte aligned base (`aligned`). Elsewhere cp.async. ledger: `TMA`"""
    return major == 9 and c.BK == 128 and not c.PAIR and aligned


def use_mma2(c: TileConfig, major: int) -> bool:
    """Whether a GEMM with planned config `c` can run _mma2's kernels on a GPU of compute
    capability `major` (0: the interpreter, which cannot run Gluon): the decode tiles only."""
    return (major >= 8 and _gluon_available() and c.SWAP and c.BM in (8, 16) and c.BN == 64
            and c.num_warps == 4 and not c.PAIR and not c.HALF and not c.EXTRA
            and c.BK in (64, 128))


def use_wgmma(pol: LaunchPolicy, p: Plan, major: int, which: str) -> bool:
    """Whether a Triton-kernel launch of GEMM `which` ("gemm1" or "gemm2") under plan `p` runs
    _wgmma's kernels instead: sm90 (async wgmma), `which` in the policy's `wgmma`, and the
    table's prefill-shaped tiles (BM 128 or 256 rows, BN 128 weight rows, BK 64, 8 warps, one
    unsplit K, no paired tiles; `wgmma_plan` then makes the plan _wgmma's). The caller checks
    bf16 activations and alignment (launches.moe_launches). ledger: `wgmma`"""
    c = p.config
    return (which in pol.wgmma and major == 9 and _gluon_available() and c.SWAP
            and c.BM in (128, 256) and c.BN == 128 and c.BK == 64 and c.num_warps == 8
            and not c.PAIR and p.split == 1)


def use_wgmma_fp8(pol: LaunchPolicy, p: Plan, major: int) -> bool:
    """Whether an FP8 launch under plan `p` (fp8_config's tiles) runs _wgmma_fp8's kernels
    instead of _fp8.py's Triton kernels: sm90, the policy's `fp8_wgmma`, and 128 rows x 128
    weight rows, 128-code steps, 8 warps, one unsplit K, no paired tiles (the prefill and
    mid128 shapes). The caller checks alignment (launches.moe_launches). ledger: `fp8_wgmma`"""
    c = p.config
    return (pol.fp8_wgmma and major == 9 and _gluon_available() and c.SWAP and c.BM == 128
            and c.BN == 128 and c.BK == 128 and c.num_warps == 8 and not c.PAIR
            and not c.EXTRA and p.split == 1)


def wgmma_plan(pol: LaunchPolicy, p: Plan, M: int, E: int, N: int) -> tuple[Plan, int]:
    """-> (plan `p` as _wgmma runs it, row blocks): no merged blocks (EXTRA: they run as two),
    the policy's register cap at 128-row blocks (the table's cap is the Triton kernels'), and
    with `wgmma_wide` every tile as 128 rows x 256 weight rows."""
    c = dataclasses.replace(p.config, EXTRA=0, maxnreg=None)
    if pol.wgmma_wide:
        c = dataclasses.replace(c, BM=128, BN=256)
    if c.BM == 128 and c.BN == 128:
        c = dataclasses.replace(c, maxnreg=pol.wgmma_regs)
    return p._replace(config=c, tiles=-(-N // c.BN)), row_blocks(M, E, c.BM)


def mma2_possible(pol: LaunchPolicy, major: int) -> bool:
    """Whether _mma2 may run at all here (`plan` plans its decode grids for it then)."""
    return pol.mma2 and major >= 8 and _gluon_available()


def mma2_steps(p: Plan, K: int) -> int:
    """K steps of one _mma2 program under plan `p` (its chunk, or the whole K with a tail)."""
    return -(-(p.chunk if p.split > 1 else K) // p.config.BK)


def mma2_broken(steps: int, stages: int) -> bool:
    """Whether Triton 3.6 fails to compile _mma2's K loop of `steps` steps at `stages` pipeline
    stages (an assertion in ConvertTritonGPUToLLVM, for either GEMM, 8- or 16-row blocks, masked
    or not): when the loop, unrolled by `stages`, runs once and leaves fewer than stages - 1
    steps after it (3 stages: 3 or 4 steps; 4 stages: 4 to 6). Such launches run the Triton
    kernels (`plan_gemm`)."""
    return steps // stages == 1 and steps % stages < stages - 1


@functools.lru_cache(maxsize=None)
def _gluon_available() -> bool:
    try:
        from . import _mma2  # noqa: F401
    except ImportError:
        return False
    return True
