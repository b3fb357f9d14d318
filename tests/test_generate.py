"""transformers' generate with a static cache and a compiled forward, the way its docs tell users to
compile (``model.forward = torch.compile(model.forward, ...)``, ``cache_implementation="static"``),
and its own ``CompileConfig`` route, with backend="mxfp4" on CPU: bounded compilations, no
recompile on later generate calls, greedy tokens equal to the eager model with the same MXFP4
weights up to the first position where eager's top-2 logit margin is below ``MARGIN``, and
left-padded batches equal to one prompt at a time. (The CUDA-graphed recipe on the GPU machine is
benchmarks/notes/e2e.md's.)"""
import pytest
import torch

import moe_zoo as z

transformers = pytest.importorskip("transformers")

import mxfp4_compile as mc  # noqa: E402
from mxfp4_compile import backend  # noqa: E402

pytestmark = pytest.mark.slow  # a compile of prefill and decode per test: 10-25 s each
MARGIN = 1e-2   # bf16 logits of compiled and eager code differ by up to ~4e-3 here
NEW = 6


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test counts its own compiles: earlier tests' entries for the same forward code (the
    checkpoint tests compile these models too) would otherwise fill Dynamo's per-code recompile
    limit, after which the frame runs uncompiled."""
    torch._dynamo.reset()


def mxfp4_model(family, **overrides):
    m = z.hf_model(family, "grouped_mm", layers=2, **overrides)
    return mc.quantize_(m)  # eager and compiled then share the same MXFP4 weights


def compile_recipe(m):
    """transformers' compile recipe: a static cache and the forward compiled with ours."""
    m.generation_config.cache_implementation = "static"
    m.forward = torch.compile(m.forward, backend="mxfp4")


def eager_reference(m, x, **kw):
    with torch.no_grad():
        return m.generate(x, max_new_tokens=NEW, do_sample=False, output_scores=True,
                          return_dict_in_generate=True, **kw)


def agree(tokens, ref, row=0) -> int:
    """How many of tokens [NEW] were compared with ref's before the first step where ref's top-2
    margin is below MARGIN (a near-tie: either token is right); asserts they are equal."""
    want = ref.sequences[row, -NEW:]
    for i, sc in enumerate(ref.scores):
        top = sc[row].float().topk(2).values
        if (top[0] - top[1]) < MARGIN:
            return i
        assert tokens[i] == want[i], (i, tokens.tolist(), want.tolist())
    return NEW


@pytest.mark.parametrize("family", ["gpt_oss", "mixtral", "qwen3_moe"])
def test_static_cache_compiled_forward(family):
    m = mxfp4_model(family)
    x = z.token_ids(T=6)
    ref = eager_reference(m, x)
    compile_recipe(m)
    n = len(backend.last_compile_info)
    with torch.no_grad():
        first = m.generate(x, max_new_tokens=NEW, do_sample=False)
        compiled = len(backend.last_compile_info) - n
        again = [m.generate(x, max_new_tokens=NEW, do_sample=False) for _ in range(2)]
    assert 1 <= compiled <= 2, compiled  # prefill and decode
    assert len(backend.last_compile_info) - n == compiled, "a later generate recompiled"
    infos = backend.last_compile_info[n:]
    assert all(i.get("already_mxfp4") == 2 for i in infos), [i.get("already_mxfp4") for i in infos]
    assert all(torch.equal(a, first) for a in again)
    assert agree(first[0, -NEW:], ref) >= 3  # enough positions compared to mean something


def test_full_sliding_window_decodes_with_one_graph():
    """A prompt longer than gpt-oss's sliding window: the sliding layers' cache is full, its
    Python length grows every step and reaches the decode graph as an int input; the backend
    moves it out of the graph (one decode graph, no int input left), and the tokens still follow
    eager."""
    m = mxfp4_model("gpt_oss", sliding_window=4)
    x = z.token_ids(T=7)
    ref = eager_reference(m, x)
    compile_recipe(m)
    n = len(backend.last_compile_info)
    with torch.no_grad():
        outs = [m.generate(x, max_new_tokens=NEW, do_sample=False) for _ in range(2)]
    infos = backend.last_compile_info[n:]
    assert len(infos) <= 3, len(infos)  # prefill, decode (specialized once, then with the int)
    assert infos[-1]["host_ints"] == 1
    assert torch.equal(outs[0], outs[1]) and agree(outs[0][0, -NEW:], ref) >= 3


def test_prompts_of_several_lengths_share_one_decode_graph():
    """With transformers' max_cache_len the cache keeps one size: the second prompt length makes
    the prefill dynamic (one recompile), the decode graph serves every length, and each prompt's
    tokens follow eager's."""
    m = mxfp4_model("gpt_oss")
    prompts = [z.token_ids(T=t, seed=t) for t in (6, 9, 4)]
    refs = [eager_reference(m, x) for x in prompts]
    m.generation_config.max_cache_len = 32
    compile_recipe(m)
    n = len(backend.last_compile_info)
    with torch.no_grad():
        outs = [m.generate(x, max_new_tokens=NEW, do_sample=False) for x in prompts]
    assert len(backend.last_compile_info) - n <= 3  # prefill, decode, dynamic prefill
    compared = [agree(out[0, -NEW:], ref) for out, ref in zip(outs, refs)]  # asserts equality
    assert sum(compared) >= 2 * len(prompts), compared  # near-ties end some comparisons early


def test_transformers_compile_config_route():
    """generate compiles the model itself when given a CompileConfig (on CPU only with
    _compile_all_devices): backend="mxfp4" serves it, and nothing stops transformers from
    compiling a model with MXFP4 experts (no quantizer is attached)."""
    m = mxfp4_model("gpt_oss")
    assert getattr(m, "hf_quantizer", None) is None
    x = z.token_ids(T=6)
    ref = eager_reference(m, x)
    cc = transformers.CompileConfig(backend="mxfp4", fullgraph=False)
    cc._compile_all_devices = True
    m.generation_config.compile_config = cc
    m.generation_config.cache_implementation = "static"
    n = len(backend.last_compile_info)
    with torch.no_grad():
        outs = [m.generate(x, max_new_tokens=NEW, do_sample=False) for _ in range(2)]
    infos = backend.last_compile_info[n:]
    assert infos and all(i.get("already_mxfp4") == 2 for i in infos)
    assert torch.equal(outs[0], outs[1]) and agree(outs[0][0, -NEW:], ref) >= 3


def test_left_padded_batch_equals_one_at_a_time():
    m = mxfp4_model("qwen3_moe")
    a, b = z.token_ids(T=7, seed=1), z.token_ids(T=4, seed=2)
    pad = m.config.pad_token_id
    batch = torch.full((2, 7), pad)
    batch[0], batch[1, 3:] = a[0], b[0]
    mask = (torch.arange(7) >= torch.tensor([[0], [3]])).long()
    compile_recipe(m)
    with torch.no_grad():
        both = m.generate(batch, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                          pad_token_id=pad)
    del m.forward
    m.generation_config.cache_implementation = None
    for row, x in enumerate((a, b)):
        assert agree(both[row, -NEW:], eager_reference(m, x), 0) >= 3, row


def test_decode_projections_as_reductions():
    """options={"decode_gemv": True} (what "auto" does on sm90): the decode graph's one-row q and o
    projections become reductions (k, v and the router are narrower than the form's minimum N),
    the prefill's are left to Inductor, and the tokens still follow eager."""
    m = mxfp4_model("gpt_oss", hidden_size=256, num_attention_heads=4, head_dim=64)
    x = z.token_ids(T=6)
    ref = eager_reference(m, x)
    m.generation_config.cache_implementation = "static"
    m.forward = torch.compile(m.forward, backend="mxfp4", options={"decode_gemv": True})
    n = len(backend.last_compile_info)
    with torch.no_grad():
        out = m.generate(x, max_new_tokens=NEW, do_sample=False)
    gemvs = sorted(i["decode_gemvs"] for i in backend.last_compile_info[n:])
    assert gemvs == [0, 4], gemvs  # prefill (6 rows): none; decode: q and o of 2 layers
    assert agree(out[0, -NEW:], ref) >= 3
