"""Routing on the GPU: top-k ids [T, k] -> the assignments sorted by local expert.

  _route_kernel   ids [T, k] -> expert_start [E+1] (row offsets of each expert's run in sorted
                  order; expert_start[E] = number of valid assignments), sorted_assign [M]
                  (assignment index t*k+s, grouped by expert, stable).
Shape legend: M = T*k assignments, E local experts, EB = next_pow2(E + 1) (bucket E collects
assignments whose expert is not on this rank, or whose id is out of range).
"""
import triton
import triton.language as tl

from ._pdl import _pdl_enter


@triton.jit
def _local_ids(ids_ptr, emap_ptr, offs, mask, E, n_map, HAS_MAP: tl.constexpr):
    """Expert id per assignment -> local expert in [0, E), or E when not on this rank: an id
    outside [0, E) (with a map: outside [0, n_map), the map's length, or mapped to -1) is not
    here. The range test runs on the ids as loaded (int64 too), before any narrowing or map
    read, so no id reads past the map."""
    raw = tl.load(ids_ptr + offs, mask=mask, other=0)
    if HAS_MAP:
        ok = mask & (raw >= 0) & (raw < n_map)
        ids = tl.load(emap_ptr + tl.where(ok, raw, 0), mask=ok, other=-1).to(tl.int32)
    else:
        ids = tl.where((raw >= 0) & (raw < E), raw, -1).to(tl.int32)
    ids = tl.where((ids >= 0) & (ids < E) & mask, ids, E)
    return ids


@triton.jit
def _route_kernel(ids_ptr, emap_ptr, counts_ptr, es_ptr, sorted_ptr, M, E, n_map, n_chunks,
                  HAS_MAP: tl.constexpr, CHUNK: tl.constexpr, EB: tl.constexpr,
                  PHASE: tl.constexpr, SORT: tl.constexpr, PDL: tl.constexpr,
                  SCANNED: tl.constexpr = False):
    """PHASE 0: per-chunk expert counts -> counts [n_chunks (+ 1), EB] (its first n_chunks rows).
    PHASE 1: scatter each assignment to its sorted position; its chunk's base per bucket is the
    sum of the earlier chunks' rows of counts, or with SCANNED (_route_scan_kernel ran between
    the phases) counts row c itself, and the totals its row n_chunks.
    PHASE 2: one program does both (n_chunks == 1, one launch). With SORT (small M: up to
    the policy's route_sort_max) a histogram and a sort of (bucket, index) keys, which is the
    stable order itself (assignments past M sort last: bucket E, the largest indices)."""
    _pdl_enter(PDL)
    c = tl.program_id(0)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    mask = offs < M
    loc = _local_ids(ids_ptr, emap_ptr, offs, mask, E, n_map, HAS_MAP)  # [CHUNK]
    buckets = tl.arange(0, EB)
    if SORT:
        total = tl.histogram(loc, EB)  # (past M: counted in bucket E, which no start includes)
        tl.store(es_ptr + buckets, tl.cumsum(total, axis=0) - total, mask=buckets <= E)
        srt = tl.sort(loc * CHUNK + offs)
        tl.store(sorted_ptr + offs, srt % CHUNK, mask=mask)
    else:
        onehot = (loc[:, None] == buckets[None, :]).to(tl.int32) * mask[:, None].to(tl.int32)
        if PHASE == 0:
            tl.store(counts_ptr + c * EB + buckets, tl.sum(onehot, axis=0))
        else:
            if PHASE == 2:
                total = tl.sum(onehot, axis=0)
                base = tl.zeros([EB], dtype=tl.int32)
            elif SCANNED:
                total = tl.load(counts_ptr + n_chunks * EB + buckets)
                base = tl.load(counts_ptr + c * EB + buckets)
            else:
                total = tl.zeros([EB], dtype=tl.int32)
                base = tl.zeros([EB], dtype=tl.int32)
                cc = 0
                while cc < n_chunks:  # a while loop: n_chunks varies with T, no recompiles
                    row = tl.load(counts_ptr + cc * EB + buckets)
                    total += row
                    base += tl.where(cc < c, row, 0)
                    cc += 1
            start = tl.cumsum(total, axis=0) - total  # exclusive: first sorted row of a bucket
            if c == 0:
                tl.store(es_ptr + buckets, start, mask=buckets <= E)
            rank = tl.sum(tl.cumsum(onehot, axis=0) * onehot, axis=1) - 1  # [CHUNK] rank
            pos = tl.sum(onehot * (start + base)[None, :], axis=1) + rank
            tl.store(sorted_ptr + pos, offs, mask=mask)


@triton.jit
def _route_scan_kernel(counts_ptr, n_chunks, EB: tl.constexpr, BE: tl.constexpr,
                       RS: tl.constexpr, PDL: tl.constexpr):
    """Chunked routing, between the route kernel's phases 0 and 1: counts [n_chunks + 1, EB]
    (rows: per-chunk bucket counts) -> in place, row c = the counts of the chunks before c (an
    exclusive scan down each bucket's column) and row n_chunks = the totals. Program j scans
    buckets j BE .. (j+1) BE, RS chunks at a time (phase 1 once summed every earlier chunk's row
    in each of its programs; the policy's route_scan_chunks says when this launch pays)."""
    _pdl_enter(PDL)
    cols = tl.program_id(0) * BE + tl.arange(0, BE)
    carry = tl.zeros([BE], dtype=tl.int32)
    r0 = 0
    while r0 < n_chunks:  # n_chunks varies with T (a while loop: the interpreter runs it too)
        rr = r0 + tl.arange(0, RS)
        ptrs = counts_ptr + rr[:, None] * EB + cols[None, :]
        m = (rr < n_chunks)[:, None]
        rows = tl.load(ptrs, mask=m, other=0)
        tl.store(ptrs, tl.cumsum(rows, axis=0) - rows + carry[None, :], mask=m)
        carry += tl.sum(rows, axis=0)
        r0 += RS
    tl.store(counts_ptr + n_chunks * EB + cols, carry)
