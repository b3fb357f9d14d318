"""hf_generate.py: a forward compiled with backend="mxfp4" is the one generate() runs for decode."""
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
