"""What the backend does with the graph inputs of a decode step so that one CUDA graph serves
every step.

Two kinds of input stop a decode graph from being recorded once and replayed:

* **Host integers.** Dynamo turns a Python int attribute that changes between calls into a
  SymInt graph input (transformers' sliding-window static cache keeps its length in
  ``cumulative_length_int`` and adds the step's tokens to it: the graph returns ``s + 1``). CUDA
  graph trees record one graph per distinct value of an int input, so such a graph would be
  recorded again at every decode step. When an int input reaches no tensor (not a shape, not a
  kernel argument: only host arithmetic whose results the graph returns), ``split_host_ints``
  moves that arithmetic out of the graph: the compiled graph keeps only tensor inputs and the
  backend's wrapper computes the returned ints on the host.
* **Tensors the graph writes in place** that are not module state (the static cache's keys,
  values and length, created inside a compiled prefill, where transformers cannot mark their
  addresses static). Inductor skips CUDA graphs for a graph that mutates an input it must copy.
  ``mutated_inputs`` finds them in the AOT graph; the backend marks them static, so a replay
  writes them in place, and a tensor at a new address (a new cache) makes the graph tree record
  again (its re-record rule for static inputs) instead of writing into a stale buffer.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.fx as fx


def _is_host_int(v) -> bool:
    return isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool)


def _example(n: fx.Node):
    return n.meta.get("example_value", n.meta.get("val"))


def _tensor_symbols(values) -> set:
    """Free symbols of the tensors' sizes, strides and offsets (a SymInt that is one of these is a
    shape: Inductor binds it from the tensor, and it must stay)."""
    out = set()
    for t in values:
        if isinstance(t, torch.Tensor):
            for s in (*t.shape, *t.stride(), t.storage_offset()):
                if isinstance(s, torch.SymInt):
                    out |= s.node.expr.free_symbols
    return out


class HostInts(NamedTuple):
    """``split_host_ints``'s result: the inputs it took out of the graph (positions in the
    graph's input list), the graph outputs it computes instead (positions in the output tuple),
    the host function from the first to the second, and the placeholders to put back once the
    graph is compiled (Dynamo passes the compiled function one argument per placeholder left in
    its graph)."""
    inputs: list
    outputs: list
    fn: Callable
    removed: list  # [(position, name, meta)] of the placeholders taken out

    def merge(self, outs, args):
        """The compiled graph's outputs with the host ints put back at their positions
        (``args``: the graph's inputs, the moved ones included)."""
        vals = self.fn(*[args[i] for i in self.inputs])
        outs = list(outs)
        for pos, v in sorted(zip(self.outputs, vals)):
            outs.insert(pos, v)
        return outs

    def restore(self, gm: fx.GraphModule) -> None:
        """Put the moved placeholders back into ``gm`` (unused), where they were."""
        for pos, name, meta in sorted(self.removed):
            phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
            where = gm.graph.inserting_before(phs[pos]) if pos < len(phs) else \
                gm.graph.inserting_after(phs[-1]) if phs else gm.graph.inserting_before(None)
            with where:
                n = gm.graph.placeholder(name)
            n.meta.update(meta)
        gm.recompile()


def split_host_ints(gm: fx.GraphModule, example_inputs) -> HostInts | None:
    """Move int inputs that reach only host arithmetic and the graph's outputs out of ``gm`` (in
    place; ``restore`` puts the placeholders back after the compile). -> what was moved, or None
    when nothing was (``gm`` untouched)."""
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    # the placeholders' fake values carry the symbolic shapes (example inputs may be real tensors)
    shapes = _tensor_symbols([_example(n) for n in phs] + list(example_inputs))
    host = {}
    for i, (n, ex) in enumerate(zip(phs, example_inputs)):
        if _is_host_int(ex) and not (isinstance(ex, torch.SymInt) and ex.node.expr.free_symbols & shapes):
            host[n] = i
    if not host:
        return None
    # the nodes computed from host ints alone (+ constants), whose value is a host number
    derived = set(host)
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.all_input_nodes and all(a in derived for a in n.all_input_nodes) \
                and _is_host_int(_example(n)):
            derived.add(n)
    # an int input moves with everything computed from it, if all of that is host arithmetic
    # whose only other reader is the output, and none of it also needs an input that stays
    def closure(p):
        seen, stack = set(), [p]
        while stack:
            for u in stack.pop().users:
                if u is not out_node and u not in seen:
                    seen.add(u)
                    stack.append(u)
        return seen

    cl = {p: closure(p) for p in host}
    moving = {p for p in host if cl[p] <= derived}
    while True:
        movable = set(moving).union(*(cl[p] for p in moving))
        bad = {p for p in moving if any(a not in movable for c in cl[p] for a in c.all_input_nodes)}
        if not bad:
            break
        moving -= bad
    moved_phs = [n for n in phs if n in movable]
    if not moved_phs:
        return None
    outs = out_node.args[0]
    if not isinstance(outs, (tuple, list)):
        return None
    out_pos = [j for j, o in enumerate(outs) if isinstance(o, fx.Node) and o in movable]
    # the host function: a graph of the moved nodes
    host_graph = fx.Graph()
    env = {}
    for n in gm.graph.nodes:
        if n in movable:
            if n.op == "placeholder":
                env[n] = host_graph.placeholder(n.name)
            else:
                env[n] = host_graph.node_copy(n, lambda a: env[a])
    host_graph.output(tuple(env[outs[j]] for j in out_pos))
    fn = fx.GraphModule(torch.nn.Module(), host_graph)
    removed = [(host[n], n.name, dict(n.meta)) for n in moved_phs]
    # the graph without them
    out_node.args = (tuple(o for o in outs if not (isinstance(o, fx.Node) and o in movable)),)
    for n in reversed(list(gm.graph.nodes)):
        if n in movable:
            gm.graph.erase_node(n)
    gm.graph.lint()
    gm.recompile()
    return HostInts([host[n] for n in moved_phs], out_pos, fn, removed)


def mutated_inputs(gm: fx.GraphModule) -> list[int]:
    """Positions of the placeholders of an AOT (aten) graph that an op writes in place (the
    ``copy_`` AOTAutograd adds for a mutated input, or any op whose schema marks that argument
    written)."""
    phs = {n: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
    out = set()
    for n in gm.graph.nodes:
        if n.op != "call_function" or not isinstance(n.target, torch._ops.OpOverload):
            continue
        for a, arg in zip(n.args, n.target._schema.arguments):
            if isinstance(a, fx.Node) and a in phs and arg.alias_info is not None \
                    and arg.alias_info.is_write:
                out.add(phs[a])
    return sorted(out)

