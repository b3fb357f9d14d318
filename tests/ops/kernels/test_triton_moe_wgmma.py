"""The Gluon prefill GEMMs (triton_moe_details/_wgmma.py) compiled for sm90 here, without a GPU
(Gluon has no interpreter: the H100 checks their results, test_triton_moe_cuda.py and
benchmarks/gpu_check.py). For the launches `launches.moe_launches` sends to them at the prefill
shapes of the three benchmark models: the dequantized tile reaches wgmma in registers, step
i+1's tile is decoded while wgmma i runs, into registers that wgmma does not read (the race
_dequant._wgmma_drain describes), nothing spills in the loop, and the kernel waits for the one
before it.
"""
from __future__ import annotations

import dataclasses
import os
import re

import pytest

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("needs the real Triton compiler, not the interpreter", allow_module_level=True)
gluon_rt = pytest.importorskip("triton.experimental.gluon._runtime")

from mxfp4_compile.ops.kernels.triton_moe_details import launches, planner, policy  # noqa: E402
from mxfp4_compile.ops.kernels.triton_moe_details.policy import SM90 as P  # noqa: E402
from test_triton_moe_sass import _CUOBJDUMP, _k_loop, _sass_of  # noqa: E402

BOTH = frozenset({"gemm1", "gemm2"})
PW = dataclasses.replace(P, wgmma=BOTH)  # the table keeps them off (ledger: `wgmma`)

# (T, k, E, H, I): gpt-oss-20b / -120b / Mixtral prefill and a mid shape (128-row blocks)
SHAPES = [(4096, 4, 32, 2880, 2880), (4096, 4, 128, 2880, 2880), (4096, 2, 8, 4096, 14336),
          (512, 4, 32, 2880, 2880)]
_PTR = {"x_ptr": "*bf16", "a_ptr": "*bf16", "sorted_ptr": "*i32", "es_ptr": "*i32",
        "ids_ptr": "*i64", "emap_ptr": "*i32", "w_ptr": "*i32", "s_ptr": "*u8", "b_ptr": "*fp32",
        "p_ptr": "*fp32", "y_ptr": "*bf16"}


def _moe_launches(T, k, E, H, I, pol=PW):
    return launches.moe_launches(pol, T=T, k=k, E=E, H=H, Hp=H, Ip=I, activation="swiglu_oai",
                                 has_b13=True, has_b2=True, has_map=False, combine=True, major=9,
                                 sms=132, interpret=False, weights_aligned=True,
                                 x_bf16_aligned=True)


def _wgmma_launches(pols=(PW, dataclasses.replace(PW, wgmma_wide=True))):
    """Distinct (gemm, Launch) that an H100 call of the SHAPES sends to _wgmma (with the table's
    tiles and with the wide ones)."""
    out = {}
    for shape, pol in ((sh, p) for p in pols for sh in SHAPES):
        L = _moe_launches(*shape, pol=pol)
        for gemm, launch, wg in ((1, L.gemm1, L.wgmma[0]), (2, L.gemm2, L.wgmma[1])):
            if wg:
                key = (gemm, tuple(sorted(launch.constexprs.items())))
                out.setdefault(key, (gemm, launch))
    return list(out.values())


def _sass(gemm, launch):
    scalars = (dict(E="i32", n_map="i32", k_top="i32", alpha="fp32", limit="fp32", p_rows="i32")
               if gemm == 1 else dict(E="i32", n_map="i32", M="i32"))
    return _sass_of(launch, dict(_PTR, **scalars), 90, gluon_rt.GluonASTSource)


@pytest.fixture(scope="module")
def ptxas_works():
    if not os.path.exists(_CUOBJDUMP):
        pytest.skip("triton's cuobjdump is missing")


def test_the_prefill_shapes_reach_wgmma():
    seen = set()
    for shape in SHAPES:
        L = _moe_launches(*shape)
        assert L.wgmma == (True, True) and L.mma2 == (True, True), shape
        assert L.gemm1.module == "_wgmma" and L.gemm2.module == "_wgmma"
        assert L.y_hidden_dtype  # bf16 expert outputs, as the Triton kernels write them
        seen.add((L.p1.config.BM, L.p1.config.HALF))
    # 256- and 128-row blocks, with and without the part-filled block copies
    assert {bm for bm, _ in seen} == {128, 256} and {h for _, h in seen} == {0, 2}
    # off in the policy, on another GPU, with FP8 activations, or unaligned: the Triton kernels
    assert _moe_launches(*SHAPES[0], pol=P).wgmma == (False, False)
    with policy.override(wgmma=BOTH):
        assert _moe_launches(*SHAPES[0], pol=policy.current(9)).wgmma == (True, True)
    # one GEMM only: the other keeps the Triton kernels and the table's plan
    for which, want in (("gemm1", (True, False)), ("gemm2", (False, True))):
        one = _moe_launches(*SHAPES[1], pol=dataclasses.replace(P, wgmma=frozenset({which})))
        assert one.wgmma == want
        assert (one.gemm1.module, one.gemm2.module) == tuple(
            "_wgmma" if w else "_gemm%d" % g for g, w in ((1, want[0]), (2, want[1])))
        base = _moe_launches(*SHAPES[1], pol=P)
        kept = (one.p2, base.p2) if want[0] else (one.p1, base.p1)
        assert kept[0] == kept[1]
    plan = _moe_launches(*SHAPES[0]).p1
    assert planner.use_wgmma(PW, plan, 9, "gemm1") and not planner.use_wgmma(PW, plan, 8, "gemm1")
    assert not planner.use_wgmma(PW, plan, 10, "gemm1")
    assert not planner.use_wgmma(P, plan, 9, "gemm1")
    # the GEMMs are named as a set: a bare True says how to write it
    with pytest.raises(TypeError, match=r"wgmma must be a frozenset.*frozenset\(\{'gemm1'\}\)"):
        with policy.override(wgmma=True):
            pass
    fp8 = launches.moe_launches(PW, T=4096, k=4, E=32, H=2880, Hp=2880, Ip=2880,
                                activation="swiglu_oai", has_b13=True, has_b2=True,
                                has_map=False, combine=True, major=9, sms=132, interpret=False,
                                weights_aligned=True, x_bf16_aligned=True, fp8=True)
    assert fp8.wgmma == (False, False)
    odd = launches.moe_launches(PW, T=4096, k=4, E=32, H=2880, Hp=2880, Ip=2880,
                                activation="swiglu_oai", has_b13=True, has_b2=True,
                                has_map=False, combine=True, major=9, sms=132, interpret=False,
                                weights_aligned=True, x_bf16_aligned=False)
    assert odd.wgmma == (False, True)  # GEMM1 copies x as it is: bf16 on 16 bytes only


def test_wgmma_plan():
    L = _moe_launches(4096, 4, 128, 2880, 2880)
    # the table's mid128 tile merges an expert's last <= 32 rows (EXTRA); _wgmma runs them as a
    # block of their own, without the Triton kernels' register cap
    c = L.p1.config
    assert (c.BM, c.BN, c.EXTRA, c.maxnreg) == (128, 128, 0, None)
    assert L.gemm1.grid[0] == planner.row_blocks(4096 * 4, 128, 128) * (5760 // 128)
    with policy.override(wgmma=BOTH, wgmma_wide=True, wgmma_regs=128):
        pol = policy.current(9)
        w = _moe_launches(4096, 4, 32, 2880, 2880, pol=pol)
        assert (w.p1.config.BM, w.p1.config.BN) == (128, 256)
        assert w.gemm2.grid[0] == planner.row_blocks(4096 * 4, 32, 128) * -(-2880 // 256)
        assert _moe_launches(4096, 4, 32, 2880, 2880, pol=dataclasses.replace(
            pol, wgmma_wide=False)).p1.config.maxnreg is None  # 256-row blocks: no cap
        assert _moe_launches(4096, 4, 128, 2880, 2880, pol=dataclasses.replace(
            pol, wgmma_wide=False)).p1.config.maxnreg == 128


def _mma_loops(sass, op="HGMMA"):
    """Every K loop of the kernel (one per body copy: BM, BM/2, BM/4 rows), each as (its
    instructions, its steps: (A registers the step's `op` wgmmas read, instructions between
    its first wgmma and the wait that retires them)). op: HGMMA (bf16) or QGMMA (fp8)."""
    ins = [(int(m.group(1), 16), re.sub(r"^@!?U?P\w+\s+", "", m.group(2)).strip())
           for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s*(.*?);", sass)]
    loops = []
    for addr, text in ins:
        b = re.search(r"BRA (0x[0-9a-f]+)", text)
        if b and int(b.group(1), 16) < addr:
            body = [t for a, t in ins if int(b.group(1), 16) <= a <= addr]
            if any(t.startswith(op) for t in body):
                loops.append(body)
    out = []
    for body in loops:
        steps, regs, after = [], set(), None
        for ins_ in body:
            m = re.match(rf"{op}\.[\w.]+ R\d+, R(\d+), gdesc", ins_)
            if m:
                regs |= set(range(int(m.group(1)), int(m.group(1)) + 4))
                after = [] if after is None else after
            elif ins_.startswith("WARPGROUP.DEPBAR.LE gsb0, 0x0") and after is not None:
                steps.append((regs, after))
                regs, after = set(), None
            elif after is not None:
                after.append(ins_)
        out.append((body, steps))
    return out


def _waits_first(sass):
    """Whether the kernel waits for the one before it (griddepcontrol.wait, ACQBULK, once)
    before its first global load, store or cp.async."""
    ops = [m.group(1) for m in re.finditer(r"/\*[0-9a-f]{4,}\*/\s*(?:@!?U?P\w+\s+)?([A-Z][\w.]*)",
                                           sass)]
    memory = [i for i, op in enumerate(ops) if op.startswith(("LDG", "STG", "LDGSTS"))]
    return ops.count("ACQBULK") == 1 and bool(memory) and min(memory) > ops.index("ACQBULK")


def _written(op):
    """Registers an instruction writes (its first operand, 32-bit; 64-bit destinations of the
    vector loads count 2 or 4)."""
    m = re.match(r"([A-Z][\w.]*)\s+R(\d+)", op)
    if not m or m.group(1).startswith(("ST", "HGMMA", "BAR", "BRA", "LDGSTS", "RED", "ATOM")):
        return set()
    op_name = m.group(1)
    width = 4 if ".128" in op_name or "M88.4" in op_name else (
        2 if ".64" in op_name or "M88.2" in op_name else 1)
    return set(range(int(m.group(2)), int(m.group(2)) + width))


@pytest.mark.slow
@pytest.mark.parametrize("gemm,launch", _wgmma_launches(),
                         ids=lambda v: str(v) if isinstance(v, int) else
                         f"BM{v.constexprs['BM']}_BN{v.constexprs['BN']}_H{v.constexprs['HALF']}")
def test_k_loop(ptxas_works, gemm, launch):
    sass = _sass(gemm, launch)
    loop = _k_loop(sass, full=True)
    # no spills in the loop (GEMM2's 256-row epilogue spills a few registers once per program)
    assert not [op for op in loop if op.startswith(("STL", "LDL"))], "register spills"
    # A from registers (HGMMA's second operand a register, B a shared-memory descriptor)
    hgmma = [op for op in loop if op.startswith("HGMMA")]
    assert hgmma and all(re.match(r"HGMMA\.64x\d+x16\.F32\.BF16 R\d+, R\d+, gdesc", op)
                         for op in hgmma)
    # the decoded tile never goes through shared memory (only cp.async fills it)
    assert not [op for op in loop if op.startswith(("STS", "STSM"))]
    loops = [steps for _, steps in _mma_loops(sass)]
    assert len(loops) == 1 + min(launch.constexprs["HALF"], 2)  # a loop per body copy
    half = launch.constexprs["BN"] == 256  # wgmma by 32-code halves (_wgmma._k_loop's KS)
    for steps in loops:
        assert len(steps) == (8 if half else 4)  # the loop unrolled by its 4 stages
        for regs, after in steps:
            # nothing in flight may have its A registers overwritten before the wait
            clobbered = [op for op in after if _written(op) & regs]
            assert not clobbered, clobbered[:3]
        # step i+1's tile is decoded while wgmma i runs (its bf16x2 scale multiplies sit
        # between the HGMMAs and the wait) in at least 3 of the 4 unrolled steps (ptxas
        # serializes the one before the loop's back edge); by halves: the next step's first
        # half at least (ptxas serializes the decode of a step's second half)
        overlapped = [sum(op.startswith("HMUL2") for op in after) for _, after in steps]
        assert sum(n > 0 for n in overlapped) >= (4 if half else 3), overlapped


@pytest.mark.slow
@pytest.mark.parametrize("gemm", [1, 2])
def test_waits_for_the_previous_kernel_before_touching_memory(ptxas_works, gemm):
    g, launch = next(v for v in _wgmma_launches() if v[0] == gemm)
    assert _waits_first(_sass(g, launch))


@pytest.mark.slow
@pytest.mark.parametrize("K", [64, 128, 192, 256, 320, 448, 576])
def test_short_k_compiles(ptxas_works, K):
    # 1 to 9 K steps: every remainder of the 4-stage unroll, and fewer steps than stages
    for gemm, (H, I) in ((1, (K, 2880)), (2, (2880, K))):  # this GEMM's K short
        L = _moe_launches(4096, 4, 128, H, I)
        assert L.wgmma[gemm - 1]
        assert "HGMMA" in _sass(gemm, L.gemm1 if gemm == 1 else L.gemm2)
