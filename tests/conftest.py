"""Markers (registered in pyproject.toml, --strict-markers): slow, interpreter, subprocess, gpu.

The fast set is ``pytest -m "not slow"``. Tests mark themselves; this file only applies ``gpu``
where it can be read off cleanly, and makes ``gpu`` mean "skipped without CUDA":
  * every test of a file named ``*_cuda.py`` is a GPU test;
  * a test carrying a ``skipif`` whose reason says it needs a GPU ("needs a CUDA GPU", "needs an
    sm90 GPU ...") is a GPU test.
Tests marked ``interpreter`` skip, with the reason, where triton is not installed (the CPU torch
wheel does not bring it; the ``test`` extra does).
"""
import re

import pytest
import torch

_NEEDS_GPU = re.compile(r"\bneeds\b.*\bGPU\b")


def _gpu_only(item) -> bool:
    if item.path.name.endswith("_cuda.py"):
        return True
    return any(_NEEDS_GPU.search(str(m.kwargs.get("reason", ""))) for m in item.iter_markers("skipif"))


def _has_triton() -> bool:
    import importlib.util
    return importlib.util.find_spec("triton") is not None


def pytest_collection_modifyitems(config, items):
    cuda = torch.cuda.is_available()
    triton = _has_triton()
    for item in items:
        if not triton and item.get_closest_marker("interpreter") is not None:
            item.add_marker(pytest.mark.skip(reason="needs triton for the Triton interpreter "
                                                    "(pip install -e '.[test]' installs it)"))
        if _gpu_only(item) and item.get_closest_marker("gpu") is None:
            item.add_marker(pytest.mark.gpu)
        if not cuda and item.get_closest_marker("gpu") is not None:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
