"""The joint_custom_post_pass the backend installs: run every form's matcher, rewrite what matched.

Runs in Inductor's fw_compiler_freezing before freeze(), on the inference graph whose first
placeholders are the (lifted, frozen) parameters, so the inserted weight transforms get folded."""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import logging
import os

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from ..ops import weights
from ..ops.dispatch import padded_sizes
from . import decode_gemv, dense, gather_bmm, grouped_mm, router, tp_allreduce
from .fx_utils import NoMatch
from .params import constant_nodes, param_name
from .region import Context
from .rewrite import rewrite

log = logging.getLogger("mxfp4_compile")

FORMS = (tp_allreduce, gather_bmm, grouped_mm, dense)


@dataclasses.dataclass
class Candidate:
    """One place that looked like an MoE expert block, rewritten or not (for logs and explain)."""
    form: str
    where: str                    # node / parameter names that locate it
    rewritten: bool
    reason: str = ""
    details: dict = dataclasses.field(default_factory=dict)
    already_mxfp4: bool = False   # a torch.ops.mxfp4.moe call in the model itself (Mxfp4Experts)


# Reports of the graphs compiled since the last take_reports(); the backend and explain read them.
_reports: list[list[Candidate]] = []


def take_reports() -> list[list[Candidate]]:
    out = list(_reports)
    _reports.clear()
    return out


def _sources() -> tuple[str, ...]:
    """The files whose code decides what the pass writes (its cache key): every module of passes/
    (whatever their names), ops/ and the format constants."""
    pkg = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    files = glob.glob(os.path.join(pkg, "passes", "*.py")) + \
        glob.glob(os.path.join(pkg, "ops", "**", "*.py"), recursive=True) + \
        [os.path.join(pkg, "formats.py")]
    return tuple(sorted(files))


def _moe_nodes(graph) -> set:
    return {n for n in graph.nodes if n.op == "call_function" and n.target is torch.ops.mxfp4.moe.default}


class MoERewritePass(CustomGraphPass):
    """Find the MoE expert blocks of one graph and replace each with torch.ops.mxfp4.moe."""

    def __init__(self, kernel: str, rounding: str = "floor", param_names: list | None = None,
                 rewrite_enabled: bool = True, fuse_router: bool = True,
                 activations: str = "bf16", gemv: decode_gemv.Limits | None = None):
        self.kernel = kernel
        self.rounding = rounding
        self.activations = activations  # the op's GEMM input dtype (formats.Activations)
        self.param_names = param_names        # placeholder names, reports only; not in the cache key
        self.rewrite_enabled = rewrite_enabled  # False: only report (explain)
        self.fuse_router = fuse_router        # each rewritten MoE's routing -> topk_softmax
        self.gemv = gemv                      # few-row matmuls -> reductions (decode_gemv.py)
        self.gemvs = None                     # how many the last call rewrote (None: not called)

    def __call__(self, graph: torch.fx.Graph) -> None:
        tc = torch._guards.TracingContext.try_get()
        n_params = len(tc.params_flat) if tc is not None and tc.params_flat is not None else 0
        report = []
        existing = _moe_nodes(graph)  # the model's own MXFP4 experts (checkpoints.py)
        for form in FORMS:
            ctx = Context(graph, constant_nodes(graph, n_params), self.param_names)
            try:
                results = form.match(ctx)
            except Exception as e:  # a matcher bug must never break the user's compile
                log.warning("mxfp4: the %s matcher failed (%r); graph left as is", form.FORM, e)
                report.append(Candidate(form.FORM, "?", False, f"matcher error: {e!r}"))
                continue
            for r, where in results:
                if isinstance(r, NoMatch):
                    report.append(Candidate(form.FORM, where, False, str(r)))
                    continue
                details = dict(experts=r.num_experts, hidden=r.hidden_size,
                               intermediate=r.intermediate_size, top_k=r.top_k,
                               activation=r.activation.name,
                               weights=[param_name(w, self.param_names) for w in r.w13 + [r.w2]])
                if r.weights_on_input:
                    details["weights_on_input"] = True
                if r.note:
                    details["note"] = r.note
                if r.activation.name == "swiglu_oai":
                    details.update(alpha=r.activation.alpha, limit=r.activation.limit)
                if isinstance(r.hidden_size, int) and isinstance(r.intermediate_size, int):
                    hp, ip = padded_sizes(self.kernel, r.hidden_size, r.intermediate_size)
                    if (hp, ip) != (r.hidden_size, r.intermediate_size):  # zero padding: exact
                        details["padded"] = f"H {r.hidden_size}->{hp}, I {r.intermediate_size}->{ip}"
                if not self.rewrite_enabled:
                    report.append(Candidate(form.FORM, where, False, "report only", details))
                    continue
                before = _moe_nodes(graph)
                try:
                    getattr(form, "rewrite", rewrite)(graph, r, kernel=self.kernel, rounding=self.rounding,
                                                      activations=self.activations)
                except Exception as e:
                    log.warning("mxfp4: rewriting %s failed (%r); left as is", where, e)
                    report.append(Candidate(form.FORM, where, False, f"rewrite error: {e!r}", details))
                    continue
                if self.fuse_router:
                    for moe in _moe_nodes(graph) - before:
                        details["router"] = self._fuse_router(graph, moe, where)
                report.append(Candidate(form.FORM, where, True, "", details))
            graph.eliminate_dead_code()
        for moe in sorted(existing, key=lambda n: n.name):
            details = dict(kernel=moe.args[9] if len(moe.args) > 9 else moe.kwargs.get("kernel"))
            if details["kernel"] != self.kernel:
                details["note"] = (f"its weights are laid out for kernel {details['kernel']!r}; the "
                                   f"backend's kernel ({self.kernel!r}) applies to bf16 experts only "
                                   f"(mxfp4_compile.set_kernel re-lays a loaded model out)")
            where = param_name(moe.args[3], self.param_names)
            if self.fuse_router and self.rewrite_enabled:
                details["router"] = self._fuse_router(graph, moe, where)
            report.append(Candidate("mxfp4 experts", where, False, "already MXFP4", details,
                                    already_mxfp4=True))
        on = self.gemv is not None and self.rewrite_enabled
        self.gemvs = decode_gemv.rewrite(graph, self.gemv) if on else 0
        graph.eliminate_dead_code()
        graph.lint()
        _reports.append(report)
        weights.progress.expect(sum(c.rewritten for c in report))  # freeze() quantizes them next

    @staticmethod
    def _fuse_router(graph, moe, where) -> str:
        try:
            line = router.rewrite(graph, moe)
        except NoMatch as e:
            line = f"left as torch ops: {e}"
        except Exception as e:  # a matcher bug must never break the user's compile
            log.warning("mxfp4: fusing the router of %s failed (%r); left as is", where, e)
            line = f"left as torch ops: error {e!r}"
        log.info("mxfp4: router of %s: %s", where, line)
        return line

    def uuid(self):
        h = hashlib.sha256(get_hash_for_files(_sources()))
        h.update(repr((self.kernel, self.rounding, self.rewrite_enabled, self.fuse_router,
                       self.activations, self.gemv)).encode())
        return h.hexdigest()
