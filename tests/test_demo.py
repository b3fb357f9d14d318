"""python -m mxfp4_compile demo: runs, rewrites every layer, and times against plain Inductor."""
import subprocess
import sys

import pytest


@pytest.mark.slow
@pytest.mark.subprocess
def test_demo_rewrites_and_compares_with_inductor():
    r = subprocess.run([sys.executable, "-m", "mxfp4_compile", "demo", "--layers", "2", "--hidden",
                        "64", "--intermediate", "64", "--tokens", "8", "--reps", "2"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert "rewritten: 2 of 2" in r.stdout, r.stdout
    assert "Inductor bf16" in r.stdout and "median of 2 calls" in r.stdout, r.stdout
