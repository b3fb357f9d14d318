"""A Dynamo backend for tests that records what the MoE pass did (the pattern of vLLM's
tests/compile/backend.py).

``RecordingBackend`` compiles exactly as ``backend="mxfp4"`` does (it calls
``mxfp4_compile.backend.mxfp4_backend``: parameter lifting, kernel choice, Inductor with freezing
and the MoE pass) and keeps, for every graph the pass runs on, a copy of the FX graph before and
after the pass. Tests assert op counts on those graphs and run the compiled model for numerics::

    rec = RecordingBackend()
    with torch.no_grad():
        out = torch.compile(model, backend=rec)(x)
    assert rec.count(aten.bmm, "before") == 3 and rec.count(aten.bmm) == 0
    assert rec.count(mxfp4.moe) == 1                                  # "after" is the default

How, without touching the package: mxfp4_backend builds its pass as ``MoERewritePass(...)`` from
its own module's namespace, so while one compile runs that name is bound to a subclass whose
``__call__`` copies the graph around the real pass (same constructor, same ``uuid()``). The FX
graph cache is off for the compile (a cache hit skips the pass, and there would be nothing to
record); ``fx_graph_cache=None`` leaves the cache setting alone.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
import torch.fx as fx

import mxfp4_compile  # noqa: F401  (registers torch.ops.mxfp4 and the "mxfp4" backend)
from mxfp4_compile import backend as _backend

aten = torch.ops.aten
mxfp4 = torch.ops.mxfp4


def count_ops(graph: fx.Graph, op) -> int:
    """call_function nodes of ``graph`` calling ``op``: an OpOverloadPacket (``aten.bmm``) counts
    every overload, an OpOverload (``aten.bmm.default``) or any other callable only itself."""
    def hit(target):
        if isinstance(op, torch._ops.OpOverloadPacket):
            return getattr(target, "overloadpacket", None) is op
        return target is op or target == op
    return sum(1 for n in graph.nodes if n.op == "call_function" and hit(n.target))


def graph_text(graph: fx.Graph) -> str:
    """Compact, stable listing of an FX graph: one node per line, names and constants only."""
    def fmt(a):
        if isinstance(a, fx.Node):
            return a.name
        if isinstance(a, (list, tuple)):
            return "[" + ", ".join(fmt(x) for x in a) + "]"
        if isinstance(a, torch.dtype):
            return str(a).replace("torch.", "")
        if isinstance(a, torch.device):
            return a.type
        if isinstance(a, float):
            return f"{a:.6g}"
        return repr(a) if isinstance(a, str) else str(a)

    lines = []
    for n in graph.nodes:
        if n.op == "placeholder":
            lines.append(f"{n.name} = input")
        elif n.op == "output":
            lines.append(f"return {fmt(n.args[0])}")
        elif n.op == "get_attr":  # e.g. transformers GptOss's lifted constant tensor
            lines.append(f"{n.name} = get_attr({n.target})")
        else:
            t = getattr(n.target, "__name__", str(n.target)) if n.target.__module__ == "_operator" \
                else str(n.target)
            args = [fmt(a) for a in n.args] + [f"{k}={fmt(v)}" for k, v in n.kwargs.items()
                                               if k not in ("layout", "pin_memory")]
            lines.append(f"{n.name} = {t}({', '.join(args)})")
    return "\n".join(lines)


@dataclass
class PassRun:
    """One graph the MoE pass ran on: copies of it before and after the pass."""
    before: fx.Graph
    after: fx.Graph

    def graph(self, when: str) -> fx.Graph:
        if when not in ("before", "after"):
            raise ValueError(f"when must be 'before' or 'after', got {when!r}")
        return self.before if when == "before" else self.after

    def count(self, op, when: str = "after") -> int:
        return count_ops(self.graph(when), op)

    def text(self, when: str = "after") -> str:
        return graph_text(self.graph(when))


@contextlib.contextmanager
def _recording_pass(runs: list):
    base = _backend.MoERewritePass

    class RecordingPass(base):
        def __call__(self, graph):
            before = copy.deepcopy(graph)
            super().__call__(graph)
            runs.append(PassRun(before, copy.deepcopy(graph)))

    _backend.MoERewritePass = RecordingPass
    try:
        yield
    finally:
        _backend.MoERewritePass = base


class RecordingBackend:
    """``torch.compile(model, backend=RecordingBackend(), mode=..., options=...)``: the mxfp4
    backend, recording every pass run in ``self.runs`` (one per compiled graph, in order)."""

    def __init__(self, fx_graph_cache: bool | None = False):
        self.fx_graph_cache = fx_graph_cache
        self.runs: list[PassRun] = []

    def __call__(self, gm: fx.GraphModule, example_inputs, mode=None, options=None):
        patch = contextlib.nullcontext() if self.fx_graph_cache is None else \
            torch._inductor.config.patch(fx_graph_cache=self.fx_graph_cache)
        with patch, _recording_pass(self.runs):
            return _backend.mxfp4_backend(gm, example_inputs, mode=mode, options=options)

    def count(self, op, when: str = "after") -> int:
        """Calls of ``op`` in every recorded graph together, before or after the pass."""
        return sum(r.count(op, when) for r in self.runs)

    def assert_counts(self, before: dict | None = None, after: dict | None = None):
        """Exact op counts over every recorded graph, e.g.
        ``rec.assert_counts(before={aten.bmm: 3}, after={aten.bmm: 0, mxfp4.moe: 1})``."""
        assert self.runs, "the MoE pass never ran (grad enabled? served from the FX graph cache?)"
        want = {w: {str(op): n for op, n in (d or {}).items()}
                for w, d in (("before", before), ("after", after))}
        got = {w: {str(op): self.count(op, w) for op in (d or {})}
               for w, d in (("before", before), ("after", after))}
        assert got == want, f"op counts {got}, want {want}; graphs:\n" + "\n\n".join(
            f"-- before\n{b}\n-- after\n{a}" for b, a in self.texts())

    def texts(self) -> list[tuple[str, str]]:
        """[(graph before, graph after)] as graph_text listings, one pair per compiled graph."""
        return [(r.text("before"), r.text("after")) for r in self.runs]
