"""Per-step cost of the ways prepared MXFP4 expert weights can reach a compiled graph, under CUDA
graphs, at 24 MoE layers of gpt-oss-20b width (E=32, k=4, H=I=2880, swiglu_oai, biases): the
design decision of docs/architecture.md section 7.

Candidates (one decode step, T=1, the whole 24-layer stack is one CUDA graph):
  frozen         bf16 expert parameters, backend="mxfp4", check_weights=False: prepared weights
                 folded into the graph as constants, nothing checked per call (stale on updates)
  frozen+check   the same plus WeightWatch.check() before each call (the default backend path;
                 the watch is built from the same parameters the backend freezes)
  inputs         the same prepared tensors as module buffers passed to torch.ops.mxfp4.moe: graph
                 inputs (static under CUDA graphs), as a run-time lookup would pass them
  inputs+lookup  the same plus one dict lookup by (id, version) per expert parameter per step (the
                 host work of looking prepared weights up at run time)
Timed: each step synchronized (what a generate loop that reads the token sees), median of --steps;
also back-to-back steps with one synchronize (the GPU-bound rate), WeightWatch.check() alone, and
the first step after one layer's w2 changed (re-preparing that layer in place).

  python benchmarks/weight_paths.py --out DIR [--layers 24] [--steps 300]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn as nn

import mxfp4_compile  # noqa: F401
from mxfp4_compile import backend, frozen
from mxfp4_compile.ops import weights


def swiglu_oai(h, alpha=1.702, limit=7.0):
    gate, up = h[..., ::2].clamp(max=limit), h[..., 1::2].clamp(-limit, limit)
    return gate * torch.sigmoid(alpha * gate) * (up + 1)


class Bf16Layer(nn.Module):
    """gpt-oss reference style: top-k then softmax, gathered expert weights, einsum."""

    def __init__(self, E, H, I, k):
        super().__init__()
        self.gate = nn.Linear(H, E, bias=False)
        self.w13 = nn.Parameter(torch.randn(E, 2 * I, H) * 0.02)
        self.b13 = nn.Parameter(torch.randn(E, 2 * I) * 0.02)
        self.w2 = nn.Parameter(torch.randn(E, H, I) * 0.02)
        self.b2 = nn.Parameter(torch.randn(E, H) * 0.02)
        self.k = k

    def forward(self, x):  # x [T, H]
        top, ids = torch.topk(self.gate(x), self.k, dim=-1)
        w = torch.softmax(top.float(), dim=-1).to(x.dtype)
        h = torch.einsum("tkoh,th->tko", self.w13[ids], x) + self.b13[ids]
        y = torch.einsum("tkhi,tki->tkh", self.w2[ids], swiglu_oai(h)) + self.b2[ids]
        return (y * w.unsqueeze(-1)).sum(1)  # (an einsum here becomes an mm at T=1 on CUDA)


class PreparedLayer(nn.Module):
    """The same layer on prepared MXFP4 buffers (the store's own tensors: no second copy)."""

    def __init__(self, src: Bf16Layer, prepared):
        super().__init__()
        self.gate, self.k, self.kernel = src.gate, src.k, prepared.kernel
        for name, t in zip(weights.ROLES, prepared.tensors()):
            self.register_buffer(name, t)

    def forward(self, x):
        top, ids = torch.topk(self.gate(x), self.k, dim=-1)
        w = torch.softmax(top.float(), dim=-1)
        return torch.ops.mxfp4.moe(x, ids, w, *(getattr(self, r) for r in weights.ROLES),
                                   self.kernel, activation="swiglu_oai")


class Stack(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, h):
        for layer in self.layers:
            h = h + layer(h)
        return h


def _rel(a, b) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def synced_steps(fn, x, steps, pre=None):
    times = []
    for _ in range(steps):
        _sync()
        t0 = time.perf_counter()
        if pre is not None:
            pre()
        fn(x)
        _sync()
        times.append((time.perf_counter() - t0) * 1e6)
    times.sort()
    return dict(median_us=statistics.median(times), p10_us=times[len(times) // 10],
                p90_us=times[9 * len(times) // 10])


def back_to_back(fn, x, steps, pre=None):
    _sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        if pre is not None:
            pre()
        fn(x)
    _sync()
    return (time.perf_counter() - t0) * 1e6 / steps


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--width", type=int, default=2880)
    ap.add_argument("--kernel", default="triton")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of this script only")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    dev, bf16 = torch.device(a.device), torch.bfloat16
    E, H, k = a.experts, a.width, 4
    torch.manual_seed(0)
    with torch.device(dev):
        model = Stack([Bf16Layer(E, H, H, k) for _ in range(a.layers)]).to(bf16).eval()
    x = torch.randn(1, H, device=dev, dtype=bf16)
    res = dict(device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", torch=torch.__version__, layers=a.layers,
               experts=E, width=H, kernel=a.kernel)
    with torch.no_grad():
        t0 = time.perf_counter()
        f_frozen = torch.compile(model, backend="mxfp4",
                                 options=dict(cudagraphs=True, kernel=a.kernel, check_weights=False))
        for _ in range(3):
            out_frozen = f_frozen(x).clone()
        res["compile_frozen_s"] = time.perf_counter() - t0
        info = backend.last_compile_info[-1]
        if info["rewritten"] != a.layers:
            raise SystemExit(f"{info['rewritten']} of {a.layers} layers rewritten: "
                             f"{[c.reason for c in info['candidates']][:3]}")
        experts = [p for layer in model.layers for p in (layer.w13, layer.b13, layer.w2, layer.b2)]
        names = [f"layers.{i}.{n}" for i in range(a.layers) for n in ("w13", "b13", "w2", "b2")]
        watch = frozen.WeightWatch(experts, names, a.kernel, "floor")
        assert len(watch.entries) == a.layers and all(watch.refreshable), "watch != backend's"

        by_layer = {id(e.inputs()[0]): e.prepared for e in watch.entries}
        pmodel = Stack([PreparedLayer(layer, by_layer[id(layer.w13)]) for layer in model.layers])
        t0 = time.perf_counter()
        f_inputs = torch.compile(pmodel, backend="mxfp4", mode="reduce-overhead")
        for _ in range(3):
            out_inputs = f_inputs(x).clone()
        res["compile_inputs_s"] = time.perf_counter() - t0
        res["frozen_vs_inputs_rel_l2"] = _rel(out_inputs, out_frozen)

        table = {id(p): (p._version, p) for p in experts}

        def lookup():  # what a run-time lookup by (parameter, version) does on the host per step
            for p in experts:
                v, _ = table[id(p)]
                if v != p._version:
                    raise AssertionError

        cands = [("frozen", f_frozen, None), ("frozen+check", f_frozen, watch.check),
                 ("inputs", f_inputs, None), ("inputs+lookup", f_inputs, lookup)]
        for name, fn, pre in cands:  # warm
            synced_steps(fn, x, 20, pre)
        for rnd in range(2):  # two rounds, order swapped, so drift shows
            for name, fn, pre in (cands if rnd == 0 else cands[::-1]):
                r = res.setdefault(name, {})
                r[f"synced_r{rnd}"] = synced_steps(fn, x, a.steps, pre)
                r[f"back_to_back_us_r{rnd}"] = back_to_back(fn, x, a.steps, pre)
        n = 20000
        t0 = time.perf_counter()
        for _ in range(n):
            watch.check()
        res["watch_check_us"] = (time.perf_counter() - t0) * 1e6 / n
        res["watched_tensors"] = len(watch.tensors)
        t0 = time.perf_counter()
        for _ in range(n):
            lookup()
        res["lookup_us"] = (time.perf_counter() - t0) * 1e6 / n

        # one layer changes: the next step re-prepares it in place (under the watch) and computes
        # with it; the inputs model shares the tensors, so both must agree again afterwards
        model.layers[a.layers // 2].w2.mul_(-1)
        n0 = weights.quantization_count()
        _sync()
        t0 = time.perf_counter()
        watch.check()
        out_b = f_frozen(x).clone()
        _sync()
        res["first_step_after_change_us"] = (time.perf_counter() - t0) * 1e6
        res["layers_reprepared"] = weights.quantization_count() - n0
        out_c = f_inputs(x).clone()
        res["after_change_frozen_vs_inputs_rel_l2"] = _rel(out_c, out_b)
        res["after_change_moved_rel_l2"] = _rel(out_b, out_frozen)
    with open(os.path.join(a.out, "weight_paths.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
