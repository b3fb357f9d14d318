"""Fused top-k routing: router logits -> (weights, ids) in one Triton launch.

Shape legend: T tokens, E experts, k experts per token.
  logits   [T, E]  any float dtype (math in float32)
  weights  [T, k]  float32, or out_dtype (rounded once from the float32 weights)
  ids      [T, k]  int64, the k largest logits of each row in descending order (ties: lower index)

What gpt-oss, Mixtral and Qwen3 routers compute, in one kernel instead of torch.topk (several
launches on CUDA) plus a softmax and a division (a launch each): at decode sizes each launch in a
CUDA graph costs a few microseconds, more than the math. The weights:
  softmax_first=False:                  softmax over the k selected logits (gpt-oss)
  softmax_first=True, renormalize=True: softmax over E, top-k, renormalized over the k; the same
                                        numbers as the line above (Mixtral, Qwen3 default)
  softmax_first=True, renormalize=False: softmax over all E, the k selected (Qwen3 option)
NaN logits sort above everything, as in torch.topk; the k weights of such a row are then NaN.
"""
from __future__ import annotations

import os

import torch

MAX_EXPERTS = 4096  # one program holds whole rows in registers
# sm90+: launch as a programmatic dependent launch (its programs become resident while the
# kernel before it, e.g. the router GEMM, still runs, and wait for it before reading)
PDL_LAUNCH = True


def topk_softmax_torch(logits: torch.Tensor, k: int, softmax_first: bool, renormalize: bool):
    """The same routing in plain torch ops (CPU, and the oracle of the tests). Ties pick the
    lower index, as the fused kernel does (torch.topk promises no order among equal values, and
    differs between CPU and CUDA): a stable descending sort orders by (-value, index), NaN first."""
    if softmax_first:
        p = torch.softmax(logits.float(), dim=-1)
        w, ids = _topk_lower_index(p, k)
        return (w / w.sum(-1, keepdim=True) if renormalize else w), ids
    v, ids = _topk_lower_index(logits.float(), k)
    return torch.softmax(v, dim=-1), ids


def _topk_lower_index(x: torch.Tensor, k: int):
    """torch.topk(x, k) with ties broken towards the lower index (-0.0 and 0.0 are equal)."""
    v, ids = torch.sort(x, dim=-1, descending=True, stable=True)
    return v[..., :k].contiguous(), ids[..., :k].contiguous()


def check(logits: torch.Tensor, k: int) -> None:
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"topk_softmax: logits must be a float [T, E] tensor, got {logits.dtype} "
                         f"{tuple(logits.shape)}")
    E = logits.shape[1]
    if not 1 <= k <= E:
        raise ValueError(f"topk_softmax: k must lie in [1, E={E}], got {k}")


def check_out_dtype(out_dtype) -> None:
    if out_dtype is not None and (not isinstance(out_dtype, torch.dtype) or not out_dtype.is_floating_point):
        raise ValueError(f"topk_softmax: out_dtype must be a floating dtype (e.g. torch.bfloat16, "
                         f"what the MoE op reads) or None for float32, got {out_dtype!r}")


def _launch(logits: torch.Tensor, k: int, softmax_first: bool, renormalize: bool, out_dtype):
    from . import _topk_softmax_kernel as K

    T, E = logits.shape
    if E > MAX_EXPERTS:
        raise ValueError(f"topk_softmax: the fused kernel holds rows of up to {MAX_EXPERTS} "
                         f"experts, got E={E}; route with torch.topk and torch.softmax instead")
    x = logits if logits.stride(1) == 1 else logits.contiguous()
    w = torch.empty(T, k, dtype=out_dtype or torch.float32, device=x.device)
    ids = torch.empty(T, k, dtype=torch.int64, device=x.device)
    if T == 0:
        return w, ids
    EB = 1 << max(0, (E - 1).bit_length())
    pdl = x.is_cuda and torch.cuda.get_device_capability(x.device)[0] >= 9
    # rows per program: ~2048 logits in registers, no more rows than T (decode: one program
    # of one warp per few rows, which is all the latency a CUDA graph sees)
    BT = max(1, min(64, 2048 // EB, 1 << max(0, (T - 1).bit_length())))
    K._topk_softmax_kernel[(-(-T // BT),)](
        x, w, ids, T, E, x.stride(0), K=k, KB=1 << max(0, (k - 1).bit_length()), EB=EB, BT=BT,
        SOFTMAX_FIRST=softmax_first, RENORM=renormalize, num_warps=1 if BT * EB <= 512 else 4,
        PDL=pdl, launch_pdl=pdl and PDL_LAUNCH)
    return w, ids


def topk_softmax(logits: torch.Tensor, k: int, softmax_first: bool = False,
                 renormalize: bool = True, out_dtype: torch.dtype | None = None):
    """-> (weights [T, k] float32 or out_dtype, ids [T, k] int64). CUDA: the fused kernel; CPU:
    `topk_softmax_torch`, unless the Triton interpreter is on (TRITON_INTERPRET=1: the kernel, for
    tests). out_dtype: the kernel stores the weights rounded to it (a model's ``.to(dtype)`` after
    the router, without a launch of its own)."""
    check(logits, k)
    check_out_dtype(out_dtype)
    if logits.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        try:
            import triton  # noqa: F401
        except ImportError as e:
            raise RuntimeError(f"topk_softmax on {logits.device} needs triton ({e}); install "
                               f"triton or route with mxfp4_compile.routing's torch routers") from e
        return _launch(logits, k, softmax_first, renormalize, out_dtype)
    w, ids = topk_softmax_torch(logits, k, softmax_first, renormalize)
    return (w if out_dtype is None else w.to(out_dtype)), ids
