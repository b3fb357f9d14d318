"""The "reference" kernel: plain torch on any device, weights kept in the canonical layout."""
from __future__ import annotations

import torch

from ...formats import BLOCK
from ..moe_torch import moe_torch

NAME = "reference"
H_MULTIPLE = BLOCK  # whole MXFP4 blocks, nothing more
I_MULTIPLE = BLOCK


def unavailable_reason(device: torch.device) -> str | None:
    return None  # runs wherever torch does


def prepared_shapes(E, Hp, Ip, activation, has_w13_bias, has_w2_bias):
    """The canonical shapes (ops/moe_torch.py), which kernels that keep them share."""
    u8, f32 = torch.uint8, torch.float32
    return [((E, 2 * Ip, Hp // 2), u8), ((E, 2 * Ip, Hp // BLOCK), u8),
            ((E, 2 * Ip), f32) if has_w13_bias else None,
            ((E, Hp, Ip // 2), u8), ((E, Hp, Ip // BLOCK), u8),
            ((E, Hp), f32) if has_w2_bias else None]


def prepare(w13, w13_scales, w13_bias, w2, w2_scales, w2_bias, activation):
    return w13, w13_scales, w13_bias, w2, w2_scales, w2_bias


def unprepare(w13, w13_scales, w13_bias, w2, w2_scales, w2_bias, activation):
    return w13, w13_scales, w13_bias, w2, w2_scales, w2_bias


def moe(hidden, topk_ids, topk_weights, w13, w13_scales, w13_bias, w2, w2_scales, w2_bias,
        activation, alpha, limit, expert_map, combine):
    return moe_torch(hidden, topk_ids, topk_weights, w13, w13_scales, w13_bias, w2, w2_scales,
                     w2_bias, activation, alpha, limit, expert_map, combine)
