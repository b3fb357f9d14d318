"""Dimension labels: what each tensor dimension means, tracked through the graph.

Shape legend: T tokens, k experts per token (slots, label "S"), E experts, H hidden, N = 2I gate/up
rows, I intermediate, R rows sorted by expert (grouped forms).

Every MoE form computes, for each (token t, slot s) pair, y = W2[e] act(W13[e] x_t) and then
out[t] = sum_s w[t, s] y. The forms differ in how they lay the (t, s) pairs out in memory (gathered
weights, sorted rows, every expert on every token), so the matchers do not compare node sequences:
they track *what each tensor dimension means* ("labels") from a few roots (hidden [T, H],
topk ids [T, k], the expert weights [E, ., .]) through views, permutes, gathers and GEMMs, and accept
a region only when the labels prove it computes the op's math.
"""
from __future__ import annotations

import dataclasses
import itertools
import math

import torch.fx as fx

from .fx_utils import GEMM_OPS, aten, is_view, prims, same, shape


# A label is a tuple of atomic names (merged dims keep the order of their parts); () = a size-1 dim.
# Atomic names starting with "*" are broadcast dims (expand): they match any name of the same size.
@dataclasses.dataclass
class Labels:
    roots: dict                          # node -> tuple of per-dim labels
    sizes: dict                          # atomic name -> size
    rules: dict = dataclasses.field(default_factory=dict)   # node -> callable(node, labels) -> labels
    memo: dict = dataclasses.field(default_factory=dict)
    contracted: dict = dataclasses.field(default_factory=dict)  # grouped GEMM -> contracted pair
    residual: dict = dataclasses.field(default_factory=dict)    # scatter_add combine -> its base
    identity: dict = dataclasses.field(default_factory=dict)    # node -> source it equals (id clamps,
    #                                                             sentinel masks: see sentinels.py)
    _fresh: itertools.count = dataclasses.field(default_factory=itertools.count)

    def set_root(self, n, labels, sizes=None):
        self.roots[n] = tuple(tuple(d) for d in labels)
        if sizes:
            self.sizes.update(sizes)
        self.memo.clear()

    def of(self, n):
        if not isinstance(n, fx.Node):
            return None
        if n in self.roots:
            return self.roots[n]
        if n in self.memo:
            return self.memo[n]
        self.memo[n] = None  # cycles cannot happen in a DAG; this also bounds the recursion
        try:
            out = self._compute(n)
        except (IndexError, TypeError, ValueError):
            out = None
        self.memo[n] = out
        return out

    def norm(self, label):
        """A label without its size-1 atoms (T=1 or k=1 dims move freely through views)."""
        return tuple(a for a in label if not same(self.sizes.get(a, 0), 1))

    def size_of(self, label):
        return math.prod(self.sizes[a] for a in label) if label else 1

    def broadcast(self, size):
        name = f"*{next(self._fresh)}"
        self.sizes[name] = size
        return (name,)

    # -- rules --
    def _compute(self, n):
        if n in self.identity:
            return self.of(self.identity[n])
        if n in self.rules:
            return self.rules[n](n, self)
        if n.op != "call_function":
            return None
        t = n.target
        if is_view(n):
            src = self.of(n.args[0])
            return None if src is None else self._view_rule(n, src)
        if t is aten.index.Tensor:
            src, idx = n.args[0], n.args[1]
            if len(idx) != 1 or idx[0] is None:
                return None
            ls, li = self.of(src), self.of(idx[0])
            if ls is None or li is None:
                return None
            return li + ls[1:]
        if t in GEMM_OPS:
            return self.gemm_labels(n)[0]
        if t in (aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.div.Tensor):
            return self._pointwise(n)
        if t is aten.repeat.default:
            return self._repeat_rule(n)
        if t is aten.sum.dim_IntList:
            src = self.of(n.args[0])
            if src is None or (len(n.args) > 2 and n.args[2]) or n.kwargs.get("keepdim"):
                return None
            dims = {d % len(src) for d in n.args[1]}
            return tuple(l for i, l in enumerate(src) if i not in dims)
        return None

    def _repeat_rule(self, n):
        """x.repeat(r0, r1, ...) tiles: a dim repeated r times reads index i * size + j, so its label
        is a broadcast atom of size r (the outer index) before the source's label."""
        src, reps = self.of(n.args[0]), list(n.args[1])
        if src is None or len(reps) < len(src):
            return None
        src = ((),) * (len(reps) - len(src)) + tuple(src)
        return tuple(l if same(r, 1) else self.broadcast(r) + tuple(l) for r, l in zip(reps, src))

    def _pointwise(self, n):
        ins = [a for a in n.args[:2] if isinstance(a, fx.Node)]
        labs = [self.of(a) for a in ins]
        if any(l is None for l in labs):
            return None
        out_rank = len(shape(n))
        out = [()] * out_rank
        for lab, a in zip(labs, ins):
            sh = shape(a)
            off = out_rank - len(lab)
            for i, l in enumerate(lab):
                if same(sh[i], 1):
                    continue
                cur = out[off + i]
                if not self.norm(cur):
                    out[off + i] = l
                else:
                    m = self.unify(cur, l)
                    if m is None:
                        return None
                    out[off + i] = m
        return tuple(out)

    def unify(self, a, b):
        """Two labels of one dim -> the merged label, or None if they disagree."""
        a, b = self.norm(a), self.norm(b)
        if len(a) != len(b):
            return None
        out = []
        for x, y in zip(a, b):
            if x == y:
                out.append(x)
            elif x.startswith("*") and same(self.sizes[x], self.sizes.get(y, -1)):
                out.append(y)
            elif y.startswith("*") and same(self.sizes[y], self.sizes.get(x, -2)):
                out.append(x)
            else:
                return None
        return tuple(out)

    def gemm_labels(self, n):
        """bmm/mm -> (result labels, contracted pair) if batch dims agree, else (None, None)."""
        la, lb = self.of(n.args[0]), self.of(n.args[1])
        if la is None or lb is None:
            return None, None
        if n.target is aten.mm.default:
            return (la[0], lb[1]), (la[1], lb[0])
        batch = self.unify(la[0], lb[0])
        if batch is None:
            return None, None
        return (batch, la[1], lb[2]), (la[2], lb[1])

    def _view_rule(self, n, src):
        t, a = n.target, n.args
        s_in, s_out = shape(a[0]), shape(n)
        if t in (aten.clone.default, aten.alias.default, prims.convert_element_type.default,
                 aten._to_copy.default, aten.slice.Tensor, aten.contiguous.default):
            return src
        if t is aten.unsqueeze.default:
            d = a[1] % (len(src) + 1)
            return src[:d] + ((),) + src[d:]
        if t in (aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default):
            dims = range(len(src)) if t is aten.squeeze.default else (
                [a[1]] if t is aten.squeeze.dim else a[1])
            dims = {d % len(src) for d in dims if same(s_in[d % len(src)], 1)}
            return tuple(l for i, l in enumerate(src) if i not in dims)
        if t is aten.permute.default:
            return tuple(src[d % len(src)] for d in a[1])
        if t is aten.transpose.int:
            p = list(range(len(src)))
            i, j = a[1] % len(src), a[2] % len(src)
            p[i], p[j] = p[j], p[i]
            return tuple(src[d] for d in p)
        if t is aten.t.default:
            return tuple(reversed(src))
        if t is aten.expand.default:
            off = len(s_out) - len(src)
            out = [self.broadcast(s) for s in s_out[:off]]
            for i, l in enumerate(src):
                if same(s_in[i], 1) and not same(s_out[off + i], 1):
                    out.append(self.broadcast(s_out[off + i]))
                else:
                    out.append(l)
            return tuple(out)
        return self._regroup(src, s_out)

    def _regroup(self, src, s_out):
        """view/reshape: split and merge atomic labels by their sizes."""
        atoms = [x for l in src for x in l if not same(self.sizes[x], 1)]
        out, i = [], 0
        for size in s_out:
            if same(size, 1):
                out.append(())
                continue
            part, prod = [], 1
            while i < len(atoms) and not same(prod, size):
                part.append(atoms[i])
                prod = prod * self.sizes[atoms[i]]
                i += 1
            if not same(prod, size):
                return None
            out.append(tuple(part))
        if i != len(atoms):
            # trailing broadcast/size-1 atoms are fine
            if not all(same(self.sizes[x], 1) for x in atoms[i:]):
                return None
        return tuple(out)
