"""The attention projections of one decode step at gpt-oss-20b widths, 24 layers, one CUDA graph:
q, k, v, o as four ``addmm`` (what the model runs today) against q/k/v fused into one ``addmm``
plus o, against a plain read of the same bytes (the floor). Distinct weights per layer, so the L2
holds none of them from one layer to the next. M = 1 and 8 rows. (benchmarks/notes/e2e.md,
session 14: the candidate of freezing q/k/v and keeping their concatenation current.)

    python benchmarks/projections.py [OUT_DIR]     # GPU only; writes projections_b1.json
"""
import json
import os
import sys

import torch
import torch.nn.functional as F

H, Q, KV, LAYERS = 2880, 4096, 512, 24


def weights(dev):
    def w(*shape):
        return torch.randn(*shape, device=dev, dtype=torch.bfloat16) * 0.02
    layers = []
    for _ in range(LAYERS):
        d = dict(q=w(Q, H), k=w(KV, H), v=w(KV, H), o=w(H, Q), bq=w(Q), bk=w(KV), bv=w(KV), bo=w(H))
        d["qkv"], d["bqkv"] = torch.cat([d["q"], d["k"], d["v"]]), torch.cat([d["bq"], d["bk"], d["bv"]])
        layers.append(d)
    return layers


def graph_us(fn, x, reps=30) -> float:
    """Median time of one CUDA-graph replay of fn(x), in us."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn(x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn(x)
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return sorted(times)[reps // 2]


def main(out):
    layers = weights("cuda")
    nbytes = sum(d[n].numel() * 2 for d in layers for n in ("q", "k", "v", "o"))
    flat = torch.empty(nbytes // 4, device="cuda", dtype=torch.float32)

    def separate(x):
        for d in layers:
            q = F.linear(x, d["q"], d["bq"])
            F.linear(x, d["k"], d["bk"])
            F.linear(x, d["v"], d["bv"])
            F.linear(q, d["o"], d["bo"])

    def fused(x):
        for d in layers:
            qkv = F.linear(x, d["qkv"], d["bqkv"])
            F.linear(qkv[:, :Q], d["o"], d["bo"])

    res = dict(gpu=torch.cuda.get_device_name(), bytes=nbytes)
    for m in (1, 8):
        x = torch.randn(m, H, device="cuda", dtype=torch.bfloat16)
        res[f"M{m}"] = dict(separate_us=graph_us(separate, x), fused_qkv_us=graph_us(fused, x),
                            read_us=graph_us(lambda _: flat.sum(), x))
    res["read_GBps"] = nbytes / res["M1"]["read_us"] / 1e3
    print(json.dumps(res, indent=1))
    with open(os.path.join(out, "projections_b1.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
