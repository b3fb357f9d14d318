"""The mxfp4 Dynamo backend: registration, options, grad mode, the weight transform (once per weight
per compile, folded away), the FX graph cache with two models, dynamic token counts, layer loops."""
import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import moe_zoo as z
from mxfp4_compile import backend
from mxfp4_compile.ops import weights

BF16 = torch.bfloat16
KD = {"w13": -1, "w2": -1}


def x(T=5):
    return torch.randn(T, z.H, generator=torch.Generator().manual_seed(T)).to(BF16)


def model(seed=0, **kw):
    torch.manual_seed(seed)
    return z.GatherMoE(**kw).to(BF16)


def test_registered_by_name():
    from torch._dynamo.backends.registry import lookup_backend
    assert "mxfp4" in torch._dynamo.list_backends()
    assert lookup_backend("mxfp4") is backend.mxfp4_backend


def test_options_and_modes():
    assert backend.resolve_options()["kernel"] == "auto"
    assert backend.resolve_options(mode="reduce-overhead")["cudagraphs"] is True
    assert backend.resolve_options(options={"cudagraphs": True, "kernel": "reference"})["kernel"] == "reference"
    with pytest.raises(ValueError, match="unknown option.*valid"):
        backend.resolve_options(options={"kernal": "reference"})
    with pytest.raises(ValueError, match="unknown mode"):
        backend.resolve_options(mode="fast")
    with pytest.raises(ValueError, match="rounding"):
        backend.resolve_options(options={"rounding": "nearest"})


def test_inductor_config_option_checked_and_applied():
    assert backend.resolve_options()["inductor"] == {}
    opts = backend.resolve_options(options={"inductor": {"combo_kernels": True}})
    assert backend._inductor_patches(opts)["combo_kernels"] is True
    with pytest.raises(ValueError, match=r"options\['inductor'\]\['combo_kernel'\] is not an Inductor"):
        backend.resolve_options(options={"inductor": {"combo_kernel": True}})
    with pytest.raises(ValueError, match=r"\['triton.cudagraphs'\] is set by the backend; use options\['cudagraphs'\]"):
        backend.resolve_options(options={"inductor": {"triton.cudagraphs": True}})
    with pytest.raises(ValueError, match="must be a dict"):
        backend.resolve_options(options={"inductor": "combo_kernels"})
    # a post-grad pass given through the option runs in the compile, beside the MoE rewrite
    seen = []

    def note(graph):
        seen.append(sum(n.target == torch.ops.mxfp4.moe.default for n in graph.nodes))
    torch._dynamo.reset()
    out, code = z.compile_run(model(), x(), options={"kernel": "reference",
                                                   "inductor": {"post_grad_custom_post_pass": note}})
    assert seen == [1] and z.moe_calls(code) == 1


def test_options_reach_the_rewrite():
    m = model()
    with torch.no_grad():
        ref_q = copy.deepcopy(m)
        for p in (ref_q.w13, ref_q.w2):
            p.copy_(z.qdq(p, -1, "round_up"))
        ref_q = ref_q(x())
    out, code = z.compile_run(m, x(), options={"kernel": "reference", "rounding": "round_up"})
    assert z.moe_calls(code) == 1 and "'reference'" in code
    assert z.rel_err(out, ref_q) < 2e-2


def test_fp8_activations_option():
    """options={"activations": "fp8"} reaches both ops of the rewrite and the kernel note; on
    CPU the reference kernel emulates it: close to the bf16-activation result, not equal."""
    m = model()
    out16, _ = z.compile_run(m, x(33), options={"kernel": "reference"})
    out8, code = z.compile_run(m, x(33), options={"kernel": "reference", "activations": "fp8"})
    assert z.moe_calls(code) == 1 and "activations = 'fp8'" in code.replace("activations='fp8'",
                                                                           "activations = 'fp8'")
    assert 1e-3 < z.rel_err(out8, out16) < 5e-2
    assert "activations fp8" in backend.last_compile_info[-1]["kernel_reason"]
    with pytest.raises(ValueError, match="activations"):
        backend.resolve_options(options={"activations": "int8"})
    with pytest.raises(ValueError, match="activations.*'fp8'.*kernel 'triton' on sm90"):
        backend.check_fp8_kernel("triton_kernels", torch.device("cpu"))


def test_reduce_overhead_mode_alone():
    m = model()
    out, code = z.compile_run(m, x(), mode="reduce-overhead")
    assert z.moe_calls(code) == 1


def test_grad_enabled_says_so_once_and_stays_correct():
    backend._warned.discard("grad")
    m = model()
    torch._dynamo.reset()
    with pytest.warns(UserWarning, match="torch.no_grad") as said:
        out = torch.compile(m, backend="mxfp4")(x())
    # the model's own dtype (bf16 here; a float32 model is named float32), not a blanket "bf16"
    msgs = [str(w.message) for w in said if "torch.no_grad" in str(w.message)]
    assert len(msgs) == 1 and "stays torch.bfloat16)" in msgs[0], msgs
    assert backend._model_dtypes([torch.zeros(2), torch.zeros(2, dtype=torch.int64)]) == \
        "torch.float32"
    assert z.rel_err(out.detach(), m(x()).detach()) < 1e-2
    assert backend.last_compile_info[-1]["grad_enabled"] and backend.last_compile_info[-1]["rewritten"] == 0
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second compile must not repeat it
        torch._dynamo.reset()
        torch.compile(model(1), backend="mxfp4")(x())


def test_transform_runs_once_per_weight_and_never_in_output_code():
    weights.clear_cache()
    m = model()
    n0 = weights.quantization_count()
    out, code = z.compile_run(m, x())
    assert weights.quantization_count() - n0 == 1  # one MoE layer: its weights prepared once
    assert "prepare_moe_weights" not in code and "mxfp4.quantize" not in code
    cm = torch.compile(m, backend="mxfp4")
    with torch.no_grad():
        for T in (5, 5, 5):
            cm(x(T))
    assert weights.quantization_count() - n0 == 1


@pytest.mark.slow
def test_dynamic_token_counts_bounded_compiles_no_requantization():
    weights.clear_cache()
    m = model()
    with torch.no_grad():
        q = z.quantize_experts_(copy.deepcopy(m), KD)
    torch._dynamo.reset()
    n_graphs, n_quant = len(backend.last_compile_info), weights.quantization_count()
    cm = torch.compile(m, backend="mxfp4")
    with torch.no_grad():
        for T in (1, 2, 3, 7, 64, 512, 33):
            out = cm(x(T))
            assert z.rel_err(out, q(x(T))) < 2e-2, T
    compiles = len(backend.last_compile_info) - n_graphs
    assert 1 <= compiles <= 3, compiles  # static, then dynamic T (plus Dynamo's 0/1 specialization)
    assert all(i["rewritten"] == 1 for i in backend.last_compile_info[n_graphs:])
    assert weights.quantization_count() - n_quant == 1


@pytest.mark.slow
def test_layer_loop_with_graph_breaks_gets_each_layers_weights():
    """A frame reused for every layer must not run layer 2 with layer 1's frozen weights."""
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.moe = z.GatherMoE()

        def forward(self, h):
            h = h + self.moe(h)
            torch._dynamo.graph_break()
            return h

    torch.manual_seed(0)
    m = torch.nn.Sequential(Block(), Block(), Block()).to(BF16)
    with torch.no_grad():
        ref_q = z.quantize_experts_(copy.deepcopy(m), KD)(x())
    with pytest.warns(UserWarning, match="once per MoE layer.*recompile_limit = L") as got:
        out, _ = z.compile_run(m, x())
    assert z.rel_err(out, ref_q) < 2e-2
    assert sum("once per MoE layer" in str(w.message) for w in got) == 1  # one message, not per layer


def moe_with_weights_as_inputs(h, gate_w, w13, w2):
    p = torch.softmax(h.float() @ gate_w.float().t(), dim=-1)
    w, ids = torch.topk(p, z.K, dim=-1)
    w = (w / w.sum(-1, keepdim=True)).to(h.dtype)
    hh = torch.einsum("tkoh,th->tko", w13[ids], h)
    a = torch.nn.functional.silu(hh[..., :z.I]) * hh[..., z.I:]
    return torch.einsum("tkh,tk->th", torch.einsum("tkhi,tki->tkh", w2[ids], a), w)


def test_weights_passed_as_inputs_are_not_rewritten_and_correct():
    m = model(activation="silu_glu", bias=False)
    args = (x(), m.gate.weight.detach(), m.w13.detach().clone(), m.w2.detach().clone())
    with torch.no_grad():
        ref = moe_with_weights_as_inputs(*args)
        torch._dynamo.reset()
        n = len(backend.last_compile_info)
        out = torch.compile(moe_with_weights_as_inputs, backend="mxfp4")(*args)
    cands = [c for i in backend.last_compile_info[n:] for c in i["candidates"]]
    assert [c.rewritten for c in cands] == [False]
    assert "not a frozen parameter" in cands[0].reason
    assert z.rel_err(out, ref) < 1e-2


_CACHE_SCRIPT = textwrap.dedent("""
    import copy, json
    import torch
    torch._inductor.config.cpp.weight_prepack = False  # mkldnn prepack makes frozen CPU graphs bypass the cache
    from torch._dynamo.utils import counters
    import moe_zoo as z
    x = torch.randn(5, z.H, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    outs, refs, calls = [], [], []
    for seed in (1, 2):
        torch.manual_seed(seed)
        m = z.GatherMoE().to(torch.bfloat16)
        with torch.no_grad():
            refs.append(z.quantize_experts_(copy.deepcopy(m), {"w13": -1, "w2": -1})(x))
        out, code = z.compile_run(m, x)
        calls.append(z.moe_calls(code))
        outs.append(out)
    c = counters["inductor"]
    print(json.dumps(dict(
        hit=c["fxgraph_cache_hit"], miss=c["fxgraph_cache_miss"], bypass=c["fxgraph_cache_bypass"],
        moe_calls=calls,
        own=[z.rel_err(outs[0], refs[0]), z.rel_err(outs[1], refs[1])],
        other=z.rel_err(outs[1], refs[0]))))
""")


@pytest.mark.slow
@pytest.mark.subprocess
def test_fx_graph_cache_two_models_same_shapes(tmp_path):
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path), TORCHINDUCTOR_FX_GRAPH_CACHE="1",
               PYTHONPATH=os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH")) if p))
    r = subprocess.run([sys.executable, "-c", _CACHE_SCRIPT], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])  # the child prints one JSON object last
    assert res["moe_calls"] == [1, 1], res  # both models rewritten
    assert (res["hit"], res["miss"], res["bypass"]) == (1, 1, 0), res  # the second model is served from the cache
    assert max(res["own"]) < 2e-2, res  # ... and still gets its own weights
    assert res["other"] > 0.5, res


@pytest.mark.slow
def test_release_bf16_weights_keeps_recompiles_working():
    weights.clear_cache()
    m = model()
    with torch.no_grad():
        q = z.quantize_experts_(copy.deepcopy(m), KD)
    torch._dynamo.reset()
    n_quant = weights.quantization_count()
    cm = torch.compile(m, backend="mxfp4", options={"release_bf16_weights": True})
    with torch.no_grad():
        for T in (5, 5, 9, 1, 33):
            assert z.rel_err(cm(x(T)), q(x(T))) < 2e-2, T
    assert m.w13.untyped_storage().nbytes() <= 2 and m.w2.untyped_storage().nbytes() <= 2
    assert m.gate.weight.untyped_storage().nbytes() == z.E * z.H * 2  # only expert weights go
    assert weights.quantization_count() - n_quant == 1


def test_inference_mode_rewrites_too():
    m = model()
    with torch.no_grad():
        q = z.quantize_experts_(copy.deepcopy(m), KD)(x())
    torch._dynamo.reset()
    with torch.inference_mode():
        out = torch.compile(m, backend="mxfp4")(x())
    assert backend.last_compile_info[-1]["rewritten"] == 1
    assert z.rel_err(out, q) < 2e-2


@pytest.mark.slow
@pytest.mark.subprocess
def test_entry_point_works_without_import():
    from importlib.metadata import entry_points
    if "mxfp4" not in entry_points(group="torch_dynamo_backends").names:
        pytest.skip("package not installed (pip install -e .): no entry point")
    code = ("import sys, torch\n"
            "m = torch.nn.Linear(64, 64).bfloat16()\n"
            "with torch.no_grad():\n"
            "    torch.compile(m, backend='mxfp4')(torch.randn(3, 64, dtype=torch.bfloat16))\n"
            "assert 'mxfp4_compile' in sys.modules\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       cwd=os.path.dirname(os.path.abspath(__file__)) + "/..")
    assert r.returncode == 0, r.stderr[-2000:]


def test_compile_log_is_bounded_and_keeps_absolute_indexes():
    log = backend.CompileLog(maxlen=4)
    for i in range(10):
        log.append({"i": i})
    assert log.kept == 4 and len(log) == 10 and log.first == 6
    assert [r["i"] for r in log] == [6, 7, 8, 9] and log[-1]["i"] == 9 and log[7]["i"] == 7
    assert [r["i"] for r in log[8:]] == [8, 9] and log[10:] == [] and len(log[:]) == 4
    with pytest.raises(IndexError, match="only the last 4 of 10 compiles are kept"):
        log[3:]  # a record that was dropped: refused, not silently left out
    with pytest.raises(IndexError, match="was dropped"):
        log[5]
    log.clear()
    assert len(log) == 0 and log.kept == 0 and log[0:] == []


def test_last_compile_info_stays_bounded_over_many_compiles():
    info = backend.last_compile_info
    assert isinstance(info, backend.CompileLog) and info.maxlen == backend.COMPILE_LOG_SIZE == 64
    n = len(info)
    for i in range(3 * info.maxlen):  # a long-running server: many more graphs than the bound
        info.append({"simulated": i})
    assert info.kept == info.maxlen and len(info) == n + 3 * info.maxlen
    start = len(info)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(lambda t: t * 2 + 1, backend="mxfp4")(torch.randn(4))  # a real compile
    torch._dynamo.reset()
    new = info[start:]
    assert len(new) == 1 and new[0]["rewritten"] == 0 and info[-1] is new[0]
    assert info.kept == info.maxlen
    info.clear()  # bench/e2e.py's API
    assert len(info) == 0 and list(info) == []


def test_summary_counts_the_layers_quantized_and_their_time():
    from test_frozen import Stack
    torch.manual_seed(0)
    m = Stack().to(BF16)
    torch._dynamo.reset()
    with torch.no_grad():
        cm = torch.compile(m, backend="mxfp4")
        cm(x(5))
        first = backend.last_compile_info[-1]
        cm(x(9))  # a recompile: both layers come from the store
        second = backend.last_compile_info[-1]
    assert (first["rewritten"], first["prepared"]) == (2, 2) and first["prepare_s"] > 0
    assert (second["rewritten"], second["prepared"], second["prepare_s"]) == (2, 0, 0.0)


def test_no_layer_loop_warning_after_a_reset():
    """Frame ids restart after torch._dynamo.reset(): a new model's first compile is not a
    recompile of the old one."""
    import warnings
    for seed in (0, 1):
        torch._dynamo.reset()
        with torch.no_grad(), warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            torch.compile(model(seed), backend="mxfp4")(x())
        assert not [w for w in got if "once per MoE layer" in str(w.message)], seed
