"""hf_generate.py: a forward compiled with backend="mxfp4" is the one generate() runs for decode."""
import inspect
import warnings

import pytest
import torch

import moe_zoo as z

transformers = pytest.importorskip("transformers")

import mxfp4_compile as mc  # noqa: E402


def _model():
    torch._dynamo.reset()  # each test compiles its own model (the claim is made at compile time)
    return mc.quantize_(z.hf_model("qwen3_moe", "grouped_mm", layers=1))


def test_compiled_forward_switches_off_generates_own_compile():
    m = _model()
    assert not m.generation_config.disable_compile
    m.forward = torch.compile(m.forward, backend="mxfp4")
    with torch.no_grad():
        m(z.token_ids(T=3))
    assert m.generation_config.disable_compile  # generate now calls our compiled forward


def test_generates_own_mxfp4_compile_is_left_alone():
    m = _model()
    m.generation_config.compile_config = transformers.CompileConfig(backend="mxfp4")
    m.forward = torch.compile(m.forward, backend="mxfp4")
    with torch.no_grad():
        m(z.token_ids(T=3))
    assert not m.generation_config.disable_compile


def test_another_backend_in_compile_config_is_warned_about():
    m = _model()
    m.generation_config.compile_config = transformers.CompileConfig(backend="inductor")
    m.forward = torch.compile(m.forward, backend="mxfp4")
    with warnings.catch_warnings(record=True) as w, torch.no_grad():
        warnings.simplefilter("always")
        m(z.token_ids(T=3))
    assert any("decode will not run MXFP4" in str(x.message) for x in w)
    assert not m.generation_config.disable_compile


def test_a_plain_module_compile_is_not_touched():
    m = _model()
    cm = torch.compile(m, backend="mxfp4")  # no generate recipe: nothing to claim
    with torch.no_grad():
        cm(z.token_ids(T=3))
    assert not m.generation_config.disable_compile


# ---- the deferred stop check (no host sync per token on CUDA), scoped to the models we compile ----
def _ask(self, device, cache=None, cache_is_returned=False, is_assistant=False):
    """Stands for generate's decoding loop, whose ``self`` is the model asking."""
    from transformers.generation import utils as gen_utils
    return gen_utils.DeferredStopCheck.is_supported(device, cache, cache_is_returned, is_assistant)


class _Unhashable:  # a caller whose frame's `self` cannot be looked up in a set
    def __eq__(self, other):
        return False


def _has_deferred_stop_check():
    from transformers.generation import utils as gen_utils
    return hasattr(gen_utils, "DeferredStopCheck")


@pytest.mark.skipif(not _has_deferred_stop_check(), reason="this transformers has no DeferredStopCheck")
def test_stop_check_deferred_on_cuda_for_our_models_only(monkeypatch):
    from types import SimpleNamespace
    from mxfp4_compile import hf_generate
    monkeypatch.delenv("MXFP4_DEFER_STOP_CHECK", raising=False)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    ours, theirs = _model(), _model()
    assert not _ask(ours, cuda)  # transformers' own answer (mps only) before we compile it
    ours.forward = torch.compile(ours.forward, backend="mxfp4")
    with torch.no_grad():
        ours(z.token_ids(T=3))
    assert ours.generation_config.disable_compile
    assert _ask(ours, cuda)
    assert not _ask(theirs, cuda)  # another model in the same process: transformers' answer
    assert not _ask(ours, cpu)  # CPU has no events
    assert not _ask(ours, cuda, is_assistant=True)
    fixed = SimpleNamespace(is_croppable=False)  # a returned cache that cannot roll back
    assert not _ask(ours, cuda, cache=fixed, cache_is_returned=True)
    assert _ask(ours, cuda, cache=fixed, cache_is_returned=False)
    assert _ask(ours, cuda, cache=SimpleNamespace(is_croppable=True), cache_is_returned=True)
    assert not _ask(_Unhashable(), cuda)  # not one of ours, and no TypeError
    hf_generate.stop_deferring(ours)
    assert not _ask(ours, cuda)
    monkeypatch.setenv("MXFP4_DEFER_STOP_CHECK", "0")
    assert not hf_generate.defer_stop_check(ours) and not _ask(ours, cuda)


@pytest.mark.skipif(not _has_deferred_stop_check(), reason="this transformers has no DeferredStopCheck")
def test_compile_config_route_defers_too(monkeypatch):
    monkeypatch.delenv("MXFP4_DEFER_STOP_CHECK", raising=False)
    m = _model()
    cfg = transformers.CompileConfig(backend="mxfp4")
    cfg._compile_all_devices = True  # transformers compiles decode on CPU too
    m.generation_config.compile_config = cfg
    m.generation_config.cache_implementation = "static"
    with torch.no_grad():
        m.generate(z.token_ids(T=3).reshape(1, -1), max_new_tokens=3, do_sample=False)
    assert _ask(m, torch.device("cuda"))


# ---- generate's eager attention masks, built on the device for the models we compile ----
def _mask_cases():
    from transformers import masking_utils as mu
    pad = torch.ones(2, 32, dtype=torch.bool)  # absolute positions: the mask starts at 0
    pad[0, :5] = False  # a left-padded row
    for fn in (mu.causal_mask_function, mu.sliding_window_causal_mask_function(6)):
        for q_len, kv_len, q_off, kv_off in ((1, 24, 23, 0), (7, 24, 0, 0), (1, 6, 3, 0)):
            for dtype in (torch.float32, torch.bfloat16):
                yield dict(batch_size=2, q_length=q_len, kv_length=kv_len, q_offset=q_off,
                           kv_offset=kv_off, mask_function=fn, attention_mask=pad[:, :kv_off + kv_len],
                           dtype=dtype)


def test_device_eager_mask_equals_transformers():
    from transformers import masking_utils as mu
    from mxfp4_compile import hf_generate
    ours = hf_generate._device_eager_mask(mu)
    n = 0
    for kw in _mask_cases():
        want, got = mu.eager_mask(**kw), ours(**kw)
        assert got.dtype == want.dtype == kw["dtype"] and torch.equal(got, want), kw
        assert (got == 0).any() and (got < 0).any()  # both kinds of entries present
        n += 1
    assert n == 12


def _host_zero_sites(model, n):
    """torch.tensor(host value, device=...) calls made by transformers' masking code during a
    generate of n tokens (on CUDA each is a copy from pageable memory: a host sync)."""
    import traceback
    tensor, sites = torch.tensor, [0]

    def tensor_(*args, **kwargs):
        if kwargs.get("device") is not None and any(
                f.filename.endswith("masking_utils.py") for f in traceback.extract_stack()[:-1]):
            sites[0] += 1
        return tensor(*args, **kwargs)

    torch.tensor = tensor_
    try:
        with torch.no_grad():
            out = model.generate(z.token_ids(T=20).reshape(1, -1), max_new_tokens=n,
                                 min_new_tokens=n, do_sample=False)
    finally:
        torch.tensor = tensor
    return sites[0], out


def _ours_and_theirs():
    """Two 2-layer gpt-oss models (sliding + full attention) set up for transformers' static-cache
    recipe: ours (MXFP4, its forward compiled with backend="mxfp4") and a plain bf16 one."""
    torch._dynamo.reset()
    ours = mc.quantize_(z.hf_model("gpt_oss", "grouped_mm", layers=2))
    theirs = z.hf_model("gpt_oss", "grouped_mm", layers=2)
    for m in (ours, theirs):
        m.generation_config.cache_implementation = "static"
        m.config._attn_implementation = "eager"
    ours.forward = torch.compile(ours.forward, backend="mxfp4")
    return ours, theirs


def test_decode_masks_without_host_values_for_our_models_only(monkeypatch):
    """The scoped switch: our compiled model's generate makes no host 0.0 in its masks, the same
    tokens as with transformers' masks; another model in the process keeps transformers' own.
    The switch is taken as on (transformers 5.25 makes its 0 on the device already, so there both
    counts are 0; CI runs this on 5.17 too, where the other model's count is > 0)."""
    from mxfp4_compile import hf_generate
    monkeypatch.setattr(hf_generate, "_eager_mask_copies_host_value", lambda mu: True)
    ours, theirs = _ours_and_theirs()
    with torch.no_grad():
        ours(z.token_ids(T=3))  # the compile claims decode
    assert ours in hf_generate._sync_free
    n_ours, tokens = _host_zero_sites(ours, 6)
    assert n_ours == 0
    n_theirs, _ = _host_zero_sites(theirs, 6)
    hf_generate.host_masks(ours)  # transformers' masks for the same compiled model
    n_host, tokens_host = _host_zero_sites(ours, 6)
    assert torch.equal(tokens, tokens_host)
    assert n_theirs == n_host  # the wrapper is inert for models not in the set
    from transformers import masking_utils as mu
    assert mu.ALL_MASK_ATTENTION_FUNCTIONS["eager"] is mu.eager_mask  # the registry restored
    if "torch.tensor(" in inspect.getsource(mu.eager_mask):
        assert n_theirs > 0  # transformers' own masks copy host values (5.17)


# ---- static caches kept at one address from one generate() to the next ----
def _kv_ptrs(cache):
    return [(layer.keys.data_ptr(), layer.values.data_ptr()) for layer in cache.layers]


def _generate(model, ids, n=5):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                              min_new_tokens=n, do_sample=False, output_logits=True,
                              return_dict_in_generate=True)


def test_static_cache_memory_reused_zeroed_and_never_while_held():
    """Our compiled gpt-oss (sliding + full layers): a generate whose previous cache is gone gets
    that cache's memory (same addresses: the decode CUDA graph keeps its static inputs), fully
    overwritten by the prefill's cache (the pooled memory is poisoned with NaN here, and the logits
    stay those of a fresh cache); a cache the caller still holds is never reused nor written; no
    recompiles after the first call; another model keeps transformers' fresh caches."""
    import gc

    from torch._dynamo.utils import counters

    from mxfp4_compile import hf_generate
    ours, theirs = _ours_and_theirs()
    ids = [z.token_ids(T=12, seed=s) for s in range(3)]
    first = _generate(ours, ids[0])  # compiles; claims decode: the pool is on from its first step
    assert ours in hf_generate._stable
    graphs = counters["stats"]["unique_graphs"]
    del first
    gc.collect()
    out1 = _generate(ours, ids[0])
    cache1 = out1.past_key_values
    held = [layer.keys.clone() for layer in cache1.layers]
    out2 = _generate(ours, ids[1])  # cache1 still held: new memory, cache1 untouched
    assert all(p not in _kv_ptrs(out2.past_key_values) for p in _kv_ptrs(cache1))
    assert all(torch.equal(a, layer.keys) for a, layer in zip(held, cache1.layers))
    ptrs1 = _kv_ptrs(cache1)
    del out1, cache1
    gc.collect()
    mem = next(m for m in hf_generate._pools[ours] if m.owner() is None)
    for tensors in mem.tensors:  # stale entries must not reach the next generate
        tensors["keys"].fill_(float("nan"))
        tensors["values"].fill_(float("nan"))
    out3 = _generate(ours, ids[2])
    assert _kv_ptrs(out3.past_key_values) == ptrs1  # the freed cache's memory, reused
    assert counters["stats"]["unique_graphs"] == graphs  # no recompiles after the first call
    hf_generate.fresh_caches(ours)  # transformers' own fresh caches, same compiled model
    fresh = _generate(ours, ids[2])
    assert ours not in hf_generate._pools and ours not in hf_generate._stable
    assert torch.equal(out3.sequences, fresh.sequences)
    for a, b in zip(out3.logits, fresh.logits):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    _generate(theirs, ids[0])
    assert theirs not in hf_generate._stable and theirs not in hf_generate._pools


def test_cache_pool_is_bounded_and_evicts_only_free_memory():
    """Caches of POOL_SIZE + 1 shapes: the pool keeps POOL_SIZE; while every pooled cache is alive
    the next one stays out of the pool (its own tensors); once one is gone, the newcomer takes
    its place; a cache the caller passed in (user-defined) is never pooled."""
    import gc

    from transformers.cache_utils import StaticCache

    from mxfp4_compile import hf_generate
    model = z.hf_model("gpt_oss", "grouped_mm", layers=2)
    cfg = model.config

    def cache(batch):
        c = StaticCache(config=cfg, max_cache_len=16)
        c.early_initialization(batch, cfg.num_key_value_heads, cfg.head_dim, torch.float32, "cpu")
        return c

    n = hf_generate.POOL_SIZE
    live = [cache(b) for b in range(1, n + 1)]
    assert [hf_generate._settle_cache(model, c) for c in live] == ["new"] * n
    extra = cache(n + 1)
    own = [layer.keys for layer in extra.layers]
    assert hf_generate._settle_cache(model, extra) == "unpooled"
    assert all(layer.keys is k for layer, k in zip(extra.layers, own))  # left as it was
    assert len(hf_generate._pools[model]) == n
    del live[0]
    gc.collect()
    newcomer = cache(n + 2)
    assert hf_generate._settle_cache(model, newcomer) == "new" and len(hf_generate._pools[model]) == n
    theirs = cache(2)
    theirs._is_user_defined = True
    assert hf_generate._settle_cache(model, theirs) == "skipped"
    del live[0]  # batch 2's cache: gone, so the next batch-2 cache gets its memory
    gc.collect()
    again = cache(2)
    for layer in again.layers:  # what a prefill wrote
        layer.keys.normal_()
    keys = [layer.keys.clone() for layer in again.layers]
    old = [layer.keys for layer in again.layers]
    assert hf_generate._settle_cache(model, again) == "reused"
    assert all(torch.equal(k, layer.keys) and layer.keys is not o  # copied into pooled memory
               for k, o, layer in zip(keys, old, again.layers))
    del again
    gc.collect()
    longer = StaticCache(config=cfg, max_cache_len=32)  # generate's length only grows: free
    longer.early_initialization(1, cfg.num_key_value_heads, cfg.head_dim, torch.float32, "cpu")
    assert hf_generate._settle_cache(model, longer) == "new"  # shorter caches' memory is dropped
    assert [m.length for m in hf_generate._pools[model] if m.owner() is None] == []
    assert {m.length for m in hf_generate._pools[model]} == {16, 32}  # the live ones stay
    hf_generate.release_cache_memory(model)
    assert model not in hf_generate._pools


def _live_tensor_bytes():
    """Bytes of the distinct storages of every tensor Python can reach."""
    import gc
    gc.collect()
    seen = {}
    for obj in gc.get_objects():
        if type(obj) in (torch.Tensor, torch.nn.Parameter) and not obj.is_meta:  # no fake tensors
            s = obj.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def test_repeated_generates_neither_recompile_nor_grow_memory():
    """Five generates of our compiled model: after the first, no compile, and the memory Python
    can reach stays the same (the pooled cache is reused, nothing accumulates per call)."""
    from torch._dynamo.utils import counters

    from mxfp4_compile import hf_generate
    ours, _ = _ours_and_theirs()
    x = z.token_ids(T=12)
    sizes = []
    for i in range(5):
        _generate(ours, x).sequences  # noqa: B018 (the output is dropped at once)
        if i == 0:
            graphs = counters["stats"]["unique_graphs"]
        sizes.append(_live_tensor_bytes())
    assert counters["stats"]["unique_graphs"] == graphs
    assert len(hf_generate._pools[ours]) == 1
    assert sizes[1] == sizes[2] == sizes[3] == sizes[4], sizes
