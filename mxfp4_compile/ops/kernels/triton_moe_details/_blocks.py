"""Which rows and weight tile a GEMM program works on.

GEMM programs find their (expert, row range) from expert_start alone: with BM rows per block,
expert e owns ceil(count_e / BM) consecutive blocks; the grid is sized for the worst case
min(M, M // BM + E) blocks and surplus programs exit at once.
"""
import triton
import triton.language as tl


@triton.jit
def _block_info(es_ptr, pid_m, E, BM: tl.constexpr, EB: tl.constexpr, EXTRA: tl.constexpr = 0):
    """Block pid_m -> (expert, first sorted row, end row, number of blocks in use). EXTRA > 0:
    an expert's last block of at most EXTRA rows merges into the block before it, which then
    holds BM < rows <= BM + EXTRA (`_merged`), and the experts with such a (longer) block get
    the first block numbers: the grid's last programs are short ones, and the GPU drains more
    evenly (ledger: `MERGED_FIRST`)."""
    offs = tl.arange(0, EB)
    lo = tl.load(es_ptr + offs, mask=offs < E, other=0)
    hi = tl.load(es_ptr + offs + 1, mask=offs < E, other=0)
    nb = (hi - lo + BM - 1) // BM
    if EXTRA > 0:
        merged = (nb >= 2) & (hi - lo - (nb - 1) * BM <= EXTRA)
        nb -= merged.to(tl.int32)
    total = tl.sum(nb, axis=0)
    if EXTRA > 0:
        nb_m = tl.where(merged, nb, 0)
        cb = tl.where(merged, tl.cumsum(nb_m, axis=0),
                      tl.sum(nb_m, axis=0) + tl.cumsum(nb - nb_m, axis=0))
        sel = (cb - nb <= pid_m) & (pid_m < cb)
        e = tl.sum(tl.where(sel, offs, 0), axis=0)
    else:
        cb = tl.cumsum(nb, axis=0)  # inclusive block count
        e = tl.sum((cb <= pid_m).to(tl.int32), axis=0)
        sel = offs == e
    blk0 = tl.sum(tl.where(sel, cb - nb, 0), axis=0)
    row0 = tl.sum(tl.where(sel, lo, 0), axis=0) + (pid_m - blk0) * BM
    row1 = tl.sum(tl.where(sel, hi, 0), axis=0)
    return e, row0, row1, total


@triton.jit
def _merged(row0, row1, BM: tl.constexpr, EXTRA: tl.constexpr):
    """Whether a block from _block_info holds an expert's merged last rows (BM + <= EXTRA rows;
    an earlier block of that expert sees more than BM + EXTRA rows up to row1)."""
    return (EXTRA > 0) & (row1 - row0 > BM) & (row1 - row0 <= BM + EXTRA)


@triton.jit
def _grid_position(N: tl.constexpr, BN: tl.constexpr, PAIR: tl.constexpr):
    """program_id(0) -> (row block, weight tile of BN rows, or of 2 BN with PAIR), weight tiles
    fastest: the programs running side by side share one row block's activations (read once
    from HBM, then from L2) and stream different weight tiles; row blocks fastest re-read all of
    x from HBM for every weight tile at prefill sizes (ledger: `N_FIRST`)."""
    pid = tl.program_id(0)
    N_TILES: tl.constexpr = (N + (2 if PAIR else 1) * BN - 1) // ((2 if PAIR else 1) * BN)
    return pid // N_TILES, pid % N_TILES


@triton.jit
def _gather_rows(x_ptr, sorted_ptr, rows, row1, k_top, stride_xt: tl.constexpr):
    """GEMM1's activation row pointers for sorted rows `rows` (those below row1): x[token]."""
    tok = tl.load(sorted_ptr + rows, mask=rows < row1, other=0) // k_top
    return x_ptr + tok.to(tl.int64) * stride_xt


@triton.jit
def _program_block(es_ptr, E, N: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                   EB: tl.constexpr, PAIR: tl.constexpr, EXTRA: tl.constexpr):
    """program_id(0) of a GEMM over N weight rows -> (weight tile, expert, first sorted row, end
    row, whether the row block is in use: surplus programs of the worst-case grid are not)."""
    pid_m, pid_n = _grid_position(N, BN, PAIR)
    e, row0, row1, total = _block_info(es_ptr, pid_m, E, BM, EB, EXTRA)
    return pid_n, e, row0, row1, pid_m < total

