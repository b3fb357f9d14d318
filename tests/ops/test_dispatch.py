"""Kernel choice (capability table, env override, clear errors) and padding rules, on CPU: a CUDA
device is faked by monkeypatching torch.cuda's capability queries."""
import importlib
import typing

import pytest
import torch

import mxfp4_compile  # noqa: F401
from mxfp4_compile import formats
from mxfp4_compile.ops import dispatch, kernels, weights

CUDA = torch.device("cuda", 0)


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    monkeypatch.delenv("MXFP4_KERNEL", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.fixture
def fake_gpu(monkeypatch):
    """-> set(major, minor, flashinfer_installed): a CUDA GPU of that capability, on paper."""
    def set_gpu(major, minor=0, flashinfer=False):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))
        real = dispatch._has_module
        monkeypatch.setattr(dispatch, "_has_module",
                            lambda name: flashinfer if name == "flashinfer" else real(name))
    return set_gpu


def test_cpu_auto_is_reference():
    name, why = dispatch.choose_kernel("cpu")
    assert name == "reference" and "cpu" in why
    assert dispatch.choose_kernel(torch.device("cpu"), None)[0] == "reference"
    assert dispatch.choose_kernel("cpu", "reference") == ("reference", "requested (reference)")


def test_env_override(monkeypatch):
    monkeypatch.setenv("MXFP4_KERNEL", "reference")
    assert dispatch.choose_kernel("cpu") == ("reference", "MXFP4_KERNEL (reference)")
    monkeypatch.setenv("MXFP4_KERNEL", "triton")
    with pytest.raises(ValueError, match=r"'triton' \(MXFP4_KERNEL \(triton\)\).*TRITON_INTERPRET=1"):
        dispatch.choose_kernel("cpu")
    # the env replaces "auto" only, never an explicit request
    assert dispatch.choose_kernel("cpu", "reference")[0] == "reference"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.choose_kernel("cpu") == ("triton", "MXFP4_KERNEL (triton)")
    monkeypatch.setenv("MXFP4_KERNEL", "cutlass")
    with pytest.raises(ValueError, match=r"MXFP4_KERNEL='cutlass' is not a known .*kernel.*'reference'"):
        dispatch.choose_kernel("cpu")
    monkeypatch.setenv("MXFP4_KERNEL", "auto")  # the env may say "auto" too
    assert dispatch.choose_kernel("cpu")[0] == "reference"


def test_unknown_kernel():
    every = r"'auto', 'reference', 'triton', 'triton_kernels' or 'flashinfer'"
    with pytest.raises(ValueError, match=r"kernel='cutlass' is not a known MXFP4 MoE kernel; choose "
                                         + every):
        dispatch.choose_kernel("cpu", "cutlass")
    concrete = r"choose 'reference', 'triton', 'triton_kernels' or 'flashinfer'"
    with pytest.raises(ValueError, match=r"kernel='cutlass' is not a known.*" + concrete):
        dispatch.get_kernel("cutlass")
    with pytest.raises(ValueError, match=r"kernel='auto' is not a concrete.*choose_kernel"):
        dispatch.get_kernel("auto")
    with pytest.raises(ValueError, match="'cutlass' is not a known"):
        dispatch.padded_sizes("cutlass", 64, 64)


def test_kernel_names_have_one_home():
    assert dispatch.KERNELS is formats.KERNELS
    assert tuple(dispatch.KERNEL_MODULES) == formats.KERNELS
    assert formats.KERNEL_CHOICES == ("auto",) + formats.KERNELS == typing.get_args(formats.Kernel)


@pytest.mark.parametrize("check,argument,good,choices", [
    (formats.check_kernel, "kernel", "triton", "'auto', 'reference', 'triton', 'triton_kernels' or "
                                               "'flashinfer'"),
    (formats.check_rounding, "rounding", "round_up", "'floor' or 'round_up'"),
    (formats.check_activation, "activation", "silu_glu", "'swiglu_oai' or 'silu_glu'"),
])
def test_validators_name_argument_value_and_choices(check, argument, good, choices):
    assert check(good) == good
    for bad in ("nope", None, 3):
        with pytest.raises(ValueError) as e:
            check(bad)
        assert str(e.value).startswith(f"{argument}={bad!r} is not ") and str(e.value).endswith(choices)
    with pytest.raises(ValueError, match=r"^options\['x'\]='nope'"):
        check("nope", "options['x']")


@pytest.mark.parametrize("module", [f"mxfp4_compile.ops.kernels.{m}"
                                    for m in dispatch.KERNEL_MODULES.values()])
def test_every_kernel_module_satisfies_the_protocol(module):
    mod = importlib.import_module(module)  # triton_moe: import only, nothing runs
    assert kernels.protocol_mismatches(mod) == []
    assert dispatch.get_kernel(mod.NAME) is mod


def test_protocol_check_finds_what_is_wrong():
    import types
    bad = types.ModuleType("bad")
    bad.NAME, bad.H_MULTIPLE = "bad", "64"
    bad.unavailable_reason = lambda device: None
    bad.prepared_shapes = lambda E, Hp, Ip: []
    problems = kernels.protocol_mismatches(bad)
    assert any("H_MULTIPLE" in p for p in problems) and any("I_MULTIPLE" in p for p in problems)
    assert any(p.startswith("prepared_shapes") and "has_w13_bias" in p for p in problems)
    assert any(p.startswith("prepare must") for p in problems)
    assert any(p.startswith("moe must") for p in problems)
    assert not any(p.startswith("unavailable_reason") for p in problems)


def test_triton_on_cpu_needs_interpreter():
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        dispatch.choose_kernel("cpu", "triton")
    assert "TRITON_INTERPRET=1" in dispatch.unavailable_reason("triton", "cpu")
    # and the op says so instead of running anything
    p = weights.prepare_moe_weights(torch.randn(2, 128, 64), torch.randn(2, 64, 64),
                                    activation="swiglu_oai", kernel="triton", cache=False)
    with pytest.raises(RuntimeError, match=r"kernel 'triton' cannot run on cpu.*TRITON_INTERPRET=1"):
        torch.ops.mxfp4.moe(torch.randn(3, 64), torch.zeros(3, 2, dtype=torch.long), torch.rand(3, 2),
                            **p.moe_kwargs())


@pytest.mark.parametrize("kernel", ["triton_kernels", "flashinfer"])
def test_gpu_only_kernels_refuse_cpu(kernel):
    with pytest.raises(ValueError, match=f"'{kernel}'.*cannot run on cpu.*CUDA"):
        dispatch.choose_kernel("cpu", kernel)


@pytest.mark.parametrize("kernel", dispatch.KERNELS)
def test_padding_table(kernel):
    module = dispatch.get_kernel(kernel)
    assert module.NAME == kernel
    for attr in ("unavailable_reason", "prepare", "moe", "prepared_shapes"):
        assert callable(getattr(module, attr))
    hm, im = dispatch.padding(kernel)
    assert (hm, im) == (module.H_MULTIPLE, module.I_MULTIPLE)
    assert hm % 32 == 0 and im % 32 == 0  # whole MXFP4 blocks
    for h, i in ((2880, 2880), (1, 1), (hm, im), (hm + 1, 3 * im - 1), (4096, 1536)):
        hp, ip = dispatch.padded_sizes(kernel, h, i)
        assert hp % hm == 0 and h <= hp < h + hm
        assert ip % im == 0 and i <= ip < i + im


@pytest.mark.parametrize("major,minor,flashinfer,want", [
    (8, 0, False, "triton"), (8, 6, True, "triton"), (8, 9, False, "triton"),
    (9, 0, False, "triton"), (9, 0, True, "triton"),
    (10, 0, True, "flashinfer"), (10, 0, False, "triton"),
    (7, 5, False, "reference"), (7, 0, True, "reference"), (12, 0, True, "reference"),
])
def test_capability_table(fake_gpu, major, minor, flashinfer, want):
    fake_gpu(major, minor, flashinfer)
    name, why = dispatch._auto(CUDA)
    assert name == want and f"sm{major}{minor}" in why
    if want == "triton" and major == 10:
        assert "flashinfer" in why  # says how to get the faster kernel


@pytest.mark.parametrize("major,minor,flashinfer,want", [
    (8, 0, False, "triton"), (9, 0, False, "triton"), (10, 0, False, "triton"), (7, 5, False, "reference"),
])
def test_choose_kernel_on_fake_gpu(fake_gpu, major, minor, flashinfer, want):
    fake_gpu(major, minor, flashinfer)
    assert dispatch.choose_kernel(CUDA)[0] == want


def test_choose_flashinfer_on_sm100(fake_gpu, monkeypatch):
    fake_gpu(10, 0, flashinfer=True)
    fi = importlib.import_module("mxfp4_compile.ops.kernels.flashinfer_moe")
    if fi.API.load()[0] is None:  # found by spec (faked) but not importable: a clear error
        with pytest.raises(ValueError, match="'flashinfer'.*cannot run on cuda"):
            dispatch.choose_kernel(CUDA)
    monkeypatch.setattr(fi, "unavailable_reason", lambda device: None)
    name, why = dispatch.choose_kernel(CUDA)
    assert name == "flashinfer" and "sm100" in why


def test_requested_kernel_wrong_capability(fake_gpu):
    fake_gpu(7, 5)
    with pytest.raises(ValueError, match="'triton'.*sm80 or newer.*sm75"):
        dispatch.choose_kernel(CUDA, "triton")
    fake_gpu(8, 0)
    with pytest.raises(ValueError, match="'triton_kernels'.*sm90.*sm80"):
        dispatch.choose_kernel(CUDA, "triton_kernels")
    with pytest.raises(ValueError, match="'flashinfer'.*sm100.*sm80"):
        dispatch.choose_kernel(CUDA, "flashinfer")
    assert dispatch.choose_kernel(CUDA, "reference")[0] == "reference"  # runs anywhere


def test_env_override_on_fake_gpu(fake_gpu, monkeypatch):
    fake_gpu(9, 0)
    monkeypatch.setenv("MXFP4_KERNEL", "reference")
    assert dispatch.choose_kernel(CUDA) == ("reference", "MXFP4_KERNEL (reference)")
