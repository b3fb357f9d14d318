"""Tile configs of the "triton" MoE backend, picked by shape on the host (no call-time autotuning).

A config is chosen from the expected rows per touched expert, m_e = T*k / min(E, T*k): the
GEMMs group sorted rows of one expert into blocks of BM rows, so m_e decides how full a block
is. Decode (m_e small) is weight-bandwidth bound: small BM, narrow BN so that every SM streams
some expert's rows. Prefill is tensor-core bound: BM = 128 and wide tiles.
The numbers are from benchmarks/gpu_check.py on an H100 (see benchmarks/NOTES.md).
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
    SWAP: bool = False  # compute (W @ x.T): weight rows on the MMA's M side (small BM)


# (max rows per expert, GEMM1 config, GEMM2 config); first row whose bound >= m_e wins.
_TABLE = (
    (16, TileConfig(16, 32, 128, 4, 4, True), TileConfig(16, 32, 128, 4, 4, True)),
    (32, TileConfig(32, 64, 128, 4, 4, True), TileConfig(32, 64, 128, 4, 4, True)),
    (64, TileConfig(64, 64, 64, 4, 4, True), TileConfig(64, 128, 64, 4, 3, True)),
    (None, TileConfig(128, 128, 64, 8, 3, True), TileConfig(128, 128, 64, 8, 3, True)),
)

# Under the Triton interpreter (CPU tests) small tiles keep numpy fast.
_INTERPRET = (TileConfig(16, 32, 64, 4, 1), TileConfig(16, 32, 64, 4, 1, True))

# Set by benchmarks (sweeps): (GEMM1 config, GEMM2 config) used for every call instead of _TABLE.
OVERRIDE = None


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
            return c1, c2
    raise AssertionError("unreachable")
