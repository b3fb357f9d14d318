"""``python -m mxfp4_compile.bench e2e``: transformers ``generate`` with a static cache, compiled,
at gpt-oss-20b depth: backend="mxfp4" vs default Inductor bf16 (and our op with the
``triton_kernels`` kernel).

Model: ``GptOssForCausalLM`` at gpt-oss-20b sizes by default (24 layers, vocab 201088, hidden
2880, 32 experts top-4, 64 query / 8 KV heads of 64, sliding window 128 on every other layer),
random weights (normal, std 0.02), bf16, experts implementation "grouped_mm". ONE bf16 model is
shared by every backend (two full-depth bf16 copies do not fit 80 GB): each backend is its own
``torch.compile`` of ``model.forward``, put in place before its ``generate`` calls; the MXFP4
backends quantize the expert weights at compile time (the prepared tensors live beside the bf16
ones).

The users' recipe: ``generation_config.cache_implementation = "static"``, ``model.forward =
torch.compile(model.forward, backend=..., mode="reduce-overhead")``, ``generate``; with
``generation_config.disable_compile = True`` so that decode runs that compiled forward (what
backend="mxfp4" sets itself; without it transformers compiles decode again with its default
CompileConfig, which is Inductor with the same mode). The ``mxfp4_compileconfig`` backend times
transformers' other route instead: the plain forward, and ``CompileConfig(backend="mxfp4")``
with which generate compiles decode itself (its prefill then runs eager; on CPU too, through the
config's ``_compile_all_devices``). Inductor's graph partitions are off for
every backend (``torch._inductor.config.graph_partition = False``): on torch 2.11 the recipe
segfaults with them (benchmarks/notes/e2e.md).

Per group of shapes (``torch._dynamo.reset()`` between groups, so each group's graphs are
static): compile + warm each backend, then rounds in which every backend runs in turn
(interleaved), and medians with min/max over rounds:
  decode B     prompt --prompt tokens, batch B: ms per new token = (t(generate N2 tokens) -
               t(generate N1 tokens)) / (N2 - N1) (``min_new_tokens`` pins the counts), which
               removes prefill and setup;
  prefill P    time to first token: ``generate(max_new_tokens=1)`` of a [1, P] prompt.
Also: compile time (the first generate of a group, per backend), cudagraph skips counted by
Inductor during the group's decode compiles (``counters["inductor"]["cudagraph_skips"]``), the
experts form the bf16 decode ran (transformers switches grouped_mm to batched_mm for decode on
CUDA), allocated memory, and the model's byte floor per decode step (weights read once per step
at --floor-gbps).
"""
from __future__ import annotations

import contextlib
import csv
import functools
import json
import os
import statistics
import time
import traceback

import torch

from . import harness as Hn
from . import workloads as W

CSV_FIELDS = ["group", "backend", "metric", "batch", "prompt", "median_ms", "min_ms", "max_ms",
              "step_ms", "rounds", "compile_s", "cudagraph_skips", "kernel", "rewritten_moe", "already_mxfp4",
              "experts_form", "alloc_gb", "floor_ms", "tokens_compared", "first_diff",
              "margin_at_diff", "dlogit_at_diff", "logits_rel_l2", "logits_rel_l2_torch_topk",
              "router_ties", "status", "note", "layers",
              "device", "torch", "triton", "transformers"]
MXFP4_BACKENDS = {"mxfp4": {}, "triton_kernels": {"kernel": "triton_kernels"},
                  "mxfp4_torch_router": {"fuse_router": False},
                  "mxfp4_autotune": {"max_autotune": True},
                  "mxfp4_sync": {}, "mxfp4_host_masks": {}, "mxfp4_fresh_cache": {},
                  "mxfp4_cublas_gemv": {"decode_gemv": False},
                  "mxfp4_combo": {"inductor": {"combo_kernels": True}}}
# backend="mxfp4" with transformers' per-token stop check (host sync) that the backend otherwise
# defers on CUDA (hf_generate.defer_stop_check): the deferral's share of the speed
SYNC_STOP = {"mxfp4_sync", "inductor"}
# backend="mxfp4" with transformers' own eager masks (a host 0.0 per mask type per step before
# 5.25), which the backend otherwise builds on the device (hf_generate.sync_free_masks)
HOST_MASKS = {"mxfp4_host_masks", "inductor"}
# backend="mxfp4" with a static cache at a new address every generate (transformers' own), which
# the backend otherwise keeps at one address (hf_generate.stable_cache_memory); the decode graph
# is re-recorded when the address changes
FRESH_CACHE = {"mxfp4_fresh_cache", "inductor"}
# the same compiled function as "mxfp4"; only generate's host side differs
SAME_GRAPHS = ("mxfp4_sync", "mxfp4_host_masks", "mxfp4_fresh_cache")
# transformers' own route: generate compiles decode with CompileConfig(backend="mxfp4") and runs
# the prefill eager; the other backends compile the forward
CONFIG_ROUTE = "mxfp4_compileconfig"
SIZES = {
    "20b": dict(hidden_size=2880, intermediate_size=2880, num_attention_heads=64, num_key_value_heads=8,
                head_dim=64, num_experts_per_tok=4, sliding_window=128, num_local_experts=32,
                vocab_size=201088, num_hidden_layers=24),
    "tiny": dict(hidden_size=64, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
                 head_dim=32, num_experts_per_tok=2, sliding_window=8, num_local_experts=4,
                 vocab_size=256, num_hidden_layers=2),
}


def build_model(args, device):
    import transformers
    kw = dict(SIZES[args.size])
    if args.layers:
        kw["num_hidden_layers"] = args.layers
    n = kw["num_hidden_layers"]
    cfg = transformers.GptOssConfig(
        layer_types=(["sliding_attention", "full_attention"] * n)[:n],
        max_position_embeddings=max(4096, args.prefill + args.new_tokens + 8),
        pad_token_id=0, bos_token_id=1, eos_token_id=2, **kw)
    cfg._experts_implementation = "grouped_mm"
    torch.manual_seed(args.seed)
    with torch.device("meta"):
        m = transformers.GptOssForCausalLM(cfg)
    m = m.to(torch.bfloat16).to_empty(device=device)  # random init on the device: minutes faster
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif p.dim() >= 2:
                p.normal_(0.0, 0.02)
            else:
                p.normal_(0.0, 0.01)
        scale = getattr(args, "expert_scale", 1.0)
        if scale != 1.0:  # calmer experts: see __main__'s --expert-scale
            for layer in m.model.layers:
                for p in layer.mlp.experts.parameters():
                    p.mul_(scale)
    with torch.device(device):  # its inv_freq buffer, which to_empty left uninitialized
        m.model.rotary_emb = type(m.model.rotary_emb)(cfg)
    m.eval()
    m.generation_config.cache_implementation = "static"
    m.generation_config.disable_compile = True
    m.generation_config.pad_token_id = 0
    return m


def byte_floor_ms(model, kernel_bytes_per_layer, batch, gbps) -> float:
    """ms for the bytes one decode step must read at ``gbps``: the non-expert weights (attention,
    norms, router, LM head; not the embedding table, of which a step reads B rows) once, plus per
    layer the experts ``batch`` tokens select (the expected number of distinct ones for uniform
    routing)."""
    cfg = model.config
    other = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                if ".experts." not in n and "embed_tokens" not in n)
    e, k = cfg.num_local_experts, cfg.num_experts_per_tok
    distinct = e * (1 - (1 - k / e) ** batch)  # expected experts hit by batch tokens' top-k
    experts = kernel_bytes_per_layer * cfg.num_hidden_layers * distinct / e
    return (other + experts) / (gbps * 1e9) * 1e3


def expert_bytes_per_layer(model, backend) -> int:
    """bf16 expert parameters, or the MXFP4 codes + scales + biases of one layer."""
    cfg = model.config
    e, h, i = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
    if backend == "inductor":
        return sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                   if ".layers.0.mlp.experts." in n)
    return int(e * W.expert_bytes(h, i, biases=True))  # gpt-oss experts have both biases


def compiled_forward(model, backend, gpu, opts_extra):
    """-> the compiled forward ``use`` installs, or for CONFIG_ROUTE the CompileConfig."""
    route = _compiled_forward(model, backend, gpu, opts_extra)
    if callable(route):  # not on a CompileConfig: generate passes all its attributes to compile
        route._e2e_backend = backend  # use() reads it
    return route


def _compiled_forward(model, backend, gpu, opts_extra):
    fwd = type(model).forward.__get__(model)
    mode = "reduce-overhead" if gpu else None
    if backend == CONFIG_ROUTE:
        import transformers
        if opts_extra:
            cfg = transformers.CompileConfig(backend="mxfp4", mode=None,
                                             options=dict(opts_extra, cudagraphs=gpu))
        else:
            cfg = transformers.CompileConfig(backend="mxfp4", mode=mode)
        cfg._compile_all_devices = True  # transformers' switch for compiling off accelerators (CPU)
        return cfg
    if backend == "inductor":
        return torch.compile(fwd, mode=mode)
    opts = dict(MXFP4_BACKENDS[backend], **opts_extra)
    if not opts:
        return torch.compile(fwd, backend="mxfp4", mode=mode)
    return torch.compile(fwd, backend="mxfp4", options=dict(opts, cudagraphs=gpu))  # = that mode


def use(model, route) -> None:
    """Make ``generate`` run ``route``: a compiled forward (transformers' own compile off), or a
    CompileConfig (the model's plain forward; generate compiles decode with it). generate defers
    its stop check (no host sync per token) only for our backends, as the backend sets it up,
    not for Inductor (as users get it) nor mxfp4_sync; likewise it builds its eager masks on the
    device for our backends but not for Inductor nor mxfp4_host_masks, and keeps its static cache
    at one address for our backends but not for Inductor nor mxfp4_fresh_cache."""
    from .. import hf_generate
    be = getattr(route, "_e2e_backend", None) if callable(route) else None
    if be in SYNC_STOP:
        hf_generate.stop_deferring(model)
    else:
        hf_generate.defer_stop_check(model)
    if be in HOST_MASKS:
        hf_generate.host_masks(model)
    else:
        hf_generate.sync_free_masks(model)
    if be in FRESH_CACHE:
        hf_generate.fresh_caches(model)
    else:
        hf_generate.stable_cache_memory(model)
    gc = model.generation_config
    if callable(route):
        model.forward = route
        gc.disable_compile, gc.compile_config = True, None
    else:
        model.__dict__.pop("forward", None)
        gc.disable_compile, gc.compile_config = False, route


def _sync(gpu):
    if gpu:
        torch.cuda.synchronize()


def timed_generate(model, ids, n, gpu) -> float:
    mask = torch.ones_like(ids)
    _sync(gpu)
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    _sync(gpu)
    return time.perf_counter() - t0


@contextlib.contextmanager
def step_clock(model, gpu):
    """Marks the end of every forward of ``model`` while active: a CUDA event on the stream (no
    host sync; read after the block) or, on CPU, the host clock. Yields a list that gets, after
    the block, the ms between consecutive forwards' ends: in a generate, each decode step as the
    GPU completes it. Unlike the difference of two generates' wall times, per-call costs (a
    CUDA-graph re-recording, generate's setup) land in one step, which a median leaves out.
    For a compiled forward only (a forward hook, outside the compiled code)."""
    marks = []

    def hook(module, args, output):
        if gpu:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            marks.append(event)
        else:
            marks.append(time.perf_counter())

    handle = model.register_forward_hook(hook)
    gaps = []
    try:
        yield gaps
        _sync(gpu)
        gaps += ([a.elapsed_time(b) for a, b in zip(marks, marks[1:])] if gpu else
                 [(b - a) * 1e3 for a, b in zip(marks, marks[1:])])
    finally:
        handle.remove()


def experts_form(model) -> str:
    impl = getattr(model.config, "_experts_implementation", None)
    return f"{impl} (prefill), batched_mm (decode: transformers switches on CUDA)" \
        if impl == "grouped_mm" and next(model.parameters()).is_cuda else str(impl)


def run_group(model, group, backends, fwds, args, gpu, t_start, common, rows, write):
    """One group of shapes: compile and warm every backend, then interleaved timed rounds."""
    from .. import backend as mx_backend
    from torch._dynamo.utils import counters
    name, batch, prompt, metric = group
    g = torch.Generator().manual_seed(args.seed + batch * 7919 + prompt)
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt), generator=g).to(model.device)
    n1, n2 = (1, 1) if metric == "ttft" else (args.new_tokens // 4, args.new_tokens)
    live = []
    for be in backends:
        row = dict(common, group=name, backend=be, metric=metric, batch=batch, prompt=prompt)
        if args.budget_s and time.time() - t_start > args.budget_s:
            row.update(status="skipped", note=f"time budget ({args.budget_s:.0f} s) spent")
            rows.append(row)
            write(row)
            continue
        use(model, fwds[be])
        n_info = len(mx_backend.last_compile_info)
        skips0 = counters["inductor"]["cudagraph_skips"]
        try:
            row["compile_s"] = timed_generate(model, ids, n2, gpu)  # compiles prefill + decode
            timed_generate(model, ids, n2, gpu)  # CUDA graph trees record on a later call
            row["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"] - skips0
            infos = mx_backend.last_compile_info[n_info:]
            if be != "inductor":
                row["kernel"] = next((i["kernel"] for i in infos if i.get("kernel")), None)
                row["rewritten_moe"] = max((i.get("rewritten", 0) for i in infos), default=0)
            else:
                row["kernel"] = "bf16"
                row["experts_form"] = experts_form(model)
            row["floor_ms"] = byte_floor_ms(model, expert_bytes_per_layer(model, be), batch,
                                            args.floor_gbps) if metric == "decode" else None
            row["status"] = "ok"
            row["_times"], row["_generate"], row["_steps"] = [], [], []
            live.append(row)
        except Exception as e:  # noqa: BLE001 - one backend's failure is a row
            traceback.print_exc()
            row.update(status="error", note=f"{type(e).__name__}: {str(e)[:300]}")
            rows.append(row)
            write(row)
    for _ in range(args.rounds):
        for row in live:
            use(model, fwds[row["backend"]])
            if metric == "ttft":
                row["_times"].append(timed_generate(model, ids, 1, gpu) * 1e3)
            else:
                a = timed_generate(model, ids, n1, gpu)
                # a compiled forward (hooks run outside it); the CompileConfig route: no steps
                clock = (step_clock(model, gpu) if callable(fwds[row["backend"]]) else
                         contextlib.nullcontext([]))
                with clock as steps:
                    b = timed_generate(model, ids, n2, gpu)
                row["_steps"].append(steps)
                row["_times"].append((b - a) / (n2 - n1) * 1e3)
                row["_generate"].append(b * 1e3)
    for row in live:
        t = row.pop("_times")
        # e2e.json only: each round's figure, and its whole generate of --new-tokens (ms: what a
        # user waits for, including per-call costs such as a CUDA-graph re-recording)
        steps = row.pop("_steps")
        row.update(median_ms=statistics.median(t), min_ms=min(t), max_ms=max(t), rounds=len(t),
                   round_ms=t, generate_ms=row.pop("_generate"),
                   # decode: the median interval between forwards over every round's long generate
                   # (its first interval is the first decode step; prefill excluded), and each
                   # round's median (e2e.json)
                   step_ms=statistics.median(x for r in steps for x in r) if any(steps) else None,
                   round_step_ms=[statistics.median(r) for r in steps if r])
        if gpu:
            row["alloc_gb"] = torch.cuda.memory_allocated() / 2**30
        rows.append(row)
        write(row)


def compare_greedy(eager, compiled, margin: float) -> dict:
    """Two greedy ``generate`` results (``return_dict_in_generate``, ``output_logits``) of one
    prompt: the steps before the first token that differs had the same inputs, so their logits
    are a teacher-forced comparison. -> tokens_compared (steps before eager's top-2 margin first
    falls under ``margin``, all of them equal, or the first unequal one as first_diff),
    first_diff (None when all equal), eager's margin and the largest |logit difference| at that
    step, and the logits' rel-L2 over the steps with equal inputs."""
    n = len(eager.logits)
    a = eager.sequences[0, -n:]
    b = compiled.sequences[0, -n:]
    diff = next((i for i in range(n) if a[i] != b[i]), None)
    last = n - 1 if diff is None else diff
    le = torch.stack([eager.logits[i][0].float() for i in range(last + 1)])
    lc = torch.stack([compiled.logits[i][0].float() for i in range(last + 1)])
    compared = n
    for i in range(n):
        top = eager.logits[i][0].float().topk(2).values
        if top[0] - top[1] < margin:
            compared = i
            break
    at = last if diff is not None else None
    top = eager.logits[at][0].float().topk(2).values if at is not None else None
    return dict(tokens_compared=compared, first_diff=diff,
                margin_at_diff=float(top[0] - top[1]) if top is not None else None,
                dlogit_at_diff=float((le[-1] - lc[-1]).abs().max()) if at is not None else None,
                logits_rel_l2=float((le - lc).norm() / le.norm()))


@contextlib.contextmanager
def tie_broken_routers(model, lower: bool = True):
    """transformers' gpt-oss router, with exact ties at the top-k boundary sent to the lower expert
    index (``lower``: what mxfp4.topk_softmax does) or the higher one. torch.topk promises no order
    among equal values, and random bf16 router logits tie there for a few tokens in a hundred, each
    tie picking a different expert: a reference that leaves the order open differs from the fused
    router by those picks, not by its numbers. Yields a list that gets, per router call, a device
    tensor counting the tokens with such a tie."""
    import torch.nn.functional as F

    from ..ops.topk_softmax import _topk_lower_index
    (cls,) = {type(layer.mlp.router) for layer in model.model.layers}
    plain, ties = cls.forward, []

    def forward(self, hidden):  # GptOssTopKRouter.forward with the tie order fixed
        logits = F.linear(hidden, self.weight, self.bias)  # [T, E]
        E, k = logits.shape[-1], self.top_k
        key = logits.float() if lower else logits.float().flip(-1)
        top, ids = _topk_lower_index(key, min(k + 1, E))  # one more: is the k-th tied with it?
        if E > k:
            ties.append((top[:, k - 1] == top[:, k]).sum())
        ids = ids[:, :k] if lower else E - 1 - ids[:, :k]
        v = logits.gather(-1, ids)
        return logits, F.softmax(v, dim=1, dtype=v.dtype), ids

    cls.forward = forward
    try:
        yield ties
    finally:
        cls.forward = plain


def check_against_eager(model, args, gpu, common, rows, write, backend="mxfp4"):
    """The compiled model against the eager one with the same weights, one prompt generated
    greedily both ways. backend "mxfp4": the shared model is first quantized in place
    (``quantize_``, the backend's rounding; this frees its bf16 experts, so it runs after every
    timing) and both sides run the same MXFP4 weights. backend "inductor" (--check-control): stock
    Inductor's compile of the bf16 model against the bf16 eager model, before quantizing: how far
    any compile of this model moves from eager. The eager reference breaks router ties as the
    fused router does (``tie_broken_routers``); the figure against transformers' own router
    (torch.topk's order at ties) is reported beside it."""
    from .. import quantize_
    row = dict(common, group="check", backend=backend, metric="check", batch=1, prompt=args.prompt)
    try:
        if backend != "inductor":
            quantize_(model)
        torch._dynamo.reset()
        g = torch.Generator().manual_seed(args.seed + 17)
        ids = torch.randint(3, model.config.vocab_size, (1, args.prompt), generator=g).to(model.device)
        kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                  min_new_tokens=args.new_tokens, do_sample=False, output_logits=True,
                  return_dict_in_generate=True)
        use(model, type(model).forward.__get__(model))
        with torch.no_grad():
            plain = model.generate(ids, **kw)
            with tie_broken_routers(model) as ties:
                eager = model.generate(ids, **kw)
            use(model, compiled_forward(model, backend, gpu, {}))
            model.generate(ids, **kw)  # compile, record
            compiled = model.generate(ids, **kw)
        use(model, type(model).forward.__get__(model))
        weights_are = "bf16 weights" if backend == "inductor" else "same MXFP4 weights"
        row.update(compare_greedy(eager, compiled, args.margin), status="ok",
                   logits_rel_l2_torch_topk=compare_greedy(plain, compiled, args.margin)["logits_rel_l2"],
                   router_ties=int(sum(int(t) for t in ties)),
                   note=f"greedy tokens vs eager, {weights_are}, router ties to the lower index; "
                        f"margin tolerance {args.margin:g}")
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        row.update(status="error", note=f"{type(e).__name__}: {str(e)[:300]}")
    rows.append(row)
    write(row)


def groups(args):
    """Batch 1 decode, then the time to first token, then the other batches (in --batches order)."""
    dec = [(f"decode_b{b}", b, args.prompt, "decode") for b in (int(x) for x in args.batches.split(",") if x)]
    pre = [(f"prefill_{args.prefill}", 1, args.prefill, "ttft")] if args.prefill else []
    return dec[:1] + pre + dec[1:]


def run(args) -> int:
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    os.makedirs(args.out, exist_ok=True)
    info = Hn.device_summary(device)
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        print("[e2e] transformers is not installed: pip install 'mxfp4_compile[models]'", flush=True)
        return 2
    import mxfp4_compile  # noqa: F401  (registers backend="mxfp4")
    from ..ops import weights

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    if hasattr(torch._inductor.config, "graph_partition"):
        torch._inductor.config.graph_partition = False
    t_start = time.time()
    backends = [b for b in args.backends.split(",") if b]
    for b in backends:
        if b not in ("inductor", CONFIG_ROUTE) and b not in MXFP4_BACKENDS:
            raise SystemExit(f"unknown e2e backend {b!r}: use inductor, {', '.join(MXFP4_BACKENDS)}, "
                             f"{CONFIG_ROUTE}")
    model = build_model(args, device)
    layers = model.config.num_hidden_layers
    common = dict(layers=layers, device=info["device"], torch=info["torch"], triton=info["triton"],
                  transformers=info["transformers"])
    extra = {} if args.kernel == "auto" else {"kernel": args.kernel}
    rows = []
    csv_path = os.path.join(args.out, "e2e.csv")
    fh = open(csv_path, "w", newline="")
    writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()

    def write(row):
        writer.writerow({k: _fmt(row.get(k)) for k in CSV_FIELDS})
        fh.flush()
        print(f"[e2e] {row['group']} {row['backend']}: {row.get('status')} "
              f"median {_fmt(row.get('median_ms'))} ms, step {_fmt(row.get('step_ms'))} ms, "
              f"compile {_fmt(row.get('compile_s'))} s, "
              f"skips {row.get('cudagraph_skips')} {row.get('note') or ''}", flush=True)

    for group in groups(args):
        if args.budget_s and time.time() - t_start > args.budget_s:
            for be in backends:
                row = dict(common, group=group[0], backend=be, metric=group[3], batch=group[1],
                           prompt=group[2], status="skipped", note=f"time budget ({args.budget_s:.0f} s) spent")
                rows.append(row)
                write(row)
            continue
        torch._dynamo.reset()  # static graphs per group (automatic dynamic would mark B or P)
        fwds = {be: compiled_forward(model, be, gpu, extra) for be in backends}
        for same in SAME_GRAPHS:  # the same graphs, only generate's host side differs
            if "mxfp4" in fwds and same in fwds:
                fwds[same] = functools.partial(fwds["mxfp4"])  # keeps forward's signature
                fwds[same]._e2e_backend = same
        run_group(model, group, backends, fwds, args, gpu, t_start, common, rows, write)
        if args.profile and gpu and (group[3] == "ttft" or group[1] == 1):
            profile_group(model, fwds, group, args)
    if getattr(args, "check_control", False):  # bf16: before the check quantizes the model
        check_against_eager(model, args, gpu, common, rows, write, backend="inductor")
    if args.check:
        check_against_eager(model, args, gpu, common, rows, write)
    fh.close()
    weights.clear_cache()
    table = format_table(rows, info, args, layers)
    with open(os.path.join(args.out, "e2e.txt"), "w") as f:
        f.write(table)
    with open(os.path.join(args.out, "e2e.json"), "w") as f:
        json.dump(dict(info, rows=rows, elapsed_s=time.time() - t_start, args=vars(args)), f,
                  indent=1, default=str)
    print(table, flush=True)
    bad = [r for r in rows if r["status"] == "error"]
    print(f"[e2e] {len(rows) - len(bad)} of {len(rows)} rows ran; CSV {csv_path}", flush=True)
    return 0


def profile_group(model, fwds, group, args):
    """torch.profiler over one group's generate per backend: GPU time per kernel name and the
    compiled regions' host time, written to profile_<group>.txt (the component breakdowns of the
    notes). Decode: ``4 + --profile`` tokens (the first 4 are the prefill and warm steps to
    subtract); time to first token: one prefill."""
    from torch.profiler import ProfilerActivity, profile
    name, batch, prompt, metric = group
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt)).to(model.device)
    n = 1 if metric == "ttft" else 4 + args.profile
    with open(os.path.join(args.out, f"profile_{name}.txt"), "w") as f:
        for be, fwd in fwds.items():
            use(model, fwd)
            timed_generate(model, ids, min(n, 4), True)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                timed_generate(model, ids, n, True)
            f.write(f"{be}: generate of {n} token(s) at batch {batch}, prompt {prompt}\n")
            avg = prof.key_averages()
            f.write(avg.table(sort_by="cuda_time_total", row_limit=60, max_name_column_width=70))
            f.write("\nHost side (guards, graph launch, generate's own ops):\n")
            f.write(avg.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70))
            f.write("\n\n")


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else v


def _expert_scale(args) -> str:
    scale = getattr(args, "expert_scale", 1.0)
    return "" if scale == 1.0 else f" (experts x{scale:g})"


def format_table(rows, info, args, layers) -> str:
    by = {(r["group"], r["backend"]): r for r in rows}
    lines = [f"{info['device']}, torch {info['torch']}, triton {info['triton']}, transformers "
             f"{info.get('transformers')}; GptOssForCausalLM {args.size} sizes, {layers} layers, "
             f"random weights{_expert_scale(args)}, static cache, generate, CUDA graphs on GPU "
             f"(graph partitions off)",
             f"{'group':14s} {'backend':15s} {'median ms':>10s} {'min-max':>15s} {'step ms':>8s} {'vs inductor':>11s} "
             f"{'floor ms':>9s} {'x floor':>8s} {'compile s':>9s} {'skips':>5s} kernel"]
    for r in rows:
        if r["metric"] == "check":
            what = ("stock Inductor, bf16 weights" if r["backend"] == "inductor" else
                    f"{r['backend']}, same MXFP4 weights")
            lines.append(f"check vs eager ({what}, prompt {r['prompt']}): "
                         + (f"{r['status'].upper()}: {r.get('note')}" if r["status"] != "ok" else
                            f"tokens equal for the {r['tokens_compared']} steps before eager's top-2 "
                            f"margin < {args.margin:g}; first differing step {r['first_diff']} (eager "
                            f"margin there {_fmt(r['margin_at_diff'])}, max |dlogit| "
                            f"{_fmt(r['dlogit_at_diff'])}); logits rel-L2 over the equal-input steps "
                            f"{_fmt(r['logits_rel_l2'])} (eager with torch.topk's order at router "
                            f"ties: {_fmt(r.get('logits_rel_l2_torch_topk'))}; tied routings in the "
                            f"eager generate: {r.get('router_ties')})"))
            continue
        if r["status"] != "ok":
            lines.append(f"{r['group']:14s} {r['backend']:15s} {r['status'].upper()}: {str(r.get('note'))[:100]}")
            continue
        ind = by.get((r["group"], "inductor"), {})
        sp = ind.get("median_ms") / r["median_ms"] if r["backend"] != "inductor" and ind.get("median_ms") else None
        fl = r.get("floor_ms")
        xf = f"{r['median_ms'] / fl:.2f}" if fl else "-"
        st = r.get("step_ms")
        lines.append(f"{r['group']:14s} {r['backend']:15s} {r['median_ms']:10.3f} "
                     f"{r['min_ms']:7.3f}-{r['max_ms']:<7.3f} {(f'{st:.3f}' if st else '-'):>8s} "
                     f"{(f'{sp:.2f}x' if sp else '-'):>11s} "
                     f"{(f'{fl:.3f}' if fl else '-'):>9s} {xf:>8s} "
                     f"{r.get('compile_s', 0):9.1f} {str(r.get('cudagraph_skips')):>5s} "
                     f"{r.get('kernel')} {r.get('experts_form') or ''}")
    lines.append("decode: ms per new token, (t(N) - t(N/4)) / (3N/4) over two generates; step ms: the "
                 "median interval between forwards' ends on the stream within the N-token generates. "
                 "prefill: time to first token (ms). floor: weight bytes "
                 f"one decode step reads at {args.floor_gbps:g} GB/s. compile s: the group's first generate.")
    return "\n".join(lines) + "\n"
