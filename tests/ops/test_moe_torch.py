"""The reference MoE against an independent float64 loop over tokens and top-k slots.

The loop dequantizes the canonical MXFP4 weights with its own table (not mxfp4_compile.numerics)
and follows the contract literally: e = ids[t, s] (mapped through expert_map; -1 -> zero row),
h = W13[e] x_t + b13[e], a = act(h), y = W2[e] a + b2[e], out[t] += w[t, s] * y.
"""
import math

import pytest
import torch

import mxfp4_compile  # noqa: F401
from mxfp4_compile.formats import SWIGLU_ALPHA, SWIGLU_LIMIT
from mxfp4_compile.ops.kernels import reference_moe
from mxfp4_compile.ops.moe_torch import moe_torch

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def dequant64(packed, scales):
    """Own float64 dequantization: low nibble = even element, 2**(byte-127) per 32 elements."""
    lut = torch.tensor(E2M1, dtype=torch.float64)
    codes = torch.stack((packed % 16, packed // 16), dim=-1).flatten(-2).long()
    scale = torch.exp2(scales.double() - 127).repeat_interleave(32, dim=-1)
    return lut[codes] * scale


def act64(h, activation, alpha, limit):
    if activation == "swiglu_oai":
        gate, up = h[0::2], h[1::2]
        gate = torch.clamp(gate, max=limit)
        up = torch.clamp(up, -limit, limit)
        return gate / (1 + torch.exp(-alpha * gate)) * (up + 1)
    n = h.shape[0] // 2
    gate, up = h[:n], h[n:]
    return gate / (1 + torch.exp(-gate)) * up


def moe_loop64(hidden, ids, weights, w13, s13, b13, w2, s2, b2, activation, alpha=SWIGLU_ALPHA,
               limit=SWIGLU_LIMIT, expert_map=None, combine=True, stats=None):
    T, H = hidden.shape
    k = ids.shape[1]
    Hp = w13.shape[2] * 2
    out = torch.zeros(T, k, H, dtype=torch.float64)
    for t in range(T):
        x = torch.zeros(Hp, dtype=torch.float64)
        x[:H] = hidden[t].double()
        for s in range(k):
            e = int(ids[t, s])
            if expert_map is not None:
                e = int(expert_map[e])
                if e < 0:
                    continue
            h = dequant64(w13[e], s13[e]) @ x
            if b13 is not None:
                h = h + b13[e].double()
            if stats is not None:
                g, u = (h[0::2], h[1::2]) if activation == "swiglu_oai" else h.chunk(2)
                stats["gate_clamped"] += int((g > limit).sum())
                stats["up_clamped"] += int((u.abs() > limit).sum())
                stats["unclamped"] += int((g.abs() < limit).sum())
            y = dequant64(w2[e], s2[e]) @ act64(h, activation, alpha, limit)
            if b2 is not None:
                y = y + b2[e].double()
            out[t, s] = y[:H]
    if not combine:
        return out
    return (out * weights.double().unsqueeze(-1)).sum(dim=1)


def random_weights(E, Hp, Ip, bias, seed, big=False):
    """Random canonical MXFP4 weights (every code, scales around 2**-4..2**0; ``big`` raises the
    w13 scales so many pre-activations pass the swiglu limit)."""
    g = torch.Generator().manual_seed(seed)
    lo = 124 if big else 118
    w13 = torch.randint(0, 256, (E, 2 * Ip, Hp // 2), generator=g, dtype=torch.uint8)
    s13 = torch.randint(lo, lo + 4, (E, 2 * Ip, Hp // 32), generator=g, dtype=torch.uint8)
    w2 = torch.randint(0, 256, (E, Hp, Ip // 2), generator=g, dtype=torch.uint8)
    s2 = torch.randint(118, 122, (E, Hp, Ip // 32), generator=g, dtype=torch.uint8)
    b13 = torch.randn(E, 2 * Ip, generator=g) if bias else None
    b2 = torch.randn(E, Hp, generator=g) if bias else None
    return w13, s13, b13, w2, s2, b2


def routing(T, k, n_experts, seed, ids_dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(n_experts, generator=g)[:k] for _ in range(T)]) if T else \
        torch.empty(0, k, dtype=torch.int64)
    w = torch.softmax(torch.randn(T, k, generator=g), dim=-1)
    return ids.to(ids_dtype), w


def assert_rel(got, want, tol=1e-5):
    assert got.shape == want.shape
    scale = want.abs().max().item() if want.numel() else 1.0
    err = (got.double() - want).abs().max().item() if want.numel() else 0.0
    assert err <= tol * max(scale, 1e-30), f"max abs err {err:.3e} vs max |want| {scale:.3e}"


CASES = {  # name: (T, k, E, H, Hp, I, Ip)
    "pow2": (7, 2, 4, 64, 64, 64, 64),
    "odd_sizes": (5, 3, 5, 96, 96, 160, 160),
    "padded": (6, 2, 4, 80, 128, 40, 64),
    "T1": (1, 4, 6, 32, 32, 32, 32),
}


@pytest.mark.parametrize("sync_free", [False, True])
@pytest.mark.parametrize("activation", ["swiglu_oai", "silu_glu"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", list(CASES))
def test_reference_vs_loop(case, bias, activation, sync_free):
    T, k, E, H, Hp, I, Ip = CASES[case]
    wts = random_weights(E, Hp, Ip, bias, seed=len(case) + 10 * bias)
    ids, w = routing(T, k, E, seed=3, ids_dtype=torch.int32 if bias else torch.int64)
    hidden = torch.randn(T, H, generator=torch.Generator().manual_seed(5))
    got = moe_torch(hidden, ids, w, *wts, activation=activation, sync_free=sync_free)
    assert got.dtype == torch.float32
    assert_rel(got, moe_loop64(hidden, ids, w, *wts, activation))
    if not sync_free:  # the op on CPU (default path), on the reference kernel's pairs, the same
        pairs = reference_moe.prepare(*wts, activation)
        assert pairs[0].shape == (E, Ip, 2, Hp // 2)
        op = torch.ops.mxfp4.moe(hidden, ids, w, *pairs, kernel="reference", activation=activation)
        assert_rel(op, got, 1e-6)  # silu_glu's rows permuted: the GEMM may round differently


@pytest.mark.parametrize("sync_free", [False, True])
@pytest.mark.parametrize("activation", ["swiglu_oai", "silu_glu"])
def test_clamp_exercised(activation, sync_free):
    """Pre-activations far past the limit (and a non-default alpha/limit): the clamps decide."""
    T, k, E, H, I = 8, 2, 3, 64, 64
    wts = random_weights(E, H, I, bias=True, seed=9, big=True)
    ids, w = routing(T, k, E, seed=4)
    hidden = torch.randn(T, H, generator=torch.Generator().manual_seed(6)) * 4
    stats = {"gate_clamped": 0, "up_clamped": 0, "unclamped": 0}
    for alpha, limit in ((SWIGLU_ALPHA, SWIGLU_LIMIT), (1.0, 3.0)):
        want = moe_loop64(hidden, ids, w, *wts, activation, alpha, limit, stats=stats)
        got = moe_torch(hidden, ids, w, *wts, activation=activation, alpha=alpha, limit=limit,
                            sync_free=sync_free)
        assert_rel(got, want)
    assert stats["gate_clamped"] > 50 and stats["up_clamped"] > 50 and stats["unclamped"] > 50
    if activation == "swiglu_oai":  # the limit matters: an unclamped swiglu is far off
        no_clamp = moe_loop64(hidden, ids, w, *wts, activation, SWIGLU_ALPHA, math.inf)
        assert (no_clamp - moe_loop64(hidden, ids, w, *wts, activation)).abs().max() > 1.0


@pytest.mark.parametrize("sync_free", [False, True])
@pytest.mark.parametrize("combine", [True, False])
def test_expert_map_and_combine(combine, sync_free):
    """8 global experts, 3 on this rank; ids hitting other ranks' experts give zero rows."""
    T, k, H, I = 9, 3, 64, 96
    expert_map = torch.tensor([-1, 0, -1, 2, 1, -1, -1, -1], dtype=torch.int32)
    wts = random_weights(3, H, I, bias=True, seed=12)
    ids, w = routing(T, k, 8, seed=13)
    hidden = torch.randn(T, H, generator=torch.Generator().manual_seed(14))
    got = moe_torch(hidden, ids, w, *wts, activation="swiglu_oai", expert_map=expert_map,
                        combine=combine, sync_free=sync_free)
    want = moe_loop64(hidden, ids, w, *wts, "swiglu_oai", expert_map=expert_map, combine=combine)
    assert_rel(got, want)
    if not combine:
        assert got.shape == (T, k, H)
        off_rank = expert_map[ids.long()] < 0
        assert off_rank.any() and (~off_rank).any()
        assert (got[off_rank] == 0).all() and (got[~off_rank] != 0).any()


@pytest.mark.parametrize("sync_free", [False, True])
@pytest.mark.parametrize("combine", [True, False])
def test_T0(combine, sync_free):
    wts = random_weights(4, 64, 64, bias=True, seed=1)
    hidden = torch.empty(0, 64)
    ids, w = torch.empty(0, 2, dtype=torch.int64), torch.empty(0, 2)
    got = moe_torch(hidden, ids, w, *wts, combine=combine, sync_free=sync_free)
    assert got.shape == ((0, 64) if combine else (0, 2, 64))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_hidden(dtype):
    """bf16/fp16 hidden: output in that dtype, equal to the float32 math rounded once."""
    T, k, E, H, I = 4, 2, 4, 64, 64
    wts = random_weights(E, H, I, bias=True, seed=2)
    ids, w = routing(T, k, E, seed=2)
    hidden = torch.randn(T, H, generator=torch.Generator().manual_seed(2)).to(dtype)
    got = moe_torch(hidden, ids, w.to(dtype), *wts)
    assert got.dtype == dtype
    want = moe_torch(hidden.float(), ids, w.to(dtype).float(), *wts)
    assert torch.equal(got, want.to(dtype))


@pytest.mark.parametrize("sync_free", [False, True])
def test_repeated_ids(sync_free):
    """An expert picked twice for one token counts twice (the contract sums over slots)."""
    T, k, E, H, I = 5, 3, 3, 64, 64
    wts = random_weights(E, H, I, bias=True, seed=15)
    ids = torch.randint(0, E, (T, k), generator=torch.Generator().manual_seed(16))
    ids[0] = 1  # all three slots on one expert
    w = torch.rand(T, k, generator=torch.Generator().manual_seed(17))
    hidden = torch.randn(T, H, generator=torch.Generator().manual_seed(18))
    for combine in (True, False):
        got = moe_torch(hidden, ids, w, *wts, combine=combine, sync_free=sync_free)
        assert_rel(got, moe_loop64(hidden, ids, w, *wts, "swiglu_oai", combine=combine))
