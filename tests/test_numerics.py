"""MXFP4 quantize / dequantize against an independent oracle.

Oracle: ml_dtypes ``float4_e2m1fn`` rounds the elements (nearest, ties to even, saturating at ±6);
the e8m0 scale of each block is computed here in float64 numpy from its rule:
  floor     2**(floor(log2 amax) - 2)              (OCP MX v1.0)
  round_up  2**ceil(log2(amax / 6))               (smallest power of two with amax/scale <= 6)
both clamped to the e8m0 range [2**-127, 2**127]; an all-zero block gets byte 0; a block holding a
NaN or an Inf gets byte 0xFF.
"""
import math
import typing

import ml_dtypes
import numpy as np
import pytest
import torch

import mxfp4_compile  # noqa: F401  (registers torch.ops.mxfp4.*)
from mxfp4_compile import formats, numerics

F4 = ml_dtypes.float4_e2m1fn
ROUNDINGS = ("floor", "round_up")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------ oracle


def oracle_scale_exponents(x64: np.ndarray, rounding: str):
    """x64 [..., K] float64 -> (unbiased exponent int [..., K/32], finite-block mask)."""
    blocks = x64.reshape(*x64.shape[:-1], -1, 32)
    finite = np.isfinite(blocks).all(axis=-1)
    amax = np.where(np.isfinite(blocks), np.abs(blocks), 0.0).max(axis=-1)
    safe = np.where(amax > 0, amax, 1.0)
    if rounding == "floor":
        m, ex = np.frexp(safe)  # safe = m * 2**ex, m in [0.5, 1): floor(log2) = ex - 1
        e = (ex - 1) - 2
    else:
        m, ex = np.frexp(safe / 6.0)  # ceil(log2(q)): ex - 1 when q is a power of two, else ex
        e = np.where(m == 0.5, ex - 1, ex)
    e = np.where(amax > 0, e, -127)
    return np.clip(e, -127, 127), finite


def oracle_quantize(x: torch.Tensor, rounding: str):
    """-> (codes uint8 [..., K], scales uint8 [..., K/32], finite-block mask)."""
    x64 = x.double().numpy()
    e, finite = oracle_scale_exponents(x64, rounding)
    blocks = x64.reshape(*x64.shape[:-1], -1, 32)
    scaled = np.ldexp(np.nan_to_num(blocks, nan=0.0, posinf=0.0, neginf=0.0), -e[..., None])
    with np.errstate(over="ignore"):
        codes = scaled.astype(F4).view(np.uint8).reshape(x64.shape)
    scales = np.where(finite, e + 127, 255).astype(np.uint8)
    return torch.from_numpy(codes), torch.from_numpy(scales), torch.from_numpy(finite)


def oracle_dequantize(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype):
    """codes uint8 [..., K] (one per byte), scales uint8 [..., K/32] -> [..., K] dtype."""
    vals = codes.numpy().view(F4).astype(np.float64)
    vals = vals.reshape(*vals.shape[:-1], -1, 32)
    s = scales.numpy().astype(np.int64)
    scale = np.where(s == 255, np.nan, np.ldexp(1.0, s - 127))
    out = (vals * scale[..., None]).reshape(codes.shape)
    return torch.from_numpy(out).to(dtype)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """Packing oracle: element 2j is the low nibble of byte j, element 2j+1 the high nibble."""
    out = torch.empty(*packed.shape[:-1], packed.shape[-1] * 2, dtype=torch.uint8)
    out[..., 0::2] = packed % 16
    out[..., 1::2] = packed // 16
    return out


def pack(codes: torch.Tensor) -> torch.Tensor:
    return (codes[..., 0::2] + codes[..., 1::2] * 16).to(torch.uint8)


def _assert_bits_equal(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


# --------------------------------------------------------------------------------------- inputs


def normal_blocks(shape, dtype, seed):
    g = _gen(seed)
    per_block = torch.exp2(torch.randint(-8, 9, (*shape[:-1], shape[-1] // 32, 1), generator=g).float())
    x = torch.randn(*shape[:-1], shape[-1] // 32, 32, generator=g) * per_block
    return x.reshape(shape).to(dtype)


def wide_range(shape, dtype, seed):
    """Every element its own exponent: blocks whose amax dwarfs most of their elements."""
    lo, hi = {torch.float16: (-20, 15), torch.bfloat16: (-120, 120),
              torch.float32: (-120, 120), torch.float64: (-300, 300)}[dtype]
    g = _gen(seed)
    mant = torch.randn(shape, generator=g, dtype=torch.float64)
    ex = torch.randint(lo, hi, shape, generator=g).double()
    return (mant * torch.exp2(ex)).to(dtype)


def tiny(shape, dtype, seed):
    """Subnormal and near-underflow values of the input dtype, and all-zero blocks."""
    fi = torch.finfo(dtype)
    g = _gen(seed)
    x = torch.randint(-40, 41, shape, generator=g).double() * fi.smallest_normal / 16
    x = x.to(dtype)
    x.view(-1, 32)[::3] = 0  # every third block all zero (byte 0)
    return x


def huge(shape, dtype, seed):
    """Blocks at the top of the dtype's range (and float64 beyond e8m0's: saturation to ±6)."""
    g = _gen(seed)
    top = torch.finfo(dtype).max if dtype != torch.float64 else 1e300
    return (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1).mul(top).to(dtype)


def ties(shape, dtype, seed):
    """Elements exactly on e2m1 midpoints (and past ±6) once scaled: each block's amax fixes e."""
    g = _gen(seed)
    nblk = int(np.prod(shape)) // 32
    grid = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.5, 1.0, 3.0, 6.0, 0.0])
    vals = grid[torch.randint(0, len(grid), (nblk, 32), generator=g)]
    vals *= torch.where(torch.rand(nblk, 32, generator=g) < 0.5, -1.0, 1.0)
    # amax element: 4 (both rules: e = exponent below), 6 (both), 7.5 (floor saturates 7.5 -> 6;
    # round_up moves one exponent up)
    top = torch.tensor([4.0, 6.0, 7.5])[torch.randint(0, 3, (nblk,), generator=g)]
    vals[:, 0] = top
    ex = torch.randint(-10, 10, (nblk, 1), generator=g).float()
    return (vals * torch.exp2(ex)).reshape(shape).to(dtype)


KINDS = {"normal": normal_blocks, "wide": wide_range, "tiny": tiny, "huge": huge, "ties": ties}


def poison(x, seed):
    """NaN / +Inf / -Inf in a few blocks; -> the mask of poisoned blocks."""
    g = _gen(seed)
    flat = x.view(-1, 32)
    which = torch.randperm(flat.shape[0], generator=g)[: max(1, flat.shape[0] // 4)]
    for i, b in enumerate(which.tolist()):
        flat[b, torch.randint(0, 32, (1,), generator=g)] = (float("nan"), float("inf"), float("-inf"))[i % 3]
    mask = torch.zeros(flat.shape[0], dtype=torch.bool)
    mask[which] = True
    return mask.reshape(*x.shape[:-1], -1)


# ------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("kind", list(KINDS))
def test_quantize_bit_exact(kind, dtype, rounding):
    x = KINDS[kind]((6, 4, 128), dtype, seed=hash((kind, str(dtype))) % 1000)
    if rounding == "round_up" and x.abs().max().item() > numerics.MAX_BLOCK_AMAX:
        # float64 beyond e8m0's range: round_up cannot keep "never clips", so it says so
        with pytest.raises(ValueError, match="never clips"):
            torch.ops.mxfp4.quantize(x, rounding)
        x = x.clamp(-numerics.MAX_BLOCK_AMAX, numerics.MAX_BLOCK_AMAX)
    packed, scales = torch.ops.mxfp4.quantize(x, rounding)
    assert packed.dtype == torch.uint8 and packed.shape == (6, 4, 64)
    assert scales.dtype == torch.uint8 and scales.shape == (6, 4, 4)
    codes, want_scales, _ = oracle_quantize(x, rounding)
    assert torch.equal(scales, want_scales)
    assert torch.equal(unpack(packed), codes)
    # dequantize: the oracle's values for these codes and scales, in every float dtype
    for out_dtype in FLOAT_DTYPES:
        _assert_bits_equal(torch.ops.mxfp4.dequantize(packed, scales, out_dtype),
                           oracle_dequantize(codes, want_scales, out_dtype))


def test_ties_and_saturation_cover_what_they_claim():
    """Guards the tie generator: the rules disagree on blocks with amax 7.5 * 2**e, and midpoints
    round to the even code (0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4)."""
    x = torch.tensor([7.5, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0] + [0.0] * 24)
    p, s = torch.ops.mxfp4.quantize(x, "floor")
    assert s.item() == 127
    assert numerics.dequantize(p, s).tolist()[:8] == [6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    p, s = torch.ops.mxfp4.quantize(x, "round_up")
    assert s.item() == 128  # 7.5 > 6: one exponent up, no clipping
    assert numerics.dequantize(p, s).tolist()[0] == 8.0


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_nan_inf_poison_exactly_their_block(dtype, rounding):
    x = normal_blocks((5, 256), dtype, seed=7)
    clean = x.clone()
    bad = poison(x, seed=8)
    packed, scales = torch.ops.mxfp4.quantize(x, rounding)
    assert torch.equal(scales == 0xFF, bad)
    deq = torch.ops.mxfp4.dequantize(packed, scales, torch.float32).view(5, 8, 32)
    assert deq[bad].isnan().all()
    # other blocks: exactly what a clean input gives
    p0, s0 = torch.ops.mxfp4.quantize(clean, rounding)
    assert torch.equal(scales[~bad], s0[~bad])
    assert torch.equal(unpack(packed).view(5, 8, 32)[~bad], unpack(p0).view(5, 8, 32)[~bad])
    assert not deq[~bad].isnan().any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_random_codes_and_all_scale_bytes(dtype):
    g = _gen(11)
    packed = torch.randint(0, 256, (255, 16), generator=g, dtype=torch.uint8)
    scales = torch.arange(256, dtype=torch.uint8)[1:].view(255, 1)  # every byte 1..255
    scales = torch.cat((torch.zeros(1, 1, dtype=torch.uint8), scales[:-1]))  # 0..254
    scales[-1] = 255
    _assert_bits_equal(torch.ops.mxfp4.dequantize(packed, scales, dtype),
                       oracle_dequantize(unpack(packed), scales, dtype))


def test_packing_low_nibble_is_even_element():
    x = torch.zeros(32)
    x[0], x[1], x[2], x[3] = 1.0, -6.0, 0.5, 4.0  # codes 2, 15, 1, 6 at scale 2**0
    packed, scales = torch.ops.mxfp4.quantize(x, "floor")
    assert scales.item() == 127
    assert packed[:2].tolist() == [2 | (15 << 4), 1 | (6 << 4)]
    assert packed[2:].tolist() == [0] * 14
    assert numerics.unpack_codes(packed)[:4].tolist() == [2, 15, 1, 6]
    assert torch.equal(numerics.E2M1_VALUES, torch.from_numpy(np.arange(16, dtype=np.uint8).view(F4)
                                                              .astype(np.float32)))


@pytest.mark.skipif(not numerics.HAS_TORCH_MX_DTYPES, reason="torch without MX dtypes")
def test_torch_mx_dtype_views():
    x = normal_blocks((3, 64), torch.float32, seed=4)
    packed, scales = torch.ops.mxfp4.quantize(x)
    p4, s8 = numerics.as_torch_mx_dtypes(packed, scales)
    assert p4.dtype == torch.float4_e2m1fn_x2 and s8.dtype == torch.float8_e8m0fnu
    assert p4.data_ptr() == packed.data_ptr() and s8.data_ptr() == scales.data_ptr()  # views
    # torch's own e8m0 decoding agrees with ours
    assert torch.equal(s8.float(), numerics.scale_values(scales))
    # numerics accepts torch's dtypes directly
    _assert_bits_equal(numerics.dequantize(p4, s8, torch.float32), numerics.dequantize(packed, scales))
    # the op takes uint8 only and says how to get there
    with pytest.raises(TypeError, match="uint8"):
        torch.ops.mxfp4.dequantize(p4, s8, torch.float32)


def _finite_bytes(dtype, max_mag):
    """Scale bytes b for which every value v * 2**(b-127), |v| <= max_mag, is exact in dtype."""
    fi = torch.finfo(dtype)
    b = np.arange(255)
    s = b - 127.0
    ok = max_mag * np.exp2(s) <= fi.max
    if dtype == torch.float16:  # subnormals stop at 2**-24: 0.5 * 2**s must be a multiple of it
        ok &= s - 2 >= -24
    return torch.from_numpy(b[ok]).to(torch.uint8)


def _random_mx(n_blocks, seed, bytes_ok):
    g = _gen(seed)
    packed = torch.randint(0, 256, (n_blocks, 16), generator=g, dtype=torch.uint8)
    packed[1::2] &= 0xBB  # odd blocks: magnitudes <= 1.5 only (requantized on a finer scale)
    scales = bytes_ok[torch.randint(0, len(bytes_ok), (n_blocks, 1), generator=g)]
    return packed, scales


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_dequantize_requantize_lossless(dtype, rounding):
    bytes_ok = _finite_bytes(dtype, 6.0)
    packed, scales = _random_mx(4096, seed=21, bytes_ok=bytes_ok)
    w = torch.ops.mxfp4.dequantize(packed, scales, dtype)
    assert torch.isfinite(w).all()
    p2, s2 = torch.ops.mxfp4.quantize(w, rounding)
    assert torch.equal(torch.ops.mxfp4.dequantize(p2, s2, dtype), w)  # value-lossless
    # bytes too, where the block's largest magnitude is 4 or 6 (else a finer scale fits the block)
    top = (unpack(packed) & 7).amax(dim=-1) >= 6
    assert top.any() and (~top).any()
    assert torch.equal(s2[top], scales[top])
    assert torch.equal(p2[top], packed[top])


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_requantize_overflow_boundary(dtype, rounding):
    """Bytes >= 253: the largest codes overflow bf16 / fp32 to Inf, and requantizing such a block
    poisons it (0xFF), never a silent finite value; smaller codes at those bytes stay lossless."""
    codes = torch.zeros(4, 32, dtype=torch.uint8)
    codes[:, 1] = 9  # -0.5
    codes[0, 0], codes[1, 0], codes[2, 0], codes[3, 0] = 7, 5, 6, 3  # 6, 3, 4, 1.5
    scales = torch.tensor([[252], [253], [253], [254]], dtype=torch.uint8)
    w = torch.ops.mxfp4.dequantize(pack(codes), scales, dtype)
    finite = torch.isfinite(w).all(dim=-1).tolist()
    assert finite == [True, True, False, True]  # 6*2**125 ok, 3*2**126 ok, 4*2**126 = 2**128 not
    p2, s2 = torch.ops.mxfp4.quantize(w, rounding)
    assert s2[2].item() == 0xFF
    back = torch.ops.mxfp4.dequantize(p2, s2, dtype)
    assert back[2].isnan().all()
    keep = torch.tensor([0, 1, 3])
    assert torch.equal(back[keep], w[keep])
    # the same bytes are lossless in float64
    w64 = torch.ops.mxfp4.dequantize(pack(codes), scales, torch.float64)
    assert torch.isfinite(w64).all()
    p3, s3 = torch.ops.mxfp4.quantize(w64, rounding)
    assert torch.equal(torch.ops.mxfp4.dequantize(p3, s3, torch.float64), w64)


@pytest.mark.parametrize("k", [1, 16, 33, 100])
def test_k_not_multiple_of_32(k):
    with pytest.raises(ValueError, match=r"multiple of the MXFP4 block size 32.*pad K to"):
        torch.ops.mxfp4.quantize(torch.randn(2, k))
    with pytest.raises(ValueError, match="K="):
        numerics.quantize(torch.randn(k))


def test_bad_inputs():
    with pytest.raises(TypeError, match="x must be a floating"):
        torch.ops.mxfp4.quantize(torch.ones(32, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"rounding='nearest' is not .*'floor' or 'round_up'"):
        torch.ops.mxfp4.quantize(torch.randn(32), "nearest")
    with pytest.raises(ValueError, match=r"rounding='nearest' is not .*'floor' or 'round_up'"):
        numerics.quantize(torch.randn(32), "nearest")
    with pytest.raises(TypeError, match="uint8"):
        torch.ops.mxfp4.dequantize(torch.zeros(16, dtype=torch.int8), torch.zeros(1, dtype=torch.uint8),
                                   torch.float32)
    with pytest.raises(ValueError, match="scales"):
        torch.ops.mxfp4.dequantize(torch.zeros(2, 16, dtype=torch.uint8), torch.zeros(2, 2, dtype=torch.uint8),
                                   torch.float32)
    with pytest.raises(TypeError, match="dtype"):
        torch.ops.mxfp4.dequantize(torch.zeros(16, dtype=torch.uint8), torch.zeros(1, dtype=torch.uint8),
                                   torch.int32)


def test_format_constants_match_an_independent_decoder():
    """formats.py's tables against ml_dtypes' own e2m1 and e8m0 types."""
    table = np.arange(16, dtype=np.uint8).view(F4).astype(np.float64)
    assert list(formats.E2M1_VALUES) == table.tolist()
    assert np.signbit(table).tolist() == [math.copysign(1, v) < 0 for v in formats.E2M1_VALUES]
    assert formats.E2M1_MAX == table.max()
    e8m0 = np.array([formats.E8M0_BIAS, formats.E8M0_NAN, formats.E8M0_BIAS + 3], dtype=np.uint8)
    one, nan, eight = e8m0.view(ml_dtypes.float8_e8m0fnu).astype(np.float64)
    assert one == 1.0 and np.isnan(nan) and eight == 8.0
    assert numerics.scale_values(torch.from_numpy(e8m0)).tolist()[::2] == [1.0, 8.0]
    assert formats.BLOCK == 32  # OCP MX v1.0
    assert formats.ROUNDINGS == typing.get_args(formats.Rounding)
    assert tuple(formats.ACTIVATIONS) == typing.get_args(formats.Activation)
    assert set(formats.ACTIVATIONS.values()) == set(typing.get_args(formats.GateUp))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_dequantize_largest_scales_exact_or_inf(dtype):
    """Scale bytes 253 and 254 (2**126, 2**127): each value code * scale comes out exactly where
    it fits ``dtype`` and as +-inf only where the true value exceeds the dtype's largest finite
    value; never NaN (0 * 2**127 is 0). float32/bf16: 253 overflows from |code| 4, 254 from 2."""
    codes = torch.arange(16, dtype=torch.uint8)
    packed = (codes[0::2] | (codes[1::2] << 4)).repeat(2).view(1, 16)  # codes 0..15 twice
    for byte in (252, 253, 254):
        out = numerics.dequantize(packed, torch.full((1, 1), byte, dtype=torch.uint8), dtype)[0, :16]
        assert not out.isnan().any()
        for c in range(16):
            exact = formats.E2M1_VALUES[c] * 2.0 ** (byte - 127)  # a Python float: float64
            got = out[c].item()
            if abs(exact) > torch.finfo(dtype).max:
                assert got == math.copysign(math.inf, exact), (byte, c, got)
            else:
                assert got == exact, (byte, c, got, exact)
    if dtype in (torch.float32, torch.bfloat16):
        big = numerics.dequantize(packed, torch.full((1, 1), 253, dtype=torch.uint8), dtype)[0, :8]
        assert big.isinf().tolist() == [False] * 6 + [True] * 2  # |code| 4 and 6
        big = numerics.dequantize(packed, torch.full((1, 1), 254, dtype=torch.uint8), dtype)[0, :8]
        assert big.isinf().tolist() == [False] * 4 + [True] * 4  # |code| 2, 3, 4, 6


def test_round_up_float64_beyond_e8m0_raises():
    """round_up promises never to clip; float64 can exceed 6 * 2**127: a ValueError naming the
    largest block max, not a silent saturation. floor saturates as documented."""
    assert numerics.MAX_BLOCK_AMAX == 6 * 2.0 ** 127
    x = torch.zeros(2, 64, dtype=torch.float64)
    x[1, 40] = 2e39
    with pytest.raises(ValueError, match=r"above 1.02085e\+39 \(6 \* 2\*\*127.*largest 2e\+39"):
        numerics.quantize(x, "round_up")
    with pytest.raises(ValueError, match="never clips"):
        torch.ops.mxfp4.quantize(x, "round_up")
    p, s = numerics.quantize(x, "floor")  # saturates to 6 * 2**127
    assert numerics.dequantize(p, s, torch.float64)[1, 40].item() == numerics.MAX_BLOCK_AMAX
    x[1, 40] = numerics.MAX_BLOCK_AMAX  # exactly the largest: fine
    p, s = numerics.quantize(x, "round_up")
    assert numerics.dequantize(p, s, torch.float64)[1, 40].item() == numerics.MAX_BLOCK_AMAX
    x[1, 40] = math.inf  # not finite: poisons its block, as documented, no error
    assert numerics.quantize(x, "round_up")[1][1, 1].item() == formats.E8M0_NAN


def test_quantize_0dim_and_dequantize_shape_messages():
    for q in (numerics.quantize, torch.ops.mxfp4.quantize):
        with pytest.raises(ValueError, match=r"0-dim \(a scalar\).*\[\.\.\., K\]"):
            q(torch.tensor(1.0))
    # the last packed dim is not a whole number of blocks: said so, not "needs (1,), got (1,)"
    with pytest.raises(ValueError, match=r"last dim of 20 bytes = K/2, not a multiple of 16"):
        torch.ops.mxfp4.dequantize(torch.zeros(20, dtype=torch.uint8), torch.zeros(1, dtype=torch.uint8),
                                   torch.float32)
    with pytest.raises(ValueError, match=r"last dim of 20 bytes"):
        numerics.dequantize(torch.zeros(20, dtype=torch.uint8), torch.zeros(1, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"K=64 elements per row, which needs scales of shape \(2, 2\).*got \(2, 1\)"):
        torch.ops.mxfp4.dequantize(torch.zeros(2, 32, dtype=torch.uint8), torch.zeros(2, 1, dtype=torch.uint8),
                                   torch.float32)
    with pytest.raises(ValueError, match="must have a last dim"):
        numerics.dequantize(torch.zeros((), dtype=torch.uint8), torch.zeros(1, dtype=torch.uint8))

