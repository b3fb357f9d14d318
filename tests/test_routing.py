"""Each router against a straightforward per-token Python loop (float64, sorted lists)."""
import math

import pytest
import torch

from mxfp4_compile import routing


def _logits(T, E, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, E, generator=g) * 2).to(dtype)


def _top(values, k):
    """Indices of the k largest values (ties: lower index first, as torch.topk on distinct floats)."""
    return sorted(range(len(values)), key=lambda i: (-values[i], i))[:k]


def _softmax(v):
    m = max(v)
    ex = [math.exp(x - m) for x in v]
    s = sum(ex)
    return [x / s for x in ex]


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def _check_same(got, want_ids, want_w):
    w, ids = got
    assert ids.dtype == torch.int64 and w.dtype == torch.float32
    assert ids.tolist() == want_ids
    torch.testing.assert_close(w, torch.tensor(want_w, dtype=torch.float32).reshape(ids.shape),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("T,E,k", [(1, 4, 1), (9, 32, 4), (5, 8, 8), (0, 8, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpt_oss(T, E, k, dtype):
    x = _logits(T, E, dtype)
    want_ids, want_w = [], []
    for row in x.double().tolist():
        ids = _top(row, k)
        want_ids.append(ids)
        want_w.append(_softmax([row[i] for i in ids]))
    _check_same(routing.gpt_oss_routing(x, k), want_ids, want_w)


@pytest.mark.parametrize("T,E,k", [(1, 4, 1), (9, 32, 4), (6, 60, 8)])
@pytest.mark.parametrize("norm", [True, False])
def test_qwen3_and_mixtral(T, E, k, norm):
    x = _logits(T, E, seed=1)
    want_ids, want_w = [], []
    for row in x.double().tolist():
        p = _softmax(row)
        ids = _top(p, k)
        w = [p[i] for i in ids]
        if norm:
            w = [v / sum(w) for v in w]
        want_ids.append(ids)
        want_w.append(w)
    _check_same(routing.qwen3_routing(x, k, norm_topk_prob=norm), want_ids, want_w)
    if norm:
        _check_same(routing.mixtral_routing(x, k), want_ids, want_w)


def _deepseek_loop(x, k, bias, n_group, topk_group, norm, scale):
    E = x.shape[1]
    size = E // n_group
    want_ids, want_w = [], []
    for row in x.double().tolist():
        s = [_sigmoid(v) for v in row]
        b = [s[i] + (0.0 if bias is None else float(bias[i])) for i in range(E)]
        gscore = []
        for g in range(n_group):
            members = sorted(b[g * size:(g + 1) * size], reverse=True)
            gscore.append(sum(members[:2]))
        groups = set(_top(gscore, topk_group))
        cand = [b[i] if i // size in groups else -math.inf for i in range(E)]
        ids = _top(cand, k)
        w = [s[i] for i in ids]
        if norm:
            tot = sum(w) + 1e-20
            w = [v / tot for v in w]
        want_ids.append(ids)
        want_w.append([v * scale for v in w])
    return want_ids, want_w


@pytest.mark.parametrize("T,E,k,n_group,topk_group", [
    (7, 16, 4, 4, 2), (1, 8, 2, 1, 1), (5, 64, 8, 8, 4), (4, 12, 3, 3, 1)])
@pytest.mark.parametrize("norm,scale", [(True, 2.5), (False, 1.0)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_deepseek_v3(T, E, k, n_group, topk_group, norm, scale, with_bias):
    x = _logits(T, E, seed=2)
    # a bias large enough to change which experts (and groups) win: selection-only
    bias = torch.randn(E, generator=torch.Generator().manual_seed(3)) if with_bias else None
    want_ids, want_w = _deepseek_loop(x, k, bias, n_group, topk_group, norm, scale)
    got = routing.deepseek_v3_routing(x, k, bias, n_group=n_group, topk_group=topk_group,
                                      norm_topk_prob=norm, routed_scaling_factor=scale)
    _check_same(got, want_ids, want_w)


def test_deepseek_bias_selects_but_does_not_weight():
    x = torch.zeros(3, 8)
    bias = torch.zeros(8)
    bias[5] = 10.0  # expert 5 always chosen, but weighted by its unbiased sigmoid (0.5)
    w, ids = routing.deepseek_v3_routing(x, 1, bias, norm_topk_prob=False)
    assert ids.flatten().tolist() == [5, 5, 5]
    torch.testing.assert_close(w, torch.full((3, 1), 0.5))


@pytest.mark.parametrize("fn", [routing.gpt_oss_routing, routing.qwen3_routing,
                                routing.mixtral_routing, routing.deepseek_v3_routing])
def test_bad_top_k(fn):
    with pytest.raises(ValueError, match="top_k"):
        fn(torch.randn(2, 4), 5)
    with pytest.raises(ValueError, match="logits"):
        fn(torch.randint(0, 3, (2, 4)), 1)


def test_deepseek_bad_groups():
    with pytest.raises(ValueError, match="n_group"):
        routing.deepseek_v3_routing(torch.randn(2, 10), 2, n_group=4, topk_group=1)
    with pytest.raises(ValueError, match="topk_group"):
        routing.deepseek_v3_routing(torch.randn(2, 16), 2, n_group=4, topk_group=5)
    with pytest.raises(ValueError, match="top_k"):
        routing.deepseek_v3_routing(torch.randn(2, 16), 6, n_group=4, topk_group=1)


@pytest.mark.parametrize("n_group", [0, -2, 17, 2.0, None])
def test_deepseek_n_group_out_of_range(n_group):
    """n_group=0 was a ZeroDivisionError; every n_group outside [1, E] is a ValueError."""
    with pytest.raises(ValueError, match=r"n_group must be an int in \[1, E=16\]"):
        routing.deepseek_v3_routing(torch.randn(2, 16), 2, n_group=n_group, topk_group=1)
    with pytest.raises(ValueError, match="topk_group"):
        routing.deepseek_v3_routing(torch.randn(2, 16), 2, n_group=4, topk_group=0)


def test_routers_break_ties_towards_the_lower_index():
    x = torch.tensor([[1.0, 2.0, 2.0, 2.0, 2.0, 0.0]])
    for fn in (routing.gpt_oss_routing, routing.mixtral_routing, routing.qwen3_routing):
        assert fn(x, 2)[1].tolist() == [[1, 2]]
