"""GPU check of the "triton_kernels" backend against the float32 reference (H100 / sm90).

    PYTHONPATH=.tk:. python benchmarks/check_triton_kernels.py [--quick]

``.tk/`` holds triton_kernels unpacked from vLLM 0.33's wheel (see the backend's docstring).
For each shape: random float experts -> canonical MXFP4 (numerics.quantize, per expert) ->
backend.prepare -> backend.moe, compared with ops.moe_torch.moe_torch on the same quantized
weights (rel-L2 < 1e-2), after poisoning the caching allocator's free memory with NaN so that an
unwritten output element shows up. Also: combine=False, an expert map, a k that is not a power of
two, and a CUDA-graph capture + replay on new inputs (fails on any host sync). Ends with rough
graph-replay timings (warm L2 for small T; the team's benchmark script does the careful timing).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from mxfp4_compile import numerics
from mxfp4_compile.ops.kernels import triton_kernels_moe as tkm
from mxfp4_compile.ops.moe_torch import moe_torch

TOL = 1e-2


def poison():
    """Fill the caching allocator's free blocks with NaN: one large block (2 GiB) and 64 small
    ones (< 1 MiB, the small pool), freed again so the next allocations reuse them."""
    torch.cuda.empty_cache()
    big = torch.empty(1 << 29, dtype=torch.float32, device="cuda").fill_(float("nan"))
    small = [torch.empty(1 << 17, dtype=torch.float32, device="cuda").fill_(float("nan"))
             for _ in range(64)]
    del big, small


def make_experts(E, H, I, activation, bias, seed):
    """Canonical MXFP4 weights for E random experts, quantized one expert at a time."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q13, s13, q2, s2 = [], [], [], []
    for _ in range(E):
        w13 = torch.randn(2 * I, H, device="cuda", generator=g) / H ** 0.5
        w2 = torch.randn(H, I, device="cuda", generator=g) / I ** 0.5
        a, b = numerics.quantize(w13, "round_up")
        q13.append(a), s13.append(b)
        a, b = numerics.quantize(w2, "round_up")
        q2.append(a), s2.append(b)
    b13 = torch.randn(E, 2 * I, device="cuda", generator=g) * 0.1 if bias else None
    b2 = torch.randn(E, H, device="cuda", generator=g) * 0.1 if bias else None
    return torch.stack(q13), torch.stack(s13), b13, torch.stack(q2), torch.stack(s2), b2


def routing(T, E, k, seed, style):
    g = torch.Generator(device="cuda").manual_seed(seed)
    logits = torch.randn(T, E, device="cuda", generator=g)
    if style == "gpt-oss":  # top-k, then softmax over the k
        vals, ids = logits.topk(k, dim=-1)
        return ids.to(torch.int32), torch.softmax(vals, dim=-1)
    probs = torch.softmax(logits, dim=-1)  # Mixtral: softmax, top-k, renormalize
    vals, ids = probs.topk(k, dim=-1)
    return ids, vals / vals.sum(-1, keepdim=True)


def rel_l2(out, ref):
    out, ref = out.float(), ref.float()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def run_case(name, canon, prepared, T, k, E, H, act, style, seed, *, combine=True, expert_map=None,
             E_global=None):
    ids, w = routing(T, E_global or E, k, seed, style)
    x = torch.randn(T, H, device="cuda", generator=torch.Generator(device="cuda").manual_seed(seed + 1))
    x = x.to(torch.bfloat16)
    poison()
    out = tkm.moe(x, ids, w, *prepared, act, 1.702, 7.0, expert_map, combine)
    torch.cuda.synchronize()
    ref = moe_torch(x, ids, w, *canon, act, 1.702, 7.0, expert_map, combine, sync_free=False)
    finite = bool(torch.isfinite(out).all())
    err = rel_l2(out, ref)
    ok = finite and err < TOL and out.shape == ref.shape and out.dtype == x.dtype
    print(f"  {name:<34} T={T:<5} rel-L2 {err:.2e} finite={finite} shape={tuple(out.shape)} "
          f"{'ok' if ok else 'FAIL'}", flush=True)
    return ok


def graph_check(prepared, E, H, k, act, T=64):
    """Capture moe under torch.cuda.graph, replay on new inputs, compare with eager."""
    ids, w = routing(T, E, k, 123, "gpt-oss")
    x = torch.randn(T, H, device="cuda").to(torch.bfloat16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            tkm.moe(x, ids, w, *prepared, act, 1.702, 7.0, None, True)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = tkm.moe(x, ids, w, *prepared, act, 1.702, 7.0, None, True)
    ids2, w2 = routing(T, E, k, 456, "gpt-oss")
    x2 = torch.randn(T, H, device="cuda").to(torch.bfloat16)
    x.copy_(x2), ids.copy_(ids2), w.copy_(w2)
    g.replay()
    eager = tkm.moe(x2, ids2, w2, *prepared, act, 1.702, 7.0, None, True)
    torch.cuda.synchronize()
    same = torch.equal(out, eager)
    first = out.clone()
    for _ in range(100):
        g.replay()
    torch.cuda.synchronize()
    stable = torch.equal(out, first)
    print(f"  cuda graph T={T}: replay on new inputs == eager: {same}; 100 replays bit-stable: "
          f"{stable}", flush=True)
    return same and stable


def time_graph(fn, iters=50):
    """Median CUDA-graph replay time (us) of fn()."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(5):
        g.replay()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return statistics.median(times)


def time_moe(prepared, E, H, k, act, T):
    ids, w = routing(T, E, k, 7, "gpt-oss")
    x = torch.randn(T, H, device="cuda").to(torch.bfloat16)
    api = tkm.API.require()
    row = {}
    for split_k in (1, None):
        tkm.SPLIT_K = split_k
        row[f"split_k={split_k or 'auto'}"] = time_graph(
            lambda: tkm.moe(x, ids, w, *prepared, act, 1.702, 7.0, None, True))
    tkm.SPLIT_K = 1
    row["routing only"] = time_graph(lambda: tkm._routing(api, ids, w, E))
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer shapes (smoke test)")
    args = ap.parse_args()
    import triton
    print(f"torch {torch.__version__}, triton {triton.__version__}, GPU "
          f"{torch.cuda.get_device_name()} sm{''.join(map(str, torch.cuda.get_device_capability()))}")
    print(f"triton_kernels API: {tkm.api_description() or tkm.api_error()}")
    reason = tkm.unavailable_reason(torch.device("cuda"))
    if reason:
        print(f"backend unavailable: {reason}")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    ok = True
    Ts = [1, 8, 64] if args.quick else [1, 8, 64, 512, 4096]
    shapes = [("gpt-oss-20b", 32, 2880, 2880, 4, "swiglu_oai", True, "gpt-oss"),
              ("gpt-oss-120b", 128, 2880, 2880, 4, "swiglu_oai", True, "gpt-oss")]
    if not args.quick:
        shapes.append(("mixtral-style", 8, 4096, 14336, 2, "silu_glu", False, "mixtral"))
    timings = {}
    for name, E, H, I, k, act, bias, style in shapes:
        t0 = time.time()
        canon = make_experts(E, H, I, act, bias, seed=E)
        prepared = tkm.prepare(*canon, act)
        torch.cuda.synchronize()
        print(f"{name}: E={E} H={H} I={I} k={k} {act} bias={bias} (prepared in "
              f"{time.time() - t0:.1f}s)", flush=True)
        for T in (Ts if name != "mixtral-style" else [1, 64, 512]):
            try:
                ok &= run_case(name, canon, prepared, T, k, E, H, act, style, seed=T)
            except Exception as e:  # noqa: BLE001 - report and go on
                ok = False
                print(f"  {name} T={T}: ERROR {type(e).__name__}: {e}", flush=True)
        if name == "gpt-oss-20b":
            extra = [
                ("combine=False", dict(combine=False), 64, k),
                ("k=3 (padded to 4 inside)", {}, 64, 3),
            ]
            for label, kw, T, kk in extra:
                try:
                    ok &= run_case(f"{name} {label}", canon, prepared, T, kk, E, H, act, style,
                                   seed=99, **kw)
                except Exception as e:  # noqa: BLE001
                    ok = False
                    print(f"  {label}: ERROR {type(e).__name__}: {e}", flush=True)
            try:  # expert parallel: this rank holds global experts 16..31 as local 0..15
                E_loc = E // 2
                emap = torch.full((E,), -1, dtype=torch.int32, device="cuda")
                emap[E_loc:] = torch.arange(E_loc, dtype=torch.int32, device="cuda")
                canon_l = tuple(None if t is None else t[E_loc:].contiguous() for t in canon)
                prep_l = tkm.prepare(*canon_l, act)
                for comb in (True, False):
                    ok &= run_case(f"{name} expert_map combine={comb}", canon_l, prep_l, 64, k,
                                   E_loc, H, act, style, seed=5, combine=comb, expert_map=emap,
                                   E_global=E)
                del prep_l, canon_l
            except Exception as e:  # noqa: BLE001
                ok = False
                print(f"  expert_map: ERROR {type(e).__name__}: {e}", flush=True)
            try:
                ok &= graph_check(prepared, E, H, k, act)
            except Exception as e:  # noqa: BLE001
                ok = False
                print(f"  cuda graph: ERROR {type(e).__name__}: {e}", flush=True)
        if style == "gpt-oss":
            try:
                timings[name] = {T: time_moe(prepared, E, H, k, act, T) for T in Ts}
            except Exception as e:  # noqa: BLE001
                print(f"  timing: ERROR {type(e).__name__}: {e}", flush=True)
        del canon, prepared
        torch.cuda.empty_cache()
    if timings:
        print("rough CUDA-graph replay medians (us; full forward incl. routing; L2 not flushed):")
        for name, rows in timings.items():
            for T, row in rows.items():
                print(f"  {name} T={T:<5} " + ", ".join(f"{k} {us:.1f}" for k, us in row.items()))
    print("ALL OK" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
