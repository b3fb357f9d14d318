"""Kernel tests under the Triton interpreter run in a child process: TRITON_INTERPRET=1 must be set
before triton is imported, and the other tests of the same pytest run keep a normal triton. The
test file, run as a script, prints its results as one JSON line last."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_child(test_file: str, timeout: int = 600) -> dict:
    # the repo and tests/ (the child imports this module too)
    path = [str(REPO), str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(path))
    proc = subprocess.run([sys.executable, test_file], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
