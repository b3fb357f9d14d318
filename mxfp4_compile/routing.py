"""Routers of the common MoE families: router logits -> (topk_weights, topk_ids) for torch.ops.mxfp4.moe.

Shape legend: T tokens, E experts (global), k experts per token, G expert groups (DeepSeek-V3).
  logits        [T, E]  any float dtype (math in float32)
  topk_weights  [T, k]  float32
  topk_ids      [T, k]  int64
Plain vectorized torch: the routing stays in the compiled graph as ordinary ops. With
``fused=True`` the gpt-oss, Qwen3 and Mixtral routers are one custom op instead
(torch.ops.mxfp4.topk_softmax: one Triton launch on CUDA, where torch.topk alone takes several;
the same numbers, ties taken lower index first).
"""
from __future__ import annotations

import torch

from .ops import topk_softmax


def _check(logits: torch.Tensor, top_k: int) -> None:
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"router logits must be a float [T, E] tensor, got {logits.dtype} "
                         f"{tuple(logits.shape)}")
    if not 1 <= top_k <= logits.shape[1]:
        raise ValueError(f"top_k must lie in [1, E={logits.shape[1]}], got {top_k}")


def _topk_softmax(logits, top_k, softmax_first, renormalize, fused):
    if fused:
        return torch.ops.mxfp4.topk_softmax(logits, top_k, softmax_first, renormalize)
    return topk_softmax.topk_softmax_torch(logits, top_k, softmax_first, renormalize)


def gpt_oss_routing(logits: torch.Tensor, top_k: int, fused: bool = False):
    """gpt-oss: top-k of the logits, softmax over those k."""
    _check(logits, top_k)
    return _topk_softmax(logits, top_k, False, True, fused)


def qwen3_routing(logits: torch.Tensor, top_k: int, norm_topk_prob: bool = True,
                  fused: bool = False):
    """Qwen3-MoE: softmax over all E, top-k, renormalized over the k when ``norm_topk_prob``."""
    _check(logits, top_k)
    return _topk_softmax(logits, top_k, True, norm_topk_prob, fused)


def mixtral_routing(logits: torch.Tensor, top_k: int, fused: bool = False):
    """Mixtral / OLMoE: softmax over all E, top-k, renormalized over the k."""
    return qwen3_routing(logits, top_k, norm_topk_prob=True, fused=fused)


def deepseek_v3_routing(logits: torch.Tensor, top_k: int, e_score_correction_bias: torch.Tensor | None = None,
                        n_group: int = 1, topk_group: int = 1, norm_topk_prob: bool = True,
                        routed_scaling_factor: float = 1.0):
    """DeepSeek-V3: sigmoid scores; bias-corrected scores choose groups (sum of each group's top 2) and experts; weights are the unbiased scores, optionally normalized, times routed_scaling_factor."""
    _check(logits, top_k)
    T, E = logits.shape
    if not isinstance(n_group, int) or isinstance(n_group, bool) or not 1 <= n_group <= E:
        raise ValueError(f"n_group must be an int in [1, E={E}] (the number of expert groups; 1 = no "
                         f"grouping), got {n_group!r}")
    if not isinstance(topk_group, int) or isinstance(topk_group, bool):
        raise ValueError(f"topk_group must be an int in [1, n_group={n_group}], got {topk_group!r}")
    if E % n_group:
        raise ValueError(f"n_group={n_group} must divide the number of experts E={E}")
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"topk_group must lie in [1, n_group={n_group}], got {topk_group}")
    if top_k > topk_group * (E // n_group):
        raise ValueError(f"top_k={top_k} exceeds the {topk_group * (E // n_group)} experts in the "
                         f"topk_group={topk_group} chosen groups")
    scores = torch.sigmoid(logits.float())  # [T, E]
    biased = scores if e_score_correction_bias is None else scores + e_score_correction_bias.float()
    grouped = biased.view(T, n_group, E // n_group)  # [T, G, E/G]
    group_scores = grouped.topk(min(2, E // n_group), dim=-1).values.sum(dim=-1)  # [T, G]
    group_ids = group_scores.topk(topk_group, dim=-1).indices  # [T, topk_group]
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_ids, True)
    expert_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(T, E)  # [T, E]
    masked = biased.masked_fill(~expert_mask, float("-inf"))
    ids = masked.topk(top_k, dim=-1).indices  # [T, k]
    w = scores.gather(1, ids)
    if norm_topk_prob:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return w * routed_scaling_factor, ids
