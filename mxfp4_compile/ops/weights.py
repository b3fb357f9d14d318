"""Expert weights -> the layout a kernel runs on: canonical order, padding, MXFP4, kernel layout.

Shape legend: E experts, H hidden, I intermediate, Hp/Ip padded per kernel (ops/dispatch.py).
Inputs (float):  w13 [E, 2I, H] (or [E, H, 2I] when ``transposed``), w2 [E, H, I] (or [E, I, H]),
                 w13_bias [E, 2I], w2_bias [E, H].
Canonical MXFP4: see ops/moe_torch.py (gate/up rows ordered per activation, zero padding).

Prepared weights live in a store keyed by the input tensors (by identity, weakly) plus every
option, so the compiler's six transform calls per MoE layer and every recompile (new T, 0/1
specialization) share one quantization and one copy; when an input changes (its version counter
or storage), the entry is re-prepared in place (see "the prepared-weight store" below).
"""
from __future__ import annotations

import dataclasses
import time
import weakref

import torch
import torch.nn.functional as F

from .. import formats, numerics
from ..formats import (BLOCK, Activation, Activations, Kernel, check_activation, check_activations,
                       check_kernel, check_rounding)
from . import dispatch

ROLES = ("w13", "w13_scales", "w13_bias", "w2", "w2_scales", "w2_bias")


@dataclasses.dataclass
class PreparedMoE:
    """MXFP4 expert weights in one kernel's layout; ``moe_kwargs()`` feeds torch.ops.mxfp4.moe."""
    kernel: Kernel            # layout these tensors are in (never "auto")
    activation: Activation    # "swiglu_oai" | "silu_glu"
    hidden_size: int          # H before padding
    intermediate_size: int    # I before padding
    w13: torch.Tensor         # canonical: [E, 2Ip, Hp/2] uint8
    w13_scales: torch.Tensor  # canonical: [E, 2Ip, Hp/32] uint8 (e8m0)
    w13_bias: torch.Tensor | None  # canonical: [E, 2Ip] float32
    w2: torch.Tensor          # canonical: [E, Hp, Ip/2] uint8
    w2_scales: torch.Tensor   # canonical: [E, Hp, Ip/32] uint8
    w2_bias: torch.Tensor | None   # canonical: [E, Hp] float32
    activations: Activations = "bf16"  # the GEMMs' input dtype the layout is for

    def tensors(self):
        return tuple(getattr(self, r) for r in ROLES)

    def moe_kwargs(self):
        kw = dict(zip(ROLES, self.tensors()), kernel=self.kernel, activation=self.activation)
        if self.activations != "bf16":  # (the op's default: graphs of bf16 models stay as they were)
            kw["activations"] = self.activations
        return kw


def _reorder_gate_up(t: torch.Tensor, dim: int, interleaved_in: bool, activation: str):
    """Rows of gate/up along ``dim`` from the input's order to the activation's canonical order."""
    if interleaved_in == formats.gate_up_interleaved(activation):
        return t
    if interleaved_in:  # [g0, u0, g1, u1, ...] -> [g..., u...]
        pairs = t.unflatten(dim, (-1, 2))
        return torch.cat((pairs.select(dim + 1, 0), pairs.select(dim + 1, 1)), dim=dim)
    gate, up = t.chunk(2, dim=dim)  # [g..., u...] -> [g0, u0, ...]
    return torch.stack((gate, up), dim=dim + 1).flatten(dim, dim + 1)


def _pad_gate_up(t: torch.Tensor, dim: int, ip: int, activation: str):
    """Pad the 2I gate/up rows along ``dim`` to 2Ip, keeping gate/up pairing."""
    two_i = t.shape[dim]
    if two_i == 2 * ip:
        return t
    pad_rows = list(t.shape)
    if formats.gate_up_interleaved(activation):
        pad_rows[dim] = 2 * ip - two_i
        return torch.cat((t, t.new_zeros(pad_rows)), dim=dim)
    pad_rows[dim] = ip - two_i // 2
    gate, up = t.chunk(2, dim=dim)
    z = t.new_zeros(pad_rows)
    return torch.cat((gate, z, up, z), dim=dim)


def _own_f32(t: torch.Tensor) -> torch.Tensor:
    """A float32 copy that never aliases the caller's tensor (an in-place change of the model's
    bias must not change prepared weights behind the cache's back, nor the reverse)."""
    return t.detach().to(torch.float32, copy=True)


def _pad_last(t: torch.Tensor, n: int) -> torch.Tensor:
    return F.pad(t, (0, n - t.shape[-1])) if t.shape[-1] != n else t


def _pad_dim1(t: torch.Tensor, n: int) -> torch.Tensor:
    if t.shape[1] == n:
        return t
    shape = list(t.shape)
    shape[1] = n - t.shape[1]
    return torch.cat((t, t.new_zeros(shape)), dim=1)


def _quantize_by_expert(w: torch.Tensor, rounding: str):
    """Quantize expert by expert: bounds the float32 temporaries to one expert's size."""
    parts = [numerics.quantize(w[e], rounding) for e in range(w.shape[0])]
    if not parts:
        n, k = w.shape[1], w.shape[2]
        z = torch.empty(0, n, k // 2, dtype=torch.uint8, device=w.device)
        return z, torch.empty(0, n, k // BLOCK, dtype=torch.uint8, device=w.device)
    return torch.stack([p for p, _ in parts]), torch.stack([s for _, s in parts])


def check_expert_shapes(w13_shape, w2_shape, transposed: bool) -> tuple[int, int, int]:
    """-> (E, H, I) from float expert weight shapes, with errors that name the mismatch."""
    if len(w13_shape) != 3 or len(w2_shape) != 3:
        raise ValueError(f"expert weights must be 3-D [E, N, K]; got w13 {tuple(w13_shape)}, "
                         f"w2 {tuple(w2_shape)}")
    e, n13, k13 = (w13_shape[0], w13_shape[2], w13_shape[1]) if transposed else w13_shape
    e2, n2, k2 = (w2_shape[0], w2_shape[2], w2_shape[1]) if transposed else w2_shape
    if e != e2:
        raise ValueError(f"w13 has {e} experts but w2 has {e2}: both must hold the same experts")
    if n13 % 2:
        raise ValueError(f"w13 must hold 2*I gate/up rows; got {n13} (odd)")
    if n2 != k13 or k2 * 2 != n13:
        raise ValueError(f"w13 [E, 2I={n13}, H={k13}] and w2 [E, H={n2}, I={k2}] disagree "
                         f"(transposed={transposed}): expected w2 [E, {k13}, {n13 // 2}]")
    return e, k13, k2


def quantize_experts(w13, w2, w13_bias=None, w2_bias=None, *, activation, rounding="floor",
                     gate_up_interleaved=None, transposed=False, h_multiple=BLOCK, i_multiple=BLOCK):
    """Float expert weights -> the six canonical MXFP4 tensors (padded)."""
    check_activation(activation)
    check_rounding(rounding)
    E, H, I = check_expert_shapes(w13.shape, w2.shape, transposed)
    for name, t in (("w13", w13), ("w2", w2)):
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a float tensor to quantize, got {t.dtype}; "
                            f"already-MXFP4 weights go through from_mxfp4_blocks()")
    if gate_up_interleaved is None:
        gate_up_interleaved = formats.gate_up_interleaved(activation)
    hp, ip = -(-H // h_multiple) * h_multiple, -(-I // i_multiple) * i_multiple
    if transposed:
        w13, w2 = w13.transpose(1, 2), w2.transpose(1, 2)
    w13 = _reorder_gate_up(w13, 1, gate_up_interleaved, activation)
    w13 = _pad_last(_pad_gate_up(w13, 1, ip, activation), hp)  # [E, 2Ip, Hp]
    w2 = _pad_last(_pad_dim1(w2, hp), ip)  # [E, Hp, Ip]
    q13, s13 = _quantize_by_expert(w13, rounding)
    q2, s2 = _quantize_by_expert(w2, rounding)
    b13 = b2 = None
    if w13_bias is not None:
        if tuple(w13_bias.shape) != (E, 2 * I):
            raise ValueError(f"w13_bias must be [E={E}, 2I={2 * I}], got {tuple(w13_bias.shape)}")
        b13 = _pad_gate_up(_reorder_gate_up(_own_f32(w13_bias), 1, gate_up_interleaved, activation),
                           1, ip, activation).contiguous()
    if w2_bias is not None:
        if tuple(w2_bias.shape) != (E, H):
            raise ValueError(f"w2_bias must be [E={E}, H={H}], got {tuple(w2_bias.shape)}")
        b2 = _pad_last(_own_f32(w2_bias), hp).contiguous()
    return q13, s13, b13, q2, s2, b2


def pad_packed(w13, w13_scales, w13_bias, w2, w2_scales, w2_bias, *, activation, hp, ip):
    """Canonical MXFP4 tensors (unpadded or less padded) -> padded to (hp, ip), bytes untouched."""
    w13 = _pad_last(_pad_gate_up(w13, 1, ip, activation), hp // 2)
    w13_scales = _pad_last(_pad_gate_up(w13_scales, 1, ip, activation), hp // BLOCK)
    if w13_bias is not None:
        w13_bias = _pad_gate_up(_own_f32(w13_bias), 1, ip, activation).contiguous()
    w2 = _pad_last(_pad_dim1(w2, hp), ip // 2)
    w2_scales = _pad_last(_pad_dim1(w2_scales, hp), ip // BLOCK)
    if w2_bias is not None:
        w2_bias = _pad_last(_own_f32(w2_bias), hp).contiguous()
    return (w13.contiguous(), w13_scales.contiguous(), w13_bias,
            w2.contiguous(), w2_scales.contiguous(), w2_bias)


def _unpad_gate_up(t: torch.Tensor, dim: int, i: int, activation: str):
    """Inverse of `_pad_gate_up`: 2Ip gate/up rows along ``dim`` -> the 2I real ones."""
    if t.shape[dim] == 2 * i:
        return t
    if formats.gate_up_interleaved(activation):
        return t.narrow(dim, 0, 2 * i)
    gate, up = t.chunk(2, dim=dim)
    return torch.cat((gate.narrow(dim, 0, i), up.narrow(dim, 0, i)), dim=dim)


def unpad_packed(w13, w13_scales, w13_bias, w2, w2_scales, w2_bias, *, activation, hidden_size,
                 intermediate_size):
    """Inverse of `pad_packed`: canonical padded MXFP4 -> canonical at (H, I), H and I whole
    blocks (what a checkpoint stores)."""
    H, I = hidden_size, intermediate_size
    if H % BLOCK or I % BLOCK:
        raise ValueError(f"unpad_packed: H={H} and I={I} must be multiples of {BLOCK}")
    w13 = _unpad_gate_up(w13, 1, I, activation)[..., :H // 2]
    w13_scales = _unpad_gate_up(w13_scales, 1, I, activation)[..., :H // BLOCK]
    w13_bias = None if w13_bias is None else _unpad_gate_up(w13_bias, 1, I, activation)
    w2, w2_scales = w2[:, :H, :I // 2], w2_scales[:, :H, :I // BLOCK]
    w2_bias = None if w2_bias is None else w2_bias[:, :H]
    return tuple(None if t is None else t.contiguous()
                 for t in (w13, w13_scales, w13_bias, w2, w2_scales, w2_bias))


def from_kernel_layout(prepared: PreparedMoE) -> tuple:
    """Inverse of `to_kernel_layout` and the padding: the six canonical tensors at the model's
    (H, I), byte for byte what `from_mxfp4_blocks` was given (see each kernel's ``unprepare``)."""
    canonical = dispatch.get_kernel(prepared.kernel).unprepare(*prepared.tensors(), prepared.activation,
                                                               prepared.activations)
    return unpad_packed(*canonical, activation=prepared.activation, hidden_size=prepared.hidden_size,
                        intermediate_size=prepared.intermediate_size)


def to_kernel_layout(canonical, *, kernel, activation, hidden_size, intermediate_size,
                     activations="bf16") -> PreparedMoE:
    module = dispatch.get_kernel(kernel)
    out = module.prepare(*canonical, activation, activations)
    return PreparedMoE(kernel, activation, hidden_size, intermediate_size, *out, activations)


# ---- the prepared-weight store ---------------------------------------------------------------------
# One entry per (input tensors by identity, options): a recompile (new T, 0/1 specialization), the
# compiler's six transform calls per layer and every later call share one PreparedMoE. An entry
# remembers a stamp of each input (version counter, storage address, dtype, device, shape, strides);
# a lookup whose stamps differ re-prepares the entry IN PLACE (same tensors, same addresses), so
# every compiled graph that folded these tensors as constants, CUDA graphs included, computes with
# the new weights. Entries die with their inputs (weak references): the store holds at most one
# PreparedMoE per live set of source tensors, however often they change.


@dataclasses.dataclass(eq=False)
class _Entry:
    refs: tuple               # weakref (or None for a missing bias) per input tensor
    stamps: tuple             # _stamp() of each input when the entry was last prepared
    options: dict             # prepare options (activation, kernel, rounding, orientation)
    prepared: PreparedMoE

    def inputs(self):
        return tuple(None if r is None else r() for r in self.refs)

    def alive(self) -> bool:
        """Every input still exists (a dead one means the entry is on its way out)."""
        return all(r is None or r() is not None for r in self.refs)


_cache: dict[tuple, _Entry] = {}
_quantized = 0


def quantization_count() -> int:
    """How many real (uncached) weight preparations ran in this process (refreshes included)."""
    return _quantized


def clear_cache() -> None:
    _cache.clear()


def cache_size() -> int:
    return len(_cache)


def _stamp(t):
    """What a change of ``t`` changes: in-place ops bump ``_version``; ``p.data = new`` and
    ``module.half()`` / ``.to()`` swap the storage (address, dtype, device, shape)."""
    if t is None:
        return None
    return (t._version, t.data_ptr(), t.dtype, t.device, tuple(t.shape), tuple(t.stride()))


def _split_w13(w13) -> tuple:
    parts = tuple(w13) if isinstance(w13, (tuple, list)) else (w13,)
    if len(parts) not in (1, 2) or not all(isinstance(t, torch.Tensor) for t in parts):
        raise TypeError("w13 must be one tensor [E, 2I, H] or a (gate, up) pair of [E, I, H] "
                        f"tensors; got {type(w13).__name__} of length {len(parts)}")
    return parts


class _Progress:
    """A tqdm bar over the MoE layers one compile quantizes (quantizing a gpt-oss-20b-sized layer
    takes about a minute on CPU): the compiler announces how many layers it rewrote, each real
    preparation advances the bar, and the backend reads the count and time for its summary."""

    def __init__(self):
        self.expected, self.done, self.seconds, self.bar = 0, 0, 0.0, None

    def expect(self, n: int) -> None:
        self.expected += n

    def step(self, seconds: float) -> None:
        self.done += 1
        self.seconds += seconds
        if self.bar is None and self.expected:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=self.expected, desc="mxfp4: quantizing MoE layers", unit="layer",
                            leave=False, disable=None)  # disable=None: only on a terminal
            self.bar.update(self.done - 1)
        if self.bar is not None:
            self.bar.update(1)

    def finish(self) -> tuple[int, float]:
        """-> (layers prepared, seconds) since the last finish(); closes the bar."""
        if self.bar is not None:
            self.bar.close()
        out = (self.done, self.seconds)
        self.__init__()
        return out


progress = _Progress()


def _prepare(inputs, options) -> PreparedMoE:
    """inputs = (*w13 parts, w2, w13_bias, w2_bias) as the caller stores them -> PreparedMoE."""
    t0 = time.perf_counter()
    out = _prepare_now(inputs, options)
    progress.step(time.perf_counter() - t0)
    return out


def _prepare_now(inputs, options) -> PreparedMoE:
    global _quantized
    *parts, w2, w13_bias, w2_bias = inputs
    if options["transposed"]:
        parts = [t.transpose(1, 2) for t in parts]
    if options["w2_transposed"]:
        w2 = w2.transpose(1, 2)
    if len(parts) == 2:
        if parts[0].shape != parts[1].shape:
            raise ValueError(f"gate {tuple(parts[0].shape)} and up {tuple(parts[1].shape)} weights "
                             f"must have the same shape [E, I, H]")
        w13 = torch.cat([t.detach() for t in parts], dim=1)  # [gate; up]: one layer, transient
    else:
        w13 = parts[0]
    kernel, activation = options["kernel"], options["activation"]
    E, H, I = check_expert_shapes(w13.shape, w2.shape, False)
    hm, im = dispatch.padding(kernel)
    canonical = quantize_experts(w13, w2, w13_bias, w2_bias, activation=activation,
                                 rounding=options["rounding"],
                                 gate_up_interleaved=options["gate_up_interleaved"],
                                 h_multiple=hm, i_multiple=im)
    _quantized += 1
    return to_kernel_layout(canonical, kernel=kernel, activation=activation, hidden_size=H,
                            intermediate_size=I, activations=options["activations"])


def _refill(entry: _Entry, inputs) -> None:
    """Re-prepare ``entry`` from the current values of ``inputs``: into its own tensors when every
    shape, dtype, device and stride is unchanged (graphs that folded them see the new values),
    else as new tensors (a graph built for the old shapes is recompiled by Dynamo's guards)."""
    new = _prepare(inputs, entry.options)
    old = entry.prepared
    same = all((a is None) == (b is None) and (a is None or (
        a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and a.stride() == b.stride()))
        for a, b in zip(old.tensors(), new.tensors()))
    if same and (old.hidden_size, old.intermediate_size) == (new.hidden_size, new.intermediate_size):
        with torch.inference_mode():  # tensors prepared under inference_mode are inference tensors
            for a, b in zip(old.tensors(), new.tensors()):
                if a is not None:
                    a.copy_(b)
    else:
        entry.prepared = new
    entry.stamps = tuple(_stamp(t) for t in inputs)


def prepare_moe_weights(w13, w2, w13_bias=None, w2_bias=None, *, activation, kernel="reference",
                        rounding="floor", gate_up_interleaved=None, transposed=False,
                        w2_transposed=None, cache=True, activations="bf16") -> PreparedMoE:
    """Float expert weights -> PreparedMoE for ``kernel`` (quantize, pad, kernel layout).

    ``w13`` is one tensor [E, 2I, H] or a (gate, up) pair of [E, I, H] tensors (gpt-fast's w1/w3);
    ``gate_up_interleaved`` says how a single w13 orders gate/up rows (default: the activation's own
    order; a pair is [gate; up] by construction); ``transposed`` means w13 is stored [E, H, N]
    (x @ w) instead of [E, N, H], and ``w2_transposed`` (default: ``transposed``) the same for w2.

    With ``cache`` (the default) the result is the store's entry for these very tensors and
    options: the same object each time, re-prepared in place when an input changed since (in-place
    ops, ``p.data = ...``, ``.to()``). Writes that bypass the version counter (in place through
    ``.data``, numpy or DLPack) are not seen: call ``refresh_weights`` after them.
    ``activations="fp8"``: the layout for the op's FP8 activations (kernels "triton", "reference")."""
    check_activation(activation)
    check_activations(activations)
    check_kernel(kernel, allow_auto=False)
    check_rounding(rounding)
    parts = _split_w13(w13)
    if gate_up_interleaved is None:  # resolve before keying: None and its meaning share one entry
        gate_up_interleaved = formats.gate_up_interleaved(activation) if len(parts) == 1 else False
    if len(parts) == 2 and gate_up_interleaved:
        raise ValueError("gate_up_interleaved=True with separate gate and up weights: a (gate, up) "
                         "pair is concatenated [gate; up]; pass gate_up_interleaved=False or None")
    options = dict(activation=activation, kernel=kernel, rounding=rounding,
                   gate_up_interleaved=gate_up_interleaved, transposed=bool(transposed),
                   w2_transposed=bool(transposed if w2_transposed is None else w2_transposed),
                   activations=activations)
    inputs = (*parts, w2, w13_bias, w2_bias)
    if not cache:
        return _prepare(inputs, options)
    key = (tuple(None if t is None else id(t) for t in inputs), tuple(sorted(options.items())))
    entry = _cache.get(key)
    if entry is not None and all((r is None and t is None) or (r is not None and r() is t)
                                 for r, t in zip(entry.refs, inputs)):
        refresh(entry)
        return entry.prepared
    prepared = _prepare(inputs, options)
    refs = tuple(None if t is None else weakref.ref(t, lambda _r, k=key: _cache.pop(k, None))
                 for t in inputs)
    _cache[key] = _Entry(refs, tuple(_stamp(t) for t in inputs), options, prepared)
    return prepared


def entries_reading(tensors) -> list:
    """The store's live entries that read any of ``tensors`` (by identity)."""
    ids = {id(t) for t in tensors}
    out = []
    for e in list(_cache.values()):
        if e.alive() and any(t is not None and id(t) in ids for t in e.inputs()):
            out.append(e)
    return out


def refresh(entry: _Entry, force: bool = False) -> bool:
    """Re-prepare ``entry`` in place if an input changed since (or always, with ``force``).
    -> whether it re-prepared."""
    inputs = entry.inputs()  # strong references first: alive() cannot change after this
    if not entry.alive():
        return False
    if force or entry.stamps != tuple(_stamp(t) for t in inputs):
        _refill(entry, inputs)
        return True
    return False


def rebase(tensors) -> None:
    """Accept the current state of ``tensors`` as what their entries were prepared from, without
    re-preparing: for the package's own storage swaps (``release_bf16_weights``), which change the
    address but not the weights the prepared tensors hold."""
    for e in entries_reading(tensors):
        e.stamps = tuple(_stamp(t) for t in e.inputs())


def refresh_weights(*sources) -> int:
    """Re-prepare every stored expert weight read from ``sources`` (tensors or modules; none: all),
    in place. For writes PyTorch does not count: ``p.data.copy_(...)``, ``p.data[...] = ...``,
    numpy or DLPack views. -> how many MoE layers were re-prepared."""
    tensors = []
    for s in sources:
        if isinstance(s, torch.nn.Module):
            tensors += list(s.parameters()) + list(s.buffers())
        elif isinstance(s, torch.Tensor):
            tensors.append(s)
        else:
            raise TypeError(f"refresh_weights takes tensors or modules, got {type(s).__name__}")
    entries = entries_reading(tensors) if sources else list(_cache.values())
    return sum(refresh(e, force=True) for e in entries)


def from_mxfp4_blocks(w13_blocks, w13_scales, w13_bias, w2_blocks, w2_scales, w2_bias, *,
                      kernel="reference", activation="swiglu_oai") -> PreparedMoE:
    """gpt-oss style checkpoint tensors -> PreparedMoE, without requantizing.

    ``*_blocks`` [E, N, K/32, 16] uint8 (or already [E, N, K/2]), ``*_scales`` [E, N, K/32] uint8,
    biases [E, N]. w13 rows in the activation's canonical order (gpt-oss: interleaved)."""
    check_activation(activation)
    check_kernel(kernel, allow_auto=False)
    flat = []
    for name, b, s in (("w13", w13_blocks, w13_scales), ("w2", w2_blocks, w2_scales)):
        b, s = numerics._as_uint8(b, f"{name}_blocks"), numerics._as_uint8(s, f"{name}_scales")
        if b.dim() == 4:
            if b.shape[-1] != BLOCK // 2:
                raise ValueError(f"{name}_blocks [E, N, K/{BLOCK}, {BLOCK // 2}] expected, got "
                                 f"{tuple(b.shape)}")
            b = b.flatten(-2)
        if b.dim() != 3 or s.dim() != 3 or s.shape[:2] != b.shape[:2] or s.shape[2] * (BLOCK // 2) != b.shape[2]:
            raise ValueError(f"{name}: blocks {tuple(b.shape)} and scales {tuple(s.shape)} do not "
                             f"describe one [E, N, K] MXFP4 tensor ([E, N, K/2] and [E, N, K/32])")
        if 0 in b.shape[1:]:
            raise ValueError(f"{name}: blocks {tuple(b.shape)} have an empty N or K dim; an expert "
                             f"weight needs N >= 1 rows of K >= {BLOCK} elements")
        flat += [b, s]
    E, two_i, h_half = flat[0].shape
    if two_i % 2:
        raise ValueError(f"w13 blocks {tuple(flat[0].shape)} have {two_i} rows; w13 holds 2*I "
                         f"gate/up rows, an even number")
    H, I = h_half * 2, two_i // 2
    if I % BLOCK:
        raise ValueError(f"w13 blocks {tuple(flat[0].shape)} imply I={I}, but w2 [E, H, I/2] packs I "
                         f"in MXFP4 blocks of {BLOCK}: I must be a multiple of {BLOCK}")
    if tuple(flat[2].shape) != (E, H, I // 2):
        raise ValueError(f"w2 blocks must be [E={E}, H={H}, I/2={I // 2}] to match w13 "
                         f"{tuple(flat[0].shape)} ([E, 2I, H/2]), got {tuple(flat[2].shape)}")
    for name, bias, shape in (("w13_bias", w13_bias, (E, 2 * I)), ("w2_bias", w2_bias, (E, H))):
        if bias is None:
            continue
        if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
            raise TypeError(f"{name} must be a float tensor {shape}, got "
                            f"{getattr(bias, 'dtype', type(bias).__name__)}")
        if tuple(bias.shape) != shape:
            raise ValueError(f"{name} must be [E={E}, {'2I' if name == 'w13_bias' else 'H'}="
                             f"{shape[1]}] to match the blocks, got {tuple(bias.shape)}; it would "
                             f"otherwise be cropped or zero-padded silently")
    hp, ip = dispatch.padded_sizes(kernel, H, I)
    canonical = pad_packed(flat[0], flat[1], w13_bias, flat[2], flat[3], w2_bias,
                           activation=activation, hp=hp, ip=ip)
    return to_kernel_layout(canonical, kernel=kernel, activation=activation, hidden_size=H,
                            intermediate_size=I)
