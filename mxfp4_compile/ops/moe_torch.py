"""Plain-torch fused MoE on MXFP4 weights in the canonical layout: the oracle for every kernel,
and, through the reference kernel (ops/kernels/reference_moe.py: the same tensors with w13's
gate/up rows as explicit pairs), the kernel used on CPU and on GPUs no other kernel supports.

Shape legend: T tokens, k experts per token, E local experts, H hidden (Hp padded),
I intermediate (Ip padded).
  hidden        [T, H]            bf16 / fp16 / fp32
  topk_ids      [T, k]            int32 / int64, global expert ids
  topk_weights  [T, k]            float
  w13, w13_s    [E, 2Ip, Hp/2], [E, 2Ip, Hp/32]   uint8 (gate/up rows: formats.ACTIVATIONS)
  w13_bias      [E, 2Ip]          float32 or None
  w2, w2_s      [E, Hp, Ip/2], [E, Hp, Ip/32]     uint8
  w2_bias       [E, Hp]           float32 or None
  expert_map    [E_global]        int32, global id -> local id, -1 = not on this rank
Math is float32; the output has hidden's dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import numerics
from ..formats import SWIGLU_ALPHA, SWIGLU_LIMIT, check_activation, check_activations, gate_up_interleaved


def _swiglu(gate: torch.Tensor, up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return gate * torch.sigmoid(alpha * gate) * (up + 1)


def swiglu_oai(h: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss: gate = even rows (clamped above at limit), up = odd rows (clamped to ±limit)."""
    return _swiglu(h[..., 0::2], h[..., 1::2], alpha, limit)


def silu_glu(h: torch.Tensor) -> torch.Tensor:
    """Mixtral/Qwen/DeepSeek: [gate; up] concatenated, silu(gate) * up."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def activate(h: torch.Tensor, activation: str, alpha: float, limit: float,
             interleaved: bool | None = None) -> torch.Tensor:
    """``activation`` of the gate/up projections h [..., 2Ip]: pairs of rows when
    ``interleaved``, else halves; None: the activation's own canonical order (formats.ACTIVATIONS)."""
    if interleaved is None:
        interleaved = gate_up_interleaved(activation)
    gate, up = (h[..., 0::2], h[..., 1::2]) if interleaved else h.chunk(2, dim=-1)
    if check_activation(activation) == "swiglu_oai":
        return _swiglu(gate, up, alpha, limit)
    return F.silu(gate) * up


def local_ids(topk_ids: torch.Tensor, expert_map: torch.Tensor | None) -> torch.Tensor:
    """Global top-k ids -> local expert ids (-1 where the expert lives on another rank). Ids
    outside [0, len(expert_map)) map to -1 ("not on this rank", as every kernel treats them) instead
    of indexing out of range, or wrapping around for negative ids. Without a map the ids stay as
    they are: an id outside [0, E) matches no expert, so it contributes zero."""
    ids = topk_ids.long()
    if expert_map is None:
        return ids
    n = expert_map.shape[0]
    if n == 0:
        return torch.full_like(ids, -1)
    inside = (ids >= 0) & (ids < n)
    return torch.where(inside, expert_map.long()[ids.clamp(0, n - 1)], -1)


E4M3_MAX = 448.0  # largest finite float8_e4m3fn


def quantize_rows_e4m3(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] float -> the float32 values of its per-row e4m3 quantization (the op's
    ``activations="fp8"``): scale s = amax(|x|) / 448 per row (1 for an all-zero row), q = x / s
    rounded to the nearest e4m3, returned as q * s. A row holding inf or NaN comes back
    non-finite."""
    x = x.float()
    amax = x.abs().amax(dim=-1, keepdim=True)
    s = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    s = torch.where(x.isnan().any(dim=-1, keepdim=True), float("nan"), s)
    return (x / s).to(torch.float8_e4m3fn).float() * s


def moe_torch(hidden, topk_ids, topk_weights, w13, w13_scales, w13_bias, w2, w2_scales, w2_bias,
              activation="swiglu_oai", alpha=SWIGLU_ALPHA, limit=SWIGLU_LIMIT, expert_map=None,
              combine=True, sync_free=None, *, interleaved=None, activations="bf16",
              intermediate_dtype=None):
    """Fused MoE forward. ``interleaved``: w13's gate/up row order (see ``activate``). ``sync_free`` (default: on for non-CPU devices) computes every expert
    on every token and masks, so no data-dependent shapes or host syncs occur (CUDA-graph safe);
    otherwise each expert runs on its own tokens only. ``activations="fp8"``: each GEMM's
    input rows (the tokens, then the activated intermediate) are first quantized per row to
    e4m3 (``quantize_rows_e4m3``); the weights and the math stay exact float32.
    ``intermediate_dtype``: round the activated intermediate to this dtype before GEMM2 (and
    before its fp8 quantization), as a kernel that stores it so does; None: exact."""
    T, H = hidden.shape
    k = topk_ids.shape[1]
    E = w13.shape[0]
    if sync_free is None:
        sync_free = hidden.device.type != "cpu"
    fp8 = check_activations(activations) == "fp8"
    x = F.pad(hidden.float(), (0, w13.shape[2] * 2 - H))  # [T, Hp]
    if fp8:
        x = quantize_rows_e4m3(x)

    def act(h):
        a = activate(h, activation, alpha, limit, interleaved)
        if intermediate_dtype is not None:
            a = a.to(intermediate_dtype).float()
        return quantize_rows_e4m3(a) if fp8 else a
    ids = local_ids(topk_ids, expert_map)  # [T, k]
    out = torch.zeros(T, k, w2.shape[1], dtype=torch.float32, device=hidden.device)  # per-slot outputs
    for e in range(E):
        W13 = numerics.dequantize(w13[e], w13_scales[e], torch.float32)  # [2Ip, Hp]
        W2 = numerics.dequantize(w2[e], w2_scales[e], torch.float32)  # [Hp, Ip]
        if sync_free:
            h = x @ W13.T  # [T, 2Ip]
            if w13_bias is not None:
                h = h + w13_bias[e].float()
            y = act(h) @ W2.T  # [T, Hp]
            if w2_bias is not None:
                y = y + w2_bias[e].float()
            hit = (ids == e).unsqueeze(-1)  # [T, k, 1]
            out = torch.where(hit, y.unsqueeze(1), out)
        else:
            tok, slot = (ids == e).nonzero(as_tuple=True)
            if tok.numel() == 0:
                continue
            h = x[tok] @ W13.T
            if w13_bias is not None:
                h = h + w13_bias[e].float()
            y = act(h) @ W2.T
            if w2_bias is not None:
                y = y + w2_bias[e].float()
            out[tok, slot] = y
    out = out[..., :H]
    if not combine:
        return out.to(hidden.dtype)
    return (out * topk_weights.float().unsqueeze(-1)).sum(dim=1).to(hidden.dtype)
