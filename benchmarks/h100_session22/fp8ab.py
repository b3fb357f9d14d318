"""A/B at prefill shapes: bf16 path, fp8 via _wgmma_fp8, fp8 via _fp8.py's Triton kernels.
Same process, interleaved rounds, CUDA graphs, 2 weight sets (L2 cold as bench op)."""
import sys, json, os, time, torch
from mxfp4_compile.bench import op as O, workloads as W, harness as Hn, floors as F
from mxfp4_compile.ops.kernels.triton_moe_details import policy
from mxfp4_compile.ops.moe_torch import moe_torch
dev = torch.device("cuda"); gen = torch.Generator(device=dev).manual_seed(0)
shapes = [(s.split(":")[0], int(s.split(":")[1])) for s in sys.argv[1].split(",")]
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
out_dir = os.environ.get("OUT", ".")
tf = F.matmul_tflops(dev); tf8 = F.fp8_matmul_tflops(dev)
print(f"{torch.cuda.get_device_name()} bf16 mm {tf:.1f} fp8 mm {tf8:.1f} TFLOP/s", flush=True)
VARIANTS = [("bf16", "triton", {}), ("fp8_gluon", "triton_fp8", {}),
            ("fp8_triton", "triton_fp8", {"fp8_wgmma": False})]
rows = []
models = []
for m, _ in shapes:
    if m not in models: models.append(m)
for model in models:
    E, H, I, k, act, biases = W.MODELS[model]
    canon = [W.random_canonical(E, H, I, act, biases, 32, 32, gen) for _ in range(2)]
    runners, skipped = O.make_runners(dev, ["triton", "triton_fp8"], act, H, I)
    R = {r.name: r for r in runners}
    ws = {n: [R[n].prepare(c) for c in canon] for n in R}
    for mm, T in shapes:
        if mm != model: continue
        x = torch.randn(T, H, device=dev, generator=gen).to(torch.bfloat16)
        ids, tw = W.route(torch.randn(T, E, device=dev, generator=gen), k, act)
        ref = moe_torch(x, ids, tw, *canon[0], act, W.ALPHA, W.LIMIT, None, True, sync_free=False)
        ref8 = moe_torch(x, ids, tw, *canon[0], act, W.ALPHA, W.LIMIT, None, True, sync_free=False, activations="fp8")
        xs = [torch.randn(T, H, device=dev, generator=gen).to(torch.bfloat16) for _ in range(2)]
        lg = [torch.randn(T, E, device=dev, generator=gen) for _ in range(2)]
        flops = W.flops_per_token(H, I, k) * T
        outs, times = {}, {v[0]: [] for v in VARIANTS}
        for name, kern, ov in VARIANTS:
            with policy.override(**ov):
                W.poison_free_memory(dev)
                o = R[kern].call(x, ids, tw, ws[kern][0]); torch.cuda.synchronize()
                outs[name] = o
        for rnd in range(rounds):
            for name, kern, ov in VARIANTS:
                with policy.override(**ov):
                    def fn(kern=kern):
                        for xx, ll, w in zip(xs, lg, ws[kern]):
                            i, t = W.route(ll, k, act)
                            R[kern].call(xx, i, t, w)
                    times[name].append(Hn.graph_time_us(fn, n_inner=2, device=dev))
        row = dict(model=model, T=T)
        for name, _, _ in VARIANTS:
            us = sorted(times[name])[len(times[name]) // 2]
            row[name + "_us"] = round(us, 1)
            row[name + "_TFLOPs"] = round(flops / us / 1e6, 1)
            row[name + "_relref"] = W.rel_l2(outs[name], ref)
            if name.startswith("fp8"):
                row[name + "_relemu"] = W.rel_l2(outs[name], ref8)
        row["gluon_vs_triton_fp8"] = W.rel_l2(outs["fp8_gluon"], outs["fp8_triton"])
        row["pct_bf16mm"] = {n: round(100 * row[n + "_TFLOPs"] / tf, 1) for n, _, _ in VARIANTS}
        row["spread"] = {n: [round(t, 1) for t in times[n]] for n in times}
        print(json.dumps(row), flush=True)
        rows.append(row)
    del ws, canon; torch.cuda.empty_cache()
json.dump(dict(tf=tf, tf8=tf8, device=torch.cuda.get_device_name(), rows=rows), open(os.path.join(out_dir, "fp8ab.json"), "w"), indent=1)
