"""Every torch.library op of the package (namespace ``mxfp4``), with its fake kernel.

All ops are functional (``mutates_args=()``): no auto_functionalized wrappers for the compiler to
match around, and safe under CUDA-graph capture. Shape legend as in ops/moe_torch.py.
"""
from __future__ import annotations

import os

import torch

from .. import numerics
from ..formats import (BLOCK, SWIGLU_ALPHA, SWIGLU_LIMIT, check_activation, check_activations,
                       check_kernel, check_rounding)
from . import dispatch, weights
from . import topk_softmax as _topk_softmax
from .kernels import check_prepared
from .moe_torch import local_ids

# ---------------------------------------------------------------------------------------- quantize


@torch.library.custom_op("mxfp4::quantize", mutates_args=())
def quantize(x: torch.Tensor, rounding: str = "floor") -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (packed uint8 [..., K/2], e8m0 scales uint8 [..., K/32])."""
    return numerics.quantize(x, rounding)


@quantize.register_fake
def _(x, rounding="floor"):
    if not x.is_floating_point():
        raise TypeError(f"quantize: x must be a floating tensor, got {x.dtype}")
    numerics.check_quantize_shape(x.shape)
    check_rounding(rounding)
    k = x.shape[-1]
    return (x.new_empty(*x.shape[:-1], k // 2, dtype=torch.uint8),
            x.new_empty(*x.shape[:-1], k // BLOCK, dtype=torch.uint8))


# -------------------------------------------------------------------------------------- dequantize


def _check_dequant(packed, scales, dtype):
    if packed.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise TypeError(f"dequantize: packed and scales must be uint8, got {packed.dtype} and "
                        f"{scales.dtype} (view torch's MX dtypes as uint8 first)")
    if not dtype.is_floating_point:
        raise TypeError(f"dequantize: dtype must be a float dtype, got {dtype}")
    if scales.device != packed.device:  # else dispatch may pick the fake kernel (e.g. meta scales)
        raise ValueError(f"dequantize: scales are on {scales.device} but packed is on {packed.device}; "
                         f"keep both on one device")
    numerics.check_dequantize_shapes(packed.shape, scales.shape)


@torch.library.custom_op("mxfp4::dequantize", mutates_args=())
def dequantize(packed: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(packed [..., K/2], scales [..., K/32]) -> [..., K] ``dtype``."""
    _check_dequant(packed, scales, dtype)
    return numerics.dequantize(packed, scales, dtype)


@dequantize.register_fake
def _(packed, scales, dtype):
    _check_dequant(packed, scales, dtype)
    return packed.new_empty(*packed.shape[:-1], packed.shape[-1] * 2, dtype=dtype)


# ------------------------------------------------------------------------------------ topk_softmax


@torch.library.custom_op("mxfp4::topk_softmax", mutates_args=())
def topk_softmax(logits: torch.Tensor, k: int, softmax_first: bool = False,
                 renormalize: bool = True,
                 out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (weights [T, k] float32 or out_dtype, ids [T, k] int64) in one
    launch on CUDA (ops/topk_softmax.py: which router each flag combination is)."""
    return _topk_softmax.topk_softmax(logits, k, softmax_first, renormalize, out_dtype)


@topk_softmax.register_fake
def _(logits, k, softmax_first=False, renormalize=True, out_dtype=None):
    _topk_softmax.check(logits, k)
    _topk_softmax.check_out_dtype(out_dtype)
    T = logits.shape[0]
    return (logits.new_empty(T, k, dtype=out_dtype or torch.float32),
            logits.new_empty(T, k, dtype=torch.int64))


# --------------------------------------------------------------------------------------------- moe


def _static(n) -> bool:
    """A plain int (not a symbolic size of a traced graph: comparing one would add a guard)."""
    return isinstance(n, int)


def _check_same(a, b, message) -> None:
    """ValueError(message()) unless sizes a == b; for symbolic sizes (a traced graph) the same
    as a torch._check, which records the equality instead of guarding on a value."""
    if _static(a) and _static(b):
        if a != b:
            raise ValueError(message())
    else:
        torch._check(a == b, message)


_prepared_ok: dict[tuple, tuple[int, int, int]] = {}  # shapes/dtypes/options already checked


def _check_weights(hidden, kernel, activation, tensors, activations="bf16") -> tuple[int, int, int]:
    """-> (E, Hp, Ip): the six prepared tensors checked against ``kernel``'s ``prepared_shapes``
    (ops/kernels/__init__.py ``check_prepared``), once per distinct set of shapes."""
    H = hidden.shape[1]
    specs = tuple(None if t is None else (tuple(t.shape), t.dtype) for t in tensors)
    key = (kernel, activation, activations, specs, H)
    static = _static(H) and all(s is None or all(_static(d) for d in s[0]) for s in specs)
    if static and key in _prepared_ok:
        return _prepared_ok[key]
    out = check_prepared(dispatch.get_kernel(kernel), H if _static(H) else None, tensors, activation,
                         activations=activations)
    if not _static(H):
        torch._check(H <= out[1], lambda: f"moe: hidden has H={H} features but the weights hold "
                                          f"only Hp={out[1]}; the weights were prepared for another model")
    if static:
        if len(_prepared_ok) > 4096:
            _prepared_ok.clear()
        _prepared_ok[key] = out
    return out


def check_ids_enabled() -> bool:
    """``MXFP4_CHECK_IDS=1``: the moe op asserts that every id is in range (a debug check)."""
    return os.environ.get("MXFP4_CHECK_IDS", "0") not in ("", "0")


_moe_ok: dict[tuple, tuple[int, int, int]] = {}  # argument signatures already checked


def _check_moe(hidden, topk_ids, topk_weights, kernel, activation, expert_map, weight_tensors,
               activations="bf16"):
    """Every check that reads no data, for every kernel, once per call (the op and its fake
    kernel): argument kinds, dtypes, shapes, devices, and the prepared weights against the
    kernel's ``prepared_shapes``. -> (E, Hp, Ip). They depend on nothing but each argument's
    shape, dtype and device: a signature seen before (plain ints only, not a traced graph's
    symbolic sizes) returns at once (the checks cost ~20 us of host time per call otherwise)."""
    tensors = (hidden, topk_ids, topk_weights, expert_map, *weight_tensors)
    try:
        key = (kernel, activation, activations, *(t if t is None or not isinstance(t, torch.Tensor)
                                     else (t.shape, t.dtype, t.device) for t in tensors))
        hit = _moe_ok.get(key)
    except TypeError:  # a symbolic size is not hashable: check every time
        key = hit = None
    if hit is not None:
        return hit
    out = _check_moe_uncached(hidden, topk_ids, topk_weights, kernel, activation, expert_map,
                              weight_tensors, activations)
    if key is not None:
        if len(_moe_ok) > 4096:
            _moe_ok.clear()
        _moe_ok[key] = out
    return out


def _check_moe_uncached(hidden, topk_ids, topk_weights, kernel, activation, expert_map, weight_tensors,
                        activations="bf16"):
    if hidden.dim() != 2 or not hidden.is_floating_point():
        raise ValueError(f"moe: hidden must be a float [T, H] tensor, got {hidden.dtype} "
                         f"{tuple(hidden.shape)}")
    if topk_ids.dim() != 2 or topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"moe: topk_ids must be int32/int64 [T, k], got {topk_ids.dtype} "
                         f"{tuple(topk_ids.shape)}")
    if topk_weights.dim() != 2 or not topk_weights.is_floating_point():
        raise ValueError(f"moe: topk_weights must be a float [T, k] tensor shaped like topk_ids "
                         f"{tuple(topk_ids.shape)}, got {topk_weights.dtype} {tuple(topk_weights.shape)}")
    for d, what in ((0, "T (tokens)"), (1, "k (experts per token)")):
        _check_same(topk_weights.shape[d], topk_ids.shape[d],
                    lambda: f"moe: topk_weights {tuple(topk_weights.shape)} and topk_ids "
                            f"{tuple(topk_ids.shape)} disagree on {what}: both must be [T, k]")
    T, Ti = hidden.shape[0], topk_ids.shape[0]
    _check_same(T, Ti, lambda: f"moe: topk_ids has {Ti} rows but hidden has {T} tokens; both "
                               f"must have T rows")
    check_kernel(kernel, "moe: kernel", allow_auto=False)
    check_activation(activation, "moe: activation")
    check_activations(activations, "moe: activations")
    if expert_map is not None and (expert_map.dim() != 1 or expert_map.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"moe: expert_map must be a 1-D int32/int64 tensor [E_global] (global id -> "
                         f"local id or -1), got {expert_map.dtype} {tuple(expert_map.shape)}")
    for name, t in (("topk_ids", topk_ids), ("topk_weights", topk_weights), ("expert_map", expert_map),
                    *zip(weights.ROLES, weight_tensors)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"moe: {name} is on {t.device} but hidden is on {hidden.device}; "
                             f"keep every input on one device")
    E, Hp, Ip = _check_weights(hidden, kernel, activation, weight_tensors, activations)
    n_global = E if expert_map is None else expert_map.shape[0]
    k = topk_ids.shape[1]
    if _static(k) and _static(n_global) and k > n_global:
        raise ValueError(f"moe: topk_ids has k={k} columns but there are only {n_global} "
                         f"{'global experts (expert_map)' if expert_map is not None else 'experts'}; "
                         f"a token cannot pick more distinct experts than exist")
    return E, Hp, Ip


def _check_map_entries(expert_map, E):
    """A CPU map (a host read without a sync): every entry -1 or a local id in [0, E). Off the
    CPU such entries mean "not on this rank" unless MXFP4_CHECK_IDS=1."""
    if isinstance(expert_map, torch._subclasses.FakeTensor) or not expert_map.numel():
        return
    bad = (expert_map < -1) | (expert_map >= E)
    if bool(bad.any()):
        where = bad.nonzero().flatten()[:8].tolist()
        raise ValueError(f"moe: expert_map sends global experts {where} to local ids "
                         f"{expert_map[where].tolist()}; entries must be -1 (not on this rank) or a "
                         f"local id in [0, {E}): this rank holds {E} experts (w13 dim 0). Build maps "
                         f"with mxfp4_compile.distributed.expert_map_for_rank / check_expert_map")


def _assert_ids(topk_ids, expert_map, E):
    """The ``MXFP4_CHECK_IDS=1`` debug check: every id in [0, n_global) and, with a map, every
    mapped id in [-1, E). On CPU a ValueError with the values; elsewhere ``torch._assert_async``
    (no host sync), skipped while a CUDA graph is captured."""
    if not topk_ids.numel() or isinstance(topk_ids, torch._subclasses.FakeTensor):
        return
    n_global = E if expert_map is None else expert_map.shape[0]
    what = "global experts in expert_map" if expert_map is not None else "experts"
    if topk_ids.device.type == "cpu":
        lo, hi = int(topk_ids.min()), int(topk_ids.max())
        if lo < 0 or hi >= n_global:
            raise ValueError(f"moe (MXFP4_CHECK_IDS=1): topk_ids must lie in [0, {n_global}) (number "
                             f"of {what}), got values in [{lo}, {hi}]; without the check such ids "
                             f"contribute zero")
        if expert_map is not None:
            mapped = local_ids(topk_ids, expert_map)
            lo, hi = int(mapped.min()), int(mapped.max())
            if lo < -1 or hi >= E:
                raise ValueError(f"moe (MXFP4_CHECK_IDS=1): expert_map sends the chosen experts to "
                                 f"local ids in [{lo}, {hi}]; entries must be -1 (not on this rank) "
                                 f"or in [0, {E})")
        return
    _assert_ids_async(topk_ids, expert_map, E,
                      capturing=topk_ids.is_cuda and torch.cuda.is_current_stream_capturing())


def _assert_ids_async(topk_ids, expert_map, E, capturing=False):
    """The device-side form of the ids check (any device; on CPU torch._assert_async raises at
    once). Nothing while a CUDA graph is captured: the assert would be baked into every replay."""
    if capturing:
        return
    n_global = E if expert_map is None else expert_map.shape[0]
    ok = ((topk_ids >= 0) & (topk_ids < n_global)).all()
    if expert_map is not None:
        mapped = local_ids(topk_ids, expert_map)
        ok = ok & ((mapped >= -1) & (mapped < E)).all()
    torch._assert_async(ok, f"moe (MXFP4_CHECK_IDS=1): topk_ids must lie in [0, {n_global}) and "
                            f"map to local ids in [-1, {E})")


@torch.library.custom_op("mxfp4::moe", mutates_args=())
def moe(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
        w13: torch.Tensor, w13_scales: torch.Tensor, w13_bias: torch.Tensor | None,
        w2: torch.Tensor, w2_scales: torch.Tensor, w2_bias: torch.Tensor | None,
        kernel: str, activation: str = "swiglu_oai", alpha: float = SWIGLU_ALPHA,
        limit: float = SWIGLU_LIMIT, expert_map: torch.Tensor | None = None,
        combine: bool = True, activations: str = "bf16",
        weights_on_input: bool = False) -> torch.Tensor:
    """Fused MoE experts on MXFP4 weights prepared for ``kernel`` (see ops/moe_torch.py for the
    math). Returns [T, H] combined, or [T, k, H] unweighted per-slot outputs when not ``combine``.

    Checked on every call, for every kernel, from shapes and dtypes only (no data read, no sync;
    the fake kernel runs the same checks): hidden float [T, H]; topk_ids int [T, k] and
    topk_weights float [T, k]; expert_map 1-D int [E_global] of any length; every tensor on
    hidden's device; the six weights exactly the shapes and dtypes ``kernel``'s
    ``prepared_shapes(E, Hp, Ip, activation, ...)`` gives for one E (every tensor's dim 0) and
    the (Hp, Ip) that w13 and w2 imply, with H <= Hp. A mismatch is a ValueError naming the tensor.
    Every kernel's layout has shapes of its own, so weights prepared for another kernel are such
    an error. The activation is not part of any layout (prepare stores w13's gate/up rows in the
    kernel's pair order for either activation): ``activation`` picks the function applied to the
    gate/up pairs, whatever the weights were prepared with. Not detectable from shapes: H smaller
    than the model's own H within the same padding.

    ``activations``: the GEMMs' input dtype. "bf16" (default); "fp8" (W4A8): each GEMM's input
    rows (the tokens, then the activated intermediate) are quantized to e4m3 with one fp32 scale
    per row (amax / 448) and multiplied on fp8 tensor cores: kernel "triton" on sm90, with weights
    prepared with ``activations="fp8"`` (a layout of their own, refused otherwise), and
    "reference" (its plain-torch emulation, the same layout as bf16); other kernels refuse it.
    The triton FP8 path checks itself against the emulation on first use per GPU
    (``triton_moe.fp8_self_check``) and raises if they disagree; today it is slower than bf16
    activations (benchmarks/notes/fp8.md).

    Ids: an id outside [0, E) (without a map) or outside [0, len(expert_map)) (with one) means
    "not on this rank": that slot contributes zero (and is zero in the combine=False output), on
    every kernel. A map entry outside [-1, E) is a ValueError when the map is on the CPU (a host
    read costs no sync there); on a GPU such an entry too means "not on this rank".
    ``MXFP4_CHECK_IDS=1`` turns all of these into an error instead (CPU: a ValueError; GPU:
    ``torch._assert_async``, skipped under CUDA-graph capture). The Triton kernel with an expert_map reads map[id] without a bounds check, so ids
    outside [0, len(expert_map)) must not reach it on a GPU (see MXFP4_CHECK_IDS).

    ``weights_on_input`` (vLLM's ``apply_router_weight_on_input``, Llama 4's MoE): each slot's
    expert reads its token scaled by its weight, and the slots are summed unweighted:
    out[t] = sum_s expert_{ids[t, s]}(w[t, s] * x[t]), the product rounded to hidden's dtype as a
    model computing it in that dtype does. With biases or swiglu this is not the output-weighted
    math. Every kernel runs it the same way: the T*k scaled rows go to the kernel as T*k tokens
    of one slot each (weight 1), and the k outputs of each token are summed in float32
    (combine=False: returned per slot, [T, k, H])."""
    E, _, _ = _check_moe(hidden, topk_ids, topk_weights, kernel, activation, expert_map,
                         (w13, w13_scales, w13_bias, w2, w2_scales, w2_bias), activations)
    if expert_map is not None and expert_map.device.type == "cpu":
        _check_map_entries(expert_map, E)
    if check_ids_enabled():
        _assert_ids(topk_ids, expert_map, E)
    reason = dispatch.unavailable_reason(kernel, hidden.device)
    if reason is not None:
        raise RuntimeError(f"moe: kernel {kernel!r} cannot run on {hidden.device}: {reason}")
    run = dispatch.get_kernel(kernel).moe
    if weights_on_input:
        return _moe_weights_on_input(run, hidden, topk_ids, topk_weights, (
            w13, w13_scales, w13_bias, w2, w2_scales, w2_bias, activation, alpha, limit,
            expert_map), combine, activations)
    return run(hidden, topk_ids, topk_weights, w13, w13_scales, w13_bias, w2, w2_scales, w2_bias,
               activation, alpha, limit, expert_map, combine, activations)


def _moe_weights_on_input(run, hidden, topk_ids, topk_weights, rest, combine, activations):
    """``moe(..., weights_on_input=True)`` on any kernel's ``run``: rows [T*k, H] = w[t, s] * x[t]
    (in hidden's dtype), one slot each with weight 1, then the k outputs of a token summed in
    float32. The expert work is the same T*k (token, expert) pairs as the weighted form's."""
    T, H = hidden.shape
    k = topk_ids.shape[1]
    rows = (hidden.unsqueeze(1) * topk_weights.unsqueeze(-1)).to(hidden.dtype).reshape(T * k, H)
    ids = topk_ids.reshape(T * k, 1)
    ones = torch.ones((T * k, 1), dtype=topk_weights.dtype, device=topk_weights.device)
    y = run(rows, ids, ones, *rest, True, activations).view(T, k, H)  # [T, k, H] per slot
    if not combine:
        return y
    return y.sum(dim=1, dtype=torch.float32).to(hidden.dtype)


@moe.register_fake
def _(hidden, topk_ids, topk_weights, w13, w13_scales, w13_bias, w2, w2_scales, w2_bias, kernel,
      activation="swiglu_oai", alpha=SWIGLU_ALPHA, limit=SWIGLU_LIMIT, expert_map=None, combine=True,
      activations="bf16", weights_on_input=False):
    _check_moe(hidden, topk_ids, topk_weights, kernel, activation, expert_map,
               (w13, w13_scales, w13_bias, w2, w2_scales, w2_bias), activations)
    if combine:
        return hidden.new_empty(hidden.shape)
    return hidden.new_empty(hidden.shape[0], topk_ids.shape[1], hidden.shape[1])


# ------------------------------------------------------------------------ weight transform (compiler)


@torch.library.custom_op("mxfp4::prepare_moe_weights", mutates_args=())
def prepare_moe_weights(w13: list[torch.Tensor], w13_bias: torch.Tensor | None, w2: torch.Tensor,
                        w2_bias: torch.Tensor | None, kernel: str, activation: str,
                        rounding: str = "floor", gate_up_interleaved: bool = True,
                        transposed: bool = False, index: int = 0,
                        w2_transposed: bool = False, activations: str = "bf16") -> torch.Tensor:
    """Float expert weights -> prepared tensor number ``index`` (0 w13, 1 w13_scales, 2 w13_bias,
    3 w2, 4 w2_scales, 5 w2_bias) in ``kernel``'s layout. ``w13`` is [W13] or [W_gate, W_up] (the
    model's own parameters, so the store in ops/weights.py finds them again by identity);
    ``transposed`` / ``w2_transposed``: stored [E, K, N] instead of [E, N, K]. The compiler inserts
    one call per weight it needs, before Inductor's freeze() folds them into constants; the store
    makes the six calls (and every recompile) one quantization, and keeps the folded tensors
    current when the parameters change (ops/weights.py)."""
    prepared = weights.prepare_moe_weights(list(w13), w2, w13_bias, w2_bias, activation=activation,
                                           kernel=kernel, rounding=rounding,
                                           gate_up_interleaved=gate_up_interleaved,
                                           transposed=transposed, w2_transposed=w2_transposed,
                                           activations=activations)
    out = prepared.tensors()[index]
    if out is None:
        raise ValueError(f"prepare_moe_weights: index {index} asks for a bias the model does not have")
    # A custom op may not return its input: the reference layout keeps biases as float32 copies,
    # and quantized tensors are always new, so only an already-float32 bias could alias.
    return out.clone() if any(out is t for t in (w13_bias, w2_bias)) else out


@prepare_moe_weights.register_fake
def _(w13, w13_bias, w2, w2_bias, kernel, activation, rounding="floor", gate_up_interleaved=True,
      transposed=False, index=0, w2_transposed=False, activations="bf16"):
    check_kernel(kernel, "prepare_moe_weights: kernel", allow_auto=False)
    check_activation(activation, "prepare_moe_weights: activation")
    check_rounding(rounding, "prepare_moe_weights: rounding")
    if len(w13) not in (1, 2):
        raise ValueError(f"prepare_moe_weights: w13 is [W13] or [W_gate, W_up], got {len(w13)} tensors")
    s13 = list(w13[0].shape)
    if transposed:
        s13[1], s13[2] = s13[2], s13[1]
    s13[1] *= len(w13)
    s2 = list(w2.shape)
    if w2_transposed:
        s2[1], s2[2] = s2[2], s2[1]
    E, H, I = weights.check_expert_shapes(s13, s2, False)
    hp, ip = dispatch.padded_sizes(kernel, H, I)
    shapes = dispatch.get_kernel(kernel).prepared_shapes(E, hp, ip, activation, w13_bias is not None,
                                                          w2_bias is not None, activations)
    if shapes[index] is None:
        raise ValueError(f"prepare_moe_weights: index {index} asks for a bias the model does not have")
    shape, dtype = shapes[index]
    return w2.new_empty(shape, dtype=dtype)
