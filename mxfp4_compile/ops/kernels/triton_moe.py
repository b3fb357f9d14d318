"""The "triton" kernel: our own fused MXFP4 MoE in Triton (default on sm80-sm90).

Shape legend: T tokens, k top-k slots per token, M = T*k (token, slot) assignments,
E local experts, H hidden (Hp padded), I intermediate (Ip padded).
  hidden        [T, H]            bf16 / fp16 / fp32 (output in the same dtype)
  topk_ids      [T, k]            int32 / int64
  topk_weights  [T, k]            float
  w13, w13_s    [E, 2Ip/16, Hp/64, 16, 32], [E, 2Ip/16, Hp/64, 16, 2]  uint8 (prepared: below)
  w13_bias      [E, 2Ip]          float32 or None
  w2, w2_s      [E, Hp/16, Ip/64, 16, 32], [E, Hp/16, Ip/64, 16, 2]    uint8 (prepared)
  w2_bias       [E, Hp]           float32 or None
  (activations="fp8": w13, w2 as int32 words [E, N/16, K/64, 16, 8], the same bytes' count)
  expert_map    [E_global]        int32, -1 = not on this rank

Prepared layout = the canonical one (ops/moe_torch.py: padding, scales, biases) with three
permutations: w13 rows are paired per 16 (8 gate rows, then the 8 up rows of the same columns:
`_paired_rows`), and inside every 32-code chunk along K the codes' bits are regrouped
(`_pack_words`) so that each 32-bit word decodes to 4 bf16 pairs with a rotate and one or two
masks each (triton_moe_details/layout.py), landing directly in the registers wgmma reads its A
operand from; then rows are tiled by 16 (`_tile_rows`): a K step of a BN-row tile reads BN/16
runs of 16 x BK/2 bytes; the scales, biased (`_bias_scales`), are tiled the same way. The
tensors carry the tiles in their shapes (5-D; `moe` views them as [E, N, K/2] bytes), which no
other kernel's layout has: the op's shape check refuses another kernel's weights.
FP8 activations (`activations="fp8"`, sm90, triton_moe_details/_fp8.py, layout_fp8.py): the
same row pairing and tiling, but each 32-bit word holds the 8 codes one thread feeds to an fp8
wgmma (`_pack_words_fp8`), scales stay raw e8m0, and w13 / w2 are int32 words [E, N/16, K/64,
16, 8] (a layout no bf16 weights have); x and the intermediate are quantized per row to e4m3
before each GEMM, and every 128-code step's fp32 partial sum is scaled into an fp32 accumulator.
On sm90 the 128 x 128 FP8 tiles (prefill) run Gluon kernels on asynchronous fp8 wgmma with the
decoded tile in registers (_wgmma_fp8.py, the policy's `fp8_wgmma`).
Steps (triton_moe_details/, one file per stage): route (expert-sorted rows, on the GPU), GEMM1
(token gather, dequant, bias, activation), GEMM2 (bias, scatter to (token, slot) rows), finalize
(weighted sum over slots in fixed order); at decode sizes the GEMMs split K and the chunks are
added in order (_act_kernel, finalize); decode tiles run Gluon kernels on mma.sync (_mma2.py),
which at T=1 read each assignment's expert from the ids (no route launch); on sm90 the prefill
tiles can run Gluon kernels on asynchronous wgmma instead (_wgmma.py, per GEMM by the policy's
`wgmma`: off in the H100 table, where it was not faster). No host sync, no
data-dependent shapes: CUDA-graph safe and deterministic. On sm90+ most launches are
programmatic dependent launches. What launches how: triton_moe_details/launches.py, from the
planner (planner.py) and the device's launch policy (policy.py).
"""
from __future__ import annotations

import functools
import os

import torch

from ...formats import E8M0_BIAS, E8M0_NAN, check_activation, check_activations, gate_up_interleaved
from .triton_moe_details import layout, layout_fp8  # pure Python: importable without triton

NAME = "triton"
H_MULTIPLE = 64  # K of GEMM1 and N of GEMM2: rows stay 32-byte multiples (16-byte loads)
I_MULTIPLE = 64

_HIDDEN_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_missing() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not installed ({e})"
    return None


def unavailable_reason(device: torch.device) -> str | None:
    device = torch.device(device)
    missing = _triton_missing()
    if missing:
        return missing
    if device.type == "cpu":
        if _interpreting():
            return None
        return ("kernel 'triton' on CPU tensors runs only under the Triton interpreter: set "
                "TRITON_INTERPRET=1 before triton is imported (slow; meant for tests)")
    if device.type != "cuda":
        return f"kernel 'triton' needs a CUDA GPU (sm80 or newer), got device {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"kernel 'triton' needs sm80 or newer (bf16 tensor cores), this GPU is sm{major}{minor}"
    return None


def prepared_shapes(E, Hp, Ip, activation, has_w13_bias, has_w2_bias, activations="bf16"):
    """The canonical bytes in 16-row tiles (`_tile_rows`); biases canonical. FP8 activations
    (`activations="fp8"`): the codes as int32 words [..., 16, 8] (layout_fp8.py), which no
    bf16 layout has."""
    check_activation(activation)
    check_activations(activations)
    u8, f32 = torch.uint8, torch.float32
    w = (8, torch.int32) if activations == "fp8" else (32, u8)
    return [((E, 2 * Ip // 16, Hp // 64, 16, w[0]), w[1]), ((E, 2 * Ip // 16, Hp // 64, 16, 2), u8),
            ((E, 2 * Ip), f32) if has_w13_bias else None,
            ((E, Hp // 16, Ip // 64, 16, w[0]), w[1]), ((E, Hp // 16, Ip // 64, 16, 2), u8),
            ((E, Hp), f32) if has_w2_bias else None]


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A prepared 5-D tile tensor [E, N/16, K/64, 16, b] -> the [E, N, K/64 * b] bytes the
    launches index (a view)."""
    E, n16, kb, _, b = t.shape
    return t.view(E, n16 * 16, kb * b)


# Element t = 4s + 2h + lo of word c of a 32-code chunk (4 little-endian words) holds column
# 16s + 8h + 2c + lo: what one thread needs for the wgmma A fragment (_dequant._assemble); its
# bits sit where the e2m1 -> bf16x2 decode reads them (triton_moe_details/layout.py).
_WORD_COLUMNS = tuple(tuple(16 * (t >> 2) + 8 * ((t >> 1) & 1) + 2 * c + (t & 1)
                            for t in range(8)) for c in range(4))


def _pack_words(w: torch.Tensor) -> torch.Tensor:
    """Canonical packed codes [E, N, K/2] (K a multiple of 32) -> this kernel's words, stored as
    the same uint8 [E, N, K/2]: inside every 32-code chunk (one 16-byte vector, one scale) word c
    gathers the columns `_WORD_COLUMNS[c]` and places each code's magnitude and sign bits at
    layout.MAG_AT / SIGN_AT. A permutation of bits within each chunk: scales are unchanged."""
    dev = w.device
    cols = torch.tensor(_WORD_COLUMNS, device=dev)  # [4, 8]
    mag_at = torch.tensor(layout.MAG_AT, device=dev, dtype=torch.int64)
    sign_at = torch.tensor(layout.SIGN_AT, device=dev, dtype=torch.int64)
    out = torch.empty_like(w)
    for e in range(w.shape[0]):  # one expert at a time bounds the temporaries
        codes = torch.stack((w[e] & 0xF, w[e] >> 4), dim=-1).reshape(w.shape[1], -1, 32)
        c = codes[..., cols].to(torch.int64)  # [N, K/32, 4 words, 8 elements]
        words = (((c & 7) << mag_at) | ((c >> 3) << sign_at)).sum(-1)  # disjoint bits: sum = or
        words = words - (words >> 31 << 32)  # uint32 value -> the int32 with the same bits
        out[e] = words.to(torch.int32).reshape(w.shape[1], -1).view(torch.uint8)
    return out


def _pack_words_fp8(w: torch.Tensor) -> torch.Tensor:
    """Canonical packed codes [E, N, K/2] (K a multiple of 32) -> the FP8 layout's words as the
    same uint8 [E, N, K/2]: word c of every 32-code chunk holds the codes of columns 4c+j (A_j)
    and 16+4c+j (B_j), their bits where layout_fp8.word_bits says. A permutation of bits within
    each chunk: scales are unchanged."""
    dev = w.device
    j = torch.arange(4, device=dev)
    cols = torch.stack([torch.stack((4 * c + j, 16 + 4 * c + j)) for c in range(4)])  # [4, 2, 4]
    pos = torch.tensor([[layout_fp8.word_bits(i, h) for i in range(4)] for h in range(2)],
                       device=dev, dtype=torch.int64)  # [2 halves, 4, (mag, sign)]
    out = torch.empty_like(w)
    for e in range(w.shape[0]):
        codes = torch.stack((w[e] & 0xF, w[e] >> 4), dim=-1).reshape(w.shape[1], -1, 32)
        c = codes[..., cols].to(torch.int64)  # [N, K/32, 4 words, 2 halves, 4]
        words = (((c & 7) << pos[..., 0]) | ((c >> 3) << pos[..., 1])).sum((-1, -2))
        words = words - (words >> 31 << 32)
        out[e] = words.to(torch.int32).reshape(w.shape[1], -1).view(torch.uint8)
    return out


def _unpack_words_fp8(w: torch.Tensor) -> torch.Tensor:
    """Inverse of `_pack_words_fp8`."""
    dev = w.device
    out = torch.empty_like(w)
    for e in range(w.shape[0]):
        words = w[e].contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        words = words.reshape(w.shape[1], -1, 4)  # [N, K/32, 4 words]
        codes = torch.empty(*words.shape[:2], 32, dtype=torch.int64, device=dev)
        for c in range(4):
            for h in range(2):
                for i in range(4):
                    mag, sign = layout_fp8.word_bits(i, h)
                    codes[..., 16 * h + 4 * c + i] = (((words[..., c] >> mag) & 7)
                                                      | (((words[..., c] >> sign) & 1) << 3))
        codes = codes.reshape(w.shape[1], -1, 2)
        out[e] = (codes[..., 0] | (codes[..., 1] << 4)).to(torch.uint8)
    return out


def _tile_rows(t: torch.Tensor, block_bytes: int) -> torch.Tensor:
    """Packed words [E, N, K/2] (block_bytes 32) or scale bytes [E, N, K/32] (block_bytes 2),
    N % 16 == 0, K % 64 == 0 -> the same bytes reordered so that each 16-row group stores its
    64-code blocks one after another, a block holding the 16 rows' bytes side by side:
    [E, N/16, K/64, 16, block_bytes], the shape returned (_dequant._tiled_rows / _tiled_cols). One K step
    of a BN-row tile then reads BN/16 runs of 16 x BK/2 bytes instead of BN runs of BK/2 bytes,
    fewer and longer DRAM bursts for the decode GEMMs (benchmarks/notes/op.md, session 4)."""
    E, N, nb = t.shape
    t = t.reshape(E, N // 16, 16, nb // block_bytes, block_bytes)
    return t.transpose(2, 3).contiguous()


def _paired_rows(Ip: int, activation: str, device) -> torch.Tensor:
    """Prepared w13 row r -> canonical row: 16-row groups hold 8 gate rows then the 8 up rows of
    the same intermediate columns, so one MMA tile covers both halves of the activation."""
    r = torch.arange(2 * Ip, device=device)
    col = (r // 16) * 8 + r % 8
    up = (r // 8) % 2
    if gate_up_interleaved(activation):
        return 2 * col + up
    return col + up * Ip


# Scale bytes are stored as s + layout.STORED_SCALE_OFFSET: the bf16 exponent of the multiplier
# the kernel applies (layout.py); exact for s <= _MAX_SCALE, E8M0_NAN kept.
_MAX_SCALE = layout.MAX_SCALE


def _bias_scales(codes: torch.Tensor, scales: torch.Tensor):
    """-> (codes, biased scales): codes [E, N, K/2] and e8m0 bytes [E, N, K/32] uint8. A NaN
    scale (255) stays 255 (an infinite multiplier) and its block's codes become 0, so the whole
    block decodes to 0 * inf = NaN, as the format says."""
    s = scales.to(torch.int16)
    too_big = (s > _MAX_SCALE) & (s != E8M0_NAN)
    if bool(too_big.any()):
        raise ValueError(
            f"kernel 'triton' handles e8m0 block scales up to {_MAX_SCALE} (2**{_MAX_SCALE - E8M0_BIAS});"
            f" these weights have {int(too_big.sum())} block(s) with a larger finite scale (max "
            f"byte {int(s[too_big].max())}). Use kernel='reference' for such weights.")
    nan = s == E8M0_NAN
    if bool(nan.any()):
        shape = codes.shape
        codes = codes.reshape(*nan.shape, 16).masked_fill(nan[..., None], 0).reshape(shape)
    return codes, torch.where(nan, s, s + layout.STORED_SCALE_OFFSET).to(torch.uint8)


def prepare(w13, w13_scales, w13_bias, w2, w2_scales, w2_bias, activation, activations="bf16"):
    """Canonical padded MXFP4 -> this kernel's layout: w13 rows paired (`_paired_rows`), codes
    regrouped inside every 32-code chunk (`_pack_words`); scales biased (`_bias_scales`) and,
    like the biases, following their rows; codes and scales tiled by 16 rows (`_tile_rows`).
    `activations="fp8"`: the FP8 layout instead (`_pack_words_fp8`, raw e8m0 scales: every
    scale byte is handled, NaN included), codes as int32 words."""
    check_activation(activation)
    check_activations(activations)
    Hp, Ip = w13.shape[2] * 2, w2.shape[2] * 2
    if Hp % H_MULTIPLE or Ip % I_MULTIPLE:
        raise ValueError(f"kernel 'triton' needs Hp % {H_MULTIPLE} == 0 and Ip % {I_MULTIPLE} == 0, "
                         f"got Hp={Hp}, Ip={Ip}")

    def u8(t):
        return (t if t.dtype == torch.uint8 else t.view(torch.uint8)).contiguous()

    def f32(t):
        return None if t is None else t.to(torch.float32).contiguous()

    rows = _paired_rows(Ip, activation, w13.device)
    b13 = f32(w13_bias)
    if activations == "fp8":
        def words(t):
            return _tile_rows(_pack_words_fp8(t), 32).view(torch.int32)
        return (words(u8(w13)[:, rows]), _tile_rows(u8(w13_scales)[:, rows].contiguous(), 2),
                None if b13 is None else b13[:, rows].contiguous(),
                words(u8(w2)), _tile_rows(u8(w2_scales), 2), f32(w2_bias))
    w13, s13 = _bias_scales(u8(w13)[:, rows], u8(w13_scales)[:, rows])
    w2, s2 = _bias_scales(u8(w2), u8(w2_scales))
    return (_tile_rows(_pack_words(w13), 32), _tile_rows(s13, 2),
            None if b13 is None else b13[:, rows].contiguous(),
            _tile_rows(_pack_words(w2), 32), _tile_rows(s2, 2), f32(w2_bias))


def _unpack_words(w: torch.Tensor) -> torch.Tensor:
    """Inverse of `_pack_words`: this kernel's words [E, N, K/2] uint8 -> canonical packed codes."""
    dev = w.device
    cols = torch.tensor(_WORD_COLUMNS, device=dev).flatten()  # code position of (word, element)
    order = torch.argsort(cols)                               # (word, element) of each position
    mag_at = torch.tensor(layout.MAG_AT, device=dev, dtype=torch.int64)
    sign_at = torch.tensor(layout.SIGN_AT, device=dev, dtype=torch.int64)
    out = torch.empty_like(w)
    for e in range(w.shape[0]):
        words = w[e].contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        words = words.reshape(w.shape[1], -1, 4, 1)  # [N, K/32, 4 words, 1]
        codes = ((words >> mag_at) & 7) | (((words >> sign_at) & 1) << 3)  # [N, K/32, 4, 8]
        codes = codes.flatten(-2)[..., order].reshape(w.shape[1], -1, 2)  # canonical order, pairs
        out[e] = (codes[..., 0] | (codes[..., 1] << 4)).to(torch.uint8)
    return out


def _untile_rows(t: torch.Tensor, block_bytes: int) -> torch.Tensor:
    """Inverse of `_tile_rows`: [E, N/16, K/64, 16, block_bytes] -> [E, N, K/2 or K/32]."""
    E, n16, kb, _, b = t.shape
    return t.transpose(2, 3).reshape(E, n16 * 16, kb * b)


def unprepare(w13, w13_scales, w13_bias, w2, w2_scales, w2_bias, activation, activations="bf16"):
    """Inverse of `prepare`, byte for byte, except in blocks whose scale is NaN (255): the bf16
    layout's `prepare` zeroes their codes (they decode to NaN either way), so they come back as
    zeros."""
    check_activation(activation)
    check_activations(activations)
    Ip = w2.shape[2] * 64  # w2 [E, Hp/16, Ip/64, 16, 32 | 8]
    rows = _paired_rows(Ip, activation, w13.device)

    def unpaired(t):  # prepared row r holds canonical row rows[r]
        out = torch.empty_like(t)
        out[:, rows] = t
        return out

    if activations == "fp8":
        def codes(t):
            return _unpack_words_fp8(_untile_rows(t.view(torch.uint8), 32))
        return (unpaired(codes(w13)), unpaired(_untile_rows(w13_scales, 2)),
                None if w13_bias is None else unpaired(w13_bias),
                codes(w2), _untile_rows(w2_scales, 2),
                None if w2_bias is None else w2_bias.clone())

    def unbiased(s):
        s = s.to(torch.int16)
        return torch.where(s == E8M0_NAN, s, s - layout.STORED_SCALE_OFFSET).to(torch.uint8)

    w13c = unpaired(_unpack_words(_untile_rows(w13, 32)))
    s13 = unpaired(unbiased(_untile_rows(w13_scales, 2)))
    b13 = None if w13_bias is None else unpaired(w13_bias)
    return (w13c, s13, b13, _unpack_words(_untile_rows(w2, 32)), unbiased(_untile_rows(w2_scales, 2)),
            None if w2_bias is None else w2_bias.clone())


@functools.lru_cache(maxsize=None)
def _sm_count_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _policy(device: torch.device):
    """The launch policy for `device` (the interpreter's on CPU), with any active override."""
    from .triton_moe_details import policy

    if device.type == "cpu":
        return policy.current(0)
    return policy.current(*torch.cuda.get_device_capability(_device_index(device)))


def route(topk_ids, expert_map, E: int, pdl: dict | None = None):
    """-> (expert_start [EB] int32 (first E+1 used), sorted_assign [M] int32). GPU (or the
    interpreter), no sync. pdl: the route launches' options (launches.pdl_options), None: a
    plain launch."""
    from .triton_moe_details.launches import route_launches

    M = topk_ids.numel()
    dev = topk_ids.device
    plan = route_launches(_policy(dev), M, E, expert_map is not None, pdl or {"PDL": False})
    return _route(plan, topk_ids, expert_map, E)


def _route(plan, topk_ids, expert_map, E: int):
    M = topk_ids.numel()
    dev = topk_ids.device
    EB = plan.launches[0].constexprs["EB"]
    es = torch.empty(EB, dtype=torch.int32, device=dev)
    sorted_assign = torch.empty(M, dtype=torch.int32, device=dev)
    emap = expert_map if expert_map is not None else es  # dummy pointer when absent
    n_map = expert_map.numel() if expert_map is not None else 0
    if plan.n_chunks == 1:
        plan.launches[0](topk_ids, emap, es, es, sorted_assign, M, E, n_map, 1)
        return es, sorted_assign
    # per-chunk counts; the scan adds a row of totals
    counts = torch.empty(plan.n_chunks + int(plan.scanned), EB, dtype=torch.int32, device=dev)
    count, *scan, scatter = plan.launches
    count(topk_ids, emap, counts, es, sorted_assign, M, E, n_map, plan.n_chunks)
    if scan:
        scan[0](counts, plan.n_chunks)
    scatter(topk_ids, emap, counts, es, sorted_assign, M, E, n_map, plan.n_chunks)
    return es, sorted_assign


def _words_descs(words, launch, tail):
    """With TMA (the launch's TMA constexpr): host tensor descriptors (_dequant._load_words_tma)
    over prepared words [E, N, K/8] int32 viewed as [E N/16, K/64, 16, 8] (16-row group, 64-code
    block, row, word: the tiled layout), boxes of one BN-row tile's BK step and of its `tail`
    step (the same descriptor when there is none). They hold the base pointer by value, so a
    CUDA graph replays them as captured (the weights are fixed). Without: the words twice (the
    kernel ignores both)."""
    cx = launch.constexprs
    if not cx.get("TMA"):
        return words, words
    from triton.tools.tensor_descriptor import TensorDescriptor

    E, N, kw = words.shape
    v = words.view(E * N // 16, kw // 8, 16, 8)

    def desc(codes):
        box = [cx["BN"] // 16, codes // 64, 16, 8]
        return TensorDescriptor(v, list(v.shape), list(v.stride()), box)
    whole = desc(cx["BK"])
    return whole, (desc(tail) if tail else whole)


_fp8_checked: dict[str, float] = {}  # device -> rel-L2 of its FP8 self-check


def fp8_self_check(device: torch.device, tokens=(3, 300, 8192)) -> float:
    """Once per GPU: the FP8 path on small random problems (T = 3: the decode tiles, split K;
    T = 300: 128-row blocks, a 64-code tail step; T = 8192: the Gluon prefill kernels on sm90)
    against its plain-torch emulation; a
    RuntimeError when they disagree, so that a miscompiled or wrong decode on a GPU it was never
    run on cannot return wrong numbers quietly. The emulation rounds the intermediate to bf16
    before quantizing it, as the kernel does (without that, the two e4m3 roundings of it differ
    by up to 2e-2 rel-L2). -> the worst rel-L2 (<1e-2 expected on a GPU: the kernel's bf16
    output and accumulation order; ~2e-2 under Triton 3.6's interpreter, whose fp32 -> bf16
    conversion truncates). `tokens`: the problem sizes (tests on the interpreter take fewer)."""
    from ..moe_torch import moe_torch
    from ..weights import quantize_experts

    device = torch.device(device)
    if device.type == "cuda":
        device = torch.device("cuda", _device_index(device))
    if str(device) in _fp8_checked:
        return _fp8_checked[str(device)]
    g = torch.Generator().manual_seed(0)
    E, H, I, k = 4, 192, 320, 2
    can = [t.to(device) for t in quantize_experts(
        torch.randn(E, 2 * I, H, generator=g) * 0.1, torch.randn(E, H, I, generator=g) * 0.1,
        torch.randn(E, 2 * I, generator=g) * 0.1, torch.randn(E, H, generator=g) * 0.1,
        activation="swiglu_oai", h_multiple=H_MULTIPLE, i_multiple=I_MULTIPLE)]
    prepared = prepare(*can, "swiglu_oai", activations="fp8")
    worst = 0.0
    for T in tokens:
        x = torch.randn(T, H, generator=g).to(device, torch.bfloat16)
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(device)
        tw = torch.rand(T, k, generator=g).to(device)
        out = _moe(x, ids, tw, *prepared, "swiglu_oai", 1.702, 7.0, None, True, True).float()
        want = moe_torch(x, ids, tw, *can, "swiglu_oai", 1.702, 7.0, None, True, sync_free=False,
                         activations="fp8", intermediate_dtype=torch.bfloat16).float()
        err = ((out - want).norm() / want.norm()).item()
        worst = max(worst, err if err == err else float("inf"))
    if worst > 3e-2:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
        raise RuntimeError(
            f"kernel 'triton': the FP8-activation path failed its self-check on {name} (rel-L2 "
            f"{worst:.3g} against its plain-torch emulation, expected < 1e-2): use "
            f"activations='bf16' and report this GPU and software versions")
    _fp8_checked[str(device)] = worst
    return worst


def moe(hidden, topk_ids, topk_weights, w13, w13_scales, w13_bias, w2, w2_scales, w2_bias,
        activation, alpha, limit, expert_map, combine, activations="bf16"):
    check_activations(activations)
    if (activations == "fp8" and hidden.device.type == "cuda"
            and f"cuda:{_device_index(hidden.device)}" not in _fp8_checked
            and not torch.cuda.is_current_stream_capturing()):
        fp8_self_check(hidden.device)  # (a captured first call: its eager warm-up ran it)
    return _moe(hidden, topk_ids, topk_weights, w13, w13_scales, w13_bias, w2, w2_scales, w2_bias,
                activation, alpha, limit, expert_map, combine, activations == "fp8")


def _moe(hidden, topk_ids, topk_weights, w13, w13_scales, w13_bias, w2, w2_scales, w2_bias,
         activation, alpha, limit, expert_map, combine, fp8):
    activations = "fp8" if fp8 else "bf16"
    T, H = hidden.shape
    k = topk_ids.shape[1]
    if fp8 != (w13.dtype == torch.int32):
        raise ValueError(f"kernel 'triton': activations={activations!r} needs weights prepared "
                         f"with activations={activations!r}; these are the "
                         f"{'fp8' if w13.dtype == torch.int32 else 'bf16'} layout")
    w13, w13_scales, w2, w2_scales = (_rows(t.contiguous()) for t in (w13, w13_scales, w2, w2_scales))
    if fp8:  # int32 words [E, N, K/8] -> their bytes, as the bf16 layout's
        w13, w2 = w13.view(torch.uint8), w2.view(torch.uint8)
    E, two_ip, half_hp = w13.shape
    Hp, Ip = half_hp * 2, two_ip // 2
    out_shape = (T, H) if combine else (T, k, H)
    if T == 0 or k == 0:
        return hidden.new_zeros(out_shape)
    reason = unavailable_reason(hidden.device)
    if reason is not None:
        raise RuntimeError(reason)
    if fp8 and hidden.device.type == "cuda" and torch.cuda.get_device_capability(hidden.device)[0] != 9:
        major, minor = torch.cuda.get_device_capability(hidden.device)
        raise RuntimeError(f"kernel 'triton' runs activations='fp8' on sm90 (Hopper fp8 wgmma) "
                           f"only; this GPU is sm{major}{minor}: use activations='bf16'")
    check_activation(activation)
    if hidden.dtype not in _HIDDEN_DTYPES:
        raise TypeError(f"hidden must be one of {_HIDDEN_DTYPES}, got {hidden.dtype}")
    from .triton_moe_details.launches import moe_launches

    interpret = hidden.device.type == "cpu"
    dev = hidden.device
    x = hidden.contiguous()
    # the kernels take strides as compile-time constants (launches.py: from the shapes) and
    # assume unit inner strides
    w13_bias, w2_bias = (None if b is None else b.contiguous() for b in (w13_bias, w2_bias))
    ids = topk_ids.contiguous()
    tw = topk_weights.contiguous()
    emap = expert_map.to(torch.int32).contiguous() if expert_map is not None else None
    n_map = emap.numel() if emap is not None else 0  # ids past the map are not on this rank
    M = T * k
    major, sms = 0, 0  # the interpreter: no automatic split or pairing (tests force them)
    if not interpret:
        major = torch.cuda.get_device_capability(dev)[0]
        sms = _sm_count_of(_device_index(dev))
    # _mma2's 16-byte cp.async copies and the TMA descriptors need 16-byte aligned weights;
    # _mma2's GEMM1 copies x as it is: bf16 on a 16-byte boundary only
    L = moe_launches(
        _policy(dev), T=T, k=k, E=E, H=H, Hp=Hp, Ip=Ip, activation=activation,
        has_b13=w13_bias is not None, has_b2=w2_bias is not None, has_map=emap is not None,
        combine=combine, major=major, sms=sms, interpret=interpret,
        weights_aligned=all(t.data_ptr() % 16 == 0 for t in (w13, w13_scales, w2, w2_scales)),
        x_bf16_aligned=x.dtype == torch.bfloat16 and x.data_ptr() % 16 == 0, fp8=fp8)
    if L.direct:  # one token: each _mma2 row block is one assignment, its expert from the ids
        es = sorted_assign = ids  # not read
    else:
        es, sorted_assign = _route(L.route, ids, emap, E)
    ids_or_es = ids if L.direct else es  # the ids where DIRECT reads them, else a dummy
    emap_or_es = emap if emap is not None else ids_or_es
    a = torch.empty(M, Ip, dtype=torch.bfloat16, device=dev)  # activations, sorted-row order
    split1 = L.p1.split
    p = torch.empty(split1, 2, M, Ip, dtype=torch.float32, device=dev) if split1 > 1 else a
    b13 = w13_bias if w13_bias is not None else es  # dummy pointer when absent
    # the weights as int32 words [E, 2Ip, Hp/8], or as their bytes [E, 2Ip, Hp/2] for the
    # Triton FP8 kernels (_fp8._load_codes); FP8: e4m3 rows and their scales (rs: one per row;
    # _wgmma_fp8 takes them after _mma2's arguments)
    w13_words = w13 if fp8 and not L.wgmma_fp8[0] else w13.view(torch.int32)
    rs = es
    if fp8:
        xq = torch.empty(T, Hp, dtype=torch.float8_e4m3fn, device=dev)
        rs = torch.empty(T, dtype=torch.float32, device=dev)
        L.quant1(x, xq, rs, T)
        x = xq
    if L.mma2[0]:
        L.gemm1(x, sorted_assign, es, ids_or_es, emap_or_es, w13_words, w13_scales, b13, a, p,
                E, n_map, k, float(alpha), float(limit), M, *((rs,) if L.wgmma_fp8[0] else ()))
    else:
        L.gemm1(x, sorted_assign, es, w13_words, w13_scales, b13, a, p, E, k, float(alpha),
                float(limit), M, *_words_descs(w13_words, L.gemm1, L.p1.tail), rs)
    if L.act is not None:
        L.act(p, a, M, float(alpha), float(limit))
    if fp8:
        aq = torch.empty(M, Ip, dtype=torch.float8_e4m3fn, device=dev)
        rs = torch.empty(M, dtype=torch.float32, device=dev)
        L.quant2(a, aq, rs, M)
        a = aq

    # per-(token, slot) outputs: float32 partial sums of split K, else (Triton GEMM2) rounded
    # to the hidden dtype, as the combine's inputs (the policy's y_hidden_dtype)
    y_dtype = hidden.dtype if L.y_hidden_dtype else torch.float32
    y = torch.empty(L.p2.split, M, H, dtype=y_dtype, device=dev)
    b2 = w2_bias if w2_bias is not None else es
    w2_words = w2 if fp8 and not L.wgmma_fp8[1] else w2.view(torch.int32)  # (as w13_words)
    if L.mma2[1]:
        L.gemm2(a, sorted_assign, es, ids_or_es, emap_or_es, w2_words, w2_scales, b2, y, E, n_map,
                M, *((rs,) if L.wgmma_fp8[1] else ()))
    else:
        L.gemm2(a, sorted_assign, es, w2_words, w2_scales, b2, y, E, M,
                *_words_descs(w2_words, L.gemm2, L.p2.tail), rs)

    out = torch.empty(out_shape, dtype=hidden.dtype, device=dev)
    L.finalize(y, ids, emap if emap is not None else es, tw, out, E, n_map, M)
    return out
