"""Session 23 profiling helper.
  python .ab/prof23.py ncu   MODEL T [VARIANT]   three eager routed calls (route + op), for ncu
  python .ab/prof23.py trace MODEL T [VARIANT]   CUDA graph of R routed calls on R weight sets,
      torch.profiler over replays: each kernel's start/duration within one call, and the gaps.
VARIANT: base or field=val+field=val (policy override)."""
import sys, ast, json, os, statistics, torch
from mxfp4_compile.bench import workloads as W
from mxfp4_compile.bench.workloads import ALPHA, LIMIT, MODELS
from mxfp4_compile.ops.kernels import triton_moe
from mxfp4_compile.ops.kernels.triton_moe_details import policy
mode, model, T = sys.argv[1], sys.argv[2], int(sys.argv[3])
var = sys.argv[4] if len(sys.argv) > 4 else "base"
ch = {k: ast.literal_eval(v) for k, v in (p.split("=") for p in var.split("+") if p != "base")}
E, H, I, k, act, biases = MODELS[model]
g = torch.Generator(device="cuda").manual_seed(0)
R = 1 if mode == "ncu" else 4
canon = [W.random_canonical(E, H, I, act, biases, triton_moe.H_MULTIPLE, triton_moe.I_MULTIPLE, g)
         for _ in range(R)]
wts = [triton_moe.prepare(*c, act) for c in canon]
xs = [torch.randn(T, H, device="cuda", generator=g).to(torch.bfloat16) for _ in range(R)]
lg = [torch.randn(T, E, device="cuda", generator=g) for _ in range(R)]


def fn():
    for x, l, w in zip(xs, lg, wts):
        ids, tw = W.route(l, k, act)
        triton_moe.moe(x, ids, tw, *w, act, ALPHA, LIMIT, None, True)


with policy.override(**ch):
    if mode == "ncu":
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        print("done", model, T, var)
        sys.exit(0)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn(); fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    gr = torch.cuda.CUDAGraph()
    with torch.cuda.graph(gr):
        fn()
    for _ in range(5):
        gr.replay()
    torch.cuda.synchronize()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(50)]
    for a, b in ev:
        a.record(); gr.replay(); b.record()
    torch.cuda.synchronize()
    per_call = statistics.median(a.elapsed_time(b) * 1e3 / R for a, b in ev)
    from torch.profiler import profile, ProfilerActivity
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            gr.replay()
        torch.cuda.synchronize()
    evs = [e for e in prof.events() if e.device_type.name == "CUDA" and "Memcpy" not in e.name
           and "Memset" not in e.name]
    evs.sort(key=lambda e: e.time_range.start)
    n_per = len(evs) // 10
    res = dict(model=model, T=T, var=var, graph_us_per_call=round(per_call, 2), n_kernels=len(evs),
               per_replay=n_per)
    if n_per * 10 == len(evs) and n_per % R == 0:
        kpc = n_per // R
        rows = {}
        spans = []
        for rep in range(10):
            ks = evs[rep * n_per:(rep + 1) * n_per]
            for c in range(1, R):  # skip call 0 of each replay (its predecessor is the replay boundary)
                call = ks[c * kpc:(c + 1) * kpc]
                prev_end = ks[c * kpc - 1].time_range.end
                spans.append(call[-1].time_range.end - prev_end)
                for j, e in enumerate(call):
                    r = rows.setdefault(j, dict(name=e.name[:60], dur=[], start=[], gap=[]))
                    r["dur"].append(e.time_range.end - e.time_range.start)
                    r["start"].append(e.time_range.start - prev_end)
                    r["gap"].append(e.time_range.start - (call[j - 1].time_range.end if j else prev_end))
        res["call_span_us"] = round(statistics.median(spans), 2)
        res["kernels"] = [dict(name=r["name"], dur=round(statistics.median(r["dur"]), 2),
                               start=round(statistics.median(r["start"]), 2),
                               gap=round(statistics.median(r["gap"]), 2)) for r in rows.values()]
    else:
        res["names"] = [e.name[:60] for e in evs[:n_per + 2]]
    print(json.dumps(res, indent=1))
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, f"trace_{model}_{T}_{var.replace('=', '-')[:40]}.json"), "w") as f:
            json.dump(res, f, indent=1)
