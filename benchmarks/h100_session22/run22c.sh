#!/bin/bash
# session 22, call 3: stall breakdown of _wgmma_fp8 GEMM1 vs the bf16 Triton GEMM1 (20b T=4096); silu gluon test
export PYTHONUNBUFFERED=1
R=$OUT/r22c; mkdir -p $R
pip install -q --no-build-isolation --no-deps -e . > $R/install.log 2>&1 || cat $R/install.log
export PYTHONPATH=$PWD:$PWD/.tk
NCU=$(which ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
M=""
for s in barrier long_scoreboard short_scoreboard wait math_pipe_throttle mio_throttle lg_throttle dispatch_stall membar not_selected selected no_instruction branch_resolving misc sleeping tex_throttle drain; do
  M="$M,smsp__average_warps_issue_stalled_${s}_per_issue_active.ratio"; done
M="${M:1},sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_tensor_op_gmma.sum,smsp__inst_executed.sum,lts__t_sectors_srcunit_tex_op_read.sum,sm__cycles_elapsed.avg"
for v in fp8 base; do
  timeout 100 $NCU --clock-control none --kernel-name regex:_gemm1_kernel --launch-skip 1 --launch-count 1 --metrics $M \
    python benchmarks/h100_session22/prof22.py 20b 4096 $v > $R/stall_$v.txt 2>&1; echo "rc=$?" >> $R/stall_$v.txt
  echo "== $v"; grep -E "smsp__|sm__|lts__|rc=" $R/stall_$v.txt | awk '{print $1, $NF}'
done
timeout 150 python -m pytest -q --tb=short tests/ops/kernels/test_triton_moe_fp8_cuda.py -k "gluon and silu" > $R/fp8_cuda3.log 2>&1; echo rc=$? >> $R/fp8_cuda3.log
tail -3 $R/fp8_cuda3.log
