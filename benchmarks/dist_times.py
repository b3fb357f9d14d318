"""Expert- and tensor-parallel MXFP4 MoE on `world` GPUs (NCCL) against one GPU: agreement and
forward time (the fused op + its one all-reduce) at gpt-oss shapes.

    torchrun is not needed: python benchmarks/dist_times.py [--models 20b,120b] [--tokens 1,4096]

Every rank builds the same full bf16 weights from one seed on its own GPU, keeps its share
(ShardedMoE.expert_parallel: contiguous expert blocks; .tensor_parallel: a slice of I for every
expert) and quantizes it; rank 0 also prepares the unsharded op as the single-GPU baseline. Same
tokens and routing on every rank. Times: eager forwards (CUDA events around `iters` calls after
a warm-up, all ranks in step), median of `rounds`; no CUDA graph (NCCL inside graph capture is
out of this script's scope), so T=1 includes launch overhead for every variant alike. The
gloo smoke test times on the CPU the same way (same collective pattern, host clock).
NVLink multicast stays off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1). With fewer
GPUs than `world`, runs over gloo on CPU at tiny shapes (a smoke test of this script).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import mxfp4_compile  # noqa: F401  (registers torch.ops.mxfp4)
from mxfp4_compile.bench.workloads import MODELS, route
from mxfp4_compile.distributed import ShardedMoE
from mxfp4_compile.ops.weights import prepare_moe_weights


def _weights(E, H, I, biases, device, seed):
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape, scale):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(torch.bfloat16)

    w13, w2 = rnd(E, 2 * I, H, scale=0.02), rnd(E, H, I, scale=0.02)
    b13, b2 = (rnd(E, 2 * I, scale=0.1), rnd(E, H, scale=0.1)) if biases else (None, None)
    return w13, w2, b13, b2


def _time(fn, iters, rounds, cuda: bool, in_step: bool = True):
    """Median over `rounds` of the mean time of `iters` calls, in us. in_step: every rank calls
    this together (a barrier starts each round); False for rank 0's single-GPU baseline."""
    out = []
    for _ in range(rounds):
        if in_step:
            dist.barrier()
        if cuda:
            torch.cuda.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(iters):
                fn()
            b.record()
            torch.cuda.synchronize()
            out.append(a.elapsed_time(b) * 1e3 / iters)
        else:
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            out.append((time.perf_counter() - t0) * 1e6 / iters)
    return statistics.median(out)


def _worker(rank, world, init_file, args, out_file):
    nccl = torch.cuda.device_count() >= world
    device = torch.device("cuda", rank) if nccl else torch.device("cpu")
    if nccl:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if nccl else "gloo", init_method=f"file://{init_file}",
                            rank=rank, world_size=world)
    kernel = "auto" if nccl else "reference"
    rows = []
    for model in args.models.split(","):
        E, H, I, k, act, biases = MODELS[model if nccl else "tiny"]
        w13, w2, b13, b2 = _weights(E, H, I, biases, device, seed=0)
        ep = ShardedMoE.expert_parallel(w13, w2, b13, b2, activation=act, device=device,
                                        kernel=kernel)
        tp = ShardedMoE.tensor_parallel(w13, w2, b13, b2, activation=act, device=device,
                                        kernel=kernel)
        single = ShardedMoE(prepare_moe_weights(w13, w2, b13, b2, activation=act,
                                                kernel=ep.prepared.kernel, cache=False)
                            ) if rank == 0 else None
        del w13, w2, b13, b2
        for T in (int(t) for t in args.tokens.split(",")):
            g = torch.Generator(device=device).manual_seed(T)
            x = torch.randn(T, H, generator=g, device=device).to(torch.bfloat16)
            ids, tw = route(torch.randn(T, E, generator=g, device=device), k, act)
            rec = {"model": model if nccl else "tiny", "T": T, "world": world,
                   "backend": "nccl" if nccl else "gloo", "kernel": ep.prepared.kernel}
            y_ep, y_tp = ep(x, ids, tw), tp(x, ids, tw)
            if rank == 0:
                ref = single.local(x, ids, tw).float()  # no all-reduce: rank 0 alone
                for name, y in (("ep", y_ep), ("tp", y_tp)):
                    rec[f"{name}_rel_l2"] = ((y.float() - ref).norm() / ref.norm()).item()
            for name, m in (("ep", ep), ("tp", tp)):
                rec[f"{name}_us"] = _time(lambda: m(x, ids, tw), args.iters, args.rounds, nccl)
            if rank == 0:  # alone: the other ranks wait at the barrier below
                rec["single_us"] = _time(lambda: single.local(x, ids, tw), args.iters,
                                         args.rounds, nccl, in_step=False)
            dist.barrier()
            rows.append(rec)
        del ep, tp, single
        if nccl:
            torch.cuda.empty_cache()
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump(rows, f)
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="20b,120b")
    ap.add_argument("--tokens", default="1,4096")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    with tempfile.TemporaryDirectory() as d:
        out_file = os.path.join(d, "rows.json")
        mp.spawn(_worker, args=(args.world, os.path.join(d, "init"), args, out_file),
                 nprocs=args.world, join=True)
        rows = json.load(open(out_file))
    print(f"{'model':6s} {'T':>5s} {'world':>5s} {'ep rel-L2':>10s} {'tp rel-L2':>10s} "
          f"{'1 GPU us':>9s} {'EP us':>9s} {'TP us':>9s}")
    for r in rows:
        def f(key, fmt):
            return format(r[key], fmt) if key in r else "-"
        print(f"{r['model']:6s} {r['T']:5d} {r['world']:5d} {f('ep_rel_l2', '10.2e')} "
              f"{f('tp_rel_l2', '10.2e')} {f('single_us', '9.1f')} {f('ep_us', '9.1f')} "
              f"{f('tp_us', '9.1f')}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
