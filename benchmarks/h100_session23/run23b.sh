#!/bin/bash
# session 23, call 2: ncu on 120b T=4096's prefill GEMMs (Triton kernels, 128-row blocks) and
# _wgmma at 128 registers; decode A/B of _mma2 register caps and stages
export PYTHONUNBUFFERED=1
R=$OUT/r23b; mkdir -p $R
T0=$(date +%s)
pip install -q --no-build-isolation --no-deps -e . > $R/install.log 2>&1 || cat $R/install.log
export PYTHONPATH=$PWD:$PWD/.tk
NCU=$(which ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
ST=""
for s in barrier long_scoreboard short_scoreboard wait math_pipe_throttle mio_throttle lg_throttle not_selected selected dispatch_stall; do
  ST="$ST,smsp__average_warps_issue_stalled_${s}_per_issue_active.ratio"; done
MP="gpu__time_duration.sum,sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_elapsed,sm__inst_executed_pipe_tensor_op_gmma.sum,lts__throughput.avg.pct_of_peak_sustained_elapsed,lts__t_bytes.sum.per_second,lts__t_sectors_srcunit_tex_op_read.sum,lts__t_sector_op_read_hit_rate.pct,dram__bytes_read.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,smsp__inst_executed.sum,smsp__issue_active.avg.pct_of_peak_sustained_active,sm__warps_active.avg.pct_of_peak_sustained_active,launch__grid_size,launch__registers_per_thread,l1tex__data_pipe_lsu_wavefronts_mem_shared.sum,sm__cycles_elapsed.avg$ST"
echo "== ncu prefill 120b T=4096"; date
for v in base wgmma=True+wgmma_regs=128; do
  timeout 120 $NCU --csv --clock-control none --kernel-name regex:_gemm[12]_kernel --launch-skip 4 --launch-count 2 --metrics $MP \
    python .ab/prof23.py ncu 120b 4096 $v > $R/ncu_pre_120b_4096_${v:0:5}.csv 2>&1; echo "rc=$?" >> $R/ncu_pre_120b_4096_${v:0:5}.csv
  tail -1 $R/ncu_pre_120b_4096_${v:0:5}.csv
done
left=$((560 - $(date +%s) + T0))
echo "== decode A/B ($left s left)"; date
OUT=$R/ab timeout $((left - 10)) python benchmarks/gpu_check.py --no-peers --rounds 3 --shapes 20b:1,20b:8,20b:64,120b:8,120b:64,mixtral:8,mixtral:64 \
  --launch-ab "base,mma2_regs=72,mma2_regs=64,mma2_deep_per_sm=100,pps3,decode_max_rows=16" > $R/ab.log 2>&1; echo rc=$? >> $R/ab.log
tail -40 $R/ab.log | cut -c1-300
date
cd $OUT && tar czf r23b.tgz r23b && rm -rf r23b
