"""Correctness, CUDA-graph safety and timing of the "triton" MoE kernel on one GPU (H100), A/B of
launch-policy variants, and decode diagnosis. From the repo root (.tk: a git-ignored copy of
triton_kernels, only to time that peer; see --help):
    PYTHONPATH=.:.tk python benchmarks/gpu_check.py [--shapes 20b:1,120b:4096] [--no-timing]
Shape legend: T tokens, k top-k, E experts, H hidden, I intermediate, m_e rows per expert.
(a) rel-L2 against the float32 reference (ops/moe_torch.py) on the same MXFP4 bytes, pass < 1e-2,
    with freed allocator memory NaN-filled before each call (an unwritten output, or a read of an
    unwritten row, shows as NaN) and, for ours, torch.cuda.set_sync_debug_mode("error") (a host
    sync raises); at T = 8 and 64 also combine=False and an expert map (E of E + 5 experts local).
(b) routing + op captured in a CUDA graph: replays on new inputs equal eager calls bitwise, 1000
    replays are bit-stable.
(c) the whole forward (fused top-k routing from router logits + the op) timed: one CUDA graph
    holds R calls, each on its own weight set and input draw (R sets exceed L2: weights come
    from HBM, as in a stack of layers), each replay timed by CUDA events, median replay / R.
    Kernels, or --launch-ab variants of the launch policy, run in one process on the same draws,
    interleaved over --rounds rounds (clocks drift with power and heat): median of the rounds.
    Floors from the same run (mxfp4_compile.bench.floors): byte floor (the distinct experts'
    MXFP4 bytes / the floor bandwidth), stream floor at T <= 64 (a plain read kernel over the
    same bytes: small reads fall short of the large-buffer rate), FLOP floor (bf16 matmul rate).
    A time below a floor is flagged for a re-check, never reported as a win.
Writes $OUT/gpu_check.json and gpu_check.txt (the table, printed last), or diag.json / reader.json.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import functools
import importlib
import json
import os
import statistics
import sys
import time
import traceback
from unittest import mock

import torch
import triton
import triton.language as tl

from mxfp4_compile.bench import floors as F
from mxfp4_compile.bench import harness as Hn
from mxfp4_compile.bench import workloads as W
from mxfp4_compile.bench.workloads import ALPHA, LIMIT, MODELS
from mxfp4_compile.ops.kernels import triton_moe
from mxfp4_compile.ops.kernels.triton_moe_details import policy
from mxfp4_compile.ops.kernels.triton_moe_details._dequant import _tiled_cols, _tiled_rows
from mxfp4_compile.ops.moe_torch import moe_torch

TOKENS = (1, 8, 64, 512, 4096)
R_SETS = 4  # weight sets (and input draws) per timed graph
OUT = os.environ.get("OUT", "/tmp/gpu_check_out")
DEV = torch.device("cuda")
DETAILS = "mxfp4_compile.ops.kernels.triton_moe_details"

# --launch-ab variants: name -> changes for policy.override against the table (policy.SM90);
# field=value on the command line gives any other
VARIANTS = {
    "base": {},  # the table as it is
    "nopdl": dict(pdl_launch=frozenset()),  # every kernel a plain launch
    "pdl_all": dict(pdl_launch=frozenset({"route", "gemm1", "act", "gemm2", "finalize"})),
    "nomma2": dict(mma2=False),  # decode tiles on the Triton (wgmma) kernels, not _mma2
    "nodirect": dict(mma2_direct=False),  # T=1 through the route kernel
    "nobm8": dict(mma2_bm8_max_rows=0),  # 16-row blocks where m_e <= 2 too
    "ns3": dict(mma2_deep_per_sm=0),  # _mma2 at 3 cp.async stages on every grid
    "pps3": dict(mma2_programs_per_sm=3),  # _mma2 splits K below 3 programs per SM
    "minsteps4": dict(mma2_min_steps_per_chunk=4),  # _mma2 K chunks as short as the others'
    "dec4": dict(decode=dataclasses.replace(policy.SM90.decode, num_stages=4)),  # 4 stages
    "half1": dict(half_levels=1),  # part-filled prefill blocks: BM/2 copies only
    "nomerge": dict(merge_div=0),  # prefill: an expert's short last block runs alone
    "merge2": dict(merge_div=2),  # last blocks of <= BM/2 rows merge (table: BM/4)
    "f32y": dict(y_hidden_dtype=False),  # GEMM2's per-assignment outputs in float32
    "noscan": dict(route_scan_chunks=1 << 30),  # chunked routing without the scan launch
    # _wgmma at 128 registers on GEMM1 only (ncu at 120b T=4096: GEMM1 10.5% faster, GEMM2 7%
    # slower than the Triton kernels, each in isolation; notes/op.md, session 23)
    "wgmma1": dict(wgmma=frozenset({"gemm1"}), wgmma_regs=128),
}


log = functools.partial(print, flush=True)


def _split(spec: str, sep: str) -> list[str]:
    """spec split at each `sep` outside brackets ("a=(1,2),b" -> ["a=(1,2)", "b"])."""
    parts, depth = [""], 0
    for ch in spec:
        depth += (ch in "([{") - (ch in ")]}")
        if ch == sep and not depth:
            parts.append("")
        else:
            parts[-1] += ch
    return [p.strip() for p in parts if p.strip()]


def parse_variants(spec: str) -> dict[str, dict]:
    """"base,nomma2,mma2=False+split=(1,2)" -> {name: changes for policy.override}: a VARIANTS
    name, or field=value pairs (Python literals; a set becomes a frozenset) joined by '+'.
    Checked against LaunchPolicy here (TypeError on an unknown field), before any GPU work."""
    out = {}
    for item in _split(spec, ","):
        if item in VARIANTS:
            out[item] = VARIANTS[item]
            continue
        if "=" not in item:
            raise SystemExit(f"unknown variant {item!r}; named ones: {', '.join(VARIANTS)}")
        pairs = (part.split("=", 1) for part in _split(item, "+"))
        out[item] = {n.strip(): (frozenset(v) if isinstance(v, set) else v)
                     for n, v in ((n, ast.literal_eval(v.strip())) for n, v in pairs)}
        dataclasses.replace(policy.UNTUNED, **out[item])
    return out


def parse_shapes(models: str, tokens: str, shapes: str | None = None) -> list:
    """--models x --tokens, or the --shapes pairs ("20b:1,120b:4096") -> [(model, [T, ...])], each
    model once (its weights are built once), in the order given."""
    pairs = ([(m, int(t)) for m, t in (s.split(":") for s in shapes.split(","))] if shapes else
             [(m, int(t)) for m in models.split(",") for t in tokens.split(",")])
    out = {}
    for m, t in pairs:
        if m not in MODELS:
            raise SystemExit(f"unknown model {m!r}; known: {', '.join(MODELS)}")
        out.setdefault(m, []).append(t)
    return list(out.items())


# ---------------------------------------------------------------- weights, inputs, calls ------
def weight_sets(model, gen):
    """-> (R_SETS random canonical weight sets of `model`, our kernel's layout of each)."""
    E, H, I, k, act, biases = MODELS[model]
    canon = [W.random_canonical(E, H, I, act, biases, triton_moe.H_MULTIPLE,
                                triton_moe.I_MULTIPLE, gen) for _ in range(R_SETS)]
    return canon, [triton_moe.prepare(*c, act) for c in canon]


def draw_inputs(E, H, T, gen, n=R_SETS):
    """n hidden states [T, H] and router logits [T, E]: one draw per shape, shared by everything
    it compares (at few tokens the routing draw moves the time more than most variants do)."""
    xs = [torch.randn(T, H, device=DEV, generator=gen).to(torch.bfloat16) for _ in range(n)]
    return xs, [torch.randn(T, E, device=DEV, generator=gen) for _ in range(n)]


def call(kernel, x, ids, tw, weights, act, expert_map=None, combine=True):
    return kernel.moe(x, ids, tw, *weights, act, ALPHA, LIMIT, expert_map, combine)


def load_peers():
    """Other kernels to time next to ours: {name: kernel module}, those that can run here."""
    try:
        mod = importlib.import_module("mxfp4_compile.ops.kernels.triton_kernels_moe")
        reason = mod.unavailable_reason(DEV)
    except Exception as e:  # noqa: BLE001 - a peer must never stop our run
        reason = f"not importable: {type(e).__name__}: {e}"
    if reason is None:
        return {"triton_kernels": mod}
    log(f"peer triton_kernels not timed: {reason}")
    return {}


# ---------------------------------------------------------------- checks ----------------------
def _checked_call(sync_check, *args):
    W.poison_free_memory(DEV)
    if sync_check:
        torch.cuda.set_sync_debug_mode("error")
    try:
        return call(*args)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def check_correctness(kernel, canon, weights, k, act, x, logits, gen):
    """(a): rel-L2 of one call on (x, logits) against the float32 reference, memory poisoned;
    ours: under the host-sync check, and at T = 8 and 64 combine=False and an expert map."""
    (T, H), E, ours = x.shape, logits.shape[1], kernel is triton_moe
    ids, tw = W.route(logits, k, act)

    def ref(ids_, emap=None, combine=True):
        return moe_torch(x, ids_, tw, *canon, act, ALPHA, LIMIT, emap, combine, sync_free=False)
    out = _checked_call(ours, kernel, x, ids, tw, weights, act)
    res = {"err": W.rel_l2(out, ref(ids)), "shape_ok": tuple(out.shape) == (T, H)}
    if ours and T in (8, 64):
        res["err_uncombined"] = W.rel_l2(_checked_call(True, kernel, x, ids, tw, weights, act,
                                                       None, False), ref(ids, None, False))
        emap = torch.full((E + 5,), -1, dtype=torch.int32, device=DEV)
        emap[torch.randperm(E + 5, device=DEV, generator=gen)[:E]] = torch.arange(
            E, dtype=torch.int32, device=DEV)
        gids = torch.stack([torch.randperm(E + 5, device=DEV, generator=gen)[:k]
                            for _ in range(T)]).int()
        res["err_expert_map"] = W.rel_l2(
            _checked_call(True, kernel, x, gids, tw, weights, act, emap), ref(gids, emap))
    return res


def check_graph(weights, E, H, k, act, T, gen, replays=1000):
    """(b): our forward captured in a CUDA graph; replays on new inputs against eager calls."""
    sx = torch.randn(T, H, device=DEV, generator=gen).to(torch.bfloat16)
    slog = torch.randn(T, E, device=DEV, generator=gen)

    def fwd():
        return call(triton_moe, sx, *W.route(slog, k, act), weights, act)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fwd()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        gout = fwd()
    equal = True
    for _ in range(3):
        sx.copy_(torch.randn(T, H, device=DEV, generator=gen).to(torch.bfloat16))
        slog.copy_(torch.randn(T, E, device=DEV, generator=gen))
        g.replay()
        equal &= torch.equal(gout, fwd())
    first, stable = gout.clone(), torch.tensor(True, device=DEV)
    for _ in range(replays):
        g.replay()
        stable &= (gout == first).all()  # on the device: one host sync, at the end
    del g
    return {"graph_equals_eager": bool(equal), f"stable_{replays}": bool(stable)}


# ---------------------------------------------------------------- timing ----------------------
def time_forward(kernel, wsets, k, act, inputs):
    """(c): microseconds per forward (routing + op), one weight set and input draw per call."""
    def fn():
        for x, logits, w in zip(*inputs, wsets):
            call(kernel, x, *W.route(logits, k, act), w, act)
    return Hn.graph_time_us(fn, len(wsets), device=DEV)


def floors_us(model, inputs, bw, tf):
    """The floors of one forward on `inputs` (the mean over its draws of the distinct experts),
    and the router alone, fused and as plain torch ops, timed like the forward."""
    E, H, I, k, act, biases = MODELS[model]
    T = inputs[0][0].shape[0]
    d = statistics.mean(W.distinct_experts(W.route(lg, k, act)[0]) for lg in inputs[1])
    nbytes = d * W.expert_bytes(H, I, biases)

    def routers(fn):
        return lambda: [fn(lg, k, act) for lg in inputs[1]]
    return {"distinct_experts": d, "bytes": nbytes,
            "byte_floor_us": nbytes / (bw.GBps * 1e9) * 1e6,
            "stream_floor_us": F.stream_floor_us(nbytes, device=DEV) if T <= 64 else None,
            "flop_floor_us": W.flops_per_token(H, I, k) * T / (tf * 1e12) * 1e6,
            "router_us": Hn.graph_time_us(routers(W.route), R_SETS, device=DEV),
            "eager_router_us": Hn.graph_time_us(routers(W.eager_route), R_SETS, device=DEV)}


def run_model(args, model, tokens, kernel_changes, peers, gen, bw, tf):
    """(a), (b) and (c) at `model` x `tokens` for ours under each of `kernel_changes` {name:
    policy changes} and for each peer; (b) for the first only. -> one record per T."""
    E, H, I, k, act, biases = MODELS[model]
    t0 = time.time()
    canon, ours = weight_sets(model, gen)
    # name -> (kernel module, weight sets, policy changes); the first is the reference
    kernels = {name: (triton_moe, ours, changes) for name, changes in kernel_changes.items()}
    for name, mod in peers.items():  # same padding (64) as ours
        try:
            kernels[name] = (mod, [mod.prepare(*c, act) for c in canon], {})
        except Exception as e:  # noqa: BLE001
            log(f"peer {name} prepare failed on {model}: {type(e).__name__}: {e}")
    log(f"[{model}] weights ready in {time.time() - t0:.1f}s")
    rows = []
    for T in tokens:
        rec = {"model": model, "T": T}
        inputs = draw_inputs(E, H, T, gen)
        x, logits = inputs[0][0], inputs[1][0]
        for name, (mod, wsets, changes) in kernels.items():
            res = rec[name] = {}
            res["check"] = _guarded(res, changes, lambda: check_correctness(
                mod, canon[0], wsets[0], k, act, x, logits, gen))
            if not args.quick and name == next(iter(kernels)) and "error" not in res:
                res["graph"] = _guarded(res, changes,
                                        lambda: check_graph(wsets[0], E, H, k, act, T, gen))
        if not args.no_timing:
            rec.update(_guarded(rec, {}, lambda: floors_us(model, inputs, bw, tf)) or {})
            for _ in range(args.rounds):  # each kernel in turn: clocks drift
                for name, (mod, wsets, changes) in kernels.items():
                    if "error" not in rec[name]:
                        rec[name].setdefault("rounds", []).append(_guarded(
                            rec[name], changes, lambda: time_forward(mod, wsets, k, act, inputs)))
            floors = {f"{n} floor": rec.get(f"{n}_floor_us") for n in ("byte", "stream", "flop")}
            for name in kernels:
                if "rounds" in rec[name] and "error" not in rec[name]:
                    rec[name]["us"] = statistics.median(rec[name]["rounds"])
                    rec[name]["worst"] = max(rec[name]["rounds"])
                    rec[name]["flag"] = F.floor_check(rec[name]["us"], floors)
        log(json.dumps(rec))
        rows.append(rec)
    return rows


def run(args, plan, gen, variants=None):
    """run_model at every shape of `plan`: ours and each peer, or ours under each launch policy
    variant (`variants`); prints and writes the table. -> the exit status."""
    peers = {} if (args.quick or args.no_peers or args.no_timing or variants) else load_peers()
    variants = variants or {"ours": {}}
    bw = tf = None
    if not args.no_timing:
        bw, tf = F.measure_bandwidth(DEV), F.matmul_tflops(DEV)
        log(f"floor bandwidth {bw.describe()}; bf16 matmul {tf:.0f} TFLOP/s")
    rows = []
    for model, tokens in plan:
        rows += run_model(args, model, tokens, variants, peers, gen, bw, tf)
        torch.cuda.empty_cache()
    meta = {"bandwidth": None if bw is None else dataclasses.asdict(bw), "matmul_TFLOPs": tf,
            "variants": {n: repr(c) for n, c in variants.items()}}
    with open(os.path.join(OUT, "gpu_check.json"), "w") as f:
        json.dump({**meta, "shapes": rows}, f, indent=1)
    table = format_table(rows, bw, tf, list(variants) + list(peers))
    with open(os.path.join(OUT, "gpu_check.txt"), "w") as f:
        f.write(table)
    print(table)
    return 0 if all(passed(r.get(n, {"error": "not run"})) for r in rows for n in variants) else 1


def _guarded(res, changes, fn):
    """fn() under policy.override(**changes); an exception goes to res["error"] (-> None)."""
    try:
        with policy.override(**changes):
            return fn()
    except Exception as e:  # noqa: BLE001 - one kernel's failure must not stop the others
        res["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        traceback.print_exc()


def passed(res) -> bool:
    """A kernel's result at one shape: no error, its shape right, every rel-L2 < 1e-2, every
    graph check true."""
    check = res.get("check") or {}
    errs = [v for key, v in check.items() if key.startswith("err")]
    return ("error" not in res and check.get("shape_ok", False) and all(e < 1e-2 for e in errs)
            and all(res.get("graph", {}).values()))


def _f(v, fmt="{:.1f}"):
    return "-" if v is None else fmt.format(v)


def format_table(rows, bw, tf, names):
    """One line per shape: the first kernel's rel-L2, time (median and slowest round) and floors
    (us), time / floor, % of the FLOP floor's rate, the router alone (fused / plain torch ops);
    each other kernel's (rel-L2, us, first / it); then the other checks, errors and flags."""
    head = ["model", "T", "err", f"{names[0]} us", "worst", "byte fl", "strm fl", "flop fl",
            "x_byte", "x_strm", "%mm", "router/eager"] + [f"{p} err,us,x" for p in names[1:]]
    table = []
    for r in rows:
        first = r.get(names[0], {})
        o = first.get("us")
        fl = [r.get(f"{n}_floor_us") for n in ("byte", "stream", "flop")]
        x = [o / v if o and v else None for v in fl]
        cells = [r["model"], str(r["T"]), _f((first.get("check") or {}).get("err"), "{:.1e}"),
                 _f(o), _f(first.get("worst")), *map(_f, fl),
                 _f(x[0], "{:.2f}"), _f(x[1], "{:.2f}"), _f(x[2] and 100 / x[2], "{:.0f}"),
                 f"{_f(r.get('router_us'))}/{_f(r.get('eager_router_us'))}"]
        for p in names[1:]:
            res = r.get(p, {"error": "not run"})
            pu, err = res.get("us"), (res.get("check") or {}).get("err")
            ratio = _f(o / pu if o and pu else None, "{:.3f}")
            cells.append("ERROR" if "error" in res else f"{_f(err, '{:.1e}')},{_f(pu)},{ratio}")
        checks = {key: v for key, v in (first.get("check") or {}).items() if key != "err"}
        notes = [f"{key}={v:.1e}" if isinstance(v, float) else f"{key}={v}"
                 for key, v in {**checks, **first.get("graph", {})}.items()]
        notes += [f"{n}: {r[n]['error'][:100]}" for n in names if "error" in r.get(n, {})]
        notes += [f"floors: {r['error'][:100]}"] if "error" in r else []
        notes += [f"{n}: {r[n]['flag']}" for n in names if r.get(n, {}).get("flag")]
        table.append((cells, " ".join(notes)))
    widths = [max(len(c[i]) for c in [head] + [cells for cells, _ in table])
              for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cells, widths)) + "  " + notes
             for cells, notes in [(head, "checks")] + table]
    top = (f"times in us (CUDA graph, median of rounds, L2 cold); floor bandwidth "
           f"{bw.describe()}, bf16 matmul {tf:.0f} TFLOP/s\n" if bw else "")
    return top + "\n".join(lines) + "\n"


# ---------------------------------------------------------------- decode diagnosis ------------
class _Skip:
    def __getitem__(self, grid):  # `kernel[grid](...)` launches nothing
        return lambda *a, **k: None


# each step's kernels as (module of triton_moe_details, attribute): launches.py reads these
# attributes at every call, so replacing one changes what the next call launches
_STEP_KERNELS = {"route": [("_route", "_route_kernel"), ("_route", "_route_scan_kernel")],
                 "gemm1": [("_gemm1", "_gemm1_kernel"), ("_gemm1", "_act_kernel"),
                           ("_mma2", "_gemm1_kernel")],
                 "gemm2": [("_gemm2", "_gemm2_kernel"), ("_mma2", "_gemm2_kernel")],
                 "finalize": [("_finalize", "_finalize_kernel")]}


@contextlib.contextmanager
def skipping(steps):
    """Within the block, the kernels of `steps` (keys of _STEP_KERNELS) launch nothing. Leave
    out "route" only with both GEMMs: they index rows by its (then unwritten) output."""
    with contextlib.ExitStack() as stack:
        for mod, attr in (ka for step in steps for ka in _STEP_KERNELS[step]):
            module = importlib.import_module(f"{DETAILS}.{mod}")
            stack.enter_context(mock.patch.object(module, attr, _Skip()))
        yield


def diag(gen, shape, one=False):
    """Where does decode time go at `shape` (model:T)? The forward timed with steps left out,
    and a plain read of the touched experts' w13 bytes. `one`: three eager calls (for ncu)."""
    model, T = shape.split(":")
    E, H, I, k, act, biases = MODELS[model]
    canon, ours = weight_sets(model, gen)
    inputs = draw_inputs(E, H, int(T), gen)
    if one:
        for _ in range(3):
            call(triton_moe, inputs[0][0], *W.route(inputs[1][0], k, act), ours[0], act)
        torch.cuda.synchronize()
        return 0
    res = {}
    for label, steps in (("full", ()), ("no_gemm2", ("gemm2",)), ("no_gemm1", ("gemm1",)),
                         ("route_finalize_only", ("gemm1", "gemm2")),
                         ("nothing", tuple(_STEP_KERNELS))):
        with skipping(steps):
            res[label] = time_forward(triton_moe, ours, k, act, inputs)
    touched = W.distinct_experts(W.route(inputs[1][0], k, act)[0])
    res["stream_touched_w13"] = F.stream_floor_us(touched * ours[0][0][0].numel(), device=DEV)
    for key, v in res.items():
        log(f"DIAG {shape} {key}: {v:.1f} us")
    with open(os.path.join(OUT, "diag.json"), "w") as f:
        json.dump({"shape": shape, **res}, f, indent=1)
    return 0


@triton.jit
def _reader_step(i, BN: tl.constexpr, BKW: tl.constexpr, CONTIG: tl.constexpr):
    if CONTIG:
        return i * (BN * BKW) + tl.arange(0, BKW)[None, :]
    return _tiled_cols(i * BKW * 8, BKW, 8)[None, :]


@triton.jit
def _reader_kernel(w_ptr, dst, n_tiles, steps, N: tl.constexpr, K_WORDS: tl.constexpr,
                   BN: tl.constexpr, BKW: tl.constexpr, CONTIG: tl.constexpr,
                   UNROLL: tl.constexpr, SPLIT: tl.constexpr):
    """Read what one decode GEMM program reads, nothing else: BN prepared weight rows of expert
    pid // n_tiles, BKW words per step, in the 16-row tiled layout (_dequant._tiled_rows /
    _tiled_cols); CONTIG: as much, as one contiguous run per program. `steps` (of a K chunk of
    SPLIT) is a runtime value: one step's loads in flight per warp (Triton does not pipeline
    loads that feed no dot); UNROLL: a compile-time loop over all of K, unrolled."""
    pid = tl.program_id(0)
    r = (pid % n_tiles) * BN + tl.arange(0, BN)
    if CONTIG:
        base = w_ptr + pid.to(tl.int64) * (BN * K_WORDS) + tl.arange(0, BN)[:, None] * BKW
    else:
        base = (w_ptr + (pid // n_tiles).to(tl.int64) * (N * K_WORDS)
                + _tiled_rows(r, K_WORDS, 8)[:, None])
    acc = tl.zeros([BN, BKW], dtype=tl.int32)
    if UNROLL:
        for i in tl.static_range(K_WORDS // BKW):
            acc ^= tl.load(base + _reader_step(i, BN, BKW, CONTIG))
    else:
        i0 = tl.program_id(1) * steps
        for i in range(i0, i0 + steps):
            acc ^= tl.load(base + _reader_step(i, BN, BKW, CONTIG))
    tl.store(dst + pid * SPLIT + tl.program_id(1), tl.sum(tl.sum(acc, 1), 0))


# (BN, words per step, register cap, contiguous, unrolled, K split): the decode GEMM's grid and
# tiles (BN 64, 128-code steps = 16 words, 64 registers) and its neighbours
READERS = [(64, 16, 64, False, False, 1), (64, 16, 64, True, False, 1),
           (64, 16, 64, False, True, 1), (64, 16, 64, True, True, 1),
           (64, 16, None, False, True, 1), (128, 16, None, False, True, 1),
           (64, 32, 64, False, False, 1), (64, 8, 64, False, True, 1),
           (64, 16, 64, False, False, 2), (64, 16, 64, False, False, 4)]


def diag_reader(shape, which="1"):
    """How fast do plain readers (READERS) stream all E experts' w13 (`which` "1") or w2 with
    the decode grid, against the stream floor? Separates the access pattern and the grid from
    what the GEMM does per step."""
    E, H, I, k, act, biases = MODELS[shape.split(":")[0]]
    N, kw = (2 * I, H // 8) if which == "1" else (H, I // 8)
    nbytes = E * N * kw * 4
    bufs = [torch.empty(nbytes, dtype=torch.uint8, device=DEV).random_().view(torch.int32)
            for _ in range(2)]
    res = {"bytes": nbytes}
    for BN, BKW, nreg, contig, unroll, split in READERS:
        n_tiles = N // BN
        dst = torch.empty(E * n_tiles * split, dtype=torch.int32, device=DEV)
        opts = dict(num_warps=4, num_stages=3, **({"maxnreg": nreg} if nreg else {}))

        def fn():
            for b in bufs:
                _reader_kernel[(E * n_tiles, split)](b, dst, n_tiles, kw // BKW // split, N=N,
                                                      K_WORDS=kw, BN=BN, BKW=BKW, CONTIG=contig,
                                                      UNROLL=unroll, SPLIT=split, **opts)
        key = (f"BN{BN}_BKW{BKW}_reg{nreg}_{'contig' if contig else 'tiled'}"
               f"{'_unrolled' if unroll else ''}{f'_split{split}' if split > 1 else ''}")
        res[key] = Hn.graph_time_us(fn, len(bufs), device=DEV)
    res["stream_floor"] = F.stream_floor_us(nbytes, bufs, device=DEV)
    for key, us in list(res.items())[1:]:
        log(f"READER {key}: {us:.1f} us, {nbytes / us / 1e6:.3f} TB/s")
    with open(os.path.join(OUT, "reader.json"), "w") as f:
        json.dump(res, f, indent=1)
    return 0


# ---------------------------------------------------------------- main ------------------------
def parser():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    arg = ap.add_argument
    arg("--models", default="20b,120b,mixtral")
    arg("--tokens", default=",".join(map(str, TOKENS)))
    arg("--shapes", help="model:T pairs instead of models x tokens, e.g. 20b:1,120b:4096")
    arg("--no-timing", action="store_true", help="checks (a) and (b) only")
    arg("--quick", action="store_true", help="no graph check (b), no peers")
    arg("--no-peers", action="store_true")
    arg("--rounds", type=int, default=3, help="interleaved timings per kernel (median reported)")
    arg("--seed", type=int, default=0, help="weights and inputs (routing draws)")
    arg("--launch-ab", metavar="VARIANTS", help="comma-separated launch-policy variants, each "
        f"one of {', '.join(VARIANTS)} or field=value[+field=value] of LaunchPolicy; the first "
        "is the reference (the only one graph-checked)")
    arg("--diag", action="store_true", help="decode time breakdown at --diag-shape")
    arg("--diag-one", action="store_true", help="three eager calls at --diag-shape (for ncu)")
    arg("--diag-reader", action="store_true", help="plain readers of one GEMM's weights")
    arg("--diag-shape", default="20b:1", help="model:T of the --diag* tools")
    arg("--reader-gemm", choices=("1", "2"), default="1", help="--diag-reader: w13 or w2")
    return ap


def main(argv=None):
    args = parser().parse_args(argv)
    plan = parse_shapes(args.models, args.tokens, args.shapes)
    variants = parse_variants(args.launch_ab) if args.launch_ab else None
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    os.makedirs(OUT, exist_ok=True)
    props = torch.cuda.get_device_properties(DEV)
    tuned = policy.policy_for(props.major, props.minor).tuned_on
    log(f"device {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, "
        f"triton {triton.__version__}; launch policy tuned on {tuned or 'nothing (UNTUNED)'}")
    gen = torch.Generator(device=DEV).manual_seed(args.seed)
    if args.diag_reader:
        return diag_reader(args.diag_shape, args.reader_gemm)
    if args.diag or args.diag_one:
        return diag(gen, args.diag_shape, one=args.diag_one)
    return run(args, plan, gen, variants)


if __name__ == "__main__":
    sys.exit(main())
