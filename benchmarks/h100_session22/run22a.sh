#!/bin/bash
# session 22, call 1 (H100): _wgmma_fp8 correctness (fp8 cuda tests), then A/B bf16 / fp8 gluon / fp8 triton
export PYTHONUNBUFFERED=1
R=$OUT/r22a; mkdir -p $R
T0=$(date +%s)
pip install -q --no-build-isolation --no-deps -e . > $R/install.log 2>&1 || cat $R/install.log
export PYTHONPATH=$PWD:$PWD/.tk
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv > $R/gpu.txt 2>&1
python -c "import torch,triton;print(torch.__version__,triton.__version__)" >> $R/gpu.txt 2>&1
cat $R/gpu.txt; date
echo "== fp8 cuda tests"
timeout 220 python -m pytest -q --tb=short tests/ops/kernels/test_triton_moe_fp8_cuda.py > $R/fp8_cuda.log 2>&1; echo rc=$? >> $R/fp8_cuda.log
tail -25 $R/fp8_cuda.log
left=$((570 - $(date +%s) + T0))
echo "== A/B ($left s left)"
OUT=$R timeout $((left - 5)) python benchmarks/h100_session22/fp8ab.py ${SHAPES:-20b:4096,120b:4096,mixtral:4096,20b:16384,120b:16384,20b:512} 3 > $R/ab.log 2>&1; echo rc=$? >> $R/ab.log
cut -c1-600 $R/ab.log | tail -12
date
