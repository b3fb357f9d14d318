"""Tile configs of the "triton" MoE backend, picked by shape on the host (no call-time autotuning).

The GEMMs group the expert-sorted rows of one expert into blocks of BM rows, so the expected
rows per touched expert, m_e = T*k / min(E, T*k), decides how full a block is. Decode (small m_e)
is weight-bandwidth bound: BM = 16 (the smallest tensor-core tile) and narrow BN so that every
SM streams some expert's rows; prefill is tensor-core bound: BM = 128, wide tiles.

Measured on an H100 (benchmarks/gpu_check.py --tuned and --candidates decode2, 2026-11-24;
benchmarks/NOTES.md, "v3"/"v4"): the full forward timed for each candidate at gpt-oss-20b /
-120b / Mixtral shapes and T in {1, 8, 64, 512, 4096}, the same config for both GEMMs; winners:
  m_e <= 8   (16, 64, BK) wgmma, W as operand A, BK = 64 when K % 128 != 0 (gpt-oss K = 2880:
             20b T=1 84 us, T=64 304 us, 120b T=8 286 us with BK 64, vs 97 / 425 / 395 with
             BK 128), else 128 (Mixtral T=1/8: 199 / 510 us; BK 64 not measured there)
  m_e <= 32  (32, 64, 128)                     120b T=512, Mixtral T=64
  m_e <= 64  (64, 64, 64)                      20b T=512
  larger     (128, 128, 64), 8 warps, 3 stages T=4096 all, Mixtral T=512
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class TileConfig:
    BM: int          # sorted rows (tokens of one expert) per program
    BN: int          # output columns per program (GEMM1: intermediate columns, gate+up both)
    BK: int          # reduction step (elements; a multiple of 32: one e8m0 scale per 32)
    num_warps: int
    num_stages: int
    SWAP: bool = False  # compute (W @ x.T): weight rows on the MMA's M side (wgmma needs it here)
    N_FIRST: bool = True  # grid order: weight tiles of one row block side by side (_kernels)


# (max rows per expert, GEMM1 config, GEMM2 config); first row whose bound >= m_e wins. GEMM1's
# BN counts weight rows (gate and up: BN/2 intermediate columns). BK of the decode row is
# replaced by 64 where that GEMM's K is not a multiple of 128 (see above).
_TABLE = (
    (8, TileConfig(16, 64, 128, 4, 4, True), TileConfig(16, 64, 128, 4, 4, True)),
    (32, TileConfig(32, 64, 128, 4, 4, True), TileConfig(32, 64, 128, 4, 4, True)),
    (64, TileConfig(64, 64, 64, 4, 4, True), TileConfig(64, 64, 64, 4, 4, True)),
    (None, TileConfig(128, 128, 64, 8, 3, True), TileConfig(128, 128, 64, 8, 3, True)),
)

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
# 15 kB shared memory at 4 warps), and without the split the grid left most of them idle.
PROGRAMS_PER_SM = 3
MIN_STEPS_PER_CHUNK = 4


def split_k(programs: int, K: int, BK: int, sms: int, which: str = "gemm1"):
    """-> (number of K chunks, chunk length in elements, a multiple of BK)."""
    steps = -(-K // BK)
    if SPLIT_OVERRIDE is not None:
        want = SPLIT_OVERRIDE[_SPLIT_INDEX[which]]
    else:
        want = -(-PROGRAMS_PER_SM * sms // max(1, programs))
        want = min(want, steps // MIN_STEPS_PER_CHUNK)
    want = max(1, min(want, steps))
    per = -(-steps // want)
    return -(-steps // per), per * BK


def rows_per_expert(T: int, k: int, E: int) -> float:
    m = T * k
    return m / max(1, min(E, m))


def pick(T: int, k: int, E: int, Hp: int, Ip: int, interpret: bool = False):
    """-> (GEMM1 config, GEMM2 config) for this call's shape."""
    if OVERRIDE is not None:
        return OVERRIDE
    if interpret:
        return _INTERPRET
    m_e = rows_per_expert(T, k, E)
    for bound, c1, c2 in _TABLE:
        if bound is None or m_e <= bound:
            if bound == 8:  # decode: a K step that divides K avoids masked loads
                return (c1 if Hp % c1.BK == 0 else dataclasses.replace(c1, BK=64),
                        c2 if Ip % c2.BK == 0 else dataclasses.replace(c2, BK=64))
            return c1, c2
    raise AssertionError("unreachable")
