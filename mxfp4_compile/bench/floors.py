"""The floors every benchmark ratio divides by, measured in the run that divides by them.

Used by ``python -m mxfp4_compile.bench`` and by ``benchmarks/gpu_check.py`` (workloads.py builds
what they time, harness.py times it). Shape legend: T tokens, k top-k, E experts, H hidden,
I intermediate.

Floors, each measured in the run that divides by it:
  byte floor   = MXFP4 bytes of the distinct experts the routing touches / floor bandwidth, where
                 floor bandwidth = max(device-to-device copies of a 1 GiB buffer over element
                 widths, a 1 GiB pure read stream) -- ``measure_bandwidth``. A copy counts bytes
                 read + written, the read stream bytes read; every candidate is recorded, and
                 which one won;
  stream floor = the same bytes read by a plain streaming kernel (rotating buffers, L2 cold):
                 small reads do not reach the large-buffer rate, so this is "close to the limit"
                 at decode;
  FLOP floor   = 2 * 3 * H * I * k * T / bf16 matmul rate (8192^3 random bf16 product).
A floor is a lower bound on the time: a measured time faster than one of its floors means the
floor is wrong (a bandwidth or rate measured too low) or the timing is (L2 hits, missing work),
never that the kernel beat the hardware. ``floor_check`` flags such a time for a re-check.
On CPU every figure is a plain wall-clock median (no graphs, no Triton kernels): the harness
runs there at tiny shapes so that CI tests it; its numbers mean nothing, and ``Bandwidth``
says so (``meaningful`` False).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .harness import default_device as _dev
from .harness import graph_time_us


def matmul_tflops(device=None, n=None) -> float:
    """bf16 (CUDA) / fp32 (CPU) n x n x n product rate, random data (TFLOP/s)."""
    dev = _dev(device)
    n = n or (8192 if dev.type == "cuda" else 256)
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=dev, dtype=dt)
    b = torch.randn(n, n, device=dev, dtype=dt)
    c = torch.empty(n, n, device=dev, dtype=dt)
    us = graph_time_us(lambda: torch.mm(a, b, out=c), 1, min_replays=5 if dev.type != "cuda" else 10,
                       max_replays=30, device=dev)
    return 2 * n ** 3 / (us * 1e-6) / 1e12


def fp8_matmul_tflops(device=None, n=8192) -> float | None:
    """e4m3 x e4m3 -> bf16 n x n x n product rate (torch._scaled_mm, per-tensor scales), TFLOP/s;
    None where torch has no fp8 GEMM for the device (CPU, before sm89)."""
    dev = _dev(device)
    if dev.type != "cuda" or torch.cuda.get_device_capability(dev) < (8, 9):
        return None
    a = torch.randn(n, n, device=dev).to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device=dev).to(torch.float8_e4m3fn).t()  # column-major, as cuBLASLt wants
    one = torch.ones((), device=dev)
    us = graph_time_us(lambda: torch._scaled_mm(a, b, one, one, out_dtype=torch.bfloat16), 1,
                       min_replays=10, max_replays=30, device=dev)
    return 2 * n ** 3 / (us * 1e-6) / 1e12


_stream_kernel = None


def _get_stream_kernel():
    global _stream_kernel
    if _stream_kernel is None:
        import triton
        import triton.language as tl

        @triton.jit
        def kernel(src, dst, n, BLOCK: tl.constexpr, ITERS: tl.constexpr):
            pid = tl.program_id(0)
            acc = tl.zeros([BLOCK], dtype=tl.int32)
            base = pid * BLOCK * ITERS
            for it in range(ITERS):
                offs = base + it * BLOCK + tl.arange(0, BLOCK)
                acc ^= tl.load(src + offs, mask=offs < n, other=0)
            tl.store(dst + pid, tl.sum(acc, axis=0))
        _stream_kernel = kernel
    return _stream_kernel


def stream_floor_us(nbytes, bufs=None, n_bufs=4, device=None):
    """A plain streaming READ of nbytes (int32 words), rotating buffers (cold L2), best of three
    tilings. None off CUDA. ``bufs``: int32 buffers of >= nbytes each (allocated if None)."""
    dev = _dev(device)
    if dev.type != "cuda":
        return None
    import triton
    kern = _get_stream_kernel()
    n = (int(nbytes) // 16) * 4
    own = bufs is None
    if own:
        bufs = [torch.empty(n * 4, dtype=torch.uint8, device=dev).random_().view(torch.int32)
                for _ in range(n_bufs)]
    best = float("inf")
    for BLOCK, ITERS, nw in ((2048, 1, 4), (4096, 2, 8), (2048, 4, 4)):
        grid = (triton.cdiv(n, BLOCK * ITERS),)
        dst = torch.empty(grid[0], dtype=torch.int32, device=dev)

        def fn():
            for buf in bufs:
                kern[grid](buf, dst, n, BLOCK=BLOCK, ITERS=ITERS, num_warps=nw)
        best = min(best, graph_time_us(fn, len(bufs), device=dev))
    if own:
        del bufs
    return best


# ---------------------------------------------------------------- floor bandwidth -------------
BIG_BYTES = 1 << 30          # each buffer of the bandwidth candidates on CUDA (far above L2)
CPU_BIG_BYTES = 1 << 24      # the same on CPU, where the figure is nominal
COPY_BLOCK_BYTES = 1 << 14   # bytes one program of the copy kernel moves, at every width
COPY_WIDTHS = (torch.uint8, torch.int16, torch.int32, torch.int64)  # copy kernel element types
MEMCPY = "memcpy"            # torch copy_ of same-dtype contiguous tensors: cudaMemcpyAsync
READ_STREAM = "read stream"  # the streaming read kernel over the whole buffer
RECHECK = "faster than floor: re-check"


def _valid(v) -> bool:
    return v is not None and math.isfinite(v) and v > 0


@dataclass(frozen=True)
class Bandwidth:
    """The byte floor's bandwidth and where it comes from.

    GBps: the winning figure (1e9 bytes per second); source: the winner's name ("copy int32",
    "read stream", "memcpy", ...); candidates: every candidate in measuring order, name -> GB/s
    (None: it could not run here) -- copies count bytes read + written, the read stream bytes
    read; meaningful: False for the CPU wall-clock figure."""
    GBps: float
    source: str
    candidates: dict = field(default_factory=dict)
    meaningful: bool = True

    @property
    def best_copy_GBps(self):
        """The best device-to-device copy figure (GB/s, read + written), None if none ran."""
        copies = [v for n, v in self.candidates.items() if n != READ_STREAM and _valid(v)]
        return max(copies) if copies else None

    @property
    def label(self) -> str:
        """The winner's name, with a warning on CPU."""
        return self.source if self.meaningful else f"{self.source}, CPU wall clock: meaningless"

    def candidates_str(self) -> str:
        """Every candidate's GB/s: "memcpy 2433; copy uint8 2950; ...; read stream 3050" (n/a:
        could not run)."""
        return "; ".join(f"{n} {v:.0f}" if _valid(v) else f"{n} n/a"
                         for n, v in self.candidates.items())

    def describe(self) -> str:
        """E.g. "3050 GB/s = read stream (max of memcpy 2433; ...; read stream 3050 GB/s)"."""
        return f"{self.GBps:.0f} GB/s = {self.label} (max of {self.candidates_str()} GB/s)"


def pick_bandwidth(candidates, meaningful=True) -> Bandwidth:
    """{name: GB/s or None} -> Bandwidth of the largest figure (the first one on a tie).

    None, NaN, infinite and non-positive figures (candidates that could not run) never win but
    stay in ``candidates``. ValueError when no figure is usable."""
    valid = {n: float(v) for n, v in candidates.items() if _valid(v)}
    if not valid:
        raise ValueError(f"no usable bandwidth measurement among {candidates!r}")
    src = max(valid, key=valid.get)
    return Bandwidth(valid[src], src, dict(candidates), meaningful)


_copy_kernel = None


def _get_copy_kernel():
    global _copy_kernel
    if _copy_kernel is None:
        import triton
        import triton.language as tl

        @triton.jit
        def kernel(src, dst, BLOCK: tl.constexpr):
            # one program copies BLOCK elements; the caller sizes buffers in whole blocks (no mask)
            offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            tl.store(dst + offs, tl.load(src + offs))
        _copy_kernel = kernel
    return _copy_kernel


def _copy_fns(src, dst):
    """name -> zero-argument callable copying src into dst (equal uint8 buffers of whole
    COPY_BLOCK_BYTES blocks): torch's memcpy, then on CUDA the copy kernel at each COPY_WIDTHS
    element type (the same bytes viewed as that type)."""
    fns = {MEMCPY: lambda: dst.copy_(src)}
    if src.device.type != "cuda":
        return fns
    kern = _get_copy_kernel()
    for dt in COPY_WIDTHS:
        s, d = src.view(dt), dst.view(dt)
        block = COPY_BLOCK_BYTES // s.element_size()
        grid = (s.numel() // block,)
        fns[f"copy {str(dt).removeprefix('torch.')}"] = (
            lambda s=s, d=d, block=block, grid=grid: kern[grid](s, d, BLOCK=block, num_warps=8))
    return fns


def measure_bandwidth(device=None, nbytes=None) -> Bandwidth:
    """The byte floor's bandwidth: max over device-to-device copies of one ``nbytes`` buffer
    (default 1 GiB on CUDA, so L2-cold) -- torch's memcpy and a Triton copy kernel at 1, 2, 4 and
    8-byte elements, bytes read + written -- and the streaming read kernel over the same buffer
    (``stream_floor_us``, bytes read). Each candidate is timed like the kernels (``graph_time_us``:
    CUDA graph, events, median). A candidate that fails to run is recorded as None and loses.
    CPU: the memcpy alone at 16 MiB, wall clock, ``meaningful`` False."""
    dev = _dev(device)
    cuda = dev.type == "cuda"
    n = int(nbytes or (BIG_BYTES if cuda else CPU_BIG_BYTES))
    n -= n % COPY_BLOCK_BYTES
    src = torch.empty(n, dtype=torch.uint8, device=dev).random_()
    dst = torch.empty_like(src)
    cands = {}
    for name, fn in _copy_fns(src, dst).items():
        try:
            us = graph_time_us(fn, 1, min_replays=10 if cuda else 3, max_replays=30, budget_s=0.1,
                               device=dev)
            cands[name] = 2 * n / (us * 1e-6) / 1e9
        except Exception:  # noqa: BLE001 - a candidate that cannot run here loses, nothing more
            cands[name] = None
    if cuda:
        try:
            us = stream_floor_us(n, bufs=[src.view(torch.int32)], device=dev)
            cands[READ_STREAM] = n / (us * 1e-6) / 1e9
        except Exception:  # noqa: BLE001
            cands[READ_STREAM] = None
    del src, dst
    return pick_bandwidth(cands, meaningful=cuda)


def floor_check(us, floors) -> str:
    """A measured time against its floors: us (microseconds), floors {name: floor in us or None}.

    -> "" when the time is at or above every floor, else RECHECK and, for each floor it beats,
    time / floor: "faster than floor: re-check (byte floor 0.891x)". A time below a floor says
    that the floor or the timing is wrong; it is never reported as a win."""
    if not _valid(us):
        return ""
    below = [(n, us / f) for n, f in floors.items() if _valid(f) and us < f]
    if not below:
        return ""
    return f"{RECHECK} (" + ", ".join(f"{n} {r:.3f}x" for n, r in below) + ")"

