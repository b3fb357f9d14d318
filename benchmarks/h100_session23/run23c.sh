#!/bin/bash
# session 23, call 3: the bench op run (all kernels, corrected floors) on the final code;
# TESTS=1 also runs the cuda tests of the decode kernels first
export PYTHONUNBUFFERED=1
R=$OUT/r23c; mkdir -p $R
T0=$(date +%s)
pip install -q --no-build-isolation --no-deps -e . > $R/install.log 2>&1 || cat $R/install.log
export PYTHONPATH=$PWD:$PWD/.tk
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv > $R/gpu.txt 2>&1; cat $R/gpu.txt
if [ -n "$TESTS" ]; then
  timeout 120 python -m pytest -q --tb=short tests/ops/kernels/test_triton_moe_cuda.py -k "mma2 or decode or direct" > $R/cuda_tests.log 2>&1; echo rc=$? >> $R/cuda_tests.log
  tail -3 $R/cuda_tests.log
fi
left=$((575 - $(date +%s) + T0))
echo "== bench op ($left s left)"; date
timeout $((left - 5)) python -m mxfp4_compile.bench op --no-progress --r-sets 2 --out $R/op --budget-s $((left - 90)) > $R/op.log 2>&1; echo rc=$? >> $R/op.log
tail -45 $R/op.log | cut -c1-400
date
cd $OUT && tar czf r23c.tgz r23c && rm -rf r23c
