"""Private parts of the "triton" MoE kernel. Import only from ops/kernels/triton_moe.py.

Host side (pure Python):
  policy.py     tuned values as data: one frozen LaunchPolicy per device capability, override()
  planner.py    small pure functions: tile pick, K split, grid shape, which kernel runs a GEMM
  launches.py   the launch specs (kernel, grid, compile-time arguments, options) of one call
  layout.py     where `prepare` puts each e2m1 code's bits, and the PTX that decodes them
  layout_fp8.py the same for FP8 activations: e2m1 -> e4m3 with the block scale folded in

Kernels, by stage (all on the GPU, no host sync, fixed-size buffers):
  _route.py     ids [T, k] -> expert_start [E+1], sorted_assign [M] (stable, by local expert)
  _gemm1.py     a = act(x[tok] @ W13[e].T + b13[e]) per sorted row; _act_kernel after split K
  _gemm2.py     y[assign] = a @ W2[e].T + b2[e], scattered to (token, slot) rows
  _finalize.py  out[t] = sum_s w[t, s] y[t, s] in slot and chunk order (deterministic)
  _mma2.py      Gluon (mma.sync) GEMM1 / GEMM2 for the decode tiles
  _fp8.py       FP8 activations (W4A8, sm90): rows -> e4m3 + scales, the fp8 K loop both GEMMs
                run when launched with FP8
  shared:       _pdl.py (programmatic dependent launch), _blocks.py (which rows a program
                takes), _dequant.py (weight tiles -> bf16 in registers), _k_loop.py (K loops)
Shape legend: T tokens, k top-k, M = T*k (token, slot) assignments, E local experts, H hidden
(Hp padded), I intermediate (Ip padded), EB = next_pow2(E + 1) (bucket E collects assignments
whose expert is not on this rank).
"""
