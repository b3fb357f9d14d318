"""The ``mxfp4`` Dynamo backend: ``torch.compile(model, backend="mxfp4")``.

What it does with the graph Dynamo hands it:
1. turns the expert-weight placeholders (frozen.py decides which, on this graph) into frozen
   module attributes (Dynamo only does that itself when freezing was on while it traced; setting
   freezing in a backend is too late: the weights would stay graph inputs and the weight
   transform would run on every call, docs/architecture.md §4); every other parameter and
   buffer stays a graph input, static for CUDA graphs;
2. picks the MoE kernel for the device (ops/dispatch.py; ``options={"kernel": ...}`` or
   ``MXFP4_KERNEL`` override "auto");
3. calls Inductor's compile_fx with freezing on, our joint_custom_post_pass (passes/manager.py) and
   CUDA graphs when asked (``mode="reduce-overhead"`` or ``options={"cudagraphs": True}``); for
   those, host-only int inputs leave the graph and in-place-written inputs are static
   (graph_inputs.py: one CUDA graph per decode step of a static KV cache), and Inductor's graph
   partitions are off.
A transformers model whose forward the user compiled is told to run that forward in
``generate``'s decode (hf_generate.py).

With grad enabled there is no freezing, so nothing can be rewritten: it says so once and compiles
with plain Inductor (still correct). The callable it returns checks, before each call, whether
the frozen expert weights changed, and has them re-prepared in place (frozen.WeightWatch).
"""
from __future__ import annotations

import collections
import logging
import warnings

import torch
import torch.fx as fx

from . import frozen, graph_inputs, hf_generate
from .formats import check_activations, check_kernel, check_rounding
from .passes import MoERewritePass, decode_gemv, take_reports

log = logging.getLogger("mxfp4_compile")

NAME = "mxfp4"

# options={...} keys; anything else is an error that lists these
OPTIONS = {
    "kernel": "auto",              # formats.Kernel: "auto" | "reference" | "triton" | ...
    "rounding": "floor",           # formats.Rounding, the MXFP4 scale rule for bf16 weights
    "cudagraphs": False,           # CUDA graphs (what mode="reduce-overhead" turns on)
    "max_autotune": False,         # Inductor max-autotune for the rest of the model
    "release_bf16_weights": False,  # free the bf16 expert weights once compiled (see README)
    "fallback_on_grad": True,      # grad enabled: compile without rewriting (False: raise)
    "fuse_router": True,           # the top-k routing of a rewritten MoE -> mxfp4.topk_softmax
    "check_weights": True,         # per call: re-prepare expert weights the user changed
    "activations": "bf16",         # formats.Activations: "fp8" = e4m3 GEMM inputs (W4A8, sm90)
    "decode_gemv": "auto",         # few-row matmuls -> reductions (passes/decode_gemv.py): "auto"
                                   # where measured (sm90), True anywhere, False never
    "inductor": None,              # more Inductor config for the compile, e.g. {"combo_kernels": True}
}

# Inductor config the backend sets itself: options["inductor"] may not name these (the message
# says which option to use instead, or why it is fixed)
_OWN_INDUCTOR_CONFIG = {
    "triton.cudagraphs": "options['cudagraphs'] (or mode='reduce-overhead')",
    "max_autotune": "options['max_autotune'] (or mode='max-autotune')",
    "freezing": "nothing: freezing is how the backend sees the weights it quantizes",
    "joint_custom_post_pass": "nothing: it runs the backend's MoE rewrite",
    "graph_partition": "nothing: off under CUDA graphs (transformers' static cache, backend.py)",
}

_warned = set()

# Inductor's graph partitions (torch >= 2.9) under CUDA graphs: off. With them, transformers'
# static-cache generate fails on torch 2.11: stock Inductor segfaults in a partition's static
# Triton launcher, and our compile raises "accessing tensor output of CUDAGraphs that has been
# overwritten" (the cache the prefill creates lives in a partition's graph pool). Without them a
# graph is captured whole (graph_inputs.py makes the decode step capturable) or skipped, and
# Inductor reports the skip.
GRAPH_PARTITION = False

COMPILE_LOG_SIZE = 64  # per-compile records kept (a long-running server must not grow memory)


class CompileLog:
    """Per-compile records (dicts), bounded: only the last ``maxlen`` are kept.

    Indexes are absolute: ``len(log)`` counts every compile recorded since the last ``clear()``
    (kept or not), so the idiom ``n = len(log); <compile>; log[n:]`` gives the compiles in between,
    and ``log[-1]`` is the latest. Asking for a record that was dropped (more than ``maxlen``
    compiles ago) raises IndexError instead of silently returning fewer records. Iteration and
    ``kept`` cover the retained records only."""

    def __init__(self, maxlen: int = COMPILE_LOG_SIZE):
        if maxlen < 1:
            raise ValueError(f"CompileLog: maxlen must be >= 1, got {maxlen}")
        self.maxlen = maxlen
        self._items: collections.deque = collections.deque(maxlen=maxlen)
        self._total = 0

    def append(self, info: dict) -> None:
        self._items.append(info)
        self._total += 1

    def clear(self) -> None:
        self._items.clear()
        self._total = 0

    @property
    def kept(self) -> int:
        """How many records are held now (at most ``maxlen``)."""
        return len(self._items)

    @property
    def first(self) -> int:
        """Absolute index of the oldest record still held."""
        return self._total - len(self._items)

    def __len__(self) -> int:
        return self._total

    def __iter__(self):
        return iter(list(self._items))

    def _dropped(self, i: int) -> IndexError:
        return IndexError(f"compile record {i} was dropped: only the last {self.maxlen} of "
                          f"{self._total} compiles are kept (backend.COMPILE_LOG_SIZE); read "
                          f"last_compile_info sooner, or clear() it before the compiles you watch")

    def __getitem__(self, i):
        if isinstance(i, slice):
            start, stop, step = i.indices(self._total)
            if step != 1:
                raise ValueError("CompileLog slices take no step")
            if i.start is None:
                start = max(start, self.first)
            if stop <= start:
                return []
            if start < self.first:
                raise self._dropped(start)
            items = list(self._items)
            return items[start - self.first:stop - self.first]
        if not isinstance(i, int):
            raise TypeError(f"CompileLog indices must be int or slice, not {type(i).__name__}")
        j = i + self._total if i < 0 else i
        if not 0 <= j < self._total:
            raise IndexError(f"compile record {i} out of range ({self._total} recorded)")
        if j < self.first:
            raise self._dropped(j)
        return self._items[j - self.first]

    def __repr__(self) -> str:
        return f"CompileLog({self.kept} kept of {self._total}, maxlen={self.maxlen})"


# One record per compiled graph (explain, the demo, bench/e2e.py and tests read it); bounded.
last_compile_info = CompileLog()


def _once(key, msg):
    """One visible warning per process (a Python warning; the log gets it at INFO, so that a user
    who turned our logger on does not read it twice)."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, stacklevel=3)
        log.info(msg)


def _model_dtypes(example_inputs) -> str:
    """The floating dtypes of the graph's tensors (parameters included), e.g. 'torch.float32'."""
    dtypes = sorted({str(t.dtype) for t in example_inputs
                     if isinstance(t, torch.Tensor) and t.is_floating_point()})
    return "/".join(dtypes) or "its own dtype"


def resolve_options(mode=None, options=None) -> dict:
    opts = dict(OPTIONS)
    if options:
        unknown = set(options) - set(OPTIONS)
        if unknown:
            raise ValueError(f"mxfp4 backend: unknown option(s) {sorted(unknown)}; valid: "
                             f"{sorted(OPTIONS)}")
        opts.update(options)
    if mode in (None, "default"):
        pass
    elif mode == "reduce-overhead":
        opts["cudagraphs"] = True
    elif mode == "max-autotune":
        opts["cudagraphs"], opts["max_autotune"] = True, True
    elif mode == "max-autotune-no-cudagraphs":
        opts["max_autotune"] = True
    else:
        raise ValueError(f"mxfp4 backend: unknown mode {mode!r}; use 'default', 'reduce-overhead', "
                         f"'max-autotune' or 'max-autotune-no-cudagraphs' (or options={{...}})")
    check_kernel(opts["kernel"], "mxfp4 backend: options['kernel']")
    check_rounding(opts["rounding"], "mxfp4 backend: options['rounding']")
    check_activations(opts["activations"], "mxfp4 backend: options['activations']")
    opts["inductor"] = check_inductor_config(opts["inductor"])
    if opts["decode_gemv"] not in ("auto", True, False):
        raise ValueError(f"mxfp4 backend: options['decode_gemv'] must be 'auto', True or False, got "
                         f"{opts['decode_gemv']!r}")
    return opts


def check_inductor_config(patches) -> dict:
    """options['inductor'] -> a dict of Inductor config patches, or a ValueError naming the key."""
    if patches is None:
        return {}
    if not isinstance(patches, dict):
        raise ValueError(f"mxfp4 backend: options['inductor'] must be a dict of Inductor config "
                         f"(torch._inductor.config) names to values, got {type(patches).__name__}")
    known = torch._inductor.config.get_config_copy()
    for key in patches:
        if key in _OWN_INDUCTOR_CONFIG:
            raise ValueError(f"mxfp4 backend: options['inductor'][{key!r}] is set by the backend; "
                             f"use {_OWN_INDUCTOR_CONFIG[key]}")
        if key not in known:
            raise ValueError(f"mxfp4 backend: options['inductor'][{key!r}] is not an Inductor config "
                             f"name (torch._inductor.config) on torch {torch.__version__}")
    return dict(patches)


def gemv_limits(setting, device: torch.device):
    """options['decode_gemv'] on this device -> the pass's limits, or None (matmuls left alone)."""
    if setting is False:
        return None
    lim = decode_gemv.limits_for(device)
    return lim if lim is not None or setting == "auto" else decode_gemv.DEFAULT


def check_fp8_kernel(kernel: str, device: torch.device) -> str:
    """The kernel-choice note for options['activations']='fp8', or a ValueError where the chosen
    kernel has no FP8 path: "triton" on sm90 runs it on fp8 tensor cores, "reference" emulates it
    in plain torch (CPU), every other kernel or GPU refuses it."""
    if kernel == "triton" and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9:
        return ("activations fp8: e4m3 GEMM inputs with per-row scales on fp8 tensor cores (W4A8; "
                "experimental: slower than bf16 activations today, benchmarks/notes/fp8.md)")
    if kernel == "reference":
        return "activations fp8: e4m3 GEMM inputs with per-row scales, emulated in plain torch"
    where = (f"sm{''.join(map(str, torch.cuda.get_device_capability(device)))}"
             if device.type == "cuda" else device.type)
    raise ValueError(f"mxfp4 backend: options['activations']='fp8' runs on kernel 'triton' on sm90 "
                     f"(Hopper) or kernel 'reference' (a plain-torch emulation); here the kernel is "
                     f"{kernel!r} on {where}: pass options={{'activations': 'bf16'}} or "
                     f"options={{'kernel': 'reference'}}")


def _device(example_inputs, params):
    for t in list(params) + list(example_inputs):
        if isinstance(t, torch.Tensor) and t.device.type != "cpu":
            return t.device
    return torch.device("cpu")


def _inductor_patches(opts):
    return dict(opts["inductor"], **{"triton.cudagraphs": bool(opts["cudagraphs"]),
                                     "max_autotune": bool(opts["max_autotune"])})


def mxfp4_backend(gm: fx.GraphModule, example_inputs, mode=None, options=None):
    """The Dynamo backend (registered as "mxfp4")."""
    from torch._inductor.compile_fx import compile_fx

    opts = resolve_options(mode, options)
    if torch.is_grad_enabled():
        msg = ("mxfp4 backend: grad is enabled, so the weights cannot be frozen and no MoE layer is "
               "rewritten to MXFP4 (the model is compiled with plain Inductor and stays "
               f"{_model_dtypes(example_inputs)}). Run the compiled model under torch.no_grad() or "
               "torch.inference_mode() for MXFP4.")
        if not opts["fallback_on_grad"]:
            raise RuntimeError(msg)
        _once("grad", msg)
        last_compile_info.append(dict(grad_enabled=True, rewritten=0, candidates=[]))
        return compile_fx(gm, example_inputs, config_patches=_inductor_patches(opts))

    from .ops import dispatch, weights

    hf_generate.claim_decode()
    keep, lifted, names = frozen.lift(gm, example_inputs, frozen.select(gm, example_inputs),
                                      frozen.float_constants(gm, example_inputs))
    # graph inputs after lifting: Dynamo calls the compiled function with these (or, on some
    # versions, with all of example_inputs)
    keep_all = keep
    host_ints = graph_inputs.split_host_ints(gm, [example_inputs[i] for i in keep])
    if host_ints is not None:
        keep = [i for j, i in enumerate(keep) if j not in host_ints.inputs]
    _note_layer_recompiles(lifted)
    device = _device(example_inputs, lifted)
    kernel, why = dispatch.choose_kernel(device, opts["kernel"])
    if opts["activations"] == "fp8":
        why = f"{why}; {check_fp8_kernel(kernel, device)}"
    # parameter order of AOTAutograd = named_parameters() order of gm = lift order
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    # names of the inner graph's placeholders: the lifted (frozen) tensors, then the kept inputs
    inputs = [frozen.qualified_name(frozen.source_name(getattr(n, "_dynamo_source", None))) or n.name
              for n in phs]  # after lift: the kept inputs, in order
    moe_pass = MoERewritePass(kernel, opts["rounding"], param_names=names + inputs,
                              fuse_router=bool(opts["fuse_router"]),
                              activations=opts["activations"],
                              gemv=gemv_limits(opts["decode_gemv"], device))
    patches = dict(_inductor_patches(opts), freezing=True, joint_custom_post_pass=moe_pass)
    if opts["cudagraphs"] and hasattr(torch._inductor.config, "graph_partition"):
        patches["graph_partition"] = GRAPH_PARTITION
    state = [frozen.is_state(n, example_inputs[i]) for n, i in zip(phs, keep)]
    take_reports()
    weights.progress.finish()
    try:
        inner = compile_fx(gm, [example_inputs[i] for i in keep], config_patches=patches,
                           inner_compile=_with_static_inputs(state, opts["cudagraphs"]))
    finally:
        n_prepared, prep_s = weights.progress.finish()
        if host_ints is not None:
            host_ints.restore(gm)
    reports = take_reports()
    cands = [c for r in reports for c in r]
    done = [c for c in cands if c.rewritten]
    already = [c for c in cands if c.already_mxfp4]
    info = dict(grad_enabled=False, kernel=kernel, kernel_reason=why, rewritten=len(done),
                already_mxfp4=len(already), candidates=cands, cache_hit=not reports,
                prepared=n_prepared, prepare_s=prep_s,
                host_ints=len(host_ints.inputs) if host_ints is not None else 0,
                decode_gemvs=moe_pass.gemvs)
    last_compile_info.append(info)
    if not reports:
        log.info("mxfp4: graph served from the FX graph cache (kernel %s: %s)", kernel, why)
    else:
        log.info("mxfp4: rewrote %d MoE layer(s) to torch.ops.mxfp4.moe, kernel %r (%s); "
                 "quantized %d layer(s) in %.1f s (the others came from the prepared-weight store)",
                 len(done), kernel, why, n_prepared, prep_s)
        if already:
            log.info("mxfp4: %d MoE layer(s) already MXFP4 (Mxfp4Experts); routers: %s", len(already),
                     "; ".join(sorted({c.details.get("router", "not fused") for c in already})))
        skipped = [c for c in cands if not c.rewritten and not c.already_mxfp4]
        if skipped:  # the user asked for MXFP4: a layer left in bf16 deserves a warning
            log.warning("mxfp4: %d MoE candidate(s) left unrewritten (bf16):%s", len(skipped),
                        "".join(f"\n  {c.form} at {c.where}: {c.reason}" for c in skipped))
    if lifted and reports and not done:  # expert-shaped weights, nothing rewritten: once a graph
        warnings.warn(f"mxfp4 backend: this graph reads expert-shaped weights ({', '.join(names[:4])}"
                      f"{', ...' if len(names) > 4 else ''}) but no MoE layer was rewritten to "
                      f"MXFP4; it runs in {_model_dtypes(example_inputs)}. "
                      f"mxfp4_compile.explain(model, *inputs) says why for each region.",
                      stacklevel=2)
    n_keep = len(keep)
    tensor_pos = [j for j in range(len(keep_all)) if host_ints is None or j not in host_ints.inputs]
    watch = frozen.WeightWatch(lifted, names, kernel, opts["rounding"])
    check = watch.check if opts["check_weights"] and lifted else None
    pending = [(done, lifted, names)] if opts["release_bf16_weights"] and done else []

    def run(*args):
        if check is not None:
            check()
        if host_ints is not None:
            kept = args if len(args) == len(keep_all) else [args[i] for i in keep_all]
            out = host_ints.merge(inner(*[kept[j] for j in tensor_pos]), kept)
        else:
            out = inner(*args) if len(args) == n_keep else inner(*[args[i] for i in keep])
        if pending:  # after the first call: Dynamo has built its guards from the live weights
            _release(*pending.pop())
            watch.rebase()
        return out

    return run


_frame_weights: dict = {}  # Dynamo frame id -> [ids of its first compile's frozen tensors, warned]


def _note_layer_recompiles(lifted) -> None:
    """A frame compiled again with other frozen weights is a layer loop with a graph break (one
    frame for every layer, recompiled per layer by the identity guards on its frozen weights):
    say once what that costs and what to set, before Dynamo's recompile limit runs the remaining
    layers uncompiled with only its generic warning."""
    cid = torch._guards.CompileContext.current_compile_id()
    if cid is None or not lifted or getattr(cid, "frame_id", None) is None:
        return
    ids = frozenset(map(id, lifted))
    if getattr(cid, "frame_compile_id", 0) == 0:  # a frame's first compile (frame ids restart
        _frame_weights[cid.frame_id] = [ids, False]  # after torch._dynamo.reset())
        return
    seen = _frame_weights.get(cid.frame_id)
    if seen is None or seen[0] == ids or seen[1]:
        return
    seen[1] = True
    limit = torch._dynamo.config.recompile_limit
    msg = (f"mxfp4 backend: a frame is being compiled once per MoE layer (compile {cid}: a layer "
           f"loop with a graph break, whose frozen expert weights differ per layer). Dynamo "
           f"compiles one frame at most torch._dynamo.config.recompile_limit = {limit} times and "
           f"runs the layers after that uncompiled (bf16). For a model of L layers set "
           f"torch._dynamo.config.recompile_limit = L (or more) before the first call, or remove "
           f"the graph break so that one graph holds every layer.")
    warnings.warn(msg, stacklevel=3)
    log.info(msg)


def _with_static_inputs(state: list, cudagraphs: bool = False):
    """Inductor's inner compile with the parameters and buffers left as graph inputs marked
    static. The freezing path hands the inner compile no static inputs (the indices it has are
    for the argument list before freezing), so under CUDA graphs every such input would be copied
    into the graph's memory at each replay (a model's attention weights and embeddings, every
    step). Stock Inductor marks them static: a replay reads them in place and re-records if one
    moves. ``state``: per graph input, whether it is a parameter or buffer. With CUDA graphs, the
    inputs the graph writes in place (a static KV cache) are static too (graph_inputs.py)."""
    from torch._inductor.compile_fx import compile_fx_inner

    def inner(gm, example_inputs, **kwargs):
        extra = len(example_inputs) - len(state)  # parameters freezing kept, ahead of the inputs
        if extra >= 0:
            static = set(range(extra)) | {extra + i for i, s in enumerate(state) if s}
            if cudagraphs:
                static |= set(graph_inputs.mutated_inputs(gm))
            kwargs["static_input_idxs"] = sorted(static)
        else:
            log.warning("mxfp4: %d graph inputs after freezing, %d expected; CUDA graphs may copy "
                        "parameters at each replay", len(example_inputs), len(state))
        return compile_fx_inner(gm, example_inputs, **kwargs)

    return inner


def _release(done, lifted, names):
    """Free the storage of bf16 expert weights the compiled graph no longer reads.

    The parameter keeps its shape (a zero-stride view of one zero), so a later recompile (the next
    call, whose stride guard fails once, or a new T) traces the same graph, and the prepared-weight
    store, told that this storage swap is ours (weights.rebase, by the caller), hands back the
    MXFP4 weights without reading the released values. The eager model is unusable afterwards (its
    expert weights are 0)."""
    expert = {w for c in done for w in c.details.get("weights", [])}
    for p, name in zip(lifted, names):
        if name in expert and p.numel() > 1:
            p.data = p.data.new_zeros(()).expand(p.shape)


def _register():
    from torch._dynamo.backends import registry
    try:
        registry._discover_entrypoint_backends()
    except Exception:
        pass
    if NAME in registry._COMPILER_FNS:
        return
    ep = registry._BACKENDS.get(NAME)
    if ep is not None and getattr(ep, "value", "") == f"{__name__}:mxfp4_backend":
        return  # the installed entry point loads this very function on first use
    registry.register_backend(mxfp4_backend, name=NAME)


_register()
