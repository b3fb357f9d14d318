"""Tile configs of the "triton" MoE kernel, picked by shape on the host (no call-time autotuning).

The GEMMs group the expert-sorted rows of one expert into blocks of BM rows, so the expected
rows per touched expert, m_e = T*k / min(E, T*k), decides how full a block is. Decode (small m_e)
is weight-bandwidth bound: BM = 16 (the smallest MMA N with the weights on the M side) and narrow
weight tiles so that every SM streams some expert's rows; prefill is tensor-core bound: wide
tiles, and BM 256 where there are enough rows to fill it (each dequantized weight tile then
feeds 256 rows).

Every config keeps BN = 16 x num_warps (one 16-row MMA slab per warp): then the dequantized tile
lands directly in the wgmma A-operand registers. Other shapes (e.g. BN 128 at 4 warps) made
Triton 3.6 route the tile through shared memory again (sm90 SASS: STS.U16 + LDSM every K step;
tests/ops/kernels/test_triton_moe_sass.py checks the table).

Measured on an H100 (benchmarks/gpu_check.py --tuned --candidates v5/v6/v7, 2026-11-24;
benchmarks/NOTES.md "v5"-"v7"; decode BK from v10/v11, session 3), whole forward incl. routing,
same config for both GEMMs:
  m_e <= 8   (16, 64, 128), 4 warps: 128-code steps, gpt-oss
      K = 2880 as 22 steps + one 64-code tail step (`tail`): 20b T=8 161 us vs 187 at BK 64
      and 182 at BK 256; 120b T=64 732 vs 816; Mixtral T=64 540 vs 615 (then). Small grids (T=1)
      step K by 64 instead (`plan`: paired tiles and split K, or one wave of 64-code programs;
      20b T=1 66 us vs 79 at BK 128, Mixtral 130 vs 145). Splitting K at T=8/64 was slower
      everywhere (v11: 20b T=8 167 -> 191 us with GEMM2 split in 2).
  m_e <= 16 when K % 128 == 0   (32, 64, 128), 4 warps: one row block for most experts
      (session 4, v16: Mixtral T=64 431 us vs 552 at BM 16; 20b T=64, m_e 8, 253 vs 231)
  m_e <= 32   (32, 64, 64), 4 warps        120b T=512: 1077 us vs 1316 (64, 128) / 2053 (128, 128)
  larger      (256, 128, 64), 8 warps, if M = T*k >= 8192 (20b T=4096 1863 us, 120b 2902 us,
              Mixtral 5699 us; 128 rows: 2425 / 3238 / 7511 us in v6) and m_e > 128 (with
              HALF, 128-row blocks won at m_e 128 in session 5: _PREFILL_128_MAX_ROWS), else
              (128, 128, 64)
              capped at 128 registers (v13: 20b T=512 441 us vs 507 at (64, 128) and 561
              uncapped; Mixtral T=512 1139 vs 1241 uncapped; no spills in the K loop)
  (v10/v11 re-measured the mid and prefill rows with BK 128, BN 64 at 4 warps and 4 stages:
  nothing beat them by more than run-to-run noise, 2-4%. HALF on the mid rows: 20b T=512 -2.5%,
  120b T=512 -1%, Mixtral T=512 +2%: within noise, and with the register cap GEMM2 spills.
  Register caps at decode (64 or 80 on (16, 64, 128)) moved times by -2..+10% in session 3; after
  the row tiling (session 4, v13 again) 64 registers won, see _DECODE.)
Launch-time plan (`plan`): decode grids smaller than 3 programs per SM split K and pair weight
tiles (two per program); see `plan` and `split_k` for the measurements.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple


@dataclasses.dataclass(frozen=True)
class TileConfig:
    BM: int          # sorted rows (tokens of one expert) per program
    BN: int          # weight rows per program (GEMM1: gate and up rows, BN/2 columns of a)
    BK: int          # reduction step (elements; a multiple of 32: one e8m0 scale per 32)
    num_warps: int
    num_stages: int
    SWAP: bool = False  # compute (W @ x.T): weight rows on the MMA's M side (wgmma needs it here)
    N_FIRST: bool = True  # grid order: weight tiles of one row block side by side (_kernels)
    PAIR: bool = False  # two BN-row weight tiles per program (one loop's bookkeeping for both)
    maxnreg: int | None = None  # register cap per thread (more resident programs), None: ptxas
    HALF: int = 0  # blocks with <= BM/2 rows (an expert's last) run a BM/2-row copy; 2: and
    #                 blocks with <= BM/4 rows a BM/4-row copy
    EXTRA: int = 0  # an expert's last block of <= EXTRA rows merges into the one before it


# 64 registers (ptxas takes 91, no spills at 64): 7 resident programs per SM instead of 5 (ncu:
# the decode GEMMs ran at 30% occupancy, 0.6 issued per scheduler, DRAM at 57-64%). v13 on the
# H100, session 4: Mixtral T=8 326 -> 303 us, 120b T=64 654 -> 627, 20b T=64 226 -> 219,
# 20b T=8 151 -> 152. The 64-code variants `plan` derives for small grids keep ptxas's count.
# 3 stages (session 5): at 64 registers 8 programs fit per SM, 4 stages' shared memory held it
# to 7. gpu_check --launch-ab, 4 vs 3 stages (the 4-stage side is variant dec4 now), medians of
# 3 on the same inputs: 20b T=1 51.7 -> 50.1 us, 120b T=1 51.9 -> 51.0, Mixtral T=1 112.7 ->
# 111.8 (lower in every round), 20b T=64 218.9 -> 217.0; v22 (paired, twice): Mixtral T=8
# GEMM1 308.6 / 310.1 -> 299.8 / 300.0; 20b and 120b T=8 and 120b T=64 within their run-to-run
# spread (6 rounds: 151.0 / 151.9, 194.1 / 198.3, 658.2 / 648.1, rounds spread 4-6%).
_DECODE = TileConfig(16, 64, 128, 4, 3, True, maxnreg=64)
# 8 < m_e <= 16 with K % 128 == 0: 32-row blocks keep most experts to one block, so their
# weights are streamed once, not twice (v16, Mixtral T=64: 431 us vs 552 at BM 16)
_DECODE32 = TileConfig(32, 64, 128, 4, 4, True)
# 128 registers (ptxas takes 149-157): 2 resident programs of 8 warps per SM instead of 1
_MID128 = TileConfig(128, 128, 64, 8, 3, True, maxnreg=128)
_TABLE = (  # (max rows per expert, config); first row whose bound >= m_e wins
    (32, TileConfig(32, 64, 64, 4, 4, True)),
    (None, _MID128),
)
_PREFILL = TileConfig(256, 128, 64, 8, 4, True)  # M >= _PREFILL_ROWS and m_e > 64
_PREFILL_ROWS = 8192
# ... but experts of about 128 rows (m_e <= 128) take 128-row blocks: at BM 256 an expert of
# 129-160 rows runs one block at up to half waste. v20 (session 5, HALF on both): 120b T=4096
# (m_e 128) 2397.9 -> 2250.9 us; at m_e 512 (20b T=4096) 256 rows stay ahead, 1648.9 vs 1822.0.
# m_e between 128 and 512 is not measured and keeps 256.
_PREFILL_128_MAX_ROWS = 128
# HALF (an expert's last block, when it holds <= BM/2 rows, runs on BM/2 rows) where such blocks
# are a large share: about E of the T*k/BM + E blocks are an expert's last. Measured (v12,
# prefill config): 120b T=4096 (share 0.67) 2798 -> 2513 us, 120b T=16384 (0.33) 7157 -> 6911,
# 20b T=4096 (0.33) 1797 -> 1754; 20b T=16384 (0.11) 6173 -> 6136, and Mixtral (E = 8: 0.2 at
# T=4096, 0.06 at 16384) 1-4% slower with it (the second copy of the loop is not free).
HALF_SHARE = 0.25
# copies of the block body for part-filled blocks: 1 (BM/2 rows), 2 (and BM/4)
HALF_LEVELS = 2
# GEMM2 of an unsplit K (the Triton kernels) writes each assignment's output rounded to the
# hidden dtype (bf16: half the bytes of float32 written, and read again by the combine). H100,
# session 9 (gpu_check --launch-ab, medians of 3, one input draw, us), float32 -> bf16: 120b
# T=4096 2126.2 -> 2051.7, T=16384 6616.9 -> 6492.1, 20b T=4096 1654.5 -> 1574.3, Mixtral
# T=4096 5051.3 -> 5057.0 (its y is small next to its FLOPs). Split K keeps float32 partials.
# The extra rounding moves rel-L2 against the float32 reference from 2.55e-3 to 3.2e-3.
Y_HIDDEN_DTYPE = True
# Prefill at 128-row blocks: an expert's last block of at most BM / MERGE_DIV rows merges into
# the block before it (TileConfig.EXTRA; _kernels._block_info), whose weight tiles are then
# dequantized once for all its rows, not once per block. 120b T=4096 has about 128 rows per
# expert, and about half the experts 129-160: their second block (1-32 rows) dequantized the
# whole expert again. H100, session 9 (launch-ab as above): 120b T=4096 2126.3 -> 2048.7 (float32
# y), 2135.0 -> 2051.7 (bf16 y); BM/2 groups (three MMAs of 64 rows, 168 bytes of spills at the
# 128-register cap) 2729.3. At 256-row blocks (EXTRA 64, no cap) it lost: 20b T=4096 1602.3 ->
# 1624.9, Mixtral T=4096 5096.5 -> 5225.1. 0: off; 2 or 4.
MERGE_DIV = 4
# ... and the experts with a merged (longer) block run first, so that the grid's last programs
# are short ones and the GPU drains more evenly (_kernels._block_info). H100, session 9
# (launch-ab, 5 rounds, one draw): 120b T=4096 2027.7 us in expert order, 1980.3 merged first.
MERGED_FIRST = True

# Under the Triton interpreter (CPU tests) small tiles keep numpy fast.
_INTERPRET = (TileConfig(16, 32, 64, 4, 1), TileConfig(16, 32, 64, 4, 1, True))

# Set by benchmarks (sweeps): (GEMM1 config, GEMM2 config) used for every call instead of _TABLE.
OVERRIDE = None
# Set by tests and sweeps: (GEMM1 split, GEMM2 split) instead of split_k's choice.
SPLIT_OVERRIDE = None
_SPLIT_INDEX = {"gemm1": 0, "gemm2": 1}

# Split-K: a GEMM with fewer programs than PROGRAMS_PER_SM x SMs (decode: few experts, few
# output tiles) splits K into chunks of at least MIN_STEPS_PER_CHUNK steps, summed afterwards
# in chunk order (deterministic). Resources allow ~8 decode programs per SM (56 registers,
# 15 kB shared memory at 4 warps); gpt-oss T=1 has 360 + 180 programs on 132 SMs. Measured (v5):
# 20b T=1 96 -> 72 us with the split; a target of 6 per SM also split GEMM2 at T=8 and made it
# slower (195 -> 227 us), 3 per SM leaves T >= 8 unsplit.
PROGRAMS_PER_SM = 3
# once a GEMM splits: chunks enough for this many programs per SM (v15, T=1: 3 -> 5 / 8 made
# 20b 59 -> 77 / 75 us, Mixtral GEMM2 150 -> 177 / 150)
SPLIT_TARGET_PER_SM = 3
# Decode grids of RESIDENT_PER_SM (what fit at once at 128-code steps with 92 registers, 4 warps;
# _DECODE's 64-register cap now fits 7: this rule was measured before the cap and is kept as
# it was) up to ONE_WAVE_PER_SM programs per SM step K by 64 (`plan`): one wave instead of 1-2.
# The upper bound stays below the ~9 programs that fit at 64-code steps because `blocks` counts
# the worst case (Mixtral T=64 GEMM2: 1024 programs in the grid, 512 with rows; BK 128 measured
# there).
RESIDENT_PER_SM = 5
ONE_WAVE_PER_SM = 7
MIN_STEPS_PER_CHUNK = 4
# K chunks of a GEMM2 decode grid of 3-5 programs per SM (`plan`; Mixtral T=8)
GEMM2_MID_SPLIT = 8


# Kernels launched with programmatic dependent launch on sm90+ (triton_moe._pdl). Not GEMM2:
# launched while GEMM1's programs still hold the SMs, its programs land unevenly. H100, session
# 5 (gpu_check --launch-ab, whole forward, medians of 3): all five kernels gave 20b T=1 53.1 ->
# 50.6 us, 120b T=1 54.1 -> 51.6, but Mixtral T=1 113.7 -> 121.7 and T=8 319 -> 336; without
# GEMM2: 50.9, 52.2, 112.9, 316, and T=64 within run-to-run noise (20b 219.4 -> 219.0).
# Triggering after the GEMMs' K loop instead was in between at T=1 (51.9, 52.6, 112.8).
PDL_LAUNCH = frozenset({"route", "gemm1", "act", "finalize"})


# Weight tiles through the tensor memory accelerator (_kernels._load_words_tma) on sm90, for
# unpaired 128-code steps: the decode rows (a K with a 64-code tail step, gpt-oss 2880, loads
# the tail through a second descriptor). Session 6, gpu_check --launch-ab on one input draw per
# seed, three seeds (medians of 3, us), cp.async -> TMA: Mixtral T=8 258.8 / 329.0 / 310.3 ->
# 254.2 / 325.0 / 307.6, T=64 406.2 / 407.5 / 412.4 -> 394.2 / 395.2 / 394.6; 20b T=8
# 144.5 / 151.1 / 152.1 -> 144.5 / 150.3 / 150.4, T=64 216.7 / 216.8 / 216.7 -> 214.6 / 214.6 /
# 214.5; 120b T=8 197.7 / 195.1 / 195.6 -> 194.2 / 191.6 / 191.8, T=64 628.8 / 642.2 / 646.2 ->
# 614.8 / 627.6 / 640.3. Slower where it was also tried (fresh draws per variant): T=1's paired
# 64-code steps (Mixtral 112.5 -> 121.9, 20b 50.8 -> 52.2), the 64-code mid and prefill tiles
# (20b T=512 413.7 -> 430.9, 120b T=4096 2274 -> 2339). False: cp.async everywhere.
TMA = True


def use_tma(c: TileConfig, major: int, words) -> bool:
    """Whether a GEMM with planned config `c` (prepared int32 words `words`) loads its weight
    tiles by TMA: see TMA. The descriptor needs a 16-byte aligned base."""
    return TMA and major == 9 and c.BK == 128 and not c.PAIR and words.data_ptr() % 16 == 0


# Decode tiles through _mma2 (Gluon, mma.sync, explicit register layouts) instead of the Triton
# kernels' wgmma, where `use_mma2` and `plan_gemm` allow: 183 instructions per 64 x 128 K step
# (sm90 SASS, Mixtral GEMM1; 170 with 8-row blocks) against 295 (TMA) / 274 (cp.async). Session 7
# on the H100 (gpu_check --launch-ab, medians of 3 on one input draw, whole forward, us), Triton
# kernels -> _mma2 (its first version, 241 instructions per step; benchmarks/NOTES.md for later):
# Mixtral T=1 113.6 -> 95.2, T=8 296.6 -> 271.7; 20b T=1 49.8 -> 49.2, T=8 142.8 -> 130.3,
# T=64 213.3 -> 194.3; 120b T=1 51.1 -> 50.8, T=8 190.0 -> 183.3, T=64 634.5 -> 623.5.
# Its cp.async pipeline has 3 stages (4: Mixtral T=8 269.9, 20b T=8 133.6, T=64 195.9).
MMA2 = True
# Small decode grids (T=1) under _mma2: 128 (or 64) runs _mma2 unpaired at that K step with
# split K; 0 keeps the Triton kernels' paired 64-code tiles (20b 49.2 / 48.8 / 49.4 us for
# 128 / 64 / 0, 120b 50.8 / 49.7 / 51.0, Mixtral 95.2 / 99.1 / 101.1).
# MMA2_WAVE128: grids of 5-7 programs per SM keep 128-code steps under _mma2 (the Triton kernels
# step by 64 there; Mixtral T=1 95.2 against 100.7 us).
# MMA2_BM32: the 32-row decode tiles (8 < m_e <= 16) on _mma2 too. Off: twice the mma.sync work
# per weight byte and 6 programs per SM (38 kB of shared memory) made Mixtral T=64 slower,
# 420.5 us against 384.3 on the Triton kernels' wgmma.
MMA2_SMALL = 128
MMA2_WAVE128 = True
MMA2_BM32 = False
# Blocks of 8 rows (mma.sync's smallest N) where experts hold at most MMA2_BM8_ROWS rows on
# average (T=1, gpt-oss T=8, Mixtral T=8): half the MMA and activation work of 16-row blocks
# (170 instructions per 128-code step against 183). 0: off.
MMA2_BM8_ROWS = 2
_DECODE8 = TileConfig(8, 64, 128, 4, 3, True)
# Under _mma2 a decode grid splits K below this many programs per SM (PROGRAMS_PER_SM for the
# Triton kernels): 2 leaves gpt-oss T=1's GEMM1 (360 programs) unsplit, activation fused, no
# act kernel: 20b T=1 45.3 -> 43.5 us, 120b 46.9 -> 44.7 (Mixtral, unchanged grids, 90.3 / 90.7).
MMA2_PROGRAMS_PER_SM = 2
# Under _mma2 a split chunk has at least this many K steps: gpt-oss T=1's GEMM2 (23 steps of 128)
# then runs 2 chunks, not 3 (SPLIT_TARGET_PER_SM; H100, launch-ab, fused router: 20b 29.3 ->
# 28.8 us, 120b 29.3 -> 29.0). A lower split target for all GEMMs did the same there but cost
# Mixtral T=1 (73.2 -> 74.3, 112-step GEMM2 in 3 chunks, not 4), which this leaves alone.
MMA2_MIN_STEPS_PER_CHUNK = 10
# _mma2 grids of fewer than this many programs per SM run 4 pipeline stages instead of 3: more
# bytes in flight where few programs share an SM (gpt-oss T=1: 360 programs per GEMM, Mixtral
# T=1's GEMM2 512, on 132 SMs). H100, session 9 (launch-ab, medians of 5, every round alike),
# 3 stages / 4 below 3 per SM / 4 below 5 per SM: 20b T=1 28.9 / 28.2 / 28.1 us, 120b 29.1 /
# 28.2 / 28.3, Mixtral 73.5 / 73.4 / 73.2.
MMA2_DEEP_PER_SM = 5
# One token (T=1) with both GEMMs on _mma2: each row block is one assignment, its expert read from
# the top-k ids (k distinct experts), so no route launch (_mma2._direct_info). H100 (launch-ab,
# session 8, fused router): 20b 33.9 -> 31.2 us, 120b 33.9 -> 30.9, Mixtral 76.4 -> 74.8.
MMA2_DIRECT = True
# sm90, GEMM1 on _mma2: it lets GEMM2 launch (programmatic) once all its programs are past their
# K loops, and GEMM2 launches that way (20b T=1 30.5 -> 29.8 us, T=8 116.5 -> 115.2, 120b T=64
# 556.6 -> 543.3, Mixtral T=1 74.5 -> 73.7; a GEMM2 launched so behind a GEMM1 that triggers at
# its start took SM slots GEMM1 still needed: 20b T=1 36.2 us, Mixtral 86.1).
MMA2_LATE_TRIGGER = True


def use_mma2(c: TileConfig, major: int) -> bool:
    """Whether a GEMM with planned config `c` runs _mma2's kernels on a GPU of compute capability
    `major` (0: the interpreter, which cannot run Gluon)."""
    return (mma2_possible(major) and c.SWAP and (c.BM in (8, 16) or (c.BM == 32 and MMA2_BM32))
            and c.BN == 64 and c.num_warps == 4 and not c.PAIR and not c.HALF
            and not c.EXTRA and c.BK in (64, 128))


def mma2_steps(p: "Plan", K: int) -> int:
    """K steps of one _mma2 program under plan `p` (its chunk, or the whole K with a tail)."""
    return -(-(p.chunk if p.split > 1 else K) // p.config.BK)


def mma2_broken(steps: int, stages: int) -> bool:
    """Whether Triton 3.6 fails to compile _mma2's K loop of `steps` steps at `stages` pipeline
    stages (an assertion in ConvertTritonGPUToLLVM, for either GEMM, 8- or 16-row blocks, masked
    or not): when the loop, unrolled by `stages`, runs once and leaves fewer than stages - 1
    steps after it (3 stages: 3 or 4 steps; 4 stages: 4 to 6; compiled here for sm90). Such
    launches run the Triton kernels (`plan_gemm`)."""
    return steps // stages == 1 and steps % stages < stages - 1


def plan_gemm(c: TileConfig, M: int, E: int, N: int, K: int, sms: int, which: str,
              mma2: bool, major: int):
    """-> (Plan, row blocks, whether _mma2 runs it) for one GEMM of M sorted rows over E
    experts with table config `c`; mma2: _mma2 can run here (mma2_possible, aligned inputs). A
    launch _mma2 cannot take is planned again for the Triton kernels, on 16-row blocks at least
    (their dot has no 8-row tiles)."""
    blocks = min(M, M // c.BM + E)  # worst case (surplus programs exit at once)
    p = plan(c, blocks, N, K, sms, which, mma2)
    steps = mma2_steps(p, K)
    if mma2 and mma2_broken(steps, p.config.num_stages) and not mma2_broken(steps, 3):
        p = p._replace(config=dataclasses.replace(p.config, num_stages=3))  # (a 4-stage loop)
    if mma2 and use_mma2(p.config, major) and not mma2_broken(steps, p.config.num_stages):
        return p, blocks, True
    if c.BM < _DECODE.BM:
        c = _DECODE
        blocks = min(M, M // c.BM + E)
    return plan(c, blocks, N, K, sms, which), blocks, False


def mma2_possible(major: int) -> bool:
    """Whether _mma2 can run at all here (`plan` plans its decode grids for it then)."""
    return MMA2 and major >= 8 and _gluon_available()


def _gluon_available() -> bool:
    try:
        from . import _mma2  # noqa: F401
    except ImportError:
        return False
    return True


class Plan(NamedTuple):
    """How one GEMM launches (`plan`)."""
    config: TileConfig
    tiles: int    # weight tiles along N per row block (BN rows each, 2 BN with PAIR)
    split: int    # K chunks (grid axis 1)
    chunk: int    # K elements per chunk, a multiple of BK
    tail: int     # the narrower last K step of an unsplit GEMM (`tail`), 0: none
    even_k: bool  # whole steps only: no K mask in the loop


def plan(c: TileConfig, blocks: int, N: int, K: int, sms: int, which: str,
         mma2: bool = False) -> Plan:
    """-> the Plan of one GEMM of `blocks` row blocks x N weight rows over K.
    A decode grid too small for the GPU (the split-K case) steps K by 64 and pairs weight
    tiles: the split restores the program count, and each program then runs one loop's
    bookkeeping for two tiles (v8 on the H100: gpt-oss T=1 69.2 -> 63.8 us; where the grid is
    big enough unpaired, pairing only halved it: 20b T=8 187 -> 213 us). 128-code steps lose
    there: split K masks every step (no tail step), and paired BK 128 was slower in every case
    (20b T=1 78 -> 83 us, Mixtral T=1 141 -> 160 us).
    A decode grid that fits one wave of 64-code programs (about 9 per SM by registers) but not
    of 128-code ones (5 per SM before _DECODE's register cap; RESIDENT_PER_SM) steps K by 64
    too: Mixtral T=1 GEMM1 (2 x 448 = 896 programs), forward 149 -> 133 us (v10 and the
    session-3 follow-up run).
    A GEMM2 decode grid between those two (3-5 programs per SM) splits K into GEMM2_MID_SPLIT
    chunks of at least MIN_STEPS_PER_CHUNK steps, at 3 stages: unsplit, one wave of 4-5 long
    programs per SM cannot even out slow SMs (Mixtral T=8 GEMM2, 576 programs: 29% behind a
    plain reader of the same grid, gpu_check --diag-reader). Session 5 split it in 2 (v21:
    314.9 / 313.8 -> 303.0 / 303.2 us); session 6, launch-ab on one input draw per seed, three
    seeds (the draw alone moves this shape by 10%): 2 chunks 311.2 / 290.5 / 282.4 us, 4 chunks
    302.3 / 286.8 / 280.0, 8 chunks 301.2 / 283.8 / 275.5; 4 stages 305.9 / 290.5 / 283.9."""
    force_split = None
    if OVERRIDE is None and c.BM in (_DECODE8.BM, _DECODE.BM) and not c.PAIR:
        programs = blocks * -(-N // c.BN)
        if programs < (MMA2_PROGRAMS_PER_SM if mma2 else PROGRAMS_PER_SM) * sms:
            if not (mma2 and MMA2_SMALL):
                c = dataclasses.replace(c, BK=64, PAIR=True, maxnreg=None)
            elif MMA2_SMALL == 64:
                c = dataclasses.replace(c, BK=64)
        elif (which == "gemm2" and programs < RESIDENT_PER_SM * sms
              and K >= 2 * MIN_STEPS_PER_CHUNK * c.BK):
            c = dataclasses.replace(c, num_stages=3)
            force_split = min(GEMM2_MID_SPLIT, -(-K // c.BK) // MIN_STEPS_PER_CHUNK)
        elif RESIDENT_PER_SM * sms <= programs < ONE_WAVE_PER_SM * sms and not (
                mma2 and MMA2_WAVE128):
            c = dataclasses.replace(c, BK=64, maxnreg=None)
    tiles = -(-N // (c.BN * (2 if c.PAIR else 1)))
    split, chunk = split_k(blocks * tiles, K, c.BK, sms, which, force_split,
                           MMA2_PROGRAMS_PER_SM if mma2 else PROGRAMS_PER_SM,
                           MMA2_MIN_STEPS_PER_CHUNK if mma2 else MIN_STEPS_PER_CHUNK)
    if mma2 and blocks * tiles * split < MMA2_DEEP_PER_SM * sms:
        c = dataclasses.replace(c, num_stages=4)
    t = tail(K, c.BK) if split == 1 else 0  # split chunks mask their steps instead
    return Plan(c, tiles, split, chunk, t, split * chunk == K or t > 0)


def split_k(programs: int, K: int, BK: int, sms: int, which: str = "gemm1",
            want: int | None = None, per_sm: int = PROGRAMS_PER_SM,
            min_steps: int = MIN_STEPS_PER_CHUNK):
    """-> (number of K chunks, chunk length in elements, a multiple of BK); `want`: this many
    chunks (plan's choice) unless SPLIT_OVERRIDE says otherwise; none for grids of at least
    `per_sm` programs per SM; else chunks of at least `min_steps` steps."""
    steps = -(-K // BK)
    if SPLIT_OVERRIDE is not None:
        want = SPLIT_OVERRIDE[_SPLIT_INDEX[which]]
    elif want is None:
        if programs >= per_sm * sms:
            return 1, steps * BK
        want = -(-SPLIT_TARGET_PER_SM * sms // max(1, programs))
        want = min(want, steps // min_steps)
    want = max(1, min(want, steps))
    per = -(-steps // want)
    return -(-steps // per), per * BK


def tail(K: int, BK: int) -> int:
    """The K step an unsplit GEMM adds after its whole BK steps (0: none). K a multiple of 64
    whose remainder is 64 or 128 (gpt-oss 2880 at BK 128: 22 steps + 64) runs every whole step
    unmasked and one narrower step at the end; other remainders, and split K, mask every step."""
    r = K % BK
    return r if r in (64, 128) else 0


def rows_per_expert(T: int, k: int, E: int) -> float:
    m = T * k
    return m / max(1, min(E, m))


def pick(T: int, k: int, E: int, Hp: int, Ip: int, interpret: bool = False,
         mma2: bool = False):
    """-> (GEMM1 config, GEMM2 config) for this call's shape. GEMM1's BN counts weight rows
    (gate and up: BN/2 intermediate columns); its K is Hp, GEMM2's is Ip. mma2: both GEMMs can
    run _mma2 (mma2_possible, bf16 activations), which has 8-row decode blocks."""
    if OVERRIDE is not None:
        return OVERRIDE
    if interpret:
        return _INTERPRET
    m_e = rows_per_expert(T, k, E)
    if mma2 and m_e <= MMA2_BM8_ROWS:
        return _DECODE8, _DECODE8
    if m_e <= 8:
        return _DECODE, _DECODE
    if m_e <= 16 and Hp % 128 == 0 and Ip % 128 == 0:
        return _DECODE32, _DECODE32
    if m_e > 64 and T * k >= _PREFILL_ROWS:
        c = _PREFILL if m_e > _PREFILL_128_MAX_ROWS else _MID128
        if E / (T * k / c.BM + E) >= HALF_SHARE:
            c = dataclasses.replace(c, HALF=HALF_LEVELS)
        if MERGE_DIV and c.BM == 128:
            c = dataclasses.replace(c, EXTRA=c.BM // MERGE_DIV)
        return c, c
    for bound, c in _TABLE:
        if bound is None or m_e <= bound:
            return c, c
    raise AssertionError("unreachable")
