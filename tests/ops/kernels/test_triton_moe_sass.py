"""The "triton" MoE kernel's sm90 machine code, compiled here without a GPU (ptxas ships with
triton): for every tile config the table picks, the dequantized weight tile must reach the wgmma
A operand in registers (no 16-bit or vector shared-memory stores in the K loop: Triton 3.6 falls
back to a registers -> shared -> registers round trip for some tile shapes, which costs decode
speed), nothing may spill in the K loop (nor anywhere without a register cap), and wgmma must
be drained before each dequant (without it the H100 gave wrong rows: see _dequant._wgmma_drain).
Every kernel must wait for the one before it (programmatic dependent launch) before it touches
global memory. Configs whose weight tiles come by TMA on sm90 (planner.use_tma: the decode rows)
are compiled that way. Every kernel is compiled from the launch specs triton_moe.moe launches
(triton_moe_details/launches.py).
"""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import tempfile

import pytest
import torch

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("needs the real Triton compiler, not the interpreter", allow_module_level=True)

from mxfp4_compile.ops.kernels.triton_moe_details import launches, planner  # noqa: E402
from mxfp4_compile.ops.kernels.triton_moe_details.policy import SM90 as P  # noqa: E402

_CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                          "cuobjdump")
_PTR = {"x_ptr": "*bf16", "a_ptr": "*bf16", "sorted_ptr": "*i32", "es_ptr": "*i32", "w_ptr": "*i32",
        "s_ptr": "*u8", "b_ptr": "*fp32", "p_ptr": "*fp32", "y_ptr": "*fp32"}

# (T, k, E, H, I): shapes whose picks cover every distinct row of the table
SHAPES = [(1, 4, 32, 2880, 2880), (64, 2, 8, 4096, 14336), (512, 4, 128, 2880, 2880),
          (512, 4, 32, 2880, 2880), (512, 2, 8, 4096, 14336), (4096, 4, 32, 2880, 2880),
          (4096, 4, 128, 2880, 2880), (8, 2, 8, 4096, 14336)]


def _gemm_launch(gemm, pl, H, I, mma2=False, direct=False, tma=False, late=False, arch=90):
    """The launch spec triton_moe.moe makes for GEMM `gemm` under plan `pl` (gpt-oss-style:
    swiglu, biases; E = 32 experts, so EB = 64), on sm`arch`."""
    return launches.gemm_launch(gemm, pl, 1, mma2=mma2, H=H, Hp=H, Ip=I, E=32,
                                activation="swiglu_oai", has_bias=True, has_map=False,
                                direct=direct, major=arch // 10, interpret=False, tma=tma,
                                late_trigger=late, pdl={"PDL": arch >= 90})


def _compile(gemm, cfg, H, I):
    # the launch's plan without split K (0 SMs: no automatic split, the config as given)
    pl = planner.plan(P, cfg, 1, 2 * I if gemm == 1 else H, H if gemm == 1 else I, 0, "gemm1")
    # weight tiles by TMA where an sm90 launch uses it (aligned weights)
    tma = planner.use_tma(cfg, 9, True)
    launch = _gemm_launch(gemm, pl, H, I, tma=tma)
    box = "tensordesc<i32[{}, {}, 16, 8]>"  # the launch's descriptors: a whole and the tail step
    desc = box.format(cfg.BN // 16, cfg.BK // 64) if tma else "*i32"
    desc_t = box.format(cfg.BN // 16, (pl.tail or cfg.BK) // 64) if tma else "*i32"
    if gemm == 1:
        scalars = dict(E="i32", k_top="i32", alpha="fp32", limit="fp32", p_rows="i32")
    else:
        scalars = dict(E="i32", M="i32")
    # the launch's options, register cap included (a cap must not make ptxas spill)
    return _sass_of(launch, dict(_PTR, w_desc=desc, w_desc_t=desc_t, **scalars))


def _sass_of(launch, types, arch=90, source=None):
    """SASS of a launch spec's kernel, compiled with its constants and options."""
    opts = {k: v for k, v in launch.options.items() if k != "launch_pdl"}
    return _sass(launch.kernel, types, launch.constexprs, opts, arch, source)


def _sass(fn, types, constexprs, opts, arch=90, source=None):
    """SASS (sm90 unless `arch`) of kernel `fn`: arguments typed by `types` (name -> Triton type),
    the rest compile-time constants from `constexprs`; `source`: the ASTSource class (Gluon's
    for a Gluon kernel)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {n: types.get(n, "constexpr") for n in fn.arg_names}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n, t in sig.items()
             if t.startswith("*")}
    src = (source or ASTSource)(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    ck = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(ck.asm["cubin"])
    try:
        return subprocess.run([_CUOBJDUMP, "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    finally:
        os.unlink(f.name)


def _k_loop(sass, full=False):
    """Instruction mnemonics of the K loop (`full`: whole instructions, operands included): the
    body of the widest backward branch that holds no EXIT (with TMA, ptxas places the mbarrier
    wait's retry after the kernel's exits and branches back from there)."""
    ins = []
    for line in sass.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s*(.*?);", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2)))
    loops = []
    for addr, text in ins:
        b = re.search(r"BRA (0x[0-9a-f]+)", text)
        if b and int(b.group(1), 16) < addr and not any(
                int(b.group(1), 16) <= a <= addr and t.split()[-1] == "EXIT" for a, t in ins):
            loops.append((int(b.group(1), 16), addr))
    assert loops, "no loop found in the SASS"
    lo, hi = max(loops, key=lambda r: r[1] - r[0])
    body = [re.sub(r"^@!?U?P\w+\s+", "", t).strip() for a, t in ins if lo <= a <= hi]
    return body if full else [t.split()[0] for t in body]


def _configs():
    seen = {}
    for T, k, E, H, I in SHAPES:
        blocks = min(T * k, T * k // 16 + E)
        for gemm, cfg, N, k_dim in zip((1, 2), planner.pick(P, T, k, E, H, I), (2 * I, H),
                                       (H, I)):
            seen.setdefault((gemm, cfg, H, I), None)
            # what the launch uses on an H100 (132 SMs): decode grids pair tiles (planner.plan)
            seen.setdefault((gemm, planner.plan(P, cfg, blocks, N, k_dim, 132,
                                                f"gemm{gemm}").config, H, I), None)
    return list(seen)


@pytest.fixture(scope="module")
def ptxas_works():
    if not os.path.exists(_CUOBJDUMP):
        pytest.skip("triton's cuobjdump is missing")


@pytest.mark.parametrize("gemm,cfg,H,I", _configs(),
                         ids=lambda v: str(v) if not hasattr(v, "BM") else
                         f"{v.BM}x{v.BN}x{v.BK}w{v.num_warps}s{v.num_stages}")
@pytest.mark.slow
def test_dequantized_tile_stays_in_registers(ptxas_works, gemm, cfg, H, I):
    assert cfg.BN == 16 * cfg.num_warps  # the rule the table follows (policy docstring)
    sass = _compile(gemm, cfg, H, I)
    # decode rows load weight tiles by TMA (planner.use_tma), the others by cp.async
    assert ("UTMALDG" in sass) == planner.use_tma(cfg, 9, True)
    loop = _k_loop(sass)
    assert any(op.startswith("HGMMA") for op in loop)
    # per K step: the scale bytes (4 small stores per 64 codes; Triton regroups them through
    # shared memory) and one ldmatrix of the packed words per 64 codes, nothing else. The
    # round trip of the dequantized tile shows as 16-byte/16-bit stores and 4-8 more ldmatrix.
    tiles = 2 if cfg.PAIR else 1
    stores = [op for op in loop if op.startswith(("STS", "STSM"))]
    assert all(op in ("STS.U8", "STS.U16") for op in stores), f"tile in shared memory: {stores}"
    assert len(stores) <= tiles * cfg.BK // 16, f"tile through shared memory: {stores}"
    ldsm = [op for op in loop if op.startswith("LDSM")]
    assert len(ldsm) <= tiles * cfg.BK // 64, f"tile through shared memory: {ldsm}"
    spills = [op for op in loop if op.startswith(("STL", "LDL"))]
    if cfg.EXTRA:  # the widest loop is the merged blocks' (five MMAs per tile): at the register
        # cap ptxas reloads a few values from local memory there (GEMM1: 4 loads per step)
        assert len(spills) <= 4 and "STL" not in spills, f"spills in the K loop: {spills}"
    else:
        assert not spills, "spills in the K loop"
    if cfg.maxnreg is None:
        assert "STL" not in sass and "LDL" not in sass, "register spills"
    else:  # a cap may push a few loop-invariant values (epilogue addresses) to local memory
        assert len(re.findall(r"\bSTL", sass)) <= 32, "a register cap made ptxas spill a lot"
    # the e2m1 decode (layout.py): 15 instructions per 32-bit word of codes (5 rotates, 6 LOP3,
    # 4 HMUL2), BK / 16 words per thread per tile and step; other LOP3/SHF/IMAD.SHL in the loop
    # (addresses, scale bytes) get a small allowance
    decode = [op for op in loop if op.startswith(("LOP3", "SHF", "IMAD.SHL", "HMUL2"))]
    words = tiles * cfg.BK // 16
    assert len(decode) <= 15 * words + 8, f"{len(decode)} decode-class ops for {words} words"
    waits = [i for i, op in enumerate(loop) if op.startswith("WARPGROUP.DEPBAR")]
    assert waits, "wgmma is not drained in the K loop"


_ROUTE_ARGS = {"ids_ptr": "*i64", "emap_ptr": "*i32", "counts_ptr": "*i32", "es_ptr": "*i32",
               "sorted_ptr": "*i32", "M": "i32", "E": "i32", "n_map": "i32", "n_chunks": "i32"}
_PDL = launches.pdl_options(P, 9)


def _small_launch(name):
    """-> (launch spec, argument types) of a routing, activation or combine launch as an sm90
    call makes it: the sort (M = 256), the count/scatter pair (M = 4096) and the scanned
    routing (M = 65536) of 32 experts, and gpt-oss T=1 on the Triton kernels (split GEMM1, so
    an act launch)."""
    if name.startswith("route"):
        M, has_map, which = {"route": (256, True, 0), "route_scatter": (4096, False, -1),
                             "route_scatter_scanned": (65536, False, -1),
                             "route_scan": (65536, False, 1)}[name]
        launch = launches.route_launches(P, M, 32, has_map, _PDL["route"]).launches[which]
        if name == "route_scan":
            return launch, {"counts_ptr": "*i32", "n_chunks": "i32"}
        return launch, _ROUTE_ARGS
    L = launches.moe_launches(P, T=1, k=4, E=32, H=2880, Hp=2880, Ip=2880,
                              activation="swiglu_oai", has_b13=True, has_b2=True, has_map=True,
                              combine=True, major=9, sms=132, interpret=False,
                              weights_aligned=False, x_bf16_aligned=False)
    if name == "act":
        return L.act, {"p_ptr": "*fp32", "a_ptr": "*bf16", "n_rows": "i32", "alpha": "fp32",
                       "limit": "fp32"}
    return L.finalize, {"y_ptr": "*fp32", "ids_ptr": "*i64", "emap_ptr": "*i32",
                        "tw_ptr": "*fp32", "out_ptr": "*bf16", "E": "i32", "n_map": "i32",
                        "M": "i32"}


def test_small_launches_cover_each_routing_form():
    assert _small_launch("route")[0].constexprs["SORT"]
    assert not _small_launch("route_scatter")[0].constexprs["SCANNED"]
    assert _small_launch("route_scatter_scanned")[0].constexprs["SCANNED"]
    assert _small_launch("act")[0].constexprs["SPLIT"] > 1


@pytest.mark.parametrize("name", ["route", "route_scatter", "route_scatter_scanned", "route_scan",
                                  "act", "finalize", "gemm1", "gemm2", "gemm2_no_tail"])
@pytest.mark.slow
def test_each_kernel_waits_for_the_previous_one_before_touching_memory(ptxas_works, name):
    # programmatic dependent launch (launches.pdl_options): a kernel's programs may start while
    # the kernel before it still runs, so griddepcontrol.wait (ACQBULK) must come before every
    # global load or store, and the trigger for the next kernel (PREEXIT) after the wait
    if name == "gemm2_no_tail":  # Mixtral T=8: K = 14336, whole 128-code steps
        sass = _compile(2, planner.pick(P, 8, 2, 8, 4096, 14336)[1], 4096, 14336)
    elif name.startswith("gemm"):  # gpt-oss T=8: K = 2880, 22 whole steps and a 64-code tail
        c = planner.pick(P, 8, 4, 32, 2880, 2880)[0]
        sass = _compile(int(name[-1]), c, 2880, 2880)
    if name.startswith("gemm"):
        assert "UTMALDG" in sass  # the weight tiles come by TMA: the wait must precede it too
    else:
        sass = _sass_of(*_small_launch(name))
    ops = [m.group(1) for m in re.finditer(r"/\*[0-9a-f]{4,}\*/\s*(?:@!?U?P\w+\s+)?([A-Z][\w.]*)",
                                           sass)]
    assert ops.count("ACQBULK") == 1 and ops.count("PREEXIT") == 1, "no griddepcontrol pair"
    wait = ops.index("ACQBULK")
    memory = [i for i, op in enumerate(ops)
              if op.startswith(("LDG", "STG", "LDGSTS", "ATOMG", "RED", "UBLKCP", "UTMALDG"))]
    assert memory and min(memory) > wait, f"global memory access before the wait: {ops[:wait]}"
    assert ops.index("PREEXIT") > wait


# ---- FP8 activations (_fp8.py) ---------------------------------------------------------------
_FP8_PTR = dict(_PTR, x_ptr="*fp8e4nv", w_ptr="*u8", rs_ptr="*fp32", w_desc="*u8", w_desc_t="*u8")


@pytest.mark.slow
@pytest.mark.parametrize("T,H,I,E,k", [(1, 2880, 2880, 32, 4), (4096, 2880, 2880, 32, 4),
                                       (16384, 4096, 14336, 8, 2)])
def test_fp8_gemms_run_qgmma_without_spills(ptxas_works, T, H, I, E, k):
    """The FP8 GEMMs as moe launches them on sm90 (decode: split K, masked steps; prefill: a
    64-code tail at 2880): fp8 wgmma (QGMMA) in the K loop, wgmma drained before each decode, no
    spills, the codes read as 16-byte vectors (no byte loads), and the decoded tile through
    shared memory at most once per step (4 STS.128 of 16 e4m3 per thread at BK 128: Triton 3.6
    does not keep the two decoded halves in the operand layout; the variants that avoid the
    join moved the codes and scales byte by byte instead, 96 STS per step). At prefill the
    table sends these tiles to _wgmma_fp8 (test_triton_moe_wgmma_fp8.py); here with it off."""
    act = "swiglu_oai" if E == 32 else "silu_glu"
    L = launches.moe_launches(dataclasses.replace(P, fp8_wgmma=False), T=T, k=k, E=E, H=H, Hp=H,
                              Ip=I, activation=act,
                              has_b13=E == 32, has_b2=E == 32, has_map=False, combine=True,
                              major=9, sms=132, interpret=False, weights_aligned=True,
                              x_bf16_aligned=True, fp8=True)
    for launch, scalars, a_ptr in (
            (L.gemm1, dict(E="i32", k_top="i32", alpha="fp32", limit="fp32", p_rows="i32"), "*bf16"),
            (L.gemm2, dict(E="i32", M="i32"), "*fp8e4nv")):
        assert launch.constexprs["FP8"] and not launch.constexprs["TMA"]
        sass = _sass_of(launch, dict(_FP8_PTR, a_ptr=a_ptr, **scalars))
        loop = _k_loop(sass)
        assert any(op.startswith("QGMMA") and "E4M3.E4M3" in op for op in loop), "no fp8 wgmma"
        assert not any(op.startswith("HGMMA") for op in loop)
        assert "STL" not in sass and "LDL" not in sass, "register spills"
        assert any(op.startswith("WARPGROUP.DEPBAR") for op in loop), "wgmma not drained"
        # byte loads: the scale bytes only (BK/32 per weight row, prefetched a step ahead)
        cx = launch.constexprs
        scale_bytes = -(-cx["BN"] * (cx["BK"] // 32) // (32 * launch.options["num_warps"]))
        assert len([op for op in loop if op.startswith("LDG.E.U8")]) <= scale_bytes, \
            "codes loaded byte by byte"
        stores = [op for op in loop if op.startswith("STS")]
        assert len(stores) <= launch.constexprs["BK"] // 32, f"tile through smem: {stores}"
    sass = _sass_of(L.quant1, {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32",
                               "n_rows": "i32"})
    assert "STL" not in sass
