"""``python -m mxfp4_compile demo``: compile a small gpt-oss-shaped MoE model with the backend.

The model is written the way OpenAI's gpt-oss reference writes its MLP block (router -> top-k ->
softmax, per-token gather of expert weights, swiglu with clamp, combine), with biases, at reduced
widths so the demo runs on a CPU in about a minute. It prints what the backend rewrote, the
accuracy of the MXFP4 model against the bf16 model, and the time per forward of the same model
compiled with plain Inductor (bf16) and with the mxfp4 backend (median of --reps calls each).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from .formats import KERNEL_CHOICES, SWIGLU_ALPHA, SWIGLU_LIMIT


class GptOssStyleMoE(nn.Module):
    """One MoE MLP block in the gpt-oss reference style. x [T, H] -> [T, H]."""

    def __init__(self, hidden, inter, experts, top_k, alpha=SWIGLU_ALPHA, limit=SWIGLU_LIMIT):
        super().__init__()
        self.top_k, self.alpha, self.limit = top_k, alpha, limit
        self.norm = nn.RMSNorm(hidden)
        self.gate = nn.Linear(hidden, experts)
        std = hidden ** -0.5
        self.mlp1_weight = nn.Parameter(torch.randn(experts, 2 * inter, hidden) * std)  # [E, 2I, H]
        self.mlp1_bias = nn.Parameter(torch.randn(experts, 2 * inter) * 0.02)
        self.mlp2_weight = nn.Parameter(torch.randn(experts, hidden, inter) * inter ** -0.5)  # [E, H, I]
        self.mlp2_bias = nn.Parameter(torch.randn(experts, hidden) * 0.02)

    def forward(self, x):
        t = self.norm(x)
        logits = self.gate(t)  # [T, E]
        top = torch.topk(logits, k=self.top_k, dim=-1, sorted=True)
        weights = F.softmax(top.values, dim=1)  # [T, k]
        h = torch.einsum("beck,bk->bec", self.mlp1_weight[top.indices], t) + self.mlp1_bias[top.indices]
        gate, up = h[..., ::2].clamp(max=self.limit), h[..., 1::2].clamp(-self.limit, self.limit)
        a = gate * torch.sigmoid(self.alpha * gate) * (up + 1)  # [T, k, I]
        y = torch.einsum("beck,bek->bec", self.mlp2_weight[top.indices], a) + self.mlp2_bias[top.indices]
        return x + torch.einsum("bec,be->bc", y, weights)


def _time(fn, x, reps) -> float:
    """Median seconds of ``reps`` calls after one warm-up call (each synchronized on CUDA)."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    fn(x)
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn(x)
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m mxfp4_compile demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=576, help="H (gpt-oss: 2880)")
    p.add_argument("--intermediate", type=int, default=576, help="I (gpt-oss: 2880)")
    p.add_argument("--experts", type=int, default=8, help="E (gpt-oss-20b: 32)")
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--kernel", default="auto", choices=KERNEL_CHOICES)
    p.add_argument("--reps", type=int, default=None, help="timed calls per model (default: 10 on "
                   "CPU, 50 on CUDA)")
    args = p.parse_args(argv)

    import mxfp4_compile

    torch.manual_seed(0)
    dev = torch.device(args.device)
    model = nn.Sequential(*[GptOssStyleMoE(args.hidden, args.intermediate, args.experts, args.top_k)
                            for _ in range(args.layers)]).to(dev, torch.bfloat16).eval()
    x = torch.randn(args.tokens, args.hidden, device=dev, dtype=torch.bfloat16)
    print(f"model: {args.layers} gpt-oss-style MoE layers, E={args.experts} top-{args.top_k} "
          f"H={args.hidden} I={args.intermediate}, bf16, {args.tokens} tokens on {dev}")
    with torch.no_grad():
        ref = model(x)
        start = len(mxfp4_compile.backend.last_compile_info)
        compiled = torch.compile(model, backend="mxfp4", options={"kernel": args.kernel})
        t0 = time.perf_counter()
        out = compiled(x)
        compile_s = time.perf_counter() - t0
        infos = mxfp4_compile.backend.last_compile_info[start:]
        rewritten = sum(i.get("rewritten", 0) for i in infos)
        kernel = next((f"{i['kernel']} ({i['kernel_reason']})" for i in infos if i.get("kernel")), "?")
        rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        reps = args.reps or (50 if dev.type == "cuda" else 10)
        inductor = torch.compile(model)  # the same model, plain Inductor, bf16: the fair baseline
        t_inductor, t_comp = _time(inductor, x, reps), _time(compiled, x, reps)
    print(f"rewritten: {rewritten} of {args.layers} MoE layers -> torch.ops.mxfp4.moe; kernel {kernel}")
    print(f"accuracy: rel-L2 of the MXFP4 model vs the bf16 model = {rel:.4f} "
          f"(a Gaussian weight carries ~11% RMS error in MXFP4, so 10-20% here is MXFP4's own error; "
          f"the tests compare against eager with the same quantized weights)")
    print(f"time on {dev} (median of {reps} calls): compile {compile_s:.1f} s; per forward "
          f"Inductor bf16 {t_inductor * 1e3:.2f} ms, mxfp4 {t_comp * 1e3:.2f} ms "
          f"({t_inductor / t_comp:.2f}x)"
          + ("\n  (on CPU the reference kernel dequantizes the weights at every call, so MXFP4 "
             "is not expected to be faster here; the fused kernels are for GPUs: "
             "benchmarks/NOTES.md)" if dev.type == "cpu" else ""))
    if rewritten != args.layers:
        print("note: not every layer was rewritten; mxfp4_compile.explain(model, x) says why")
        return 1
    return 0
