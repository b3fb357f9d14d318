"""The routing launches of the "triton" MoE op alone (top-k ids -> expert_start and the
assignments sorted by expert), timed in a CUDA graph, for each value of the launch policy's
route_scan_chunks (chunked routing with at least that many chunks scans the chunk counts in a
launch of its own), and checked against torch (expert counts, stable order).

    python benchmarks/route_time.py 120b:4096 [20b:512 ...] [--scan-chunks 64,1000000000]

Per shape: random distinct top-k ids (one draw), CALLS routing calls captured in one graph,
the graph replayed REPLAYS times between two CUDA events: microseconds per call. The L2 holds
the ids (a few hundred kB at most), as it does in the forward, where the router just wrote them.
"""
import argparse

import torch

from mxfp4_compile.bench.workloads import MODELS
from mxfp4_compile.ops.kernels import triton_moe
from mxfp4_compile.ops.kernels.triton_moe_details import launches, policy

CALLS = 20  # routing calls per graph
REPLAYS = 10


def route_us(ids, E: int, pdl: dict) -> tuple[float, bool]:
    """-> (microseconds per routing call, whether its output matches torch)."""
    es, order = triton_moe.route(ids, None, E, pdl)
    flat = ids.flatten()
    counts = torch.bincount(flat, minlength=E).int()
    ok = (torch.equal(es[:E + 1].diff(), counts)
          and torch.equal(order.long(), torch.sort(flat, stable=True).indices))
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(CALLS):
            triton_moe.route(ids, None, E, pdl)
    g.replay()
    start, end = torch.cuda.Event(True), torch.cuda.Event(True)
    start.record()
    for _ in range(REPLAYS):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (REPLAYS * CALLS), ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("shapes", nargs="+", help="model:T, e.g. 120b:4096")
    ap.add_argument("--scan-chunks", default=None,
                    help="route_scan_chunks values to compare, comma-separated (default: the "
                         "table's, and 1000000000: never a scan launch)")
    args = ap.parse_args()
    major, minor = torch.cuda.get_device_capability()
    table = policy.policy_for(major, minor)
    values = ([int(v) for v in args.scan_chunks.split(",")] if args.scan_chunks
              else [table.route_scan_chunks, 10 ** 9])
    gen = torch.Generator(device="cuda").manual_seed(0)
    for shape in args.shapes:
        model, T = shape.split(":")
        E, k = MODELS[model][0], MODELS[model][3]
        # k distinct experts per token, contiguous as the router writes them
        ids = torch.rand(int(T), E, device="cuda", generator=gen).argsort(1)[:, :k].contiguous()
        cells = []
        for v in values:
            with policy.override(route_scan_chunks=v):
                pol = policy.current(major, minor)
                pdl = launches.pdl_options(pol, major)["route"]
                plan = launches.route_launches(pol, ids.numel(), E, False, pdl)
                us, ok = route_us(ids, E, pdl)
            cells.append(f"scan_chunks={v}: {us:.1f} us ({plan.n_chunks} chunks, "
                         f"{'scan launch' if plan.scanned else 'no scan'}, "
                         f"{'right' if ok else 'WRONG'})")
        print(f"{model} T={T}: " + "; ".join(cells))


if __name__ == "__main__":
    main()
