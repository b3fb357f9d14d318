"""Which fused-MoE kernel runs where, and the padding each one needs.

"auto" picks by device:
  sm100 (Blackwell)  flashinfer (trtllm-gen) when flashinfer is installed, else triton
  sm80-sm90          triton (ours)
  anything else      reference (plain torch; CPU included)
triton_kernels (sm90 only) runs only when named.

A kernel named in ``requested`` (the backend's ``options={"kernel": ...}``) is used as is; with
"auto", the environment variable ``MXFP4_KERNEL``, when set, names the kernel instead. A kernel
that cannot run on the device is an error that says why, never a quiet fallback. Each kernel is a
module of ``ops/kernels`` satisfying ``ops.kernels.MoEKernel``.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from types import ModuleType

import torch

from ..formats import KERNELS, check_kernel  # noqa: F401  (KERNELS: dispatch.KERNELS for callers)

log = logging.getLogger("mxfp4_compile")

# kernel name -> module under mxfp4_compile.ops.kernels
KERNEL_MODULES = {
    "reference": "reference_moe",
    "triton": "triton_moe",
    "triton_kernels": "triton_kernels_moe",
    "flashinfer": "flashinfer_moe",
}


def get_kernel(name: str) -> ModuleType:
    """The kernel's module (an ``ops.kernels.MoEKernel``); ``name`` must be a concrete kernel."""
    check_kernel(name, allow_auto=False)
    return importlib.import_module(f"mxfp4_compile.ops.kernels.{KERNEL_MODULES[name]}")


def padding(name: str) -> tuple[int, int]:
    """(H multiple, I multiple) the kernel's weight layout needs."""
    b = get_kernel(name)
    return b.H_MULTIPLE, b.I_MULTIPLE


def padded_sizes(name: str, hidden_size: int, intermediate_size: int) -> tuple[int, int]:
    hm, im = padding(name)
    return -(-hidden_size // hm) * hm, -(-intermediate_size // im) * im


def unavailable_reason(name: str, device: torch.device) -> str | None:
    try:
        module = get_kernel(name)
    except ImportError as e:  # a kernel module whose own imports fail
        return f"its module failed to import: {e}"
    return module.unavailable_reason(torch.device(device))


def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _auto(device: torch.device) -> tuple[str, str]:
    if device.type != "cuda":
        return "reference", f"device {device.type}: no fused GPU kernel, plain-torch reference"
    major, minor = torch.cuda.get_device_capability(device)
    cap = f"sm{major}{minor}"
    if major == 10:
        if _has_module("flashinfer"):
            return "flashinfer", (f"{cap} (Blackwell) with flashinfer installed: trtllm-gen MXFP4 MoE "
                                  f"(this path is unverified on hardware)")
        return "triton", f"{cap} (Blackwell) without flashinfer: our Triton kernel (pip install flashinfer-python for trtllm-gen)"
    if 8 <= major <= 9:
        return "triton", f"{cap}: our Triton kernel"
    return "reference", f"{cap}: no fused kernel for this capability, plain-torch reference"


def choose_kernel(device, requested: str | None = "auto") -> tuple[str, str]:
    """-> (kernel name, why). Raises ValueError when the requested kernel cannot run here."""
    device = torch.device(device)
    requested = check_kernel(requested or "auto")
    source = "requested"
    if requested == "auto" and os.environ.get("MXFP4_KERNEL"):
        requested = check_kernel(os.environ["MXFP4_KERNEL"], "MXFP4_KERNEL")
        source = "MXFP4_KERNEL"
    if requested == "auto":
        name, why = _auto(device)
    else:
        name, why = requested, f"{source} ({requested})"
        if name == "triton_kernels" and unavailable_reason(name, device) is None:
            from .kernels import triton_kernels_moe
            why += f": {triton_kernels_moe.api_description()}"
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise ValueError(f"MXFP4 kernel {name!r} ({why}) cannot run on {device}: {reason}")
    return name, why
