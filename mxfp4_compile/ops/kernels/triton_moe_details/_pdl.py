"""Programmatic dependent launch (sm90+) for the Triton and Gluon kernels of the "triton" MoE
kernel: a kernel launched with launch_pdl may have programs resident while the kernel before it
still runs. Which kernels launch that way is the launch policy's `pdl_launch`.
"""
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def _pdl_enter(PDL: tl.constexpr):
    """Programmatic dependent launch (sm90+). A kernel launched with launch_pdl may have
    programs resident while the previous kernel in the stream still runs: each waits for it
    (its writes then visible) before any read or write, then lets the next kernel launch.
    Every program waits before it triggers, so a kernel's dependents launch only after
    everything before it in the stream has completed. Without launch_pdl both are no-ops."""
    _pdl_wait(PDL)
    _pdl_trigger(PDL)


@triton.jit
def _pdl_wait(PDL: tl.constexpr):
    if PDL:
        gdc_wait()


@triton.jit
def _pdl_trigger(PDL: tl.constexpr):
    if PDL:
        gdc_launch_dependents()
