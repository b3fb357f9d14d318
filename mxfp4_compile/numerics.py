"""MXFP4 numerics in plain, vectorized torch (OCP Microscaling Formats v1.0).

An MXFP4 tensor stores blocks of BLOCK = 32 consecutive elements along the last dim K:
  - each element as an e2m1 code (4 bits: sign, 2 exponent bits, 1 mantissa bit),
    magnitudes {0, 0.5, 1, 1.5, 2, 3, 4, 6}, two codes per byte (low nibble = even element);
  - one shared e8m0 scale per block: byte b means 2**(b - E8M0_BIAS), E8M0_BIAS = 127;
    E8M0_NAN = 0xFF is NaN.
The constants live in formats.py; this module holds the math.

Shapes: x [..., K] -> packed uint8 [..., K/2], scales uint8 [..., K/32].

Scale rules (``rounding``):
  "floor"     OCP MX v1.0: 2**(floor(log2(amax)) - 2). amax/scale lands in [4, 8), so the
              block's largest values may saturate to ±6.
  "round_up"  the smallest power of two with amax/scale <= 6 (triton_kernels / gpt-oss): never
              clips, at the cost of a coarser grid for some blocks.
Elements round to nearest, ties to even code. A NaN or Inf anywhere in a block poisons exactly
that block (scale E8M0_NAN, which dequantizes to NaN): e2m1 has no Inf, and a finite stand-in would
hide the problem.
"""
from __future__ import annotations

import torch

from .formats import BLOCK, E2M1_MAX, E8M0_BIAS, E8M0_NAN, check_rounding
from .formats import E2M1_VALUES as _E2M1_TABLE

# Value of each 4-bit code, by code (bit 3 is the sign): formats.E2M1_VALUES as a float32 tensor.
E2M1_VALUES = torch.tensor(_E2M1_TABLE)
_F32_EXP_BIAS = 127  # float32's exponent bias (not e8m0's, which happens to be the same number)
# Midpoints between neighbouring magnitudes. A value exactly on one goes to the even code: the
# 1st, 3rd, 5th and 7th midpoints sit above an even code (ties stay down: strict >), the others
# below one (ties go up: >=).
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)

HAS_TORCH_MX_DTYPES = hasattr(torch, "float4_e2m1fn_x2") and hasattr(torch, "float8_e8m0fnu")


def _as_uint8(t: torch.Tensor, what: str) -> torch.Tensor:
    """Accept uint8 or torch's own MX dtypes (viewed back as bytes)."""
    if t.dtype == torch.uint8:
        return t
    if HAS_TORCH_MX_DTYPES and t.dtype in (torch.float4_e2m1fn_x2, torch.float8_e8m0fnu):
        return t.view(torch.uint8)
    raise TypeError(f"{what} must be uint8 (or torch.float4_e2m1fn_x2 / torch.float8_e8m0fnu), "
                    f"got {t.dtype}")


def as_torch_mx_dtypes(packed: torch.Tensor, scales: torch.Tensor):
    """Views of (packed, scales) as torch.float4_e2m1fn_x2 / torch.float8_e8m0fnu (no copy)."""
    if not HAS_TORCH_MX_DTYPES:
        raise RuntimeError("this torch has no float4_e2m1fn_x2 / float8_e8m0fnu dtypes; "
                           "keep the uint8 tensors")
    return packed.view(torch.float4_e2m1fn_x2), scales.view(torch.float8_e8m0fnu)


# The largest magnitude MXFP4 holds: e2m1's 6 times the largest finite e8m0 scale 2**127 (byte 254).
MAX_BLOCK_AMAX = E2M1_MAX * 2.0 ** (254 - E8M0_BIAS)


def check_quantize_shape(shape, what: str = "quantize: x") -> None:
    """ValueError for a 0-dim tensor (no last dim K) or K not a multiple of the block size."""
    if len(shape) == 0:
        raise ValueError(f"{what} is 0-dim (a scalar); quantize needs [..., K] with K a multiple "
                         f"of {BLOCK} along the last dim (e.g. x.reshape(1, -1) after padding)")
    check_block_dim(shape[-1], what)


def check_block_dim(k: int, what: str = "x") -> None:
    if k % BLOCK != 0:
        raise ValueError(f"{what}: the last dim K={k} is not a multiple of the MXFP4 block size "
                         f"{BLOCK}; pad K to {((k + BLOCK - 1) // BLOCK) * BLOCK} with zeros first")


def pow2(n: torch.Tensor) -> torch.Tensor:
    """2.0**n as float32, exactly, for integer n (0 below 2**-149), built from the bits: much
    faster than ldexp, which torch computes through pow."""
    n = n.to(torch.int32)
    normal = ((n.clamp(1 - _F32_EXP_BIAS, _F32_EXP_BIAS) + _F32_EXP_BIAS) << 23).view(torch.float32)
    sub = (torch.ones_like(n) << (n + 149).clamp(0, 22)).view(torch.float32)
    return torch.where(n >= -126, normal, torch.where(n >= -149, sub, torch.zeros_like(normal)))


def block_exponents(amax: torch.Tensor, rounding: str) -> torch.Tensor:
    """Unbiased scale exponent per block (int32) for finite, non-negative block maxima."""
    check_rounding(rounding)
    _, ex = torch.frexp(amax)  # amax = m * 2**ex, m in [0.5, 1)  ->  floor(log2 amax) = ex - 1
    e = ex.to(torch.int32) - 3
    if rounding == "round_up":
        # floor's e puts amax/2**e in [4, 8); one step up when that exceeds 6. ldexp is exact.
        e = e + (amax > E2M1_MAX * pow2(e).to(amax.dtype)).to(torch.int32)
    e = torch.where(amax == 0, torch.full_like(e, -E8M0_BIAS), e)
    return e.clamp(-E8M0_BIAS, E8M0_BIAS)


def quantize(x: torch.Tensor, rounding: str = "floor"):
    """x [..., K] float -> (packed uint8 [..., K/2], scales uint8 [..., K/32])."""
    if not x.is_floating_point():
        raise TypeError(f"quantize: x must be a floating tensor, got {x.dtype}")
    check_quantize_shape(x.shape)
    check_rounding(rounding)
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    blocks = x.to(work).reshape(*x.shape[:-1], x.shape[-1] // BLOCK, BLOCK)
    finite = torch.isfinite(blocks).all(dim=-1)  # [..., K/32]
    amax = torch.where(torch.isfinite(blocks), blocks.abs(), 0).amax(dim=-1)
    if rounding == "round_up" and work == torch.float64:
        # float32 tops out below 6 * 2**127; float64 does not: "round_up never clips" cannot hold
        too_big = finite & (amax > MAX_BLOCK_AMAX)
        if bool(too_big.any()):
            raise ValueError(f"quantize: rounding='round_up' never clips, but {int(too_big.sum())} "
                             f"block(s) have a max magnitude above {MAX_BLOCK_AMAX:.6g} (6 * 2**127, "
                             f"the largest e8m0 scale times e2m1's largest value), largest "
                             f"{float(amax[too_big].max()):.6g}; scale the tensor down first, or use "
                             f"rounding='floor' (saturates to +-{MAX_BLOCK_AMAX:.6g})")
    e = block_exponents(amax, rounding)
    scaled = blocks * pow2(-e).to(work).unsqueeze(-1)  # exact: a power of two
    mag = torch.nan_to_num(scaled.abs(), nan=0.0, posinf=0.0)
    code = torch.zeros(mag.shape, dtype=torch.uint8, device=x.device)
    for i, m in enumerate(_MIDPOINTS):  # 7 compares, not a loop over blocks
        code += (mag > m) if i % 2 == 0 else (mag >= m)
    code |= torch.signbit(scaled).to(torch.uint8) << 3
    code = code.reshape(*x.shape[:-1], x.shape[-1])
    packed = code[..., 0::2] | (code[..., 1::2] << 4)
    scales = torch.where(finite, (e + E8M0_BIAS).to(torch.uint8),
                         torch.full_like(e, E8M0_NAN, dtype=torch.uint8))
    return packed.contiguous(), scales.to(torch.uint8).contiguous()


def decode_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes (0..15) -> float32 values, by building float32 bits (no table gather)."""
    c = codes.to(torch.int32)
    mag = c & 7
    # e2m1 exponent bits e = mag >> 1 (bias 1) and mantissa m = mag & 1 map onto float32's fields;
    # e = 0 is subnormal (0 or 0.5), whose float32 bits are those of 0.5 * m.
    bits = (((mag >> 1) + 126) << 23) | ((mag & 1) << 22)
    bits = torch.where(mag < 2, (mag & 1) * 0x3F000000, bits)
    return (bits | ((c & 8) << 28)).view(torch.float32)


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """packed uint8 [..., K/2] -> codes uint8 [..., K] (even element from the low nibble)."""
    packed = _as_uint8(packed, "packed")
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(*packed.shape[:-1],
                                                                     packed.shape[-1] * 2)


def scale_values(scales: torch.Tensor) -> torch.Tensor:
    """e8m0 bytes -> float32 powers of two (NaN for E8M0_NAN)."""
    s = _as_uint8(scales, "scales").to(torch.int32)
    val = pow2(s - E8M0_BIAS)
    return torch.where(s == E8M0_NAN, torch.full_like(val, float("nan")), val)


def check_dequantize_shapes(packed_shape, scales_shape, what: str = "dequantize") -> None:
    """ValueError unless packed [..., K/2] and scales [..., K/32] describe one tensor."""
    packed_shape, scales_shape = tuple(packed_shape), tuple(scales_shape)
    if len(packed_shape) == 0 or len(scales_shape) == 0:
        raise ValueError(f"{what}: packed {packed_shape} and scales {scales_shape} must have a last "
                         f"dim (packed [..., K/2], scales [..., K/32])")
    half = packed_shape[-1]
    if half % (BLOCK // 2):
        raise ValueError(f"{what}: packed {packed_shape} has a last dim of {half} bytes = K/2, not a "
                         f"multiple of {BLOCK // 2}: K={2 * half} is not a whole number of MXFP4 "
                         f"blocks of {BLOCK}")
    want = packed_shape[:-1] + (half // (BLOCK // 2),)
    if scales_shape != want:
        raise ValueError(f"{what}: packed {packed_shape} holds K={2 * half} elements per row, which "
                         f"needs scales of shape {want} (one per {BLOCK} elements); got {scales_shape}")


def dequantize(packed: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32):
    """(packed [..., K/2], scales [..., K/32]) -> [..., K] in ``dtype``.

    Exact: each element is code * 2**(byte - 127) rounded once to ``dtype`` (the products have 2
    significant bits, so every one inside the dtype's range is exact, subnormals included). The
    largest finite scales (bytes 253, 254) give values up to 6 * 2**127: those above the dtype's
    largest finite value are +-inf (float32/bf16: 253 with |code| >= 4, 254 with |code| >= 2;
    float16 from much smaller bytes), all others are finite; float64 holds every value. NaN only
    for E8M0_NAN (255): 0 * 2**127 is 0, never NaN."""
    packed = _as_uint8(packed, "packed")
    scales = _as_uint8(scales, "scales")
    check_dequantize_shapes(packed.shape, scales.shape)
    k = packed.shape[-1] * 2
    vals = decode_e2m1(unpack_codes(packed)).reshape(*packed.shape[:-1], k // BLOCK, BLOCK)
    work = torch.float64 if dtype == torch.float64 else torch.float32  # 6 * 2**127 needs fp64
    out = vals.to(work) * scale_values(scales).to(work).unsqueeze(-1)
    return out.reshape(*packed.shape[:-1], k).to(dtype)
