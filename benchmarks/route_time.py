"""The route kernels alone (expert_start + sorted assignments), timed in a CUDA graph:
python benchmarks/route_time.py 120b:4096 [20b:512 ...] (H100, session 9, before and after the
count scan, triton_moe._ROUTE_SCAN_CHUNKS: 120b T=4096 24.3 / 20.1 us, T=16384 159.7 / 64.7)."""
import sys

import torch

from mxfp4_compile.bench.floors import MODELS
from mxfp4_compile.ops.kernels import triton_moe

CALLS = 20  # per graph replay


def main():
    pdl = triton_moe._pdl(torch.cuda.get_device_capability()[0])["route"]
    for shape in sys.argv[1:]:
        model, T = shape.split(":")
        E, k = MODELS[model][0], MODELS[model][3]
        ids = torch.stack([torch.randperm(E, device="cuda")[:k] for _ in range(int(T))])
        es, _ = triton_moe.route(ids, None, E, pdl)
        counts = torch.bincount(ids.flatten(), minlength=E).int()
        ok = torch.equal(es[:E + 1].diff(), counts)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(CALLS):
                triton_moe.route(ids, None, E, pdl)
        g.replay()
        start, end = torch.cuda.Event(True), torch.cuda.Event(True)
        start.record()
        for _ in range(10):
            g.replay()
        end.record()
        torch.cuda.synchronize()
        print(f"{model} T={T}: route {start.elapsed_time(end) * 1e3 / (10 * CALLS):.1f} us, "
              f"expert counts {'right' if ok else 'WRONG'}")


if __name__ == "__main__":
    main()
