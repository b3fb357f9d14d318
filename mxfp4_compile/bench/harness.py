"""The benchmark's timing and reporting: CUDA-graph replay timing (wall clock on CPU), progress
lines, and what the device is.
"""
from __future__ import annotations

import statistics
import time

import torch


def default_device(device=None) -> torch.device:
    """`device`, or CUDA when None (the benchmarks' default)."""
    return torch.device(device if device is not None else "cuda")


def graph_time_us(fn, n_inner, min_replays=20, max_replays=200, budget_s=0.4, device=None):
    """Median time of one ``fn()`` call in us / n_inner.

    CUDA: fn is captured once into a CUDA graph (after two warm-up calls on a side stream),
    replayed; each replay is timed with events; replay count fits ``budget_s``. CPU: fn called
    directly, wall clock, same count rules."""
    dev = default_device(device)
    if dev.type != "cuda":
        fn()
        times = []
        t_end = time.perf_counter() + budget_s
        while len(times) < min_replays or (len(times) < max_replays and time.perf_counter() < t_end):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6 / n_inner)
        return statistics.median(times)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    g.replay()
    torch.cuda.synchronize()
    est = time.perf_counter() - t0
    n = int(max(min_replays, min(max_replays, budget_s / max(est, 1e-6))))
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for a, b in ev:
        a.record()
        g.replay()
        b.record()
    torch.cuda.synchronize()
    times = [a.elapsed_time(b) * 1e3 / n_inner for a, b in ev]
    del g
    return statistics.median(times)


class Progress:
    """tqdm when installed and stderr is a terminal, else one plain line per step (logs)."""

    def __init__(self, total, desc, enabled=True):
        self.total, self.desc, self.n = total, desc, 0
        self.bar = None
        self.enabled = enabled
        import sys
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, desc=desc, dynamic_ncols=True, mininterval=1.0)
            except ImportError:
                pass

    def step(self, label=""):
        self.n += 1
        if self.bar is not None:
            self.bar.set_postfix_str(label, refresh=False)
            self.bar.update(1)
        elif self.enabled:
            print(f"[{self.desc} {self.n}/{self.total}] {label}", flush=True)

    def write(self, msg):
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def device_summary(device) -> dict:
    import platform
    info = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    device = torch.device(device)
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info["device"] = f"{p.name} ({p.multi_processor_count} SMs)"
    else:
        info["device"] = f"cpu ({platform.processor() or platform.machine()})"
    return info


def no_gpu_message(what: str) -> str:
    return (f"mxfp4_compile.bench {what}: no CUDA GPU here (torch.cuda.is_available() is False). "
            f"Running on the CPU at tiny shapes only, to exercise the harness: the numbers are "
            f"wall-clock CPU times and say nothing about the kernels. Run on a GPU machine for "
            f"real figures.")
