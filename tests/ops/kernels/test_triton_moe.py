"""The "triton" MoE kernel against the plain-torch reference, on CPU under the Triton interpreter.

TRITON_INTERPRET=1 must be set before triton is imported, so the kernel cases run in ONE child
process (this file run as a script) and the tests here read its results: other tests in the same
pytest run keep a normal triton. Shapes are small and not powers of two (H 96/160, I 64/96, E 5).
The interpreter rounds fp32 -> bf16 toward zero, so bf16 cases land near 6e-3, not 2e-3.
"""
from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from interpreter_child import run_child

TOL = 1e-2

# name -> case arguments (see _run_case)
CASES = {
    "swiglu_bias_T7": dict(T=7, twice=True),
    "swiglu_bias_T1": dict(T=1),
    "swiglu_T0_combine": dict(T=0),
    "swiglu_T0_uncombined": dict(T=0, combine=False),
    "silu_nobias_H160_I96": dict(T=7, H=160, I=96, act="silu_glu", bias=False),
    "expert_map_uncombined": dict(T=7, emap=True, combine=False, twice=True),
    "expert_map_int64_fp32": dict(T=7, emap=True, ids64=True, dtype="float32"),
    "fp16_hidden": dict(T=7, dtype="float16", H=160),
    "multi_chunk_routing": dict(T=7, route_budget=32),
    "one_chunk_scan_routing": dict(T=7, emap=True, route_sort_max=0),  # no sort, one launch
    "multi_chunk_expert_map": dict(T=7, route_budget=32, emap=True, H=160, I=96),
    # split-K (decode): K chunks of unequal length, summed in order; bias added once
    "split_k_swiglu": dict(T=3, H=160, I=96, split=(3, 2), twice=True),
    "split_k_silu_uncombined_map": dict(T=2, H=160, I=96, act="silu_glu", split=(2, 2),
                                        combine=False, emap=True),
    # two weight tiles per program; H 160 -> Hp 192: GEMM2's second tile is partly past H
    "pair_tiles": dict(T=7, H=160, I=96, pair=True, twice=True),
    "pair_tiles_split_silu": dict(T=2, H=160, I=96, act="silu_glu", pair=True, split=(2, 2)),
    # 128-code steps on Hp = Ip = 192: one whole step, then a 64-code tail step (planner.tail);
    # split K masks the steps instead (no tail)
    "tail_step": dict(T=7, H=160, I=192, bk=128, twice=True),
    "tail_step_pair": dict(T=2, H=160, I=192, bk=128, pair=True, act="silu_glu"),
    "bk128_split_pair": dict(T=2, H=160, I=192, bk=128, split=(2, 2), pair=True),
    # 32-row blocks; those with <= 16 rows (an expert's last) take the 16-row copy of the body
    "half_blocks": dict(T=40, H=160, half=True, twice=True),
    "half_blocks_silu_uncombined": dict(T=23, act="silu_glu", half=True, combine=False),
    "quarter_blocks": dict(T=40, H=160, half=2),  # and blocks of <= BM/4 rows on a BM/4 copy
    # an expert's last block of <= EXTRA = BM/4 rows merged into the block before it (expert
    # rows 36 / 20 / 16 / 5 / 3 at BM 16, EXTRA 4: 16 + 20 merged, 20 merged, one full, two
    # short)
    "merged_tail_blocks": dict(T=40, H=160, extra=4, counts=(36, 20, 16, 5, 3), twice=True),
    # ... at BM 32, EXTRA 8, with the half copies (36 merged, 16 on the half copy), split K,
    # no combine
    "merged_tail_half_split": dict(T=40, extra=8, half=True, counts=(36, 20, 16, 5, 3),
                                   split=(2, 2), combine=False, act="silu_glu"),
    # one w2 block with the NaN scale byte 255: NaN exactly where the reference has NaN
    "nan_scale_block": dict(T=7, nan_block=True),
    # ids outside [0, E) / past the expert map (negative, just past, 2**40 in int64): not on
    # this rank, as moe_torch treats them; no read past the map
    "ids_out_of_range": dict(T=7, ids64=True, bad_ids=True),
    "ids_out_of_range_map_uncombined": dict(T=7, ids64=True, bad_ids=True, emap=True,
                                            combine=False),
    "ids_out_of_range_map_chunked": dict(T=7, ids64=True, bad_ids=True, emap=True,
                                         route_budget=32),
}


def _run_case(E=5, H=96, I=64, k=2, T=7, act="swiglu_oai", bias=True, emap=False, combine=True,
              ids64=False, dtype="bfloat16", route_budget=None, route_sort_max=None, seed=0,
              twice=False, split=None, pair=False, bk=None, nan_block=False, half=False,
              extra=0, counts=None, bad_ids=False):
    from mxfp4_compile.ops.kernels import triton_moe as tm
    from mxfp4_compile.ops.kernels.triton_moe_details.policy import UNTUNED, override
    from mxfp4_compile.ops.moe_torch import moe_torch
    from mxfp4_compile.ops.weights import quantize_experts

    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(E, 2 * I, H, generator=g) * 0.1
    w2 = torch.randn(E, H, I, generator=g) * 0.1
    b13 = torch.randn(E, 2 * I, generator=g) * 0.1 if bias else None
    b2 = torch.randn(E, H, generator=g) * 0.1 if bias else None
    canonical = quantize_experts(w13, w2, b13, b2, activation=act, h_multiple=tm.H_MULTIPLE,
                                 i_multiple=tm.I_MULTIPLE)
    if nan_block:  # expert 0, hidden row 3, first 32-block of its intermediate columns
        canonical = list(canonical)
        canonical[4] = canonical[4].clone()
        canonical[4].view(torch.uint8)[0, 3, 0] = 255
    prepared = tm.prepare(*canonical, act)
    x = torch.randn(T, H, generator=g).to(getattr(torch, dtype))
    e_global = E + 3 if emap else E
    ids = torch.stack([torch.randperm(e_global, generator=g)[:k] for _ in range(T)]) if T else \
        torch.zeros(0, k, dtype=torch.long)
    if counts is not None:  # expert e on counts[e] tokens: slot s of token t is seq[t + s T]
        assert sum(counts) == T * k and max(counts) <= T  # (then the k experts are distinct)
        seq = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
        ids = seq.reshape(k, T).t().contiguous()
    if bad_ids:  # int64: -3, just past the map (or E), 2**40 (past int32)
        ids[0, 0], ids[1, 1], ids[2, 0] = -3, e_global, 2 ** 40
    ids = ids if ids64 else ids.to(torch.int32)
    tw = torch.rand(T, k, generator=g)
    expert_map = None
    if emap:  # E of the E+3 global experts live here, in a shuffled order
        expert_map = torch.full((e_global,), -1, dtype=torch.int32)
        expert_map[torch.randperm(e_global, generator=g)[:E]] = torch.arange(E, dtype=torch.int32)
    changes = dict(split=split)
    if route_budget is not None:  # the chunked (two-launch) routing instead of one sort
        changes.update(route_budget=route_budget, route_sort_max=0)
    if route_sort_max is not None:
        changes["route_sort_max"] = route_sort_max
    if pair or bk or half or extra:
        changes["tiles"] = tuple(dataclasses.replace(c, PAIR=pair, BK=bk or c.BK, HALF=half,
                                                     BM=32 if half else c.BM, EXTRA=extra)
                                 for c in UNTUNED.interpret)
    with override(**changes):
        return _compare(tm, moe_torch, x, ids, tw, canonical, prepared, act, expert_map, combine,
                        twice, nan_block, E)


def _compare(tm, moe_torch, x, ids, tw, canonical, prepared, act, expert_map, combine, twice,
             nan_block, E):
    """(child) the kernel against moe_torch on one case, and its routing against a stable sort."""
    ref = moe_torch(x, ids, tw, *canonical, act, 1.702, 7.0, expert_map, combine).float()
    out = tm.moe(x, ids, tw, *prepared, act, 1.702, 7.0, expert_map, combine)
    # determinism (bitwise equal reruns) on two cases only: each interpreter call costs seconds
    again = tm.moe(x, ids, tw, *prepared, act, 1.702, 7.0, expert_map, combine) if twice else out
    res = dict(shape=list(out.shape), ref_shape=list(ref.shape), dtype=str(out.dtype),
               deterministic=bool(torch.equal(out.nan_to_num(7.0), again.nan_to_num(7.0))))
    if nan_block:
        nan = torch.isnan(ref)
        res["nan_match"] = bool(nan.any()) and bool(torch.equal(torch.isnan(out.float()), nan))
        out, ref = out.float().masked_fill(nan, 0), ref.masked_fill(nan, 0)
    res["finite"] = bool(torch.isfinite(out.float()).all())
    res["err"] = ((out.float() - ref).norm() / ref.norm()).item() if ref.numel() else 0.0
    if x.shape[0]:  # routing metadata: a stable grouping of the valid assignments by expert
        from mxfp4_compile.ops.moe_torch import local_ids

        ids_local = local_ids(ids, expert_map)  # -1 / out of [0, E): not on this rank
        es, sorted_assign = tm.route(ids.contiguous(), expert_map, E)
        valid = ((ids_local >= 0) & (ids_local < E)).flatten()
        order = torch.sort(torch.where(valid, ids_local.flatten(), E), stable=True).indices
        n_valid = int(valid.sum())
        counts = torch.bincount(ids_local.flatten()[valid], minlength=E)
        res["route_ok"] = bool(torch.equal(sorted_assign[:n_valid].long(), order[:n_valid])
                               and torch.equal(es[:E + 1].long().diff(), torch.cat(
                                   [counts, torch.tensor([0])])[:E]) if E else True)
        res["route_start_ok"] = int(es[E]) == n_valid and int(es[0]) == 0
    return res


@pytest.fixture(scope="module")
def results():
    return run_child(__file__)


@pytest.mark.slow
@pytest.mark.interpreter
@pytest.mark.subprocess
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference_under_interpreter(results, name):
    r = results[name]
    assert "error" not in r, r.get("error")
    assert r["shape"] == r["ref_shape"]
    assert r["finite"]
    assert r["deterministic"]
    assert r["err"] < TOL, f"rel-L2 {r['err']:.3g}"
    if "nan_match" in r:
        assert r["nan_match"], "NaN scale: NaN outputs differ from the reference's"
    if "route_ok" in r:
        assert r["route_ok"] and r["route_start_ok"]


def test_prepared_shapes_match_prepare():
    from mxfp4_compile.ops.kernels import triton_moe as tm
    from mxfp4_compile.ops.weights import quantize_experts

    E, H, I = 3, 96, 64
    for act, bias in (("swiglu_oai", True), ("silu_glu", False)):
        w13, w2 = torch.randn(E, 2 * I, H), torch.randn(E, H, I)
        b13, b2 = (torch.randn(E, 2 * I), torch.randn(E, H)) if bias else (None, None)
        can = quantize_experts(w13, w2, b13, b2, activation=act, h_multiple=tm.H_MULTIPLE,
                               i_multiple=tm.I_MULTIPLE)
        out = tm.prepare(*can, act)
        Hp, Ip = can[0].shape[2] * 2, can[3].shape[2] * 2
        shapes = tm.prepared_shapes(E, Hp, Ip, act, bias, bias)
        assert len(shapes) == 6
        for t, s in zip(out, shapes):
            assert (t is None) == (s is None)
            if t is not None:
                assert (tuple(t.shape), t.dtype) == s


def test_prepare_biases_scales_and_keeps_nan_blocks_nan():
    from mxfp4_compile.ops.kernels import triton_moe as tm

    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 256, (2, 3, 64), dtype=torch.uint8, generator=g)  # K = 128
    scales = torch.randint(100, 140, (2, 3, 4), dtype=torch.uint8, generator=g)
    scales[1, 2, 1] = 255
    scales[0, 0, 3] = 192
    out_codes, out_scales = tm._bias_scales(codes, scales)
    nan = scales == 255
    assert torch.equal(out_scales[~nan], scales[~nan] + tm.layout.STORED_SCALE_OFFSET)
    assert int(out_scales[1, 2, 1]) == 255
    blocks = out_codes.reshape(2, 3, 4, 16)
    assert not blocks[1, 2, 1].any()  # the NaN block's codes: all zero (0 * inf = NaN)
    assert torch.equal(blocks[~nan], codes.reshape(2, 3, 4, 16)[~nan])  # the rest untouched
    scales[0, 1, 0] = 193  # 2**66: past what the bf16 multiplier holds exactly
    with pytest.raises(ValueError, match="up to 192.*kernel='reference'"):
        tm._bias_scales(codes, scales)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="interpreter is on")
def test_cpu_without_interpreter_is_unavailable():
    from mxfp4_compile.ops.kernels import triton_moe as tm

    reason = tm.unavailable_reason(torch.device("cpu"))
    assert reason is not None and "TRITON_INTERPRET=1" in reason


@pytest.mark.slow
@pytest.mark.interpreter
@pytest.mark.subprocess
def test_merged_blocks_cover_each_expert_once(results):
    r = results["block_map"]
    assert "error" not in r, r.get("error")
    assert r["got"] == r["want"]


@pytest.mark.slow
@pytest.mark.interpreter
@pytest.mark.subprocess
def test_chunked_routing_past_one_scan_step(results):
    # 8400 assignments over 128 experts: 66 chunks of 128, more than the scan's 64 per step
    r = results["route_many_chunks"]
    assert "error" not in r, r.get("error")
    assert r["chunks"] > 64 and r["sorted_ok"] and r["starts_ok"]


def _run_route_many_chunks():
    """(child) triton_moe.route of M = 8400 assignments (E = 128) against a stable sort."""
    from mxfp4_compile.ops.kernels import triton_moe as tm

    E, k, T = 128, 4, 2100
    g = torch.Generator().manual_seed(3)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    es, sorted_assign = tm.route(ids, None, E)
    order = torch.sort(ids.flatten(), stable=True).indices
    starts = torch.cat([torch.zeros(1, dtype=torch.long),
                        torch.bincount(ids.flatten(), minlength=E).cumsum(0)])
    from mxfp4_compile.ops.kernels.triton_moe_details.policy import UNTUNED
    return dict(chunks=-(-T * k // (UNTUNED.route_budget // 256)),
                sorted_ok=bool(torch.equal(sorted_assign.long(), order)),
                starts_ok=bool(torch.equal(es[:E + 1].long(), starts)))


def _block_map(counts, BM, EXTRA, merged_first):
    """Each expert's rows as blocks (expert, first row, rows): chunks of BM, the last one
    appended to the one before it when it holds at most EXTRA rows; with merged_first the
    blocks of experts that have such a merged block come first."""
    first, rest, start = [], [], 0
    for e, n in enumerate(counts):
        sizes = [min(BM, n - i) for i in range(0, n, BM)]
        merged = len(sizes) >= 2 and sizes[-1] <= EXTRA
        if merged:
            sizes[-2:] = [sizes[-2] + sizes[-1]]
        for size in sizes:
            (first if merged and merged_first else rest).append([e, start, size])
            start += size
    return first + rest


def _run_block_map():
    """(child) _blocks._block_info's blocks, read back by _block_map_kernel, against
    _block_map's (merged blocks first wherever blocks merge)."""
    got, want = [], []
    for counts, BM, EXTRA in (((36, 20, 16, 5, 3, 0, 40), 16, 8), ((36, 20, 16, 5, 3), 16, 4),
                              ((129, 160, 161, 290, 0, 300, 128, 1), 128, 32),
                              ((36, 20, 16, 5, 3), 16, 0)):
        es = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
        n = sum(-(-c // BM) for c in counts)
        out = torch.full((n, 4), -1, dtype=torch.int32)
        _block_map_kernel[(n,)](es, out, len(counts), BM=BM, EB=16, EXTRA=EXTRA)
        total = int(out[0, 3])
        got.append(out[:total, :3].tolist())
        want.append(_block_map(counts, BM, EXTRA, EXTRA > 0))
    return dict(got=got, want=want)


if __name__ == "__main__":  # the child process: TRITON_INTERPRET=1 is already set
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import triton
    import triton.language as tl

    from mxfp4_compile.ops.kernels.triton_moe_details import _blocks

    @triton.jit
    def _block_map_kernel(es_ptr, out_ptr, E, BM: tl.constexpr, EB: tl.constexpr,
                          EXTRA: tl.constexpr):
        """Block pid -> (expert, first row, rows, blocks in use) at out[pid]."""
        pid = tl.program_id(0)
        e, row0, row1, total = _blocks._block_info(es_ptr, pid, E, BM, EB, EXTRA)
        size = tl.where(_blocks._merged(row0, row1, BM, EXTRA), row1 - row0,
                        tl.minimum(row1 - row0, BM))
        j = tl.arange(0, 4)
        tl.store(out_ptr + pid * 4 + j,
                 tl.where(j == 0, e, tl.where(j == 1, row0, tl.where(j == 2, size, total))))

    out = {}
    for name, fn in (("block_map", _run_block_map), ("route_many_chunks", _run_route_many_chunks)):
        try:
            out[name] = fn()
        except Exception as e:  # reported by the parent
            out[name] = {"error": f"{type(e).__name__}: {e}"}
    for name, kw in CASES.items():
        try:
            out[name] = _run_case(**kw)
        except Exception as e:  # reported per case by the parent
            out[name] = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(out))
