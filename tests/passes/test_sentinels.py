"""Expert-parallel sentinel guards (passes/sentinels.py): the clamps and masks that are the identity
on ids in [0, E) are recognised; others are not."""
import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from mxfp4_compile.passes.sentinels import id_clamp_source, sentinel_fill_source, strip_ids

E = 4


def _last(fn, *args):
    gm = make_fx(fn, tracing_mode="fake")(*args)
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return phs, [n for n in gm.graph.nodes if n.op == "call_function"][-1]


def ids():
    return torch.randint(0, E, (3, 2))


@pytest.mark.parametrize("fn,identity", [
    (lambda i: i.clamp_max(E - 1), True),
    (lambda i: i.clamp(0, E - 1), True),
    (lambda i: i.clamp_min(0), True),
    (lambda i: i.clamp_max(E - 2), False),   # drops the last expert
    (lambda i: i.clamp(1, E - 1), False),
])
def test_id_clamp_source(fn, identity):
    (ph,), n = _last(fn, ids())
    assert (id_clamp_source(n, E) is ph) == identity


def test_strip_ids_walks_views_and_clamps():
    (ph,), n = _last(lambda i: i.view(-1).clamp_max(E - 1).view(3, 2), ids())
    chain, clamps = strip_ids(n, E)
    assert chain[-1] is ph and len(clamps) == 1


@pytest.mark.parametrize("fn,identity", [
    (lambda i, x: torch.where((i >= E).unsqueeze(-1), 0.0, x), True),
    (lambda i, x: x.masked_fill((i > E - 1).unsqueeze(-1), 0.0), True),
    (lambda i, x: torch.where((i >= E - 1).unsqueeze(-1), 0.0, x), False),  # masks a real expert
])
def test_sentinel_fill_source(fn, identity):
    (i, x), n = _last(fn, ids(), torch.randn(3, 2, 5))
    assert (sentinel_fill_source(n, {i}, E) is x) == identity
