"""``python -m mxfp4_compile.bench op``: the fused MoE alone, every kernel and peer side by side.

Per model shape (floors.MODELS) and token count T:
  1. random MXFP4 weights (canonical layout, R sets), each kernel's layout prepared from them;
  2. correctness first: router logits -> top-k -> each kernel on the same inputs, rel-L2 against
     the float32 reference on the same MXFP4 bytes (< --tol), freed GPU memory filled with NaN
     before each call (an unwritten output element shows as NaN and fails the check). A kernel
     that fails is not timed;
  3. timing: the whole forward (routing from logits + the MoE) for R weight sets in one CUDA
     graph (R sets exceed L2, so weights come from HBM), median of replays / R;
  4. floors from the same run (floors.py): byte floor (bytes / max of large copies and a large
     read stream; the winner is reported), streaming floor (T <= 64), FLOP floor. A time faster
     than any of its floors is flagged in ``floor_check`` (the floor or the timing is wrong).
Kernels: ours (dispatch.KERNELS that can run here; "reference" only on CPU, where it is the only
one) and peers: bf16 ``torch._grouped_mm`` MoE on the dequantized weights (what the model ran
before the rewrite), triton_kernels and FlashInfer when installed and runnable.
Outputs: op.csv (one row per model, T, kernel), op.txt (the table), op.json (floors, every
bandwidth candidate, versions).
"""
from __future__ import annotations

import csv
import json
import math
import os
import time
import traceback

import torch

from ..ops import dispatch
from ..ops.moe_torch import activate, moe_torch
from ..ops.weights import pad_packed
from .. import numerics
from . import floors as F
from . import harness as Hn
from . import workloads as W

OURS = ("triton", "triton_fp8", "reference")  # kernels this project wrote
# "triton_fp8": the triton kernel with activations="fp8" (W4A8, sm90): checked against the
# float32 reference with its own tolerance (per-row e4m3 activations cost ~3e-2 rel-L2), timed
# against the fp8 matmul rate as its FLOP floor
FP8_TOL = 5e-2
PEERS = ("bf16_grouped_mm", "triton_kernels", "flashinfer")
CSV_FIELDS = ["model", "T", "kernel", "role", "E", "H", "I", "k", "activation", "status", "rel_l2",
              "check_passed", "poisoned", "us", "us_again", "distinct_experts", "mxfp4_bytes",
              "flops", "byte_floor_us", "stream_floor_us", "flop_floor_us", "floor_us",
              "pct_of_floor", "x_stream_floor", "achieved_GBps", "achieved_TFLOPs",
              "vs_bf16_grouped_mm", "vs_triton_kernels", "vs_flashinfer", "floor_check",
              "floor_GBps", "floor_bw_source", "bw_candidates", "copy_GBps", "matmul_TFLOPs",
              "device", "torch", "triton", "note"]
# floor_GBps: the byte floor's bandwidth (GB/s), floor_bw_source: which measurement gave it,
# bw_candidates: every candidate's GB/s, copy_GBps: the best large copy alone (read + written)


# ---------------------------------------------------------------- bf16 grouped_mm peer --------
def bf16_grouped_moe(x, ids, tw, w13, b13, w2, b2, activation):
    """bf16 MoE as transformers' grouped_mm experts run it: sort (token, slot) pairs by expert,
    two ``torch._grouped_mm`` with expert offsets, activation, un-sort, weighted sum. No host sync
    (histc, not bincount). w13 [E, 2I, H] bf16 (gate/up order of ``activation``), w2 [E, H, I]."""
    T, k = ids.shape
    E = w13.shape[0]
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    offs = torch.histc(flat.float(), bins=E, min=0, max=E - 1).cumsum(0).to(torch.int32)
    e_sorted = flat[order].long()
    xs = x[order // k]
    h = torch._grouped_mm(xs, w13.transpose(1, 2), offs=offs)
    if b13 is not None:
        h = h.float() + b13[e_sorted]
    a = activate(h.float(), activation, W.ALPHA, W.LIMIT).to(x.dtype)
    y = torch._grouped_mm(a, w2.transpose(1, 2), offs=offs)
    if b2 is not None:
        y = y.float() + b2[e_sorted]
    out = torch.empty_like(y).index_copy_(0, order, y)
    return (out.view(T, k, -1).float() * tw.float().unsqueeze(-1)).sum(1).to(x.dtype)


def dequantize_bf16(canon, H, I):
    """Canonical MXFP4 (padded to 32) -> bf16 expert weights of the real sizes (exact: every
    MXFP4 value is a bf16 value), expert by expert to bound temporaries."""
    w13, s13, b13, w2, s2, b2 = canon
    E = w13.shape[0]
    W13 = torch.empty(E, w13.shape[1], w13.shape[2] * 2, dtype=torch.bfloat16, device=w13.device)
    W2 = torch.empty(E, w2.shape[1], w2.shape[2] * 2, dtype=torch.bfloat16, device=w13.device)
    for e in range(E):
        W13[e] = numerics.dequantize(w13[e], s13[e], torch.bfloat16)
        W2[e] = numerics.dequantize(w2[e], s2[e], torch.bfloat16)
    assert W13.shape[1:] == (2 * I, H) and W2.shape[1:] == (H, I), "bench canonical weights must be unpadded"
    return W13, b13, W2, b2


# ---------------------------------------------------------------- runners ---------------------
class Runner:
    """One kernel or peer: prepare(canonical) -> weight set; call(x, ids, tw, wset) -> [T, H]."""

    def __init__(self, name, role, prepare, call, tol=None, fp8=False):
        self.name, self.role, self.prepare, self.call = name, role, prepare, call
        self.tol, self.fp8 = tol, fp8  # tol: its own check tolerance (None: --tol)


def make_runners(device, kernels, activation, H, I):
    """-> (runners, {name: reason not run})."""
    runners, skipped = [], {}
    for name in kernels:
        if name == "bf16_grouped_mm":
            if not hasattr(torch, "_grouped_mm"):
                skipped[name] = "this torch has no torch._grouped_mm"
                continue
            runners.append(Runner(
                name, "peer", lambda c: dequantize_bf16(c, H, I),
                lambda x, ids, tw, w: bf16_grouped_moe(x, ids, tw, w[0], w[1], w[2], w[3], activation)))
            continue
        fp8 = name == "triton_fp8"
        try:
            reason = dispatch.unavailable_reason("triton" if fp8 else name, device)
            if fp8 and reason is None and (device.type != "cuda"
                                           or torch.cuda.get_device_capability(device)[0] != 9):
                reason = "FP8 activations run on sm90 only"
        except Exception as e:  # noqa: BLE001 - a peer must never stop the run
            reason = f"{type(e).__name__}: {e}"
        if reason is not None:
            skipped[name] = reason
            continue
        backend = dispatch.get_kernel("triton" if fp8 else name)
        hm, im = backend.H_MULTIPLE, backend.I_MULTIPLE
        hp, ip = -(-H // hm) * hm, -(-I // im) * im
        kw = {"activations": "fp8"} if fp8 else {}

        def prep(c, backend=backend, hp=hp, ip=ip, kw=kw):
            return backend.prepare(*pad_packed(*c, activation=activation, hp=hp, ip=ip), activation,
                                   **kw)

        def call(x, ids, tw, w, backend=backend, kw=kw):
            return backend.moe(x, ids, tw, *w, activation, W.ALPHA, W.LIMIT, None, True, **kw)
        runners.append(Runner(name, "ours" if name in OURS else "peer", prep, call,
                              FP8_TOL if fp8 else None, fp8))
    return runners, skipped


def default_kernels(device) -> list[str]:
    ours = [k for k in dispatch.KERNELS if k in OURS and (k != "reference" or device.type == "cpu")]
    if "triton" in ours and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9:
        ours.insert(ours.index("triton") + 1, "triton_fp8")
    others = [k for k in dispatch.KERNELS if k not in OURS]
    return ours + ["bf16_grouped_mm"] + others


# ---------------------------------------------------------------- main loop -------------------
def run(args) -> int:
    device = torch.device(args.device)
    os.makedirs(args.out, exist_ok=True)
    info = Hn.device_summary(device)
    t_start = time.time()
    gen = torch.Generator(device=device).manual_seed(args.seed)
    kernels = args.kernels.split(",") if args.kernels != "auto" else default_kernels(device)
    models = args.models.split(",")
    tokens = [int(t) for t in args.tokens.split(",")]
    band = F.measure_bandwidth(device)
    bw = band.GBps
    tf = F.matmul_tflops(device)
    tf8 = F.fp8_matmul_tflops(device) if "triton_fp8" in kernels or args.kernels == "auto" else None
    print(f"[op] {info['device']}, torch {info['torch']}, triton {info['triton']}: floor bandwidth "
          f"{band.describe()}; matmul {tf:.1f} TFLOP/s (bf16), "
          f"{'-' if tf8 is None else f'{tf8:.1f}'} (fp8)", flush=True)
    meta = dict(info, floor_GBps=bw, floor_bw_source=band.label, floor_bandwidth=band.describe(),
                bw_candidates=band.candidates, bw_meaningful=band.meaningful,
                copy_GBps=band.best_copy_GBps, matmul_TFLOPs=tf, fp8_matmul_TFLOPs=tf8,
                cuda=device.type == "cuda",
                models=models, tokens=tokens, kernels=kernels,
                r_sets=args.r_sets, tol=args.tol, skipped={},
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    csv_path = os.path.join(args.out, "op.csv")
    fh = open(csv_path, "w", newline="")
    writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
    writer.writeheader()
    rows = []
    plans = {m: make_runners(device, kernels, W.MODELS[m][4], W.MODELS[m][1], W.MODELS[m][2])
             for m in models}  # (runners, {kernel: why not run}) per model
    prog = Hn.Progress(len(tokens) * sum(len(r) for r, _ in plans.values()), "op",
                       enabled=not args.no_progress)  # one step per kernel that runs

    def emit(row):
        row.update(floor_GBps=round(bw, 1), floor_bw_source=band.label,
                   bw_candidates=band.candidates_str(), copy_GBps=_round(band.best_copy_GBps, 1),
                   matmul_TFLOPs=round(tf, 2), device=info["device"], torch=info["torch"],
                   triton=info["triton"])
        rows.append(row)
        writer.writerow({k: _fmt(row.get(k)) for k in CSV_FIELDS})
        fh.flush()

    for model in models:
        E, H, I, k, act, biases = W.MODELS[model]
        runners, skipped = plans[model]
        for n, why in skipped.items():  # printed once, in the table's "not run" line
            prev = meta["skipped"].get(n)
            if prev is None:
                meta["skipped"][n] = why
            elif why not in prev:
                meta["skipped"][n] = f"{prev}; {model}: {why}"
        over = args.budget_s and time.time() - t_start > args.budget_s
        canon, wsets = [], {}
        if not over:
            canon = [W.random_canonical(E, H, I, act, biases, 32, 32, gen) for _ in range(args.r_sets)]
            for r in runners:
                # the bf16 peer reads 4x the bytes: two sets already exceed L2 at every T
                n_sets = min(args.r_sets, 2) if r.name == "bf16_grouped_mm" and device.type == "cuda" else args.r_sets
                try:
                    wsets[r.name] = [r.prepare(c) for c in canon[:n_sets]]
                except Exception as e:  # noqa: BLE001
                    wsets[r.name] = f"prepare failed: {type(e).__name__}: {str(e)[:300]}"
        eb = W.expert_bytes(H, I, biases)
        for T in tokens:
            base = dict(model=model, T=T, E=E, H=H, I=I, k=k, activation=act)
            if args.budget_s and time.time() - t_start > args.budget_s:
                for r in runners:
                    emit(dict(base, kernel=r.name, role=r.role, status="skipped",
                              note=f"time budget ({args.budget_s:.0f} s) spent"))
                    prog.step(f"{model} T={T} {r.name} skipped")
                continue
            try:
                shape_rows = run_shape(args, device, gen, base, runners, wsets, canon, eb, bw, tf, prog,
                                       tf8)
            except Exception as e:  # noqa: BLE001 - keep going with the next shape
                traceback.print_exc()
                shape_rows = [dict(base, kernel=r.name, role=r.role, status="error",
                                   note=f"{type(e).__name__}: {str(e)[:300]}") for r in runners]
            for row in shape_rows:
                emit(row)
        del canon, wsets
        if device.type == "cuda":
            torch.cuda.empty_cache()
    prog.close()
    fh.close()
    meta["elapsed_s"] = time.time() - t_start
    with open(os.path.join(args.out, "op.json"), "w") as f:
        json.dump(meta, f, indent=1)
    table = format_table(rows, meta)
    with open(os.path.join(args.out, "op.txt"), "w") as f:
        f.write(table)
    print(table, flush=True)
    checked = [r for r in rows if r.get("status") in ("ok", "check_failed")]
    failed = [r for r in rows if r.get("status") in ("check_failed", "error")]
    print(f"[op] {len(checked)} kernel runs checked, {len(failed)} failed; CSV {csv_path}", flush=True)
    return 1 if failed and args.strict else 0


def run_shape(args, device, gen, base, runners, wsets, canon, eb, bw, tf, prog, tf8=None):
    E, H, k, act, T = base["E"], base["H"], base["k"], base["activation"], base["T"]
    x = torch.randn(T, H, device=device, generator=gen).to(torch.bfloat16)
    ids, tw = W.route(torch.randn(T, E, device=device, generator=gen), k, act)
    ref = moe_torch(x, ids, tw, *canon[0], act, W.ALPHA, W.LIMIT, None, True, sync_free=False)
    d = W.distinct_experts(ids)
    nbytes = d * eb
    flops = W.flops_per_token(H, base["I"], k) * T
    floors = dict(distinct_experts=d, mxfp4_bytes=int(nbytes), flops=flops,
                  byte_floor_us=nbytes / (bw * 1e9) * 1e6, flop_floor_us=flops / (tf * 1e12) * 1e6)
    if T <= args.stream_max_t:
        floors["stream_floor_us"] = F.stream_floor_us(nbytes, n_bufs=args.r_sets, device=device)
    floors["floor_us"] = max(floors["byte_floor_us"], floors["flop_floor_us"])
    xs = [torch.randn(T, H, device=device, generator=gen).to(torch.bfloat16) for _ in range(args.r_sets)]
    lg = [torch.randn(T, E, device=device, generator=gen) for _ in range(args.r_sets)]
    out_rows = []
    ref8 = None
    for r in runners:
        row = dict(base, kernel=r.name, role=r.role, **floors)
        if r.fp8 and tf8:  # the fp8 path's FLOP floor is the fp8 matmul rate
            row["flop_floor_us"] = flops / (tf8 * 1e12) * 1e6
            row["floor_us"] = max(row["byte_floor_us"], row["flop_floor_us"])
        ws = wsets.get(r.name)
        if isinstance(ws, str):
            row.update(status="error", note=ws)
            out_rows.append(row)
            prog.step(f"{base['model']} T={T} {r.name} prepare failed")
            continue
        try:
            W.poison_free_memory(device)
            out = r.call(x, ids, tw, ws[0])
            err = W.rel_l2(out, ref) if tuple(out.shape) == (T, H) else float("nan")
            tol = r.tol or args.tol
            ok = not math.isnan(err) and err < tol
            row.update(rel_l2=err, check_passed=ok, poisoned=device.type == "cuda")
            if r.fp8 and tuple(out.shape) == (T, H):  # and against what it emulates
                if ref8 is None:
                    ref8 = moe_torch(x, ids, tw, *canon[0], act, W.ALPHA, W.LIMIT, None, True,
                                     sync_free=False, activations="fp8")
                row["note"] = f"rel-L2 vs the fp8 emulation {W.rel_l2(out, ref8):.2e}"
            del out
            if not ok:
                row.update(status="check_failed",
                           note=f"rel-L2 {err:.3g} (tol {tol}) or non-finite / wrong shape: not timed")
            else:
                def fn(ws=ws):
                    for xx, ll, w in zip(xs, lg, ws):
                        i, t = W.route(ll, k, act)
                        r.call(xx, i, t, w)
                kw = dict(n_inner=len(ws), min_replays=args.min_replays, budget_s=args.replay_s,
                          device=device)
                row["us"] = Hn.graph_time_us(fn, **kw)
                if r.role == "ours" and args.again:
                    row["us_again"] = Hn.graph_time_us(fn, **kw)
                row["status"] = "ok"
        except Exception as e:  # noqa: BLE001 - a kernel's failure is a row, not the end of the run
            row.update(status="error", note=f"{type(e).__name__}: {str(e)[:300]}")
            prog.write(f"[op] {base['model']} T={T} {r.name}: {row['note']}")
        us = row.get("us")
        if us:
            row["floor_check"] = F.floor_check(us, {
                "byte floor": floors["byte_floor_us"], "stream floor": floors.get("stream_floor_us"),
                "FLOP floor": row["flop_floor_us"]})
            row["pct_of_floor"] = 100 * row["floor_us"] / us
            row["achieved_GBps"] = nbytes / (us * 1e-6) / 1e9
            row["achieved_TFLOPs"] = flops / (us * 1e-6) / 1e12
            if floors.get("stream_floor_us"):
                row["x_stream_floor"] = us / floors["stream_floor_us"]
        out_rows.append(row)
        prog.step(f"{base['model']} T={T} {r.name} {'%.1f us' % us if us else row.get('status')}")
    peer_us = {r["kernel"]: r.get("us") for r in out_rows if r["role"] == "peer"}
    for row in out_rows:
        for p in PEERS:
            if row.get("us") and peer_us.get(p) and row["kernel"] != p:
                row[f"vs_{p}"] = row["us"] / peer_us[p]
    return out_rows


def _round(v, nd):
    return None if v is None else round(v, nd)


def _fmt(v):
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return "" if v is None else v


def format_table(rows, meta) -> str:
    def f(v, fmt="{:.1f}"):
        return "-" if v is None or v == "" or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)

    how = (f"CUDA graph, median, L2 cold ({meta['r_sets']} weight sets)" if meta["cuda"]
           else "CPU: wall-clock medians, no CUDA graphs, numbers meaningless")
    lines = [f"{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, {meta['date']}",
             f"floor bandwidth {meta['floor_bandwidth']}; copies count bytes read + written, the "
             f"read stream bytes read; matmul {meta['matmul_TFLOPs']:.1f} TFLOP/s",
             f"whole forward (routing + MoE), {how}",
             "floor = max(MXFP4 byte floor, FLOP floor); %fl = floor / time; x_str = time / streaming "
             "floor; vs_P = time / time of peer P (<1: faster than P); '!!' marks a time under a "
             "floor: the floor or the timing is wrong, not a win",
             f"{'model':8s} {'T':>5s} {'kernel':16s} {'rel-L2':>8s} {'us':>9s} {'again':>9s} "
             f"{'floor':>8s} {'%fl':>5s} {'x_str':>6s} {'vs_bf16':>7s} {'vs_tk':>6s} {'vs_fi':>6s}"]
    for r in rows:
        head = f"{r['model']:8s} {r['T']:>5d} {r['kernel']:16s}"
        if r.get("status") not in ("ok",):
            lines.append(f"{head} {r.get('status', '?').upper()}: {str(r.get('note', ''))[:110]}")
            continue
        lines.append(f"{head} {f(r.get('rel_l2'), '{:.1e}'):>8s} {f(r.get('us')):>9s} "
                     f"{f(r.get('us_again')):>9s} {f(r.get('floor_us')):>8s} "
                     f"{f(r.get('pct_of_floor'), '{:.0f}'):>5s} {f(r.get('x_stream_floor'), '{:.2f}'):>6s} "
                     f"{f(r.get('vs_bf16_grouped_mm'), '{:.2f}'):>7s} {f(r.get('vs_triton_kernels'), '{:.2f}'):>6s} "
                     f"{f(r.get('vs_flashinfer'), '{:.2f}'):>6s}"
                     + (f"  !! {r['floor_check']}" if r.get("floor_check") else ""))
    if meta.get("skipped"):
        lines.append("not run: " + "; ".join(f"{n}: {w}" for n, w in meta["skipped"].items()))
    return "\n".join(lines) + "\n"
