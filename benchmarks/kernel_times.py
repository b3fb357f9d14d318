"""Per-kernel GPU time of the "triton" MoE op (route, GEMM1, the activation after a split
GEMM1, GEMM2, finalize) for given model shapes, from torch.profiler: which launch a forward's
time goes to.

    python benchmarks/kernel_times.py --shapes 20b:64,mixtral:8 [--iters 20] [--route-sort-max N]

Each shape: random MXFP4 weights (bench.workloads.random_canonical), 4 weight sets rotated (L2
cold-ish, as the benchmarks), `iters` eager forwards after a warm-up; prints the mean time per
forward of every kernel name and their sum. Eager launches: the sum excludes launch gaps, which
a CUDA graph (the benchmarks' method) mostly removes.
"""
from __future__ import annotations

import argparse
import collections

import torch

from mxfp4_compile.bench.workloads import ALPHA, LIMIT, MODELS, random_canonical, route
from mxfp4_compile.ops.kernels import triton_moe
from mxfp4_compile.ops.kernels.triton_moe_details import policy

DEV = torch.device("cuda")


def profile(model: str, T: int, iters: int, gen) -> list[tuple[str, float]]:
    E, H, I, k, act, biases = MODELS[model]
    sets = [triton_moe.prepare(*random_canonical(E, H, I, act, biases, triton_moe.H_MULTIPLE,
                                                 triton_moe.I_MULTIPLE, gen), act)
            for _ in range(4)]
    x = torch.randn(T, H, device=DEV, generator=gen).to(torch.bfloat16)
    ids, tw = route(torch.randn(T, E, device=DEV, generator=gen), k, act)

    def fwd(i):
        triton_moe.moe(x, ids, tw, *sets[i % 4], act, ALPHA, LIMIT, None, True)

    for i in range(8):
        fwd(i)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for i in range(iters):
            fwd(i)
        torch.cuda.synchronize()
    total = collections.Counter()
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            total[ev.name] += ev.device_time_total if hasattr(ev, "device_time_total") \
                else ev.cuda_time_total
    return [(name, us / iters) for name, us in total.most_common()]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="20b:8,20b:64,mixtral:8,mixtral:64")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--route-sort-max", type=int, default=None,
                    help="assignments up to which one routing program sorts them all (the "
                         "launch policy's route_sort_max; default: the table's)")
    args = ap.parse_args()
    changes = {} if args.route_sort_max is None else {"route_sort_max": args.route_sort_max}
    gen = torch.Generator(device=DEV).manual_seed(0)
    for spec in args.shapes.split(","):
        model, T = spec.split(":")
        with policy.override(**changes):
            rows = profile(model, int(T), args.iters, gen)
        print(f"{model} T={T}: {sum(us for _, us in rows):.1f} us of kernels per forward")
        for name, us in rows:
            print(f"  {us:9.1f} us  {name}")


if __name__ == "__main__":
    main()
