"""Launch policy of the "triton" MoE kernel: every tuned value as data, one frozen table per
device, read by the planner (planner.py) on the host at each call (no call-time autotuning).

- `SM90` was measured on an H100 (also serves the H200: same SMs and shared memory, more and
  faster HBM). Each value carries a one-line why; its evidence (command, date, commit, before
  -> after) is the row of the same name in the decision ledger of benchmarks/NOTES.md.
- Every other capability (sm80-89, sm100 and newer when FlashInfer is absent) gets `UNTUNED`:
  the same values, marked untuned, with one log line saying so. Nothing here was measured there.
- Tests and benchmarks change values for a scope only: ``with override(tiles=..., split=...)``.

Rows per expert, m_e = T*k / min(E, T*k), decide the tile: decode (small m_e) is weight-bandwidth
bound (BM 8 or 16 rows, narrow weight tiles so that every SM streams some expert's rows); prefill
is tensor-core bound (wide tiles, BM 256 where the rows fill them). Every config keeps BN = 16 x
num_warps (one 16-row MMA slab per warp): then the dequantized tile lands directly in the wgmma
A-operand registers (other shapes made Triton 3.6 route it through shared memory;
tests/ops/kernels/test_triton_moe_sass.py checks every config of the table).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import logging

log = logging.getLogger("mxfp4_compile")


@dataclasses.dataclass(frozen=True)
class TileConfig:
    BM: int          # sorted rows (tokens of one expert) per program
    BN: int          # weight rows per program (GEMM1: gate and up rows, BN/2 columns of a)
    BK: int          # reduction step (elements; a multiple of 32: one e8m0 scale per 32)
    num_warps: int
    num_stages: int
    SWAP: bool = False  # compute (W @ x.T): weight rows on the MMA's M side (wgmma needs it here)
    PAIR: bool = False  # two BN-row weight tiles per program (one loop's bookkeeping for both)
    maxnreg: int | None = None  # register cap per thread (more resident programs), None: ptxas
    HALF: int = 0  # blocks with <= BM/2 rows (an expert's last) run a BM/2-row copy; 2: and
    #                 blocks with <= BM/4 rows a BM/4-row copy
    EXTRA: int = 0  # an expert's last block of <= EXTRA rows merges into the one before it


@dataclasses.dataclass(frozen=True, kw_only=True)
class LaunchPolicy:
    """The values the planner reads. `tuned_on` names the card a table was measured on (None:
    untuned). Per-SM counts are programs per streaming multiprocessor."""
    tuned_on: str | None
    # -- tile table, by rows per expert m_e (planner.pick) --
    decode8: TileConfig      # m_e <= mma2_bm8_max_rows, both GEMMs on _mma2
    decode: TileConfig       # m_e <= decode_max_rows
    decode32: TileConfig     # m_e <= decode32_max_rows when K % 128 == 0
    mid: TileConfig          # m_e <= mid_max_rows
    mid128: TileConfig       # larger m_e; prefill at m_e <= prefill128_max_rows
    prefill: TileConfig      # m_e > prefill_min_rows_per_expert and M >= prefill_min_rows
    interpret: tuple[TileConfig, TileConfig]  # (GEMM1, GEMM2) under the Triton interpreter
    mma2_bm8_max_rows: float
    decode_max_rows: float
    decode32_max_rows: float
    mid_max_rows: float
    prefill_min_rows_per_expert: float
    prefill_min_rows: int
    prefill128_max_rows: float
    half_share: float        # HALF copies where an expert's last blocks are this share of all
    half_levels: int         # HALF copies: 1 (BM/2 rows) or 2 (and BM/4)
    merge_div: int           # EXTRA = BM / merge_div at 128-row prefill blocks; 0: off
    y_hidden_dtype: bool     # unsplit GEMM2 writes y in the hidden dtype (else float32)
    # -- grid shaping at decode (planner.plan / split_k) --
    programs_per_sm: int     # Triton GEMM grids below this split K
    split_target_per_sm: int  # a split restores this many programs per SM
    resident_per_sm: int     # 128-code decode programs that fit at once (pre-cap measurement)
    one_wave_per_sm: int     # grids up to this step K by 64 (one wave of 64-code programs)
    min_steps_per_chunk: int  # K steps per split chunk, at least
    gemm2_mid_split: int     # K chunks of a GEMM2 grid of resident_per_sm.. programs per SM
    pdl_launch: frozenset[str]  # kernels launched as programmatic dependents (sm90+)
    # -- the Gluon decode kernels (_mma2) --
    mma2: bool               # decode tiles on _mma2 where it can run (False: Triton kernels)
    mma2_programs_per_sm: int  # _mma2 grids below this split K
    mma2_min_steps_per_chunk: int
    mma2_deep_per_sm: int    # _mma2 grids below this run 4 cp.async stages, not 3
    mma2_direct: bool        # T=1: _mma2 reads each assignment's expert from the ids, no route
    # -- the Gluon prefill kernels (_wgmma) --
    wgmma: frozenset[str]    # GEMMs ("gemm1", "gemm2") whose prefill and mid128 tiles run
    #                          _wgmma (sm90; the others, and all when empty: Triton kernels)
    wgmma_regs: int | None   # _wgmma's register cap at 128-row blocks (None: ptxas decides)
    wgmma_wide: bool         # _wgmma runs its tiles as 128 rows x 256 weight rows (each
    #                          activation tile feeds twice the weight rows)
    # -- FP8 activations (_fp8.py): the table's tile for the shape, then these --
    fp8_bk: int              # K step of every FP8 GEMM (one fp32 promotion per step)
    fp8_max_bm: int          # BM cap: the step's partial sum is a second accumulator
    fp8_wgmma: bool          # the 128 x 128 FP8 tiles on _wgmma_fp8 (sm90; False: _fp8.py's
    #                          Triton kernels)
    # -- routing --
    route_sort_max: int      # up to this many assignments: one program sorts them all
    route_budget: int        # elements of one routing program's [chunk, EB] one-hot tile
    route_scan_chunks: int   # chunked routing of this many chunks scans counts in its own launch
    # -- forced choices (tests and sweeps only; None: the table and the planner decide) --
    tiles: tuple[TileConfig, TileConfig] | None = None  # (GEMM1, GEMM2) for every call
    split: tuple[int, int] | None = None                # (GEMM1, GEMM2) K chunks

    def __post_init__(self):
        for name in ("pdl_launch", "wgmma"):  # sets of step names: membership tests, hashable
            v = getattr(self, name)
            if not isinstance(v, frozenset):
                raise TypeError(f"LaunchPolicy.{name} must be a frozenset of step names, got "
                                f"{v!r}; e.g. {name}=frozenset({{'gemm1'}})")

    def __hash__(self):
        # computed once: a policy keys the per-shape launch cache at every call
        h = self.__dict__.get("_hash")
        if h is None:
            h = hash(dataclasses.astuple(self))
            object.__setattr__(self, "_hash", h)
        return h


# Each value's evidence (command, date, commit, before -> after) is the ledger row of the same
# name in benchmarks/NOTES.md; the comments say why.
SM90 = LaunchPolicy(
    tuned_on="H100 80GB HBM3 (sm90)",
    # Tiles. decode8: mma.sync's smallest N, half the MMA work of 16-row blocks. decode: 128-code
    # steps (+ a 64-code tail at K = 2880), 64 registers for 7 resident programs per SM, not 5.
    # decode32: one 32-row block per expert streams its weights once. mid: 64-code steps at
    # 16 < m_e <= 32. mid128: 128 registers, 2 resident 8-warp programs per SM, not 1. prefill:
    # each dequantized weight tile feeds 256 rows. interpret: small tiles, little numpy work.
    decode8=TileConfig(8, 64, 128, 4, 3, True),
    decode=TileConfig(16, 64, 128, 4, 3, True, maxnreg=64),
    decode32=TileConfig(32, 64, 128, 4, 4, True),
    mid=TileConfig(32, 64, 64, 4, 4, True),
    mid128=TileConfig(128, 128, 64, 8, 3, True, maxnreg=128),
    prefill=TileConfig(256, 128, 64, 8, 4, True),
    interpret=(TileConfig(16, 32, 64, 4, 1), TileConfig(16, 32, 64, 4, 1, True)),
    # Row bounds: 8-row blocks at <= 2 rows per expert (T=1, gpt-oss T=8, Mixtral T=8); one
    # 16-row block holds <= 8; 32-row blocks only where one then holds an expert (<= 16);
    # 16..32 has no benchmark shape (unmeasured). Prefill tiles need >= 64 rows per expert to
    # fill a block and 8192 rows in all to fill the GPU; experts of about 128 rows take 128-row
    # blocks (at 256, experts of 129-160 rows waste half a block).
    mma2_bm8_max_rows=2, decode_max_rows=8, decode32_max_rows=16, mid_max_rows=32,
    prefill_min_rows_per_expert=64, prefill_min_rows=8192, prefill128_max_rows=128,
    # Part-filled blocks: the BM/2 (and BM/4) copies of the body pay where an expert's last
    # blocks are >= 1/4 of all (gpt-oss), and cost where they are few (Mixtral); a last block of
    # <= BM/4 = 32 rows joins the one before it, whose weight tiles are dequantized once.
    half_share=0.25, half_levels=2, merge_div=4,
    # y in bf16: half the bytes written and re-read by the combine; rel-L2 against the float32
    # reference 2.55e-3 -> 3.2e-3.
    y_hidden_dtype=True,
    # Decode grids: below 3 programs per SM split K back to 3 per SM, chunks of >= 4 steps (more
    # partial sums cost more than idle SMs); 5 = 128-code programs resident before the register
    # cap; up to 7 per SM one wave of 64-code programs; a GEMM2 of 3-5 per SM in 8 chunks (one
    # wave of long programs cannot even out slow SMs: Mixtral T=8).
    programs_per_sm=3, split_target_per_sm=3, resident_per_sm=5, one_wave_per_sm=7,
    min_steps_per_chunk=4, gemm2_mid_split=8,
    # Not GEMM2: launched while GEMM1 still holds the SMs, its programs land unevenly (except
    # behind an _mma2 GEMM1, which triggers after its K loops: launches.moe_launches).
    pdl_launch=frozenset({"route", "gemm1", "act", "finalize"}),
    # _mma2: ~180 instructions per 64 x 128 K step against ~290 for the Triton kernels; below 2
    # per SM split (gpt-oss T=1's GEMM1, 360 programs, stays unsplit with its activation fused),
    # chunks of >= 10 steps (gpt-oss T=1's GEMM2 in 2, not 3); 4 stages below 5 per SM (more
    # bytes in flight where few programs share an SM); T=1 reads the ids (k distinct experts:
    # no route launch).
    mma2=True, mma2_programs_per_sm=2, mma2_min_steps_per_chunk=10, mma2_deep_per_sm=5,
    mma2_direct=True,
    # _wgmma (decode step i+1 while wgmma i runs) was not faster than the Triton kernels at any
    # gpt-oss prefill shape, with or without the register cap or wide tiles: off.
    wgmma=frozenset(), wgmma_regs=None, wgmma_wide=False,
    # FP8: 128-code steps (4 fp8 wgmma k-steps between promotions, as DeepSeek-V3's 128);
    # BM <= 128: a 256-row block's accumulator and its step sum (128 + 128 registers) spill.
    fp8_bk=128, fp8_max_bm=128,
    # _wgmma_fp8: the decoded tile reaches fp8 wgmma in registers, step i+1 decoded while wgmma
    # i runs (the Triton kernels send it through shared memory and drain wgmma first): faster
    # than the Triton FP8 kernels at every FP8 prefill shape measured.
    fp8_wgmma=True,
    # Routing: one program sorts up to 256 assignments faster than the one-hot count; a one-hot
    # tile of 32768 elements per program; below 64 chunks a scan launch costs more than it saves.
    route_sort_max=256, route_budget=32768, route_scan_chunks=64,
)

# Capabilities without a table of their own: SM90's values, which nobody measured there.
UNTUNED = dataclasses.replace(SM90, tuned_on=None)

_TABLES = {9: SM90}  # compute capability major -> tuned table


@functools.lru_cache(maxsize=None)
def policy_for(major: int, minor: int = 0) -> LaunchPolicy:
    """The table for a GPU of compute capability (major, minor); major 0: the Triton
    interpreter. A capability without a tuned table gets UNTUNED, said once in the log."""
    table = _TABLES.get(major)
    if table is not None:
        return table
    if major > 0:
        log.info("mxfp4: kernel 'triton' has no launch table tuned for sm%d%d; using the sm90 "
                 "table's values untuned", major, minor)
    return UNTUNED


_OVERRIDES: contextvars.ContextVar[dict] = contextvars.ContextVar("mxfp4_launch_overrides",
                                                                  default={})


@contextlib.contextmanager
def override(**changes):
    """Within the block, every policy the planner reads has these fields replaced (tests,
    benchmarks and sweeps; nested blocks stack). Unknown field names raise TypeError at once."""
    dataclasses.replace(UNTUNED, **changes)  # validates the names
    token = _OVERRIDES.set({**_OVERRIDES.get(), **changes})
    try:
        yield
    finally:
        _OVERRIDES.reset(token)


def current(major: int, minor: int = 0) -> LaunchPolicy:
    """policy_for(major, minor) with the active override() changes applied."""
    base = policy_for(major, minor)
    changes = _OVERRIDES.get()
    return dataclasses.replace(base, **changes) if changes else base
