"""The backend on a CUDA GPU (skipped without one): the graphs CUDA produces (transformers'
grouped_mm is aten._grouped_mm with histc on int there), the auto-chosen GPU kernel, CUDA graphs.
Run on the GPU machine: pytest -q tests/test_backend_cuda.py"""
import copy

import pytest
import torch

import moe_zoo as z
from mxfp4_compile import backend

pytestmark = pytest.mark.gpu  # skipped without CUDA (tests/conftest.py)
BF16 = torch.bfloat16


def x(T=5):
    return torch.randn(T, z.H, generator=torch.Generator().manual_seed(T)).to(BF16).cuda()


@pytest.mark.parametrize("T", [7, 1])  # 1: a decode step (B=1, S=1)
@pytest.mark.parametrize("impl", ["batched_mm", "grouped_mm"])
@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "qwen3_moe"])
def test_transformers_on_cuda(family, impl, T):
    pytest.importorskip("transformers")
    m = z.hf_model(family, impl, layers=2).cuda()
    kd = {"gate_up_proj": 1, "down_proj": 1} if family == "gpt_oss" else {"gate_up_proj": -1, "down_proj": -1}
    z.check_rewrite_numerics(m, (z.token_ids(T).cuda(),), kd, n_moe=2, tight=3e-2)
    info = backend.last_compile_info[-1]
    assert info["kernel"] != "reference", info["kernel_reason"]
    if impl == "grouped_mm":
        (before, _), = z.record_pass_graphs(m, z.token_ids().cuda())
        assert "aten._grouped_mm" in before and "aten.histc" in before


@pytest.mark.parametrize("T", [7, 1])
@pytest.mark.parametrize("k", [1, 2])
def test_llama4_on_cuda(k, T):
    """transformers' Llama 4 (routing weights on the experts' input, dense bmm experts, a shared
    expert): every layer one mxfp4.moe(weights_on_input=True) on the GPU's kernel."""
    pytest.importorskip("transformers")
    m = z.hf_llama4(layers=2, k=k).cuda()
    c = z.check_rewrite_numerics(m, (z.token_ids(T).cuda(),), {"gate_up_proj": 1, "down_proj": 1},
                                 n_moe=2, tight=3e-2)
    assert "weights_on_input=True" in c.code
    info = backend.last_compile_info[-1]
    assert info["kernel"] != "reference", info["kernel_reason"]


def test_gpt_oss_reference_block_on_cuda():
    pytest.importorskip("gpt_oss.torch.model")
    m = z.gpt_oss_reference_block().cuda()
    z.check_rewrite_numerics(m, (x(7),), {"mlp1_weight": -1, "mlp2_weight": -1}, n_moe=1)


def test_reduce_overhead_uses_cuda_graphs():
    from torch._dynamo.utils import counters
    torch.manual_seed(0)
    m = z.GatherMoE().to(BF16).cuda()
    with torch.no_grad():
        q = z.quantize_experts_(copy.deepcopy(m), {"w13": -1, "w2": -1})
        torch._dynamo.reset()
        counters.clear()
        cm = torch.compile(m, backend="mxfp4", mode="reduce-overhead")
        for _ in range(3):
            out = cm(x(8))
        torch.cuda.synchronize()
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    assert z.rel_err(out, q(x(8))) < 2e-2


@pytest.mark.parametrize("kernel", ["triton", "reference"])
def test_weight_changes_reach_the_cuda_graph(kernel):
    """Under CUDA graphs the replay reads the prepared tensors at their captured addresses: a
    change is re-prepared into those very tensors, so the next replay computes with it."""
    torch.manual_seed(0)
    m = z.GatherMoE().to(BF16).cuda()
    with torch.no_grad():
        torch._dynamo.reset()
        cm = torch.compile(m, backend="mxfp4", options={"cudagraphs": True, "kernel": kernel})
        for _ in range(3):  # warm-up, record, replay
            cm(x(8))
        m.w2.mul_(-2)
        m.b13.add_(0.25)
        m.gate.weight.mul_(-1)  # not frozen: a static input the graph reads in place
        m.w13.data = torch.randn_like(m.w13) * 0.05
        for _ in range(2):
            out = cm(x(8))
        want = z.quantize_experts_(copy.deepcopy(m), {"w13": -1, "w2": -1})(x(8))
    assert z.rel_err(out, want) < 2e-2


@pytest.mark.parametrize("family", ["gpt_oss", "mixtral"])
def test_generate_recipe_decodes_in_one_cuda_graph(family):
    """transformers' recipe (static cache, model.forward compiled with mode="reduce-overhead"):
    the decode graph is compiled by us (generate's own compile switched off), captured (no
    cudagraph skip beyond the prefill's), not recompiled by later generates, and its tokens
    follow eager with the same MXFP4 weights."""
    pytest.importorskip("transformers")
    import mxfp4_compile as mc
    from torch._dynamo.utils import counters
    kw = dict(sliding_window=4) if family == "gpt_oss" else {}
    m = mc.quantize_(z.hf_model(family, "grouped_mm", layers=2, **kw).cuda())
    ids = z.token_ids(T=9).cuda()
    m.generation_config.cache_implementation = "static"
    m.generation_config.disable_compile = True
    with torch.no_grad():
        ref = m.generate(ids, max_new_tokens=8, do_sample=False, output_scores=True,
                         return_dict_in_generate=True)
    m.generation_config.disable_compile = False
    torch._dynamo.reset()
    counters.clear()
    m.forward = torch.compile(m.forward, backend="mxfp4", mode="reduce-overhead")
    with torch.no_grad():
        m.generate(ids, max_new_tokens=1, do_sample=False)  # the prefill only
        prefill_skips = counters["inductor"]["cudagraph_skips"]
        n = len(backend.last_compile_info)
        outs = [m.generate(ids, max_new_tokens=8, do_sample=False) for _ in range(3)]
    assert m.generation_config.disable_compile  # decode ran our compiled forward
    assert counters["inductor"]["cudagraph_skips"] == prefill_skips, dict(counters["inductor"])
    assert len(backend.last_compile_info) - n <= 2  # decode (specialized, then with the int)
    assert all(torch.equal(o, outs[0]) for o in outs)
    want = ref.sequences[0, -8:]
    for i, sc in enumerate(ref.scores):
        top = sc[0].float().topk(2).values
        if top[0] - top[1] < 1e-2:
            break
        assert outs[0][0, -8 + i] == want[i], (i, outs[0].tolist(), want.tolist())
