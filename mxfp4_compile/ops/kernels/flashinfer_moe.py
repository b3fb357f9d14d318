"""The "flashinfer" kernel: FlashInfer's trtllm-gen MXFP4 MoE, pre-routed, sm100 (Blackwell) only.

UNVERIFIED ON HARDWARE. This module is written against the real signatures of
flashinfer-python 0.7.2.post1 (read from its wheel: ``fused_moe/core.py``,
``quantization/fp4_quantization.py``, ``quantization/fp8_quantization.py``, ``tllm_enums.py`` and
the C++ launcher in ``data/csrc``), but no Blackwell GPU was available to this project: the kernel
call, the shuffles and the numerics have never run. What IS tested (on CPU) is the pure-torch part
of the weight preparation and of the call's inputs: the gate/up row-pair swap, the row permutation
the shuffle applies, the packing of our top-k into the API's int32 format, the expert-map
handling, and the call's keyword arguments against a stand-in module. There is no SM90 path here
(Hopper uses our Triton kernel or triton_kernels).

What it does:
  prepare (once):
    1. gate/up rows: trtllm-gen's gated activation wants each pair as (up, gate), i.e. w1 and w3
       swapped: canonical swiglu_oai pairs (gate, up) are swapped; silu_glu's concatenated
       [gate; up] becomes (up, gate) pairs. Scales and the w13 bias move with their rows.
    2. ``_shuffle_for_trtllm`` -- the one CUDA-only step: per expert, FlashInfer's
       ``shuffle_matrix_a`` (row permutation in blocks of 32 for epilogue_tile_m=128; mirrored in
       pure torch by ``shuffle_a_row_indices`` for tests) on the e2m1 bytes and the biases, and
       ``shuffle_matrix_sf_a`` (same rows, then the 128x4 scale interleave, a CUDA kernel) on the
       e8m0 scales.
  moe (each call):
    * top-k packed as FlashInfer's ``PackedScoreIdx``: int32 ``(expert_id << 16) | bf16 bits of
      the weight`` (``pack_topk``); routing_method_type=TopK (no softmax / renormalization: our
      weights are final);
    * activations bf16 (default) or MXFP8 (``MXFP4_FLASHINFER_ACTIVATIONS=mxfp8``:
      ``mxfp8_quantize`` with linear scale layout; about 2% rel-L2 from the fp8 activations);
    * swiglu_oai: gemm1_alpha = alpha, gemm1_beta = 1 (the "+1" on up), gemm1_clamp_limit =
      limit, one value per local expert; silu_glu: all three None (plain silu(gate) * up);
    * hidden padded to Hp, output sliced back to H; combine=False runs the kernel with each
      (token, slot) as its own token and top_k=1, weight 1 (no finalize-free layout to undo);
    * expert_map: ids mapped to local experts, ids of other ranks to a phantom expert E that is
      outside the local range [0, E) (num_experts = max(len(expert_map), E + 1)), which
      trtllm-gen's expert parallelism skips.

Padding: Hp and Ip multiples of 256, the padding vLLM uses with this kernel. The constraints known
here need only 128 (the scale interleave needs rows % 128 and K/32 % 4, the shuffle rows % 32);
256 stays until the kernel call has been verified on hardware.

Prepared tensors (plain torch; the op passes them around):
  w13 uint8 [E, 2Ip, Hp/2], w13_scales uint8 [E, 2Ip, Hp/32] (bytes of the 128x4-interleaved
  scales; viewed as float8_e4m3fn at the call, the dtype label the API checks), w13_bias float32
  [E, 2Ip] or None, w2 uint8 [E, Hp, Ip/2], w2_scales uint8 [E, Hp, Ip/32], w2_bias float32
  [E, Hp] or None.

Getting it: ``pip install flashinfer-python==0.7.2.post1`` (its kernels are JIT-built or fetched
for sm100 on first use).
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

from ...formats import check_activation
from . import fp8_unsupported
from . import canonical_shapes, check_canonical_shapes, check_padded, gpu_unavailable
from .optional import KernelUnavailable, OptionalAPI, keyword_mismatch

log = logging.getLogger("mxfp4_compile")

NAME = "flashinfer"
H_MULTIPLE = 256
I_MULTIPLE = 256
# shuffle_matrix_a's epilogue tile (the value vLLM passes): with a multiple of 128 it permutes rows
# in blocks of 32, else 16 (shuffle_a_row_indices)
EPILOGUE_TILE_M = 128
ACT_ENV = "MXFP4_FLASHINFER_ACTIVATIONS"  # "bf16" (default) or "mxfp8"
SUPPORTED_API = "flashinfer-python 0.7.x: trtllm_fp4_block_scale_routed_moe (pre-routed, no tile_tokens_dim)"
HOW_TO_GET = "pip install flashinfer-python==0.7.2.post1"

# Keyword arguments this module passes to trtllm_fp4_block_scale_routed_moe, as named in
# flashinfer-python 0.7.2.post1 (fused_moe/core.py). Checked against the installed signature.
CALL_PARAMS = (
    "topk_ids", "routing_bias", "hidden_states", "hidden_states_scale", "gemm1_weights",
    "gemm1_weights_scale", "gemm1_bias", "gemm1_alpha", "gemm1_beta", "gemm1_clamp_limit",
    "gemm2_weights", "gemm2_weights_scale", "gemm2_bias", "output1_scale_scalar",
    "output1_scale_gate_scalar", "output2_scale_scalar", "num_experts", "top_k", "n_group",
    "topk_group", "intermediate_size", "local_expert_offset", "local_num_experts",
    "routed_scaling_factor", "routing_method_type", "do_finalize", "activation_type",
    "hidden_states_scale_layout",
)
_ROUTED_MOE = "trtllm_fp4_block_scale_routed_moe"


class FlashInferUnavailable(KernelUnavailable):
    """flashinfer is missing or its API is not the one this kernel module was written against."""


# ---- API detection -------------------------------------------------------------------------------
API = OptionalAPI(
    "flashinfer", kernel=NAME, install=HOW_TO_GET, supported=SUPPORTED_API,
    modules={"": (_ROUTED_MOE, "shuffle_matrix_a", "shuffle_matrix_sf_a", "mxfp8_quantize",
                  "RoutingMethodType", "ActivationType", "SfLayout")},
    keywords={_ROUTED_MOE: CALL_PARAMS},
    optional={"row_indices": ("utils", "get_shuffle_matrix_a_row_indices")},
    error=FlashInferUnavailable)


def check_signature(fn) -> str | None:
    """None when ``fn`` takes every keyword this module passes to trtllm_fp4_block_scale_routed_moe
    (and requires no other, such as the older API's tile_tokens_dim), else what is wrong."""
    return keyword_mismatch(fn, CALL_PARAMS, _ROUTED_MOE, SUPPORTED_API)


def unavailable_reason(device: torch.device) -> str | None:
    return gpu_unavailable(torch.device(device), NAME, 10, "sm100 (Blackwell)",
                           "trtllm-gen MXFP4 MoE; no sm90 path here: use 'triton' or "
                           "'triton_kernels'") or API.reason()


# ---- pure-torch preparation (tested on CPU) -------------------------------------------------------------
def _check_padded(Hp: int, Ip: int) -> None:
    check_padded(NAME, Hp, Ip, H_MULTIPLE, I_MULTIPLE)


def prepared_shapes(E, Hp, Ip, activation, has_w13_bias, has_w2_bias, activations="bf16"):
    fp8_unsupported(NAME, activations)
    """The canonical shapes: the shuffles permute rows and bytes in place."""
    check_activation(activation)
    _check_padded(Hp, Ip)
    return canonical_shapes(E, Hp, Ip, has_w13_bias, has_w2_bias)


def swap_row_pairs(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Rows [r0, r1, r2, r3, ...] -> [r1, r0, r3, r2, ...] along ``dim`` (its own inverse)."""
    return t.unflatten(dim, (-1, 2)).flip(dim + 1).flatten(dim, dim + 1)


def to_trtllm_gate_up(t: torch.Tensor, dim: int, activation: str) -> torch.Tensor:
    """Canonical gate/up rows -> trtllm-gen's (up, gate) pairs: row 2j = up_j, row 2j+1 = gate_j."""
    check_activation(activation)
    if activation == "swiglu_oai":  # canonical (gate, up) pairs: swap
        return swap_row_pairs(t, dim)
    gate, up = t.chunk(2, dim=dim)  # canonical [gate; up]
    return torch.stack((up, gate), dim=dim + 1).flatten(dim, dim + 1)


def from_trtllm_gate_up(t: torch.Tensor, dim: int, activation: str) -> torch.Tensor:
    """Inverse of ``to_trtllm_gate_up``."""
    check_activation(activation)
    if activation == "swiglu_oai":
        return swap_row_pairs(t, dim)
    pairs = t.unflatten(dim, (-1, 2))
    return torch.cat((pairs.select(dim + 1, 1), pairs.select(dim + 1, 0)), dim=dim)


# TRT-LLM-gen shuffleMatrixA row map for a 32-row block (epilogue_tile_m % 128 == 0), as
# flashinfer.utils documents it: source row i of a block goes to row _BLK32[i] of that block.
_BLK32 = [0, 8, 16, 24, 1, 9, 17, 25, 2, 10, 18, 26, 3, 11, 19, 27,
          4, 12, 20, 28, 5, 13, 21, 29, 6, 14, 22, 30, 7, 15, 23, 31]
_BLK16 = [0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15]


def shuffle_a_row_indices(M: int, epilogue_tile_m: int = EPILOGUE_TILE_M) -> torch.Tensor:
    """Pure-torch mirror of ``shuffle_matrix_a``'s permutation: ``out = x[idx]``, i.e. idx[new] =
    old. Blocks of 32 rows (16 when epilogue_tile_m % 128 != 0); row i of a block goes to
    position row_map[i] of the same block."""
    row_map = _BLK32 if epilogue_tile_m % 128 == 0 else _BLK16
    b = len(row_map)
    if M % b:
        raise ValueError(f"shuffle_matrix_a needs rows % {b} == 0, got {M}")
    old = torch.arange(M)
    new = (old // b) * b + torch.tensor(row_map)[old % b]
    idx = torch.empty(M, dtype=torch.long)
    idx[new] = old
    return idx


def prepare_unshuffled(w13, w13_scales, w13_bias, w2, w2_scales, w2_bias, activation):
    """Steps before the CUDA shuffles: shape checks, (up, gate) row pairs, fp32 contiguous biases."""
    check_activation(activation)
    _, two_ip, hp_half = w13.shape
    _check_padded(hp_half * 2, two_ip // 2)
    check_canonical_shapes(w13, w13_scales, w2, w2_scales)
    w13 = to_trtllm_gate_up(w13, 1, activation).contiguous()
    w13_scales = to_trtllm_gate_up(w13_scales, 1, activation).contiguous()
    b13 = None if w13_bias is None else to_trtllm_gate_up(w13_bias.float(), 1, activation).contiguous()
    b2 = None if w2_bias is None else w2_bias.float().contiguous()
    return w13, w13_scales, b13, w2.contiguous(), w2_scales.contiguous(), b2


def _shuffle_for_trtllm(w13, w13_scales, w13_bias, w2, w2_scales, w2_bias):
    """The CUDA-only step (UNVERIFIED on hardware): FlashInfer's shuffle_matrix_a on bytes and
    biases, shuffle_matrix_sf_a (row shuffle + 128x4 interleave) on scales, expert by expert."""
    fi = API.require()
    if not w13.is_cuda:
        raise FlashInferUnavailable("flashinfer weight preparation needs the weights on a CUDA "
                                    "device (shuffle_matrix_sf_a is a CUDA kernel)")
    if fi.row_indices is not None:  # our documented mirror must be what FlashInfer does
        theirs = fi.row_indices(w13[0], EPILOGUE_TILE_M).cpu()
        if not torch.equal(theirs, shuffle_a_row_indices(w13.shape[1])):
            raise FlashInferUnavailable(f"{fi.label}: shuffle_matrix_a's row order "
                                        f"differs from the one this kernel module was written for")
    tm = EPILOGUE_TILE_M

    def rows(t):
        return torch.stack([fi.shuffle_matrix_a(t[e], tm) for e in range(t.shape[0])])

    def scales(s):
        return torch.stack([fi.shuffle_matrix_sf_a(s[e], tm).reshape(s.shape[1:])
                            for e in range(s.shape[0])])

    def bias(b):
        if b is None:
            return None
        return torch.stack([fi.shuffle_matrix_a(b[e].reshape(-1, 1), tm).reshape(-1)
                            for e in range(b.shape[0])]).contiguous()

    return (rows(w13).contiguous(), scales(w13_scales).contiguous(), bias(w13_bias),
            rows(w2).contiguous(), scales(w2_scales).contiguous(), bias(w2_bias))


def prepare(w13, w13_scales, w13_bias, w2, w2_scales, w2_bias, activation, activations="bf16"):
    """Canonical padded MXFP4 -> this kernel's six tensors (module docstring). UNVERIFIED."""
    fp8_unsupported(NAME, activations)
    return _shuffle_for_trtllm(*prepare_unshuffled(w13, w13_scales, w13_bias, w2, w2_scales,
                                                   w2_bias, activation))


def unprepare(w13, w13_scales, w13_bias, w2, w2_scales, w2_bias, activation, activations="bf16"):
    """Not inverted: shuffle_matrix_sf_a's 128x4 scale interleave is FlashInfer's own, and this
    layout has never run on hardware here, so an inverse could not be checked against it."""
    raise ValueError("weights prepared for kernel 'flashinfer' cannot be turned back into checkpoint "
                     "tensors (FlashInfer's scale interleave is not inverted here): load or quantize "
                     "the model with kernel='reference' or 'triton' to save it or change its kernel")


# ---- call-time inputs (pure torch, tested on CPU) -----------------------------------------------------
def pack_topk(ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """FlashInfer's packed pre-computed routing (PackedScoreIdx{bf16 score; int16 idx}):
    int32 ``(id << 16) | bf16_bits(weight)``, the weight bits taken unsigned."""
    bits = weights.to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF
    return ((ids.to(torch.int32) << 16) | bits).contiguous()


def unpack_topk(packed: torch.Tensor):
    """Inverse of ``pack_topk`` -> (ids int32, weights bf16)."""
    ids = packed >> 16  # arithmetic shift: the int16 id, sign included
    bits = (packed & 0xFFFF).to(torch.int32)
    bits = torch.where(bits >= 0x8000, bits - 0x10000, bits).to(torch.int16)
    return ids, bits.view(torch.bfloat16)


def flashinfer_ids(topk_ids: torch.Tensor, expert_map: torch.Tensor | None, n_local: int):
    """-> (ids the kernel sees, num_experts). With an expert map, global ids become local ids and
    ids of other ranks the phantom expert ``n_local``, outside the local range [0, n_local)."""
    if expert_map is None:
        return topk_ids.to(torch.int32), n_local
    local = expert_map.to(torch.int32)[topk_ids.long()]
    local = torch.where(local >= 0, local, torch.full_like(local, n_local))
    return local, max(int(expert_map.shape[0]), n_local + 1)


def activation_dtype() -> str:
    mode = os.environ.get(ACT_ENV, "bf16").strip().lower()
    if mode not in ("bf16", "mxfp8"):
        raise ValueError(f"{ACT_ENV} must be 'bf16' or 'mxfp8', got {mode!r}")
    return mode


_warned = False


def moe(hidden, topk_ids, topk_weights, w13, w13_scales, w13_bias, w2, w2_scales, w2_bias,
        activation, alpha, limit, expert_map, combine, activations="bf16"):
    """UNVERIFIED on hardware: see the module docstring."""
    fp8_unsupported(NAME, activations)
    global _warned
    fi = API.require()
    check_activation(activation)
    if not _warned:
        log.warning("mxfp4: the flashinfer kernel's kernel call has not been verified on hardware")
        _warned = True
    T, H = hidden.shape
    k = topk_ids.shape[1]
    E, two_ip, hp_half = w13.shape
    Ip, Hp = two_ip // 2, hp_half * 2
    if T == 0 or k == 0:
        return hidden.new_zeros((T, H) if combine else (T, k, H))
    dev = hidden.device
    x = hidden.to(torch.bfloat16)
    if Hp != H:
        x = F.pad(x, (0, Hp - H))
    ids, n_experts = flashinfer_ids(topk_ids, expert_map, E)
    weights = topk_weights
    top_k = k
    if not combine:  # each (token, slot) its own token, weight 1: the unweighted expert outputs
        x = x.repeat_interleave(k, dim=0)
        ids = ids.reshape(-1, 1)
        weights = torch.ones(T * k, 1, dtype=torch.float32, device=dev)
        top_k = 1
    packed = pack_topk(ids, weights)
    if activation_dtype() == "mxfp8":
        xq, xs = fi.mxfp8_quantize(x, is_sf_swizzled_layout=False)
        xs = xs.view(torch.float8_e4m3fn).reshape(x.shape[0], -1)
        layout = fi.SfLayout.layout_linear
    else:
        xq, xs, layout = x, None, None
    if activation == "swiglu_oai":
        g_alpha = torch.full((E,), float(alpha), dtype=torch.float32, device=dev)
        g_beta = torch.ones(E, dtype=torch.float32, device=dev)
        g_limit = torch.full((E,), float(limit), dtype=torch.float32, device=dev)
    else:
        g_alpha = g_beta = g_limit = None
    out = fi.trtllm_fp4_block_scale_routed_moe(
        topk_ids=packed, routing_bias=None, hidden_states=xq, hidden_states_scale=xs,
        gemm1_weights=w13, gemm1_weights_scale=w13_scales.view(torch.float8_e4m3fn),
        gemm1_bias=w13_bias, gemm1_alpha=g_alpha, gemm1_beta=g_beta, gemm1_clamp_limit=g_limit,
        gemm2_weights=w2, gemm2_weights_scale=w2_scales.view(torch.float8_e4m3fn),
        gemm2_bias=w2_bias, output1_scale_scalar=None, output1_scale_gate_scalar=None,
        output2_scale_scalar=None, num_experts=n_experts, top_k=top_k, n_group=None,
        topk_group=None, intermediate_size=Ip, local_expert_offset=0, local_num_experts=E,
        routed_scaling_factor=None, routing_method_type=int(fi.RoutingMethodType.TopK),
        do_finalize=True, activation_type=int(fi.ActivationType.Swiglu),
        hidden_states_scale_layout=layout)[0]
    out = out[:, :H]
    if not combine:
        out = out.reshape(T, k, H)
    return out.to(hidden.dtype).contiguous()
