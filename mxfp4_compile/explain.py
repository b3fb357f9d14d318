"""``mxfp4_compile.explain(model, *inputs)``: which MoE regions the backend rewrites, which not, why.

It compiles the model once with the real backend under ``torch.no_grad()`` (the mode the backend
rewrites in, whatever the caller's mode), collects what every matcher saw, and reports each
candidate region: rewritten, or the reason it was left alone (unsupported activation, weight not a
frozen parameter, size not a multiple of 32, ...), with the weights' module names. Called with
grad enabled it adds that a model compiled in that mode would not be rewritten.

It leaves the caller's compiled models alone: no ``torch._dynamo.reset()``. Its own backend object
is new at every call, so Dynamo compiles the model's frames afresh for it (one more cache entry
per frame) and the caller's entries keep serving the caller.
"""
from __future__ import annotations

import dataclasses
import functools

import torch

from . import backend as _backend


@dataclasses.dataclass
class Region:
    graph: int            # index of the compiled graph (Dynamo splits a model at graph breaks)
    form: str             # matcher: gather_bmm | grouped_mm | dense
    where: str            # first..second expert GEMM node names in the graph
    rewritten: bool
    reason: str           # why not ("" when rewritten)
    details: dict         # experts, hidden, intermediate, top_k, activation, weight parameter names
    already_mxfp4: bool = False  # the model's own torch.ops.mxfp4.moe (Mxfp4Experts)


@dataclasses.dataclass
class ExplainReport:
    regions: list
    kernel: str | None
    kernel_reason: str | None
    grad_enabled: bool
    graphs: int
    graph_breaks: list    # Dynamo's reasons, when the model did not compile as one graph
    notes: list

    @property
    def rewritten(self) -> int:
        return sum(r.rewritten for r in self.regions)

    def __str__(self):
        lines = [f"mxfp4 explain (under torch.no_grad()): {self.rewritten} of {len(self.regions)} "
                 f"candidate MoE region(s) rewritten; {self.graphs} graph(s); kernel "
                 f"{self.kernel!r} ({self.kernel_reason})"]
        for r in self.regions:
            what = ("REWRITTEN" if r.rewritten else "ALREADY MXFP4" if r.already_mxfp4
                    else f"not rewritten: {r.reason}")
            d = r.details
            shape = (f" E={d['experts']} H={d['hidden']} I={d['intermediate']} k={d['top_k']} "
                     f"{d['activation']}" if "experts" in d else "")
            shape += " (routing weights on the input)" if d.get("weights_on_input") else ""
            names = f" weights={d['weights']}" if d.get("weights") else ""
            route = f"; router: {d['router']}" if d.get("router") else ""
            note = f"; {d['note']}" if d.get("note") else ""
            lines.append(f"  graph {r.graph} [{r.form}] {r.where}:{shape}{names} -> {what}{route}{note}")
        for b in self.graph_breaks:
            lines.append(f"  graph break: {b}")
        for n in self.notes:
            lines.append(f"  note: {n}")
        return "\n".join(lines)


GRAD_REASON = ("grad is enabled: the backend only rewrites under torch.no_grad() or "
               "torch.inference_mode() (weights must be frozen)")


def explain(model, *inputs, options=None, **kwargs) -> ExplainReport:
    """Compile ``model`` on ``inputs`` with the mxfp4 backend (under torch.no_grad()) and report
    every candidate MoE region."""
    from torch._dynamo.utils import counters

    grad = torch.is_grad_enabled()
    start = len(_backend.last_compile_info)
    breaks_before = dict(counters["graph_break"])
    with torch.no_grad():  # a new backend object: Dynamo compiles afresh, other entries stay
        compiled = torch.compile(model, backend=functools.partial(_backend.mxfp4_backend,
                                                                  options=options), **kwargs)
        compiled(*inputs)
    log = _backend.last_compile_info
    regions, notes = [], []
    try:
        infos = log[start:]
    except IndexError:  # more graphs than the bounded log keeps (backend.COMPILE_LOG_SIZE)
        infos = log[log.first:]
        notes.append(f"{len(log) - start} graphs were compiled; only the last {len(infos)} are "
                     f"kept (backend.COMPILE_LOG_SIZE) and listed, numbered from 0")
    breaks = [f"{k.strip().splitlines()[0]} (x{v - breaks_before.get(k, 0)})"
              for k, v in counters["graph_break"].items() if v > breaks_before.get(k, 0)]
    for gi, info in enumerate(infos):
        for c in info.get("candidates", []):
            regions.append(Region(gi, c.form, c.where, c.rewritten, c.reason, dict(c.details),
                                  c.already_mxfp4))
        if info.get("cache_hit"):
            notes.append(f"graph {gi} came from the FX graph cache: its regions are not listed")
    if grad:
        notes.append("explain was called with grad enabled; the regions above were analyzed under "
                     "torch.no_grad(), the mode the backend rewrites in. " + GRAD_REASON)
    if not regions:
        notes.append("no MoE expert block found: expert GEMMs must read [E, N, K] / [E, K, N] "
                     "expert weights (gathered per token, grouped by expert, or dense over experts)")
        if breaks:
            notes.append("the model did not compile as one graph; a data-dependent experts loop "
                         "(e.g. transformers' 'eager' experts) cannot be captured: use "
                         "experts_implementation='batched_mm' or 'grouped_mm'")
    kernel = next((i.get("kernel") for i in infos if i.get("kernel")), None)
    why = next((i.get("kernel_reason") for i in infos if i.get("kernel")), None)
    return ExplainReport(regions, kernel, why, grad, len(infos), breaks, notes)
