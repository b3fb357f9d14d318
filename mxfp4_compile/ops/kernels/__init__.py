"""One module per fused-MoE kernel, each satisfying ``MoEKernel`` with module-level names;
``ops/dispatch.py`` maps kernel names to modules (``get_kernel``) and picks one per device.

The canonical weight layout every ``prepare`` starts from, and the math every ``moe`` computes, is
``ops/moe_torch.py``'s. Also here: the checks several kernel modules share.
"""
from __future__ import annotations

import inspect
from types import ModuleType
from typing import Protocol

import torch

from ...formats import BLOCK

# (shape, dtype) of a prepared tensor, or None for an absent bias
PreparedShape = tuple[tuple[int, ...], torch.dtype] | None


class MoEKernel(Protocol):
    """What a kernel module provides (as module-level names; modules satisfy a Protocol too).

    NAME        the kernel name users pass (``kernel="..."``)
    H_MULTIPLE  Hp, the padded hidden size, is a multiple of this (a multiple of the MXFP4 block)
    I_MULTIPLE  Ip, the padded intermediate size, likewise
    """

    NAME: str
    H_MULTIPLE: int
    I_MULTIPLE: int

    def unavailable_reason(self, device: torch.device) -> str | None:
        """None when the kernel can run on ``device``, else why not (what to install or set)."""

    def prepared_shapes(self, E: int, Hp: int, Ip: int, activation: str, has_w13_bias: bool,
                        has_w2_bias: bool, activations: str = "bf16") -> list[PreparedShape]:
        """(shape, dtype) of each of the six tensors ``prepare`` returns, without computing them
        (the compiler's fake kernels). ``activations``: the GEMMs' input dtype the layout is for
        (formats.Activations); a kernel without that mode raises a ValueError saying which have it."""

    def prepare(self, w13: torch.Tensor, w13_scales: torch.Tensor, w13_bias: torch.Tensor | None,
                w2: torch.Tensor, w2_scales: torch.Tensor, w2_bias: torch.Tensor | None,
                activation: str, activations: str = "bf16") -> tuple:
        """Canonical padded MXFP4 weights -> the six tensors ``moe`` reads (once per model)."""

    def unprepare(self, w13: torch.Tensor, w13_scales: torch.Tensor, w13_bias: torch.Tensor | None,
                  w2: torch.Tensor, w2_scales: torch.Tensor, w2_bias: torch.Tensor | None,
                  activation: str, activations: str = "bf16") -> tuple:
        """The inverse of ``prepare``: this layout's six tensors -> canonical padded MXFP4 (what
        checkpoints store and other kernels start from), byte for byte; a kernel that cannot
        invert its layout raises a ValueError saying so."""

    def moe(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
            w13: torch.Tensor, w13_scales: torch.Tensor, w13_bias: torch.Tensor | None,
            w2: torch.Tensor, w2_scales: torch.Tensor, w2_bias: torch.Tensor | None,
            activation: str, alpha: float, limit: float, expert_map: torch.Tensor | None,
            combine: bool, activations: str = "bf16") -> torch.Tensor:
        """The fused MoE forward on prepared weights: [T, H], or [T, k, H] when not ``combine``;
        ``activations="fp8"``: each GEMM's input rows quantized to e4m3 (moe_torch's math)."""


_ATTRIBUTES = {"NAME": str, "H_MULTIPLE": int, "I_MULTIPLE": int}
_FUNCTIONS = ("unavailable_reason", "prepared_shapes", "prepare", "unprepare", "moe")


def protocol_mismatches(module: ModuleType) -> list[str]:
    """What keeps ``module`` from satisfying ``MoEKernel``: missing or mistyped names, and
    functions whose parameter names differ from the protocol's (empty when it conforms)."""
    problems = []
    for name, typ in _ATTRIBUTES.items():
        if not isinstance(getattr(module, name, None), typ):
            problems.append(f"{name} must be a module-level {typ.__name__}")
    for name in _FUNCTIONS:
        fn = getattr(module, name, None)
        if not callable(fn):
            problems.append(f"{name} must be a module-level function")
            continue
        want = list(inspect.signature(getattr(MoEKernel, name)).parameters)[1:]  # without self
        got = list(inspect.signature(fn).parameters)
        if got != want:
            problems.append(f"{name}{tuple(got)} must take {tuple(want)}")
    return problems


# ---- checks several kernel modules share -------------------------------------------------------------
def check_padded(kernel: str, Hp: int, Ip: int, h_multiple: int, i_multiple: int,
                 why: str = "") -> None:
    """ValueError unless Hp and Ip are multiples of the kernel's padding."""
    if Hp % h_multiple or Ip % i_multiple:
        raise ValueError(f"kernel {kernel!r} needs Hp % {h_multiple} == 0 and Ip % {i_multiple} == 0"
                         f"{f' ({why})' if why else ''}; got Hp={Hp}, Ip={Ip}: pad the canonical "
                         f"weights to mxfp4_compile.ops.dispatch.padded_sizes({kernel!r}, H, I)")


def canonical_shapes(E: int, Hp: int, Ip: int, has_w13_bias: bool, has_w2_bias: bool
                     ) -> list[PreparedShape]:
    """The canonical (shape, dtype) of the six tensors (ops/moe_torch.py), for layouts that keep
    them (flashinfer's shuffles permute rows and bytes in place)."""
    u8, f32 = torch.uint8, torch.float32
    return [((E, 2 * Ip, Hp // 2), u8), ((E, 2 * Ip, Hp // BLOCK), u8),
            ((E, 2 * Ip), f32) if has_w13_bias else None,
            ((E, Hp, Ip // 2), u8), ((E, Hp, Ip // BLOCK), u8),
            ((E, Hp), f32) if has_w2_bias else None]


def check_canonical_shapes(w13: torch.Tensor, w13_scales: torch.Tensor, w2: torch.Tensor,
                           w2_scales: torch.Tensor) -> tuple[int, int, int]:
    """-> (E, Hp, Ip) from w13 [E, 2Ip, Hp/2]; ValueError naming the tensor whose canonical shape
    does not match w13's."""
    E, two_ip, hp_half = w13.shape
    Hp, Ip = hp_half * 2, two_ip // 2
    want = canonical_shapes(E, Hp, Ip, False, False)
    expect = {"w13_scales": (w13_scales, want[1][0]), "w2": (w2, want[3][0]),
              "w2_scales": (w2_scales, want[4][0])}
    for name, (t, shape) in expect.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must be {shape} to match w13 {tuple(w13.shape)}; "
                             f"got {tuple(t.shape)}")
    return E, Hp, Ip


def gpu_unavailable(device: torch.device, kernel: str, major: int, arch: str, why: str) -> str | None:
    """Why ``kernel``, which runs only on CUDA GPUs of compute capability ``major``.x (``arch``,
    e.g. "sm90 (Hopper)"; ``why``: what ties it to them), cannot run on ``device``; None when
    it can."""
    if device.type != "cuda":
        return f"kernel {kernel!r} needs a CUDA {arch} GPU; the device is {device.type}"
    if not torch.cuda.is_available():
        return f"kernel {kernel!r} needs a CUDA {arch} GPU, but CUDA is not available in this process"
    got, minor = torch.cuda.get_device_capability(device)
    if got != major:
        return f"kernel {kernel!r} needs an {arch} GPU ({why}); this GPU is sm{got}{minor}"
    return None


# ---- the op wrapper's checks of prepared weights (every kernel, shapes and dtypes only) ---------------
PREPARED_ROLES = ("w13", "w13_scales", "w13_bias", "w2", "w2_scales", "w2_bias")


def fp8_unsupported(kernel: str, activations: str) -> None:
    """ValueError for ``activations="fp8"`` on a kernel that has no FP8-activation path."""
    if activations == "fp8":
        raise ValueError(f"kernel {kernel!r} has no FP8-activation path (activations='fp8'); use "
                         f"kernel='triton' (sm90) or 'reference' (its plain-torch emulation), or "
                         f"activations='bf16'")


def _affine_probe(module: ModuleType, E: int, activation: str, has_b13: bool, has_b2: bool,
                  activations: str = "bf16"):
    """Each dim of the prepared w13 and w2 as a + bh*(Hp/H_MULTIPLE) + bi*(Ip/I_MULTIPLE): the
    coefficients, read off ``prepared_shapes`` at three padded sizes (the value tensors' shapes
    are linear in the padded sizes for every layout, e.g. triton's Ip/8 row tiles; the scales'
    need not be, so they are only compared, never solved for)."""
    h0, i0 = module.H_MULTIPLE, module.I_MULTIPLE
    pts = [module.prepared_shapes(E, h, i, activation, has_b13, has_b2, activations)
           for h, i in ((h0, i0), (2 * h0, i0), (h0, 2 * i0))]
    coeffs = []
    for role in (0, 3):
        base, dh, di = (p[role][0] for p in pts)
        for d in range(len(base)):
            bh, bi = dh[d] - base[d], di[d] - base[d]
            coeffs.append((role, d, base[d] - bh - bi, bh, bi, len(base)))
    return coeffs


def _solve_sizes(module: ModuleType, E: int, tensors, activation: str,
                 activations: str = "bf16") -> tuple[int, int] | None:
    """(Hp, Ip) that the prepared w13 and w2 shapes imply for ``module``'s layout, None when no
    (Hp, Ip) fits (e.g. weights of another kernel's layout: every layout's shapes differ)."""
    has_b13, has_b2 = tensors[2] is not None, tensors[5] is not None
    hp = ip = None
    for role, d, a, bh, bi, rank in _affine_probe(module, E, activation, has_b13, has_b2,
                                                  activations):
        shape = tensors[role].shape
        if len(shape) != rank:
            return None
        if bh and not bi:
            hp = (shape[d] - a) // bh * module.H_MULTIPLE if (shape[d] - a) % bh == 0 else -1
        elif bi and not bh:
            ip = (shape[d] - a) // bi * module.I_MULTIPLE if (shape[d] - a) % bi == 0 else -1
    if hp is None or ip is None or hp <= 0 or ip <= 0:
        return None
    return hp, ip


def _fmt(spec: PreparedShape) -> str:
    return "None" if spec is None else f"{spec[1]} {tuple(spec[0])}"


def check_prepared(module: ModuleType, hidden_size, tensors, activation: str,
                   where: str = "moe", activations: str = "bf16") -> tuple[int, int, int]:
    """-> (E, Hp, Ip) of the six prepared tensors ``tensors`` (w13, w13_scales, w13_bias, w2,
    w2_scales, w2_bias; biases may be None) after checking, from their shapes and dtypes alone (no
    data read, so the fake kernels run it too), that they are exactly what ``module.prepare``
    makes for ``activation``: one expert count E on every tensor, padded sizes (Hp, Ip) that
    w13 and w2 agree on, the kernel's padding, and ``hidden_size`` <= Hp. ValueError naming the
    tensor, its shape and dtype, the expected ones and the fix.

    Every kernel's prepared shapes differ from every other kernel's at every size (the reference
    layout holds w13 as gate/up pairs [E, Ip, 2, Hp/2], triton's as its 16-row tiles, 5-D;
    flashinfer keeps the canonical 3-D shapes; triton_kernels' are its own), so weights prepared
    for another kernel are an error here. The activation is not part of any prepared layout:
    ``prepare`` puts w13's gate and up rows in the kernel's own pair order for either activation,
    and the op's ``activation`` only picks the function applied to each pair. ``activations``
    (the GEMMs' input dtype) can have layouts of its own (triton's FP8 layout holds int32 words):
    weights prepared for the other one are an error here too."""
    kernel = module.NAME
    act_arg = "" if activations == "bf16" else f", activations={activations!r}"
    fix = (f"prepare the weights with mxfp4_compile.prepare_moe_weights(..., kernel={kernel!r}, "
           f"activation={activation!r}{act_arg}) (or from_mxfp4_blocks) and pass the same kernel, "
           f"activation and activations")
    for role, t in zip(PREPARED_ROLES, tensors):
        if t is None:
            if role in ("w13_bias", "w2_bias"):
                continue
            raise ValueError(f"{where}: {role} is None; only the biases may be absent")
        if t.dim() < 2:
            raise ValueError(f"{where}: {role} must have a leading expert dim [E, ...], got "
                             f"{t.dtype} {tuple(t.shape)}; {fix}")
    E = tensors[0].shape[0]
    for role, t in zip(PREPARED_ROLES, tensors):
        if t is not None and t.shape[0] != E:
            raise ValueError(f"{where}: {role} {tuple(t.shape)} holds {t.shape[0]} experts (dim 0) but "
                             f"w13 {tuple(tensors[0].shape)} holds {E}: every weight, scale and bias "
                             f"must hold the same experts (a short one would be read past its end)")
    sizes = _solve_sizes(module, E, tensors, activation, activations)
    if sizes is None:
        want = module.prepared_shapes(E, module.H_MULTIPLE, module.I_MULTIPLE, activation,
                                      tensors[2] is not None, tensors[5] is not None, activations)
        raise ValueError(f"{where}: w13 {tuple(tensors[0].shape)} and w2 {tuple(tensors[3].shape)} fit no "
                         f"padded sizes (Hp, Ip) of kernel {kernel!r}'s layout (e.g. at Hp={module.H_MULTIPLE}, "
                         f"Ip={module.I_MULTIPLE}: w13 {_fmt(want[0])}, w2 {_fmt(want[3])}); weights "
                         f"prepared for another kernel? {fix}")
    Hp, Ip = sizes
    check_padded(kernel, Hp, Ip, module.H_MULTIPLE, module.I_MULTIPLE,
                 f"w13 {tuple(tensors[0].shape)}, w2 {tuple(tensors[3].shape)}")
    want = module.prepared_shapes(E, Hp, Ip, activation, tensors[2] is not None, tensors[5] is not None,
                                  activations)
    for role, t, spec in zip(PREPARED_ROLES, tensors, want):
        if t is None:
            continue
        if tuple(t.shape) != tuple(spec[0]) or t.dtype != spec[1]:
            raise ValueError(f"{where}: {role} is {t.dtype} {tuple(t.shape)} but kernel {kernel!r} with "
                             f"E={E}, Hp={Hp}, Ip={Ip} (from w13 and w2), activation={activation!r}"
                             f"{act_arg} expects {_fmt(spec)}; {fix}")
    if isinstance(hidden_size, int) and hidden_size > Hp:
        raise ValueError(f"{where}: hidden has H={hidden_size} features but the weights hold only "
                         f"Hp={Hp} (w13 {tuple(tensors[0].shape)}); the weights were prepared for "
                         f"another model")
    return E, Hp, Ip
