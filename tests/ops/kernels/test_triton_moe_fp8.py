"""The "triton" kernel's FP8-activation path (W4A8: layout_fp8.py, _fp8.py) on CPU: the decode's
host model against exact e4m3 values, the layout's round trip and shapes, the op's refusals; and
under the Triton interpreter (one child process, as tests/ops/kernels/test_triton_moe.py) the
whole op against the plain-torch emulation of what it computes (moe_torch(...,
activations="fp8")) and the float32 reference, the activation quantizer bit for bit. The
interpreter runs no fp8 dot: the kernel's interpreter path decodes the same bytes to exact float32
and multiplies in float32, which is what an fp8 MMA computes up to its accumulation order.
"""
from __future__ import annotations

import random

import pytest
import torch

from interpreter_child import run_child
from mxfp4_compile.formats import E2M1_VALUES
from mxfp4_compile.ops.kernels import triton_moe as tm
from mxfp4_compile.ops.kernels.triton_moe_details import layout_fp8
from mxfp4_compile.ops.weights import quantize_experts
from test_triton_moe_layout import _exec_ptx


def _e4m3(byte: int) -> float:
    return torch.tensor([byte], dtype=torch.uint8).view(torch.float8_e4m3fn).float().item()


@pytest.mark.parametrize("d", range(layout_fp8.D_MIN - 3, layout_fp8.D_MAX + 1))
def test_decode_word_is_e2m1_times_two_to_the_offset(d):
    """Every code of random words, every offset: the PTX's host model gives e4m3 bytes equal to
    the code's value * 2**d (exact in [D_MIN, D_MAX]), zero below D_MIN (flushed)."""
    rng = random.Random(d)
    for word in [rng.getrandbits(32) for _ in range(300)] + [0, 0xFFFFFFFF]:
        regs = layout_fp8.decode_word(word, d)
        for h in range(2):
            for j in range(4):
                mag, sign = layout_fp8.word_bits(j, h)
                code = ((word >> mag) & 7) | (((word >> sign) & 1) << 3)
                want = E2M1_VALUES[code] * 2.0 ** d if d >= layout_fp8.D_MIN else 0.0
                got = _e4m3((regs[h] >> (8 * j)) & 0xFF)
                assert got == want, (hex(word), d, h, j, code, got, want)


@pytest.mark.parametrize("d", [layout_fp8.D_MIN - 1, layout_fp8.D_MIN, 0, layout_fp8.D_MAX])
def test_decode_ptx_matches_the_host_model(d):
    """Both decode PTX strings on host ints: the Triton kernels' (one word -> both halves, pack
    4: the table's registers $3, $7) and _wgmma_fp8's (one half per element: $4 = 16 s, $5 =
    4 s) give decode_word's registers."""
    rng = random.Random(d)
    lo, hi = layout_fp8.lut(d)
    for word in [rng.getrandbits(32) for _ in range(500)] + [0, 0xFFFFFFFF, 0x88888888]:
        want = layout_fp8.decode_word(word, d)
        both = _exec_ptx(layout_fp8.DEQUANT_ASM, {"$2": word, "$3": lo, "$7": hi})
        assert (both["$0"], both["$1"]) == want, hex(word)
        for s in (0, 1):
            half = _exec_ptx(layout_fp8.DEQUANT_HALF_ASM,
                            {"$1": word, "$2": lo, "$3": hi, "$4": 16 * s, "$5": 4 * s})
            assert half["$0"] == want[s], (hex(word), s)


def _canonical(E=3, H=96, I=64, act="swiglu_oai", bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w13, w2 = torch.randn(E, 2 * I, H, generator=g), torch.randn(E, H, I, generator=g)
    b13, b2 = (torch.randn(E, 2 * I, generator=g), torch.randn(E, H, generator=g)) if bias else (None, None)
    return quantize_experts(w13, w2, b13, b2, activation=act, h_multiple=tm.H_MULTIPLE,
                            i_multiple=tm.I_MULTIPLE)


@pytest.mark.parametrize("act,bias", [("swiglu_oai", True), ("silu_glu", False)])
def test_fp8_layout_round_trip_and_shapes(act, bias):
    can = list(_canonical(act=act, bias=bias))
    can[1] = can[1].clone()
    can[1][0, 2, 1] = 255  # a NaN scale byte stays as it is (no code is zeroed in this layout)
    out = tm.prepare(*can, act, activations="fp8")
    E, Hp, Ip = can[0].shape[0], can[0].shape[2] * 2, can[3].shape[2] * 2
    shapes = tm.prepared_shapes(E, Hp, Ip, act, bias, bias, "fp8")
    bf16 = tm.prepared_shapes(E, Hp, Ip, act, bias, bias)
    for t, s, b in zip(out, shapes, bf16):
        assert (t is None) == (s is None)
        if t is not None:
            assert (tuple(t.shape), t.dtype) == s
    assert shapes[0] != bf16[0] and shapes[3] != bf16[3]  # words: the op tells the layouts apart
    back = tm.unprepare(*out, act, activations="fp8")
    for a, b in zip(back, can):
        assert (a is None and b is None) or torch.equal(a, b)


def test_fp8_words_hold_the_fragment_columns():
    """Word c of a 32-code chunk holds columns 4c+j (half A) and 16+4c+j (half B)."""
    codes = torch.arange(32, dtype=torch.uint8) % 16  # column n holds code n % 16
    packed = (codes[0::2] | (codes[1::2] << 4)).reshape(1, 1, 16)
    words = tm._pack_words_fp8(packed).view(torch.int32).flatten().tolist()
    for c, word in enumerate(words):
        word &= 0xFFFFFFFF
        for h in range(2):
            for j in range(4):
                mag, sign = layout_fp8.word_bits(j, h)
                got = ((word >> mag) & 7) | (((word >> sign) & 1) << 3)
                assert got == (16 * h + 4 * c + j) % 16


def test_op_refuses_the_other_activations_layout():
    mx = torch.ops.mxfp4
    can = _canonical()
    x = torch.randn(2, 96, dtype=torch.bfloat16)
    ids, tw = torch.tensor([[0, 1], [1, 2]], dtype=torch.int32), torch.rand(2, 2)
    p16, p8 = tm.prepare(*can, "swiglu_oai"), tm.prepare(*can, "swiglu_oai", activations="fp8")
    with pytest.raises(ValueError, match="activations='fp8'"):
        mx.moe(x, ids, tw, *p16, "triton", activations="fp8")
    with pytest.raises(ValueError, match="w13"):
        mx.moe(x, ids, tw, *p8, "triton")
    with pytest.raises(ValueError, match="activations"):
        mx.moe(x, ids, tw, *p16, "triton", activations="int8")


@pytest.mark.parametrize("kernel", ["triton_kernels", "flashinfer"])
def test_kernels_without_fp8_say_so(kernel):
    from mxfp4_compile.ops import dispatch

    with pytest.raises(ValueError, match="no FP8-activation path"):
        dispatch.get_kernel(kernel).prepared_shapes(2, 128, 128, "swiglu_oai", False, False, "fp8")


# ---- under the interpreter (one child process) -------------------------------------------------
CASES = {
    "swiglu_bias_T7": dict(T=7),
    "one_token": dict(T=1),
    "silu_nobias_H160_I96_fp32": dict(T=7, H=160, I=96, act="silu_glu", bias=False,
                                      dtype="float32"),
    "expert_map_uncombined": dict(T=7, emap=True, combine=False),
    "split_k": dict(T=3, H=160, I=96, split=(2, 2)),
    "tail_step": dict(T=7, H=160, I=192, bk=128),  # a 128-code step, then a 64-code tail
    "half_blocks": dict(T=40, H=160, half=True),
    "nan_scale_block": dict(T=7, nan_block=True),
}


def _run_case(E=5, H=96, I=64, k=2, T=7, act="swiglu_oai", bias=True, emap=False, combine=True,
              dtype="bfloat16", split=None, bk=None, half=False, nan_block=False, seed=0):
    import dataclasses

    from mxfp4_compile.ops.kernels.triton_moe_details.policy import UNTUNED, override
    from mxfp4_compile.ops.moe_torch import moe_torch

    g = torch.Generator().manual_seed(seed)
    can = list(quantize_experts(torch.randn(E, 2 * I, H, generator=g) * 0.1,
                                torch.randn(E, H, I, generator=g) * 0.1,
                                torch.randn(E, 2 * I, generator=g) * 0.1 if bias else None,
                                torch.randn(E, H, generator=g) * 0.1 if bias else None,
                                activation=act, h_multiple=tm.H_MULTIPLE, i_multiple=tm.I_MULTIPLE))
    if nan_block:  # expert 0, hidden row 3, first 32-block of its intermediate columns
        can[4] = can[4].clone()
        can[4][0, 3, 0] = 255
    prepared = tm.prepare(*can, act, activations="fp8")
    x = torch.randn(T, H, generator=g).to(getattr(torch, dtype))
    e_global = E + 3 if emap else E
    ids = torch.stack([torch.randperm(e_global, generator=g)[:k] for _ in range(T)]).int()
    tw = torch.rand(T, k, generator=g)
    m = None
    if emap:
        m = torch.full((e_global,), -1, dtype=torch.int32)
        m[torch.randperm(e_global, generator=g)[:E]] = torch.arange(E, dtype=torch.int32)
    changes = dict(split=split)
    if bk or half:
        changes["tiles"] = tuple(dataclasses.replace(c, BK=bk or c.BK, HALF=half,
                                                     BM=32 if half else c.BM)
                                 for c in UNTUNED.interpret)
    with override(**changes):
        out = tm.moe(x, ids, tw, *prepared, act, 1.702, 7.0, m, combine, activations="fp8").float()
    # (not intermediate_dtype=bf16, as on the GPU: Triton 3.6's interpreter truncates fp32 to
    # bf16 where the GPU rounds to nearest, so the interpreted kernel's intermediate is neither)
    emu = moe_torch(x, ids, tw, *can, act, 1.702, 7.0, m, combine, activations="fp8").float()
    ref = moe_torch(x, ids, tw, *can, act, 1.702, 7.0, m, combine).float()
    res = {}
    if nan_block:
        nan = torch.isnan(ref)
        res["nan_match"] = bool(nan.any()) and bool(torch.equal(torch.isnan(out), nan))
        out, emu, ref = (t.masked_fill(nan, 0) for t in (out, emu, ref))
    res["finite"] = bool(torch.isfinite(out).all())

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()
    res.update(vs_emulation=rel(out, emu), vs_reference=rel(out, ref), emulation=rel(emu, ref))
    return res


def _quantizer_cases():
    """The row quantizer against moe_torch.quantize_rows_e4m3, bit for bit: normal, subnormal,
    tie and all-zero rows, bf16 and fp32 inputs, a width that is not a power of two."""
    from mxfp4_compile.ops.kernels.triton_moe_details import launches
    from mxfp4_compile.ops.moe_torch import quantize_rows_e4m3

    g = torch.Generator().manual_seed(3)
    x = torch.randn(9, 100, generator=g) * torch.logspace(-3, 3, 9)[:, None]
    x[2] = 0
    x[3, :50] *= 1e-4  # values deep in e4m3's subnormal range after scaling
    x[4] = torch.arange(100) * 0.5 + 0.25  # many halfway cases
    ok = {}
    for dtype in (torch.bfloat16, torch.float32):
        xi = x.to(dtype)
        q = torch.full((9, 128), float("nan")).to(torch.float8_e4m3fn)
        s = torch.full((9,), float("nan"))
        launches.quant_launch(9, 100, 128, 100, True)(xi, q, s, 9)
        want = quantize_rows_e4m3(xi.float())
        ok[str(dtype)] = bool(torch.equal(q[:, :100].float() * s[:, None], want)
                              and torch.equal(q[:, 100:].float(), torch.zeros(9, 28)))
    return ok


@pytest.fixture(scope="module")
def results():
    return run_child(__file__)


@pytest.mark.slow
@pytest.mark.interpreter
@pytest.mark.subprocess
@pytest.mark.parametrize("name", list(CASES))
def test_fp8_matches_its_emulation_under_interpreter(results, name):
    r = results[name]
    assert "error" not in r, r.get("error")
    assert r["finite"]
    # the kernel rounds the intermediate and y to bf16 (the emulation does not): the bf16
    # path's own distance to the float32 reference is ~6e-3 under the interpreter
    assert r["vs_emulation"] < 1.5e-2, r
    assert r["vs_reference"] < 5e-2, r  # the accuracy bound for the op
    assert r["emulation"] > 3e-3, r    # e4m3 activations do change the result: the test can tell
    if "nan_match" in r:
        assert r["nan_match"]


@pytest.mark.slow
@pytest.mark.interpreter
@pytest.mark.subprocess
def test_self_check_passes_and_catches_a_wrong_kernel(results):
    r = results["self_check"]
    assert "error" not in r, r.get("error")
    assert r["rel_l2"] < 3e-2 and r["catches_a_wrong_kernel"]


@pytest.mark.slow
@pytest.mark.interpreter
@pytest.mark.subprocess
def test_row_quantizer_bit_for_bit_under_interpreter(results):
    assert results["quantizer"] == {"torch.bfloat16": True, "torch.float32": True}


if __name__ == "__main__":  # the child: run every case, print one JSON line
    import json
    import traceback

    out = {}
    for name, kw in CASES.items():
        try:
            out[name] = _run_case(**kw)
        except Exception:  # noqa: BLE001 - reported per case
            out[name] = {"error": traceback.format_exc()[-2000:]}
    try:  # the self-check the GPU runs once, here on the interpreter: passes, and catches a
        # decode that is wrong
        from mxfp4_compile.ops.kernels import triton_moe

        ok = triton_moe.fp8_self_check(torch.device("cpu"), tokens=(3,))
        triton_moe._fp8_checked.clear()
        real = triton_moe._moe
        triton_moe._moe = lambda *a: real(*a).flip(0)  # rows swapped: wrong, still finite
        try:
            triton_moe.fp8_self_check(torch.device("cpu"), tokens=(3,))
            caught = False
        except RuntimeError as e:
            caught = "self-check" in str(e)
        finally:
            triton_moe._moe = real
        out["self_check"] = dict(rel_l2=ok, catches_a_wrong_kernel=caught)
    except Exception:  # noqa: BLE001
        out["self_check"] = {"error": traceback.format_exc()[-2000:]}
    try:
        out["quantizer"] = _quantizer_cases()
    except Exception:  # noqa: BLE001
        out["quantizer"] = {"error": traceback.format_exc()[-2000:]}
    print(json.dumps(out))
