#!/bin/bash
# session 22, call 5: the FP8 self-check with its new T=8192 problem (the Gluon prefill kernels)
export PYTHONUNBUFFERED=1
pip install -q --no-build-isolation --no-deps -e . > /tmp/install.log 2>&1 || cat /tmp/install.log
export PYTHONPATH=$PWD:$PWD/.tk
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 120 python -c "
import torch; from mxfp4_compile.ops.kernels import triton_moe as tm
for t in ((3,), (300,), (8192,)):
    tm._fp8_checked.clear()
    print('T', t, 'rel-L2', tm.fp8_self_check(torch.device('cuda'), tokens=t), flush=True)
tm._fp8_checked.clear()
print('default sizes: worst', tm.fp8_self_check(torch.device('cuda')))
"
date
