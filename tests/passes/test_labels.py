"""Dimension labels (passes/labels.py) on small graphs: through merges, splits, permutes and
size-1 dims."""
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from mxfp4_compile.passes.labels import Labels


def trace(fn, *shapes):
    return make_fx(fn, tracing_mode="fake")(*[torch.randn(s) for s in shapes])


def nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function"]


def test_labels_follow_merge_split_permute():
    gm = trace(lambda w: w.permute(0, 3, 1, 2).reshape(3, 5, 2 * 7).view(3, 5, 2, 7).permute(0, 2, 3, 1),
               (3, 2, 7, 5))
    ph = next(n for n in gm.graph.nodes if n.op == "placeholder")
    lab = Labels(roots={}, sizes={"T": 3, "S": 2, "N": 7, "K": 5})
    lab.set_root(ph, (("T",), ("S",), ("N",), ("K",)))
    assert lab.of(nodes(gm)[-1]) == (("T",), ("S",), ("N",), ("K",))
    assert lab.of(nodes(gm)[1]) == (("T",), ("K",), ("S", "N"))


def test_labels_drop_size_one_dims():
    gm = trace(lambda w: w.permute(3, 1, 2, 0).reshape(1, 5, 14), (1, 2, 7, 5))
    ph = next(n for n in gm.graph.nodes if n.op == "placeholder")
    lab = Labels(roots={}, sizes={"T": 1, "S": 2, "N": 7, "K": 5})
    lab.set_root(ph, (("T",), ("S",), ("N",), ("K",)))
    assert lab.of(nodes(gm)[-1]) == ((), ("K",), ("S", "N"))


def test_labels_reject_a_regroup_that_splits_an_atom():
    gm = trace(lambda w: w.reshape(3, 7, 2), (3, 2, 7))
    ph = next(n for n in gm.graph.nodes if n.op == "placeholder")
    lab = Labels(roots={}, sizes={"T": 3, "S": 2, "N": 7})
    lab.set_root(ph, (("T",), ("S",), ("N",)))
    assert lab.of(nodes(gm)[-1]) is None
