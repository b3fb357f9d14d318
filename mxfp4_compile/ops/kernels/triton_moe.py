"""The "triton" kernel: our own fused MXFP4 MoE in Triton (default on sm80-sm90).

Shape legend: T tokens, k top-k slots per token, M = T*k (token, slot) assignments,
E local experts, H hidden (Hp padded), I intermediate (Ip padded).
  hidden        [T, H]            bf16 / fp16 / fp32 (output in the same dtype)
  topk_ids      [T, k]            int32 / int64
  topk_weights  [T, k]            float
  w13, w13_s    [E, 2Ip, Hp/2], [E, 2Ip, Hp/32]  uint8 (prepared: see below)
  w13_bias      [E, 2Ip]          float32 or None
  w2, w2_s      [E, Hp, Ip/2], [E, Hp, Ip/32]    uint8 (prepared)
  w2_bias       [E, Hp]           float32 or None
  expert_map    [E_global]        int32, -1 = not on this rank

Prepared layout = the canonical one (ops/moe_torch.py: padding, scales, biases) with three
permutations: w13 rows are paired per 16 (8 gate rows, then the 8 up rows of the same columns:
`_paired_rows`), and inside every 32-code chunk along K the codes' bits are regrouped
(`_pack_words`) so that each 32-bit word decodes to 4 bf16 pairs with a rotate and one or two
masks each (triton_moe_details/layout.py), landing directly in the registers wgmma reads its A
operand from; then rows are tiled by 16 (`_tile_rows`): a K step of a BN-row tile reads BN/16
runs of 16 x BK/2 bytes; the scales, biased (`_bias_scales`), are tiled the same way.
Steps (triton_moe_details/_kernels.py): route (expert-sorted rows, on the GPU), GEMM1 (token
gather, dequant, bias, activation), GEMM2 (bias, scatter to (token, slot) rows), finalize
(weighted sum over slots in fixed order); at decode sizes the GEMMs split K (configs.plan) and
the chunks are added in order (_act_kernel, finalize); decode tiles run Gluon kernels on
mma.sync (triton_moe_details/_mma2.py), which at T=1 read each assignment's expert from the ids
(no route launch). No host sync, no data-dependent shapes: CUDA-graph safe and deterministic.
On sm90+ most launches are programmatic dependent launches (`_pdl`). Tiles:
triton_moe_details/configs.py.
"""
from __future__ import annotations

import functools
import os

import torch

from . import reference_moe
from ..moe_torch import ACTIVATIONS, check_activation
from .triton_moe_details import layout  # pure Python: importable without triton

NAME = "triton"
H_MULTIPLE = 64  # K of GEMM1 and N of GEMM2: rows stay 32-byte multiples (16-byte loads)
I_MULTIPLE = 64

_ACT = {"swiglu_oai": 0, "silu_glu": 1}
_HIDDEN_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_ROUTE_BUDGET = 32768  # elements of the [CHUNK, EB] one-hot tile of one routing program
# Up to this many assignments one routing program sorts them all (H100, route kernel alone:
# 256 (20b/120b T=64) 2.1 us vs 7.3 / 12.9 us for the one-hot scan; 2048 (20b T=512) 27.7 us
# vs 19.8 for the two chunked launches; sizes in between not measured, so they keep the scan:
# in one program while M <= _ROUTE_BUDGET / EB, else in chunks)
_ROUTE_SORT_MAX = 256
# Chunked routing with at least this many chunks scans the chunk counts in a launch of its own
# (_kernels._route_scan_kernel) instead of each scatter program summing the rows before it.
# H100, session 9 (benchmarks/route_time.py, us, before / after): 120b T=4096 (128 chunks)
# 24.3 / 20.1, T=16384 (512) 159.7 / 64.7; 20b T=4096 (32) 17.3 / 17.3; with fewer chunks the
# extra launch costs: 20b T=512 (4) 15.4 / 17.0, Mixtral T=16384 (16) 19.6 / 21.3.
_ROUTE_SCAN_CHUNKS = 64


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


# `prepare` regroups bytes in place: the shapes and dtypes stay the canonical ones.
prepared_shapes = reference_moe.prepared_shapes


# Element t = 4s + 2h + lo of word c of a 32-code chunk (4 little-endian words) holds column
# 16s + 8h + 2c + lo: what one thread needs for the wgmma A fragment (_kernels._assemble); its
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


def _tile_rows(t: torch.Tensor, block_bytes: int) -> torch.Tensor:
    """Packed words [E, N, K/2] (block_bytes 32) or scale bytes [E, N, K/32] (block_bytes 2),
    N % 16 == 0, K % 64 == 0 -> the same bytes reordered so that each 16-row group stores its
    64-code blocks one after another, a block holding the 16 rows' bytes side by side:
    [E, N/16, K/64, 16, block_bytes] in memory (_kernels._tiled_rows / _tiled_cols). One K step
    of a BN-row tile then reads BN/16 runs of 16 x BK/2 bytes instead of BN runs of BK/2 bytes:
    on the H100 the decode GEMMs ran 4-12% faster (benchmarks/NOTES.md, session 4)."""
    E, N, nb = t.shape
    t = t.reshape(E, N // 16, 16, nb // block_bytes, block_bytes)
    return t.transpose(2, 3).reshape(E, N, nb)


def _paired_rows(Ip: int, activation: str, device) -> torch.Tensor:
    """Prepared w13 row r -> canonical row: 16-row groups hold 8 gate rows then the 8 up rows of
    the same intermediate columns, so one MMA tile covers both halves of the activation."""
    r = torch.arange(2 * Ip, device=device)
    col = (r // 16) * 8 + r % 8
    up = (r // 8) % 2
    if ACTIVATIONS[activation] == "interleaved":
        return 2 * col + up
    return col + up * Ip


# Scale bytes are stored biased, s + _SCALE_BIAS: the bf16 exponent of the multiplier the kernel
# applies (layout.py); exact for s <= _MAX_SCALE, 255 (NaN) kept.
_SCALE_BIAS = layout.SCALE_BIAS
_MAX_SCALE = layout.MAX_SCALE


def _bias_scales(codes: torch.Tensor, scales: torch.Tensor):
    """-> (codes, biased scales): codes [E, N, K/2] and e8m0 bytes [E, N, K/32] uint8. A NaN
    scale (255) stays 255 (an infinite multiplier) and its block's codes become 0, so the whole
    block decodes to 0 * inf = NaN, as the format says."""
    s = scales.to(torch.int16)
    too_big = (s > _MAX_SCALE) & (s != 255)
    if bool(too_big.any()):
        raise ValueError(
            f"kernel 'triton' handles e8m0 block scales up to {_MAX_SCALE} (2**{_MAX_SCALE - 127});"
            f" these weights have {int(too_big.sum())} block(s) with a larger finite scale (max "
            f"byte {int(s[too_big].max())}). Use kernel='reference' for such weights.")
    nan = s == 255
    if bool(nan.any()):
        shape = codes.shape
        codes = codes.reshape(*nan.shape, 16).masked_fill(nan[..., None], 0).reshape(shape)
    return codes, torch.where(nan, s, s + _SCALE_BIAS).to(torch.uint8)


def prepare(w13, w13_scales, w13_bias, w2, w2_scales, w2_bias, activation):
    """Canonical padded MXFP4 -> this kernel's layout: w13 rows paired (`_paired_rows`), codes
    regrouped inside every 32-code chunk (`_pack_words`); scales biased (`_bias_scales`) and,
    like the biases, following their rows; codes and scales tiled by 16 rows (`_tile_rows`)."""
    check_activation(activation)
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
    w13, s13 = _bias_scales(u8(w13)[:, rows], u8(w13_scales)[:, rows])
    w2, s2 = _bias_scales(u8(w2), u8(w2_scales))
    return (_tile_rows(_pack_words(w13), 32), _tile_rows(s13, 2),
            None if b13 is None else b13[:, rows].contiguous(),
            _tile_rows(_pack_words(w2), 32), _tile_rows(s2, 2), f32(w2_bias))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@functools.lru_cache(maxsize=None)
def _sm_count_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    return _sm_count_of(device.index if device.index is not None else torch.cuda.current_device())


def _regs(c) -> dict:
    return {} if c.maxnreg is None else {"maxnreg": c.maxnreg}


def route(topk_ids, expert_map, E: int, pdl: dict | None = None):
    """-> (expert_start [EB] int32 (first E+1 used), sorted_assign [M] int32). GPU only, no sync.
    pdl: the route kernel's launch options from _pdl, None: no programmatic launch."""
    from .triton_moe_details import _kernels as K

    M = topk_ids.numel()
    dev = topk_ids.device
    EB = _next_pow2(E + 1)
    sort = M <= _ROUTE_SORT_MAX  # one program: histogram + sort
    chunk = max(4, _next_pow2(M) if sort else min(_next_pow2(M), _ROUTE_BUDGET // EB))
    n_chunks = -(-M // chunk)
    es = torch.empty(EB, dtype=torch.int32, device=dev)
    sorted_assign = torch.empty(M, dtype=torch.int32, device=dev)
    has_map = expert_map is not None
    emap = expert_map if has_map else es  # dummy pointer when absent
    nw = 4 if chunk * EB <= 8192 or sort else 8
    pdl = pdl or {"PDL": False}
    if n_chunks == 1:
        K._route_kernel[(1,)](topk_ids, emap, es, es, sorted_assign, M, E, 1,
                              HAS_MAP=has_map, CHUNK=chunk, EB=EB, PHASE=2, SORT=sort,
                              num_warps=nw, **pdl)
    else:
        scanned = n_chunks >= _ROUTE_SCAN_CHUNKS
        # per-chunk counts; the scan adds a row of totals
        counts = torch.empty(n_chunks + int(scanned), EB, dtype=torch.int32, device=dev)
        K._route_kernel[(n_chunks,)](topk_ids, emap, counts, es, sorted_assign, M, E, n_chunks,
                                     HAS_MAP=has_map, CHUNK=chunk, EB=EB, PHASE=0, SORT=False,
                                     num_warps=nw, **pdl)
        if scanned:
            BE = min(EB, 32)
            K._route_scan_kernel[(EB // BE,)](counts, n_chunks, EB=EB, BE=BE, RS=64,
                                              num_warps=4, **pdl)
        K._route_kernel[(n_chunks,)](topk_ids, emap, counts, es, sorted_assign, M, E, n_chunks,
                                     HAS_MAP=has_map, CHUNK=chunk, EB=EB, PHASE=1, SORT=False,
                                     SCANNED=scanned, num_warps=nw, **pdl)
    return es, sorted_assign


def _pdl(major: int):
    """-> launch options per kernel ("route", "gemm1", "act", "gemm2", "finalize") on a GPU of
    compute capability `major` (0: the interpreter). On sm90+ the kernels in configs.PDL_LAUNCH
    launch with programmatic dependent launch (_kernels._pdl_enter): their programs become
    resident while the kernel before them ends. The others launch as usual; in them the wait
    returns at once, and the trigger still lets the next kernel launch early. Off under the
    interpreter and before sm90 (no griddepcontrol)."""
    from .triton_moe_details import configs

    names = ("route", "gemm1", "act", "gemm2", "finalize")
    if major < 9:
        return {name: {"PDL": False} for name in names}
    return {name: {"PDL": True, "launch_pdl": name in configs.PDL_LAUNCH} for name in names}


def _words_descs(words, c, tma, tail):
    """With `tma`: host tensor descriptors (_kernels._load_words_tma) over prepared words
    [E, N, K/8] int32 viewed as [E N/16, K/64, 16, 8] (16-row group, 64-code block, row, word:
    the tiled layout), boxes of one BN-row tile's BK step and of its `tail` step (the same
    descriptor when there is none). They hold the base pointer by value, so a CUDA graph
    replays them as captured (the weights are fixed). Without: the words twice (the kernel
    ignores both)."""
    if not tma:
        return words, words
    from triton.tools.tensor_descriptor import TensorDescriptor

    E, N, kw = words.shape
    v = words.view(E * N // 16, kw // 8, 16, 8)

    def desc(codes):
        box = [c.BN // 16, codes // 64, 16, 8]
        return TensorDescriptor(v, list(v.shape), list(v.stride()), box)
    whole = desc(c.BK)
    return whole, (desc(tail) if tail else whole)


def moe(hidden, topk_ids, topk_weights, w13, w13_scales, w13_bias, w2, w2_scales, w2_bias,
        activation, alpha, limit, expert_map, combine):
    T, H = hidden.shape
    k = topk_ids.shape[1]
    E, two_ip, half_hp = w13.shape
    Hp, Ip = half_hp * 2, two_ip // 2
    out_shape = (T, H) if combine else (T, k, H)
    if T == 0 or k == 0:
        return hidden.new_zeros(out_shape)
    reason = unavailable_reason(hidden.device)
    if reason is not None:
        raise RuntimeError(reason)
    check_activation(activation)
    if hidden.dtype not in _HIDDEN_DTYPES:
        raise TypeError(f"hidden must be one of {_HIDDEN_DTYPES}, got {hidden.dtype}")
    from .triton_moe_details import _kernels as K
    from .triton_moe_details import configs

    interpret = hidden.device.type == "cpu"
    dev = hidden.device
    x = hidden.contiguous()
    # the kernels take row strides as compile-time constants and assume unit inner strides
    w13, w13_scales, w2, w2_scales = (t.contiguous() for t in (w13, w13_scales, w2, w2_scales))
    ids = topk_ids.contiguous()
    tw = topk_weights.contiguous()
    emap = expert_map.to(torch.int32).contiguous() if expert_map is not None else None
    M = T * k
    EB = _next_pow2(E + 1)
    major = 0 if interpret else torch.cuda.get_device_capability(dev)[0]
    pdl = _pdl(major)
    # _mma2 (Gluon) runs the decode tiles where it can. Its 16-byte cp.async copies need the
    # weights on 16-byte boundaries, and GEMM1 copies x as is: bf16 on a 16-byte boundary only
    # (else the Triton kernels run GEMM1, and the 8-row decode tiles, which they lack, are off;
    # configs.plan_gemm decides per GEMM)
    m2 = configs.mma2_possible(major) and all(
        t.data_ptr() % 16 == 0 for t in (w13, w13_scales, w2, w2_scales))
    m2_x = m2 and x.dtype == torch.bfloat16 and x.data_ptr() % 16 == 0
    c1, c2 = configs.pick(T, k, E, Hp, Ip, interpret, m2_x)
    # wgmma keeps MMAs in flight across K steps: drain before each dequant (sm90; _wgmma_drain)
    sync = major == 9
    sms = 0 if interpret else _sm_count(dev)  # 0: no automatic split/pairing (tests force them)

    a = torch.empty(M, Ip, dtype=torch.bfloat16, device=dev)  # activations, sorted-row order
    # row blocks (worst case: surplus programs exit at once), launch plan, which kernel
    p1, nb1, mma2_1 = configs.plan_gemm(c1, M, E, 2 * Ip, Hp, sms, "gemm1", m2_x, major)
    p2, nb2, mma2_2 = configs.plan_gemm(c2, M, E, H, Ip, sms, "gemm2", m2, major)
    # one token: its k assignments have k distinct experts, so the _mma2 kernels take one
    # assignment per row block straight from the ids, and the route launch goes (DIRECT)
    direct = T == 1 and mma2_1 and mma2_2 and configs.MMA2_DIRECT
    if direct:
        es = sorted_assign = ids  # not read
        nb1 = nb2 = M
    else:
        es, sorted_assign = route(ids, emap, E, pdl["route"])
    ids_or_es = ids if direct else es  # the ids where DIRECT reads them, else a dummy
    emap_or_es = emap if emap is not None else ids_or_es
    c1, split1 = p1.config, p1.split
    p = torch.empty(split1, 2, M, Ip, dtype=torch.float32, device=dev) if split1 > 1 else a
    b13 = w13_bias if w13_bias is not None else es
    w13_words = w13.view(torch.int32)  # [E, 2Ip, Hp/8]
    # GEMM2 as a programmatic dependent launch behind an _mma2 GEMM1 that triggers only after
    # its K loops (its programs then do not take SM slots GEMM1's last wave still needs)
    late = mma2_1 and major >= 9 and configs.MMA2_LATE_TRIGGER
    if late:
        pdl["gemm2"] = dict(pdl["gemm2"], launch_pdl=True)
    if mma2_1:
        from .triton_moe_details import _mma2
        _mma2._gemm1_kernel[(nb1 * p1.tiles, split1)](
            x, sorted_assign, es, ids_or_es, emap_or_es, w13_words, w13_scales, b13, a, p,
            E, k, nb1, float(alpha), float(limit), M,
            x.stride(0), w13_words.stride(0), w13_words.stride(1), w13_scales.stride(0),
            w13_scales.stride(1), w13_bias.stride(0) if w13_bias is not None else 0,
            H=H, Hp=Hp, Ip=Ip, ACT=_ACT[activation], HAS_BIAS=w13_bias is not None, BM=c1.BM,
            BN=c1.BN, BK=c1.BK, EB=EB, SPLIT=split1, K_CHUNK=p1.chunk,
            MASK_K=p1.tail > 0 or not p1.even_k, DIRECT=direct, HAS_MAP=emap is not None,
            LATE_TRIGGER=late, NS=c1.num_stages, num_warps=4, **pdl["gemm1"])
    else:
        tma1 = configs.use_tma(c1, major, w13_words)
        K._gemm1_kernel[(nb1 * p1.tiles, split1)](
            x, sorted_assign, es, w13_words, w13_scales, b13, a, p,
            E, k, nb1, float(alpha), float(limit), M,
            *_words_descs(w13_words, c1, tma1, p1.tail),
            # strides as constants: the compiler then knows every row is 16-byte aligned
            x.stride(0), w13_words.stride(0), w13_words.stride(1), w13_scales.stride(0),
            w13_scales.stride(1), w13_bias.stride(0) if w13_bias is not None else 0,
            H=H, Hp=Hp, Ip=Ip,
            ACT=_ACT[activation], HAS_BIAS=w13_bias is not None, BM=c1.BM, BN=c1.BN, BK=c1.BK,
            EB=EB, EVEN_K=p1.even_k, EVEN_N=(2 * Ip) % c1.BN == 0, UPCAST=interpret, SWAP=c1.SWAP,
            SYNC=sync, SPLIT=split1, K_CHUNK=p1.chunk, N_FIRST=c1.N_FIRST, PAIR=c1.PAIR,
            TAIL=p1.tail, HALF=c1.HALF, TMA=tma1, EXTRA=c1.EXTRA,
            MERGED_FIRST=configs.MERGED_FIRST,
            num_warps=c1.num_warps, num_stages=c1.num_stages, **_regs(c1), **pdl["gemm1"])
    if split1 > 1:
        BR, BC = 16, 128
        K._act_kernel[(_cdiv(M, BR), _cdiv(Ip, BC))](
            p, a, M, float(alpha), float(limit), Ip=Ip, ACT=_ACT[activation], SPLIT=split1,
            BR=BR, BC=BC, num_warps=4, **pdl["act"])

    c2, split2 = p2.config, p2.split
    # per-(token, slot) outputs: float32 partial sums of split K, else (Triton GEMM2) rounded
    # to the hidden dtype, as the combine's inputs (configs.Y_HIDDEN_DTYPE)
    y_dtype = (hidden.dtype if split2 == 1 and not mma2_2 and configs.Y_HIDDEN_DTYPE
               else torch.float32)
    y = torch.empty(split2, M, H, dtype=y_dtype, device=dev)
    b2 = w2_bias if w2_bias is not None else es
    w2_words = w2.view(torch.int32)  # [E, Hp, Ip/8]
    if mma2_2:
        from .triton_moe_details import _mma2
        _mma2._gemm2_kernel[(nb2 * p2.tiles, split2)](
            a, sorted_assign, es, ids_or_es, emap_or_es, w2_words, w2_scales, b2, y, E, nb2, M,
            w2_words.stride(0), w2_words.stride(1), w2_scales.stride(0), w2_scales.stride(1),
            w2_bias.stride(0) if w2_bias is not None else 0, H=H, Ip=Ip,
            HAS_BIAS=w2_bias is not None, BM=c2.BM, BN=c2.BN, BK=c2.BK, EB=EB, SPLIT=split2,
            K_CHUNK=p2.chunk, MASK_K=p2.tail > 0 or not p2.even_k, DIRECT=direct,
            HAS_MAP=emap is not None, NS=c2.num_stages, num_warps=4, **pdl["gemm2"])
    else:
        tma2 = configs.use_tma(c2, major, w2_words)
        K._gemm2_kernel[(nb2 * p2.tiles, split2)](
            a, sorted_assign, es, w2_words, w2_scales, b2, y,
            E, nb2, M, *_words_descs(w2_words, c2, tma2, p2.tail),
            w2_words.stride(0), w2_words.stride(1), w2_scales.stride(0), w2_scales.stride(1),
            w2_bias.stride(0) if w2_bias is not None else 0, H=H, Ip=Ip,
            HAS_BIAS=w2_bias is not None, BM=c2.BM, BN=c2.BN, BK=c2.BK, EB=EB,
            EVEN_K=p2.even_k, EVEN_N=H % c2.BN == 0, UPCAST=interpret, SWAP=c2.SWAP, SYNC=sync,
            SPLIT=split2, K_CHUNK=p2.chunk, N_FIRST=c2.N_FIRST, PAIR=c2.PAIR, TAIL=p2.tail,
            HALF=c2.HALF, TMA=tma2, EXTRA=c2.EXTRA, MERGED_FIRST=configs.MERGED_FIRST,
            num_warps=c2.num_warps, num_stages=c2.num_stages, **_regs(c2), **pdl["gemm2"])

    out = torch.empty(out_shape, dtype=hidden.dtype, device=dev)
    # decode: T programs of 1024 columns would leave most SMs idle; 128 columns each then
    BH = min(1024 if T >= 64 else 128, _next_pow2(H))
    K._finalize_kernel[(T, _cdiv(H, BH))](
        y, ids, emap if emap is not None else es, tw, out, E, M, H=H, k_top=k,
        HAS_MAP=emap is not None, COMBINE=bool(combine), BH=BH, SPLIT=split2, num_warps=4,
        **pdl["finalize"])
    return out

