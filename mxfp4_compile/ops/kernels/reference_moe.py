"""The "reference" kernel: plain torch on any device, on the canonical layout with w13's gate
and up rows held as explicit pairs.

Prepared layout (legend of ops/moe_torch.py):
  w13, w13_s    [E, Ip, 2, Hp/2], [E, Ip, 2, Hp/32]  uint8: [:, j, 0] gate row j, [:, j, 1] up row j
  w13_bias      [E, Ip, 2]        float32 or None
  w2, w2_s, w2_bias               canonical: [E, Hp, Ip/2], [E, Hp, Ip/32], [E, Hp]
The pair dim makes the layout independent of the activation (swiglu_oai's interleaved rows are
already pairs; silu_glu's concatenated halves are stacked into them) and gives it shapes no other
kernel's layout has, so the op's shape check refuses weights prepared for another kernel.
activations="fp8" uses the same layout: moe_torch quantizes each GEMM's input rows to e4m3 (the
emulation the triton kernel's FP8 path is tested against).
"""
from __future__ import annotations

import torch

from ...formats import BLOCK, check_activations, gate_up_interleaved
from ..moe_torch import moe_torch

NAME = "reference"
H_MULTIPLE = BLOCK  # whole MXFP4 blocks, nothing more
I_MULTIPLE = BLOCK


def unavailable_reason(device: torch.device) -> str | None:
    return None  # runs wherever torch does


def prepared_shapes(E, Hp, Ip, activation, has_w13_bias, has_w2_bias, activations="bf16"):
    check_activations(activations)  # one layout for both: the math is plain torch
    u8, f32 = torch.uint8, torch.float32
    return [((E, Ip, 2, Hp // 2), u8), ((E, Ip, 2, Hp // BLOCK), u8),
            ((E, Ip, 2), f32) if has_w13_bias else None,
            ((E, Hp, Ip // 2), u8), ((E, Hp, Ip // BLOCK), u8),
            ((E, Hp), f32) if has_w2_bias else None]


def to_pairs(t: torch.Tensor | None, activation: str) -> torch.Tensor | None:
    """Canonical w13 rows [E, 2Ip, ...] in ``activation``'s order -> [E, Ip, 2, ...] pairs."""
    if t is None:
        return None
    if gate_up_interleaved(activation):
        return t.unflatten(1, (-1, 2)).contiguous()
    gate, up = t.chunk(2, dim=1)
    return torch.stack((gate, up), dim=2)


def from_pairs(t: torch.Tensor | None, activation: str) -> torch.Tensor | None:
    """Inverse of ``to_pairs``."""
    if t is None:
        return None
    if gate_up_interleaved(activation):
        return t.flatten(1, 2).contiguous()
    return torch.cat((t[:, :, 0], t[:, :, 1]), dim=1)


def prepare(w13, w13_scales, w13_bias, w2, w2_scales, w2_bias, activation, activations="bf16"):
    check_activations(activations)
    return (to_pairs(w13, activation), to_pairs(w13_scales, activation),
            to_pairs(w13_bias, activation), w2, w2_scales, w2_bias)


def unprepare(w13, w13_scales, w13_bias, w2, w2_scales, w2_bias, activation, activations="bf16"):
    check_activations(activations)
    return (from_pairs(w13, activation), from_pairs(w13_scales, activation),
            from_pairs(w13_bias, activation), w2, w2_scales, w2_bias)


def moe(hidden, topk_ids, topk_weights, w13, w13_scales, w13_bias, w2, w2_scales, w2_bias,
        activation, alpha, limit, expert_map, combine, activations="bf16"):
    # the pairs flattened are interleaved rows, whatever the activation (a view: no copy)
    w13, w13_scales, w13_bias = (None if t is None else t.flatten(1, 2)
                                 for t in (w13, w13_scales, w13_bias))
    return moe_torch(hidden, topk_ids, topk_weights, w13, w13_scales, w13_bias, w2, w2_scales,
                     w2_bias, activation, alpha, limit, expert_map, combine, interleaved=True,
                     activations=activations)
