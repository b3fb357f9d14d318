"""The "flashinfer" kernel, on CPU: the pure-torch preparation (row-pair swap, the documented
shuffle permutation), the packed top-k format, the expert-map handling, API detection, and the
kernel call's arguments against a stand-in flashinfer module. The real kernel is unverified on
hardware (no sm100 GPU here); nothing in this file runs it.
"""
from __future__ import annotations

import enum
import importlib.machinery
import sys
import types

import pytest
import torch

from mxfp4_compile.formats import SWIGLU_ALPHA, SWIGLU_LIMIT
from mxfp4_compile.ops.kernels import flashinfer_moe as fim


@pytest.fixture(autouse=True)
def _fresh_cache():
    fim.API.cache_clear()
    yield
    fim.API.cache_clear()


# ---- row-pair swap and gate/up order --------------------------------------------------------------------
def test_swap_row_pairs_is_an_involution_and_moves_each_row_to_its_partner():
    t = torch.arange(3 * 8 * 5).reshape(3, 8, 5)
    s = fim.swap_row_pairs(t, 1)
    assert torch.equal(s[:, 0::2], t[:, 1::2]) and torch.equal(s[:, 1::2], t[:, 0::2])
    assert torch.equal(fim.swap_row_pairs(s, 1), t)
    b = torch.arange(6.0).reshape(1, 6)
    assert fim.swap_row_pairs(b, 1).tolist() == [[1, 0, 3, 2, 5, 4]]


@pytest.mark.parametrize("activation", ["swiglu_oai", "silu_glu"])
def test_to_trtllm_gate_up_puts_up_on_even_rows_and_inverts(activation):
    n = 4  # gate/up rows per expert
    gate = torch.arange(n) * 10 + 1  # row values name the row: gate_j = 10j+1, up_j = 10j+2
    up = torch.arange(n) * 10 + 2
    if activation == "swiglu_oai":
        canon = torch.stack((gate, up), dim=1).flatten()  # (gate, up) pairs
    else:
        canon = torch.cat((gate, up))  # [gate; up]
    t = canon.reshape(1, 2 * n, 1).expand(2, 2 * n, 3).contiguous()  # [E, rows, K]
    out = fim.to_trtllm_gate_up(t, 1, activation)
    assert torch.equal(out[0, 0::2, 0], up) and torch.equal(out[0, 1::2, 0], gate)
    assert torch.equal(fim.from_trtllm_gate_up(out, 1, activation), t)
    b = canon.reshape(1, -1).float()  # biases move with their rows
    assert torch.equal(fim.to_trtllm_gate_up(b, 1, activation)[0, 0::2], up.float())


def test_prepare_unshuffled_rows_scales_and_bias_move_together():
    E, Hp, Ip = 2, 256, 256
    g = torch.Generator().manual_seed(0)
    w13 = torch.randint(0, 256, (E, 2 * Ip, Hp // 2), dtype=torch.uint8, generator=g)
    s13 = torch.randint(100, 140, (E, 2 * Ip, Hp // 32), dtype=torch.uint8, generator=g)
    b13 = torch.randn(E, 2 * Ip, generator=g, dtype=torch.bfloat16)
    w2 = torch.randint(0, 256, (E, Hp, Ip // 2), dtype=torch.uint8, generator=g)
    s2 = torch.randint(100, 140, (E, Hp, Ip // 32), dtype=torch.uint8, generator=g)
    b2 = torch.randn(E, Hp, generator=g)
    out = fim.prepare_unshuffled(w13, s13, b13, w2, s2, b2, "swiglu_oai")
    shapes = fim.prepared_shapes(E, Hp, Ip, "swiglu_oai", True, True)
    for t, (shape, dtype) in zip(out, shapes):
        assert (tuple(t.shape), t.dtype) == (shape, dtype) and t.is_contiguous()
    assert torch.equal(out[0][:, 2 * 5], w13[:, 2 * 5 + 1])  # up_5 now at row 10
    assert torch.equal(out[1][:, 2 * 5 + 1], s13[:, 2 * 5])  # gate_5's scales at row 11
    assert torch.equal(out[2][:, 2 * 5], b13[:, 2 * 5 + 1].float())
    assert torch.equal(out[3], w2) and torch.equal(out[4], s2) and torch.equal(out[5], b2)


def test_padding_and_shapes_are_checked():
    with pytest.raises(ValueError, match="256"):
        fim.prepared_shapes(2, 2880, 2944, "swiglu_oai", True, True)
    w13 = torch.zeros(1, 512, 128, dtype=torch.uint8)
    with pytest.raises(ValueError, match="w2"):
        fim.prepare_unshuffled(w13, torch.zeros(1, 512, 8, dtype=torch.uint8), None,
                               torch.zeros(1, 256, 64, dtype=torch.uint8),
                               torch.zeros(1, 256, 8, dtype=torch.uint8), None, "swiglu_oai")


# ---- the shuffle permutation, as FlashInfer documents it ----------------------------------------------------
@pytest.mark.parametrize("M", [32, 256, 5760])
def test_shuffle_a_row_indices_is_the_documented_block_permutation(M):
    idx = fim.shuffle_a_row_indices(M, 128)
    assert sorted(idx.tolist()) == list(range(M))  # a permutation
    inv = torch.empty_like(idx)
    inv[idx] = torch.arange(M)
    x = torch.arange(M)
    assert torch.equal(x[idx][inv], x)  # invertible
    # source row i of a 32-row block lands at position map[i] of that block
    for old in [0, 1, 7, 8, 31] + ([33, 63, 100] if M > 64 else []):
        blk, i = divmod(old, 32)
        new = blk * 32 + fim._BLK32[i]
        assert idx[new].item() == old
    assert idx[:8].tolist() == [0, 4, 8, 12, 16, 20, 24, 28]  # out[1] = in[4], out[8] = in[1]
    assert idx[8].item() == 1


def test_shuffle_a_row_indices_16_row_blocks_and_errors():
    idx = fim.shuffle_a_row_indices(32, 64)
    assert idx[:4].tolist() == [0, 2, 4, 6] and idx[8].item() == 1
    with pytest.raises(ValueError, match="rows % 32"):
        fim.shuffle_a_row_indices(48, 128)


# ---- top-k packing and expert map -------------------------------------------------------------------------------
def test_pack_topk_layout_and_roundtrip():
    ids = torch.tensor([[0, 3], [127, 1], [5, 2]], dtype=torch.int64)
    w = torch.tensor([[1.0, 0.5], [0.25, -2.0], [3.0e-3, 0.0]])
    p = fim.pack_topk(ids, w)
    assert p.dtype == torch.int32 and p.is_contiguous()
    assert p[0, 0].item() == (0 << 16) | 0x3F80  # bf16(1.0) = 0x3F80 in the low half
    assert p[1, 0].item() == (127 << 16) | 0x3E80  # bf16(0.25)
    assert (p[1, 1].item() & 0xFFFF) == 0xC000  # bf16(-2.0): sign bit kept, id not clobbered
    assert (p[1, 1].item() >> 16) == 1
    i2, w2 = fim.unpack_topk(p)
    assert torch.equal(i2, ids.to(torch.int32)) and torch.equal(w2, w.to(torch.bfloat16))


def test_flashinfer_ids_expert_map_uses_a_phantom_expert():
    ids = torch.tensor([[0, 5], [7, 2]])
    emap = torch.tensor([-1, -1, 0, 1, -1, 2, 3, -1], dtype=torch.int32)  # 8 global, 4 local
    got, n = fim.flashinfer_ids(ids, emap, 4)
    assert got.tolist() == [[4, 2], [4, 0]] and n == 8 and got.dtype == torch.int32
    got, n = fim.flashinfer_ids(ids, None, 8)
    assert torch.equal(got, ids.to(torch.int32)) and n == 8
    got, n = fim.flashinfer_ids(torch.tensor([[1]]), torch.tensor([0, -1], dtype=torch.int32), 2)
    assert got.tolist() == [[2]] and n == 3  # a map no longer than E still leaves room


def test_activation_env(monkeypatch):
    monkeypatch.delenv(fim.ACT_ENV, raising=False)
    assert fim.activation_dtype() == "bf16"
    monkeypatch.setenv(fim.ACT_ENV, "MXFP8")
    assert fim.activation_dtype() == "mxfp8"
    monkeypatch.setenv(fim.ACT_ENV, "fp4")
    with pytest.raises(ValueError, match=fim.ACT_ENV):
        fim.activation_dtype()


# ---- availability and API detection -----------------------------------------------------------------------------
def test_cpu_is_unavailable():
    assert "CUDA" in fim.unavailable_reason(torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] == 10,
                    reason="needs a non-sm100 GPU")
def test_non_blackwell_is_unavailable():
    assert "sm100" in fim.unavailable_reason(torch.device("cuda"))


def test_missing_flashinfer_reason(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a, **k: None if n == "flashinfer" else real(n, *a, **k))
    err = fim.API.reason()
    assert "not installed" in err and "flashinfer-python" in err
    with pytest.raises(fim.FlashInferUnavailable, match="cannot run"):
        fim.moe(torch.zeros(1, 8), torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1),
                *([None] * 6), "swiglu_oai", SWIGLU_ALPHA, SWIGLU_LIMIT, None, True)


def test_signature_check():
    def ok(topk_ids, routing_bias, hidden_states, hidden_states_scale, gemm1_weights,
           gemm1_weights_scale, gemm1_bias, gemm1_alpha, gemm1_beta, gemm1_clamp_limit,
           gemm2_weights, gemm2_weights_scale, gemm2_bias, output1_scale_scalar,
           output1_scale_gate_scalar, output2_scale_scalar, num_experts, top_k, n_group,
           topk_group, intermediate_size, local_expert_offset, local_num_experts,
           routed_scaling_factor, routing_method_type=0, do_finalize=True, enable_pdl=None,
           activation_type=3, output=None, hidden_states_scale_layout=None):
        pass

    assert fim.check_signature(ok) is None

    def old(topk_ids, routing_bias, hidden_states, hidden_states_scale, gemm1_weights,
            gemm1_weights_scale, gemm1_bias, gemm1_alpha, gemm1_beta, gemm1_clamp_limit,
            gemm2_weights, gemm2_weights_scale, gemm2_bias, output1_scale_scalar,
            output1_scale_gate_scalar, output2_scale_scalar, num_experts, top_k, n_group,
            topk_group, intermediate_size, local_expert_offset, local_num_experts,
            routed_scaling_factor, tile_tokens_dim, routing_method_type=0, do_finalize=True,
            activation_type=3, hidden_states_scale_layout=None):
        pass

    assert "tile_tokens_dim" in fim.check_signature(old)

    def no_layout(topk_ids, **_ignored):
        pass

    assert fim.check_signature(no_layout) is None  # **kwargs: the call itself will tell

    def missing(topk_ids, hidden_states):
        pass

    assert "no parameter" in fim.check_signature(missing)


# ---- the call, against a stand-in flashinfer --------------------------------------------------------------------
class _Routing(enum.IntEnum):
    Default = 0
    Renormalize = 1
    TopK = 5


class _Act(enum.IntEnum):
    Swiglu = 3


class _Sf(enum.IntEnum):
    layout_128x4 = 0
    layout_linear = 2


def _fake_flashinfer(calls):
    """A stand-in with the real names: identity shuffles, and a 'kernel' that undoes our layout
    (up/gate pairs, packed top-k, phantom expert) and runs the reference MoE, so the test checks
    that the arguments say what we mean."""
    from mxfp4_compile.ops.moe_torch import moe_torch

    def kernel(topk_ids, routing_bias, hidden_states, hidden_states_scale, gemm1_weights,
               gemm1_weights_scale, gemm1_bias, gemm1_alpha, gemm1_beta, gemm1_clamp_limit,
               gemm2_weights, gemm2_weights_scale, gemm2_bias, output1_scale_scalar,
               output1_scale_gate_scalar, output2_scale_scalar, num_experts, top_k, n_group,
               topk_group, intermediate_size, local_expert_offset, local_num_experts,
               routed_scaling_factor, routing_method_type=0, do_finalize=True, enable_pdl=None,
               activation_type=3, per_token_scale=None, output=None, tune_max_num_tokens=8192,
               gemm1_lora_delta=None, valid_hidden_size=None, valid_intermediate_size=None,
               num_fused_shared_experts=None, hidden_states_scale_layout=None):
        calls.append(dict(locals()))
        assert topk_ids.dtype == torch.int32 and topk_ids.shape[1] == top_k
        assert gemm1_weights_scale.dtype == torch.float8_e4m3fn
        assert gemm2_weights_scale.dtype == torch.float8_e4m3fn
        assert routing_method_type == 5 and do_finalize and activation_type == 3
        assert intermediate_size * 2 == gemm1_weights.shape[1]
        assert hidden_states.shape[1] == gemm1_weights.shape[2] * 2
        act = "swiglu_oai" if gemm1_alpha is not None else "silu_glu"
        ids, w = fim.unpack_topk(topk_ids)
        E = local_num_experts
        emap = torch.arange(num_experts, dtype=torch.int32)
        emap[E:] = -1
        u8 = torch.uint8
        out = moe_torch(
            hidden_states.float(), ids, w.float(),
            fim.from_trtllm_gate_up(gemm1_weights, 1, act),
            fim.from_trtllm_gate_up(gemm1_weights_scale.view(u8), 1, act),
            None if gemm1_bias is None else fim.from_trtllm_gate_up(gemm1_bias, 1, act),
            gemm2_weights, gemm2_weights_scale.view(u8), gemm2_bias, act,
            SWIGLU_ALPHA if gemm1_alpha is None else gemm1_alpha[0].item(),
            SWIGLU_LIMIT if gemm1_clamp_limit is None else gemm1_clamp_limit[0].item(), emap, True)
        return [out.to(torch.bfloat16)]

    m = types.ModuleType("flashinfer")
    m.__spec__ = importlib.machinery.ModuleSpec("flashinfer", None)
    m.__version__ = "0.7.2.post1"
    m.trtllm_fp4_block_scale_routed_moe = kernel
    m.shuffle_matrix_a = lambda x, tm: x
    m.shuffle_matrix_sf_a = lambda x, tm, num_elts_per_sf=16: x.reshape(-1)
    m.mxfp8_quantize = None
    m.RoutingMethodType, m.ActivationType, m.SfLayout = _Routing, _Act, _Sf
    u = types.ModuleType("flashinfer.utils")
    u.__spec__ = importlib.machinery.ModuleSpec("flashinfer.utils", None)
    u.get_shuffle_matrix_a_row_indices = lambda x, tm: fim.shuffle_a_row_indices(x.shape[0], tm)
    return m, u


@pytest.fixture
def fake_fi(monkeypatch):
    calls = []
    m, u = _fake_flashinfer(calls)
    monkeypatch.setitem(sys.modules, "flashinfer", m)
    monkeypatch.setitem(sys.modules, "flashinfer.utils", u)
    return calls


def _canonical(E, H, I, activation, seed=0):
    from mxfp4_compile import numerics
    g = torch.Generator().manual_seed(seed)
    q13 = numerics.quantize(torch.randn(E, 2 * I, H, generator=g) / H ** 0.5)
    q2 = numerics.quantize(torch.randn(E, H, I, generator=g) / I ** 0.5)
    return (q13[0], q13[1], torch.randn(E, 2 * I, generator=g) * 0.1,
            q2[0], q2[1], torch.randn(E, H, generator=g) * 0.1)


@pytest.mark.slow
@pytest.mark.parametrize("activation", ["swiglu_oai", "silu_glu"])
@pytest.mark.parametrize("combine", [True, False])
@pytest.mark.parametrize("use_map", [False, True])
def test_call_arguments_mean_what_we_mean(fake_fi, activation, combine, use_map):
    from mxfp4_compile.ops.moe_torch import moe_torch
    E, H, I, k, T = 4, 256, 256, 2, 5
    canon = _canonical(E, H, I, activation)
    assert fim.API.reason() is None
    prepared = fim.prepare_unshuffled(*canon, activation)  # the stand-in's shuffles are identity
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, H, generator=g).to(torch.bfloat16)
    E_glob = 6 if use_map else E
    ids = torch.stack([torch.randperm(E_glob, generator=g)[:k] for _ in range(T)])
    w = torch.rand(T, k, generator=g)
    emap = None
    if use_map:
        emap = torch.tensor([0, -1, 1, 2, -1, 3], dtype=torch.int32)
    out = fim.moe(x, ids, w, *prepared, activation, SWIGLU_ALPHA, SWIGLU_LIMIT, emap, combine)
    ref = moe_torch(x, ids, w.to(torch.bfloat16).float(), *canon, activation, SWIGLU_ALPHA, SWIGLU_LIMIT,
                        emap, combine)
    assert out.shape == ref.shape and out.dtype == x.dtype
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert err < 1e-2, err
    call = fake_fi[-1]
    assert set(fim.CALL_PARAMS) <= set(call)
    assert call["top_k"] == (k if combine else 1)
    assert call["num_experts"] == E_glob and call["local_num_experts"] == E
    assert call["hidden_states_scale"] is None and call["hidden_states_scale_layout"] is None
    if activation == "swiglu_oai":
        assert call["gemm1_alpha"].tolist() == pytest.approx([SWIGLU_ALPHA] * E)
        assert call["gemm1_beta"].tolist() == [1.0] * E
        assert call["gemm1_clamp_limit"].tolist() == [SWIGLU_LIMIT] * E
    else:
        assert call["gemm1_alpha"] is None and call["gemm1_beta"] is None


@pytest.mark.slow
def test_prepare_needs_cuda_weights(fake_fi):
    canon = _canonical(1, 256, 256, "swiglu_oai")
    with pytest.raises(fim.FlashInferUnavailable, match="CUDA"):
        fim.prepare(*canon, "swiglu_oai")


@pytest.mark.slow
def test_empty_batch(fake_fi):
    prepared = fim.prepare_unshuffled(*_canonical(2, 256, 256, "swiglu_oai"), "swiglu_oai")
    x = torch.zeros(0, 200, dtype=torch.bfloat16)
    out = fim.moe(x, torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2), *prepared,
                  "swiglu_oai", SWIGLU_ALPHA, SWIGLU_LIMIT, None, False)
    assert out.shape == (0, 2, 200) and not fake_fi
