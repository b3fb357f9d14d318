"""The "triton_kernels" kernel: API detection, clear errors, and the pure-torch preparation.

triton_kernels is not a dependency (it comes from vLLM's wheel, see the backend's docstring): the
tests that need it skip when it is not importable. For local runs a checkout may keep it in
``.tk/`` at the repository root (git-ignored); it is picked up from there.
"""
from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest
import torch

from mxfp4_compile.formats import SWIGLU_ALPHA, SWIGLU_LIMIT
from mxfp4_compile.ops.kernels import triton_kernels_moe as tkm

_TK_DIR = pathlib.Path(__file__).resolve().parents[3] / ".tk"
if importlib.util.find_spec("triton_kernels") is None and (_TK_DIR / "triton_kernels").is_dir():
    sys.path.append(str(_TK_DIR))


@pytest.fixture(autouse=True)
def _fresh_api_cache():
    tkm.API.cache_clear()
    yield
    tkm.API.cache_clear()


def _has_tk() -> bool:
    tkm.API.cache_clear()
    return tkm.api_error() is None


needs_tk = pytest.mark.skipif(not _has_tk(), reason="triton_kernels (3.5 API) not importable")
needs_sm90 = pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9 and _has_tk()),
    reason="needs an sm90 GPU and triton_kernels")


# ---- API detection and errors ---------------------------------------------------------------------
def test_missing_triton_kernels_is_a_clear_reason(monkeypatch):
    real = importlib.util.find_spec

    def fake(name, *a, **kw):
        return None if name == "triton_kernels" or name.startswith("triton_kernels.") else real(name, *a, **kw)

    monkeypatch.setattr(importlib.util, "find_spec", fake)
    reason = tkm.api_error()
    assert reason is not None and "not importable" in reason and "vllm==0.33.0" in reason
    with pytest.raises(tkm.TritonKernelsUnavailable, match="cannot run.*vllm"):
        tkm.prepare(*_canonical(2, 64, 64), "swiglu_oai")


def _fake_triton_kernels(tmp_path, monkeypatch, files):
    """A package named triton_kernels with these modules (name -> source) first on sys.path,
    any loaded triton_kernels forgotten for the test."""
    pkg = tmp_path / "triton_kernels"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name, text in files.items():
        (pkg / name).write_text(text)
    for name in [m for m in sys.modules if m == "triton_kernels" or m.startswith("triton_kernels.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path))


def test_post_35_api_is_refused_with_the_reason(tmp_path, monkeypatch):
    """A triton_kernels without `routing` (the API after 3.5) is detected and refused."""
    _fake_triton_kernels(tmp_path, monkeypatch, {"matmul.py": "def matmul(*a, **k):\n    pass\n"})
    reason = tkm.api_error()
    assert reason is not None
    assert "no `routing` module" in reason and "does not support" in reason
    assert "post-3.5" in reason and str(tmp_path) in reason
    assert tkm.api_description() is None


def test_incomplete_api_names_what_is_missing(tmp_path, monkeypatch):
    _fake_triton_kernels(tmp_path, monkeypatch, {"routing.py": "", "matmul_ogs.py": ""})
    reason = tkm.api_error()
    assert reason is not None and "has no 'matmul_ogs'" in reason


def test_cpu_device_is_unavailable():
    reason = tkm.unavailable_reason(torch.device("cpu"))
    assert reason is not None and "CUDA" in reason


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] == 9,
                    reason="needs a non-sm90 GPU")
def test_non_hopper_gpu_is_unavailable():
    assert "sm90" in tkm.unavailable_reason(torch.device("cuda"))


@needs_tk
def test_supported_api_detected():
    assert tkm.api_error() is None
    assert "matmul_ogs + routing" in tkm.api_description()


# ---- pure-torch parts ---------------------------------------------------------------------------------
def _canonical(E, Hp, Ip, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    u8 = dict(dtype=torch.uint8, generator=g)
    return (torch.randint(0, 256, (E, 2 * Ip, Hp // 2), **u8),
            torch.randint(110, 140, (E, 2 * Ip, Hp // 32), **u8),
            torch.randn(E, 2 * Ip, generator=g) if bias else None,
            torch.randint(0, 256, (E, Hp, Ip // 2), **u8),
            torch.randint(110, 140, (E, Hp, Ip // 32), **u8),
            torch.randn(E, Hp, generator=g) if bias else None)


def test_concat_to_pairs_roundtrip_and_positions():
    t = torch.arange(2 * 6 * 3).reshape(2, 6, 3)  # rows 0..2 gate, 3..5 up
    p = tkm.concat_to_pairs(t, 1)
    assert torch.equal(p[:, 0::2], t[:, :3]) and torch.equal(p[:, 1::2], t[:, 3:])
    assert torch.equal(tkm.pairs_to_concat(p, 1), t)
    b = torch.arange(8.0).reshape(1, 8)
    assert tkm.concat_to_pairs(b, 1).tolist() == [[0, 4, 1, 5, 2, 6, 3, 7]]


@pytest.mark.parametrize("E", [1, 31, 32, 33, 128])
def test_bitmatrix_words_match_a_loop(E):
    g = torch.Generator().manual_seed(E)
    T, k = 37, min(4, E)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(torch.int32)
    ids[3, k - 1] = -1  # an empty slot (expert not on this rank / padding)
    words = tkm.expert_bitmatrix_words(ids, E)
    assert words.dtype == torch.int32 and words.shape == (T, -(-E // 32))
    u = words.view(torch.uint32) if hasattr(torch, "uint32") else words
    for t in range(T):
        want = [0] * words.shape[1]
        for e in ids[t].tolist():
            if e >= 0:
                want[e // 32] |= 1 << (e % 32)
        got = [int(w) & 0xFFFFFFFF for w in words[t].tolist()]
        assert got == want, (t, ids[t])
    assert u.shape == words.shape


def test_next_pow2():
    assert [tkm._next_pow2(k) for k in (1, 2, 3, 4, 5, 8, 9)] == [1, 2, 4, 4, 8, 8, 16]


def test_padding_is_checked():
    with pytest.raises(ValueError, match="multiple|% 64"):
        tkm.prepared_shapes(2, 96, 64, "swiglu_oai", True, True)
    with pytest.raises(ValueError, match="activation"):
        tkm.prepared_shapes(2, 64, 64, "gelu", True, True)


@needs_tk
@pytest.mark.parametrize("activation", ["swiglu_oai", "silu_glu"])
@pytest.mark.parametrize("E,Hp,Ip,bias", [(3, 128, 192, True),
                                          pytest.param(2, 2880, 2880, False, marks=pytest.mark.slow),
                                          (1, 64, 64, True)])
def test_prepare_shapes_and_inverse(E, Hp, Ip, bias, activation):
    if Hp == 2880 and activation == "silu_glu":
        pytest.skip("one large shape is enough")
    canon = _canonical(E, Hp, Ip, bias)
    out = tkm.prepare(*canon, activation)
    shapes = tkm.prepared_shapes(E, Hp, Ip, activation, bias, bias)
    assert len(out) == 6
    for t, s in zip(out, shapes):
        if s is None:
            assert t is None
        else:
            assert (tuple(t.shape), t.dtype) == s and t.is_contiguous()
    w13, s13, b13, w2, s2, b2 = canon
    if activation == "silu_glu":  # stored as gate/up pairs
        w13, s13 = tkm.concat_to_pairs(w13, 1), tkm.concat_to_pairs(s13, 1)
        b13 = None if b13 is None else tkm.concat_to_pairs(b13, 1)
    assert torch.equal(tkm.unswizzle_values(out[0]), w13)
    assert torch.equal(tkm.unswizzle_values(out[3]), w2)
    assert torch.equal(tkm.unswizzle_scales(out[1], 2 * Ip, Hp), s13)
    assert torch.equal(tkm.unswizzle_scales(out[4], Hp, Ip), s2)
    if bias:
        assert torch.equal(out[2], b13) and torch.equal(out[5], b2)
    for a, b in zip(tkm.unprepare(*out, activation), canon):  # the protocol's inverse
        assert (a is None and b is None) or torch.equal(a, b)


@needs_tk
def test_prepare_rejects_mismatched_shapes():
    w13, s13, b13, w2, s2, b2 = _canonical(2, 64, 64)
    with pytest.raises(ValueError, match="w2"):
        tkm.prepare(w13, s13, b13, w2[:, :32], s2, b2, "swiglu_oai")
    out = tkm.prepare(w13, s13, b13, w2, s2, b2, "swiglu_oai")
    with pytest.raises(ValueError, match="scales .* do not match"):
        tkm._wrap_weight(tkm.API.require(), out[0], out[1][:, :, :64])  # e.g. an older, unpadded layout


@needs_tk
def test_wrap_recovers_logical_shapes():
    out = tkm.prepare(*_canonical(2, 128, 192), "swiglu_oai")
    api = tkm.API.require()
    w, pc, N, K = tkm._wrap_weight(api, out[0], out[1])
    assert (N, K) == (2 * 192, 128) and list(w.shape) == [2, 128, 384]
    assert w.storage.data.stride(-2) == 1  # the transposed view matmul_ogs expects
    assert w.storage.data.data_ptr() == out[0].data_ptr()  # no copy
    w, pc, N, K = tkm._wrap_weight(api, out[3], out[4])
    assert (N, K) == (128, 192)


# ---- the Hopper MXFP4 matmul's constraints, on CPU ---------------------------------------------
# Shapes (E, Hp, Ip): tests/moe_zoo.py's tiny MoE (H=64, I=32 -> Ip=64; both GEMMs have N <= 128,
# which failed to compile with 8 warps on the H100), N just above/below 128, and gpt-oss (2880).
_CONSTRAINT_SHAPES = [(4, 64, 64), (2, 128, 64), (2, 192, 64), (2, 64, 128), (2, 256, 128),
                      (1, 2880, 2880)]


def test_num_warps_rule():
    ns = (64, 128, 129, 192, 256, 2880, 5760)
    assert [tkm.num_warps_for(n) for n in ns] == [4, 4, 8, 8, 8, 8, 8]


@needs_tk
@pytest.mark.parametrize("E,Hp,Ip", _CONSTRAINT_SHAPES)
def test_opt_flags_satisfy_the_hopper_mxfp4_asserts(E, Hp, Ip):
    """triton_kernels' own opt-flag choices for our prepared weights satisfy what _matmul_ogs
    static-asserts for HOPPER_SCALE (BLOCK_N % (2*warps*2*8), (BLOCK_K/32) % 2), and the unmasked
    scale loads stay inside each (padded) scale row and the padded rows, for both GEMMs."""
    import triton
    from triton_kernels.matmul_ogs_details.opt_flags_details import opt_flags_nvidia as of
    shapes = tkm.prepared_shapes(E, Hp, Ip, "swiglu_oai", False, False)
    api = tkm.API.require()
    for vi, si, n_want, k_want in ((0, 1, 2 * Ip, Hp), (3, 4, Hp, Ip)):
        values = torch.zeros(shapes[vi][0], dtype=torch.uint8)
        scales = torch.zeros(shapes[si][0], dtype=torch.uint8)
        w, pc, N, K = tkm._wrap_weight(api, values, scales)
        assert (N, K) == (n_want, k_want)
        warps = pc.weight_scale.storage.layout.num_warps
        block_n = of.compute_block_n(N, None, pc)
        block_k = of.compute_block_k(16, K, False, torch.bfloat16, api.FP4, pc)
        assert of.compute_num_warps(16, block_n, pc) == warps == tkm.num_warps_for(N)
        assert block_n % (2 * warps * 2 * 8) == 0, (N, block_n, warps)
        assert block_k == tkm.BLOCK_K and (block_k // 32) % 2 == 0
        # scale tile loads: rows pid_n*BLOCK_N/32 + [0, BLOCK_N/32), columns 128 per K block
        rows, cols = scales.shape[1:]
        assert rows * 32 >= triton.cdiv(N, block_n) * block_n
        assert cols >= triton.cdiv(K, block_k) * block_k
        if N > 128:  # the large-N path (gpt-oss) keeps vLLM's 8 warps and BLOCK_N = 256
            assert (warps, block_n) == (8, 256)


_SM90_COMPILE_SCRIPT = r"""
import json, sys, types
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
import triton.runtime.jit as jit

SM90 = GPUTarget("cuda", 90, 32)

class CpuDriver:  # just enough of a driver for JITFunction.run to specialize and compile
    def get_current_target(self): return SM90
    def get_current_device(self): return 0
    def get_current_stream(self, device=None): return 0

driver.set_active(CpuDriver())
props = types.SimpleNamespace(multi_processor_count=132, shared_memory_per_block_optin=232448)
torch.cuda.get_device_properties = lambda *a, **k: props
torch.cuda.get_device_capability = lambda *a, **k: (9, 0)
torch.cuda.device = lambda *a, **k: __import__("contextlib").nullcontext()
_histc = torch.histc
torch.histc = lambda x, *a, **k: _histc(x.float(), *a, **k)  # routing_torch on CPU

class NoLaunch:
    function = packed_metadata = None
    def launch_metadata(self, *a): return None
    def run(self, *a): pass

compiled = []
def do_compile(self, key, signature, device, constexprs, options, attrs, warmup):
    # the front end (where tl.static_assert fires) for sm90; no launch
    from triton.compiler.compiler import make_backend
    from triton._C.libtriton import ir
    src = self.ASTSource(self, signature, constexprs, attrs)
    backend = make_backend(SM90)
    opts = backend.parse_options(options.__dict__)
    ctx = ir.context()
    ir.load_dialects(ctx)
    backend.load_dialects(ctx)
    src.make_ir(SM90, opts, backend.get_codegen_implementation(opts), backend.get_module_map(), ctx)
    if self.fn.__name__ == "_matmul_ogs":
        names = [p.name for p in self.params]
        c = {names[k[0]]: v for k, v in constexprs.items() if len(k) == 1}
        compiled.append([c["BLOCK_N"], c["BLOCK_K"], opts.num_warps])
    return NoLaunch()
jit.JITFunction._do_compile = do_compile

from triton_kernels.routing import routing_torch
from mxfp4_compile.ops.kernels import triton_kernels_moe as tkm

def torch_routing(api, ids, weights, n_experts, expert_map=None):
    logits = torch.full((ids.shape[0], n_experts), -1e9)
    logits.scatter_(1, ids.long(), weights.float())
    return (*routing_torch(logits, ids.shape[1], expt_indx=ids.int()), ids.shape[1])
tkm._routing = torch_routing

out = {}
for spec in sys.argv[1:]:
    E, Hp, Ip, activation, combine = spec.split(",")
    E, Hp, Ip, combine = int(E), int(Hp), int(Ip), combine == "1"
    g = torch.Generator().manual_seed(0)
    u8 = dict(dtype=torch.uint8, generator=g)
    canon = (torch.randint(0, 256, (E, 2 * Ip, Hp // 2), **u8),
             torch.randint(110, 140, (E, 2 * Ip, Hp // 32), **u8), torch.zeros(E, 2 * Ip),
             torch.randint(0, 256, (E, Hp, Ip // 2), **u8),
             torch.randint(110, 140, (E, Hp, Ip // 32), **u8), torch.zeros(E, Hp))
    prepared = tkm.prepare(*canon, activation)
    T, k = 5, 2
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).int()
    x = torch.randn(T, Hp - 3 if Hp > 64 else Hp).bfloat16()
    compiled.clear()
    tkm.moe(x, ids, torch.rand(T, k), *prepared, activation, 1.702, 7.0, None, combine)
    out[spec] = list(compiled)
print("SM90-COMPILE " + json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.subprocess
@needs_tk
def test_matmul_ogs_compiles_for_sm90_on_cpu():
    """Our two matmul_ogs calls, traced through triton_kernels on CPU with a stand-in driver and
    compiled by Triton's front end for sm90, where the Hopper MXFP4 static asserts fire (the tiny
    shapes failed there with 8 warps: BLOCK_N % (2 * n_warps * 2 * 8) == 0)."""
    import json
    import os
    import subprocess
    pytest.importorskip("triton.backends.nvidia")
    specs = [f"{E},{Hp},{Ip},swiglu_oai,1" for E, Hp, Ip in _CONSTRAINT_SHAPES]
    specs += ["4,64,64,silu_glu,1", "4,64,64,swiglu_oai,0", "2,192,64,silu_glu,0"]
    root = pathlib.Path(__file__).resolve().parents[3]
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    extra = [str(root)] + ([str(_TK_DIR)] if (_TK_DIR / "triton_kernels").is_dir() else [])
    env["PYTHONPATH"] = os.pathsep.join(extra + [p for p in [env.get("PYTHONPATH")] if p])
    r = subprocess.run([sys.executable, "-c", _SM90_COMPILE_SCRIPT, *specs], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("SM90-COMPILE ")][-1]
    got = json.loads(line.split(" ", 1)[1])
    for spec, kernels in got.items():
        E, Hp, Ip = (int(v) for v in spec.split(",")[:3])
        # [BLOCK_N, BLOCK_K, num_warps] of GEMM1 (N = 2*Ip) then GEMM2 (N = Hp)
        want = [[256 if n > 128 else 128, 128, tkm.num_warps_for(n)] for n in (2 * Ip, Hp)]
        assert kernels == want, (spec, kernels)
    assert got["1,2880,2880,swiglu_oai,1"] == [[256, 128, 8], [256, 128, 8]]  # gpt-oss unchanged


# ---- GPU (sm90) ----------------------------------------------------------------------------------------
@needs_sm90
@pytest.mark.parametrize("activation", ["swiglu_oai", "silu_glu"])
@pytest.mark.parametrize("combine", [True, False])
def test_moe_matches_reference_on_gpu(activation, combine):
    from mxfp4_compile import numerics
    from mxfp4_compile.ops.moe_torch import moe_torch
    E, H, I, k, T = 8, 256, 128, 2, 33
    g = torch.Generator(device="cuda").manual_seed(0)
    q = [numerics.quantize(torch.randn(E, n, kk, device="cuda", generator=g) / kk ** 0.5)
         for n, kk in ((2 * I, H), (H, I))]
    canon = (q[0][0], q[0][1], torch.randn(E, 2 * I, device="cuda") * 0.1,
             q[1][0], q[1][1], torch.randn(E, H, device="cuda") * 0.1)
    prepared = tkm.prepare(*canon, activation)
    x = torch.randn(T, H, device="cuda").bfloat16()
    vals, ids = torch.randn(T, E, device="cuda").topk(k, dim=-1)
    w = vals.softmax(-1)
    out = tkm.moe(x, ids, w, *prepared, activation, SWIGLU_ALPHA, SWIGLU_LIMIT, None, combine)
    ref = moe_torch(x, ids, w, *canon, activation, SWIGLU_ALPHA, SWIGLU_LIMIT, None, combine)
    assert out.shape == ref.shape and out.dtype == x.dtype
    assert ((out.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2


# ---- the routing-input kernel, through the Triton interpreter on CPU ------------------------------
_INTERPRET_SCRIPT = r"""
import torch
from mxfp4_compile.ops.kernels import triton_kernels_moe as tkm
g = torch.Generator().manual_seed(0)
for E, k, T, use_map in [(32, 4, 37, False), (128, 4, 5, True), (40, 3, 9, False), (8, 2, 1, True),
                         (33, 1, 3, False)]:
    E_glob = E + 7 if use_map else E
    ids = torch.stack([torch.randperm(E_glob, generator=g)[:k] for _ in range(T)])
    ids = ids.to(torch.int32 if T % 2 else torch.int64)
    w = torch.rand(T, k, generator=g).to(torch.bfloat16 if T % 2 else torch.float32)
    emap = None
    if use_map:
        emap = torch.full((E_glob,), -1, dtype=torch.int32)
        keep = torch.randperm(E_glob, generator=g)[:E]
        emap[keep] = torch.arange(E, dtype=torch.int32)
    got = tkm.routing_inputs(ids, w, E, emap, use_kernel=True)
    want = tkm.routing_inputs(ids, w, E, emap, use_kernel=False)
    for a, b in zip(got[:3], want[:3]):
        assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
        assert torch.equal(a, b), (E, k, T, use_map, a, b)
    assert got[3] == want[3]
print("interpreter-ok")
"""


@pytest.mark.slow
@pytest.mark.interpreter
@pytest.mark.subprocess
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_routing_input_kernel_matches_torch_under_interpreter():
    import os
    import subprocess
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = pathlib.Path(__file__).resolve().parents[3]
    env["PYTHONPATH"] = os.pathsep.join([str(root)] + [p for p in [env.get("PYTHONPATH")] if p])
    r = subprocess.run([sys.executable, "-c", _INTERPRET_SCRIPT], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "interpreter-ok" in r.stdout, r.stdout + r.stderr


@needs_tk
def test_split_k_constraint_is_scoped_and_respects_the_users_own():
    import importlib
    of = importlib.import_module("triton_kernels.matmul_ogs_details.opt_flags")
    before = of._opt_flags_constraints
    with tkm._split_k_constraint(1):
        assert of._opt_flags_constraints.get("split_k") == 1
    assert of._opt_flags_constraints is before and "split_k" not in before
    of.update_opt_flags_constraints({"split_k": 3})
    try:
        with tkm._split_k_constraint(1):
            assert of._opt_flags_constraints["split_k"] == 3
    finally:
        of.reset_opt_flags_constraints()
    with tkm._split_k_constraint(None):
        assert "split_k" not in of._opt_flags_constraints
