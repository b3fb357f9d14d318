"""torch.library.opcheck for every mxfp4 op (schema, fake tensor, aot dispatch dynamic) and the ops'
errors on bad input: each names the argument at fault."""
import pytest
import torch
import torch.nn.functional as F

import mxfp4_compile  # noqa: F401
from mxfp4_compile import numerics
from mxfp4_compile.formats import E8M0_BIAS, SWIGLU_ALPHA, SWIGLU_LIMIT
from mxfp4_compile.ops import weights
from mxfp4_compile.ops.kernels import reference_moe
from mxfp4_compile.ops.moe_torch import activate

OPS = torch.ops.mxfp4


def _g(seed):
    return torch.Generator().manual_seed(seed)


def opcheck(op, args, kwargs=None):
    torch.library.opcheck(op, args, kwargs or {})


# ---------------------------------------------------------------------------- quantize / dequantize


@pytest.mark.parametrize("shape", [(32,), (1, 64), (0, 32), (3, 5, 96), (2, 0, 64)])
@pytest.mark.parametrize("rounding", ["floor", "round_up"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_quantize(shape, rounding, dtype):
    x = torch.randn(shape, generator=_g(0)).to(dtype)
    opcheck(OPS.quantize.default, (x, rounding))


def test_opcheck_quantize_noncontiguous():
    x = torch.randn(64, 6, generator=_g(1)).t()  # [6, 64] transposed view
    opcheck(OPS.quantize.default, (x,))
    y = torch.randn(4, 128, generator=_g(2))[:, ::2]  # strided K
    opcheck(OPS.quantize.default, (y, "round_up"))
    assert torch.equal(OPS.quantize(y)[0], OPS.quantize(y.contiguous())[0])


@pytest.mark.parametrize("shape", [(16,), (1, 16), (0, 32), (3, 5, 48)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_opcheck_dequantize(shape, dtype):
    packed = torch.randint(0, 256, shape, generator=_g(3), dtype=torch.uint8)
    scales = torch.randint(110, 140, (*shape[:-1], shape[-1] // 16), generator=_g(4), dtype=torch.uint8)
    opcheck(OPS.dequantize.default, (packed, scales, dtype))


def test_opcheck_dequantize_noncontiguous():
    packed = torch.randint(0, 256, (32, 5), generator=_g(5), dtype=torch.uint8).t()
    scales = torch.randint(110, 140, (5, 4), generator=_g(6), dtype=torch.uint8)[:, ::2]
    opcheck(OPS.dequantize.default, (packed, scales, torch.float32))
    assert torch.equal(OPS.dequantize(packed, scales, torch.float32),
                       OPS.dequantize(packed.contiguous(), scales.contiguous(), torch.float32))


# ---------------------------------------------------------------------------------------- moe


def make_weights(E=4, H=64, I=64, bias=True, activation="swiglu_oai", seed=0):
    g = _g(seed)
    w13 = torch.randn(E, 2 * I, H, generator=g) * 0.1
    w2 = torch.randn(E, H, I, generator=g) * 0.1
    b13 = torch.randn(E, 2 * I, generator=g) if bias else None
    b2 = torch.randn(E, H, generator=g) if bias else None
    return weights.prepare_moe_weights(w13, w2, b13, b2, activation=activation, cache=False)


def make_routing(T, k, n, seed=0, dtype=torch.int64):
    g = _g(seed)
    ids = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(T)]) if T else \
        torch.empty(0, k, dtype=torch.int64)
    return ids.to(dtype), torch.rand(T, k, generator=g)


def moe_args(prepared, hidden, ids, w):
    p = prepared
    return (hidden, ids, w, p.w13, p.w13_scales, p.w13_bias, p.w2, p.w2_scales, p.w2_bias, "reference")


@pytest.mark.parametrize("T,activation,bias,combine", [  # every value of each, and every pair of T
    (0, "swiglu_oai", True, True), (0, "silu_glu", False, False),        # with the others
    (1, "swiglu_oai", False, True), (1, "silu_glu", True, False), (1, "swiglu_oai", True, False),
    (5, "swiglu_oai", True, True), (5, "silu_glu", False, True), (5, "swiglu_oai", False, False),
    (5, "silu_glu", True, False)])
@pytest.mark.slow
def test_opcheck_moe(T, activation, bias, combine):
    p = make_weights(E=4, H=64, I=96, bias=bias, activation=activation)
    ids, w = make_routing(T, 2, 4, seed=T, dtype=torch.int32 if bias else torch.int64)
    hidden = torch.randn(T, 64, generator=_g(7)).bfloat16()
    opcheck(OPS.moe.default, moe_args(p, hidden, ids, w),
            dict(activation=activation, combine=combine))


@pytest.mark.parametrize("combine", [True, False])
def test_opcheck_moe_expert_map_noncontiguous(combine):
    p = make_weights(E=3, H=96, I=64)
    expert_map = torch.tensor([2, -1, 0, -1, 1, -1], dtype=torch.int32)
    ids, w = make_routing(6, 3, 6, seed=8)
    hidden = torch.randn(96, 6, generator=_g(9)).t()  # [T, H] transposed view
    ids, w = ids.t().contiguous().t(), w.t().contiguous().t()  # column-major [T, k]
    assert not hidden.is_contiguous() and not ids.is_contiguous()
    args = moe_args(p, hidden, ids, w)
    opcheck(OPS.moe.default, args, dict(expert_map=expert_map, combine=combine, alpha=1.0, limit=3.0))
    want = OPS.moe(hidden.contiguous(), ids.contiguous(), w.contiguous(), *args[3:],
                   expert_map=expert_map, combine=combine, alpha=1.0, limit=3.0)
    assert torch.equal(OPS.moe(*args, expert_map=expert_map, combine=combine, alpha=1.0, limit=3.0), want)


def test_opcheck_moe_sliced_hidden():
    p = make_weights(E=4, H=64, I=64)
    big = torch.randn(5, 160, generator=_g(10))
    hidden = big[:, 16:80]  # row stride 160
    ids, w = make_routing(5, 2, 4, seed=11)
    opcheck(OPS.moe.default, moe_args(p, hidden, ids, w))


def _on_input_expected(p, hidden, ids, w, activation):
    """[T, k, H] float64: expert_{ids[t, s]}(w[t, s] * x[t]), the product rounded to hidden's dtype,
    from the canonical weights (the activation's own gate/up order)."""
    w13, s13, b13, w2, s2, b2 = reference_moe.unprepare(*p.tensors(), activation)
    W13 = numerics.dequantize(w13, s13, torch.float64)  # [E, 2Ip, Hp]
    W2 = numerics.dequantize(w2, s2, torch.float64)  # [E, Hp, Ip]
    T, H = hidden.shape
    out = torch.zeros(T, ids.shape[1], W2.shape[1], dtype=torch.float64)
    for t in range(T):
        for s in range(ids.shape[1]):
            e = int(ids[t, s])
            x = F.pad((hidden[t] * w[t, s]).to(hidden.dtype).double(), (0, W13.shape[2] - H))
            h = W13[e] @ x + (0 if b13 is None else b13[e].double())
            a = activate(h, activation, SWIGLU_ALPHA, SWIGLU_LIMIT)
            out[t, s] = W2[e] @ a + (0 if b2 is None else b2[e].double())
    return out[..., :H]


@pytest.mark.parametrize("k,activation,bias,dtype", [
    (1, "silu_glu", False, torch.bfloat16), (3, "swiglu_oai", True, torch.bfloat16),
    (2, "swiglu_oai", False, torch.float32)])
def test_moe_weights_on_input(k, activation, bias, dtype):
    """weights_on_input: sum_s expert(w * x), against float64 from the same MXFP4 weights, per slot
    (combine=False) and summed; with swiglu or biases it is not the output-weighted result."""
    p = make_weights(E=5, H=96, I=64, bias=bias, activation=activation, seed=k)
    ids, w = make_routing(7, k, 5, seed=k + 10)
    hidden = torch.randn(7, 96, generator=_g(k + 20)).to(dtype)
    args = moe_args(p, hidden, ids, w)
    want = _on_input_expected(p, hidden, ids, w, activation)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    slots = OPS.moe(*args, activation=activation, weights_on_input=True, combine=False)
    assert slots.shape == (7, k, 96) and slots.dtype == dtype
    assert rel_l2(slots, want) < tol
    out = OPS.moe(*args, activation=activation, weights_on_input=True)
    assert out.shape == (7, 96) and out.dtype == dtype
    assert rel_l2(out, want.sum(1)) < tol
    if activation == "swiglu_oai" or bias:
        assert rel_l2(OPS.moe(*args, activation=activation), want.sum(1)) > 0.05
    opcheck(OPS.moe.default, args, dict(activation=activation, weights_on_input=True))


def rel_l2(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ------------------------------------------------------------------------- prepare_moe_weights


@pytest.mark.parametrize("activation,bias,transposed", [
    ("swiglu_oai", True, False), ("silu_glu", True, True), ("swiglu_oai", False, True)])
@pytest.mark.slow
def test_opcheck_prepare_moe_weights(activation, bias, transposed):
    g = _g(12)
    E, H, I = 3, 64, 96
    w13 = torch.randn(E, 2 * I, H, generator=g)
    w2 = torch.randn(E, H, I, generator=g)
    if transposed:
        w13, w2 = w13.transpose(1, 2), w2.transpose(1, 2)  # non-contiguous views too
    b13 = torch.randn(E, 2 * I, generator=g).bfloat16() if bias else None
    b2 = torch.randn(E, H, generator=g) if bias else None
    for index in range(6):
        if index in (2, 5) and not bias:
            continue
        opcheck(OPS.prepare_moe_weights.default, ([w13], b13, w2, b2, "reference", activation),
                dict(rounding="round_up", gate_up_interleaved=False, transposed=transposed,
                     index=index, w2_transposed=transposed))


# ------------------------------------------------------------------------------------ bad input


@pytest.fixture
def setup():
    p = make_weights(E=4, H=64, I=64)
    ids, w = make_routing(3, 2, 4)
    hidden = torch.randn(3, 64)
    return p, hidden, ids, w


def _call(p, hidden, ids, w, **kw):
    args = dict(hidden=hidden, topk_ids=ids, topk_weights=w, w13=p.w13, w13_scales=p.w13_scales,
                w13_bias=p.w13_bias, w2=p.w2, w2_scales=p.w2_scales, w2_bias=p.w2_bias,
                kernel="reference")
    args.update(kw)
    return OPS.moe(**args)


@pytest.mark.parametrize("field,value,match", [
    ("hidden", torch.ones(3, 64, dtype=torch.int32), "hidden"),
    ("hidden", torch.ones(3, 4, 16), "hidden"),
    ("topk_ids", torch.zeros(3, 2), "topk_ids"),
    ("topk_ids", torch.zeros(4, 2, dtype=torch.int64), "topk_ids"),
    ("topk_weights", torch.ones(3, 2, dtype=torch.int64), "topk_weights"),
    ("topk_weights", torch.ones(3, 3), "topk_weights"),
    ("kernel", "cutlass", "kernel"),
    ("activation", "gelu", "activation"),
    ("expert_map", torch.zeros(4), "expert_map"),
    ("expert_map", torch.zeros(2, 2, dtype=torch.int32), "expert_map"),
])
def test_moe_bad_args(setup, field, value, match):
    p, hidden, ids, w = setup
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        _call(p, hidden, ids, w, **{field: value})


def test_moe_bad_weights(setup):
    p, hidden, ids, w = setup
    with pytest.raises(ValueError, match=r"w13 is torch.float32 .* expects torch.uint8"):
        _call(p, hidden, ids, w, w13=p.w13.float())
    with pytest.raises(ValueError, match="w13_scales"):
        _call(p, hidden, ids, w, w13_scales=p.w13_scales[:, :, :1])
    # mismatched expert counts between w13 and w2
    with pytest.raises(ValueError, match="w2 .* holds 5 experts"):
        _call(p, hidden, ids, w, w2=torch.cat((p.w2, p.w2[:1])))
    with pytest.raises(ValueError, match="w2_scales"):
        _call(p, hidden, ids, w, w2_scales=p.w2_scales[:3])
    with pytest.raises(ValueError, match="w13_bias"):
        _call(p, hidden, ids, w, w13_bias=p.w13_bias[:, :10])
    with pytest.raises(ValueError, match="w2_bias"):
        _call(p, hidden, ids, w, w2_bias=p.w2_bias[:3])
    with pytest.raises(ValueError, match="H=128"):  # hidden wider than the weights
        _call(p, torch.randn(3, 128), ids, w)


def test_moe_k_not_multiple_of_32(setup):
    """Weights whose Hp (or Ip) is not a multiple of 32: an error naming the weight, not garbage."""
    p, hidden, ids, w = setup
    E = p.w13.shape[0]
    w13 = torch.zeros(E, p.w13.shape[1], 24, dtype=torch.uint8)  # Hp = 48
    s13 = torch.zeros(E, p.w13.shape[1], 1, dtype=torch.uint8)
    w2 = torch.zeros(E, 48, p.w2.shape[2], dtype=torch.uint8)
    s2 = torch.zeros(E, 48, p.w2_scales.shape[2], dtype=torch.uint8)
    with pytest.raises(ValueError, match="w13"):
        _call(p, hidden[:, :48], ids, w, w13=w13, w13_scales=s13, w2=w2, w2_scales=s2,
              w13_bias=None, w2_bias=None)


def _slot_outputs(p, hidden, ids, w, **kw):
    return _call(p, hidden, ids, w, combine=False, **kw)


def test_moe_ids_out_of_range(setup, monkeypatch):
    """Ids outside [0, E) are "not on this rank" on every kernel: their slot contributes zero;
    MXFP4_CHECK_IDS=1 makes them an error."""
    p, hidden, ids, w = setup
    monkeypatch.delenv("MXFP4_CHECK_IDS", raising=False)
    ref = _slot_outputs(p, hidden, ids, w)
    for bad in (4, -1, 1 << 40):
        ids2 = ids.clone()
        ids2[1, 0] = bad
        out = _slot_outputs(p, hidden, ids2, w)
        assert torch.all(out[1, 0] == 0)
        keep = torch.ones(ids.shape, dtype=torch.bool)
        keep[1, 0] = False
        torch.testing.assert_close(out[keep], ref[keep])  # other batch sizes: BLAS rounding
        combined = _call(p, hidden, ids2, w)
        w2 = w.clone()
        w2[1, 0] = 0
        torch.testing.assert_close(combined, _call(p, hidden, ids, w2))
        monkeypatch.setenv("MXFP4_CHECK_IDS", "1")
        with pytest.raises(ValueError, match=r"MXFP4_CHECK_IDS=1.*topk_ids must lie in \[0, 4\)"):
            _call(p, hidden, ids2, w)
        monkeypatch.delenv("MXFP4_CHECK_IDS")
    # top-k larger than E: some id must fall outside [0, E): a shape error on every kernel
    ids5, w5 = torch.arange(5).expand(3, 5), torch.rand(3, 5)
    with pytest.raises(ValueError, match="k=5 columns but there are only 4 experts"):
        _call(p, hidden[:3], ids5, w5)


def test_moe_check_ids_assert_async(setup):
    """Off the CPU the MXFP4_CHECK_IDS check is torch._assert_async (no host sync), which on CPU
    tensors raises at once; nothing while a CUDA graph is being captured."""
    from mxfp4_compile.ops import library
    p, hidden, ids, w = setup
    library._assert_ids_async(ids, None, 4)  # in range: no error
    bad = ids.clone()
    bad[0, 0] = 9
    with pytest.raises(RuntimeError, match=r"MXFP4_CHECK_IDS=1.*\[0, 4\)"):
        library._assert_ids_async(bad, None, 4)
    emap = torch.tensor([0, 1, 2, 7], dtype=torch.int32)  # entry past the local experts
    with pytest.raises(RuntimeError, match="MXFP4_CHECK_IDS"):
        library._assert_ids_async(torch.tensor([[3, 0]]), emap, 4)
    library._assert_ids_async(bad, None, 4, capturing=True)  # skipped under capture


def test_moe_bad_expert_map(setup, monkeypatch):
    """Ids beyond the map, and map entries outside [-1, E), are "not on this rank" (zero);
    MXFP4_CHECK_IDS=1 makes each an error."""
    p, hidden, ids, w = setup
    monkeypatch.delenv("MXFP4_CHECK_IDS", raising=False)
    ids2 = torch.tensor([[3, 0], [1, 2], [0, 1]])
    full = torch.tensor([0, 1, 2, 3], dtype=torch.int32)
    ref = _slot_outputs(p, hidden, ids2, w, expert_map=full)
    # a CPU map's entries outside [-1, E) are an error (a host read costs nothing there)
    for bad, match in ((7, r"global experts \[3\] to local ids \[7\].*holds 4 experts"),
                       (-2, r"global experts \[3\] to local ids \[-2\]")):
        with pytest.raises(ValueError, match=match):
            _call(p, hidden, ids2, w, expert_map=torch.tensor([0, 1, 2, bad], dtype=torch.int32))
        # the reference math itself (what a GPU map gets): "not on this rank", zero
        out = reference_moe.moe(hidden, ids2, w, *p.tensors(), p.activation, SWIGLU_ALPHA,
                                SWIGLU_LIMIT, torch.tensor([0, 1, 2, bad]), False)
        assert torch.all(out[0, 0] == 0)
    cases = [  # (map, what the CHECK_IDS error says)
        (torch.tensor([0, 1, 2], dtype=torch.int32), r"topk_ids must lie in \[0, 3\).*expert_map"),
    ]
    for emap, match in cases:
        out = _slot_outputs(p, hidden, ids2, w, expert_map=emap)
        assert torch.all(out[0, 0] == 0)  # global expert 3: not on this rank
        torch.testing.assert_close(out[1:], ref[1:])
        torch.testing.assert_close(out[0, 1], ref[0, 1])
        monkeypatch.setenv("MXFP4_CHECK_IDS", "1")
        with pytest.raises(ValueError, match=match):
            _call(p, hidden, ids2, w, expert_map=emap)
        monkeypatch.delenv("MXFP4_CHECK_IDS")
    # negative ids with a map do not wrap around to the map's last entry
    neg = ids2.clone()
    neg[0, 0] = -1
    out = _slot_outputs(p, hidden, neg, w, expert_map=full)
    assert torch.all(out[0, 0] == 0)
    # an empty map: every expert elsewhere
    out = _slot_outputs(p, hidden, ids2[:, :0], w[:, :0], expert_map=full[:0])
    assert out.shape == (3, 0, 64)


def test_moe_wrong_device(setup):
    """Inputs on two devices (meta stands in for a second device on a CPU-only machine)."""
    p, hidden, ids, w = setup
    with pytest.raises((ValueError, RuntimeError), match="topk_weights|device"):
        _call(p, hidden, ids, w.to("meta"))
    with pytest.raises((ValueError, RuntimeError), match="w2|device"):
        _call(p, hidden, ids, w, w2=p.w2.to("meta"))


def test_moe_checks_are_remembered_per_signature_only(setup):
    """The op's checks are cached by the arguments' shapes, dtypes and devices: a call that
    passed them does not let a call with another signature through."""
    from mxfp4_compile.ops import library
    p, hidden, ids, w = setup
    want = library._check_moe_uncached(hidden, ids, w, "reference", "swiglu_oai", None, p.tensors())
    _call(p, hidden, ids, w)
    assert library._check_moe(hidden, ids, w, "reference", "swiglu_oai", None, p.tensors()) == want
    with pytest.raises((ValueError, RuntimeError), match="w2|device"):
        _call(p, hidden, ids, w, w2=p.w2.to("meta"))
    with pytest.raises(ValueError, match="w13_scales|w2"):
        _call(p, hidden, ids, w, w2_scales=p.w2_scales[:, :, :1])
    with pytest.raises(ValueError, match="activation"):
        _call(p, hidden, ids, w, activation="gelu")


def test_dequantize_wrong_device():
    packed = torch.randint(0, 256, (4, 16), dtype=torch.uint8)
    scales = torch.full((4, 1), E8M0_BIAS, dtype=torch.uint8)
    with pytest.raises(ValueError, match="scales are on meta"):
        OPS.dequantize(packed, scales.to("meta"), torch.float32)
    assert OPS.dequantize(packed.to("meta"), scales.to("meta"), torch.float32).device.type == "meta"


def test_quantize_bad(setup):
    with pytest.raises(ValueError, match="K=48.*pad K to 64"):
        OPS.quantize(torch.randn(2, 48))
    with pytest.raises(ValueError, match="rounding"):
        OPS.quantize(torch.randn(2, 32), "stochastic")
    with pytest.raises(TypeError, match="x must be"):
        OPS.quantize(torch.ones(2, 32, dtype=torch.int64))


def test_prepare_moe_weights_bad():
    g = _g(0)
    w13, w2 = torch.randn(4, 128, 64, generator=g), torch.randn(4, 64, 64, generator=g)
    op = OPS.prepare_moe_weights
    with pytest.raises(ValueError, match="w13 has 4 experts but w2 has 3"):
        op([w13], None, w2[:3], None, "reference", "swiglu_oai")
    with pytest.raises(ValueError, match="w2"):
        op([w13], None, w2[:, :, :32], None, "reference", "swiglu_oai")
    # H = 48: not an error, the weight transform pads it (to 64 for the reference layout)
    assert op([torch.randn(4, 128, 48)], None, torch.randn(4, 48, 64), None, "reference",
              "swiglu_oai").shape == (4, 64, 2, 32)  # [E, Ip, 2, Hp/2] gate/up pairs
    with pytest.raises(ValueError, match="activation"):
        op([w13], None, w2, None, "reference", "relu")
    with pytest.raises(ValueError, match="kernel"):
        op([w13], None, w2, None, "cutlass", "swiglu_oai")
    with pytest.raises(ValueError, match="rounding"):
        op([w13], None, w2, None, "reference", "swiglu_oai", rounding="nearest")
    with pytest.raises(ValueError, match="bias"):
        op([w13], None, w2, None, "reference", "swiglu_oai", index=2)
    with pytest.raises(ValueError, match="w13_bias"):
        op([w13], torch.randn(4, 64), w2, None, "reference", "swiglu_oai", index=2)
    with pytest.raises(TypeError, match="w13 must be a float"):
        op([w13.to(torch.int8)], None, w2, None, "reference", "swiglu_oai")
