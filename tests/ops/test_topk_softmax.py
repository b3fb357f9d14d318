"""torch.ops.mxfp4.topk_softmax (ops/topk_softmax.py): the Triton kernel under the interpreter and
the CPU path, both against a per-row Python oracle in float64 (ties: lower index first), in all
three router modes; the fake kernel under torch.compile with dynamic shapes; the errors.

The kernel cases run in ONE child process with TRITON_INTERPRET=1 (it must be set before triton
is imported), as tests/ops/kernels/test_triton_moe.py does."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

import mxfp4_compile  # noqa: F401  (registers torch.ops.mxfp4.*)
from interpreter_child import run_child
from mxfp4_compile import routing
from mxfp4_compile.ops import topk_softmax as ts

MODES = {"gpt_oss": (False, True), "softmax_renorm": (True, True), "softmax_only": (True, False)}
# (T, E, k, dtype): T not a multiple of the rows per program, E not a power of two
CASES = [(1, 32, 4, "float32"), (13, 128, 4, "bfloat16"), (70, 8, 2, "float16"),
         (5, 300, 6, "float32"), (3, 1, 1, "float32"), (9, 8, 8, "bfloat16")]


def _logits(T, E, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, E, generator=g) * 3).to(getattr(torch, dtype))


def oracle(logits, k, softmax_first, renormalize):
    """Per row, in float64: the k largest (NaN largest; ties lower index first), then weights."""
    ids, ws = [], []
    for row in logits.double().tolist():
        key = [(math.inf if v != v else v) for v in row]
        top = sorted(range(len(row)), key=lambda i: (-key[i], i))[:k]
        m = row[top[0]]
        ex = [math.exp(row[i] - m) for i in top]
        den = sum(math.exp(v - m) for v in row) if softmax_first and not renormalize else sum(ex)
        ids.append(top)
        ws.append([e / den for e in ex])
    return torch.tensor(ws, dtype=torch.float64).reshape(-1, k), torch.tensor(ids).reshape(-1, k)


def _check(w, ids, x, k, sf, rn):
    want_w, want_ids = oracle(x, k, sf, rn)
    assert ids.dtype == torch.int64 and w.dtype == torch.float32 and ids.shape == w.shape
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(w.double(), want_w, rtol=2e-6, atol=1e-7)


# ----------------------------------------------------------------- the kernel (interpreter) ----
def _child():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    out = {}
    for T, E, k, dtype in CASES:
        x = _logits(T, E, dtype, seed=T * E)
        for mode, (sf, rn) in MODES.items():
            name = f"T{T}_E{E}_k{k}_{dtype}_{mode}"
            try:
                w, ids = ts.topk_softmax(x, k, sf, rn)
                _check(w, ids, x, k, sf, rn)
                out[name] = "ok"
            except Exception as e:  # reported per case by the parent
                out[name] = repr(e)[:2000]
    # ties (lower index first), a NaN (taken first; its row's weights NaN), a row of -inf
    x = torch.tensor([[1.0, 3.0, 3.0, 0.5, 3.0], [0.0, float("nan"), 2.0, 1.0, 0.0],
                      [-math.inf] * 5])
    w, ids = ts.topk_softmax(x, 3, False, True)
    out["special_ids"] = ids.tolist()
    out["special_nan"] = torch.isnan(w).tolist()
    out["special_w0"] = w[0].tolist()
    # out_dtype: the float32 weights rounded once, in the store. The interpreter's float32 ->
    # bfloat16 conversion truncates (the compiled kernel's is cvt.rn, round to nearest even: see
    # test_kernel_compiles_for_the_gpu and the CUDA test, which is bit for bit): bf16 here is
    # compared within one ulp, fp16 bit for bit
    for dt in ("bfloat16", "float16"):
        x = _logits(13, 128, "bfloat16", seed=7)
        w32, ids32 = ts.topk_softmax(x, 4, False, True)
        w, ids = ts.topk_softmax(x, 4, False, True, out_dtype=getattr(torch, dt))
        ulp = torch.finfo(w.dtype).eps * w32.abs()  # >= one ulp of each weight
        out[f"out_{dt}"] = [str(w.dtype), torch.equal(ids, ids32),
                            torch.equal(w, w32.to(w.dtype)) if dt == "float16"
                            else bool(((w.float() - w32).abs() <= ulp).all())]
    try:
        ts.topk_softmax(torch.zeros(1, ts.MAX_EXPERTS + 1), 2)
        out["too_many"] = "no error"
    except ValueError as e:
        out["too_many"] = str(e)
    print(json.dumps(out))


@pytest.fixture(scope="module")
def interpreted():
    pytest.importorskip("triton")
    return run_child(__file__)


@pytest.mark.slow
@pytest.mark.interpreter
@pytest.mark.subprocess
@pytest.mark.parametrize("case", [f"T{T}_E{E}_k{k}_{d}_{m}" for T, E, k, d in CASES for m in MODES])
def test_kernel_matches_the_oracle(interpreted, case):
    assert interpreted[case] == "ok", interpreted[case]


@pytest.mark.slow
@pytest.mark.interpreter
@pytest.mark.subprocess
def test_kernel_ties_nan_and_minus_inf(interpreted):
    assert interpreted["special_ids"] == [[1, 2, 4], [1, 2, 3], [0, 1, 2]]
    assert interpreted["special_w0"] == pytest.approx([1 / 3] * 3, rel=1e-6)
    assert interpreted["special_nan"] == [[False] * 3, [True] * 3, [True] * 3]
    assert "E=4097" in interpreted["too_many"] and "torch.topk" in interpreted["too_many"]


@pytest.mark.slow
@pytest.mark.interpreter
@pytest.mark.subprocess
@pytest.mark.parametrize("dt", ["bfloat16", "float16"])
def test_kernel_stores_out_dtype_rounded_once(interpreted, dt):
    assert interpreted[f"out_{dt}"] == [f"torch.{dt}", True, True]


def test_cpu_out_dtype_is_the_rounded_float32_weights():
    x = _logits(9, 32, "bfloat16", seed=3)
    for sf, rn in MODES.values():
        w32, ids32 = torch.ops.mxfp4.topk_softmax(x, 4, sf, rn)
        w, ids = torch.ops.mxfp4.topk_softmax(x, 4, sf, rn, out_dtype=torch.bfloat16)
        assert w.dtype == torch.bfloat16 and torch.equal(ids, ids32)
        assert torch.equal(w, w32.to(torch.bfloat16))


# ----------------------------------------------------------------- the op on CPU ---------------
def test_cpu_ties_pick_the_lower_index_like_the_kernel():
    """The CPU path breaks ties exactly as the fused kernel documents (lower index first; NaN
    above everything): the kernel's own answers under the interpreter are the same lists
    (test_kernel_ties_nan_and_minus_inf). torch.topk on CPU returns [3, 1, 4] for the first row."""
    x = torch.tensor([[1.0, 3.0, 3.0, 0.5, 3.0], [0.0, float("nan"), 2.0, 1.0, 0.0],
                      [-math.inf] * 5])
    w, ids = ts.topk_softmax_torch(x, 3, False, True)
    assert ids.tolist() == [[1, 2, 4], [1, 2, 3], [0, 1, 2]]
    assert w[0].tolist() == pytest.approx([1 / 3] * 3, rel=1e-6)
    for renormalize in (False, True):  # softmax first: equal logits give equal probabilities
        w, ids = ts.topk_softmax_torch(x[0::2], 3, True, renormalize)
        assert ids.tolist() == [[1, 2, 4], [0, 1, 2]]
    w, ids = torch.ops.mxfp4.topk_softmax(torch.tensor([[0.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0]] * 2), 4)
    assert ids.tolist() == [[1, 2, 3, 4]] * 2
    # many rows of many ties (where CPU torch.topk's order is its own): always the lowest indices
    x = torch.randint(0, 3, (64, 40), generator=torch.Generator().manual_seed(0)).float()
    w, ids = ts.topk_softmax_torch(x, 8, False, True)
    for row, got in zip(x, ids):
        want = sorted(range(40), key=lambda i: (-row[i].item(), i))[:8]
        assert got.tolist() == want


@pytest.mark.parametrize("mode", list(MODES))
def test_cpu_op_matches_the_oracle(mode):
    sf, rn = MODES[mode]
    x = _logits(11, 40, "float32", seed=3)
    w, ids = torch.ops.mxfp4.topk_softmax(x, 5, sf, rn)
    _check(w, ids, x, 5, sf, rn)


def test_fused_routers_equal_the_torch_routers():
    x = _logits(6, 24, "float32", seed=4)  # distinct values: torch's tie order is unspecified
    for fused, plain in (
            (routing.gpt_oss_routing(x, 4, fused=True), routing.gpt_oss_routing(x, 4)),
            (routing.mixtral_routing(x, 2, fused=True), routing.mixtral_routing(x, 2)),
            (routing.qwen3_routing(x, 3, False, fused=True), routing.qwen3_routing(x, 3, False))):
        assert torch.equal(fused[1], plain[1])
        torch.testing.assert_close(fused[0], plain[0], rtol=1e-6, atol=1e-7)


def test_opcheck():
    x = _logits(5, 16, "float32", seed=5)
    torch.library.opcheck(torch.ops.mxfp4.topk_softmax.default, (x, 3, True, True))
    torch.library.opcheck(torch.ops.mxfp4.topk_softmax.default, (x, 3, False, True),
                          dict(out_dtype=torch.bfloat16))


@pytest.mark.slow
def test_compiles_with_symbolic_tokens():
    def f(logits):
        w, ids = routing.gpt_oss_routing(logits, 4, fused=True)
        return w * 2, ids

    cf = torch.compile(f, fullgraph=True, dynamic=True)
    for T in (3, 10):
        x = _logits(T, 32, "float32", seed=T)
        w, ids = cf(x)
        want_w, want_ids = oracle(x, 4, False, True)
        assert torch.equal(ids, want_ids)
        torch.testing.assert_close(w.double(), 2 * want_w, rtol=2e-6, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", list(MODES))
def test_cuda_kernel_matches_the_oracle(mode):
    sf, rn = MODES[mode]
    for T, E, k in ((1, 32, 4), (4099, 128, 4), (300, 8, 2)):
        x = _logits(T, E, "bfloat16", seed=E).cuda()
        w, ids = torch.ops.mxfp4.topk_softmax(x, k, sf, rn)
        _check(w.cpu(), ids.cpu(), x.cpu(), k, sf, rn)
        wb, idb = torch.ops.mxfp4.topk_softmax(x, k, sf, rn, out_dtype=torch.bfloat16)
        assert torch.equal(idb, ids) and torch.equal(wb, w.to(torch.bfloat16))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="needs the real compiler")
@pytest.mark.parametrize("arch,w_type", [(80, "*fp32"), (90, "*fp32"), (90, "*bf16")])
def test_kernel_compiles_for_the_gpu(arch, w_type):
    # the interpreter accepts what the compiler rejects (a plain global in the kernel, seen)
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from mxfp4_compile.ops import _topk_softmax_kernel as K

    fn = K._topk_softmax_kernel
    types = {"x_ptr": "*bf16", "w_ptr": w_type, "ids_ptr": "*i64", "T": "i32", "E": "i32",
             "stride_t": "i32"}
    cx = dict(K=4, KB=4, EB=32, BT=64, SOFTMAX_FIRST=False, RENORM=True, PDL=arch >= 90)
    sig = {n: types.get(n, "constexpr") for n in fn.arg_names}
    ck = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cx),
                        target=GPUTarget("cuda", arch, 32), options=dict(num_warps=4))
    ptx = ck.asm["ptx"]
    for op in ("griddepcontrol.wait", "griddepcontrol.launch_dependents"):
        assert (op in ptx) == (arch >= 90), op
    if w_type == "*bf16":  # the weights rounded to nearest even, as torch's .to(bfloat16)
        assert "cvt.rn.bf16x2.f32" in ptx or "cvt.rn.bf16.f32" in ptx


def test_bad_arguments_say_what_is_wrong():
    with pytest.raises(ValueError, match=r"k must lie in \[1, E=8\], got 9"):
        torch.ops.mxfp4.topk_softmax(torch.zeros(2, 8), 9)
    with pytest.raises(ValueError, match="float \\[T, E\\] tensor"):
        torch.ops.mxfp4.topk_softmax(torch.zeros(2, 8, dtype=torch.int32), 2)
    with pytest.raises(ValueError, match="out_dtype must be a floating dtype"):
        torch.ops.mxfp4.topk_softmax(torch.zeros(2, 8), 2, out_dtype=torch.int32)


if __name__ == "__main__":  # the child process: TRITON_INTERPRET=1 is already set
    _child()
