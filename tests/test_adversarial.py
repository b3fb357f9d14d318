"""Adversarial inputs to the public ops and helpers: each must raise a clear error (naming the
argument at fault) or return the documented result. Never a silent wrong result.

The matrix: 197 cases (CASE_COUNT, kept honest by ``test_case_count``; plus 7 duplicates that
skip), over quantize, dequantize, moe on every kernel (the "reference" kernel runs; "triton",
"triton_kernels" and "flashinfer" are checked through the op's wrapper with weights shaped by
their ``prepared_shapes``, which is all a CPU can reach: the checks run before any kernel
launches), from_mxfp4_blocks and the routers. The number of silent wrong results among them is
zero and must stay zero: a new adversarial input goes into one of the lists below with its error
or its documented result.

Weights prepared for one kernel and passed to another are refused for every pair of kernels
(each layout has shapes of its own: ``test_moe_refuses_every_other_kernels_layout``). The
activation is not part of any prepared layout: weights prepared under one activation and called
with the other compute the other's function of the same gate/up projections (documented in
torch.ops.mxfp4.moe's docstring, tested in ``test_moe_other_activation_same_gate_up``).
"""
from __future__ import annotations

import math

import pytest
import torch

import mxfp4_compile  # noqa: F401  (registers torch.ops.mxfp4.*)
from mxfp4_compile import numerics, routing
from mxfp4_compile.ops import dispatch, library, weights
from mxfp4_compile.formats import SWIGLU_ALPHA, SWIGLU_LIMIT
from mxfp4_compile.ops.kernels import PREPARED_ROLES, reference_moe
from mxfp4_compile.ops.moe_torch import moe_torch

OPS = torch.ops.mxfp4
KERNELS = ("reference", "triton", "triton_kernels", "flashinfer")
E, H, I, T, K = 4, 64, 64, 3, 2
CASE_COUNT = 197  # every parametrized case of this file; test_case_count keeps it honest


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _weights(kernel):
    """Six tensors in ``kernel``'s layout: real ones for reference, zeros of the exact prepared
    shapes and dtypes for the others (their values do not matter to the wrapper's checks)."""
    if kernel == "reference":
        g = _g(0)
        p = weights.prepare_moe_weights(torch.randn(E, 2 * I, H, generator=g) * 0.1,
                                        torch.randn(E, H, I, generator=g) * 0.1,
                                        torch.randn(E, 2 * I, generator=g) * 0.1,
                                        torch.randn(E, H, generator=g) * 0.1,
                                        activation="swiglu_oai", kernel="reference", cache=False)
        return dict(zip(PREPARED_ROLES, p.tensors()))
    hp, ip = dispatch.padded_sizes(kernel, H, I)
    shapes = dispatch.get_kernel(kernel).prepared_shapes(E, hp, ip, "swiglu_oai", True, True)
    return {r: torch.zeros(s, dtype=d) for r, (s, d) in zip(PREPARED_ROLES, shapes)}


def _inputs(kernel):
    g = _g(1)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    return dict(hidden=torch.randn(T, H, generator=g), topk_ids=ids,
                topk_weights=torch.rand(T, K, generator=g), kernel=kernel, **_weights(kernel))


def _shrink(t, n=1):
    return t[:t.shape[0] - n]


# (case id, change to the inputs, error type, what the message must say)
MOE_BAD = [
    ("w2_fewer_experts", lambda a, k: {"w2": _shrink(a["w2"])}, ValueError, r"w2 .* holds 3 experts"),
    ("w2_scales_fewer_experts", lambda a, k: {"w2_scales": _shrink(a["w2_scales"])}, ValueError,
     r"w2_scales .* holds 3 experts"),
    ("w13_bias_fewer_experts", lambda a, k: {"w13_bias": _shrink(a["w13_bias"])}, ValueError,
     r"w13_bias .* holds 3 experts"),
    ("w2_bias_fewer_experts", lambda a, k: {"w2_bias": _shrink(a["w2_bias"])}, ValueError,
     r"w2_bias .* holds 3 experts"),
    ("w13_scales_more_experts", lambda a, k: {"w13_scales": torch.cat((a["w13_scales"], a["w13_scales"][:1]))},
     ValueError, r"w13_scales .* holds 5 experts"),
    ("hidden_wider_than_Hp", lambda a, k: {"hidden": torch.randn(T, 1024)}, ValueError,
     r"hidden has H=1024 features but the weights hold only Hp="),
    ("w2_other_H", lambda a, k: {"w2": torch.cat((a["w2"], a["w2"]), dim=1)}, ValueError, r"w2|w13"),
    ("w2_other_I", lambda a, k: {"w2": torch.cat((a["w2"], a["w2"]), dim=2)}, ValueError, r"w2|w13"),
    ("w2_bias_other_H", lambda a, k: {"w2_bias": torch.cat((a["w2_bias"], a["w2_bias"]), dim=1)},
     ValueError, r"w2_bias is .* expects"),
    ("w13_bias_other_I", lambda a, k: {"w13_bias": a["w13_bias"][:, :-2]}, ValueError,
     r"w13_bias is .* expects"),
    ("w13_float", lambda a, k: {"w13": a["w13"].float()}, ValueError, r"w13 is torch.float32 .* expects torch.uint8"),
    ("scales_int32", lambda a, k: {"w2_scales": a["w2_scales"].int()}, ValueError, r"w2_scales is torch.int32"),
    ("bias_bf16", lambda a, k: {"w2_bias": a["w2_bias"].bfloat16()}, ValueError, r"w2_bias is torch.bfloat16"),
    ("w13_2d", lambda a, k: {"w13": a["w13"][0]}, ValueError, r"w13"),
    ("w13_1d", lambda a, k: {"w13": a["w13"].flatten()}, ValueError, r"w13 must have a leading expert dim"),
    ("hidden_int", lambda a, k: {"hidden": torch.ones(T, H, dtype=torch.int32)}, ValueError, r"hidden must be a float"),
    ("hidden_3d", lambda a, k: {"hidden": torch.ones(T, 1, H)}, ValueError, r"hidden must be a float \[T, H\]"),
    ("hidden_0d", lambda a, k: {"hidden": torch.tensor(1.0)}, ValueError, r"hidden must be a float \[T, H\]"),
    ("ids_float", lambda a, k: {"topk_ids": a["topk_ids"].float()}, ValueError, r"topk_ids must be int32/int64"),
    ("ids_int16", lambda a, k: {"topk_ids": a["topk_ids"].short()}, ValueError, r"topk_ids must be int32/int64"),
    ("ids_1d", lambda a, k: {"topk_ids": a["topk_ids"][:, 0]}, ValueError, r"topk_ids must be int32/int64 \[T, k\]"),
    ("weights_int", lambda a, k: {"topk_weights": a["topk_ids"]}, ValueError, r"topk_weights must be a float"),
    ("weights_other_k", lambda a, k: {"topk_weights": torch.rand(T, K + 1)}, ValueError,
     r"topk_weights \(3, 3\) and topk_ids \(3, 2\) disagree on k"),
    ("weights_other_T", lambda a, k: {"topk_weights": torch.rand(T + 1, K)}, ValueError,
     r"disagree on T"),
    ("ids_other_T", lambda a, k: {"topk_ids": a["topk_ids"][:2], "topk_weights": a["topk_weights"][:2]},
     ValueError, r"topk_ids has 2 rows but hidden has 3 tokens"),
    ("k_above_E", lambda a, k: {"topk_ids": torch.arange(5).expand(T, 5), "topk_weights": torch.rand(T, 5)},
     ValueError, r"k=5 columns but there are only 4 experts"),
    ("k_above_map", lambda a, k: {"expert_map": torch.tensor([0, 1], dtype=torch.int32)}, ValueError,
     r"k=2 columns.*only 2|only 2"),
    ("map_2d", lambda a, k: {"expert_map": torch.zeros(2, 2, dtype=torch.int32)}, ValueError, r"expert_map must be a 1-D"),
    ("map_float", lambda a, k: {"expert_map": torch.zeros(4)}, ValueError, r"expert_map must be a 1-D int32/int64"),
    ("map_on_meta", lambda a, k: {"expert_map": torch.zeros(4, dtype=torch.int32, device="meta")}, ValueError,
     r"expert_map is on meta but hidden is on cpu"),
    ("w2_on_meta", lambda a, k: {"w2": a["w2"].to("meta")}, ValueError, r"w2 is on meta but hidden is on cpu"),
    ("ids_on_meta", lambda a, k: {"topk_ids": a["topk_ids"].to("meta")}, ValueError, r"topk_ids is on meta"),
    ("bad_kernel", lambda a, k: {"kernel": "cutlass"}, ValueError, r"kernel"),
    ("bad_activation", lambda a, k: {"activation": "gelu"}, ValueError, r"activation"),
]
MOE_BAD = [c for c in MOE_BAD if c[0] != "k_above_map"] + [
    ("k_above_map", lambda a, k: {"expert_map": torch.tensor([0], dtype=torch.int32)}, ValueError,
     r"k=2 columns but there are only 1 global experts \(expert_map\)")]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("case,change,exc,match", MOE_BAD, ids=[c[0] for c in MOE_BAD])
def test_moe_bad_input(kernel, case, change, exc, match):
    if case == "bad_kernel" and kernel != "reference":
        pytest.skip("one kernel-name case is enough")
    args = _inputs(kernel)
    args.update(change(args, kernel))
    with pytest.raises(exc, match=match):
        OPS.moe(**args)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("other", KERNELS)
def test_moe_refuses_every_other_kernels_layout(kernel, other):
    """Every kernel's prepared shapes are its own at every padded size (here the test sizes);
    ``test_prepared_shapes_never_coincide`` checks the shapes over many sizes."""
    if other == kernel:
        pytest.skip("the kernel's own layout: test_moe_fast_path_wrapper_accepts_its_layout")
    args = _inputs(kernel)
    args.update(_weights(other))
    with pytest.raises(ValueError, match=rf"kernel {kernel!r}|w13|w2"):
        OPS.moe(**args)


LAYOUTS = [(k, "bf16") for k in KERNELS] + [("triton", "fp8")]  # (kernel, activations)


def test_prepared_shapes_never_coincide():
    """No two layouts' prepared (w13, w13_scales, w2, w2_scales) shapes and dtypes are equal for
    any padded sizes each accepts, activation or E (a layout: a kernel with bf16 activations, and
    triton's FP8 one), so a shape check tells every layout apart; within one layout both
    activations give the same shapes (the layout is activation-free)."""
    from mxfp4_compile.ops.kernels import check_prepared
    seen = {}
    for kernel, acts in LAYOUTS:
        mod = dispatch.get_kernel(kernel)
        for hp in range(mod.H_MULTIPLE, 4097, mod.H_MULTIPLE):
            for ip in (mod.I_MULTIPLE, 2 * mod.I_MULTIPLE, 3 * mod.I_MULTIPLE, 2880 // mod.I_MULTIPLE * mod.I_MULTIPLE):
                both = [mod.prepared_shapes(3, hp, ip, act, True, True, acts)
                        for act in ("swiglu_oai", "silu_glu")]
                assert both[0] == both[1], (kernel, hp, ip)  # the layout does not depend on the activation
                key = tuple(both[0][i] for i in (0, 1, 3, 4))
                assert seen.setdefault(key, (kernel, acts)) == (kernel, acts), (key, kernel, seen[key])
    for key, layout in seen.items():  # and the op's check refuses them for every other layout
        tensors = [torch.empty(key[0][0], dtype=key[0][1], device="meta"),
                   torch.empty(key[1][0], dtype=key[1][1], device="meta"), None,
                   torch.empty(key[2][0], dtype=key[2][1], device="meta"),
                   torch.empty(key[3][0], dtype=key[3][1], device="meta"), None]
        for other, acts in LAYOUTS:
            if (other, acts) != layout:
                with pytest.raises(ValueError):
                    check_prepared(dispatch.get_kernel(other), None, tensors, "swiglu_oai",
                                   activations=acts)


@pytest.mark.parametrize("prepared_for,called_with", [("swiglu_oai", "silu_glu"), ("silu_glu", "swiglu_oai")])
def test_moe_other_activation_same_gate_up(prepared_for, called_with):
    """Documented: prepare puts gate/up in the kernel's pair order for either activation, so the
    op's activation picks the function of the same gate/up projections (the oracle:
    moe_torch on the canonical rows of the activation called with)."""
    g = _g(3)
    G, U = torch.randn(E, I, H, generator=g) * 0.1, torch.randn(E, I, H, generator=g) * 0.1
    W2 = torch.randn(E, H, I, generator=g) * 0.1
    as_model = torch.stack((G, U), 2).flatten(1, 2) if prepared_for == "swiglu_oai" else torch.cat((G, U), 1)
    p = weights.prepare_moe_weights(as_model, W2, activation=prepared_for, kernel="reference", cache=False)
    a = _inputs("reference")
    got = OPS.moe(a["hidden"], a["topk_ids"], a["topk_weights"], *p.tensors(), kernel="reference",
                  activation=called_with)
    canon = torch.stack((G, U), 2).flatten(1, 2) if called_with == "swiglu_oai" else torch.cat((G, U), 1)
    q = weights.quantize_experts(canon, W2, activation=called_with)
    want = moe_torch(a["hidden"], a["topk_ids"], a["topk_weights"], *q, activation=called_with)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, OPS.moe(a["hidden"], a["topk_ids"], a["topk_weights"], *p.tensors(),
                                           kernel="reference", activation=prepared_for))


@pytest.mark.parametrize("kernel", KERNELS[1:])
def test_moe_fast_path_wrapper_accepts_its_layout(kernel, monkeypatch):
    """The control: the same wrapper passes exactly-shaped weights through to the kernel (here a
    stand-in reason, since the kernel cannot run on CPU)."""
    monkeypatch.setattr(library.dispatch, "unavailable_reason", lambda name, dev: "stub: no GPU here")
    with pytest.raises(RuntimeError, match="stub: no GPU here"):
        OPS.moe(**_inputs(kernel))


@pytest.mark.parametrize("kernel", KERNELS)
def test_moe_fake_kernel_checks_too(kernel):
    """The fake kernel (torch.compile's tracing) runs the same shape checks."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    args = _inputs(kernel)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = {n: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for n, v in args.items()}
        assert OPS.moe(**fake).shape == (T, H)
        fake["w2"] = _shrink(fake["w2"])
        with pytest.raises(ValueError, match="w2 .* holds 3 experts"):
            OPS.moe(**fake)


# ---- documented results: ids that are "not on this rank" contribute zero (every kernel) -------------
ID_CASES = [  # (case id, ids row 0 slot 0, expert_map or None)
    ("id_eq_E", 4, None), ("id_negative", -1, None), ("id_huge", 1 << 40, None),
    ("id_beyond_map", 4, [0, 1, 2, 3]), ("id_negative_with_map", -1, [0, 1, 2, 3]),
    ("map_entry_minus_2", 3, [0, 1, 2, -2]), ("map_entry_past_E", 3, [0, 1, 2, 7]),
    ("map_entry_minus_1", 3, [0, 1, 2, -1]), ("map_with_gap", 3, [0, 1, -1, 5]),
]


@pytest.mark.parametrize("case,bad,emap", ID_CASES, ids=[c[0] for c in ID_CASES])
def test_moe_out_of_range_ids_contribute_zero(case, bad, emap, monkeypatch):
    monkeypatch.delenv("MXFP4_CHECK_IDS", raising=False)
    args = _inputs("reference")
    args["topk_ids"] = torch.tensor([[bad, 0], [1, 2], [0, 1]])
    if emap is not None:
        args["expert_map"] = torch.tensor(emap, dtype=torch.int32)
    if emap is not None and any(e < -1 or e >= E for e in emap):
        # a CPU map with entries outside [-1, E): an error; on a GPU "not on this rank", as the
        # reference math computes
        with pytest.raises(ValueError, match=r"expert_map sends global experts \[3\] to local ids"):
            OPS.moe(**args)
        w = {r: args[r] for r in PREPARED_ROLES}
        out = reference_moe.moe(args["hidden"], args["topk_ids"], args["topk_weights"], *w.values(),
                                "swiglu_oai", SWIGLU_ALPHA, SWIGLU_LIMIT, args["expert_map"], False)
        assert torch.all(out[0, 0] == 0) and out[1].abs().sum() > 0
        return
    out = OPS.moe(**args, combine=False)
    assert torch.all(out[0, 0] == 0) and torch.all(torch.isfinite(out))
    assert out[1].abs().sum() > 0  # the valid slots still compute
    monkeypatch.setenv("MXFP4_CHECK_IDS", "1")
    if case == "map_entry_minus_1":  # -1 is the map's own "elsewhere": no error, still zero
        assert torch.equal(OPS.moe(**args, combine=False), out)
        return
    with pytest.raises(ValueError, match="MXFP4_CHECK_IDS=1"):
        OPS.moe(**args)


# ---- quantize / dequantize --------------------------------------------------------------------------
Q_BAD = [
    ("0dim", lambda: (torch.tensor(1.0),), ValueError, r"0-dim"),
    ("k33", lambda: (torch.randn(2, 33),), ValueError, r"K=33 is not a multiple"),
    ("k0_1d", lambda: (torch.randn(2, 16),), ValueError, r"K=16"),
    ("int_input", lambda: (torch.ones(32, dtype=torch.int32),), TypeError, r"x must be a floating"),
    ("bad_rounding", lambda: (torch.randn(32), "nearest"), ValueError, r"rounding"),
    ("f64_round_up_beyond_e8m0", lambda: (torch.full((32,), 1e40, dtype=torch.float64), "round_up"),
     ValueError, r"never clips.*1.02085e\+39"),
]


@pytest.mark.parametrize("case,args,exc,match", Q_BAD, ids=[c[0] for c in Q_BAD])
def test_quantize_bad_input(case, args, exc, match):
    with pytest.raises(exc, match=match):
        OPS.quantize(*args())


def test_quantize_documented_results():
    x = torch.randn(2, 64, generator=_g(2))
    x[0, 3] = math.nan
    packed, scales = OPS.quantize(x)
    assert scales[0, 0].item() == 0xFF and scales[0, 1].item() != 0xFF  # NaN poisons its block only
    big = torch.full((32,), 1e40, dtype=torch.float64)
    p, s = OPS.quantize(big, "floor")  # floor saturates, as documented
    assert numerics.dequantize(p, s, torch.float64).max().item() == numerics.MAX_BLOCK_AMAX


DQ_BAD = [
    ("packed_int8", lambda: (torch.zeros(16, dtype=torch.int8), torch.zeros(1, dtype=torch.uint8), torch.float32),
     TypeError, r"uint8"),
    ("scales_too_many", lambda: (torch.zeros(2, 16, dtype=torch.uint8), torch.zeros(2, 2, dtype=torch.uint8),
                                 torch.float32), ValueError, r"needs scales of shape \(2, 1\).*got \(2, 2\)"),
    ("packed_not_block", lambda: (torch.zeros(20, dtype=torch.uint8), torch.zeros(1, dtype=torch.uint8),
                                  torch.float32), ValueError, r"20 bytes = K/2, not a multiple of 16"),
    ("rows_differ", lambda: (torch.zeros(3, 16, dtype=torch.uint8), torch.zeros(2, 1, dtype=torch.uint8),
                             torch.float32), ValueError, r"needs scales of shape \(3, 1\)"),
    ("int_dtype", lambda: (torch.zeros(16, dtype=torch.uint8), torch.zeros(1, dtype=torch.uint8), torch.int32),
     TypeError, r"dtype must be a float"),
    ("scales_on_meta", lambda: (torch.zeros(16, dtype=torch.uint8), torch.zeros(1, dtype=torch.uint8, device="meta"),
                                torch.float32), ValueError, r"scales are on meta"),
    ("0dim", lambda: (torch.zeros((), dtype=torch.uint8), torch.zeros(1, dtype=torch.uint8), torch.float32),
     ValueError, r"must have a last dim"),
]


@pytest.mark.parametrize("case,args,exc,match", DQ_BAD, ids=[c[0] for c in DQ_BAD])
def test_dequantize_bad_input(case, args, exc, match):
    with pytest.raises(exc, match=match):
        OPS.dequantize(*args())


@pytest.mark.parametrize("byte", [253, 254])
def test_dequantize_largest_scales_documented(byte):
    """Exact where finite in the dtype, +-inf where the true value exceeds it, never NaN."""
    packed = torch.tensor([[0x10 * c + c for c in range(8)] * 2], dtype=torch.uint8)  # codes 0..7
    out = OPS.dequantize(packed, torch.tensor([[byte]], dtype=torch.uint8), torch.float32)[0, 0:16:2]
    exact = [v * 2.0 ** (byte - 127) for v in (0, 0.5, 1, 1.5, 2, 3, 4, 6)]
    assert out.tolist() == [x if x <= torch.finfo(torch.float32).max else math.inf for x in exact]


# ---- from_mxfp4_blocks ------------------------------------------------------------------------------
def _checkpoint():
    g = _g(3)
    q13, s13 = numerics.quantize(torch.randn(2, 128, 64, generator=g))
    q2, s2 = numerics.quantize(torch.randn(2, 64, 64, generator=g))
    return dict(w13_blocks=q13, w13_scales=s13, w13_bias=torch.randn(2, 128, generator=g),
                w2_blocks=q2, w2_scales=s2, w2_bias=torch.randn(2, 64, generator=g))


BLOCKS_BAD = [
    ("w2_bias_narrow", lambda c: {"w2_bias": c["w2_bias"][:, :32]}, ValueError, r"w2_bias must be \[E=2, H=64\]"),
    ("w2_bias_wide", lambda c: {"w2_bias": torch.zeros(2, 96)}, ValueError, r"w2_bias must be \[E=2, H=64\]"),
    ("w13_bias_wide", lambda c: {"w13_bias": torch.zeros(2, 256)}, ValueError, r"w13_bias must be \[E=2, 2I=128\]"),
    ("w13_bias_experts", lambda c: {"w13_bias": c["w13_bias"][:1]}, ValueError, r"w13_bias"),
    ("odd_rows", lambda c: {"w13_blocks": c["w13_blocks"][:, :127], "w13_scales": c["w13_scales"][:, :127]},
     ValueError, r"even number"),
    ("w2_other_H", lambda c: {"w2_blocks": c["w2_blocks"][:, :32], "w2_scales": c["w2_scales"][:, :32]},
     ValueError, r"w2 blocks must be \[E=2, H=64"),
    ("scales_mismatch", lambda c: {"w2_scales": c["w2_scales"][:, :, :1]}, ValueError, r"w2: blocks"),
    ("float_blocks", lambda c: {"w13_blocks": c["w13_blocks"].float()}, TypeError, r"w13_blocks"),
]


@pytest.mark.parametrize("case,change,exc,match", BLOCKS_BAD, ids=[c[0] for c in BLOCKS_BAD])
def test_from_mxfp4_blocks_bad_input(case, change, exc, match):
    ck = _checkpoint()
    ck.update(change(ck))
    with pytest.raises(exc, match=match):
        weights.from_mxfp4_blocks(**ck)


def test_from_mxfp4_blocks_bias_is_a_copy():
    ck = _checkpoint()
    p = weights.from_mxfp4_blocks(**ck)
    before = p.w2_bias.clone()
    ck["w2_bias"].add_(1.0)
    assert torch.equal(p.w2_bias, before)


# ---- routing ----------------------------------------------------------------------------------------
ROUTING_BAD = [
    ("n_group_0", lambda x: routing.deepseek_v3_routing(x, 2, n_group=0), r"n_group must be an int in \[1, E=16\]"),
    ("n_group_not_divisor", lambda x: routing.deepseek_v3_routing(x, 2, n_group=3), r"n_group=3 must divide"),
    ("topk_group_0", lambda x: routing.deepseek_v3_routing(x, 2, n_group=4, topk_group=0), r"topk_group"),
    ("top_k_above_E", lambda x: routing.gpt_oss_routing(x, 17), r"top_k must lie in \[1, E=16\]"),
    ("fused_k_above_E", lambda x: OPS.topk_softmax(x, 17), r"k must lie in \[1, E=16\]"),
    ("int_logits", lambda x: routing.mixtral_routing(x.long(), 2), r"router logits must be a float"),
]


@pytest.mark.parametrize("case,call,match", ROUTING_BAD, ids=[c[0] for c in ROUTING_BAD])
def test_routing_bad_input(case, call, match):
    with pytest.raises(ValueError, match=match):
        call(torch.randn(2, 16, generator=_g(4)))


def test_routing_ties_documented():
    """Ties pick the lower index on CPU as the fused GPU kernel does."""
    w, ids = OPS.topk_softmax(torch.tensor([[0.0, 1.0, 1.0, 1.0, 1.0]]), 2)
    assert ids.tolist() == [[1, 2]]


def test_case_count():
    n = (len(KERNELS) * len(MOE_BAD) - (len(KERNELS) - 1)  # one kernel-name case
         + len(KERNELS) * (len(KERNELS) - 1) + 1 + 2  # other layouts, shapes, other activation
         + (len(KERNELS) - 1) + len(KERNELS) + len(ID_CASES)
         + len(Q_BAD) + 1 + len(DQ_BAD) + 2 + len(BLOCKS_BAD) + 1 + len(ROUTING_BAD) + 1 + 1)
    assert n == CASE_COUNT, f"update CASE_COUNT (and the module docstring) to {n}"
