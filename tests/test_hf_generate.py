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
