"""Format constants and the string choices users pass, each defined once.

MXFP4 (OCP Microscaling Formats v1.0): blocks of ``BLOCK`` consecutive elements along the last dim
share one e8m0 scale byte ``b`` meaning ``2**(b - E8M0_BIAS)``, with ``E8M0_NAN`` as NaN; each
element is a 4-bit e2m1 code whose value is ``E2M1_VALUES[code]`` (bit 3 is the sign). The math on
these (quantize, dequantize) is in numerics.py.

String choices are ``Literal`` types, so users keep passing plain strings and type checkers see the
valid ones; each has one validator that raises a ValueError naming the argument, the bad value and
the valid choices:

  Kernel      "auto" | "reference" | "triton" | "triton_kernels" | "flashinfer"   check_kernel
  Rounding    "floor" | "round_up"                                                 check_rounding
  Activation  "swiglu_oai" | "silu_glu"                                            check_activation
  Activations "bf16" | "fp8"  (the MoE GEMMs' input dtype)                         check_activations
"""
from __future__ import annotations

from typing import Literal, get_args

# ---- MXFP4 ------------------------------------------------------------------------------------------
BLOCK = 32        # elements per MX block (one shared scale)
E8M0_BIAS = 127   # e8m0 scale byte b means 2**(b - E8M0_BIAS)
E8M0_NAN = 0xFF   # the e8m0 byte that means NaN (dequantizes its whole block to NaN)
# Value of each 4-bit e2m1 code, by code (bit 3 is the sign).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
               -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
E2M1_MAX = 6.0    # largest e2m1 magnitude

# ---- activations ------------------------------------------------------------------------------------
Activation = Literal["swiglu_oai", "silu_glu"]
GateUp = Literal["interleaved", "concatenated"]
# activation -> how its gate/up rows are stored in w13 [2I, H]:
#   swiglu_oai (gpt-oss)                  interleaved   [g0, u0, g1, u1, ...]
#   silu_glu (Mixtral, Qwen, DeepSeek)    concatenated  [g0 .. g(I-1), u0 .. u(I-1)]
ACTIVATIONS: dict[Activation, GateUp] = {"swiglu_oai": "interleaved", "silu_glu": "concatenated"}

# swiglu_oai's defaults (gpt-oss): gate * sigmoid(alpha * gate) * (up + 1), gate clamped above at
# limit, up clamped to [-limit, limit]
SWIGLU_ALPHA = 1.702
SWIGLU_LIMIT = 7.0

# The dtype the MoE GEMMs read their inputs (x, then the activated intermediate) in:
#   bf16  the hidden states as bf16 (exact for bf16 models)
#   fp8   each row as e4m3 with one fp32 scale (amax / 448), quantized at run time ("W4A8")
Activations = Literal["bf16", "fp8"]
ACTIVATION_DTYPES: tuple[Activations, ...] = get_args(Activations)

# ---- scale rounding ---------------------------------------------------------------------------------
Rounding = Literal["floor", "round_up"]
ROUNDINGS: tuple[Rounding, ...] = get_args(Rounding)

# ---- kernels ----------------------------------------------------------------------------------------
Kernel = Literal["auto", "reference", "triton", "triton_kernels", "flashinfer"]
KERNEL_CHOICES: tuple[Kernel, ...] = get_args(Kernel)  # what a user may pass
KERNELS: tuple[Kernel, ...] = KERNEL_CHOICES[1:]          # the concrete kernels ("auto" resolved)


# ---- validators -------------------------------------------------------------------------------------
def _choices(values) -> str:
    names = [repr(v) for v in values]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def _check(value, choices, argument: str, what: str, hint: str = ""):
    if isinstance(value, str) and value in choices:
        return value
    raise ValueError(f"{argument}={value!r} is not {what}; choose {_choices(choices)}{hint}")


def check_kernel(value, argument: str = "kernel", *, allow_auto: bool = True) -> str:
    """``value`` if it names a kernel (or "auto" when ``allow_auto``), else a ValueError."""
    if allow_auto:
        return _check(value, KERNEL_CHOICES, argument, "a known MXFP4 MoE kernel")
    if value == "auto":
        return _check(value, KERNELS, argument, "a concrete MXFP4 MoE kernel",
                      " (mxfp4_compile.choose_kernel(device) resolves 'auto' to one of these)")
    return _check(value, KERNELS, argument, "a known MXFP4 MoE kernel")


def check_rounding(value, argument: str = "rounding") -> str:
    """``value`` if it names an MXFP4 scale rounding rule, else a ValueError."""
    return _check(value, ROUNDINGS, argument, "an MXFP4 scale rounding rule")


def check_activation(value, argument: str = "activation") -> str:
    """``value`` if it names a supported MoE activation, else a ValueError."""
    return _check(value, ACTIVATIONS, argument, "a supported MoE activation")


def check_activations(value, argument: str = "activations") -> str:
    """``value`` if it names a GEMM input dtype of the MoE op, else a ValueError."""
    return _check(value, ACTIVATION_DTYPES, argument, "a MoE GEMM input dtype")


def gate_up_interleaved(activation: Activation) -> bool:
    """Whether ``activation`` stores w13's gate/up rows interleaved (else concatenated)."""
    return ACTIVATIONS[check_activation(activation)] == "interleaved"
