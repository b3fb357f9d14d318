"""Kernel choice (capability table, env override, clear errors) and padding rules, on CPU: a CUDA
device is faked by monkeypatching torch.cuda's capability queries."""
import importlib

import pytest
import torch

import mxfp4_compile  # noqa: F401
from mxfp4_compile.ops import dispatch, weights

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
    with pytest.raises(ValueError, match="MXFP4_KERNEL kernel 'cutlass' is unknown"):
        dispatch.choose_kernel("cpu")


def test_unknown_kernel():
    with pytest.raises(ValueError, match=r"requested kernel 'cutlass' is unknown.*'reference'"):
        dispatch.choose_kernel("cpu", "cutlass")
    with pytest.raises(ValueError, match="unknown MXFP4 MoE kernel 'cutlass'"):
        dispatch.get_kernel("cutlass")
    with pytest.raises(ValueError, match="unknown"):
        dispatch.padded_sizes("cutlass", 64, 64)


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
    backend = dispatch.get_kernel(kernel)
    assert backend.NAME == kernel
    for attr in ("unavailable_reason", "prepare", "moe", "prepared_shapes"):
        assert callable(getattr(backend, attr))
    hm, im = dispatch.padding(kernel)
    assert (hm, im) == (backend.H_MULTIPLE, backend.I_MULTIPLE)
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
    if fi._load_cached()[0] is None:  # found by spec (faked) but not importable: a clear error
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
