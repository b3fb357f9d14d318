"""Launch specifications of the "triton" MoE kernel: for one call's shapes and device, which
kernel each step runs, on which grid, with which compile-time arguments and launch options.
`triton_moe.moe` launches these with the call's tensors; the SASS tests compile the same specs
without a GPU, so a launch is spelled once.

Weights, scales and biases are contiguous when launched (`moe` makes them so), so their strides
follow from the shapes: prepared words [E, N, K/8] int32, scale bytes [E, N, K/32], biases [E, N].
Shape legend: T tokens, k top-k, M = T*k assignments, E local experts, H hidden (Hp padded),
Ip padded intermediate, EB = next_pow2(E + 1) routing buckets.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Any

from . import planner
from .planner import Plan
from .policy import LaunchPolicy

ACT_CODES = {"swiglu_oai": 0, "silu_glu": 1}  # formats.ACTIVATIONS -> the kernels' ACT constexpr
STEPS = ("route", "gemm1", "act", "gemm2", "finalize")


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch: `kernel[grid](*runtime_args, **constexprs, **options)`. Specs are
    cached per shape (moe_launches), so the kernel is named, not held: `module` (a module of this
    package, e.g. "_gemm1") and `name`, looked up at each launch (tests may swap a kernel)."""
    module: str
    name: str
    grid: tuple[int, ...]
    constexprs: dict[str, Any]   # compile-time arguments (PDL: the kernel waits and triggers)
    options: dict[str, Any]      # num_warps, num_stages, maxnreg, launch_pdl

    @property
    def kernel(self):
        """The @triton.jit or @gluon.jit function."""
        return getattr(importlib.import_module(f"{__package__}.{self.module}"), self.name)

    def __call__(self, *runtime_args):
        return self.kernel[self.grid](*runtime_args, **self.constexprs, **self.options)


def _launch(kernel: str, grid, constexprs: dict, options: dict, pdl: dict) -> Launch:
    """A Launch of `kernel` ("module.name") with the step's programmatic-launch settings
    (pdl_options) split into the kernel's PDL constant and the launch_pdl option."""
    module, name = kernel.split(".")
    extra = {"launch_pdl": pdl["launch_pdl"]} if "launch_pdl" in pdl else {}
    return Launch(module, name, grid, dict(constexprs, PDL=pdl["PDL"]), dict(options, **extra))


@dataclasses.dataclass(frozen=True)
class MoELaunches:
    """Every launch of one call, in stream order (`route` None: T=1 on _mma2 reads the ids)."""
    route: RouteLaunches | None
    gemm1: Launch
    act: Launch | None           # only when GEMM1's K is split
    gemm2: Launch
    finalize: Launch
    p1: Plan                     # GEMM1's plan (its split sizes the partial-sum buffer)
    p2: Plan
    mma2: tuple[bool, bool]      # which GEMMs run a Gluon kernel (_mma2, _wgmma or
    #                              _wgmma_fp8: one argument list)
    tma: tuple[bool, bool]       # which GEMMs load weight tiles by TMA (descriptors needed)
    direct: bool                 # T=1 on _mma2: one assignment per row block, no route launch
    y_hidden_dtype: bool         # GEMM2 writes y in the hidden dtype, not float32
    quant1: Launch | None = None  # FP8: x -> e4m3 rows + scales, before GEMM1
    quant2: Launch | None = None  # FP8: a -> e4m3 rows + scales, before GEMM2
    wgmma: tuple[bool, bool] = (False, False)  # which GEMMs run _wgmma (prefill tiles)
    wgmma_fp8: tuple[bool, bool] = (False, False)  # which FP8 GEMMs run _wgmma_fp8 (they take
    #                              _mma2's argument list and the activation rows' scales)


@dataclasses.dataclass(frozen=True)
class RouteLaunches:
    chunk: int                   # assignments per routing program
    n_chunks: int
    scanned: bool                # a scan launch between the two phases (its own counts row)
    launches: tuple[Launch, ...]  # (phase 2) or (phase 0, [scan,] phase 1)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def pdl_options(pol: LaunchPolicy, major: int) -> dict[str, dict]:
    """-> launch options per step (STEPS) on a GPU of compute capability `major` (0: the
    interpreter). On sm90+ the steps in the policy's pdl_launch launch as programmatic
    dependents (_pdl._pdl_enter): their programs become resident while the kernel before them
    ends. The others launch as usual; in them the wait returns at once, and the trigger still
    lets the next kernel launch early. Off under the interpreter and before sm90 (no
    griddepcontrol)."""
    if major < 9:
        return {name: {"PDL": False} for name in STEPS}
    return {name: {"PDL": True, "launch_pdl": name in pol.pdl_launch} for name in STEPS}


def route_launches(pol: LaunchPolicy, M: int, E: int, has_map: bool, pdl: dict) -> RouteLaunches:
    """The routing launches for M assignments over E local experts: one program that sorts
    (M <= route_sort_max), one program of one-hot counts, or chunks (count, [scan,] scatter).
    pdl: the route step's pdl_options entry."""
    EB = _next_pow2(E + 1)
    sort = M <= pol.route_sort_max
    chunk = max(4, _next_pow2(M) if sort else min(_next_pow2(M), pol.route_budget // EB))
    n_chunks = -(-M // chunk)
    nw = 4 if chunk * EB <= 8192 or sort else 8
    cx = dict(HAS_MAP=has_map, CHUNK=chunk, EB=EB)
    opts = dict(num_warps=nw)
    if n_chunks == 1:
        phase2 = _launch("_route._route_kernel", (1,), dict(cx, PHASE=2, SORT=sort), opts, pdl)
        return RouteLaunches(chunk, 1, False, (phase2,))
    scanned = n_chunks >= pol.route_scan_chunks
    count = _launch("_route._route_kernel", (n_chunks,), dict(cx, PHASE=0, SORT=False), opts,
                    pdl)
    scatter = _launch("_route._route_kernel", (n_chunks,),
                      dict(cx, PHASE=1, SORT=False, SCANNED=scanned), opts, pdl)
    if not scanned:
        return RouteLaunches(chunk, n_chunks, False, (count, scatter))
    BE = min(EB, 32)
    scan = _launch("_route._route_scan_kernel", (EB // BE,), dict(EB=EB, BE=BE, RS=64),
                   dict(num_warps=4), pdl)
    return RouteLaunches(chunk, n_chunks, True, (count, scan, scatter))


def _regs(c) -> dict:
    return {} if c.maxnreg is None else {"maxnreg": c.maxnreg}


def gemm_launch(gemm: int, p: Plan, blocks: int, *, mma2: bool, H: int, Hp: int, Ip: int,
                E: int, activation: str, has_bias: bool, has_map: bool, direct: bool,
                major: int, interpret: bool, tma: bool, late_trigger: bool, pdl: dict,
                fp8: bool = False, wgmma: bool = False) -> Launch:
    """GEMM `gemm` (1 or 2) under plan `p` over `blocks` row blocks, on _mma2, _wgmma (`wgmma`;
    with `fp8` _wgmma_fp8) or the Triton kernels. `late_trigger`: an _mma2 GEMM1 lets GEMM2
    launch only after its K loops. `fp8`: e4m3 activations (GEMM1 reads them Hp wide)."""
    c = p.config
    EB = _next_pow2(E + 1)
    N, K = (2 * Ip, Hp) if gemm == 1 else (H, Ip)  # output columns, reduction length
    rows = 2 * Ip if gemm == 1 else Hp  # weight rows as prepared (padded)
    strides = dict(stride_we=rows * K // 8, stride_wn=K // 8, stride_se=rows * K // 32,
                   stride_sn=K // 32, stride_be=rows if has_bias else 0)
    shapes = dict(H=H, Hp=Hp, Ip=Ip) if gemm == 1 else dict(H=H, Ip=Ip)
    if gemm == 1:
        strides = dict(stride_xt=Hp if fp8 else H, **strides)
        shapes["ACT"] = ACT_CODES[activation]
    cx = dict(strides, **shapes, HAS_BIAS=has_bias, BM=c.BM, BN=c.BN, BK=c.BK, EB=EB,
              SPLIT=p.split, K_CHUNK=p.chunk)
    grid = (blocks * p.tiles, p.split)
    if wgmma:
        cx.update(MASK_K=p.tail > 0 or not p.even_k, DIRECT=False, HAS_MAP=has_map, NS=4,
                  HALF=c.HALF)
        if gemm == 1:
            cx["LATE_TRIGGER"] = False
        module = "_wgmma_fp8" if fp8 else "_wgmma"
        kernel = f"{module}._gemm1_kernel" if gemm == 1 else f"{module}._gemm2_kernel"
        return _launch(kernel, grid, cx, dict(num_warps=8, **_regs(c)), pdl)
    if mma2:
        cx.update(MASK_K=p.tail > 0 or not p.even_k, DIRECT=direct, HAS_MAP=has_map,
                  NS=c.num_stages)
        if gemm == 1:
            cx["LATE_TRIGGER"] = late_trigger
        kernel = "_mma2._gemm1_kernel" if gemm == 1 else "_mma2._gemm2_kernel"
        return _launch(kernel, grid, cx, dict(num_warps=4), pdl)
    cx.update(EVEN_K=p.even_k, EVEN_N=N % c.BN == 0, UPCAST=interpret, SWAP=c.SWAP,
              # wgmma keeps MMAs in flight across K steps: drain before each dequant (sm90)
              SYNC=major == 9, PAIR=c.PAIR, TAIL=p.tail, HALF=c.HALF, TMA=tma, EXTRA=c.EXTRA,
              FP8=fp8)
    kernel = "_gemm1._gemm1_kernel" if gemm == 1 else "_gemm2._gemm2_kernel"
    return _launch(kernel, grid, cx,
                   dict(num_warps=c.num_warps, num_stages=c.num_stages, **_regs(c)), pdl)


@functools.lru_cache(maxsize=1024)
def moe_launches(pol: LaunchPolicy, *, T: int, k: int, E: int, H: int, Hp: int, Ip: int,
                 activation: str, has_b13: bool, has_b2: bool, has_map: bool, combine: bool,
                 major: int, sms: int, interpret: bool, weights_aligned: bool,
                 x_bf16_aligned: bool, fp8: bool = False) -> MoELaunches:
    """Every launch of one call. `weights_aligned`: the prepared words and scales start on
    16-byte boundaries (_mma2's cp.async and TMA need it); `x_bf16_aligned`: the hidden states
    are bf16 on a 16-byte boundary too (_mma2's GEMM1 copies them as they are). Cached per
    argument set (a policy is frozen, so an override() is another key): the host work of a call
    is then one lookup. The returned specs are shared: never mutate them."""
    M = T * k
    pdl = pdl_options(pol, major)
    m2 = planner.mma2_possible(pol, major) and weights_aligned and not fp8
    m2_x = m2 and x_bf16_aligned
    c1, c2 = planner.pick(pol, T, k, E, Hp, Ip, interpret, m2_x)
    if fp8:
        c1, c2 = planner.fp8_config(pol, c1, interpret), planner.fp8_config(pol, c2, interpret)
    p1, nb1, mma2_1 = planner.plan_gemm(pol, c1, M, E, 2 * Ip, Hp, sms, "gemm1", m2_x, major, fp8)
    p2, nb2, mma2_2 = planner.plan_gemm(pol, c2, M, E, H, Ip, sms, "gemm2", m2, major, fp8)
    # prefill tiles on _wgmma where it runs (16-byte copies of the words, scales and, in GEMM1,
    # the bf16 hidden states as they are: the alignment _mma2 needs)
    wg1 = m2_x and not mma2_1 and planner.use_wgmma(pol, p1, major, "gemm1")
    wg2 = m2 and not mma2_2 and planner.use_wgmma(pol, p2, major, "gemm2")
    if wg1:
        p1, nb1 = planner.wgmma_plan(pol, p1, M, E, 2 * Ip)
    if wg2:
        p2, nb2 = planner.wgmma_plan(pol, p2, M, E, H)
    # FP8 prefill tiles on _wgmma_fp8 (its 16-byte copies: aligned words and scales; the e4m3
    # rows are the op's own buffers, addressed by int32 element offsets)
    wf1 = (fp8 and weights_aligned and T * Hp < 2 ** 31
           and planner.use_wgmma_fp8(pol, p1, major))
    wf2 = (fp8 and weights_aligned and M * Ip < 2 ** 31
           and planner.use_wgmma_fp8(pol, p2, major))
    direct = T == 1 and mma2_1 and mma2_2 and pol.mma2_direct
    if direct:
        nb1 = nb2 = M
    # GEMM2 as a programmatic dependent launch behind an _mma2 GEMM1 that triggers only after
    # its K loops (its programs then take no SM slots GEMM1's last wave still needs)
    late = mma2_1 and major >= 9 and not wg1
    if late:
        pdl["gemm2"] = dict(pdl["gemm2"], launch_pdl=True)
    tma1 = not mma2_1 and not fp8 and planner.use_tma(p1.config, major, weights_aligned)
    tma2 = not mma2_2 and not fp8 and planner.use_tma(p2.config, major, weights_aligned)
    common = dict(H=H, Hp=Hp, Ip=Ip, E=E, activation=activation, has_map=has_map, direct=direct,
                  major=major, interpret=interpret, fp8=fp8)
    g1 = gemm_launch(1, p1, nb1, mma2=mma2_1, has_bias=has_b13, tma=tma1, late_trigger=late,
                     pdl=pdl["gemm1"], wgmma=wg1 or wf1, **common)
    g2 = gemm_launch(2, p2, nb2, mma2=mma2_2, has_bias=has_b2, tma=tma2, late_trigger=False,
                     pdl=pdl["gemm2"], wgmma=wg2 or wf2, **common)
    act = None
    if p1.split > 1:
        BR, BC = 16, 128
        act = _launch("_gemm1._act_kernel", (-(-M // BR), -(-Ip // BC)),
                      dict(Ip=Ip, ACT=ACT_CODES[activation], SPLIT=p1.split, BR=BR, BC=BC),
                      dict(num_warps=4), pdl["act"])
    # decode: T programs of 1024 columns would leave most SMs idle; 128 columns each then
    BH = min(1024 if T >= 64 else 128, _next_pow2(H))
    fin = _launch("_finalize._finalize_kernel", (T, -(-H // BH)),
                  dict(H=H, k_top=k, HAS_MAP=has_map, COMBINE=bool(combine), BH=BH,
                       SPLIT=p2.split), dict(num_warps=4), pdl["finalize"])
    route = None if direct else route_launches(pol, M, E, has_map, pdl["route"])
    y_hidden = p2.split == 1 and (not mma2_2 or wg2 or wf2) and pol.y_hidden_dtype
    quant1 = quant2 = None
    if fp8:
        quant1 = quant_launch(T, H, Hp, H, interpret)
        quant2 = quant_launch(M, Ip, Ip, Ip, interpret)
    return MoELaunches(route, g1, act, g2, fin, p1, p2,
                       (mma2_1 or wg1 or wf1, mma2_2 or wg2 or wf2), (tma1, tma2), direct,
                       y_hidden, quant1, quant2, (wg1, wg2), (wf1, wf2))


def quant_launch(rows: int, k_in: int, kp: int, stride: int, interpret: bool) -> Launch:
    """_fp8._quant_rows_kernel over `rows` rows of k_in valid columns -> e4m3 rows kp wide: 4
    rows per program (decode: one program per token row). A plain launch: the GEMM after it,
    a programmatic dependent, waits for it to complete."""
    BR = 4
    BK = min(1024, _next_pow2(kp))
    return _launch("_fp8._quant_rows_kernel", (-(-rows // BR),),
                   dict(K_IN=k_in, KP=kp, stride_x=stride, BR=BR, BK=BK, UPCAST=interpret),
                   dict(num_warps=4),
                   {"PDL": False})
