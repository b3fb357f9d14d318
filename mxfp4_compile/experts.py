"""MXFP4 experts modules for transformers models: what ``from_pretrained`` loads checkpoints into
and what ``quantize_`` turns bf16 experts into (checkpoints.py).

A transformers experts module (a class its ``use_experts_implementation`` decorates: gpt-oss,
Mixtral, Qwen3-MoE, ...) computes ``experts(hidden [T, H], top_k_index [T, k], top_k_weights
[T, k]) -> [T, H]``. ``Mxfp4Experts`` computes the same with one ``torch.ops.mxfp4.moe`` call, so
the model runs eagerly, under any torch.compile backend, and under ``backend="mxfp4"``, which
finds the op already there and only fuses its router.

Shape legend: E experts, H hidden, I intermediate, N = 2I (w13) or H (w2), K = H (w13) or I (w2).
In memory: six buffers in one kernel's layout (``kernel``; ops/kernels/), not persistent.
In ``state_dict()`` and checkpoints: the canonical layout at the model's own (H, I), under the
names ``{w13}_blocks`` [E, 2I, H/32, 16] uint8, ``{w13}_scales`` [E, 2I, H/32] uint8 (e8m0),
``{w13}_bias`` [E, 2I], and the same for ``{w2}`` ([E, H, I/32, 16], [E, H, I/32], [E, H]), with
gate/up rows in the activation's order (formats.ACTIVATIONS). For swiglu_oai experts that is
gpt-oss's checkpoint format, names included (gate_up_proj, down_proj); other families use gate_up/down
(transformers renames keys holding its own names when it saves some families).
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from . import formats
from .formats import BLOCK, SWIGLU_ALPHA, SWIGLU_LIMIT
from .ops import dispatch, weights
from .ops.moe_torch import silu_glu, swiglu_oai

ROLES = weights.ROLES  # w13, w13_scales, w13_bias, w2, w2_scales, w2_bias
GPT_OSS_NAMES = ("gate_up_proj", "down_proj")
OTHER_NAMES = ("gate_up", "down")  # not the kernel buffers' names (w13, w13_scales, ...)


@dataclasses.dataclass(frozen=True)
class ExpertsSpec:
    """What an experts module computes, independent of how its weights are stored."""
    num_experts: int
    hidden_size: int
    intermediate_size: int
    activation: str                 # formats.Activation
    has_bias: bool
    alpha: float = SWIGLU_ALPHA     # swiglu_oai only
    limit: float = SWIGLU_LIMIT

    @property
    def names(self) -> tuple[str, str]:
        """Checkpoint names of w13 and w2 (module docstring)."""
        return GPT_OSS_NAMES if self.activation == "swiglu_oai" else OTHER_NAMES

    def checkpoint_tensors(self, bias_dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Checkpoint name -> (shape, dtype), in the order ``ROLES`` lists them."""
        E, H, I = self.num_experts, self.hidden_size, self.intermediate_size
        w13, w2 = self.names
        u8 = torch.uint8
        out = {f"{w13}_blocks": ((E, 2 * I, H // BLOCK, BLOCK // 2), u8),
               f"{w13}_scales": ((E, 2 * I, H // BLOCK), u8)}
        if self.has_bias:
            out[f"{w13}_bias"] = ((E, 2 * I), bias_dtype)
        out[f"{w2}_blocks"] = ((E, H, I // BLOCK, BLOCK // 2), u8)
        out[f"{w2}_scales"] = ((E, H, I // BLOCK), u8)
        if self.has_bias:
            out[f"{w2}_bias"] = ((E, H), bias_dtype)
        return out

    def role_names(self) -> list[str | None]:
        """Checkpoint name of each of ``ROLES`` (None for an absent bias)."""
        w13, w2 = self.names
        out = [f"{w13}_blocks", f"{w13}_scales", f"{w13}_bias", f"{w2}_blocks", f"{w2}_scales", f"{w2}_bias"]
        if not self.has_bias:
            out[2] = out[5] = None
        return out

    def record(self) -> dict:
        """The fields a checkpoint's config records (checkpoints.py)."""
        return dataclasses.asdict(self)


# ---- transformers experts modules ------------------------------------------------------------------
def is_hf_experts(module: nn.Module) -> bool:
    """A module transformers' ``use_experts_implementation`` decorated (it sets these flags)."""
    return (hasattr(module, "is_transposed") and hasattr(module, "is_concatenated")
            and isinstance(getattr(module, "gate_up_proj", None), torch.Tensor)
            and isinstance(getattr(module, "down_proj", None), torch.Tensor))


def hf_experts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if is_hf_experts(m)]


def _activation_of(module: nn.Module) -> tuple[str, float, float]:
    """Which activation the module's ``_apply_gate`` computes, found by running it on a probe
    (the class's own code, whatever its family): -> (activation, alpha, limit)."""
    cls = type(module).__name__
    apply_gate = getattr(module, "_apply_gate", None)
    if apply_gate is None:
        raise ValueError(f"{cls} has no _apply_gate: not an experts module mxfp4_compile can convert")
    g = torch.Generator().manual_seed(0)
    probe = torch.randn(8, 2 * 48, generator=g, dtype=torch.float32, device="cpu") * 6  # reaches the clamp;
    # explicit device: the module may be built under torch.device("meta")
    with torch.no_grad():
        try:
            got = apply_gate(probe)
        except Exception as e:
            raise ValueError(f"{cls}._apply_gate failed on a float32 probe ({e!r}); cannot tell which "
                             f"activation these experts compute") from e
    concatenated = bool(module.is_concatenated)
    interleaved = probe if not concatenated else weights._reorder_gate_up(probe, 1, False, "swiglu_oai")
    alpha = float(getattr(module, "alpha", SWIGLU_ALPHA))
    limit = float(getattr(module, "limit", SWIGLU_LIMIT))
    as_concat = probe if concatenated else weights._reorder_gate_up(probe, 1, True, "silu_glu")
    for name, want, a, lim in (("swiglu_oai", swiglu_oai(interleaved, alpha, limit), alpha, limit),
                               ("silu_glu", silu_glu(as_concat), SWIGLU_ALPHA, SWIGLU_LIMIT)):
        if got.shape == want.shape and torch.allclose(got.float(), want, rtol=1e-5, atol=1e-5):
            return name, a, lim
    raise ValueError(f"{cls} computes an activation mxfp4_compile does not know (neither "
                     f"silu(gate) * up nor gpt-oss's clamped swiglu, for its "
                     f"{'concatenated' if concatenated else 'interleaved'} gate/up rows)")


def spec_of(module: nn.Module) -> ExpertsSpec:
    """The ``ExpertsSpec`` of a transformers experts module (real or on the meta device)."""
    cls = type(module).__name__
    if not is_hf_experts(module):
        raise TypeError(f"{cls} is not a transformers experts module (no gate_up_proj/down_proj with "
                        f"use_experts_implementation's flags)")
    if getattr(module, "has_gate", True) is False or getattr(module, "has_post_expert_norm", False):
        raise ValueError(f"{cls}: experts without a gate or with a norm after each expert are not "
                         f"supported")
    w13, w2 = module.gate_up_proj, module.down_proj
    if w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"{cls}: gate_up_proj {tuple(w13.shape)} and down_proj {tuple(w2.shape)} "
                         f"must be [E, N, K] (or [E, K, N])")
    transposed = bool(module.is_transposed)
    E, H, I = weights.check_expert_shapes(w13.shape, w2.shape, transposed)
    if H % BLOCK or I % BLOCK:
        raise ValueError(f"{cls}: hidden size {H} and intermediate size {I} must be multiples of "
                         f"{BLOCK} (the MXFP4 block) to be stored as MXFP4 blocks")
    has_bias = isinstance(getattr(module, "gate_up_proj_bias", None), torch.Tensor)
    if has_bias != isinstance(getattr(module, "down_proj_bias", None), torch.Tensor):
        raise ValueError(f"{cls}: gate_up_proj_bias and down_proj_bias must both exist or both not")
    activation, alpha, limit = _activation_of(module)
    return ExpertsSpec(E, H, I, activation, has_bias, alpha, limit)


# ---- the module ------------------------------------------------------------------------------------
class Mxfp4Experts(nn.Module):
    """MXFP4 experts with a transformers experts module's forward (module docstring).

    Built empty, in the checkpoint layout (persistent buffers a loader fills, e.g. transformers'
    from_pretrained on the meta device), then ``adopt()`` turns them into the kernel layout; or
    built from prepared weights with ``from_prepared``. ``kernel_request`` is what the user asked
    for: with "auto", moving the module to a device where its kernel cannot run re-lays the
    weights out for the kernel that device picks."""

    def __init__(self, spec: ExpertsSpec, kernel: str = "auto", bias_dtype: torch.dtype | None = None):
        super().__init__()
        self.spec = spec
        self.kernel_request = formats.check_kernel(kernel)
        self.kernel: str | None = None  # the layout the buffers are in, once adopted
        self.bias_dtype = bias_dtype or torch.get_default_dtype()
        for name, (shape, dtype) in spec.checkpoint_tensors(self.bias_dtype).items():
            self.register_buffer(name, torch.empty(shape, dtype=dtype))
        self._is_hf_initialized = True  # transformers: loaded, not initialised
        self.register_state_dict_post_hook(_state_dict_hook)
        self.register_load_state_dict_pre_hook(_load_pre_hook)

    @classmethod
    def from_prepared(cls, spec: ExpertsSpec, prepared: weights.PreparedMoE, kernel_request: str,
                      bias_dtype: torch.dtype) -> Mxfp4Experts:
        with torch.device("meta"):
            m = cls(spec, kernel_request, bias_dtype)
        for name in spec.checkpoint_tensors(bias_dtype):
            del m._buffers[name]
        m._set_prepared(prepared)
        return m

    def extra_repr(self) -> str:
        s = self.spec
        return (f"experts={s.num_experts}, hidden={s.hidden_size}, intermediate={s.intermediate_size}, "
                f"activation={s.activation}, bias={s.has_bias}, kernel={self.kernel or 'not loaded'}")

    # -- layouts
    def checkpoint_state(self, device=None) -> dict[str, torch.Tensor]:
        """Checkpoint name -> tensor in the checkpoint layout (the kernel layout inverted), on
        ``device`` (default: the weights' device)."""
        if self.kernel is None:
            return {n: self._buffers[n] for n in self.spec.checkpoint_tensors(self.bias_dtype)}
        canon = weights.from_kernel_layout(self._prepared())
        out = {}
        for name, t in zip(self.spec.role_names(), canon):
            if name is None:
                continue
            t = t.to(device) if device is not None else t
            if name.endswith("_blocks"):
                t = t.unflatten(-1, (-1, BLOCK // 2))
            elif name.endswith("_bias"):
                t = t.to(self.bias_dtype)
            out[name] = t
        return out

    def adopt(self, kernel: str | None = None) -> None:
        """Checkpoint-layout buffers (filled by a loader) -> the kernel layout, on their device.
        A buffer still on the meta device was never loaded: an error naming it."""
        names = list(self.spec.checkpoint_tensors(self.bias_dtype))
        empty = [n for n in names if self._buffers[n].is_meta]
        if empty:
            raise ValueError(f"MXFP4 experts: {', '.join(empty)} were never loaded (not in the checkpoint?)")
        t = {n: self._buffers[n] for n in names}
        bias = self.spec.role_names()[2]
        if bias is not None:
            self.bias_dtype = t[bias].dtype  # as loaded (the loader's dtype): what saving writes
        self._set_prepared(self._prepare_from(t, kernel or self.kernel_request))
        for n in names:
            del self._buffers[n]

    def _prepare_from(self, t: dict, kernel: str) -> weights.PreparedMoE:
        s = self.spec
        w13, w2 = s.names
        if kernel == "auto":  # a named kernel is laid out even where it cannot run (e.g. on the
            kernel, _ = dispatch.choose_kernel(t[f"{w13}_blocks"].device)  # CPU before .cuda())
        return weights.from_mxfp4_blocks(
            t[f"{w13}_blocks"], t[f"{w13}_scales"], t.get(f"{w13}_bias"),
            t[f"{w2}_blocks"], t[f"{w2}_scales"], t.get(f"{w2}_bias"),
            kernel=kernel, activation=s.activation)

    def _set_prepared(self, p: weights.PreparedMoE) -> None:
        for role, tensor in zip(ROLES, p.tensors()):
            self.register_buffer(role, tensor, persistent=False)
        self.kernel = p.kernel

    def _prepared(self) -> weights.PreparedMoE:
        s = self.spec
        return weights.PreparedMoE(self.kernel, s.activation, s.hidden_size, s.intermediate_size,
                                   *(self._buffers[r] for r in ROLES))

    def set_kernel(self, kernel: str) -> None:
        """Re-lay the weights out for ``kernel`` ("auto": what their device picks). New tensors:
        compile after this, not before."""
        self._set_prepared(self._prepare_from(self.checkpoint_state(), kernel))
        self.kernel_request = formats.check_kernel(kernel)

    def _apply(self, fn, recurse=True):
        """``.to()``, ``.cuda()``, ``.half()``...: the weights follow the device but keep their
        dtypes (uint8 codes, float32 biases: the kernels' layout); with ``kernel_request="auto"``
        a device the current kernel cannot run on gets the layout its own "auto" picks."""
        if self.kernel is None:
            return super()._apply(fn, recurse)
        biases = {r: self._buffers.pop(r) for r in ("w13_bias", "w2_bias")}
        super()._apply(fn, recurse)
        device = self._buffers["w13"].device
        for r, b in biases.items():
            self._buffers[r] = None if b is None else b.to(device)
        if self.kernel_request == "auto" and dispatch.unavailable_reason(self.kernel, device):
            self.set_kernel("auto")
        return self

    # -- compute
    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        if self.kernel is None:
            raise RuntimeError("MXFP4 experts hold no weights yet (built for a loader, never adopted)")
        s = self.spec
        return torch.ops.mxfp4.moe(hidden_states, top_k_index, top_k_weights,
                                   *(self._buffers[r] for r in ROLES), self.kernel, s.activation,
                                   s.alpha, s.limit)


def _state_dict_hook(module: Mxfp4Experts, state_dict, prefix, local_metadata) -> None:
    """state_dict() holds the checkpoint layout (module docstring), on the CPU when the weights
    are elsewhere: converting every layer on the GPU would need a second copy of the experts."""
    if module.kernel is None:
        return
    device = torch.device("cpu") if module._buffers["w13"].device.type != "cpu" else None
    for name, t in module.checkpoint_state(device).items():
        state_dict[prefix + name] = t


def _load_pre_hook(module: Mxfp4Experts, state_dict, prefix, local_metadata, strict, missing_keys,
                   unexpected_keys, error_msgs) -> None:
    """load_state_dict() takes the checkpoint layout: converted to the module's kernel layout and
    copied in place (compiled graphs and CUDA graphs that read the buffers see the new values)."""
    if module.kernel is None:
        return  # the checkpoint-layout buffers load as plain buffers
    expect = module.spec.checkpoint_tensors(module.bias_dtype)
    got = {n: state_dict.pop(prefix + n) for n in expect if prefix + n in state_dict}
    missing = [prefix + n for n in expect if n not in got]
    if missing:
        missing_keys.extend(missing)
        return
    for n, (shape, dtype) in expect.items():
        if tuple(got[n].shape) != shape or (dtype == torch.uint8) != (got[n].dtype == torch.uint8):
            error_msgs.append(f"{prefix}{n}: expected {dtype} {shape}, got {got[n].dtype} "
                              f"{tuple(got[n].shape)}")
            return
    device = module._buffers["w13"].device
    new = module._prepare_from({n: t.to(device) for n, t in got.items()}, module.kernel)
    with torch.no_grad():
        for role, t in zip(ROLES, new.tensors()):
            if t is not None:
                module._buffers[role].copy_(t)
