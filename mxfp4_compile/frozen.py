"""What the backend freezes into a compiled graph, and how frozen weights stay current.

Decided on the Dynamo graph, before compile_fx (docs/architecture.md §7 has the design and its
alternatives):
- ``select``: only what the MoE rewrite needs is frozen: expert weights (float tensors of rank >= 3
  with E >= 2 leading, read by a gather, a matmul-like op or a broadcast add), their [E, N] biases
  (gathered by expert id), and every parameter or buffer that feeds them through parameter-only ops
  (the uint8 blocks, scales and lookup table of a model that dequantizes in forward). Everything
  else stays a graph input, as under stock Inductor, so the model reads its current values.
- ``lift``: those placeholders become module attributes, which Inductor's freezing folds; each is
  guarded by identity (a frame reused for another module must not run with these weights).
- ``WeightWatch``: before each call, the frozen tensors' version counters and storage addresses
  are compared with what was prepared. A change re-prepares the changed layers in place (the
  folded constants are the store's tensors, ops/weights.py), so CUDA graphs keep their addresses;
  a frozen tensor the store cannot refresh (it feeds something other than a weight transform)
  raises an error that names it.
"""
from __future__ import annotations

import operator
import re

import torch
import torch.fx as fx

from .ops import weights

# what a frozen expert weight's runtime users look like (function or method names)
_EXPERT_USES = {"getitem", "index_select", "index", "take_along_dim", "einsum", "matmul", "bmm",
                "baddbmm", "_grouped_mm", "grouped_mm", "add", "sub", "iadd", "__add__",
                "__matmul__"}
# ... and an expert bias's ([E, N], gathered by expert id)
_BIAS_USES = {"getitem", "index_select", "index", "take_along_dim"}
_VIEW_METHODS = {"view", "reshape", "transpose", "permute", "t", "unsqueeze", "squeeze", "flatten",
                 "unflatten", "expand", "contiguous", "select", "narrow", "chunk", "split",
                 "__getitem__", "getitem"}


def _name(n) -> str:
    t = n.target
    return t if isinstance(t, str) else getattr(t, "__name__", "")


def source_name(src):
    """Dynamo's name for where a placeholder came from, e.g.
    "L['self']._modules['layers']._modules['0']._parameters['w2']"."""
    name = getattr(src, "name", None)
    name = name() if callable(name) else name
    return name if isinstance(name, str) else None


_ROOT = re.compile(r"^(?:L|G)\[(['\"])(.+?)\1\]")
_PART = re.compile(r"(?:\.__dict__\[(['\"])_(?:modules|parameters|buffers)\1\]|\._(?:modules|parameters|buffers))"
                   r"\[(['\"])(?P<key>.+?)\2\]|\.(?P<attr>[A-Za-z_]\w*)|\[(?P<index>\d+)\]")


def qualified_name(name: str | None) -> str | None:
    """A Dynamo source name as the module path a user writes: "layers.0.w2" for the example in
    ``source_name`` (the compiled module's own ``self`` dropped, any other root kept); the name
    as given where it does not parse."""
    if not name:
        return name
    root = _ROOT.match(name)
    if root is None:
        return name
    parts = [] if root.group(2) == "self" else [root.group(2)]
    pos = root.end()
    while pos < len(name):
        m = _PART.match(name, pos)
        if m is None:
            return name
        parts.append(m.group("key") or m.group("attr") or m.group("index"))
        pos = m.end()
    return ".".join(parts) or name


def is_state(n, ex) -> bool:
    """A module parameter or buffer (not a forward input)."""
    if isinstance(ex, torch.nn.Parameter):
        return True
    name = source_name(getattr(n, "_dynamo_source", None)) or ""
    return isinstance(ex, torch.Tensor) and ("._buffers[" in name or "['_buffers']" in name)


def _writes(u) -> bool:
    t = u.target
    if isinstance(t, str):  # a method: add_, copy_, index_put_ ...
        return t.endswith("_") and not t.endswith("__")
    name = getattr(t, "__name__", "")
    if getattr(t, "__module__", "") in ("_operator", "operator"):  # and_ is not in place, iand is
        return name == "setitem" or (name.startswith("i") and name[1:] in dir(operator))
    return name.endswith("_") and not name.endswith("__")


def _written(n) -> bool:
    """Does the graph write ``n`` or a view of it in place?"""
    stack, seen = [n], set()
    while stack:
        x = stack.pop()
        if x in seen:
            continue
        seen.add(x)
        for u in x.users:
            if _writes(u):
                return True
            if _is_view(u):
                stack.append(u)
    return False


def _is_view(u) -> bool:
    """A use that may alias its input (indexing with a tensor copies; slicing does not)."""
    if _name(u) not in _VIEW_METHODS:
        return False
    if _name(u) in ("getitem", "__getitem__"):
        return not any(isinstance(n.meta.get("example_value"), torch.Tensor)
                       for n in _nodes_in(u.args[1:]))
    return True


def _nodes_in(args) -> list:
    found = []
    fx.node.map_arg(args, found.append)
    return found


def _custom_op(u) -> bool:
    """A library's own operator (transformers' grouped_mm_fallback and the like), not aten's."""
    t = u.target
    if not isinstance(t, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return False
    qualified = getattr(t, "_qualified_op_name", None) or t.name()  # "transformers::grouped_mm_..."
    return qualified.split("::")[0] not in ("aten", "prims")


def _example(n, by_placeholder):
    if n in by_placeholder:
        return by_placeholder[n]
    return n.meta.get("example_value", n.meta.get("val"))


def _random(n) -> bool:
    return _name(n) in {"rand", "randn", "randint", "rand_like", "randn_like", "randint_like",
                        "normal", "bernoulli", "multinomial", "dropout"}


def select(gm: fx.GraphModule, example_inputs) -> list[int]:
    """-> indices of the placeholders to freeze (see the module docstring)."""
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    by_ph = dict(zip(phs, example_inputs))
    const = {n for n, ex in by_ph.items() if is_state(n, ex) and not _written(n)}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            const.add(n)
        elif n.op in ("call_function", "call_method") and not _random(n) and not _writes(n) and \
                all(i in const for i in n.all_input_nodes):  # factories (a table built in forward) too
            const.add(n)
    sinks3, sinks2, experts = [], [], set()
    for c in const:
        ev = _example(c, by_ph)
        if not isinstance(ev, torch.Tensor) or not ev.is_floating_point() or ev.dim() < 2:
            continue
        runtime = [u for u in c.users if u not in const]
        uses = {_name(u) for u in runtime}
        if ev.dim() >= 3 and ev.shape[0] >= 2 and (uses & _EXPERT_USES or any(map(_custom_op, runtime))):
            sinks3.append(c)
            experts.add(ev.shape[0])
        elif ev.dim() == 2 and uses & _BIAS_USES:
            sinks2.append(c)
    sinks = sinks3 + [c for c in sinks2 if _example(c, by_ph).shape[0] in experts]
    roots, stack, seen = set(), list(sinks), set()
    while stack:  # every parameter / buffer a sink is computed from
        x = stack.pop()
        if x in seen:
            continue
        seen.add(x)
        if x.op == "placeholder":
            roots.add(x)
        stack.extend(x.all_input_nodes)
    return [i for i, n in enumerate(phs) if n in roots]


def float_constants(gm: fx.GraphModule, example_inputs) -> list[int]:
    """Placeholders that are a module's or a global's Python float, which torch.compile(
    dynamic=True) passes as a 0-dim tensor read only through ``.item()`` (swiglu's alpha and limit):
    ``lift`` turns them back into constants, guarded by value, so the activation can be matched
    and handed to the op as the constants it needs. A forward argument stays an input."""
    out = []
    for i, (n, ex) in enumerate(zip([n for n in gm.graph.nodes if n.op == "placeholder"],
                                    example_inputs)):
        name = source_name(getattr(n, "_dynamo_source", None)) or ""
        if isinstance(ex, torch.Tensor) and ex.dim() == 0 and ex.is_floating_point() and \
                name.startswith(("L['self']", "G[")) and n.users and \
                all(u.op == "call_method" and u.target == "item" for u in n.users):
            out.append(i)
    return out


def _dynamo_guards():
    """The guard set Dynamo is building for the frame being compiled (it is turned into the
    frame's check function after the backend returns)."""
    ctx = torch._guards.TracingContext.try_get()
    return getattr(getattr(ctx, "guards_context", None), "dynamo_guards", None)


def lift(gm: fx.GraphModule, example_inputs, indices, constants=()) -> tuple[list, list, list]:
    """Placeholders ``indices`` -> module attributes (frozen by Inductor); placeholders
    ``constants`` (``float_constants``) -> their Python value, guarded by value.
    -> (kept input indices, lifted tensors, their source names)."""
    from torch._dynamo.guards import GuardBuilder
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    chosen, consts = set(indices), set(constants)
    keep, lifted, names = [], [], []
    guards = _dynamo_guards()
    for i, (n, ex) in enumerate(zip(placeholders, example_inputs)):
        src = getattr(n, "_dynamo_source", None)
        if i in consts and src is not None and guards is not None:
            value = ex.item()
            for item in list(n.users):
                for u in list(item.users):
                    u.args = fx.node.map_arg(u.args, lambda a, it=item: value if a is it else a)
                    u.kwargs = fx.node.map_arg(u.kwargs, lambda a, it=item: value if a is it else a)
                gm.graph.erase_node(item)
            gm.graph.erase_node(n)
            guards.add(src.make_guard(GuardBuilder.EQUALS_MATCH))  # another value recompiles
            continue
        if i not in chosen:
            keep.append(i)
            continue
        name = f"_mxfp4_param_{i}"
        if isinstance(ex, torch.nn.Parameter):
            gm.register_parameter(name, ex)
        else:
            gm.register_buffer(name, ex)
        if hasattr(gm, "_param_name_to_source") and src is not None:
            gm._param_name_to_source[name] = src  # AOTAutograd asserts every parameter has one
        if src is not None and guards is not None:
            # the graph now holds this very tensor: a frame reused for another module (a layer
            # loop with graph breaks) must recompile instead of running with these weights
            guards.add(src.make_guard(GuardBuilder.ID_MATCH))
        with gm.graph.inserting_before(n):
            attr = gm.graph.get_attr(name)
        attr.meta.update(n.meta)
        n.replace_all_uses_with(attr)
        gm.graph.erase_node(n)
        lifted.append(ex)
        names.append(qualified_name(source_name(src)) or n.name)
    gm.recompile()
    return keep, lifted, names


_VERSION = operator.attrgetter("_version")
_PTR = torch.Tensor.data_ptr


class WeightWatch:
    """The frozen tensors of one compiled graph, checked before each of its calls.

    ``check()`` costs two attribute reads per frozen tensor while nothing changed (measured in
    benchmarks/notes/reliability.md). The weight stores' own entries decide what a change costs:
    only the MoE layers whose inputs changed are prepared again, in place."""

    def __init__(self, lifted: list, names: list, kernel: str, rounding: str):
        self.tensors, self.names = list(lifted), list(names)
        self.entries = [e for e in weights.entries_reading(self.tensors)
                        if e.options["kernel"] == kernel and e.options["rounding"] == rounding]
        read = {id(t) for e in self.entries for t in e.inputs() if t is not None}
        self.refreshable = [id(t) in read for t in self.tensors]
        self.held = [tuple(map(id, e.prepared.tensors())) for e in self.entries]
        self._snap()

    def _snap(self):
        self.versions = list(map(_VERSION, self.tensors))
        self.ptrs = list(map(_PTR, self.tensors))

    def check(self) -> None:
        if list(map(_VERSION, self.tensors)) != self.versions or \
                list(map(_PTR, self.tensors)) != self.ptrs:
            self._update()

    def _update(self):
        changed = [i for i, t in enumerate(self.tensors)
                   if t._version != self.versions[i] or t.data_ptr() != self.ptrs[i]]
        fixed = [self.names[i] for i in changed if not self.refreshable[i]]
        if fixed:
            raise RuntimeError(
                f"mxfp4 backend: {', '.join(fixed)} changed after torch.compile froze it into a "
                f"compiled graph, which holds constants computed from it that mxfp4_compile cannot "
                f"refresh in place (it does not feed an MXFP4 weight transform directly: e.g. MXFP4 "
                f"blocks dequantized in forward, or an expert weight whose layer was not "
                f"rewritten). Recompile to use the new values: torch._dynamo.reset() (or "
                f"torch.compiler.reset()), then call the model again.")
        for e in self.entries:
            weights.refresh(e)
        for e, held in zip(self.entries, self.held):
            if tuple(map(id, e.prepared.tensors())) != held:
                raise RuntimeError(
                    f"mxfp4 backend: an expert weight among {', '.join(self.names[i] for i in changed)} "
                    f"changed shape, dtype, device or strides in place (p.data = ...) after "
                    f"compiling; the compiled graph was built for the old ones. Recompile: "
                    f"torch._dynamo.reset() (or torch.compiler.reset()), then call the model again.")
        self._snap()

    def rebase(self) -> None:
        """After the package's own storage swaps (release_bf16_weights): nothing to re-prepare."""
        weights.rebase(self.tensors)
        self._snap()
