"""Three eager calls of the op at one shape with a launch-policy override, for ncu.
usage: python benchmarks/h100_session22/prof22.py 20b 4096 fp8   (or base, or fp8+field=value)"""
import sys, ast, torch
from mxfp4_compile.bench import workloads as W
from mxfp4_compile.bench.workloads import ALPHA, LIMIT, MODELS
from mxfp4_compile.ops.kernels import triton_moe
from mxfp4_compile.ops.kernels.triton_moe_details import policy
model, T, var = sys.argv[1], int(sys.argv[2]), sys.argv[3]
parts = [p for p in var.split("+") if p not in ("base", "fp8")]
fp8 = "fp8" in var.split("+")
ch = {k: ast.literal_eval(v) for k, v in (p.split("=") for p in parts)}
triton_moe._fp8_checked["cuda:0"] = 0.0  # no self-check launches before the profiled ones
E, H, I, k, act, biases = MODELS[model]
g = torch.Generator(device="cuda").manual_seed(0)
canon = W.random_canonical(E, H, I, act, biases, triton_moe.H_MULTIPLE, triton_moe.I_MULTIPLE, g)
kw = {"activations": "fp8"} if fp8 else {}
wts = triton_moe.prepare(*canon, act, **kw)
x = torch.randn(T, H, device="cuda", generator=g).to(torch.bfloat16)
ids, tw = W.route(torch.randn(T, E, device="cuda", generator=g), k, act)
with policy.override(**ch):
    for _ in range(3):
        triton_moe.moe(x, ids, tw, *wts, act, ALPHA, LIMIT, None, True, **kw)
torch.cuda.synchronize()
print("done", var)
