"""``python -m mxfp4_compile.bench e2e``: a GptOss model compiled with backend="mxfp4" vs Inductor.

Model: transformers ``GptOssModel`` (the decoder stack, no LM head) at gpt-oss-20b widths (hidden
2880, intermediate 2880, 64 query / 8 KV heads of 64, top-4 of --experts experts, alternating
sliding / full attention), --layers layers, random weights (normal, std 0.02), bf16, experts
implementation "grouped_mm" (sort + ``torch._grouped_mm``; the per-token gather form would
materialize every token's expert weights at prefill).

Each backend compiles its own copy (``dynamic=False``: one specialization per shape, as a server
captures one graph per batch size), with CUDA graphs (mxfp4: options={"cudagraphs": True};
Inductor: mode="reduce-overhead"), under ``torch.no_grad()``:
  decode step  input_ids [B, 1] for each B in --batches (a one-token forward without KV cache:
               the MoE and projections of one step, attention over one position);
  prefill      input_ids [1, --prefill].
Per shape: the first call's wall time (compile + capture; the "compile" column), then the median
of --iters calls timed with CUDA events (GPU) or the wall clock (CPU). Also: rel-L2 of mxfp4's
output against Inductor bf16's (MXFP4 weights differ from bf16 ones, so this is not ~0: it shows
the rewrite ran and computes the same function up to quantization), expert-weight bytes held
(bf16 parameters; MXFP4 prepared tensors from the weight cache) and allocator growth across
compile + runs.
"""
from __future__ import annotations

import csv
import json
import os
import statistics
import time
import traceback

import torch

from . import harness as Hn
from . import workloads as W

CSV_FIELDS = ["backend", "shape", "batch", "seq", "status", "first_call_s", "median_us", "min_us",
              "rel_l2_vs_inductor", "expert_weight_bytes", "alloc_growth_bytes", "rewritten_moe",
              "kernel", "layers", "experts", "hidden", "device", "torch", "triton", "transformers",
              "note"]
# --backends names that compile with backend="mxfp4", and their extra options
MXFP4_BACKENDS = {"mxfp4": {}, "mxfp4_torch_router": {"fuse_router": False}}
WIDTHS = {
    "20b": dict(hidden_size=2880, intermediate_size=2880, num_attention_heads=64,
                num_key_value_heads=8, head_dim=64, num_experts_per_tok=4, sliding_window=128),
    "tiny": dict(hidden_size=64, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
                 head_dim=32, num_experts_per_tok=2, sliding_window=16),
}


def build_model(args, device):
    import transformers
    w = WIDTHS[args.width]
    layer_types = (["sliding_attention", "full_attention"] * args.layers)[: args.layers]
    cfg = transformers.GptOssConfig(
        vocab_size=args.vocab, num_hidden_layers=args.layers, num_local_experts=args.experts,
        layer_types=layer_types, max_position_embeddings=max(4096, args.prefill + 8),
        pad_token_id=0, bos_token_id=1, eos_token_id=2, **w)
    cfg._experts_implementation = "grouped_mm"
    torch.manual_seed(args.seed)
    with torch.device(device):
        m = transformers.GptOssModel(cfg)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif p.dim() >= 2:
                p.normal_(0.0, 0.02)
            else:
                p.normal_(0.0, 0.01)
    return m.to(torch.bfloat16).eval()


def expert_param_bytes(model) -> int:
    n = 0
    for name, p in model.named_parameters():
        if ".experts." in name:
            n += p.numel() * p.element_size()
    return n


def prepared_bytes(kernel, args, n_layers) -> int:
    """Bytes of the MXFP4 expert tensors of ``n_layers`` rewritten layers in ``kernel``'s layout
    (the backend's prepared_shapes at its padding; gpt-oss has both biases)."""
    from ..ops import dispatch
    w = WIDTHS[args.width]
    hp, ip = dispatch.padded_sizes(kernel, w["hidden_size"], w["intermediate_size"])
    shp = dispatch.get_kernel(kernel).prepared_shapes(args.experts, hp, ip, "swiglu_oai", True, True)
    per_layer = sum(torch.Size(s).numel() * torch.empty((), dtype=dt).element_size()
                    for s, dt in (x for x in shp if x is not None))
    return per_layer * n_layers


def shapes(args):
    out = [(f"decode_b{b}", b, 1) for b in (int(x) for x in args.batches.split(",") if x)]
    if args.prefill:
        out.append((f"prefill_{args.prefill}", 1, args.prefill))
    return out


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(cm, ids, iters, device):
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            cm(input_ids=ids, use_cache=False)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) * 1e3)
        else:
            t0 = time.perf_counter()
            cm(input_ids=ids, use_cache=False)
            times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times), min(times)


def run(args) -> int:
    device = torch.device(args.device)
    os.makedirs(args.out, exist_ok=True)
    info = Hn.device_summary(device)
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        print("[e2e] transformers is not installed: pip install 'mxfp4_compile[models]'", flush=True)
        return 2
    import mxfp4_compile  # noqa: F401  (registers backend="mxfp4")
    from .. import backend as mx_backend
    from ..ops import weights

    t_start = time.time()
    gpu = device.type == "cuda"
    backends = args.backends.split(",")
    if "inductor" in backends:  # inductor first: mxfp4's rel-L2 compares against its outputs
        backends = ["inductor"] + [b for b in backends if b != "inductor"]
    sh = shapes(args)
    g = torch.Generator().manual_seed(args.seed + 1)
    inputs = {name: torch.randint(3, args.vocab, (b, s), generator=g).to(device) for name, b, s in sh}
    rows, ref_out = [], {}
    csv_path = os.path.join(args.out, "e2e.csv")
    fh = open(csv_path, "w", newline="")
    writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
    writer.writeheader()
    prog = Hn.Progress(len(backends) * len(sh), "e2e", enabled=not args.no_progress)
    common = dict(layers=args.layers, experts=args.experts, hidden=WIDTHS[args.width]["hidden_size"],
                  device=info["device"], torch=info["torch"], triton=info["triton"],
                  transformers=info["transformers"])
    for be in backends:
        torch._dynamo.reset()
        weights.clear_cache()
        mx_backend.last_compile_info.clear()
        if gpu:
            torch.cuda.empty_cache()
        model = build_model(args, device)
        ebytes = expert_param_bytes(model)
        if be in MXFP4_BACKENDS:
            opts = {"kernel": args.kernel, "cudagraphs": gpu, **MXFP4_BACKENDS[be]}
            cm = torch.compile(model, backend="mxfp4", options=opts, dynamic=False)
        elif be == "inductor":
            cm = torch.compile(model, mode="reduce-overhead" if gpu else None, dynamic=False)
        else:
            raise SystemExit(f"unknown e2e backend {be!r}: use mxfp4 and/or inductor")
        _sync(device)
        alloc0 = torch.cuda.memory_allocated(device) if gpu else 0
        for name, b, s in sh:
            row = dict(common, backend=be, shape=name, batch=b, seq=s)
            n_info = len(mx_backend.last_compile_info)
            if args.budget_s and time.time() - t_start > args.budget_s:
                row.update(status="skipped", note=f"time budget ({args.budget_s:.0f} s) spent")
            else:
                try:
                    ids = inputs[name]
                    with torch.no_grad():
                        if gpu:
                            torch.compiler.cudagraph_mark_step_begin()
                        t0 = time.perf_counter()
                        out = cm(input_ids=ids, use_cache=False).last_hidden_state
                        _sync(device)
                        row["first_call_s"] = time.perf_counter() - t0
                        out = out.float().cpu()
                        if be == "inductor":
                            ref_out[name] = out
                        elif name in ref_out:
                            row["rel_l2_vs_inductor"] = W.rel_l2(out, ref_out[name])
                        for _ in range(2):  # warm-up (CUDA graph trees record on a later call)
                            if gpu:
                                torch.compiler.cudagraph_mark_step_begin()
                            cm(input_ids=ids, use_cache=False)
                        _sync(device)
                        row["median_us"], row["min_us"] = time_calls(cm, ids, args.iters, device)
                    row["status"] = "ok"
                except Exception as e:  # noqa: BLE001 - one backend's failure is a row
                    traceback.print_exc()
                    row.update(status="error", note=f"{type(e).__name__}: {str(e)[:300]}")
            if be in MXFP4_BACKENDS:
                infos = mx_backend.last_compile_info[n_info:]  # this shape's compile(s)
                row["rewritten_moe"] = sum(i.get("rewritten", 0) for i in infos)
                row["kernel"] = next((i["kernel"] for i in infos if i.get("kernel")), None)
                if row["kernel"]:
                    row["expert_weight_bytes"] = prepared_bytes(row["kernel"], args, row["rewritten_moe"])
                if row["rewritten_moe"] < args.layers:
                    row["note"] = (row.get("note") or "") + (
                        f" only {row['rewritten_moe']} of {args.layers} MoE layers rewritten to MXFP4 "
                        f"at this shape (the rest ran bf16): " + "; ".join(
                            f"{c.reason}" for i in infos for c in i.get("candidates", []) if not c.rewritten))
                row["note"] = (row.get("note") or "") + (f" bf16 expert params still held by the module: "
                                                          f"{ebytes} B (release_bf16_weights frees them)")
            else:
                row["expert_weight_bytes"] = ebytes
                row["kernel"] = "bf16 grouped_mm"
            if gpu:
                row["alloc_growth_bytes"] = torch.cuda.memory_allocated(device) - alloc0
            rows.append(row)
            writer.writerow({k: _fmt(row.get(k)) for k in CSV_FIELDS})
            fh.flush()
            prog.step(f"{be} {name} {row.get('median_us', row.get('status'))}")
        del cm, model
        torch._dynamo.reset()
        if gpu:
            torch.cuda.empty_cache()
    prog.close()
    fh.close()
    table = format_table(rows, info, args)
    with open(os.path.join(args.out, "e2e.txt"), "w") as f:
        f.write(table)
    with open(os.path.join(args.out, "e2e.json"), "w") as f:
        json.dump(dict(info, rows=rows, elapsed_s=time.time() - t_start), f, indent=1, default=str)
    print(table, flush=True)
    bad = [r for r in rows if r["status"] == "error"]
    print(f"[e2e] {len(rows) - len(bad)} of {len(rows)} shapes ran; CSV {csv_path}", flush=True)
    return 0


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else v


def format_table(rows, info, args) -> str:
    def f(v, fmt="{:.1f}"):
        return "-" if v is None else fmt.format(v)

    by = {(r["backend"], r["shape"]): r for r in rows}
    lines = [f"{info['device']}, torch {info['torch']}, triton {info['triton']}, transformers "
             f"{info.get('transformers')}; GptOssModel {args.width} widths, {args.layers} layers, "
             f"{args.experts} experts, grouped_mm experts, CUDA graphs on GPU",
             f"{'shape':14s} {'backend':18s} {'median us':>10s} {'first call s':>12s} "
             f"{'rel-L2 vs bf16':>14s} {'speedup':>8s} {'expert MB':>10s} {'alloc growth MB':>15s}"]
    for r in rows:
        ind = by.get(("inductor", r["shape"]), {})
        sp = (ind.get("median_us") / r["median_us"]) if r["backend"] != "inductor" and r.get("median_us") \
            and ind.get("median_us") else None
        if r["status"] != "ok":
            lines.append(f"{r['shape']:14s} {r['backend']:18s} {r['status'].upper()}: {str(r.get('note'))[:100]}")
            continue
        lines.append(f"{r['shape']:14s} {r['backend']:18s} {f(r.get('median_us')):>10s} "
                     f"{f(r.get('first_call_s'), '{:.1f}'):>12s} {f(r.get('rel_l2_vs_inductor'), '{:.2e}'):>14s} "
                     f"{f(sp, '{:.2f}x'):>8s} {f(r.get('expert_weight_bytes', 0) / 1e6, '{:.1f}'):>10s} "
                     f"{f(r['alloc_growth_bytes'] / 1e6 if r.get('alloc_growth_bytes') is not None else None, '{:.1f}'):>15s}")
    for r in rows:
        if r["backend"] in MXFP4_BACKENDS:
            lines.append(f"{r['backend']} {r['shape']}: kernel {r.get('kernel')}, {r.get('rewritten_moe')} of "
                         f"{args.layers} MoE layers rewritten;{str(r.get('note') or '')[:300]}")
    lines.append("speedup = Inductor bf16 median / mxfp4 median; expert MB = bf16 expert parameters "
                 "(inductor) or MXFP4 prepared tensors of the rewritten layers (mxfp4)")
    return "\n".join(lines) + "\n"
