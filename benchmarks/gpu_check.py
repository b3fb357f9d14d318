"""Correctness, CUDA-graph safety and timing of the "triton" MoE kernel on one GPU (H100).

Run on the device machine from the repo root:
    PYTHONPATH=.:.tk python benchmarks/gpu_check.py [--quick] [--models 20b,120b,mixtral]
(.tk = a git-ignored copy of triton_kernels, only needed to time the triton_kernels peer.)

Shape legend: T tokens, k top-k, E experts, H hidden, I intermediate.
  (a) correctness: rel-L2 vs the float32 reference on the same MXFP4 bytes (< 1e-2), freed memory
      poisoned with NaN before each call (unwritten outputs or reads of unwritten rows show);
      host syncs checked with torch.cuda.set_sync_debug_mode("error").
  (b) CUDA graphs: manual torch.cuda.graph capture; replays on new inputs equal eager bitwise;
      1000 replays bit-stable.
  (c) timing (shared/BENCHMARKING.md): the whole forward (top-k routing from router logits +
      the op) under a CUDA graph that holds R calls, each on its own weight set (R sets exceed
      L2), median over replays / R. Floors in the same run: byte floor (distinct experts' MXFP4
      bytes / big-copy bandwidth), streaming floor (a plain Triton read kernel over the same bytes,
      R rotating buffers), FLOP floor (bf16 8192^3 matmul rate).
Writes $OUT/gpu_check.json and $OUT/gpu_check.txt (the table, also printed last).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import sys
import time
import traceback

import torch
import triton
import triton.language as tl

from mxfp4_compile.ops import topk_softmax
from mxfp4_compile.ops.kernels import triton_moe
from mxfp4_compile.ops.kernels.triton_moe_details import configs as tile_configs
from mxfp4_compile.ops.kernels.triton_moe_details.configs import TileConfig as C
from mxfp4_compile.ops.kernels.triton_moe_details._kernels import _tiled_cols, _tiled_rows
from mxfp4_compile.ops.moe_torch import moe_torch
# floors, timing, random weights and checks live in the package (shared with python -m
# mxfp4_compile.bench, which is the user-facing benchmark; this script keeps the kernel
# engineer's sweeps and diagnosis)
from mxfp4_compile.bench.floors import (MODELS, copy_bandwidth, eager_route, expert_bytes,
                                        graph_time_us, matmul_tflops, random_canonical, rel_l2,
                                        route, stream_floor_us)
from mxfp4_compile.bench.floors import poison_free_memory as _poison

TOKENS = (1, 8, 64, 512, 4096)
R_SETS = 4  # weight sets rotated per timed graph
OUT = os.environ.get("OUT", "/tmp/gpu_check_out")
DEV = torch.device("cuda")


def log(*a):
    print(*a, flush=True)


# ---------------------------------------------------------------- weights and inputs ----------
def poison_free_memory(nbytes=1 << 30):
    _poison(DEV, nbytes)


def weight_sets(model, gen, pad=None):
    """-> (R_SETS random canonical weight sets of `model`, padded to `pad` (default: our kernel's
    multiples), and our kernel's layout prepared from each)."""
    E, H, I, k, act, biases = MODELS[model]
    hm, im = (pad, pad) if pad else (triton_moe.H_MULTIPLE, triton_moe.I_MULTIPLE)
    canon = [random_canonical(E, H, I, act, biases, hm, im, gen) for _ in range(R_SETS)]
    return canon, [triton_moe.prepare(*c, act) for c in canon]


# ---------------------------------------------------------------- peers -----------------------
def load_peers():
    """Other kernels to time next to ours: {name: backend module} (those that can run here)."""
    peers = {}
    try:
        mod = importlib.import_module("mxfp4_compile.ops.kernels.triton_kernels_moe")
        needed = ("NAME", "H_MULTIPLE", "I_MULTIPLE", "unavailable_reason", "prepare", "moe")
        missing = [n for n in needed if not hasattr(mod, n)]
        reason = f"missing {missing}" if missing else mod.unavailable_reason(DEV)
        if reason is None:
            peers["triton_kernels"] = mod
        else:
            log(f"peer triton_kernels not timed: {reason}")
    except Exception as e:  # noqa: BLE001 - a peer must never stop our run
        log(f"peer triton_kernels not importable: {type(e).__name__}: {e}")
    return peers


# ---------------------------------------------------------------- checks ----------------------
def call(backend, x, ids, tw, weights, activation, expert_map=None, combine=True):
    return backend.moe(x, ids, tw, *weights, activation, 1.702, 7.0, expert_map, combine)


def check_correctness(name, backend, canon, weights, E, H, k, activation, T, gen):
    x = torch.randn(T, H, device=DEV, generator=gen).to(torch.bfloat16)
    logits = torch.randn(T, E, device=DEV, generator=gen)
    ids, tw = route(logits, k, activation)
    ref = moe_torch(x, ids, tw, *canon, activation, 1.702, 7.0, None, True, sync_free=False)
    poison_free_memory()
    if name == "triton":  # ours must not sync the host (CUDA-graph safety)
        torch.cuda.set_sync_debug_mode("error")
    try:
        out = call(backend, x, ids, tw, weights, activation)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    res = {"err": rel_l2(out, ref), "shape_ok": tuple(out.shape) == (T, H)}
    if name == "triton" and T in (8, 64):  # combine=False and expert_map, on the same inputs
        ref_u = moe_torch(x, ids, tw, *canon, activation, 1.702, 7.0, None, False, sync_free=False)
        poison_free_memory()
        res["err_uncombined"] = rel_l2(call(backend, x, ids, tw, weights, activation, None, False), ref_u)
        emap = torch.full((E + 5,), -1, dtype=torch.int32, device=DEV)
        keep = torch.randperm(E + 5, device=DEV, generator=gen)[:E]
        emap[keep] = torch.arange(E, dtype=torch.int32, device=DEV)
        gids = torch.stack([torch.randperm(E + 5, device=DEV, generator=gen)[:k] for _ in range(T)]).int()
        ref_m = moe_torch(x, gids, tw, *canon, activation, 1.702, 7.0, emap, True, sync_free=False)
        poison_free_memory()
        res["err_expert_map"] = rel_l2(call(backend, x, gids, tw, weights, activation, emap, True), ref_m)
    return res


def check_graph(backend, weights, E, H, k, activation, T, gen, replays=1000):
    sx = torch.randn(T, H, device=DEV, generator=gen).to(torch.bfloat16)
    slog = torch.randn(T, E, device=DEV, generator=gen)

    def fwd():
        ids, tw = route(slog, k, activation)
        return call(backend, sx, ids, tw, weights, activation)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fwd()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        gout = fwd()
    ok_new = True
    for _ in range(3):  # new inputs copied into the static buffers
        sx.copy_(torch.randn(T, H, device=DEV, generator=gen).to(torch.bfloat16))
        slog.copy_(torch.randn(T, E, device=DEV, generator=gen))
        g.replay()
        ok_new &= torch.equal(gout, fwd())
    first = gout.clone()
    stable = True
    for _ in range(replays):
        g.replay()
        stable &= torch.equal(gout, first)  # stays on device; one sync at the end
    stable = bool(stable)
    del g
    return {"graph_equals_eager": bool(ok_new), "stable_1000": stable}


def draw_inputs(E, H, T, gen, n=R_SETS):
    """n hidden states [T, H] and router logits [T, E]: one draw per shape, shared by every
    variant that shape compares. At few tokens the routing draw moves the time more than most
    variants do (Mixtral T=8: how many of the 8 experts 16 assignments touch; the same table
    config measured 282-310 us across draws in sweep v25)."""
    xs = [torch.randn(T, H, device=DEV, generator=gen).to(torch.bfloat16) for _ in range(n)]
    lg = [torch.randn(T, E, device=DEV, generator=gen) for _ in range(n)]
    return xs, lg


def time_forward(backend, weight_sets, E, H, k, activation, T, gen, inputs=None):
    """Whole forward (routing from logits + the op) per call, one weight set per call in one
    CUDA graph; `inputs` from draw_inputs (drawn here when None)."""
    xs, lg = inputs if inputs is not None else draw_inputs(E, H, T, gen, len(weight_sets))

    def fn():
        for x, l, w in zip(xs, lg, weight_sets):
            ids, tw = route(l, k, activation)
            call(backend, x, ids, tw, w, activation)
    return graph_time_us(fn, len(weight_sets))


def distinct_experts(E, k, T, activation, gen):
    lg = torch.randn(T, E, device=DEV, generator=gen)
    ids, _ = route(lg, k, activation)
    return int(torch.unique(ids).numel())


# ---------------------------------------------------------------- tile sweep ------------------
DECODE2 = [C(16, 32, 128, 4, 4, False), C(16, 32, 128, 4, 2, False), C(16, 32, 128, 8, 4, False),
           C(16, 32, 64, 4, 4, False), C(16, 16, 128, 4, 4, False), C(16, 64, 128, 4, 4, False),
           C(16, 64, 128, 4, 4, True), C(16, 64, 64, 4, 4, True), C(16, 64, 128, 8, 4, True),
           C(16, 128, 128, 8, 4, True)]


# v5 (fragment-order weights, paired gate/up rows): BN = 16 x num_warps keeps the dequantized
# tile in registers (checked in the sm90 SASS); GEMM1's BN counts weight rows.
V5_DECODE = [C(16, 64, 64, 4, 4, True), C(16, 64, 128, 4, 4, True), C(16, 128, 64, 8, 4, True),
             C(16, 64, 64, 4, 6, True), C(16, 64, 256, 4, 3, True), C(32, 64, 64, 4, 4, True)]
V5_MID = [C(32, 64, 64, 4, 4, True), C(64, 64, 64, 4, 4, True), C(64, 128, 64, 8, 3, True),
          C(128, 128, 64, 8, 3, True)]
V5_PREFILL = [C(128, 128, 64, 8, 3, True), C(128, 128, 64, 8, 4, True), C(256, 128, 64, 8, 3, True),
              C(256, 128, 64, 8, 4, True), C(64, 128, 64, 8, 4, True)]


V6 = {"decode": [C(16, 64, 64, 4, 4, True), C(16, 128, 64, 8, 4, True), C(16, 64, 256, 4, 3, True)],
      "mid": [C(32, 64, 64, 4, 4, True), C(64, 128, 64, 8, 3, True), C(128, 128, 64, 8, 3, True)],
      "prefill": [C(256, 128, 64, 8, 4, True), C(128, 128, 64, 8, 4, True), C(64, 128, 64, 8, 4, True)]}


V7 = {"decode": [C(16, 64, 64, 4, 4, True), C(16, 64, 64, 4, 4, True, False),
                 C(16, 128, 64, 8, 4, True), C(16, 128, 64, 8, 4, True, False),
                 C(16, 64, 128, 4, 4, True), C(16, 64, 128, 4, 4, True, False),
                 C(16, 64, 256, 4, 3, True), C(16, 64, 256, 4, 3, True, False)],
      "mid": [C(32, 64, 64, 4, 4, True), C(64, 128, 64, 8, 3, True), C(128, 128, 64, 8, 3, True)],
      "prefill": [C(256, 128, 64, 8, 4, True)]}


def _pair(c):
    return dataclasses.replace(c, PAIR=True)


V8 = {"decode": [C(16, 64, 64, 4, 4, True), _pair(C(16, 64, 64, 4, 4, True)),
                 C(16, 64, 128, 4, 4, True), _pair(C(16, 64, 128, 4, 4, True))],
      "mid": [C(32, 64, 64, 4, 4, True), _pair(C(32, 64, 64, 4, 4, True)),
              C(64, 128, 64, 8, 3, True), _pair(C(64, 128, 64, 8, 3, True)),
              C(128, 128, 64, 8, 3, True), _pair(C(128, 128, 64, 8, 3, True))],
      "prefill": [C(256, 128, 64, 8, 4, True), _pair(C(128, 128, 64, 8, 3, True))]}


V9 = [(C(64, 128, 64, 8, 3, True), C(64, 128, 64, 8, 3, True)),
      (C(64, 128, 64, 8, 3, True, maxnreg=80), C(64, 128, 64, 8, 3, True)),
      (C(32, 64, 64, 4, 4, True), C(32, 64, 64, 4, 4, True)),
      (C(128, 128, 64, 8, 3, True), C(128, 128, 64, 8, 3, True))]


# v10 (session 3): 128/256-code steps for gpt-oss too, now that K = 2880 ends with one 64-code
# tail step instead of masking every step (configs.tail); scales pre-biased, one wgmma drain
# per step (fewer instructions per code).
V10 = {"decode": [C(16, 64, 64, 4, 4, True), C(16, 64, 128, 4, 4, True),
                  C(16, 64, 256, 4, 3, True)],
       "mid": [C(32, 64, 64, 4, 4, True), C(32, 64, 128, 4, 4, True), C(64, 128, 64, 8, 3, True),
               C(64, 128, 128, 8, 3, True), C(128, 128, 64, 8, 3, True)],
       "prefill": [C(256, 128, 64, 8, 4, True), C(256, 128, 128, 8, 3, True),
                   C(128, 128, 64, 8, 3, True), C(128, 128, 128, 8, 3, True)]}


# v11: split K where a GEMM has long K but few programs (Mixtral decode GEMM2: 8 experts x 64
# tiles, 112 steps each), and narrower/deeper tiles for the mid and 120b prefill shapes.
_DEC = C(16, 64, 128, 4, 4, True)
V11 = {"decode": [(_DEC, (1, 1)), (_DEC, (1, 2)), (_DEC, (1, 4)), (_DEC, (2, 2))],
       "mid": [(C(64, 128, 64, 8, 3, True), None), (C(64, 128, 64, 8, 4, True), None),
               (C(64, 64, 64, 4, 4, True), None), (C(64, 64, 128, 4, 4, True), None),
               (C(128, 64, 64, 4, 3, True), None), (C(32, 64, 128, 4, 4, True), None)],
       "prefill": [(C(256, 128, 64, 8, 4, True), None), (C(128, 64, 64, 4, 3, True), None),
                   (C(256, 64, 64, 4, 3, True), None), (C(128, 128, 64, 8, 4, True), None)]}


# v12: HALF (an expert's last block with <= BM/2 rows runs a BM/2-row copy of the body) on the
# mid and prefill configs, against the same config without it.
def _half(c):
    return dataclasses.replace(c, HALF=True)


_MID = [C(32, 64, 64, 4, 4, True), C(64, 128, 64, 8, 3, True), C(128, 128, 64, 8, 3, True)]
_PRE = [C(256, 128, 64, 8, 4, True), C(128, 128, 64, 8, 3, True)]
V12 = {"mid": [x for c in _MID for x in (c, _half(c))],
       "prefill": [x for c in _PRE for x in (c, _half(c))]}


# v13: register caps (TileConfig.maxnreg) for more resident warps; caps chosen from the sm90
# SASS compiled on the CPU: no spills at gpt-oss and Mixtral widths (GEMM2 of (64, 128) spills
# at 80, so it keeps its own count).
def _cap(c, n):
    return dataclasses.replace(c, maxnreg=n)


_M64 = C(64, 128, 64, 8, 3, True)
_M128 = C(128, 128, 64, 8, 3, True)
V13 = {"decode": [_DEC, _cap(_DEC, 64), _cap(C(16, 64, 128, 4, 3, True), 64), _cap(_DEC, 80)],
       "mid": [C(32, 64, 64, 4, 4, True), _cap(C(32, 64, 64, 4, 4, True), 56),
               _M64, (_cap(_M64, 80), _M64), _M128, _cap(_M128, 128),
               _cap(C(128, 64, 64, 4, 3, True), 128)]}


# v14: decode pipeline depth, warps per program and grid order at 128-code steps.
V14 = [C(16, 64, 128, 4, 4, True), C(16, 64, 128, 4, 3, True), C(16, 64, 128, 4, 5, True),
       C(16, 128, 128, 8, 4, True), C(16, 32, 128, 2, 4, True),
       C(16, 64, 128, 4, 4, True, False)]


# v16 (session 4, after the 16-row weight tiling): decode depth, BM 32 (one row block for most
# experts at m_e 16), 8 warps, grid order.
V16 = [_DEC, C(16, 64, 128, 4, 3, True), C(16, 64, 128, 4, 5, True), C(16, 64, 128, 4, 6, True),
       C(32, 64, 128, 4, 4, True), C(16, 128, 128, 8, 4, True), C(16, 64, 128, 4, 4, True, False)]


# v17 (session 4): GEMM2 at decode, where its grid is 3-5 programs per SM (Mixtral T=8: 512):
# split in 2, 64-code steps, 2-warp programs (twice the grid), 6 stages. (config, split) pairs.
_D64 = dataclasses.replace(_DEC, BK=64)
V17 = [(_DEC, None), (_DEC, (1, 2)), ((_DEC, _D64), None),
       ((_DEC, C(16, 32, 128, 2, 4, True)), None), ((_DEC, C(16, 64, 128, 4, 6, True)), None)]


# v18 (session 4): the same small GEMM2 grids split in 2 or 3 at 64-code steps (about 9
# programs fit per SM at BK 64, so the doubled grid stays one wave).
V18 = [(_DEC, None), ((_DEC, _D64), (1, 2)), ((_DEC, _D64), (1, 3)), (_DEC, (1, 2))]


# v19 (session 4): the BM 32 decode row (Mixtral T=64) is held to 4 programs per SM by its
# 46 kB of shared memory; 3 stages (34.5 kB) fit 6, with or without 64 registers.
_D32 = C(32, 64, 128, 4, 4, True)
V19 = [_D32, _cap(_D32, 64), C(32, 64, 128, 4, 3, True), _cap(C(32, 64, 128, 4, 3, True), 64)]


# v20 (session 5): prefill where experts hold about 128 rows (120b T=4096: BM 256 blocks of
# 129-160 rows waste up to half the MMA): BM 128 with the half copy for second blocks.
_PRE_HALF = dataclasses.replace(tile_configs._PREFILL, HALF=True)  # the table's pick there
V20 = [(_PRE_HALF, None), (_cap(C(128, 128, 64, 8, 3, True, HALF=True), 128), None),
       (C(128, 128, 64, 8, 4, True, HALF=True), None), (_cap(_M128, 128), None)]
# v21 (session 5): Mixtral T=8 GEMM2 (512 programs with rows, 3.9 per SM, 84% of SM cycles
# active in ncu) split in 2 where the doubled grid fits one wave: 3 stages (about 9 per SM by
# shared memory) or BK 64 at 64 registers (8 per SM).
_DT = C(16, 64, 128, 4, 4, True, maxnreg=64)  # the table's decode row when v21/v22 ran
V21 = [(_DT, None), ((_DT, dataclasses.replace(_DT, num_stages=3)), (1, 2)),
       ((_DT, dataclasses.replace(_DT, BK=64)), (1, 2)),
       ((_DT, dataclasses.replace(_DT, num_stages=3)), None)]


# v22 (session 5): Mixtral T=8 GEMM1 at 3 stages (8 programs per SM at 64 registers instead of
# 7 by shared memory), GEMM2 as the table has it (split in 2 at 3 stages).
_DT3 = dataclasses.replace(_DT, num_stages=3)
V22 = [((_DT, _DT3), (1, 2)), ((_DT3, _DT3), (1, 2))]
# v23 (session 5): 120b T=4096 (128 rows per expert) at 64-row blocks with the half copy.
V23 = [(_cap(C(128, 128, 64, 8, 3, True, HALF=True), 128), None),
       (_cap(C(64, 128, 64, 8, 3, True, HALF=True), 128), None),
       (C(64, 128, 64, 8, 4, True, HALF=True), None),
       (_cap(C(64, 128, 64, 8, 3, True, HALF=True), 80), None)]  # 3 per SM (GEMM2: 11 STL)

# v24 (session 6): two weight tiles per program (PAIR) at 128-code decode steps, 64 registers.
# Mixtral T=8 GEMM1 ran at 0.89 issued per scheduler and cycle with "not selected" the largest
# stall (ncu, session 5): issue-bound there; PAIR at BK 128 has 461 instructions per step for
# two tiles against 2 x 274 (sm90 SASS). 3 stages: 36 kB shared memory, 6 programs per SM;
# 2 stages: 24 kB, 8 (by registers). "table": the table's own pick and plan.
_P3 = dataclasses.replace(_DT3, PAIR=True)
_P2 = dataclasses.replace(_DT3, PAIR=True, num_stages=2)
V24 = [("table", None), ((_P3, _P3), None), ((_P2, _P2), None), ((_P3, _DT3), None),
       ((_P2, _DT3), None)]

# v25 (session 6): K splits for the decode shapes with the table's configs. A plain reader
# streams every decode grid at ~97% of the floor (--diag-reader), but one-wave GEMMs cannot
# even out slow SMs (Mixtral T=8 GEMM2: 1024 programs, 29% behind the reader; GEMM1, 3.4
# waves, 14%); 20b T=8 GEMM2 is 1.2 waves. (GEMM1 split, GEMM2 split); None: the table's.
V25 = [("table", None), ("table", (1, 1)), ("table", (1, 2)), ("table", (1, 3)),
       ("table", (1, 4)), ("table", (2, 2)), ("table", (2, 4))]


def sweep_candidates(T, which="default"):
    """Configs tried at T (one config for both GEMMs, or a (GEMM1, GEMM2) pair); chosen ones go
    to configs._TABLE by hand."""
    if which == "decode2":
        return DECODE2
    if which == "v5":
        return V5_DECODE if T <= 64 else V5_MID if T <= 512 else V5_PREFILL
    if which == "v9":
        return V9
    if which == "v14":
        return V14
    if which == "v16":
        return V16
    if which == "v19":
        return V19
    if which == "v13":
        return V13["decode"] if T <= 64 else V13["mid"]
    if which == "v12":
        return V12["mid"] if T <= 512 else V12["prefill"]
    if which == "v10":
        return V10["decode"] if T <= 64 else V10["mid"] if T <= 512 else V10["prefill"]
    if which == "v8":
        return V8["decode"] if T <= 64 else V8["mid"] if T <= 512 else V8["prefill"]
    if which == "v7":
        return V7["decode"] if T <= 64 else V7["mid"] if T <= 512 else V7["prefill"]
    if which == "v6":
        return V6["decode"] if T <= 64 else V6["mid"] if T <= 512 else V6["prefill"]
    if T <= 64:
        return [C(16, 32, 128, 4, 4, False), C(16, 32, 128, 4, 4, True), C(16, 64, 128, 4, 4, True),
                C(32, 64, 128, 4, 4, True)]
    if T <= 512:
        return [C(32, 64, 64, 4, 4, True), C(64, 64, 64, 4, 4, True), C(64, 128, 64, 4, 3, True),
                C(128, 128, 64, 8, 3, True)]
    return [C(128, 128, 64, 8, 3, True), C(128, 128, 64, 8, 4, True), C(256, 64, 64, 8, 3, True)]


def sweep(models, tokens, gen, which="default", shapes=None):
    out = []
    for model in models:
        if shapes is not None and not any(m == model for m, _ in shapes):
            continue
        E, H, I, k, act, biases = MODELS[model]
        canon, ours = weight_sets(model, gen)
        for T in tokens:
            if shapes is not None and (model, T) not in shapes:
                continue
            x = torch.randn(T, H, device=DEV, generator=gen).to(torch.bfloat16)
            ids, tw = route(torch.randn(T, E, device=DEV, generator=gen), k, act)
            ref = moe_torch(x, ids, tw, *canon[0], act, 1.702, 7.0, None, True, sync_free=False)
            m_e = tile_configs.rows_per_expert(T, k, E)
            inputs = draw_inputs(E, H, T, gen)
            if which == "v15":  # the table's plan (paired BK 64 at T=1), split-K targets
                cands = [(None, t) for t in (3, 4, 5, 6, 8)]
            elif which == "v11":
                cands = V11["decode"] if T <= 64 else V11["mid"] if T <= 512 else V11["prefill"]
            elif which in ("v17", "v18", "v20", "v21", "v22", "v23", "v24", "v25"):
                cands = {"v17": V17, "v18": V18, "v20": V20, "v21": V21, "v22": V22,
                         "v23": V23, "v24": V24, "v25": V25}[which]
            else:
                cands = [(c, None) for c in sweep_candidates(T, which)]
            if which in ("v5", "v6") and T <= 8:  # what split-K buys: the same without it
                cands += [(c, (1, 1)) for c in sweep_candidates(T, which)[:3]]
            for c, split in cands:
                target = None
                table = c == "table"
                if which == "v15" or table:  # the table's own pick (and plan)
                    hm, im = triton_moe.H_MULTIPLE, triton_moe.I_MULTIPLE
                    c = tile_configs.pick(T, k, E, -(-H // hm) * hm, -(-I // im) * im)
                if which == "v15":  # split holds the split-K target
                    target, split = split, None
                pair = c if isinstance(c, tuple) and isinstance(c[0], C) else (c, c)
                rec = {"model": model, "T": T, "m_e": m_e,
                       "cfg": [list(dataclasses.astuple(x)) for x in pair]}
                if split is not None:
                    rec["split"] = split
                if target is not None:
                    rec["split_target"] = target
                    tile_configs.SPLIT_TARGET_PER_SM = target
                    pair = None  # leave the table (and plan's pairing) in charge
                if table:
                    rec["table"] = True
                    pair = None
                tile_configs.OVERRIDE = pair
                tile_configs.SPLIT_OVERRIDE = split
                try:
                    rec["err"] = rel_l2(call(triton_moe, x, ids, tw, ours[0], act), ref)
                    rec["us"] = time_forward(triton_moe, ours, E, H, k, act, T, gen, inputs)
                except Exception as e:  # noqa: BLE001
                    rec["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                finally:
                    tile_configs.OVERRIDE = None
                    tile_configs.SPLIT_OVERRIDE = None
                    tile_configs.SPLIT_TARGET_PER_SM = 3
                log("SWEEP", json.dumps(rec))
                out.append(rec)
        del canon, ours
        torch.cuda.empty_cache()
    with open(os.path.join(OUT, "sweep.json"), "w") as f:
        json.dump(out, f, indent=1)
    best = {}
    for r in out:
        if "us" in r and r["err"] < 1e-2 and ("split" not in r or which in ("v11", "v17", "v18",
                                                                           "v21", "v22", "v25")):
            key = (r["model"], r["T"])
            if key not in best or r["us"] < best[key]["us"]:
                best[key] = r
    lines = ["best config per (model, T): BM BN BK warps stages SWAP"]
    for (m, T), r in sorted(best.items()):
        lines.append(f"{m:8s} T={T:<5d} m_e={r['m_e']:<7.1f} {r['us']:9.1f} us  {r['cfg']} "
                     f"{r.get('split', '')}{r.get('split_target', '')}")
    txt = "\n".join(lines) + "\n"
    with open(os.path.join(OUT, "sweep.txt"), "w") as f:
        f.write(txt)
    print(txt)
    return {key: tuple(C(*x) for x in r["cfg"]) for key, r in best.items()}


# ---------------------------------------------------------------- launch A/B (session 5) ------
# Switches of configs.py per variant: which kernels launch with programmatic dependent launch.
_ALL = ("route", "gemm1", "act", "gemm2", "finalize")
LAUNCH_VARIANTS = {
    "base": dict(PDL_LAUNCH=frozenset()),  # no programmatic launch
    "pdl": dict(PDL_LAUNCH=frozenset(_ALL)),
    "pdl_no_g2": dict(PDL_LAUNCH=frozenset(_ALL) - {"gemm2"}),
    "pdl_small": dict(PDL_LAUNCH=frozenset({"route", "act", "finalize"})),
    "cur": {},  # the tables as they are
    # session 4's decode row (4 stages; 7 programs per SM by shared memory). Session 5 ran
    # "cur" (then this row) against the 3-stage row the table now has.
    "dec4": dict(_DECODE=_DT),
    # Mixtral T=8 GEMM2 in 2 / 4 / 8 K chunks (the table has 8 since session 6)
    "g2split2": dict(GEMM2_MID_SPLIT=2),
    "g2split4": dict(GEMM2_MID_SPLIT=4),
    "g2split8": dict(GEMM2_MID_SPLIT=8),
    "notma": dict(TMA=False),  # cp.async weight tiles everywhere (configs.TMA, session 6)
    "nomma2": dict(MMA2=False),  # the Triton (wgmma) decode tiles instead of _mma2 (session 7)
    "small0": dict(MMA2_SMALL=0),  # T=1: the Triton kernels' paired 64-code tiles
    "small64": dict(MMA2_SMALL=64),  # T=1: _mma2 at 64-code steps
    "nobm32": dict(MMA2_BM32=False),  # 32-row decode tiles on the Triton kernels
    "nowave128": dict(MMA2_WAVE128=False),
    "nobm8": dict(MMA2_BM8_ROWS=0),  # 16-row blocks at T=1 and m_e <= 2 too
    "pps3": dict(MMA2_PROGRAMS_PER_SM=3),  # _mma2 splits K below 3 programs per SM
    "tgt5": dict(SPLIT_TARGET_PER_SM=5),
    "half1": dict(HALF_LEVELS=1),  # part-filled prefill blocks on BM/2 rows only
    "nodirect": dict(MMA2_DIRECT=False),  # T=1 through the route kernel
    "tgt2": dict(SPLIT_TARGET_PER_SM=2),
    "minsteps4": dict(MMA2_MIN_STEPS_PER_CHUNK=4),  # _mma2 chunks as short as the others
    "norpdl": {"router.PDL_LAUNCH": False},  # the router kernel a plain launch
    "nolate": dict(MMA2_LATE_TRIGGER=False),  # GEMM2 a plain launch after an _mma2 GEMM1
    "inorder": dict(MERGED_FIRST=False),  # merged experts' blocks in expert order
    "nomerge": dict(MERGE_DIV=0),  # prefill: an expert's short last block runs alone
    "ns3": dict(MMA2_DEEP_PER_SM=0),  # _mma2 at 3 stages on every grid (T=1 too)
    "deep5": dict(MMA2_DEEP_PER_SM=5),  # ... 4 stages below 5 programs per SM
    "yf32": dict(Y_HIDDEN_DTYPE=False),  # GEMM2's per-assignment outputs in float32
    "merge2": dict(MERGE_DIV=2),  # merged blocks as three MMAs of BM/2 rows, not five of BM/4

}


def _knob(name):
    """A LAUNCH_VARIANTS key -> (module, attribute): "router.X" is ops/topk_softmax.py's X, the
    rest configs.py's."""
    if name.startswith("router."):
        return topk_softmax, name.split(".", 1)[1]
    return tile_configs, name


def launch_ab(models, tokens, gen, variants, rounds=3, shapes=None):
    """Each variant's correctness (poisoned, vs the float32 reference) and whole-forward time,
    interleaved `rounds` times; the router ops alone (top-k, softmax) timed the same way."""
    saved = {n: getattr(*_knob(n)) for v in LAUNCH_VARIANTS.values() for n in v}
    out = []
    for model in models:
        if shapes is not None and not any(m == model for m, _ in shapes):
            continue
        E, H, I, k, act, biases = MODELS[model]
        canon, ours = weight_sets(model, gen)
        for T in tokens:
            if shapes is not None and (model, T) not in shapes:
                continue
            inputs = draw_inputs(E, H, T, gen)
            lg = inputs[1]

            def routers(fn=route):
                for ll in lg:
                    fn(ll, k, act)
            rec = {"model": model, "T": T, "router_us": graph_time_us(routers, R_SETS),
                   "eager_router_us": graph_time_us(lambda: routers(eager_route), R_SETS)}
            for _ in range(rounds):
                for v in variants:
                    for n, val in LAUNCH_VARIANTS[v].items():
                        setattr(*_knob(n), val)
                    try:
                        if v not in rec:
                            rec[v] = {"err": check_correctness("triton", triton_moe, canon[0],
                                                               ours[0], E, H, k, act, T, gen),
                                      "us": []}
                        rec[v]["us"].append(time_forward(triton_moe, ours, E, H, k, act, T, gen,
                                                         inputs))
                    except Exception as e:  # noqa: BLE001
                        rec[v] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                        traceback.print_exc()
                    finally:
                        for n, val in saved.items():
                            setattr(*_knob(n), val)
            for v in variants:
                if "us" in rec.get(v, {}):
                    rec[v]["median"] = sorted(rec[v]["us"])[len(rec[v]["us"]) // 2]
            log("LAUNCH_AB", json.dumps(rec))
            out.append(rec)
        del canon, ours
        torch.cuda.empty_cache()
    with open(os.path.join(OUT, "launch_ab.json"), "w") as f:
        json.dump(out, f, indent=1)
    for r in out:
        log(f"{r['model']:8s} T={r['T']:<5d} router {r['router_us']:6.1f} (eager "
            f"{r['eager_router_us']:.1f}) us  " + "  ".join(
            f"{v} {r[v]['median']:7.1f}" for v in variants if "median" in r.get(v, {})))
    return 0


# ---------------------------------------------------------------- padding experiment ----------
def pad_compare(models, tokens, gen, rounds=3):
    """gpt-oss K = 2880 is not a multiple of 128, so its table configs step K by 64. Padding H and
    I to 2944 (+2.2% bytes) allows 128-code steps (fewer instructions per weight byte). Times the
    table config on 64-padded weights against 128-padded weights with BK 128, interleaved."""
    import statistics
    out = []
    for model in models:
        E, H, I, k, act, biases = MODELS[model]
        sets = {}
        for pad in (64, 128):
            canon, ours = weight_sets(model, gen, pad)
            sets[pad] = (canon[0], ours)
            del canon
        for T in tokens:
            x = torch.randn(T, H, device=DEV, generator=gen).to(torch.bfloat16)
            ids, tw = route(torch.randn(T, E, device=DEV, generator=gen), k, act)
            Hp64, Ip64 = sets[64][1][0][0].shape[2] * 2, sets[64][1][0][3].shape[2] * 2
            Hp128, Ip128 = sets[128][1][0][0].shape[2] * 2, sets[128][1][0][3].shape[2] * 2
            base = tile_configs.pick(T, k, E, Hp64, Ip64)
            padded = tile_configs.pick(T, k, E, Hp128, Ip128)
            wide = tuple(dataclasses.replace(c, BK=128, num_stages=min(c.num_stages, 3))
                         if c.BM >= 256 else dataclasses.replace(c, BK=128) for c in padded)
            variants = {"pad64_table": (64, base), "pad128_table": (128, padded),
                        "pad128_bk128": (128, wide)}
            rec = {"model": model, "T": T}
            for name, (pad, cfg) in variants.items():
                tile_configs.OVERRIDE = cfg
                try:
                    ref = moe_torch(x, ids, tw, *sets[pad][0], act, 1.702, 7.0, None, True,
                                        sync_free=False)
                    rec[name + "_err"] = rel_l2(call(triton_moe, x, ids, tw, sets[pad][1][0], act), ref)
                    rec[name + "_cfg"] = [list(dataclasses.astuple(c))[:5] for c in cfg]
                except Exception as e:  # noqa: BLE001
                    rec[name + "_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                finally:
                    tile_configs.OVERRIDE = None
            times = {n: [] for n in variants if n + "_err" in rec}
            inputs = draw_inputs(E, H, T, gen)
            for _ in range(rounds):
                for name in times:
                    pad, cfg = variants[name]
                    tile_configs.OVERRIDE = cfg
                    try:
                        times[name].append(time_forward(triton_moe, sets[pad][1], E, H, k, act,
                                                        T, gen, inputs))
                    finally:
                        tile_configs.OVERRIDE = None
            for name, v in times.items():
                rec[name + "_us"] = statistics.median(v)
            log("PAD", json.dumps(rec))
            out.append(rec)
        del sets
        torch.cuda.empty_cache()
    with open(os.path.join(OUT, "pad.json"), "w") as f:
        json.dump(out, f, indent=1)


# ---------------------------------------------------------------- decode diagnosis ------------
@triton.jit
def _pattern_kernel(w_ptr, dst, n_tiles, stride_e, stride_row, k_words,
                    BN: tl.constexpr, BKW: tl.constexpr, CONTIG: tl.constexpr):
    """Read what one GEMM program reads (BN rows x k_words int32, BKW words per step), nothing
    else. CONTIG: the same bytes, as one contiguous run per program (a tile-major layout)."""
    pid = tl.program_id(0)
    e = pid % 4
    n = pid // 4
    base = w_ptr + e.to(tl.int64) * stride_e + n * BN * stride_row
    acc = tl.zeros([BN, BKW], dtype=tl.int32)
    r = tl.arange(0, BN)
    c = tl.arange(0, BKW)
    for k in range(0, k_words, BKW):
        if CONTIG:
            offs = (k * BN + r[:, None] * BKW + c[None, :])
        else:
            offs = r[:, None] * stride_row + (k + c)[None, :]
        acc ^= tl.load(base + offs)
    tl.store(dst + pid * BN * BKW + r[:, None] * BKW + c[None, :], acc)


@triton.jit
def _reader_kernel(w_ptr, dst, n_tiles, steps, N: tl.constexpr, K_WORDS: tl.constexpr,
                   BN: tl.constexpr, BKW: tl.constexpr, CONTIG: tl.constexpr,
                   UNROLL: tl.constexpr, SPLIT: tl.constexpr = 1):
    """Read what one decode GEMM program reads, nothing else: BN prepared weight rows of expert
    pid // n_tiles, BKW words per step, in the 16-row tiled layout (_kernels._tiled_rows /
    _tiled_cols); CONTIG: the same amount as one contiguous run per program. `steps` (K_WORDS /
    BKW) is a runtime value (one step's loads in flight per warp: Triton does not pipeline
    loads that feed no dot); UNROLL: a compile-time loop, unrolled (many steps in flight)."""
    pid = tl.program_id(0)
    e = pid // n_tiles
    r = (pid % n_tiles) * BN + tl.arange(0, BN)
    i0 = tl.program_id(1) * steps  # SPLIT: K chunk of `steps` steps (tiled, not unrolled only)
    c = tl.arange(0, BKW)
    acc = tl.zeros([BN, BKW], dtype=tl.int32)
    if CONTIG:
        base = w_ptr + pid.to(tl.int64) * (BN * K_WORDS) + tl.arange(0, BN)[:, None] * BKW
        if UNROLL:
            for i in tl.static_range(K_WORDS // BKW):
                acc ^= tl.load(base + i * (BN * BKW) + c[None, :])
        else:
            for i in range(0, steps):
                acc ^= tl.load(base + i * (BN * BKW) + c[None, :])
    else:
        base = w_ptr + e.to(tl.int64) * (N * K_WORDS) + _tiled_rows(r, K_WORDS, 8)[:, None]
        if UNROLL:
            for i in tl.static_range(K_WORDS // BKW):
                acc ^= tl.load(base + _tiled_cols(i * BKW * 8, BKW, 8)[None, :])
        else:
            for i in range(i0, i0 + steps):
                acc ^= tl.load(base + _tiled_cols(i * BKW * 8, BKW, 8)[None, :])
    tl.store(dst + pid * SPLIT + tl.program_id(1), tl.sum(tl.sum(acc, 1), 0))


def diag_reader(shape="mixtral:8"):
    """How fast does a plain reader stream GEMM1's weights (all E experts' w13, as Mixtral T=8
    touches them; GEMM2's w2 with READER_GEMM=2) with the decode grid and tiles (BN 64, 128-code
    steps, 4 warps, 64 registers), against one contiguous run per program, K split in 2 or 4,
    and the streaming floor? Separates the access pattern and grid from what the GEMM does per
    step."""
    model, which = shape.split(":")[0], os.environ.get("READER_GEMM", "1")
    E, H, I, k, act, biases = MODELS[model]
    N, kw = (2 * I, H // 8) if which == "1" else (H, I // 8)
    bufs = [torch.empty(E * N * kw * 4, dtype=torch.uint8, device=DEV).random_().view(torch.int32)
            for _ in range(2)]
    nbytes = E * N * kw * 4
    res = {"bytes": nbytes}
    # (BN, words per step, register cap, contiguous, unrolled, K split): split > 1 only with
    # the tiled runtime loop
    for BN, BKW, nreg, contig, unroll, split in (
            (64, 16, 64, False, False, 1), (64, 16, 64, True, False, 1),
            (64, 16, 64, False, True, 1), (64, 16, 64, True, True, 1),
            (64, 16, None, False, True, 1), (128, 16, None, False, True, 1),
            (64, 32, 64, False, False, 1), (64, 8, 64, False, True, 1),
            (64, 16, 64, False, False, 2), (64, 16, 64, False, False, 4)):
        n_tiles = N // BN
        dst = torch.empty(E * n_tiles * split, dtype=torch.int32, device=DEV)
        opts = dict(num_warps=4, num_stages=3, **({"maxnreg": nreg} if nreg else {}))

        def fn():
            for b in bufs:
                _reader_kernel[(E * n_tiles, split)](b, dst, n_tiles, kw // BKW // split, N=N,
                                                      K_WORDS=kw, BN=BN, BKW=BKW, CONTIG=contig,
                                                      UNROLL=unroll, SPLIT=split, **opts)
        us = graph_time_us(fn, len(bufs))
        key = (f"BN{BN}_BKW{BKW}_reg{nreg}_{'contig' if contig else 'tiled'}"
               f"{'_unrolled' if unroll else ''}{f'_split{split}' if split > 1 else ''}")
        res[key] = (round(us, 1), round(nbytes / us / 1e6, 3))
        log(f"READER {key}: {us:.1f} us, {nbytes / us / 1e6:.3f} TB/s")
    us = stream_floor_us(nbytes, bufs)
    res["stream_floor"] = (round(us, 1), round(nbytes / us / 1e6, 3))
    log(f"READER stream floor: {us:.1f} us, {nbytes / us / 1e6:.3f} TB/s")
    with open(os.path.join(OUT, "reader.json"), "w") as f:
        json.dump(res, f, indent=1)
    return 0


class _Skip:
    def __getitem__(self, grid):
        return lambda *a, **k: None


def diag(gen, one=False, shape="20b:1"):
    """Where does decode time go? 20b, T=1 (with `one`: three eager calls at `shape`)."""
    from mxfp4_compile.ops.kernels.triton_moe_details import _kernels as K
    model, T = shape.split(":")
    T = int(T)
    E, H, I, k, act, biases = MODELS[model]
    canon, ours = weight_sets(model, gen, 64)
    if one:  # for ncu: three eager calls
        x = torch.randn(T, H, device=DEV, generator=gen).to(torch.bfloat16)
        ids, tw = route(torch.randn(T, E, device=DEV, generator=gen), k, act)
        for _ in range(3):
            call(triton_moe, x, ids, tw, ours[0], act)
        torch.cuda.synchronize()
        return
    res = {}
    orig = {n: getattr(K, n) for n in ("_gemm1_kernel", "_gemm2_kernel", "_finalize_kernel", "_route_kernel")}
    for label, skip in (("full", ()), ("no_gemm2", ("_gemm2_kernel",)), ("no_gemm1", ("_gemm1_kernel",)),
                        ("route_finalize_only", ("_gemm1_kernel", "_gemm2_kernel")),
                        ("nothing", tuple(orig))):
        for n in skip:
            setattr(K, n, _Skip())
        try:
            res[label] = time_forward(triton_moe, ours, E, H, k, act, T, gen)
        finally:
            for n, f in orig.items():
                setattr(K, n, f)
    w = [o[0].view(torch.int32) for o in ours]  # [E, 2Ip, Hp/8]
    kw = w[0].shape[2]
    for BN, BKW in ((64, 16), (64, 32), (32, 16)):
        for contig in (False, True):
            n_tiles = w[0].shape[1] // BN
            dst = torch.empty(4 * n_tiles * BN * BKW, dtype=torch.int32, device=DEV)

            def fn():
                for ww in w:
                    _pattern_kernel[(4 * n_tiles,)](ww, dst, n_tiles, ww.stride(0), ww.stride(1),
                                                    kw - kw % BKW, BN=BN, BKW=BKW, CONTIG=contig,
                                                    num_warps=4)
            us = graph_time_us(fn, len(w))
            nbytes = 4 * n_tiles * BN * (kw - kw % BKW) * 4
            res[f"pattern_BN{BN}_BKW{BKW}_{'contig' if contig else 'rows'}"] = (us, nbytes / us / 1e3)
    bufs = [torch.empty(int(4 * w[0].shape[1] * kw * 4), dtype=torch.uint8, device=DEV).random_().view(torch.int32)
            for _ in range(R_SETS)]
    res["stream_same_bytes_w13"] = stream_floor_us(bufs[0].numel() * 4, bufs)
    for kk, v in res.items():
        log(f"DIAG {kk}: {v}")
    with open(os.path.join(OUT, "diag.json"), "w") as f:
        json.dump(res, f, indent=1)


# ---------------------------------------------------------------- main ------------------------
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="20b,120b,mixtral")
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--quick", action="store_true", help="skip the graph check and peers")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--rounds", type=int, default=3, help="timings of each kernel, interleaved")
    ap.add_argument("--sweep", action="store_true", help="time candidate tile configs instead")
    ap.add_argument("--candidates", default="default",
                    help="sweep candidate set: default|decode2|v5...v19 (see the V* lists)")
    ap.add_argument("--shapes", default=None, help="sweep only these model:T pairs, e.g. 20b:1,mixtral:1")
    ap.add_argument("--tuned", action="store_true",
                    help="sweep first, then run the check with the best config per (model, T)")
    ap.add_argument("--diag", action="store_true", help="decode time breakdown (20b, T=1)")
    ap.add_argument("--pad-compare", action="store_true",
                    help="64- vs 128-padded weights (BK 64 vs 128), see pad_compare")
    ap.add_argument("--diag-one", action="store_true",
                    help="three eager calls at --diag-shape (for ncu)")
    ap.add_argument("--launch-ab", default=None,
                    help="comma list of LAUNCH_VARIANTS to A/B (with --shapes / --models)")
    ap.add_argument("--seed", type=int, default=0, help="weights and inputs (routing draws)")
    ap.add_argument("--diag-reader", action="store_true",
                    help="a plain reader of GEMM1's weights with the decode grid (--diag-shape)")
    ap.add_argument("--diag-shape", default="20b:1", help="model:T of --diag-one's calls")
    args = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    tokens = [int(t) for t in args.tokens.split(",")]
    props = torch.cuda.get_device_properties(DEV)
    log(f"device {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, "
        f"triton {triton.__version__}")
    gen = torch.Generator(device=DEV).manual_seed(args.seed)
    shapes = None
    if args.shapes:
        shapes = {(a.split(":")[0], int(a.split(":")[1])) for a in args.shapes.split(",")}
    if args.sweep:
        sweep(args.models.split(","), tokens, gen, args.candidates, shapes)
        return 0
    if args.launch_ab:
        return launch_ab(args.models.split(","), tokens, gen, args.launch_ab.split(","),
                         args.rounds, shapes)
    if args.pad_compare:
        return pad_compare(args.models.split(","), tokens, gen, args.rounds)
    if args.diag_reader:
        return diag_reader(args.diag_shape)
    if args.diag or args.diag_one:
        return diag(gen, one=args.diag_one, shape=args.diag_shape)
    tuned = sweep(args.models.split(","), tokens, gen, args.candidates) if args.tuned else {}
    peers = {} if (args.quick or args.no_peers) else load_peers()
    bw = copy_bandwidth()
    tf = matmul_tflops()
    log(f"copy bandwidth {bw:.0f} GB/s (read+write), bf16 matmul {tf:.0f} TFLOP/s")
    rows, results = [], {"copy_GBps": bw, "matmul_TFLOPs": tf, "shapes": []}
    for model in args.models.split(","):
        E, H, I, k, act, biases = MODELS[model]
        t0 = time.time()
        canon, ours = weight_sets(model, gen)
        peer_w = {}
        for pname, mod in peers.items():
            try:
                if (mod.H_MULTIPLE, mod.I_MULTIPLE) != (triton_moe.H_MULTIPLE, triton_moe.I_MULTIPLE):
                    raise RuntimeError("padding differs from ours; not handled here")
                peer_w[pname] = [mod.prepare(*c, act) for c in canon]
            except Exception as e:  # noqa: BLE001
                log(f"peer {pname} prepare failed on {model}: {type(e).__name__}: {e}")
        log(f"[{model}] weights ready in {time.time() - t0:.1f}s")
        eb = expert_bytes(H, I, biases)
        flop_per_tok = 2 * 3 * H * I * k
        bufs = None
        for T in tokens:
            rec = {"model": model, "T": T}
            cfg = tuned.get((model, T))
            tile_configs.OVERRIDE = cfg
            if cfg is not None:
                rec["cfg"] = [list(dataclasses.astuple(x)) for x in cfg]
            try:
                rec["ours_check"] = check_correctness("triton", triton_moe, canon[0], ours[0], E, H, k, act, T, gen)
                for pname, pw in peer_w.items():
                    try:
                        rec[f"{pname}_check"] = check_correctness(pname, peers[pname], canon[0], pw[0], E, H, k, act, T, gen)
                    except Exception as e:  # noqa: BLE001
                        rec[f"{pname}_check"] = {"error": f"{type(e).__name__}: {e}"}
                # (Mixtral T=8 / 64: the weight tiles come by TMA, configs.use_tma)
                if not args.quick and ((model == "20b" and T in (1, 64, 4096))
                                       or (model == "mixtral" and T in (8, 64))):
                    rec["graph"] = check_graph(triton_moe, ours[0], E, H, k, act, T, gen)
                d = distinct_experts(E, k, T, act, gen)
                nbytes = d * eb
                rec["distinct_experts"] = d
                rec["bytes"] = nbytes
                rec["byte_floor_us"] = nbytes / (bw * 1e9) * 1e6
                if T <= 64:
                    need = int(nbytes) // 16 * 16
                    bufs = [torch.empty(need, dtype=torch.uint8, device=DEV).random_().view(torch.int32)
                            for _ in range(R_SETS)]
                    rec["stream_floor_us"] = stream_floor_us(nbytes, bufs)
                    del bufs
                rec["flop_floor_us"] = flop_per_tok * T / (tf * 1e12) * 1e6
                # ours and each peer in turn, args.rounds times: clocks drift during a run
                # (power cap), so each ratio compares timings taken minutes apart at most
                rounds = {"ours": []}
                inputs = draw_inputs(E, H, T, gen)  # the same draws for ours and every peer
                for _ in range(args.rounds):
                    rounds["ours"].append(time_forward(triton_moe, ours, E, H, k, act, T, gen,
                                                       inputs))
                    for pname, pw in peer_w.items():
                        try:
                            us = time_forward(peers[pname], pw, E, H, k, act, T, gen, inputs)
                        except Exception as e:  # noqa: BLE001
                            us = None
                            log(f"peer {pname} timing failed {model} T={T}: {type(e).__name__}: {e}")
                        rounds.setdefault(pname, []).append(us)
                for name, vals in rounds.items():
                    vals = [v for v in vals if v is not None]
                    rec[f"{name}_rounds"] = vals
                    rec["ours_us" if name == "ours" else f"{name}_us"] = (
                        sorted(vals)[len(vals) // 2] if vals else None)
                rec["ours_us_again"] = max(rounds["ours"])
            except Exception as e:  # noqa: BLE001
                rec["error"] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
            tile_configs.OVERRIDE = None
            results["shapes"].append(rec)
            log(json.dumps(rec))
            rows.append(rec)
        del canon, ours, peer_w
        torch.cuda.empty_cache()
    with open(os.path.join(OUT, "gpu_check.json"), "w") as f:
        json.dump(results, f, indent=1)
    table = format_table(rows, bw, tf, list(peers))
    with open(os.path.join(OUT, "gpu_check.txt"), "w") as f:
        f.write(table)
    print(table)


def format_table(rows, bw, tf, peer_names):
    def f(v, fmt="{:.1f}"):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)

    lines = [f"copy {bw:.0f} GB/s, bf16 matmul {tf:.0f} TFLOP/s; times in us (graph, median, L2 cold)",
             "model   T     err      ours   worst  bytefl  strmfl  flopfl  x_byte  x_strm  %mm   "
             + "  ".join(f"{p}(err,us,ours/p)" for p in peer_names)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['model']:7s} {r['T']:<5d} ERROR {r['error'][:100]}")
            continue
        o = r.get("ours_us")
        xb = o / r["byte_floor_us"] if o else None
        xs = o / r["stream_floor_us"] if o and r.get("stream_floor_us") else None
        mm = 100 * r["flop_floor_us"] / o if o else None
        line = (f"{r['model']:7s} {r['T']:<5d} {r['ours_check']['err']:.1e}  {f(o):>6s} "
                f"{f(r.get('ours_us_again')):>6s}  {f(r['byte_floor_us']):>6s}  "
                f"{f(r.get('stream_floor_us')):>6s}  {f(r['flop_floor_us']):>6s}  {f(xb, '{:.2f}'):>6s}  "
                f"{f(xs, '{:.2f}'):>6s}  {f(mm, '{:.0f}'):>4s}")
        for p in peer_names:
            pc = r.get(f"{p}_check", {})
            pu = r.get(f"{p}_us")
            line += f"   {f(pc.get('err'), '{:.1e}')},{f(pu)},{f(o / pu if (o and pu) else None, '{:.2f}')}"
        extra = {kk: v for kk, v in r["ours_check"].items() if kk != "err"}
        if "graph" in r:
            extra.update(r["graph"])
        line += "  " + " ".join(f"{kk}={v:.1e}" if isinstance(v, float) else f"{kk}={v}" for kk, v in extra.items())
        if "cfg" in r:
            line += f" cfg={r['cfg']}"
        lines.append(line)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
