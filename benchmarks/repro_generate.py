"""Minimal reproducers (CPU) of the two upstream behaviours behind the generate fixes of
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

    python benchmarks/repro_generate.py
"""
import torch
import transformers


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
    cfg = transformers.GptOssConfig(vocab_size=128, hidden_size=64, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                    head_dim=32, num_local_experts=4, num_experts_per_tok=2,
                                    sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                                    max_position_embeddings=64, pad_token_id=0, eos_token_id=2)
    torch.manual_seed(0)
    m = transformers.GptOssForCausalLM(cfg).eval()
    m.generation_config.cache_implementation = "static"
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
    cfg = transformers.GptOssConfig(vocab_size=128, hidden_size=64, intermediate_size=64,
                                    num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                                    head_dim=32, num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
                                    layer_types=["sliding_attention", "full_attention"] * (layers // 2),
                                    max_position_embeddings=64, pad_token_id=0, eos_token_id=2)
    torch.manual_seed(0)
    m = transformers.GptOssForCausalLM(cfg).eval()
    m.generation_config.cache_implementation = "static"
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


if __name__ == "__main__":
    nested_compile()
    sliding_window_int_input()
    decode_guard_cost(2)
    decode_guard_cost(24)
