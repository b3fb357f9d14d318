"""Every torch.library op of the package (namespace ``mxfp4``), with its fake kernel.

All ops are functional (``mutates_args=()``): no auto_functionalized wrappers for the compiler to
match around, and safe under CUDA-graph capture. Shape legend as in ops/moe_torch.py.
"""
from __future__ import annotations

import torch

from .. import numerics
from ..formats import BLOCK, SWIGLU_ALPHA, SWIGLU_LIMIT, check_activation, check_kernel, check_rounding
from . import dispatch, weights
from . import topk_softmax as _topk_softmax
from .moe_torch import local_ids

# ---------------------------------------------------------------------------------------- quantize


@torch.library.custom_op("mxfp4::quantize", mutates_args=())
def quantize(x: torch.Tensor, rounding: str = "floor") -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (packed uint8 [..., K/2], e8m0 scales uint8 [..., K/32])."""
    return numerics.quantize(x, rounding)


@quantize.register_fake
def _(x, rounding="floor"):
    numerics.check_block_dim(x.shape[-1])
    check_rounding(rounding)
    k = x.shape[-1]
    return (x.new_empty(*x.shape[:-1], k // 2, dtype=torch.uint8),
            x.new_empty(*x.shape[:-1], k // BLOCK, dtype=torch.uint8))


# -------------------------------------------------------------------------------------- dequantize


def _check_dequant(packed, scales, dtype):
    if packed.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise TypeError(f"dequantize: packed and scales must be uint8, got {packed.dtype} and "
                        f"{scales.dtype} (view torch's MX dtypes as uint8 first)")
    if not dtype.is_floating_point:
        raise TypeError(f"dequantize: dtype must be a float dtype, got {dtype}")
    if scales.device != packed.device:  # else dispatch may pick the fake kernel (e.g. meta scales)
        raise ValueError(f"dequantize: scales are on {scales.device} but packed is on {packed.device}; "
                         f"keep both on one device")
    if scales.shape[:-1] != packed.shape[:-1] or scales.shape[-1] * (BLOCK // 2) != packed.shape[-1]:
        raise ValueError(f"dequantize: packed {tuple(packed.shape)} needs scales "
                         f"{tuple(packed.shape[:-1]) + (packed.shape[-1] // (BLOCK // 2),)}, got "
                         f"{tuple(scales.shape)}")


@torch.library.custom_op("mxfp4::dequantize", mutates_args=())
def dequantize(packed: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(packed [..., K/2], scales [..., K/32]) -> [..., K] ``dtype``."""
    _check_dequant(packed, scales, dtype)
    return numerics.dequantize(packed, scales, dtype)


@dequantize.register_fake
def _(packed, scales, dtype):
    _check_dequant(packed, scales, dtype)
    return packed.new_empty(*packed.shape[:-1], packed.shape[-1] * 2, dtype=dtype)


# ------------------------------------------------------------------------------------ topk_softmax


@torch.library.custom_op("mxfp4::topk_softmax", mutates_args=())
def topk_softmax(logits: torch.Tensor, k: int, softmax_first: bool = False,
                 renormalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (weights [T, k] float32, ids [T, k] int64) in one launch on CUDA
    (ops/topk_softmax.py: which router each flag combination is)."""
    return _topk_softmax.topk_softmax(logits, k, softmax_first, renormalize)


@topk_softmax.register_fake
def _(logits, k, softmax_first=False, renormalize=True):
    _topk_softmax.check(logits, k)
    T = logits.shape[0]
    return (logits.new_empty(T, k, dtype=torch.float32), logits.new_empty(T, k, dtype=torch.int64))


# --------------------------------------------------------------------------------------------- moe


def _check_moe(hidden, topk_ids, topk_weights, kernel, activation, expert_map, weight_pairs=()):
    """Layout-independent checks (``weight_pairs``: (name, tensor or None), device only); each
    kernel checks its own weight layout."""
    if hidden.dim() != 2 or not hidden.is_floating_point():
        raise ValueError(f"moe: hidden must be a float [T, H] tensor, got {hidden.dtype} "
                         f"{tuple(hidden.shape)}")
    if topk_ids.dim() != 2 or topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"moe: topk_ids must be int32/int64 [T, k], got {topk_ids.dtype} "
                         f"{tuple(topk_ids.shape)}")
    if topk_weights.shape != topk_ids.shape or not topk_weights.is_floating_point():
        raise ValueError(f"moe: topk_weights must be a float tensor shaped like topk_ids "
                         f"{tuple(topk_ids.shape)}, got {topk_weights.dtype} {tuple(topk_weights.shape)}")
    torch._check(topk_ids.shape[0] == hidden.shape[0],
                 lambda: f"moe: topk_ids has {topk_ids.shape[0]} rows but hidden has {hidden.shape[0]} tokens")
    check_kernel(kernel, "moe: kernel", allow_auto=False)
    check_activation(activation, "moe: activation")
    if expert_map is not None and (expert_map.dim() != 1 or expert_map.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"moe: expert_map must be a 1-D int32 tensor [E_global] (global id -> local "
                         f"id or -1), got {expert_map.dtype} {tuple(expert_map.shape)}")
    for name, t in (("topk_ids", topk_ids), ("topk_weights", topk_weights), ("expert_map", expert_map),
                    *weight_pairs):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"moe: {name} is on {t.device} but hidden is on {hidden.device}; "
                             f"keep every input on one device")


def _check_canonical_weights(hidden, w13, w13_scales, w13_bias, w2, w2_scales, w2_bias, topk_ids,
                             expert_map):
    """Checks for kernels that keep the canonical layout (reference)."""
    for name, t in (("w13", w13), ("w13_scales", w13_scales), ("w2", w2), ("w2_scales", w2_scales)):
        if t.dtype != torch.uint8 or t.dim() != 3:
            raise ValueError(f"moe: {name} must be a uint8 [E, N, K] MXFP4 tensor, got {t.dtype} "
                             f"{tuple(t.shape)}; build weights with mxfp4_compile.prepare_moe_weights")
        if t.device != hidden.device:
            raise ValueError(f"moe: {name} is on {t.device} but hidden is on {hidden.device}")
    E, two_ip, hp_half = w13.shape
    hp, ip = hp_half * 2, two_ip // 2
    if hp % BLOCK or ip % BLOCK:
        raise ValueError(f"moe: w13 {tuple(w13.shape)} implies Hp={hp}, Ip={ip}; both must be "
                         f"multiples of the MXFP4 block size {BLOCK} (pad the weights: "
                         f"mxfp4_compile.prepare_moe_weights does)")
    expect = {"w13_scales": (E, two_ip, hp // BLOCK), "w2": (E, hp, ip // 2),
              "w2_scales": (E, hp, ip // BLOCK)}
    for name, t in (("w13_scales", w13_scales), ("w2", w2), ("w2_scales", w2_scales)):
        if tuple(t.shape) != expect[name]:
            raise ValueError(f"moe: {name} is {tuple(t.shape)} but w13 {tuple(w13.shape)} implies "
                             f"{expect[name]} (E={E}, Hp={hp}, Ip={ip})")
    for name, t, shape in (("w13_bias", w13_bias, (E, two_ip)), ("w2_bias", w2_bias, (E, hp))):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"moe: {name} must be {shape}, got {tuple(t.shape)}")
    if hidden.shape[1] > hp:
        raise ValueError(f"moe: hidden has H={hidden.shape[1]} features but the weights hold only "
                         f"Hp={hp}; the weights were prepared for another model")
    n_global = E if expert_map is None else expert_map.shape[0]
    if topk_ids.shape[1] > n_global:
        raise ValueError(f"moe: topk_ids has k={topk_ids.shape[1]} columns but there are only "
                         f"{n_global} experts; a token cannot pick more distinct experts than exist")
    if isinstance(topk_ids, torch._subclasses.FakeTensor) or not topk_ids.numel():
        return
    if topk_ids.device.type != "cpu":
        # No host sync off the CPU (CUDA graphs, streams): a device-side assert instead.
        torch._assert_async(((topk_ids >= 0) & (topk_ids < n_global)).all(),
                            f"moe: topk_ids must lie in [0, {n_global})")
        return
    # On the CPU a host check can say exactly what is wrong.
    lo, hi = int(topk_ids.min()), int(topk_ids.max())
    if lo < 0 or hi >= n_global:
        raise ValueError(f"moe: topk_ids must lie in [0, {n_global}) (number of "
                         f"{'global experts in expert_map' if expert_map is not None else 'experts'}), "
                         f"got values in [{lo}, {hi}]")
    if expert_map is not None:
        mapped = local_ids(topk_ids, expert_map)
        if int(mapped.min()) < -1:
            raise ValueError(f"moe: expert_map sends an expert to local id {int(mapped.min())}; "
                             f"entries must be -1 (not on this rank) or in [0, {E})")
        if int(mapped.max()) >= E:
            raise ValueError(f"moe: expert_map sends an expert to local id {int(mapped.max())} "
                             f"but this rank holds {E} experts")


def _weight_pairs(*tensors):
    # a weight on another device (e.g. meta) must not route the call to the fake kernel silently
    return tuple(zip(weights.ROLES, tensors))


@torch.library.custom_op("mxfp4::moe", mutates_args=())
def moe(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
        w13: torch.Tensor, w13_scales: torch.Tensor, w13_bias: torch.Tensor | None,
        w2: torch.Tensor, w2_scales: torch.Tensor, w2_bias: torch.Tensor | None,
        kernel: str, activation: str = "swiglu_oai", alpha: float = SWIGLU_ALPHA,
        limit: float = SWIGLU_LIMIT, expert_map: torch.Tensor | None = None,
        combine: bool = True) -> torch.Tensor:
    """Fused MoE experts on MXFP4 weights prepared for ``kernel`` (see ops/moe_torch.py for the
    math). Returns [T, H] combined, or [T, k, H] unweighted per-slot outputs when not ``combine``."""
    _check_moe(hidden, topk_ids, topk_weights, kernel, activation, expert_map,
               _weight_pairs(w13, w13_scales, w13_bias, w2, w2_scales, w2_bias))
    if kernel == "reference":
        _check_canonical_weights(hidden, w13, w13_scales, w13_bias, w2, w2_scales, w2_bias, topk_ids,
                                 expert_map)
    reason = dispatch.unavailable_reason(kernel, hidden.device)
    if reason is not None:
        raise RuntimeError(f"moe: kernel {kernel!r} cannot run on {hidden.device}: {reason}")
    return dispatch.get_kernel(kernel).moe(hidden, topk_ids, topk_weights, w13, w13_scales, w13_bias,
                                            w2, w2_scales, w2_bias, activation, alpha, limit,
                                            expert_map, combine)


@moe.register_fake
def _(hidden, topk_ids, topk_weights, w13, w13_scales, w13_bias, w2, w2_scales, w2_bias, kernel,
      activation="swiglu_oai", alpha=SWIGLU_ALPHA, limit=SWIGLU_LIMIT, expert_map=None, combine=True):
    _check_moe(hidden, topk_ids, topk_weights, kernel, activation, expert_map,
               _weight_pairs(w13, w13_scales, w13_bias, w2, w2_scales, w2_bias))
    if combine:
        return hidden.new_empty(hidden.shape)
    return hidden.new_empty(hidden.shape[0], topk_ids.shape[1], hidden.shape[1])


# ------------------------------------------------------------------------ weight transform (compiler)


@torch.library.custom_op("mxfp4::prepare_moe_weights", mutates_args=())
def prepare_moe_weights(w13: torch.Tensor, w13_bias: torch.Tensor | None, w2: torch.Tensor,
                        w2_bias: torch.Tensor | None, kernel: str, activation: str,
                        rounding: str = "floor", gate_up_interleaved: bool = True,
                        transposed: bool = False, index: int = 0) -> torch.Tensor:
    """Float expert weights -> prepared tensor number ``index`` (0 w13, 1 w13_scales, 2 w13_bias,
    3 w2, 4 w2_scales, 5 w2_bias) in ``kernel``'s layout. The compiler inserts one per weight it
    needs, before Inductor's freeze() folds them into constants; the cache in ops/weights.py makes
    the six calls (and every recompile) one quantization."""
    prepared = weights.prepare_moe_weights(w13, w2, w13_bias, w2_bias, activation=activation,
                                           kernel=kernel, rounding=rounding,
                                           gate_up_interleaved=gate_up_interleaved,
                                           transposed=transposed)
    out = prepared.tensors()[index]
    if out is None:
        raise ValueError(f"prepare_moe_weights: index {index} asks for a bias the model does not have")
    # A custom op may not return its input: the reference layout keeps biases as float32 copies,
    # and quantized tensors are always new, so only an already-float32 bias could alias.
    return out.clone() if any(out is t for t in (w13_bias, w2_bias)) else out


@prepare_moe_weights.register_fake
def _(w13, w13_bias, w2, w2_bias, kernel, activation, rounding="floor", gate_up_interleaved=True,
      transposed=False, index=0):
    check_kernel(kernel, "prepare_moe_weights: kernel", allow_auto=False)
    check_activation(activation, "prepare_moe_weights: activation")
    check_rounding(rounding, "prepare_moe_weights: rounding")
    E, H, I = weights.check_expert_shapes(w13.shape, w2.shape, transposed)
    hp, ip = dispatch.padded_sizes(kernel, H, I)
    shapes = dispatch.get_kernel(kernel).prepared_shapes(E, hp, ip, activation, w13_bias is not None,
                                                          w2_bias is not None)
    if shapes[index] is None:
        raise ValueError(f"prepare_moe_weights: index {index} asks for a bias the model does not have")
    shape, dtype = shapes[index]
    return w13.new_empty(shape, dtype=dtype)
