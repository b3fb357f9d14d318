#!/bin/bash
# session 22, call 4: the final _wgmma_fp8 (per-row table constants): gluon fp8 cuda tests, A/B, fp8 accuracy at 2048 tokens
export PYTHONUNBUFFERED=1
R=$OUT/r22d; mkdir -p $R
T0=$(date +%s)
pip install -q --no-build-isolation --no-deps -e . > $R/install.log 2>&1 || cat $R/install.log
export PYTHONPATH=$PWD:$PWD/.tk
nvidia-smi --query-gpu=name --format=csv,noheader; date
timeout 150 python -m pytest -q --tb=short tests/ops/kernels/test_triton_moe_fp8_cuda.py -k "gluon or (4096 and swiglu) or (1000 and swiglu)" > $R/fp8_cuda.log 2>&1; echo rc=$? >> $R/fp8_cuda.log
tail -4 $R/fp8_cuda.log
OUT=$R timeout 150 python benchmarks/h100_session22/fp8ab.py 20b:4096,120b:4096,mixtral:4096,20b:16384 3 > $R/ab.log 2>&1; echo rc=$? >> $R/ab.log
cut -c1-330 $R/ab.log | tail -6
left=$((560 - $(date +%s) + T0))
timeout $((left - 5)) python benchmarks/fp8_accuracy.py --out $R --tokens 2048 > $R/acc.log 2>&1; echo rc=$? >> $R/acc.log
tail -30 $R/acc.log
date
