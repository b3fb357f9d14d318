"""Expert weights -> the layout a kernel runs on: canonical order, padding, MXFP4, kernel layout.

Shape legend: E experts, H hidden, I intermediate, Hp/Ip padded per kernel (ops/dispatch.py).
Inputs (float):  w13 [E, 2I, H] (or [E, H, 2I] when ``transposed``), w2 [E, H, I] (or [E, I, H]),
                 w13_bias [E, 2I], w2_bias [E, H].
Canonical MXFP4: see ops/moe_torch.py (gate/up rows ordered per activation, zero padding).

Prepared weights are cached by the identity and ``_version`` of the input tensors plus every
option, so the compiler's six transform calls per MoE layer and every recompile (new T, 0/1
specialization) share one quantization and one copy.
"""
from __future__ import annotations

import dataclasses
import weakref

import torch
import torch.nn.functional as F

from .. import formats, numerics
from ..formats import BLOCK, Activation, Kernel, check_activation, check_kernel, check_rounding
from . import dispatch

ROLES = ("w13", "w13_scales", "w13_bias", "w2", "w2_scales", "w2_bias")


@dataclasses.dataclass
class PreparedMoE:
    """MXFP4 expert weights in one kernel's layout; ``moe_kwargs()`` feeds torch.ops.mxfp4.moe."""
    kernel: Kernel            # layout these tensors are in (never "auto")
    activation: Activation    # "swiglu_oai" | "silu_glu"
    hidden_size: int          # H before padding
    intermediate_size: int    # I before padding
    w13: torch.Tensor         # canonical: [E, 2Ip, Hp/2] uint8
    w13_scales: torch.Tensor  # canonical: [E, 2Ip, Hp/32] uint8 (e8m0)
    w13_bias: torch.Tensor | None  # canonical: [E, 2Ip] float32
    w2: torch.Tensor          # canonical: [E, Hp, Ip/2] uint8
    w2_scales: torch.Tensor   # canonical: [E, Hp, Ip/32] uint8
    w2_bias: torch.Tensor | None   # canonical: [E, Hp] float32

    def tensors(self):
        return tuple(getattr(self, r) for r in ROLES)

    def moe_kwargs(self):
        return dict(zip(ROLES, self.tensors()), kernel=self.kernel, activation=self.activation)


def _reorder_gate_up(t: torch.Tensor, dim: int, interleaved_in: bool, activation: str):
    """Rows of gate/up along ``dim`` from the input's order to the activation's canonical order."""
    if interleaved_in == formats.gate_up_interleaved(activation):
        return t
    if interleaved_in:  # [g0, u0, g1, u1, ...] -> [g..., u...]
        pairs = t.unflatten(dim, (-1, 2))
        return torch.cat((pairs.select(dim + 1, 0), pairs.select(dim + 1, 1)), dim=dim)
    gate, up = t.chunk(2, dim=dim)  # [g..., u...] -> [g0, u0, ...]
    return torch.stack((gate, up), dim=dim + 1).flatten(dim, dim + 1)


def _pad_gate_up(t: torch.Tensor, dim: int, ip: int, activation: str):
    """Pad the 2I gate/up rows along ``dim`` to 2Ip, keeping gate/up pairing."""
    two_i = t.shape[dim]
    if two_i == 2 * ip:
        return t
    pad_rows = list(t.shape)
    if formats.gate_up_interleaved(activation):
        pad_rows[dim] = 2 * ip - two_i
        return torch.cat((t, t.new_zeros(pad_rows)), dim=dim)
    pad_rows[dim] = ip - two_i // 2
    gate, up = t.chunk(2, dim=dim)
    z = t.new_zeros(pad_rows)
    return torch.cat((gate, z, up, z), dim=dim)


def _own_f32(t: torch.Tensor) -> torch.Tensor:
    """A float32 copy that never aliases the caller's tensor (an in-place change of the model's
    bias must not change prepared weights behind the cache's back, nor the reverse)."""
    return t.detach().to(torch.float32, copy=True)


def _pad_last(t: torch.Tensor, n: int) -> torch.Tensor:
    return F.pad(t, (0, n - t.shape[-1])) if t.shape[-1] != n else t


def _pad_dim1(t: torch.Tensor, n: int) -> torch.Tensor:
    if t.shape[1] == n:
        return t
    shape = list(t.shape)
    shape[1] = n - t.shape[1]
    return torch.cat((t, t.new_zeros(shape)), dim=1)


def _quantize_by_expert(w: torch.Tensor, rounding: str):
    """Quantize expert by expert: bounds the float32 temporaries to one expert's size."""
    parts = [numerics.quantize(w[e], rounding) for e in range(w.shape[0])]
    if not parts:
        n, k = w.shape[1], w.shape[2]
        z = torch.empty(0, n, k // 2, dtype=torch.uint8, device=w.device)
        return z, torch.empty(0, n, k // BLOCK, dtype=torch.uint8, device=w.device)
    return torch.stack([p for p, _ in parts]), torch.stack([s for _, s in parts])


def check_expert_shapes(w13_shape, w2_shape, transposed: bool) -> tuple[int, int, int]:
    """-> (E, H, I) from float expert weight shapes, with errors that name the mismatch."""
    if len(w13_shape) != 3 or len(w2_shape) != 3:
        raise ValueError(f"expert weights must be 3-D [E, N, K]; got w13 {tuple(w13_shape)}, "
                         f"w2 {tuple(w2_shape)}")
    e, n13, k13 = (w13_shape[0], w13_shape[2], w13_shape[1]) if transposed else w13_shape
    e2, n2, k2 = (w2_shape[0], w2_shape[2], w2_shape[1]) if transposed else w2_shape
    if e != e2:
        raise ValueError(f"w13 has {e} experts but w2 has {e2}: both must hold the same experts")
    if n13 % 2:
        raise ValueError(f"w13 must hold 2*I gate/up rows; got {n13} (odd)")
    if n2 != k13 or k2 * 2 != n13:
        raise ValueError(f"w13 [E, 2I={n13}, H={k13}] and w2 [E, H={n2}, I={k2}] disagree "
                         f"(transposed={transposed}): expected w2 [E, {k13}, {n13 // 2}]")
    return e, k13, k2


def quantize_experts(w13, w2, w13_bias=None, w2_bias=None, *, activation, rounding="floor",
                     gate_up_interleaved=None, transposed=False, h_multiple=BLOCK, i_multiple=BLOCK):
    """Float expert weights -> the six canonical MXFP4 tensors (padded)."""
    check_activation(activation)
    check_rounding(rounding)
    E, H, I = check_expert_shapes(w13.shape, w2.shape, transposed)
    for name, t in (("w13", w13), ("w2", w2)):
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a float tensor to quantize, got {t.dtype}; "
                            f"already-MXFP4 weights go through from_mxfp4_blocks()")
    if gate_up_interleaved is None:
        gate_up_interleaved = formats.gate_up_interleaved(activation)
    hp, ip = -(-H // h_multiple) * h_multiple, -(-I // i_multiple) * i_multiple
    if transposed:
        w13, w2 = w13.transpose(1, 2), w2.transpose(1, 2)
    w13 = _reorder_gate_up(w13, 1, gate_up_interleaved, activation)
    w13 = _pad_last(_pad_gate_up(w13, 1, ip, activation), hp)  # [E, 2Ip, Hp]
    w2 = _pad_last(_pad_dim1(w2, hp), ip)  # [E, Hp, Ip]
    q13, s13 = _quantize_by_expert(w13, rounding)
    q2, s2 = _quantize_by_expert(w2, rounding)
    b13 = b2 = None
    if w13_bias is not None:
        if tuple(w13_bias.shape) != (E, 2 * I):
            raise ValueError(f"w13_bias must be [E={E}, 2I={2 * I}], got {tuple(w13_bias.shape)}")
        b13 = _pad_gate_up(_reorder_gate_up(_own_f32(w13_bias), 1, gate_up_interleaved, activation),
                           1, ip, activation).contiguous()
    if w2_bias is not None:
        if tuple(w2_bias.shape) != (E, H):
            raise ValueError(f"w2_bias must be [E={E}, H={H}], got {tuple(w2_bias.shape)}")
        b2 = _pad_last(_own_f32(w2_bias), hp).contiguous()
    return q13, s13, b13, q2, s2, b2


def pad_packed(w13, w13_scales, w13_bias, w2, w2_scales, w2_bias, *, activation, hp, ip):
    """Canonical MXFP4 tensors (unpadded or less padded) -> padded to (hp, ip), bytes untouched."""
    w13 = _pad_last(_pad_gate_up(w13, 1, ip, activation), hp // 2)
    w13_scales = _pad_last(_pad_gate_up(w13_scales, 1, ip, activation), hp // BLOCK)
    if w13_bias is not None:
        w13_bias = _pad_gate_up(_own_f32(w13_bias), 1, ip, activation).contiguous()
    w2 = _pad_last(_pad_dim1(w2, hp), ip // 2)
    w2_scales = _pad_last(_pad_dim1(w2_scales, hp), ip // BLOCK)
    if w2_bias is not None:
        w2_bias = _pad_last(_own_f32(w2_bias), hp).contiguous()
    return (w13.contiguous(), w13_scales.contiguous(), w13_bias,
            w2.contiguous(), w2_scales.contiguous(), w2_bias)


def to_kernel_layout(canonical, *, kernel, activation, hidden_size, intermediate_size) -> PreparedMoE:
    module = dispatch.get_kernel(kernel)
    out = module.prepare(*canonical, activation)
    return PreparedMoE(kernel, activation, hidden_size, intermediate_size, *out)


# ---- cache: (identity + _version of each input tensor, options) -> PreparedMoE --------------------
_cache: dict[tuple, tuple[list, PreparedMoE]] = {}
_quantized = 0


def quantization_count() -> int:
    """How many real (uncached) weight preparations ran in this process."""
    return _quantized


def clear_cache() -> None:
    _cache.clear()


def _tensor_key(t):
    return None if t is None else (id(t), t._version)


def prepare_moe_weights(w13, w2, w13_bias=None, w2_bias=None, *, activation, kernel="reference",
                        rounding="floor", gate_up_interleaved=None, transposed=False,
                        cache=True) -> PreparedMoE:
    """Float expert weights -> PreparedMoE for ``kernel`` (quantize, pad, kernel layout).

    ``gate_up_interleaved`` says how the INPUT w13 orders gate/up rows (default: the activation's
    own order); ``transposed`` means the inputs are [E, K, N] (x @ w) instead of [E, N, K]."""
    global _quantized
    check_activation(activation)
    check_kernel(kernel, allow_auto=False)
    check_rounding(rounding)
    if gate_up_interleaved is None:  # resolve before keying: None and its meaning share one entry
        gate_up_interleaved = formats.gate_up_interleaved(activation)
    inputs = (w13, w2, w13_bias, w2_bias)
    key = (tuple(_tensor_key(t) for t in inputs), activation, kernel, rounding,
           gate_up_interleaved, transposed)
    if cache and key in _cache:
        refs, prepared = _cache[key]
        if all((r is None and t is None) or (r is not None and r() is t) for r, t in zip(refs, inputs)):
            return prepared
    E, H, I = check_expert_shapes(w13.shape, w2.shape, transposed)
    hm, im = dispatch.padding(kernel)
    canonical = quantize_experts(w13, w2, w13_bias, w2_bias, activation=activation, rounding=rounding,
                                 gate_up_interleaved=gate_up_interleaved, transposed=transposed,
                                 h_multiple=hm, i_multiple=im)
    prepared = to_kernel_layout(canonical, kernel=kernel, activation=activation, hidden_size=H,
                                intermediate_size=I)
    _quantized += 1
    if cache:
        refs = [None if t is None else weakref.ref(t, lambda _r, k=key: _cache.pop(k, None))
                for t in inputs]
        _cache[key] = (refs, prepared)
    return prepared


def from_mxfp4_blocks(w13_blocks, w13_scales, w13_bias, w2_blocks, w2_scales, w2_bias, *,
                      kernel="reference", activation="swiglu_oai") -> PreparedMoE:
    """gpt-oss style checkpoint tensors -> PreparedMoE, without requantizing.

    ``*_blocks`` [E, N, K/32, 16] uint8 (or already [E, N, K/2]), ``*_scales`` [E, N, K/32] uint8,
    biases [E, N]. w13 rows in the activation's canonical order (gpt-oss: interleaved)."""
    check_activation(activation)
    check_kernel(kernel, allow_auto=False)
    flat = []
    for name, b, s in (("w13", w13_blocks, w13_scales), ("w2", w2_blocks, w2_scales)):
        b, s = numerics._as_uint8(b, f"{name}_blocks"), numerics._as_uint8(s, f"{name}_scales")
        if b.dim() == 4:
            if b.shape[-1] != BLOCK // 2:
                raise ValueError(f"{name}_blocks [E, N, K/{BLOCK}, {BLOCK // 2}] expected, got "
                                 f"{tuple(b.shape)}")
            b = b.flatten(-2)
        if b.dim() != 3 or s.dim() != 3 or s.shape[:2] != b.shape[:2] or s.shape[2] * (BLOCK // 2) != b.shape[2]:
            raise ValueError(f"{name}: blocks {tuple(b.shape)} and scales {tuple(s.shape)} do not "
                             f"describe one [E, N, K] MXFP4 tensor ([E, N, K/2] and [E, N, K/32])")
        if 0 in b.shape[1:]:
            raise ValueError(f"{name}: blocks {tuple(b.shape)} have an empty N or K dim; an expert "
                             f"weight needs N >= 1 rows of K >= {BLOCK} elements")
        flat += [b, s]
    E, two_i, h_half = flat[0].shape
    if two_i % 2:
        raise ValueError(f"w13 blocks {tuple(flat[0].shape)} have {two_i} rows; w13 holds 2*I "
                         f"gate/up rows, an even number")
    H, I = h_half * 2, two_i // 2
    if I % BLOCK:
        raise ValueError(f"w13 blocks {tuple(flat[0].shape)} imply I={I}, but w2 [E, H, I/2] packs I "
                         f"in MXFP4 blocks of {BLOCK}: I must be a multiple of {BLOCK}")
    if tuple(flat[2].shape) != (E, H, I // 2):
        raise ValueError(f"w2 blocks must be [E={E}, H={H}, I/2={I // 2}] to match w13 "
                         f"{tuple(flat[0].shape)} ([E, 2I, H/2]), got {tuple(flat[2].shape)}")
    for name, bias, shape in (("w13_bias", w13_bias, (E, 2 * I)), ("w2_bias", w2_bias, (E, H))):
        if bias is None:
            continue
        if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
            raise TypeError(f"{name} must be a float tensor {shape}, got "
                            f"{getattr(bias, 'dtype', type(bias).__name__)}")
        if tuple(bias.shape) != shape:
            raise ValueError(f"{name} must be [E={E}, {'2I' if name == 'w13_bias' else 'H'}="
                             f"{shape[1]}] to match the blocks, got {tuple(bias.shape)}; it would "
                             f"otherwise be cropped or zero-padded silently")
    hp, ip = dispatch.padded_sizes(kernel, H, I)
    canonical = pad_packed(flat[0], flat[1], w13_bias, flat[2], flat[3], w2_bias,
                           activation=activation, hp=hp, ip=ip)
    return to_kernel_layout(canonical, kernel=kernel, activation=activation, hidden_size=H,
                            intermediate_size=I)
