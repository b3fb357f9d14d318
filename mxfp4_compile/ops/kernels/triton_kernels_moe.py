"""The "triton_kernels" kernel: OpenAI's triton_kernels ``matmul_ogs`` on Hopper (sm90).

(Over 400 lines on purpose: one adapter to one external API — its detection, the weight and
scale swizzles it needs, the routing data it takes, the call — reads best in one file.)

What it does per call (no host sync, CUDA-graph safe once the Triton kernels are compiled):
  1. routing metadata from OUR top-k ids/weights (we get pre-computed top-k, not logits): a
     per-token expert bitmatrix built with torch ops, then triton_kernels'
     ``routing_from_bitmatrix`` (expert histogram, expert-sorted gather/scatter indices);
  2. GEMM1 ``matmul_ogs`` with the token gather, w13 bias and the fused activation;
  3. GEMM2 ``matmul_ogs`` with w2 bias, the routing weight (``gammas``) and the scatter + per-token
     combine (``combine=False``: GEMM2 without scatter, rows put back in (token, slot) order).

Activations:
  * ``swiglu_oai``: triton_kernels' own ``swiglu_fn``. Its definition equals our canonical one
    exactly: gate = even rows clamped above at ``limit``, up = odd rows clamped to +-limit,
    ``gate * sigmoid(alpha * gate) * (up + 1)`` (the +1 is its ``fma(s, up, s)``), computed in fp32
    on the fp32 accumulator. The canonical interleaved w13 row order is what it reads, so the rows
    are not reordered.
  * ``silu_glu``: triton_kernels has no such activation; we pass our own small Triton function
    (``silu(gate) * up``) through ``matmul_ogs``' ``FusedActivation`` hook, and ``prepare``
    reorders the canonical concatenated [gate; up] rows into gate/up pairs, which is how the hook
    sees them.

Layout (``prepare``; runs once, any device, pure torch): triton_kernels' own Hopper swizzles,
``HopperMXValueLayout(mx_axis=1)`` for the e2m1 bytes and ``HopperMXScaleLayout(mx_axis=1,
num_warps=w(N))`` for the e8m0 scales, as vLLM does on Hopper. The six prepared tensors are plain,
contiguous torch tensors (what the op passes around and Inductor freezes):
  w13        uint8   [E, 2Ip/4, 2Hp]              (swizzled bytes; ``.mT`` is triton_kernels' view)
  w13_scales uint8   [E, pad(2Ip, 32*w(2Ip))/32, pad4(Hp/32)*32]
  w13_bias   float32 [E, 2Ip] or None             (gate/up pairs, as w13's rows)
  w2         uint8   [E, Hp/4, 2Ip]
  w2_scales  uint8   [E, pad(Hp, 32*w(Hp))/32, pad4(Ip/32)*32]
  w2_bias    float32 [E, Hp] or None
``moe`` re-wraps them into triton_kernels ``Tensor``/``Storage``/layout objects at each call (a few
small Python objects, no copies). Hp and Ip must be multiples of 64 (H_MULTIPLE, I_MULTIPLE):
the value swizzle packs K in 32-byte groups (N = 2Ip or Hp is then a multiple of 16, as it needs).

What the Hopper MXFP4 ``_matmul_ogs`` needs, per GEMM with N output columns and K inputs (checked
on CPU by compiling it for sm90 in the tests):
  * ``BLOCK_N % (32 * num_warps) == 0`` (a static assert), where num_warps is the scale layout's
    and BLOCK_N is opt_flags' choice: 256 when N > 128 with 8 warps, next_pow2(N) (<= 128) when
    N <= 128, and 128 always with 4 warps. So w(N) = 8 warps when N > 128 (vLLM's choice; gpt-oss),
    4 when N <= 128, where 8 cannot compile (e.g. H=64 or I<=64). w(N) follows from N alone,
    so ``prepare`` and ``moe`` agree without storing it.
  * BLOCK_K = 128 for e2m1 weights without native MXFP; the K tail is masked for values and
    activations but the swizzled scales are read unmasked, a full 128-column block per BLOCK_K.
    The scale rows are therefore zero-padded to a whole number of BLOCK_K blocks (pad4(K/32)
    e8m0 columns; 2880 -> 92 blocks instead of 90, +2% of the scale bytes, +0.1% of the weights),
    so a K that is not a multiple of 128 never reads another row's or another tensor's bytes
    (an 0xFF there, e8m0 NaN, would turn the masked zeros into NaN).

Activations are bf16 inside (the Hopper MXFP4 path of ``matmul_ogs`` takes only bf16): fp16/fp32
hidden states are cast to bf16 and the result cast back. GEMM1's output (the activation) is stored
in bf16 and each expert's output is rounded to bf16 before the k-way combine, as in vLLM.

Supported triton_kernels API: the one that has ``triton_kernels.routing`` and
``triton_kernels.matmul_ogs`` (Triton 3.5.x; the copy bundled in vLLM 0.33's wheel at
``vllm/third_party/triton_kernels`` runs on Triton 3.6). The later API (``routing`` module
removed) is detected and refused with a message that says so.

Getting triton_kernels (it is not on PyPI under that name; never vendor it into this repo):
    pip download --no-deps vllm==0.33.0 -d wheels/      # the Python 3.12 x86_64 wheel
    unzip wheels/vllm-0.33.0-*.whl 'vllm/third_party/triton_kernels/*' -d /tmp/x
    cp -r /tmp/x/vllm/third_party/triton_kernels <somewhere>/
    export PYTHONPATH=<somewhere>:$PYTHONPATH            # `import triton_kernels` must work
(or install the ``triton_kernels`` package from the Triton repository at tag v3.5.x).
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util

import torch
import torch.nn.functional as F

from ...formats import BLOCK
from ...formats import check_activation
from . import check_canonical_shapes, check_padded, fp8_unsupported, gpu_unavailable
from .optional import KernelUnavailable, OptionalAPI

NAME = "triton_kernels"
H_MULTIPLE = 64
I_MULTIPLE = 64

# HopperMXScaleLayout's warp count: baked into the scale swizzle (rows padded to 2*2*8*warps) and
# into the kernel's tiling (matmul_ogs takes num_warps from the layout). 8 as vLLM uses, except
# for N <= SMALL_N where opt_flags picks BLOCK_N <= 128, which 8 warps cannot tile (module
# docstring); 4 warps always get BLOCK_N = 128.
NUM_WARPS = 8
NUM_WARPS_SMALL_N = 4
SMALL_N = 128
# BLOCK_K of the Hopper MXFP4 matmul (opt_flags' compute_block_k for e2m1 without native MXFP);
# the swizzled scale rows are padded to whole blocks of it (the kernel reads them unmasked).
BLOCK_K = 128
# split_k for both GEMMs: 1 (no split) unless the user set triton_kernels' own constraints. The
# library's heuristic splits K at small T into an fp32 scratch + a reduce pass; None keeps it.
SPLIT_K: int | None = 1
SUPPORTED_API = "matmul_ogs + routing (triton_kernels as in Triton 3.5.x / vLLM 0.33)"

HOW_TO_GET = (
    "get triton_kernels from vLLM 0.33's wheel: `pip download --no-deps vllm==0.33.0`, unzip only "
    "vllm/third_party/triton_kernels/ into a folder and put that folder on PYTHONPATH (see the "
    "docstring of mxfp4_compile.ops.kernels.triton_kernels_moe)")


class TritonKernelsUnavailable(KernelUnavailable):
    """triton_kernels is missing, or its API is not the one this kernel module supports."""


# ---- API detection -------------------------------------------------------------------------------
API = OptionalAPI(
    "triton_kernels", kernel=NAME, install=HOW_TO_GET, supported=SUPPORTED_API,
    requires={"triton": "pip install triton"},
    markers={"routing": " (routing was removed after Triton 3.5: this is the post-3.5 API)"},
    modules={
        "matmul_ogs": ("matmul_ogs", "PrecisionConfig", "FlexCtx", "FnSpecs", "FusedActivation"),
        "routing": ("routing_from_bitmatrix", "RoutingData", "GatherIndx", "ScatterIndx"),
        "tensor": ("Tensor", "Storage", "Bitmatrix", "FP4"),
        "tensor_details.layout": ("HopperMXValueLayout", "HopperMXScaleLayout"),
        "swiglu": ("swiglu_fn",),
        "numerics": ("InFlexData",),
    },
    error=TritonKernelsUnavailable)


@contextlib.contextmanager
def _split_k_constraint(split_k):
    """Set triton_kernels' opt-flag constraint split_k for the duration of our two calls only, and
    never over a constraint or manual opt flags the user set themselves."""
    try:
        of = importlib.import_module("triton_kernels.matmul_ogs_details.opt_flags")
    except ImportError:
        of = None
    saved = getattr(of, "_opt_flags_constraints", None)
    if (split_k is None or not isinstance(saved, dict) or "split_k" in saved
            or getattr(of, "_opt_flags", None) is not None):
        yield
        return
    of._opt_flags_constraints = {**saved, "split_k": split_k}
    try:
        yield
    finally:
        of._opt_flags_constraints = saved


def api_error() -> str | None:
    """None when a supported triton_kernels is importable, else why not."""
    return API.reason()


def api_description() -> str | None:
    """Which triton_kernels API was found, and where (None when none supported)."""
    ns, _ = API.load()
    return None if ns is None else f"{SUPPORTED_API} at {ns.where}"


def unavailable_reason(device: torch.device) -> str | None:
    return gpu_unavailable(torch.device(device), NAME, 9, "sm90 (Hopper)",
                           "it prepares weights in triton_kernels' Hopper MXFP4 layout, "
                           "HopperMXValueLayout/HopperMXScaleLayout") or api_error()


# ---- layout -----------------------------------------------------------------------------------------
def _pad_to(n: int, m: int) -> int:
    return -(-n // m) * m


def num_warps_for(n: int) -> int:
    """Warps of the scale swizzle and of the matmul for a weight with ``n`` output columns."""
    return NUM_WARPS if n > SMALL_N else NUM_WARPS_SMALL_N


def _scale_shape(E: int, N: int, K: int) -> tuple[int, int, int]:
    """Prepared (swizzled) scale shape of a weight with N outputs and K inputs: N padded by
    HopperMXScaleLayout (then 32 rows per scale row), K/BLOCK scales padded to whole BLOCK_Ks."""
    rows = _pad_to(N, 2 * 2 * 8 * num_warps_for(N)) // 32
    return (E, rows, _pad_to(K // BLOCK, BLOCK_K // BLOCK) * 32)


def _check_padded(Hp: int, Ip: int) -> None:
    check_padded(NAME, Hp, Ip, H_MULTIPLE, I_MULTIPLE, "Hopper MXFP4 swizzle")


def prepared_shapes(E, Hp, Ip, activation, has_w13_bias, has_w2_bias, activations="bf16"):
    """(shape, dtype) of each of the six prepared tensors (None for an absent bias)."""
    fp8_unsupported(NAME, activations)
    check_activation(activation)
    _check_padded(Hp, Ip)
    u8, f32 = torch.uint8, torch.float32
    return [((E, 2 * Ip // 4, 2 * Hp), u8),
            (_scale_shape(E, 2 * Ip, Hp), u8),
            ((E, 2 * Ip), f32) if has_w13_bias else None,
            ((E, Hp // 4, 2 * Ip), u8),
            (_scale_shape(E, Hp, Ip), u8),
            ((E, Hp), f32) if has_w2_bias else None]


def concat_to_pairs(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[g0..g(n-1), u0..u(n-1)] -> [g0, u0, g1, u1, ...] along ``dim`` (silu_glu's rows into the
    pair order the fused-activation hook reads). Inverse: ``pairs_to_concat``."""
    gate, up = t.chunk(2, dim=dim)
    return torch.stack((gate, up), dim=dim + 1).flatten(dim, dim + 1)


def pairs_to_concat(t: torch.Tensor, dim: int) -> torch.Tensor:
    pairs = t.unflatten(dim, (-1, 2))
    return torch.cat((pairs.select(dim + 1, 0), pairs.select(dim + 1, 1)), dim=dim)


_CHUNK = 8  # experts swizzled at a time: bounds the int32 temporaries of the value swizzle


def swizzle_values(w: torch.Tensor) -> torch.Tensor:
    """Canonical e2m1 bytes [E, N, K/2] -> contiguous Hopper-swizzled bytes [E, N/4, 2K]."""
    api = API.require()
    E, N, Kh = w.shape
    out = torch.empty(E, N // 4, Kh * 4, dtype=torch.uint8, device=w.device)
    for e0 in range(0, E, _CHUNK):
        part = w[e0:e0 + _CHUNK].contiguous().transpose(1, 2)  # triton_kernels' [E, K/2, N] view
        layout = api.HopperMXValueLayout(part.shape, mx_axis=1)
        out[e0:e0 + _CHUNK] = layout.swizzle_data(part).mT
    return out


def unswizzle_values(v: torch.Tensor) -> torch.Tensor:
    """Inverse of ``swizzle_values``: [E, N/4, 2K] -> [E, N, K/2]."""
    api = API.require()
    E, n4, k2 = v.shape
    layout = api.HopperMXValueLayout((E, k2 // 4, n4 * 4), mx_axis=1)
    return layout.unswizzle_data(v.mT).transpose(1, 2).contiguous()


def swizzle_scales(s: torch.Tensor) -> torch.Tensor:
    """Canonical e8m0 bytes [E, N, K/32] -> contiguous Hopper-swizzled ``_scale_shape(E, N, K)``:
    N padded for the layout's warps (``num_warps_for(N)``), K/32 zero-padded to whole BLOCK_Ks."""
    api = API.require()
    E, N, k32 = s.shape
    s = F.pad(s, (0, _pad_to(k32, BLOCK_K // BLOCK) - k32))  # byte 0: finite, never read as data
    t = s.contiguous().transpose(1, 2)  # [E, K/32, N]
    layout = api.HopperMXScaleLayout(t.shape, mx_axis=1, num_warps=num_warps_for(N))
    return layout.swizzle_data(t).mT.contiguous()


def unswizzle_scales(p: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """Inverse of ``swizzle_scales`` -> [E, N, K/32]."""
    api = API.require()
    layout = api.HopperMXScaleLayout((p.shape[0], p.shape[2] // 32, N), mx_axis=1,
                                     num_warps=num_warps_for(N))
    return layout.unswizzle_data(p.mT).transpose(1, 2)[:, :N, :K // BLOCK].contiguous()


def prepare(w13, w13_scales, w13_bias, w2, w2_scales, w2_bias, activation, activations="bf16"):
    """Canonical padded MXFP4 (ops/moe_torch.py) -> this kernel's six tensors (module docstring)."""
    fp8_unsupported(NAME, activations)
    check_activation(activation)
    _, two_ip, hp_half = w13.shape
    _check_padded(hp_half * 2, two_ip // 2)
    check_canonical_shapes(w13, w13_scales, w2, w2_scales)
    if activation == "silu_glu":  # [gate; up] -> gate/up pairs, what the activation hook reads
        w13, w13_scales = concat_to_pairs(w13, 1), concat_to_pairs(w13_scales, 1)
        if w13_bias is not None:
            w13_bias = concat_to_pairs(w13_bias, 1)
    b13 = None if w13_bias is None else w13_bias.float().contiguous()
    b2 = None if w2_bias is None else w2_bias.float().contiguous()
    return (swizzle_values(w13), swizzle_scales(w13_scales), b13,
            swizzle_values(w2), swizzle_scales(w2_scales), b2)


def unprepare(w13, w13_scales, w13_bias, w2, w2_scales, w2_bias, activation, activations="bf16"):
    """Inverse of ``prepare`` (needs triton_kernels, whose layouts do the unswizzling)."""
    check_activation(activation)
    (_, n4_13, k2_13), (_, n4_2, k2_2) = w13.shape, w2.shape
    w13c = unswizzle_values(w13)
    s13 = unswizzle_scales(w13_scales, n4_13 * 4, k2_13 // 2)
    b13 = None if w13_bias is None else w13_bias.clone()
    if activation == "silu_glu":  # gate/up pairs -> [gate; up]
        w13c, s13 = pairs_to_concat(w13c, 1), pairs_to_concat(s13, 1)
        b13 = None if b13 is None else pairs_to_concat(b13, 1)
    return (w13c, s13, b13, unswizzle_values(w2), unswizzle_scales(w2_scales, n4_2 * 4, k2_2 // 2),
            None if w2_bias is None else w2_bias.clone())


# ---- call time ----------------------------------------------------------------------------------------
def _wrap_weight(api, values: torch.Tensor, scales: torch.Tensor):
    """Prepared (values [E, N/4, 2K], scales) -> triton_kernels (Tensor, PrecisionConfig), no copies."""
    E, n4, k2 = values.shape
    N, K = n4 * 4, k2 // 2
    if tuple(scales.shape) != _scale_shape(E, N, K):
        raise ValueError(f"triton_kernels: scales {tuple(scales.shape)} do not match weights "
                         f"{tuple(values.shape)} (expected {_scale_shape(E, N, K)}); pass what "
                         f"this kernel module's prepare returned")
    vlayout = api.HopperMXValueLayout((E, K // 2, N), mx_axis=1)
    w = api.Tensor(api.Storage(values.mT, vlayout), dtype=api.FP4, shape=[E, K, N])
    slayout = api.HopperMXScaleLayout((E, K // BLOCK, N), mx_axis=1, num_warps=num_warps_for(N))
    ws = api.Tensor(api.Storage(scales.mT, slayout), dtype=torch.uint8, shape=[E, K // BLOCK, N])
    pc = api.PrecisionConfig(weight_scale=ws, flex_ctx=api.FlexCtx(rhs_data=api.InFlexData()))
    return w, pc, N, K


def expert_bitmatrix_words(ids: torch.Tensor, n_experts: int) -> torch.Tensor:
    """ids [T, k] (int, -1 = none) -> int32 [T, ceil(E/32)]: bit (e % 32) of word e // 32 is set
    when the token picked expert e (the bitmatrix triton_kernels' routing reads; view as uint32).
    Top-k ids of a token are distinct, so the sum below is the bitwise or."""
    T = ids.shape[0]
    n_words = -(-n_experts // 32)
    idl = ids.long()
    valid = idl >= 0
    idl = idl.clamp(min=0)
    bits = torch.where(valid, torch.ones_like(idl) << (idl % 32), torch.zeros_like(idl))
    words = torch.zeros(T, n_words, dtype=torch.int64, device=ids.device)
    words.scatter_add_(1, idl // 32, bits)
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words)  # two's complement into int32
    return words.to(torch.int32)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _routing_inputs_torch(ids, weights, n_experts, kp, expert_map):
    """Plain-torch twin of ``_routing_inputs_kernel`` (CPU, tests): -> (ids16, scal, words)."""
    T, k = ids.shape
    if expert_map is not None:
        ids = expert_map.to(torch.int32)[ids.long()]
    ids16 = F.pad(ids.to(torch.int16), (0, kp - k), value=-1)
    scal = F.pad(weights.to(torch.float32), (0, kp - k), value=0.0)
    return ids16, scal, expert_bitmatrix_words(ids16, n_experts)


def routing_inputs(ids, weights, n_experts, expert_map=None, use_kernel=None):
    """Our top-k ids [T, k] (global ids when ``expert_map`` is given) and weights -> what
    triton_kernels' routing reads: local ids int16 [T, kp] (-1 = none), weights float32 [T, kp]
    and the expert bitmatrix (int32 words [T, ceil(E/32)]); kp = k rounded up to a power of two
    (triton_kernels needs one; extra slots are empty). One Triton kernel on CUDA, torch elsewhere."""
    T, k = ids.shape
    kp = _next_pow2(k)
    if use_kernel is None:
        use_kernel = ids.is_cuda
    if not use_kernel or _routing_inputs_kernel is None:
        return (*_routing_inputs_torch(ids, weights, n_experts, kp, expert_map), kp)
    n_words = -(-n_experts // 32)
    ids16 = torch.empty(T, kp, dtype=torch.int16, device=ids.device)
    scal = torch.empty(T, kp, dtype=torch.float32, device=ids.device)
    words = torch.empty(T, n_words, dtype=torch.int32, device=ids.device)
    if T:
        block_t = 32
        _routing_inputs_kernel[(triton.cdiv(T, block_t),)](
            ids, ids.stride(0), ids.stride(1), weights, weights.stride(0), weights.stride(1),
            expert_map, ids16, scal, words, T,
            K=k, KP=kp, W=n_words, WP=_next_pow2(n_words), HAS_MAP=expert_map is not None,
            BLOCK_T=block_t, num_warps=4)
    return ids16, scal, words, kp


def _routing(api, ids: torch.Tensor, weights: torch.Tensor, n_experts: int, expert_map=None):
    """Our top-k -> triton_kernels (RoutingData, GatherIndx, ScatterIndx, kp)."""
    T = ids.shape[0]
    ids16, scal, words, kp = routing_inputs(ids, weights, n_experts, expert_map)
    n_cols = words.shape[1] * 32
    bitmatrix = api.Bitmatrix(words.view(torch.uint32), shape=[T, n_cols], shape_max=[T, None],
                              scratchpad=None)
    routing_data, gather, scatter = api.routing_from_bitmatrix(bitmatrix, scal, ids16, n_experts, kp)
    return routing_data, gather, scatter, kp


if importlib.util.find_spec("triton") is not None:
    import triton
    import triton.language as tl

    @triton.jit
    def _mxfp4c_silu_glu(x):
        """matmul_ogs fused-activation hook: columns come in (gate, up) pairs -> silu(gate) * up."""
        gate, up = tl.split(tl.reshape(x, (x.shape[0], x.shape[1] // 2, 2)))
        gate = gate.to(tl.float32)
        return gate / (1.0 + tl.exp(-gate)) * up.to(tl.float32)

    @triton.jit
    def _routing_inputs_kernel(Ids, stride_it, stride_ik, Wts, stride_wt, stride_wk, Map,
                               Ids16, Scal, Words, T,
                               K: tl.constexpr, KP: tl.constexpr, W: tl.constexpr,
                               WP: tl.constexpr, HAS_MAP: tl.constexpr, BLOCK_T: tl.constexpr):
        """One pass over the top-k: (map to local ids), pad k -> KP, cast, and the bitmatrix.
        A token's ids are distinct, so summing their one-bit words is their bitwise or."""
        t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        s = tl.arange(0, KP)
        m = (t[:, None] < T) & (s[None, :] < K)
        e = tl.load(Ids + t[:, None] * stride_it + s[None, :] * stride_ik, mask=m, other=-1)
        e = e.to(tl.int32)
        if HAS_MAP:
            e = tl.load(Map + tl.maximum(e, 0), mask=m & (e >= 0), other=-1).to(tl.int32)
        w = tl.load(Wts + t[:, None] * stride_wt + s[None, :] * stride_wk, mask=m, other=0.0)
        out_m = (t[:, None] < T) & (s[None, :] < KP)
        tl.store(Ids16 + t[:, None] * KP + s[None, :], e.to(tl.int16), mask=out_m)
        tl.store(Scal + t[:, None] * KP + s[None, :], w.to(tl.float32), mask=out_m)
        valid = e >= 0
        word = tl.where(valid, e >> 5, -1)
        bit = tl.full(e.shape, 1, tl.uint32) << (e & 31).to(tl.uint32)
        wi = tl.arange(0, WP)
        hit = word[:, :, None] == wi[None, None, :]  # [BLOCK_T, KP, WP]
        words = tl.sum(tl.where(hit, bit[:, :, None], tl.zeros_like(bit)[:, :, None]), axis=1)
        tl.store(Words + t[:, None] * W + wi[None, :], words.to(tl.int32, bitcast=True),
                 mask=(t[:, None] < T) & (wi[None, :] < W))
else:  # pragma: no cover - no Triton: the kernel reports itself unavailable
    _mxfp4c_silu_glu = None
    _routing_inputs_kernel = None


def _activation(api, activation: str, alpha: float, limit: float):
    if activation == "swiglu_oai":
        return api.FusedActivation(api.FnSpecs("swiglu", api.swiglu_fn, ("alpha", "limit")),
                                   (float(alpha), float(limit)), 2)
    return api.FusedActivation(api.FnSpecs("mxfp4c_silu_glu", _mxfp4c_silu_glu, ()), (), 2)


def moe(hidden, topk_ids, topk_weights, w13, w13_scales, w13_bias, w2, w2_scales, w2_bias,
        activation, alpha, limit, expert_map, combine, activations="bf16"):
    fp8_unsupported(NAME, activations)
    api = API.require()
    check_activation(activation)
    T, H = hidden.shape
    k = topk_ids.shape[1]
    E = w13.shape[0]
    w13_t, pc13, n13, Hp = _wrap_weight(api, w13, w13_scales)
    w2_t, pc2, _, Ip = _wrap_weight(api, w2, w2_scales)
    if T == 0 or k == 0:
        shape = (T, H) if combine else (T, k, H)
        return hidden.new_zeros(shape)
    with torch.cuda.device(hidden.device), _split_k_constraint(SPLIT_K):
        x = hidden if hidden.dtype == torch.bfloat16 else hidden.to(torch.bfloat16)
        if H != Hp:
            x = F.pad(x, (0, Hp - H))
        routing_data, gather, scatter, kp = _routing(api, topk_ids, topk_weights, E, expert_map)
        act = _activation(api, activation, alpha, limit)
        inter = api.matmul_ogs(x, w13_t, w13_bias, routing_data, gather_indx=gather,
                               precision_config=pc13, fused_activation=act)  # [T*kp, Ip] sorted
        if combine:
            out = api.matmul_ogs(inter, w2_t, w2_bias, routing_data, scatter_indx=scatter,
                                 precision_config=pc2, gammas=routing_data.gate_scal)  # [T, Hp]
            out = out[:, :H]
        else:
            ys = api.matmul_ogs(inter, w2_t, w2_bias, routing_data,
                                precision_config=pc2)  # [T*kp, Hp], expert-sorted rows
            pos = scatter.src_indx.view(T, kp)[:, :k].long()  # (token, slot) -> sorted row, -1 none
            out = ys[pos.clamp(min=0)]
            out = torch.where((pos >= 0).unsqueeze(-1), out, torch.zeros((), dtype=out.dtype,
                                                                          device=out.device))
            out = out[..., :H]
    return out.to(hidden.dtype).contiguous()
