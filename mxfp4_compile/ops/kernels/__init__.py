"""One module per fused-MoE kernel, each satisfying ``MoEKernel`` with module-level names;
``ops/dispatch.py`` maps kernel names to modules (``get_kernel``) and picks one per device.

The canonical weight layout every ``prepare`` starts from, and the math every ``moe`` computes, is
``ops/moe_torch.py``'s. Also here: the checks several kernel modules share.
"""
from __future__ import annotations

import inspect
from types import ModuleType
from typing import Protocol

import torch

from ...formats import BLOCK

# (shape, dtype) of a prepared tensor, or None for an absent bias
PreparedShape = tuple[tuple[int, ...], torch.dtype] | None


class MoEKernel(Protocol):
    """What a kernel module provides (as module-level names; modules satisfy a Protocol too).

    NAME        the kernel name users pass (``kernel="..."``)
    H_MULTIPLE  Hp, the padded hidden size, is a multiple of this (a multiple of the MXFP4 block)
    I_MULTIPLE  Ip, the padded intermediate size, likewise
    """

    NAME: str
    H_MULTIPLE: int
    I_MULTIPLE: int

    def unavailable_reason(self, device: torch.device) -> str | None:
        """None when the kernel can run on ``device``, else why not (what to install or set)."""

    def prepared_shapes(self, E: int, Hp: int, Ip: int, activation: str, has_w13_bias: bool,
                        has_w2_bias: bool) -> list[PreparedShape]:
        """(shape, dtype) of each of the six tensors ``prepare`` returns, without computing them
        (the compiler's fake kernels)."""

    def prepare(self, w13: torch.Tensor, w13_scales: torch.Tensor, w13_bias: torch.Tensor | None,
                w2: torch.Tensor, w2_scales: torch.Tensor, w2_bias: torch.Tensor | None,
                activation: str) -> tuple:
        """Canonical padded MXFP4 weights -> the six tensors ``moe`` reads (once per model)."""

    def moe(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
            w13: torch.Tensor, w13_scales: torch.Tensor, w13_bias: torch.Tensor | None,
            w2: torch.Tensor, w2_scales: torch.Tensor, w2_bias: torch.Tensor | None,
            activation: str, alpha: float, limit: float, expert_map: torch.Tensor | None,
            combine: bool) -> torch.Tensor:
        """The fused MoE forward on prepared weights: [T, H], or [T, k, H] when not ``combine``."""


_ATTRIBUTES = {"NAME": str, "H_MULTIPLE": int, "I_MULTIPLE": int}
_FUNCTIONS = ("unavailable_reason", "prepared_shapes", "prepare", "moe")


def protocol_mismatches(module: ModuleType) -> list[str]:
    """What keeps ``module`` from satisfying ``MoEKernel``: missing or mistyped names, and
    functions whose parameter names differ from the protocol's (empty when it conforms)."""
    problems = []
    for name, typ in _ATTRIBUTES.items():
        if not isinstance(getattr(module, name, None), typ):
            problems.append(f"{name} must be a module-level {typ.__name__}")
    for name in _FUNCTIONS:
        fn = getattr(module, name, None)
        if not callable(fn):
            problems.append(f"{name} must be a module-level function")
            continue
        want = list(inspect.signature(getattr(MoEKernel, name)).parameters)[1:]  # without self
        got = list(inspect.signature(fn).parameters)
        if got != want:
            problems.append(f"{name}{tuple(got)} must take {tuple(want)}")
    return problems


# ---- checks several kernel modules share -------------------------------------------------------------
def check_padded(kernel: str, Hp: int, Ip: int, h_multiple: int, i_multiple: int,
                 why: str = "") -> None:
    """ValueError unless Hp and Ip are multiples of the kernel's padding."""
    if Hp % h_multiple or Ip % i_multiple:
        raise ValueError(f"kernel {kernel!r} needs Hp % {h_multiple} == 0 and Ip % {i_multiple} == 0"
                         f"{f' ({why})' if why else ''}; got Hp={Hp}, Ip={Ip}: pad the canonical "
                         f"weights to mxfp4_compile.ops.dispatch.padded_sizes({kernel!r}, H, I)")


def check_canonical_shapes(w13: torch.Tensor, w13_scales: torch.Tensor, w2: torch.Tensor,
                           w2_scales: torch.Tensor) -> tuple[int, int, int]:
    """-> (E, Hp, Ip) from w13 [E, 2Ip, Hp/2]; ValueError naming the tensor whose canonical shape
    does not match w13's."""
    E, two_ip, hp_half = w13.shape
    Hp, Ip = hp_half * 2, two_ip // 2
    expect = {"w13_scales": (w13_scales, (E, 2 * Ip, Hp // BLOCK)), "w2": (w2, (E, Hp, Ip // 2)),
              "w2_scales": (w2_scales, (E, Hp, Ip // BLOCK))}
    for name, (t, shape) in expect.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must be {shape} to match w13 {tuple(w13.shape)}; "
                             f"got {tuple(t.shape)}")
    return E, Hp, Ip


def gpu_unavailable(device: torch.device, kernel: str, major: int, arch: str, why: str) -> str | None:
    """Why ``kernel``, which runs only on CUDA GPUs of compute capability ``major``.x (``arch``,
    e.g. "sm90 (Hopper)"; ``why``: what ties it to them), cannot run on ``device``; None when
    it can."""
    if device.type != "cuda":
        return f"kernel {kernel!r} needs a CUDA {arch} GPU; the device is {device.type}"
    if not torch.cuda.is_available():
        return f"kernel {kernel!r} needs a CUDA {arch} GPU, but CUDA is not available in this process"
    got, minor = torch.cuda.get_device_capability(device)
    if got != major:
        return f"kernel {kernel!r} needs an {arch} GPU ({why}); this GPU is sm{got}{minor}"
    return None
