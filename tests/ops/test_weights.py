"""Weight preparation: gate/up order and transposed inputs, padding per kernel (H = I = 2880),
checkpoint import without requantizing, and the prepared-weight cache."""
import pytest
import torch

import mxfp4_compile  # noqa: F401
from mxfp4_compile import numerics
from mxfp4_compile.formats import SWIGLU_ALPHA, SWIGLU_LIMIT
from mxfp4_compile.ops import dispatch, weights
from mxfp4_compile.ops.kernels import reference_moe
from mxfp4_compile.ops.moe_torch import moe_torch

OPS = torch.ops.mxfp4


def _g(seed):
    return torch.Generator().manual_seed(seed)


def routing(T, k, E, seed):
    g = _g(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    return ids, torch.softmax(torch.randn(T, k, generator=g), dim=-1)


def gate_up(E, I, H, seed, scale=0.2):
    g = _g(seed)
    return (torch.randn(E, I, H, generator=g) * scale, torch.randn(E, I, H, generator=g) * scale,
            torch.randn(E, H, I, generator=g) * scale,
            torch.randn(E, I, generator=g), torch.randn(E, I, generator=g), torch.randn(E, H, generator=g))


def interleave(a, b, dim=1):
    return torch.stack((a, b), dim=dim + 1).flatten(dim, dim + 1)


def deq(t, rounding="floor"):
    return numerics.dequantize(*numerics.quantize(t, rounding), torch.float64)


def oracle(x, ids, w, G, U, W2, bg, bu, b2, activation, rounding, alpha=SWIGLU_ALPHA,
           limit=SWIGLU_LIMIT):
    """float64 MoE from explicit gate / up / down matrices, each quantized on its own (rows of
    w13 quantize independently, so where the rows sit cannot change their MXFP4 values)."""
    Gq, Uq, W2q = deq(G, rounding), deq(U, rounding), deq(W2, rounding)
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for s in range(ids.shape[1]):
            e = int(ids[t, s])
            g = Gq[e] @ x[t].double() + bg[e].double()
            u = Uq[e] @ x[t].double() + bu[e].double()
            if activation == "swiglu_oai":
                g, u = g.clamp(max=limit), u.clamp(-limit, limit)
                a = g * torch.sigmoid(alpha * g) * (u + 1)
            else:
                a = g * torch.sigmoid(g) * u
            out[t] += float(w[t, s]) * (W2q[e] @ a + b2[e].double())
    return out


def assert_rel(got, want, tol=1e-5):
    err = (got.double() - want).abs().max().item()
    assert err <= tol * want.abs().max().item(), err


@pytest.mark.parametrize("rounding", ["floor", "round_up"])
@pytest.mark.parametrize("activation", ["swiglu_oai", "silu_glu"])
def test_gate_up_order_and_transposed(activation, rounding):
    E, H, I, T, k = 3, 96, 64, 5, 2
    G, U, W2, bg, bu, b2 = gate_up(E, I, H, seed=1)
    ids, w = routing(T, k, E, seed=2)
    x = torch.randn(T, H, generator=_g(3))
    want = oracle(x, ids, w, G, U, W2, bg, bu, b2, activation, rounding)
    results = []
    for interleaved in (True, False):
        w13 = interleave(G, U) if interleaved else torch.cat((G, U), dim=1)  # [E, 2I, H]
        b13 = interleave(bg, bu) if interleaved else torch.cat((bg, bu), dim=1)
        for transposed in (False, True):
            a13, a2 = (w13.transpose(1, 2), W2.transpose(1, 2)) if transposed else (w13, W2)
            p = weights.prepare_moe_weights(a13, a2, b13, b2, activation=activation, rounding=rounding,
                                            gate_up_interleaved=interleaved, transposed=transposed,
                                            cache=False)
            out = OPS.moe(x, ids, w, **p.moe_kwargs())
            assert_rel(out, want)
            results.append((p, out))
    p0, out0 = results[0]
    for p, out in results[1:]:  # every input form -> the same bytes, the same output
        for a, b in zip(p0.tensors(), p.tensors()):
            assert torch.equal(a, b)
        assert torch.equal(out, out0)
    # the op form (as the compiler calls it) agrees with the helper
    w13 = torch.cat((G, U), dim=1)
    for index, t in enumerate(p0.tensors()):
        got = OPS.prepare_moe_weights([w13.transpose(1, 2)], torch.cat((bg, bu), dim=1),
                                      W2.transpose(1, 2), b2, "reference", activation,
                                      rounding=rounding, gate_up_interleaved=False, transposed=True,
                                      index=index, w2_transposed=True)
        assert torch.equal(got, t)


def test_canonical_row_order():
    """Whatever the model's gate/up order and the activation, the reference layout holds pairs
    ([:, j, 0] gate row j, [:, j, 1] up row j); the canonical order it inverts to is swiglu_oai's
    interleaved rows (2j gate, 2j+1 up) or silu_glu's concatenated halves."""
    E, H, I = 2, 32, 64
    G, U, *_ = gate_up(E, I, H, seed=4)
    qg, qu = numerics.quantize(G)[0], numerics.quantize(U)[0]
    for activation in ("swiglu_oai", "silu_glu"):
        for w13, interleaved in ((interleave(G, U), True), (torch.cat((G, U), 1), False)):
            p = weights.prepare_moe_weights(w13, G.new_zeros(E, H, I), activation=activation,
                                            gate_up_interleaved=interleaved, cache=False)
            assert p.w13.shape == (E, I, 2, H // 2)
            assert torch.equal(p.w13[:, :, 0], qg) and torch.equal(p.w13[:, :, 1], qu)
            canon = weights.from_kernel_layout(p)[0]
            want = interleave(qg, qu) if activation == "swiglu_oai" else torch.cat((qg, qu), 1)
            assert torch.equal(canon, want)


def _check_zero_padding(c, H, I, hp, ip, activation):
    w13, s13, b13, w2, s2, b2 = c
    assert w13.shape == (w13.shape[0], 2 * ip, hp // 2) and w2.shape == (w2.shape[0], hp, ip // 2)
    assert (w13[:, :, H // 2:] == 0).all() and (s13[:, :, H // 32:] == 0).all()
    assert (w2[:, H:] == 0).all() and (s2[:, H:] == 0).all() and (b2[:, H:] == 0).all()
    assert (w2[:, :, I // 2:] == 0).all() and (s2[:, :, I // 32:] == 0).all()
    pad_rows = (torch.arange(2 * ip) % ip >= I) if activation == "silu_glu" else (torch.arange(2 * ip) >= 2 * I)
    assert (w13[:, pad_rows] == 0).all() and (s13[:, pad_rows] == 0).all() and (b13[:, pad_rows] == 0).all()
    assert (s13[:, ~pad_rows, : H // 32] != 0).all()  # real rows are not zero


@pytest.mark.slow
def test_padding_2880_every_kernel():
    """gpt-oss sizes: each kernel's multiples (dispatch.padded_sizes); zero padding; the output is
    [T, 2880] and equals the unpadded weights' output."""
    E, H, I, T, k = 1, 2880, 2880, 3, 1
    g = _g(5)
    w13 = torch.randn(E, 2 * I, H, generator=g) * 0.05
    w2 = torch.randn(E, H, I, generator=g) * 0.05
    b13, b2 = torch.randn(E, 2 * I, generator=g), torch.randn(E, H, generator=g)
    ids, w = torch.zeros(T, k, dtype=torch.long), torch.ones(T, k)
    x = torch.randn(T, H, generator=g)
    base = weights.quantize_experts(w13, w2, b13, b2, activation="swiglu_oai")  # multiples of 32
    assert base[0].shape == (E, 2 * I, H // 2)
    want = moe_torch(x, ids, w, *base)
    sizes = {}
    for kernel in dispatch.KERNELS:
        hm, im = dispatch.padding(kernel)
        hp, ip = dispatch.padded_sizes(kernel, H, I)
        assert hp % hm == 0 and 0 <= hp - H < hm and ip % im == 0 and 0 <= ip - I < im
        sizes.setdefault((hp, ip), []).append(kernel)
    assert len(sizes) >= 2, sizes  # at least one kernel really pads 2880
    for (hp, ip), kernels in sizes.items():
        hm, im = dispatch.padding(kernels[0])
        c = weights.quantize_experts(w13, w2, b13, b2, activation="swiglu_oai", h_multiple=hm,
                                     i_multiple=im)
        _check_zero_padding(c, H, I, hp, ip, "swiglu_oai")
        # padding whole zero blocks = padding the quantized bytes afterwards
        for a, b in zip(c, weights.pad_packed(*base, activation="swiglu_oai", hp=hp, ip=ip)):
            assert torch.equal(a, b)
        out = OPS.moe(x, ids, w, *reference_moe.prepare(*c, "swiglu_oai"), kernel="reference")
        assert out.shape == (T, H)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.slow
@pytest.mark.parametrize("activation", ["swiglu_oai", "silu_glu"])
def test_padding_small_both_activations(activation):
    E, H, I, T, k = 3, 96, 160, 6, 2
    G, U, W2, bg, bu, b2 = gate_up(E, I, H, seed=6)
    w13 = interleave(G, U) if activation == "swiglu_oai" else torch.cat((G, U), 1)
    b13 = interleave(bg, bu) if activation == "swiglu_oai" else torch.cat((bg, bu), 1)
    ids, w = routing(T, k, E, seed=7)
    x = torch.randn(T, H, generator=_g(8))
    want = oracle(x, ids, w, G, U, W2, bg, bu, b2, activation, "floor")
    for mult in (32, 64, 128, 256):
        c = weights.quantize_experts(w13, w2=W2, w13_bias=b13, w2_bias=b2, activation=activation,
                                     h_multiple=mult, i_multiple=mult)
        hp, ip = -(-H // mult) * mult, -(-I // mult) * mult
        _check_zero_padding(c, H, I, hp, ip, activation)
        out = OPS.moe(x, ids, w, *reference_moe.prepare(*c, activation), kernel="reference",
                      activation=activation)
        assert out.shape == (T, H)
        assert_rel(out, want)


@pytest.mark.parametrize("kernel", ["triton", "flashinfer", "triton_kernels"])
def test_prepared_shapes_match_fake(kernel):
    """Real preparation for each kernel (where it runs here) has the shapes its fake reports."""
    E, H, I = 2, 96, 160
    G, U, W2, bg, bu, b2 = gate_up(E, I, H, seed=9)
    w13, b13 = interleave(G, U), interleave(bg, bu)
    try:
        p = weights.prepare_moe_weights(w13, W2, b13, b2, activation="swiglu_oai", kernel=kernel,
                                        cache=False)
    except RuntimeError as e:  # flashinfer / triton_kernels not installed: their prepare needs them
        pytest.skip(f"{kernel} preparation cannot run here: {e}")
    hp, ip = dispatch.padded_sizes(kernel, H, I)
    shapes = dispatch.get_kernel(kernel).prepared_shapes(E, hp, ip, "swiglu_oai", True, True)
    for t, (shape, dtype) in zip(p.tensors(), shapes):
        assert tuple(t.shape) == shape and t.dtype == dtype
    assert (p.hidden_size, p.intermediate_size) == (H, I)


# ----------------------------------------------------------------------------- checkpoint import


def gpt_oss_checkpoint(E, H, I, seed):
    """MXFP4 tensors as gpt-oss stores them: *_blocks [E, N, K/32, 16], *_scales [E, N, K/32],
    gate_up rows interleaved, biases [E, N] bf16."""
    g = _g(seed)
    q13, s13 = numerics.quantize(torch.randn(E, 2 * I, H, generator=g) * 0.3, "round_up")
    q2, s2 = numerics.quantize(torch.randn(E, H, I, generator=g) * 0.3, "round_up")
    return dict(w13_blocks=q13.view(E, 2 * I, H // 32, 16), w13_scales=s13,
                w13_bias=torch.randn(E, 2 * I, generator=g).bfloat16(),
                w2_blocks=q2.view(E, H, I // 32, 16), w2_scales=s2,
                w2_bias=torch.randn(E, H, generator=g).bfloat16())


def test_checkpoint_import_no_requantization():
    E, H, I, T, k = 4, 96, 160, 5, 2
    ck = gpt_oss_checkpoint(E, H, I, seed=10)
    copies = {n: t.clone() for n, t in ck.items()}
    before = weights.quantization_count()
    p = weights.from_mxfp4_blocks(**ck, kernel="reference", activation="swiglu_oai")
    assert weights.quantization_count() == before  # nothing was quantized
    for n, t in ck.items():
        assert torch.equal(t, copies[n])  # inputs untouched
    # bytes unchanged (gpt-oss's interleaved rows are the reference layout's pairs, flattened)
    assert torch.equal(p.w13.flatten(1, 2), ck["w13_blocks"].flatten(-2))
    assert torch.equal(p.w13_scales.flatten(1, 2), ck["w13_scales"])
    assert torch.equal(p.w2, ck["w2_blocks"].flatten(-2)) and torch.equal(p.w2_scales, ck["w2_scales"])
    assert p.w13_bias.dtype == torch.float32
    assert torch.equal(p.w13_bias.flatten(1, 2), ck["w13_bias"].float())
    assert torch.equal(p.w2_bias, ck["w2_bias"].float())
    assert (p.hidden_size, p.intermediate_size) == (H, I)
    # the op on the imported weights = the op on the same codes passed directly
    ids, w = routing(T, k, E, seed=11)
    x = torch.randn(T, H, generator=_g(12)).bfloat16()
    out = OPS.moe(x, ids, w, **p.moe_kwargs())
    direct = OPS.moe(x, ids, w, ck["w13_blocks"].flatten(-2).unflatten(1, (-1, 2)),
                     ck["w13_scales"].unflatten(1, (-1, 2)), ck["w13_bias"].float().unflatten(1, (-1, 2)),
                     ck["w2_blocks"].flatten(-2), ck["w2_scales"], ck["w2_bias"].float(),
                     kernel="reference")
    assert torch.equal(out, direct)
    # and the bf16 model made by dequantizing the checkpoint compiles back to the same values
    deq13 = numerics.dequantize(p.w13.flatten(1, 2), p.w13_scales.flatten(1, 2), torch.bfloat16)
    deq2 = numerics.dequantize(p.w2, p.w2_scales, torch.bfloat16)
    for rounding in ("floor", "round_up"):
        r = weights.prepare_moe_weights(deq13, deq2, ck["w13_bias"], ck["w2_bias"], activation="swiglu_oai",
                                        rounding=rounding, cache=False)
        assert torch.equal(OPS.moe(x, ids, w, **r.moe_kwargs()), out)


@pytest.mark.parametrize("kernel", ["reference", "triton"])
@pytest.mark.parametrize("activation", ["swiglu_oai", "silu_glu"])
def test_from_kernel_layout_inverts_the_import(kernel, activation):
    """Checkpoint -> kernel layout (padding, permutations) -> back: the checkpoint's bytes, at
    sizes that pad (H=96, I=160 -> 128/192 for triton), for both gate/up orders."""
    E, H, I = 3, 96, 160
    ck = gpt_oss_checkpoint(E, H, I, seed=19)
    p = weights.from_mxfp4_blocks(**ck, kernel=kernel, activation=activation)
    hp, ip = dispatch.padded_sizes(kernel, H, I)
    assert (ip > I) == (kernel == "triton")  # triton pads I to 192
    shape = dispatch.get_kernel(kernel).prepared_shapes(E, hp, ip, activation, True, True)[0][0]
    assert tuple(p.w13.shape) == shape and len(shape) == (5 if kernel == "triton" else 4)
    back = weights.from_kernel_layout(p)
    want = (ck["w13_blocks"].flatten(-2), ck["w13_scales"], ck["w13_bias"].float(),
            ck["w2_blocks"].flatten(-2), ck["w2_scales"], ck["w2_bias"].float())
    for name, a, b in zip(weights.ROLES, back, want):
        assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b), name


def test_checkpoint_import_padded_and_mx_dtypes():
    """Import for a kernel that pads (256): the checkpoint's bytes sit in the top-left corner,
    padding is zero, and the output equals the unpadded import. torch's MX dtypes are accepted."""
    E, H, I, T, k = 2, 96, 64, 4, 2
    ck = gpt_oss_checkpoint(E, H, I, seed=13)
    p = weights.from_mxfp4_blocks(**ck, kernel="reference", activation="swiglu_oai")
    canon = reference_moe.unprepare(*p.tensors(), "swiglu_oai")
    c = weights.pad_packed(*canon, activation="swiglu_oai", hp=256, ip=256)
    assert torch.equal(c[0][:, : 2 * I, : H // 2], canon[0]) and (c[0][:, 2 * I:] == 0).all()
    assert torch.equal(c[3][:, :H, : I // 2], p.w2) and (c[3][:, H:] == 0).all()
    _check_zero_padding(c, H, I, 256, 256, "swiglu_oai")
    ids, w = routing(T, k, E, seed=14)
    x = torch.randn(T, H, generator=_g(15))
    torch.testing.assert_close(OPS.moe(x, ids, w, *reference_moe.prepare(*c, "swiglu_oai"),
                                       kernel="reference"),
                               OPS.moe(x, ids, w, **p.moe_kwargs()), rtol=1e-5, atol=1e-5)
    if numerics.HAS_TORCH_MX_DTYPES:
        mx = dict(ck, w13_blocks=ck["w13_blocks"].view(torch.float4_e2m1fn_x2),
                  w13_scales=ck["w13_scales"].view(torch.float8_e8m0fnu),
                  w2_scales=ck["w2_scales"].view(torch.float8_e8m0fnu))
        q = weights.from_mxfp4_blocks(**mx, kernel="reference", activation="swiglu_oai")
        for a, b in zip(p.tensors(), q.tensors()):
            assert torch.equal(a, b)


def test_checkpoint_import_bad_shapes():
    ck = gpt_oss_checkpoint(2, 64, 64, seed=16)
    with pytest.raises(ValueError, match="w13_blocks"):
        weights.from_mxfp4_blocks(**dict(ck, w13_blocks=ck["w13_blocks"].view(2, 128, 4, 8)))
    with pytest.raises(ValueError, match="w2"):
        weights.from_mxfp4_blocks(**dict(ck, w2_scales=ck["w2_scales"][:, :, :1]))
    with pytest.raises(ValueError, match="w2 blocks"):
        weights.from_mxfp4_blocks(**dict(ck, w2_blocks=ck["w2_blocks"][:, :32], w2_scales=ck["w2_scales"][:, :32]))
    with pytest.raises(TypeError, match="w13_blocks"):
        weights.from_mxfp4_blocks(**dict(ck, w13_blocks=ck["w13_blocks"].float()))
    with pytest.raises(ValueError, match="activation"):
        weights.from_mxfp4_blocks(**ck, activation="gelu")


@pytest.mark.parametrize("name,width", [("w2_bias", 32), ("w2_bias", 96), ("w13_bias", 64),
                                        ("w13_bias", 256)])
def test_checkpoint_import_bias_of_wrong_width(name, width):
    """A bias narrower or wider than its weight was cropped or zero-padded (or hit a negative
    dimension): now an error naming the tensor and the shape it must have."""
    ck = gpt_oss_checkpoint(2, 64, 64, seed=17)
    want = "2I=128" if name == "w13_bias" else "H=64"
    with pytest.raises(ValueError, match=rf"{name} must be \[E=2, {want}\].*got \(2, {width}\)"):
        weights.from_mxfp4_blocks(**dict(ck, **{name: torch.zeros(2, width)}))
    with pytest.raises(ValueError, match=name):  # wrong expert count
        weights.from_mxfp4_blocks(**dict(ck, **{name: ck[name][:1]}))
    with pytest.raises(TypeError, match=name):
        weights.from_mxfp4_blocks(**dict(ck, **{name: ck[name].long()}))


def test_checkpoint_import_degenerate_shapes():
    """Shapes that used to end in negative-dimension RuntimeErrors or IndexErrors: clear errors."""
    ck = gpt_oss_checkpoint(2, 64, 64, seed=18)
    b13, s13 = ck["w13_blocks"].flatten(-2), ck["w13_scales"]
    with pytest.raises(ValueError, match="even number"):  # odd gate/up row count
        weights.from_mxfp4_blocks(**dict(ck, w13_blocks=b13[:, :127], w13_scales=s13[:, :127]))
    with pytest.raises(ValueError, match="I must be a multiple of 32"):
        weights.from_mxfp4_blocks(**dict(ck, w13_blocks=b13[:, :96], w13_scales=s13[:, :96]))
    with pytest.raises(ValueError, match="empty"):
        weights.from_mxfp4_blocks(**dict(ck, w13_blocks=b13[:, :, :0], w13_scales=s13[:, :, :0]))


@pytest.mark.parametrize("kernel", ["reference", "triton"])
def test_prepared_bias_does_not_alias(kernel):
    """A prepared bias is a copy: changing the caller's float32 bias in place afterwards does not
    change the prepared weights (from_mxfp4_blocks and prepare_moe_weights alike)."""
    ck = gpt_oss_checkpoint(2, 64, 64, seed=19)
    ck["w13_bias"], ck["w2_bias"] = ck["w13_bias"].float(), ck["w2_bias"].float()
    p = weights.from_mxfp4_blocks(**ck, kernel=kernel, activation="swiglu_oai")
    g = _g(20)
    w13, w2 = torch.randn(2, 128, 64, generator=g), torch.randn(2, 64, 64, generator=g)
    b13, b2 = torch.randn(2, 128, generator=g), torch.randn(2, 64, generator=g)
    q = weights.prepare_moe_weights(w13, w2, b13, b2, activation="swiglu_oai", kernel=kernel, cache=False)
    for prepared, (c13, c2) in ((p, (ck["w13_bias"], ck["w2_bias"])), (q, (b13, b2))):
        before = [t.clone() for t in (prepared.w13_bias, prepared.w2_bias)]
        for caller, mine in ((c13, prepared.w13_bias), (c2, prepared.w2_bias)):
            assert caller.data_ptr() != mine.data_ptr()
            caller.add_(1.0)
        assert torch.equal(prepared.w13_bias, before[0]) and torch.equal(prepared.w2_bias, before[1])


# ------------------------------------------------------------------------------------------ cache


def test_cache_same_tensors_same_object_and_version_bump():
    E, H, I = 2, 64, 64
    G, U, W2, bg, bu, b2 = gate_up(E, I, H, seed=17)
    w13, b13 = interleave(G, U), interleave(bg, bu)
    n0 = weights.quantization_count()
    p1 = weights.prepare_moe_weights(w13, W2, b13, b2, activation="swiglu_oai")
    assert weights.quantization_count() == n0 + 1
    p2 = weights.prepare_moe_weights(w13, W2, b13, b2, activation="swiglu_oai")
    assert p2 is p1 and weights.quantization_count() == n0 + 1
    # the compiler's six op calls share that one preparation
    for index in range(6):
        t = OPS.prepare_moe_weights([w13], b13, W2, b2, "reference", "swiglu_oai", index=index)
        assert torch.equal(t, p1.tensors()[index])
    assert weights.quantization_count() == n0 + 1
    # other options: a new preparation
    p3 = weights.prepare_moe_weights(w13, W2, b13, b2, activation="swiglu_oai", rounding="round_up")
    assert p3 is not p1 and weights.quantization_count() == n0 + 2
    # equal values in another tensor: identity, not value, is the key
    p4 = weights.prepare_moe_weights(w13.clone(), W2, b13, b2, activation="swiglu_oai")
    assert p4 is not p1 and weights.quantization_count() == n0 + 3
    # in-place edits (version bump) of any input: re-prepared IN PLACE, with the new values (the
    # same object and tensors: graphs that folded them as constants see the change)
    held = [t.data_ptr() for t in p1.tensors()]
    for t in (w13, W2, b13, b2):
        n = weights.quantization_count()
        with torch.no_grad():
            t.mul_(2.0)
        p5 = weights.prepare_moe_weights(w13, W2, b13, b2, activation="swiglu_oai")
        assert p5 is p1 and weights.quantization_count() == n + 1
        assert [t.data_ptr() for t in p5.tensors()] == held
    assert torch.equal(p1.w13_bias.flatten(1, 2), 2 * interleave(bg, bu))  # reference: pairs
    assert torch.equal(p1.w2, numerics.quantize(W2)[0])
    # a storage swap (p.data = ...), which leaves the version counter alone, is seen too
    size = weights.cache_size()
    n = weights.quantization_count()
    W2.data = -W2.data
    assert weights.prepare_moe_weights(w13, W2, b13, b2, activation="swiglu_oai") is p1
    assert weights.quantization_count() == n + 1
    assert torch.equal(p1.w2, numerics.quantize(W2.data)[0])
    # ... and versions never add entries: one per set of source tensors
    assert weights.cache_size() == size
    # cache=False never stores nor reads
    n = weights.quantization_count()
    assert weights.prepare_moe_weights(w13, W2, b13, b2, activation="swiglu_oai", cache=False) is not p1
    assert weights.quantization_count() == n + 1
