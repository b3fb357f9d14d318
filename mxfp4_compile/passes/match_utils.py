"""Shared matching machinery: dimension labels, weight sources, the activation check, the combine.

Shape legend: T tokens, k experts per token (slots, label "S"), E experts, H hidden, N = 2I gate/up
rows, I intermediate, R rows sorted by expert (grouped forms).

Every MoE form computes, for each (token t, slot s) pair, y = W2[e] act(W13[e] x_t) and then
out[t] = sum_s w[t, s] y. The forms differ in how they lay the (t, s) pairs out in memory (gathered
weights, sorted rows, every expert on every token), so the matchers do not compare node sequences:
they track *what each tensor dimension means* ("labels") from a few roots (hidden [T, H],
topk ids [T, k], the expert weights [E, ., .]) through views, permutes, gathers and GEMMs, and accept
a region only when the labels prove it computes the op's math. The activation between the two GEMMs
is identified numerically (run on random data, compared with the op's activations), which is robust
to how Inductor's decompositions spell sigmoid/silu/clamp.
"""
from __future__ import annotations

import dataclasses
import itertools
import math

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.utils import _pytree as pytree

aten = torch.ops.aten
prims = torch.ops.prims

# ops that only re-lay out a tensor (or change its dtype): labels pass through them
VIEW_OPS = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.clone.default,
    aten.alias.default, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
    aten.squeeze.default, aten.permute.default, aten.transpose.int, aten.t.default,
    aten.expand.default, prims.convert_element_type.default, aten._to_copy.default,
    aten.slice.Tensor, aten.contiguous.default,
}
DTYPE_OPS = {prims.convert_element_type.default, aten._to_copy.default}
GEMM_OPS = {aten.bmm.default, aten.mm.default}


def grouped_mm_ops():
    """aten._grouped_mm and transformers' opaque fallback (same semantics), where they exist."""
    ops = []
    if hasattr(aten, "_grouped_mm"):
        ops.append(aten._grouped_mm.default)
    try:
        ops.append(torch.ops.transformers.grouped_mm_fallback.default)
    except (AttributeError, RuntimeError):
        pass
    return ops


class NoMatch(Exception):
    """A candidate region that is not rewritten; the message is the reason explain() shows."""


def val(n):
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def shape(n):
    v = val(n)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def same(a, b) -> bool:
    """Sizes equal for every value of the symbols (never adds a guard)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return bool(statically_known_true(a == b))


def hint(x):
    """A concrete int for a size (symbolic sizes -> their example value)."""
    if isinstance(x, torch.SymInt):
        return x.node.hint if x.node.hint is not None else x.node.shape_env.size_hint(x.node.expr)
    return x


def is_view(n) -> bool:
    if not (isinstance(n, fx.Node) and n.op == "call_function" and n.target in VIEW_OPS):
        return False
    if n.target is aten.slice.Tensor:  # only a full slice is a pure view
        s_in, dim = shape(n.args[0]), n.args[1] if len(n.args) > 1 else 0
        start = n.args[2] if len(n.args) > 2 else 0
        step = n.args[4] if len(n.args) > 4 else 1
        return s_in is not None and start in (0, None) and step == 1 and same(shape(n)[dim], s_in[dim])
    if n.target is aten._to_copy.default:
        return set(n.kwargs) <= {"dtype"}
    return True


def strip(n):
    """Walk back through view ops: -> [n, parent, grandparent, ...] (the last is the root)."""
    chain = [n]
    while is_view(chain[-1]):
        chain.append(chain[-1].args[0])
    return chain


# ---- weight sources -------------------------------------------------------------------------------
def constant_nodes(graph: fx.Graph, n_params: int) -> set:
    """Nodes computed from frozen parameters only (what Inductor's freeze will constant-fold)."""
    const, seen_ph = set(), 0
    for n in graph.nodes:
        if n.op == "placeholder":
            if seen_ph < n_params:
                const.add(n)
            seen_ph += 1
        elif n.op == "get_attr":
            const.add(n)
        elif n.op == "call_function":
            ins = n.all_input_nodes
            if all(i in const for i in ins) and not _is_random(n) and \
                    (ins or not _reads_symbols(n)):  # factory ops (a LUT built in forward) too
                const.add(n)
    return const


def _reads_symbols(n) -> bool:
    return any(isinstance(a, torch.SymInt) for a in pytree.tree_leaves((n.args, n.kwargs)))


def _is_random(n) -> bool:
    tags = getattr(n.target, "tags", ())
    return torch.Tag.nondeterministic_seeded in tags


def param_name(n, names: list | None):
    """Source name of a parameter placeholder (for reports)."""
    root = strip(n)[-1]
    if names and root.op == "placeholder":
        phs = [p for p in root.graph.nodes if p.op == "placeholder"]
        i = phs.index(root)
        if i < len(names):
            return names[i]
    return root.name


# ---- dimension labels -----------------------------------------------------------------------------
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
    #                                                             sentinel masks: see sentinel_*)
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
        if t is aten.sum.dim_IntList:
            src = self.of(n.args[0])
            if src is None or (len(n.args) > 2 and n.args[2]) or n.kwargs.get("keepdim"):
                return None
            dims = {d % len(src) for d in n.args[1]}
            return tuple(l for i, l in enumerate(src) if i not in dims)
        return None

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


# ---- expert-parallel sentinel handling: the identity on ids in [0, E) -------------------------------
# transformers 5.17 always guards against expert-parallel sentinel ids (>= E): batched_mm clamps the
# flat ids to [0, E-1] before gathering weights, grouped_mm clamps the sorted ids to E-1 for the bias
# gathers and zeroes the rows of ids >= E (masked_fill -> where) around each grouped GEMM. Without
# expert parallelism every id is a top-k index over the E experts, so each of these is exact identity.
def id_clamp_source(n, E):
    """clamp_max(x, E-1), clamp_min(x, 0) or clamp(x, 0|None, E-1|None) on integer x -> x, else None."""
    if not (isinstance(n, fx.Node) and n.op == "call_function") or val(n) is None or \
            val(n).is_floating_point() or val(n).dtype is torch.bool:
        return None
    t = n.target
    if t is aten.clamp_max.default:
        lo, hi = None, n.args[1]
    elif t is aten.clamp_min.default:
        lo, hi = n.args[1], None
    elif t is aten.clamp.default:
        lo = n.args[1] if len(n.args) > 1 else n.kwargs.get("min")
        hi = n.args[2] if len(n.args) > 2 else n.kwargs.get("max")
    else:
        return None
    if lo is None and hi is None:
        return None
    if lo is not None and (isinstance(lo, bool) or lo != 0):
        return None
    if hi is not None and (isinstance(hi, bool) or not isinstance(hi, int) or hi != E - 1):
        return None
    return n.args[0]


def strip_ids(n, E):
    """strip() that also walks back through id clamps -> (chain, clamp nodes)."""
    chain, clamps = strip(n), []
    while (src := id_clamp_source(chain[-1], E)) is not None:
        clamps.append(chain[-1])
        chain = chain + strip(src)
    return chain, clamps


def sentinel_fill_source(n, ids, E):
    """where(ids >= E, fill, x) or masked_fill(x, ids >= E, fill) (``ids`` one of the given nodes,
    through views; the mask may be broadcast over the features) -> x, else None."""
    if not isinstance(n, fx.Node) or n.op != "call_function":
        return None
    if n.target is aten.where.self:
        mask, x = n.args[0], n.args[2]
    elif n.target in (aten.masked_fill.Scalar, aten.masked_fill.Tensor):
        mask, x = n.args[1], n.args[0]
    else:
        return None
    if not isinstance(x, fx.Node) or not isinstance(mask, fx.Node) or shape(x) is None or \
            len(shape(x)) != len(shape(n)) or not all(same(a, b) for a, b in zip(shape(x), shape(n))):
        return None
    m = strip(mask)[-1]
    if not ((m.target is aten.ge.Scalar and m.args[1] == E) or
            (m.target is aten.gt.Scalar and m.args[1] == E - 1)):
        return None
    return x if strip_ids(m.args[0], E)[0][-1] in ids else None


# ---- the activation between the two expert GEMMs ---------------------------------------------------
@dataclasses.dataclass
class Activation:
    name: str            # "swiglu_oai" | "silu_glu"
    interleaved: bool    # gate/up order of the GEMM output rows (input order for the weight transform)
    alpha: float = 1.702
    limit: float = 7.0


def between(srcs, dst, limit=2000):
    """Nodes on paths from any of ``srcs`` to ``dst`` (topological order), or None if too many."""
    order = {n: i for i, n in enumerate(dst.graph.nodes)}
    stop = order[dst]
    desc, stack = set(), list(srcs)
    while stack:  # forward from the sources, never past dst
        x = stack.pop()
        if x in desc or order[x] > stop:
            continue
        desc.add(x)
        if len(desc) > limit:
            return None
        stack.extend(x.users)
    if dst not in desc:
        return []
    keep, stack = set(), [dst]
    while stack:  # backward from dst, inside the forward set
        x = stack.pop()
        if x in keep or x not in desc:
            continue
        keep.add(x)
        stack.extend(x.all_input_nodes)
    return sorted(keep, key=order.__getitem__)


def _run_subgraph(nodes, env):
    def sub(x):
        if isinstance(x, fx.Node):
            return env[x]
        if isinstance(x, torch.SymInt):
            return hint(x)
        if isinstance(x, torch.device):
            return torch.device("cpu")  # the check runs on CPU whatever device the model is on
        return x
    for n in nodes:
        if n in env:
            continue
        if n.op != "call_function":
            raise NoMatch(f"activation reads {n.op} {n.name}")
        args, kwargs = pytree.tree_map(sub, (n.args, n.kwargs))
        env[n] = n.target(*args, **kwargs)
    return env


def _scalars(nodes):
    out = set()
    for n in nodes:
        for a in pytree.tree_leaves((n.args, n.kwargs)):
            if isinstance(a, float) and math.isfinite(a):
                out.add(abs(a))
    return out


def identify_activation(inputs, out) -> Activation:
    """``inputs``: [gate_up] (one [.., 2I] tensor) or [gate, up]; ``out`` [.., I] -> Activation.

    Runs the subgraph on random data and compares with the op's activations; raises NoMatch naming
    what it found when nothing fits."""
    nodes = between(inputs, out)
    if nodes is None or out not in nodes:
        raise NoMatch("activation: the second GEMM's input does not come from the first GEMM")
    nodes = [n for n in nodes if n not in inputs]
    for n in nodes:  # the activation may read only its inputs and constants
        for a in n.all_input_nodes:
            if a not in nodes and a not in inputs:
                root = strip(a)[-1]
                if root.op == "placeholder" and shape(root) == ():
                    raise NoMatch(f"activation reads a runtime scalar input ({root.name}): a Python "
                                  f"float (swiglu alpha/limit) became a graph input, as "
                                  f"torch.compile(dynamic=True) does; compile without dynamic=True "
                                  f"(token counts still become dynamic) or set "
                                  f"torch._dynamo.config.specialize_float = True")
                raise NoMatch(f"activation reads another tensor ({a.name}): not a plain GLU")
    shapes = [tuple(hint(s) for s in shape(i)) for i in inputs]
    dtypes = [val(i).dtype for i in inputs]
    dtype = dtypes[0]
    key = _signature(nodes, inputs, shapes[0][-1])
    if key in _identified:  # every layer of a model has the same activation subgraph: run it once
        return _identified[key]
    with unset_fake_temporarily():  # the pass runs under Inductor's fake mode; this needs real data
        g = torch.Generator().manual_seed(0)
        # values past every constant in the subgraph, so each clamp is exercised
        scale = min(max([5.0] + [1.5 * c for c in _scalars(nodes)]), 1e4)
        xs = [(torch.randn(s, generator=g) * scale).to(d) for s, d in zip(shapes, dtypes)]
        if any(d != torch.float32 for d in dtypes + [val(out).dtype]):
            dtype = torch.bfloat16  # tolerance of the lowest precision involved
        got = _run_subgraph(nodes, dict(zip(inputs, xs)))[out].float()
        act = _compare(xs, got, dtype, nodes)
    _identified[key] = act
    return act


_identified: dict = {}


def _signature(nodes, inputs, n_features):
    """What the activation computes, up to the row count: ops, scalars, feature-dim sizes."""
    def norm(a):
        if isinstance(a, fx.Node):
            return ("in", inputs.index(a)) if a in inputs else ("node", nodes.index(a))
        if isinstance(a, (list, tuple)):
            return tuple(norm(x) for x in a)
        if isinstance(a, torch.SymInt):
            return "rows"
        if isinstance(a, int) and not isinstance(a, bool) and a > 2 and a not in (
                n_features, n_features // 2):
            return "rows"  # a baked token count in a view shape
        return a if isinstance(a, (int, float, bool, str, type(None))) else str(a)
    return (tuple(str(val(i).dtype) for i in inputs), n_features,
            tuple((str(n.target), norm(n.args), norm(tuple(sorted(n.kwargs.items()))))
                  for n in nodes))


def _compare(xs, got, dtype, nodes):
    if len(xs) == 1:
        h = xs[0].float()
        pairs = {True: (h[..., 0::2], h[..., 1::2]), False: h.chunk(2, dim=-1)}
    else:
        pairs = {False: (xs[0].float(), xs[1].float())}
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    consts = _scalars(nodes)
    limits = sorted(consts) + [math.inf]
    alphas = sorted(consts)
    for interleaved, (gate, up) in pairs.items():
        cand = [Activation("silu_glu", interleaved)] + [
            Activation("swiglu_oai", interleaved, a, l) for a in alphas for l in limits]
        for act in cand:
            if act.name == "silu_glu":
                ref = torch.nn.functional.silu(gate) * up
            else:
                gc = gate.clamp(max=act.limit)
                ref = gc * torch.sigmoid(act.alpha * gc) * (up.clamp(-act.limit, act.limit) + 1)
            if ref.numel() == got.numel() and ref.numel() and \
                    torch.allclose(got.reshape(ref.shape), ref, rtol=tol, atol=tol * 4):
                return act
    raise NoMatch("activation is neither swiglu_oai (gate*sigmoid(alpha*gate)*(up+1), clamped) nor "
                  "silu_glu (silu(gate)*up) on either gate/up order")


# ---- the region description every form produces ----------------------------------------------------
@dataclasses.dataclass
class MoERegion:
    form: str                     # which matcher found it
    hidden: fx.Node               # [T, H]
    topk_ids: fx.Node | None      # [T, k] int (None: dense form without top-k; built at rewrite)
    topk_weights: fx.Node         # [T, k] (or [T, E] dense)
    w13: list                     # [W13] or [W_gate, W_up] (weight-constant nodes, 3-D)
    w13_bias: fx.Node | None
    w2: fx.Node
    w2_bias: fx.Node | None
    w13_transposed: bool          # [E, H, 2I] instead of [E, 2I, H]
    w2_transposed: bool           # [E, I, H] instead of [E, H, I]
    activation: Activation
    output: fx.Node               # [T, H] node the op's result replaces
    dense_experts: bool = False   # weights are [T, E] over every expert
    residual: fx.Node | None = None  # a tensor the combine adds the expert sum to (scatter_add base)
    num_experts: int = 0
    hidden_size: int = 0
    intermediate_size: int = 0
    top_k: int = 0


@dataclasses.dataclass
class Candidate:
    """One place that looked like an MoE expert block, rewritten or not (for logs and explain)."""
    form: str
    where: str                    # node / parameter names that locate it
    rewritten: bool
    reason: str = ""
    details: dict = dataclasses.field(default_factory=dict)
