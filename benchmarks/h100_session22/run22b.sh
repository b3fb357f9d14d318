#!/bin/bash
# session 22, call 2: ncu of _wgmma_fp8 GEMM1 (20b T=4096) and the bf16 Triton GEMM1; the new fp8 cuda tests
export PYTHONUNBUFFERED=1
R=$OUT/r22b; mkdir -p $R
pip install -q --no-build-isolation --no-deps -e . > $R/install.log 2>&1 || cat $R/install.log
export PYTHONPATH=$PWD:$PWD/.tk
NCU=$(which ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1); echo "ncu: $NCU"
for v in fp8 base; do
  timeout 120 $NCU --clock-control none --kernel-name regex:_gemm1_kernel --launch-skip 1 --launch-count 1 \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats --section ComputeWorkloadAnalysis --section Occupancy \
    python benchmarks/h100_session22/prof22.py 20b 4096 $v > $R/ncu_$v.txt 2>&1; echo "rc=$?" >> $R/ncu_$v.txt
  grep -E "Duration|L2 Cache Throughput|DRAM Throughput|Compute \(SM\)|Stall|Issue|Eligible|Active Warps|Registers|Warp Cycles|rc=" $R/ncu_$v.txt | head -30
done
timeout 250 python -m pytest -q --tb=short tests/ops/kernels/test_triton_moe_fp8_cuda.py -k gluon > $R/fp8_cuda2.log 2>&1; echo rc=$? >> $R/fp8_cuda2.log
tail -8 $R/fp8_cuda2.log
date
