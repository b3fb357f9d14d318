"""The attention projections of one decode step at gpt-oss-20b widths, 24 layers, one CUDA graph:
q, k, v, o as four ``addmm`` (what the model runs today) against q/k/v fused into one ``addmm``
plus o, against a plain read of the same bytes (the floor). Distinct weights per layer, so the L2
holds none of them from one layer to the next. M = 1 and 8 rows, timed with the bench harness's
CUDA-graph timer. (benchmarks/notes/e2e.md, session 14: the candidate of freezing q/k/v and
keeping their concatenation current.)

    PYTHONPATH=. python benchmarks/projections.py [OUT_DIR]   # GPU only; writes projections_b1.json
"""
import json
import os
import sys

import torch
import torch.nn.functional as F

from mxfp4_compile.bench.harness import graph_time_us

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
        res[f"M{m}"] = dict(separate_us=graph_time_us(lambda: separate(x), 1),
                            fused_qkv_us=graph_time_us(lambda: fused(x), 1),
                            read_us=graph_time_us(flat.sum, 1))
    res["read_GBps"] = nbytes / res["M1"]["read_us"] / 1e3
    print(json.dumps(res, indent=1))
    with open(os.path.join(out, "projections_b1.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
