#!/bin/bash
# session 23, call 1: profiles for issue 20 items 3 and 4 (no code change): ncu on the prefill
# GEMMs (120b/20b T=4096, 120b T=16384), ncu on every kernel of decode forwards, graph traces
export PYTHONUNBUFFERED=1
R=$OUT/r23a; mkdir -p $R
T0=$(date +%s)
pip install -q --no-build-isolation --no-deps -e . > $R/install.log 2>&1 || cat $R/install.log
export PYTHONPATH=$PWD:$PWD/.tk
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem,power.limit --format=csv > $R/gpu.txt 2>&1
python -c "import torch,triton;print(torch.__version__,triton.__version__)" >> $R/gpu.txt 2>&1
cat $R/gpu.txt; date
NCU=$(which ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
ST=""
for s in barrier long_scoreboard short_scoreboard wait math_pipe_throttle mio_throttle lg_throttle not_selected selected dispatch_stall; do
  ST="$ST,smsp__average_warps_issue_stalled_${s}_per_issue_active.ratio"; done
MP="gpu__time_duration.sum,sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active,sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_elapsed,lts__throughput.avg.pct_of_peak_sustained_elapsed,lts__t_bytes.sum.per_second,lts__t_sectors_srcunit_tex_op_read.sum,lts__t_sector_op_read_hit_rate.pct,dram__bytes_read.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,smsp__inst_executed.sum,smsp__issue_active.avg.pct_of_peak_sustained_active,sm__warps_active.avg.pct_of_peak_sustained_active,launch__grid_size,launch__registers_per_thread,l1tex__data_pipe_lsu_wavefronts_mem_shared.sum,l1tex__throughput.avg.pct_of_peak_sustained_active,sm__cycles_elapsed.avg$ST"
echo "== ncu prefill"; date
for s in 120b:4096 20b:4096 120b:16384; do
  m=${s%%:*}; t=${s##*:}
  timeout 110 $NCU --csv --clock-control none --kernel-name regex:_gemm[12]_kernel --launch-skip 4 --launch-count 2 --metrics $MP \
    python .ab/prof23.py ncu $m $t > $R/ncu_pre_${m}_${t}.csv 2>&1; echo "rc=$?" >> $R/ncu_pre_${m}_${t}.csv
  grep -E "gpu__time|gmma_cycles_active.avg.pct_of_peak_sustained_active|lts__throughput|lts__t_bytes|dram__throughput|issue_active|rc=" $R/ncu_pre_${m}_${t}.csv | awk -F'","' '{print $5, $(NF-2), $NF}' | cut -c1-150
done
MD="gpu__time_duration.sum,dram__bytes_read.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,launch__grid_size,launch__registers_per_thread,sm__warps_active.avg.pct_of_peak_sustained_active,smsp__inst_executed.sum,sm__cycles_elapsed.avg$ST"
echo "== ncu decode"; date
for s in 20b:1 120b:8 20b:64 120b:64 mixtral:64 mixtral:8; do
  m=${s%%:*}; t=${s##*:}
  timeout 70 $NCU --csv --clock-control none --kernel-name regex:"_gemm|_route|_finalize|_act_kernel|topk_softmax" --metrics $MD \
    python .ab/prof23.py ncu $m $t > $R/ncu_dec_${m}_${t}.csv 2>&1; echo "rc=$?" >> $R/ncu_dec_${m}_${t}.csv
  tail -1 $R/ncu_dec_${m}_${t}.csv
done
echo "== traces"; date
for s in 20b:1 120b:1 mixtral:1 20b:8 120b:8 20b:64 120b:64 mixtral:64 120b:4096; do
  m=${s%%:*}; t=${s##*:}
  OUT=$R timeout 60 python .ab/prof23.py trace $m $t > $R/trace_${m}_${t}.log 2>&1
  python - $R/trace_${m}_${t}.log <<'P'
import json,sys
t=open(sys.argv[1]).read()
try:
    d=json.loads(t[t.index("{"):])
    print(d["model"], d["T"], "graph/call", d["graph_us_per_call"], "span", d.get("call_span_us"), [(k["name"][:28], k["dur"], k["gap"]) for k in d.get("kernels", [])] or d.get("names"))
except Exception as e: print("ERR", sys.argv[1], t[-800:])
P
done
date
