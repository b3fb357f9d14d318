"""``python -m mxfp4_compile.bench checkpoint``: load a gpt-oss MXFP4 checkpoint from disk with
``mxfp4_compile.from_pretrained``, compile it with backend="mxfp4", run one forward; memory and
time at each step.

The checkpoint is written first (unless --dir already holds one) in the layout OpenAI publishes
(config ``quantization_config.quant_method == "mxfp4"``, safetensors shards with an index,
``*.mlp.experts.{gate_up_proj,down_proj}_{blocks,scales,bias}``), with random weights: uniform
random e2m1 codes, e8m0 scales drawn from 2**-9...2**-4 (the range real checkpoints sit in, so
activations stay finite), bf16 everything else (normal, std 0.02; norms 1). Shapes: gpt-oss-20b
(24 layers, 32 experts) and -120b (36 layers, 128 experts), both H = I = 2880, vocab 201088; tiny
for CPU tests. A checkpoint larger than one filesystem can be spread over several folders
(--spill: shards beyond the first folder's free space go to the next, linked into --dir).

Memory (CUDA allocator, bytes): resident after load, split into expert buffers (kernel layout,
padding included), the checkpoint's MXFP4 expert bytes, non-expert parameters and buffers; the
peak during load; after compile + one forward at --tokens tokens: the forward's peak above the
weights, the logits, and the CUDA-graph pool (a second compile with CUDA graphs: growth of the
allocator's reserved bytes). Host: peak RSS (it counts the shards' pages mapped while loading).
Agreement: the compiled logits against eager, CUDA graphs against no graphs, and stock Inductor
against eager on the same model (with random weights at full depth, routing flips make any two
implementations diverge; the stock pair shows by how much). With --generate N: transformers'
``generate`` (greedy, dynamic cache) of N tokens after a 16-token prompt, eager and with
``model.forward`` compiled by backend="mxfp4" (no CUDA graphs), ms per token.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import time

import torch

from ..formats import BLOCK

SHAPES = {  # gpt-oss configs as published (20b, 120b), and a tiny one for CPU tests
    "20b": dict(num_hidden_layers=24, num_local_experts=32),
    "120b": dict(num_hidden_layers=36, num_local_experts=128),
    "120b_2layers": dict(num_hidden_layers=2, num_local_experts=128),  # quick checks at 120b width
    "tiny": dict(num_hidden_layers=2, num_local_experts=4, hidden_size=64, intermediate_size=64,
                 num_attention_heads=2, num_key_value_heads=1, head_dim=32, vocab_size=256,
                 sliding_window=16, num_experts_per_tok=2, pad_token_id=0, eos_token_id=2),
}
GPT_OSS = dict(
    architectures=["GptOssForCausalLM"], model_type="gpt_oss", attention_bias=True, head_dim=64,
    hidden_act="silu", hidden_size=2880, intermediate_size=2880, max_position_embeddings=131072,
    num_attention_heads=64, num_key_value_heads=8, num_experts_per_tok=4, experts_per_token=4,
    rms_norm_eps=1e-5, rope_theta=150000, sliding_window=128, swiglu_limit=7.0,
    tie_word_embeddings=False, vocab_size=201088, initial_context_length=4096,
    rope_scaling=dict(beta_fast=32.0, beta_slow=1.0, factor=32.0, original_max_position_embeddings=4096,
                      rope_type="yarn", truncate=False),
    pad_token_id=199999, eos_token_id=200002, torch_dtype="bfloat16",
    quantization_config=dict(quant_method="mxfp4", modules_to_not_convert=[
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]))
SCALE_BYTES = (127 - 9, 127 - 4)  # e8m0 range of the random scales


def gpt_oss_config(shape: str) -> dict:
    cfg = dict(GPT_OSS, **SHAPES[shape])
    cfg["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention"
                          for i in range(cfg["num_hidden_layers"])]
    return cfg


def gpt_oss_tensors(cfg: dict):
    """(name, shape, dtype) of every tensor of a gpt-oss MXFP4 checkpoint for ``cfg``, layer by
    layer, from transformers' own model on the meta device (experts replaced by their MXFP4
    checkpoint tensors)."""
    import transformers
    c = dict(cfg)
    c.pop("quantization_config", None)
    config = transformers.GptOssConfig(**c)
    with torch.device("meta"):
        model = transformers.GptOssForCausalLM(config)
    E, H, I = cfg["num_local_experts"], cfg["hidden_size"], cfg["intermediate_size"]
    experts = {"gate_up_proj": (2 * I, H), "down_proj": (H, I)}
    for name, p in model.state_dict().items():
        head, _, leaf = name.rpartition(".")
        if head.endswith("mlp.experts") and leaf in experts:
            n, k = experts[leaf]
            yield f"{head}.{leaf}_blocks", (E, n, k // BLOCK, BLOCK // 2), torch.uint8
            yield f"{head}.{leaf}_scales", (E, n, k // BLOCK), torch.uint8
        else:
            yield name, tuple(p.shape), torch.bfloat16


def random_tensor(name: str, shape, dtype, gen: torch.Generator, device,
                  scale_bytes=SCALE_BYTES) -> torch.Tensor:
    if dtype == torch.uint8:
        lo, hi = scale_bytes if name.endswith("_scales") else (0, 256)
        return torch.randint(lo, hi, shape, dtype=torch.uint8, device=device, generator=gen)
    if "norm" in name:
        return torch.ones(shape, dtype=dtype, device=device)
    std = 0.02 if len(shape) >= 2 else 0.01
    return (torch.randn(shape, device=device, generator=gen) * std).to(dtype)


def write_checkpoint(path: str, config: dict, tensors, max_shard_bytes: int = 4 << 30,
                     spill: list[str] | None = None, reserve_bytes: int = 2 << 30) -> dict:
    """Write ``tensors`` ((name, tensor) pairs, or a callable per (name, shape, dtype) row)
    as safetensors shards with an index, plus ``config`` as config.json. ``spill``: folders for
    shards once ``path``'s filesystem (then each spill folder's) has less than ``reserve_bytes``
    free; such shards are linked into ``path``. -> {shard file: folder it lives in}."""
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    folders = [path] + list(spill or [])
    weight_map, where, shard, size = {}, {}, {}, 0

    def flush():
        nonlocal shard, size
        if not shard:
            return
        name = f"model-{len(where) + 1:05d}.safetensors"
        need = size + (64 << 20)
        folder = next((f for f in folders if shutil.disk_usage(f).free - need > reserve_bytes), None)
        if folder is None:
            raise OSError(f"no room for shard {name} ({size / 2**30:.1f} GiB) in {folders}")
        save_file(shard, os.path.join(folder, name), metadata={"format": "pt"})
        if folder != path:
            os.symlink(os.path.join(folder, name), os.path.join(path, name))
        where[name] = folder
        for k in shard:
            weight_map[k] = name
        shard, size = {}, 0

    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
        shard[name] = t.contiguous().cpu()
        size += nbytes
    flush()
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(os.path.getsize(os.path.join(path, n))
                                                  for n in where)}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return where


def write_random_gpt_oss(path: str, shape: str, seed: int = 0, device="cpu", spill=None,
                         max_shard_bytes: int = 4 << 30, scale_bytes=SCALE_BYTES) -> dict:
    cfg = gpt_oss_config(shape)
    gen = torch.Generator(device=device).manual_seed(seed)
    rows = ((n, random_tensor(n, s, d, gen, device, scale_bytes)) for n, s, d in gpt_oss_tensors(cfg))
    return write_checkpoint(path, cfg, rows, max_shard_bytes, spill)


def _gib(n) -> float:
    return round(n / 2**30, 3)


def _rel(a, b) -> float:
    a, b = a.float(), b.float()
    return round(float((a - b).norm() / b.norm()), 5)


def _buffers_bytes(modules) -> int:
    return sum(b.numel() * b.element_size() for m in modules for b in m.buffers() if b is not None)


def measure(path: str, device: str, tokens: int, cudagraphs: bool, kernel: str = "auto",
            generate: int = 0) -> dict:
    """Load, compile, forward; memory and times (module docstring)."""
    import mxfp4_compile
    from ..checkpoints import checkpoint_tensors
    from ..experts import Mxfp4Experts
    cuda = torch.device(device).type == "cuda"
    out = dict(path=path, device=device, tokens=tokens)
    ckpt = checkpoint_tensors(path)
    out["checkpoint_expert_gib"] = _gib(sum(
        e["data_offsets"][1] - e["data_offsets"][0] for k, (_, e) in ckpt.items() if ".experts." in k))
    out["checkpoint_other_gib"] = _gib(sum(
        e["data_offsets"][1] - e["data_offsets"][0] for k, (_, e) in ckpt.items() if ".experts." not in k))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    t0 = time.perf_counter()
    model = mxfp4_compile.from_pretrained(path, device_map=device, dtype=torch.bfloat16, kernel=kernel)
    out["load_s"] = round(time.perf_counter() - t0, 2)
    experts = [m for m in model.modules() if isinstance(m, Mxfp4Experts)]
    out["kernel"] = experts[0].kernel
    out["expert_buffers_gib"] = _gib(_buffers_bytes(experts))
    expert_ids = {id(b) for m in experts for b in m.buffers()}
    out["non_expert_gib"] = _gib(sum(t.numel() * t.element_size() for t in
                                     list(model.parameters()) + list(model.buffers()) if id(t) not in expert_ids))
    if cuda:
        out["resident_after_load_gib"] = _gib(torch.cuda.memory_allocated() - base)
        out["peak_during_load_gib"] = _gib(torch.cuda.max_memory_allocated() - base)
    out["host_peak_rss_gib"] = _gib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(3, model.config.vocab_size, (1, tokens), generator=gen).to(device)
    with torch.no_grad():
        eager = model(x).logits.float()
        del eager  # memory below is measured without it; the check re-runs eager at the end
        compiled = torch.compile(model, backend="mxfp4")
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() if cuda else 0
        t0 = time.perf_counter()
        logits = compiled(x).logits
        if cuda:
            torch.cuda.synchronize()
        out["compile_and_first_forward_s"] = round(time.perf_counter() - t0, 2)
        out["logits_gib"] = _gib(logits.numel() * logits.element_size())
        if cuda:
            out["forward_peak_above_weights_gib"] = _gib(torch.cuda.max_memory_allocated() - before)
            out["held_after_forward_gib"] = _gib(torch.cuda.memory_allocated() - before)
        from .. import backend
        info = backend.last_compile_info[-1]
        out["already_mxfp4_layers"] = info.get("already_mxfp4")
        out["routers"] = sorted({c.details.get("router", "") for c in info["candidates"]})
        ref = model(x).logits.float()
        out["rel_l2_compiled_vs_eager"] = _rel(logits, ref)
        if cuda and cudagraphs:
            torch.cuda.synchronize()
            before = torch.cuda.memory_reserved()
            graphed = torch.compile(model, backend="mxfp4", options={"cudagraphs": True})
            for _ in range(3):
                y = graphed(x).logits
            torch.cuda.synchronize()
            out["rel_l2_cudagraphs_vs_compiled"] = _rel(y, logits)
            del y
            # the graph pool is reserved, not allocated, once the outputs are freed
            out["cudagraph_reserved_growth_gib"] = _gib(torch.cuda.memory_reserved() - before)
        # random weights at full depth: a top-k flip changes a token's experts and the logits
        # diverge, in any two implementations; stock Inductor on the same model shows how much
        torch._dynamo.reset()
        stock = torch.compile(model)(x).logits
        out["rel_l2_inductor_vs_eager"] = _rel(stock, ref)
        out["rel_l2_compiled_vs_inductor"] = _rel(logits, stock)
        del ref, logits, stock
        if generate:  # transformers' generate (dynamic cache), eager then with a compiled forward
            prompt = x[:, :16]
            for name, fwd in (("eager", None), ("mxfp4", torch.compile(model.forward, backend="mxfp4"))):
                if fwd is not None:
                    model.forward = fwd
                model.generate(prompt, max_new_tokens=4, do_sample=False)  # warm / compile
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                toks = model.generate(prompt, max_new_tokens=generate, do_sample=False)
                if cuda:
                    torch.cuda.synchronize()
                out[f"generate_{name}_ms_per_token"] = round(1e3 * (time.perf_counter() - t0) / generate, 2)
                out[f"generate_{name}_new_tokens"] = int(toks.shape[1] - prompt.shape[1])
            del model.forward  # back to the class's forward
    if cuda:
        out["device_total_gib"] = _gib(torch.cuda.get_device_properties(0).total_memory)
        out["free_after_gib"] = _gib(torch.cuda.mem_get_info()[0])
    return out


def run(args) -> int:
    os.makedirs(args.out, exist_ok=True)
    path = args.dir
    if not os.path.exists(os.path.join(path, "config.json")):
        t0 = time.perf_counter()
        lo, hi = (int(b) for b in args.scale_bytes.split(","))
        where = write_random_gpt_oss(path, args.shape, args.seed, args.device,
                                     [s for s in args.spill.split(",") if s], scale_bytes=(lo, hi + 1))
        print(json.dumps(dict(wrote=path, shape=args.shape, shards=len(where),
                              folders=sorted(set(where.values())), write_s=round(time.perf_counter() - t0, 1))),
              flush=True)
    res = dict(shape=args.shape, **measure(path, args.device, args.tokens, args.cudagraphs, args.kernel,
                                           args.generate))
    line = json.dumps(res)
    print(line, flush=True)
    with open(os.path.join(args.out, f"checkpoint_{args.shape}.json"), "w") as f:
        f.write(line + "\n")
    return 0
