"""Minimal reproducers (CPU) of the upstream behaviours behind the generate fixes of
mxfp4_compile/hf_generate.py and graph_inputs.py (benchmarks/notes/e2e.md, session 13).

1. A function compiled with backend A and called inside a torch.compile with backend B is traced
   into B's graph: A never sees it. transformers' generate compiles decode that way around a
   user's compiled forward (GenerationMixin.get_compiled_call), on CUDA with a static cache.
2. transformers' sliding-window static cache keeps its length as a Python int; once the window is
   full, Dynamo makes it a SymInt input of the decode graph, whose value changes every step (CUDA
   graph trees record one graph per value of an int input).
3. The host cost of a decode step's guards: Dynamo guards every tensor the 24-layer forward reads
   (parameters, cache tensors) and evaluates the guards before each call ("TorchDynamo Cache
   Lookup" in torch.profiler). The backend does not change them ("eager" here, so that it runs in
   seconds); generate syncs once per step, so this host time adds to every token.
4. Host values made device tensors outside the compiled graph, every decode step: with a static
   cache, generate builds the 4-D masks in eager before each step (prepare_inputs_for_generation
   -> create_masks_for_generate), and transformers' eager_mask (gpt-oss's attention) makes
   torch.tensor(0.0, device=mask.device) once per mask type (sliding and full). On CUDA that is a
   synchronous copy from pageable host memory: the host waits there for the previous step's GPU
   work, so deferring the stop check (hf_generate.defer_stop_check) hides only part of the host
   time. Counted on CPU by recording the calls (the same Python path runs on CUDA; a .to(device)
   cannot be told from a no-op here, so only torch.tensor(..., device=...) is counted).

    python benchmarks/repro_generate.py
"""
import collections
import os
import traceback

import torch
import transformers


def tiny_gpt_oss(layers=2):
    """A small GptOss model (sliding and full attention layers alternating), static cache."""
    cfg = transformers.GptOssConfig(vocab_size=128, hidden_size=64, intermediate_size=64,
                                    num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                                    head_dim=32, num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
                                    layer_types=["sliding_attention", "full_attention"] * (layers // 2),
                                    max_position_embeddings=64, pad_token_id=0, eos_token_id=2)
    torch.manual_seed(0)
    m = transformers.GptOssForCausalLM(cfg).eval()
    m.generation_config.cache_implementation = "static"
    return m


def nested_compile():
    seen = []

    def backend(name):
        def compile_(gm, example_inputs):
            seen.append(name)
            return gm.forward
        return compile_

    inner = torch.compile(lambda x: x.sin() + 1, backend=backend("inner"))
    outer = torch.compile(lambda x: inner(x) * 2, backend=backend("outer"))
    outer(torch.randn(3))
    print(f"1. backends that compiled: {seen} (the inner backend is ignored)")


def sliding_window_int_input():
    m = tiny_gpt_oss()
    ints = []

    def backend(gm, example_inputs):
        ints.append([n.name for n, e in zip(gm.graph.find_nodes(op="placeholder"), example_inputs)
                     if isinstance(e, (int, torch.SymInt))])
        return gm.forward

    m.forward = torch.compile(m.forward, backend=backend)
    with torch.no_grad():
        m.generate(torch.randint(3, 128, (1, 6)), max_new_tokens=4, do_sample=False)
    print(f"2. int inputs per compiled graph (prefill, decode...): {ints}")


def decode_guard_cost(layers=24):
    from torch.profiler import ProfilerActivity, profile
    m = tiny_gpt_oss(layers)
    m.generation_config.disable_compile = True  # the user's compiled forward runs decode
    m.forward = torch.compile(m.forward, backend="eager")
    x = torch.randint(3, 128, (1, 6))
    with torch.no_grad():
        for _ in range(2):
            m.generate(x, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            m.generate(x, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    look = [e for e in prof.key_averages() if e.key == "TorchDynamo Cache Lookup"]
    entries = torch._dynamo.eval_frame._debug_get_cache_entry_list(m.forward._torchdynamo_orig_callable.__code__) \
        if hasattr(m.forward, "_torchdynamo_orig_callable") else []
    print(f"3. {layers} layers: guard evaluation {look[0].cpu_time_total / look[0].count:.0f} us per call "
          f"(mean of {look[0].count} calls, this CPU, under the profiler); {len(entries)} compiled graph(s) "
          f"for the frame")


def decode_host_values_to_device(steps=6):
    m = tiny_gpt_oss()
    m.generation_config.disable_compile = True
    m.forward = torch.compile(m.forward, backend="eager")
    x = torch.randint(3, 128, (1, 6))
    with torch.no_grad():
        m.generate(x, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)  # compile
    tensor = torch.tensor

    def count(n):
        sites = collections.Counter()

        def tensor_(*args, **kwargs):
            stack = traceback.extract_stack()[:-1]
            # generate's own code only: replacing torch.tensor also fails the compiled forward's
            # guard on it, and the recompiled forward would run this wrapper eagerly
            if kwargs.get("device") is not None and not any(f.name == "forward" for f in stack):
                frame = stack[-1]
                sites[f"{os.path.basename(frame.filename)}:{frame.lineno} {frame.name}"] += 1
            return tensor(*args, **kwargs)

        torch.tensor = tensor_
        try:
            with torch.no_grad():
                m.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        finally:
            torch.tensor = tensor
        return sites

    short, long = count(steps), count(steps + 4)  # the difference: 4 decode steps
    per_step = {k: (long[k] - short[k]) / 4 for k in long if long[k] > short[k]}
    print(f"4. transformers {transformers.__version__}: torch.tensor(host value, device=...) per decode "
          f"step outside the graph: " + ("; ".join(f"{k} x{v:g}" for k, v in sorted(per_step.items()))
                                         or "none"))


if __name__ == "__main__":
    nested_compile()
    sliding_window_int_input()
    decode_guard_cost(2)
    decode_guard_cost(24)
    decode_host_values_to_device()
