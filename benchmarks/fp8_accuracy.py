"""Accuracy of FP8 activations (options={"activations": "fp8"}) in a model and per GEMM.

1. Model: GptOssForCausalLM at gpt-oss-20b sizes with 4 layers and fixed random weights (the e2e
   benchmark's builder), 256 tokens of random ids: logits of the bf16 model (eager) against the
   compiled model with MXFP4 experts and bf16 activations, and with FP8 activations: rel-L2 of
   the logits, top-1 agreement with the bf16 model.
2. Op, per GEMM: on one layer's MXFP4 weights and the hidden states of random tokens, rel-L2
   against the float32 reference of the plain-torch emulation with e4m3 inputs on GEMM1 only,
   on GEMM2 only and on both, and of the kernel itself (both).
Run on the GPU machine: python benchmarks/fp8_accuracy.py [--out DIR]; writes fp8_accuracy.json.
"""
from __future__ import annotations

import argparse
import json
import os
import types

import torch

import mxfp4_compile  # noqa: F401  (registers the backend)
from mxfp4_compile.bench import e2e
from mxfp4_compile.bench import workloads as W
from mxfp4_compile.ops import moe_torch as MT
from mxfp4_compile.ops.kernels import triton_moe as tm
from mxfp4_compile.ops.weights import pad_packed


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def model_accuracy(device, tokens, layers, seed):
    args = types.SimpleNamespace(size="20b", layers=layers, prefill=tokens, new_tokens=0, seed=seed)
    model = e2e.build_model(args, device)
    g = torch.Generator(device=device).manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (1, tokens), device=device, generator=g)
    out = {}
    with torch.no_grad():
        ref = model(ids).logits.float()
        for acts in ("bf16", "fp8"):
            torch._dynamo.reset()
            fwd = torch.compile(model.forward, backend="mxfp4", options={"activations": acts})
            logits = fwd(ids).logits.float()
            out[acts] = dict(logits_rel_l2=rel(logits, ref),
                             top1_agreement=(logits.argmax(-1) == ref.argmax(-1)).float().mean().item())
    out["fp8_over_bf16_rel_l2"] = out["fp8"]["logits_rel_l2"] / out["bf16"]["logits_rel_l2"]
    return out


def op_accuracy(device, T, seed):
    E, H, I, k, act, biases = W.MODELS["20b"]
    gen = torch.Generator(device=device).manual_seed(seed)
    canon = W.random_canonical(E, H, I, act, biases, 64, 64, gen)
    x = torch.randn(T, H, device=device, generator=gen).bfloat16()
    ids, tw = W.route(torch.randn(T, E, device=device, generator=gen), k, act)
    ref = MT.moe_torch(x, ids, tw, *canon, act, W.ALPHA, W.LIMIT, None, True, sync_free=False)
    res = {}
    quant = MT.quantize_rows_e4m3
    real = MT.quantize_rows_e4m3
    for name, (q1, q2) in {"gemm1_only": (True, False), "gemm2_only": (False, True),
                           "both": (True, True)}.items():
        # the emulation with e4m3 inputs on the chosen GEMMs only: quantize_rows_e4m3 is called
        # on GEMM1's input first, then on each expert's GEMM2 input
        calls = [0]

        def q(t, calls=calls, q1=q1, q2=q2):
            first = calls[0] == 0
            calls[0] += 1
            return real(t) if (q1 if first else q2) else t.float()
        MT.quantize_rows_e4m3 = q
        try:
            emu = MT.moe_torch(x, ids, tw, *canon, act, W.ALPHA, W.LIMIT, None, True,
                               sync_free=False, activations="fp8")
        finally:
            MT.quantize_rows_e4m3 = quant
        res[f"emulation_{name}"] = rel(emu, ref)
    c = pad_packed(*canon, activation=act, hp=H, ip=I)
    for acts in ("bf16", "fp8"):
        p = tm.prepare(*c, act, activations=acts)
        y = tm.moe(x, ids, tw, *p, act, W.ALPHA, W.LIMIT, None, True, activations=acts)
        res[f"kernel_{acts}"] = rel(y, ref)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    dev = torch.device("cuda")
    res = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
               model=model_accuracy(dev, a.tokens, a.layers, a.seed),
               op_T4096=op_accuracy(dev, 4096, a.seed))
    print(json.dumps(res, indent=1))
    with open(os.path.join(a.out, "fp8_accuracy.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
