"""The attention projections of one decode step at gpt-oss-20b widths, 24 layers, timed as one
CUDA graph, M = 1, 2, 4, 8 rows (batch B decode), each way they can run:
  cublas      q, k, v, o as four F.linear (eager: the cuBLAS GEMVs Inductor also calls for addmm)
  fused_qkv   q/k/v concatenated into one F.linear, plus o (needs a kept-current concatenation)
  inductor    the 24 layers compiled by stock Inductor (its choice for addmm: cuBLAS)
  gemv        compiled by backend="mxfp4" with options={"decode_gemv": True} and max_rows 8: each
              projection a reduction over K (passes/decode_gemv.py)
  gemv_cdt    the same with Inductor's coordinate-descent tuning of its kernels
  gemv_combo  the same with Inductor's combo kernels (independent kernels such as q, k and v's
              reductions share one launch)
  read        a plain read of the same bytes (the floor)
plus the LM head alone (201088 x 2880, one weight) and the 24 routers (2880 -> 32, with bias) at
M = 1: cublas against gemv. Distinct weights per layer, so the L2 holds none of them from one
layer to the next; outputs of gemv checked against cublas (rel-L2). Timed with the bench
harness's CUDA-graph timer.

    PYTHONPATH=. python benchmarks/projections.py [OUT_DIR] [--rows 1,2,4,8] [--variants ...]
    # GPU only; writes projections.json
"""
import argparse
import dataclasses
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import mxfp4_compile  # noqa: F401  (registers backend="mxfp4")
from mxfp4_compile.backend import last_compile_info
from mxfp4_compile.bench.harness import graph_time_us
from mxfp4_compile.bench.workloads import rel_l2
from mxfp4_compile.passes import decode_gemv

H, Q, KV, LAYERS, VOCAB = 2880, 4096, 512, 24, 201088
ROWS = (1, 2, 4, 8)


class Projections(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.ModuleList(nn.Linear(H, Q) for _ in range(LAYERS))
        self.k = nn.ModuleList(nn.Linear(H, KV) for _ in range(LAYERS))
        self.v = nn.ModuleList(nn.Linear(H, KV) for _ in range(LAYERS))
        self.o = nn.ModuleList(nn.Linear(Q, H) for _ in range(LAYERS))

    def forward(self, x):  # x [M, H]; every output returned (no other kernel in the timing)
        outs = []
        for i in range(LAYERS):
            q = self.q[i](x)
            outs += [self.o[i](q), self.k[i](x), self.v[i](x)]
        return outs


class Routers(nn.Module):
    """The routers of 24 layers (2880 -> 32 experts, with bias), one after the other."""

    def __init__(self):
        super().__init__()
        self.r = nn.ModuleList(nn.Linear(H, 32) for _ in range(LAYERS))

    def forward(self, x):
        return [r(x) for r in self.r]


def rel(a, b):
    """rel-L2 of one output or of a list of them (concatenated)."""
    if isinstance(a, (list, tuple)):
        a, b = torch.cat([t.flatten() for t in a]), torch.cat([t.flatten() for t in b])
    return rel_l2(a, b)


VARIANTS = ("inductor", "gemv", "gemv_cdt", "gemv_combo")


def main(out, rows=ROWS, variants=VARIANTS):
    dev = "cuda"
    torch.manual_seed(0)
    mod = Projections().to(dev, torch.bfloat16).eval()
    qkv = [(torch.cat([mod.q[i].weight, mod.k[i].weight, mod.v[i].weight]),
            torch.cat([mod.q[i].bias, mod.k[i].bias, mod.v[i].bias])) for i in range(LAYERS)]
    nbytes = sum(p.numel() * 2 for n, p in mod.named_parameters() if n.endswith("weight"))
    flat = torch.empty(nbytes // 4, device=dev, dtype=torch.float32)

    def fused(x):
        outs = []
        for i in range(LAYERS):
            y = F.linear(x, *qkv[i])
            outs += [mod.o[i](y[:, :Q]), y[:, Q:]]
        return outs

    # rows up to 8 for this measurement (the shipped limits are what it shows)
    decode_gemv.LIMITS[tuple(torch.cuda.get_device_capability())] = \
        decode_gemv.Limits(max_rows=8, min_n=256, max_elements=1 << 40)
    torch._dynamo.config.recompile_limit = 64
    gemv = dict(dynamic=False, backend="mxfp4", options={"decode_gemv": True})
    comp = dict(inductor=torch.compile(mod, dynamic=False), gemv=torch.compile(mod, **gemv),
                gemv_cdt=torch.compile(mod, **gemv), gemv_combo=torch.compile(mod, **gemv))
    comp = {k: v for k, v in comp.items() if k in variants}
    tuning = dict(gemv_cdt=dict(coordinate_descent_tuning=True), gemv_combo=dict(combo_kernels=True))
    res = dict(gpu=torch.cuda.get_device_name(), bytes=nbytes, layers=LAYERS)
    with torch.no_grad():
        res["read_us"] = graph_time_us(flat.sum, 1)
        for m in rows:
            x = torch.randn(m, H, device=dev, dtype=torch.bfloat16)
            ref = mod(x)
            r = dict(cublas_us=graph_time_us(lambda: mod(x), 1),
                     fused_qkv_us=graph_time_us(lambda: fused(x), 1))
            for name, fn in comp.items():
                with torch._inductor.config.patch(tuning.get(name, {})):  # compiles here
                    r[f"{name}_rel_l2"] = rel(fn(x), ref)
                r[f"{name}_us"] = graph_time_us(lambda: fn(x), 1)
            if last_compile_info:
                r["gemv_rewrites"] = last_compile_info[-1].get("decode_gemvs")
            res[f"M{m}"] = r
            print(m, json.dumps(r), flush=True)
        head = nn.Linear(H, VOCAB, bias=False).to(dev, torch.bfloat16)
        x = torch.randn(1, H, device=dev, dtype=torch.bfloat16)
        g = torch.compile(head, dynamic=False, backend="mxfp4", options={"decode_gemv": True})
        res["lm_head_M1"] = dict(cublas_us=graph_time_us(lambda: head(x), 1),
                                 gemv_us=graph_time_us(lambda: g(x), 1),
                                 gemv_rel_l2=rel(g(x), head(x)), bytes=head.weight.numel() * 2)
        # the routers (N = 32 with bias; decode_gemv leaves N < 256 to cuBLAS, whose split-K GEMV
        # and reduce take two launches a layer): 24 layers, one row, cuBLAS against a reduction
        routers = Routers().to(dev, torch.bfloat16).eval()
        cap = tuple(torch.cuda.get_device_capability())
        lim = decode_gemv.LIMITS[cap]
        decode_gemv.LIMITS[cap] = dataclasses.replace(lim, min_n=32)
        try:
            gr = torch.compile(routers, dynamic=False, backend="mxfp4",
                               options={"decode_gemv": True})
            res["routers_M1"] = dict(cublas_us=graph_time_us(lambda: routers(x), 1),
                                     gemv_us=graph_time_us(lambda: gr(x), 1),  # compiles here
                                     gemv_rel_l2=rel(gr(x), routers(x)),
                                     gemv_rewrites=last_compile_info[-1].get("decode_gemvs"))
        finally:
            decode_gemv.LIMITS[cap] = lim
    res["read_GBps"] = nbytes / res["read_us"] / 1e3
    print(json.dumps(res, indent=1))
    with open(os.path.join(out, "projections.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", nargs="?", default=".")
    ap.add_argument("--rows", default=",".join(map(str, ROWS)), help="comma list of M")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"compiled variants to time, of {', '.join(VARIANTS)}")
    a = ap.parse_args()
    bad = set(a.variants.split(",")) - set(VARIANTS)
    if bad:
        raise SystemExit(f"--variants: unknown {sorted(bad)}; use some of {', '.join(VARIANTS)}")
    main(a.out, tuple(int(m) for m in a.rows.split(",")), a.variants.split(","))
