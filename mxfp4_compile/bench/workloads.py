"""The benchmark's workloads: model shapes, random MXFP4 weights in the canonical layout, routing
from random router logits, and the checks every timed call passes first.

Shape legend: T tokens, k top-k, E experts, H hidden, I intermediate (Hp/Ip padded).
"""
from __future__ import annotations

import torch

from .. import routing
from ..formats import SWIGLU_ALPHA, SWIGLU_LIMIT
from .harness import default_device as _dev


MODELS = {  # name -> (E, H, I, k, activation, biases)
    "20b": (32, 2880, 2880, 4, "swiglu_oai", True),
    "120b": (128, 2880, 2880, 4, "swiglu_oai", True),
    "mixtral": (8, 4096, 14336, 2, "silu_glu", False),
    # tiny shapes for the CPU harness test (and a quick look on any device)
    "tiny": (4, 64, 64, 2, "swiglu_oai", True),
    "tiny_glu": (4, 64, 96, 2, "silu_glu", False),
}
ALPHA, LIMIT = SWIGLU_ALPHA, SWIGLU_LIMIT  # gpt-oss's swiglu constants


def random_canonical(E, H, I, activation, biases, hm, im, gen, device=None):
    """Random MXFP4 bytes in the canonical layout, padded to (hm, im) multiples (zero padding).
    Uniform e2m1 codes, scale bytes 118..121 (weights of a few 1e-2, like real checkpoints),
    biases N(0, 0.1). ``device`` defaults to the generator's."""
    dev = _dev(device if device is not None else gen.device)
    Hp, Ip = -(-H // hm) * hm, -(-I // im) * im

    def codes(n, kk):
        return torch.randint(0, 256, (E, n, kk // 2), dtype=torch.uint8, device=dev, generator=gen)

    def scales(n, kk):
        return torch.randint(118, 122, (E, n, kk // 32), dtype=torch.uint8, device=dev, generator=gen)

    w13 = torch.zeros(E, 2 * Ip, Hp // 2, dtype=torch.uint8, device=dev)
    s13 = torch.zeros(E, 2 * Ip, Hp // 32, dtype=torch.uint8, device=dev)
    w2 = torch.zeros(E, Hp, Ip // 2, dtype=torch.uint8, device=dev)
    s2 = torch.zeros(E, Hp, Ip // 32, dtype=torch.uint8, device=dev)
    b13 = torch.zeros(E, 2 * Ip, dtype=torch.float32, device=dev) if biases else None
    b2 = torch.zeros(E, Hp, dtype=torch.float32, device=dev) if biases else None
    if activation == "swiglu_oai":  # interleaved gate/up: rows [0, 2I) real
        rows13 = [slice(0, 2 * I)]
    else:  # concatenated: gate [0, I), up [Ip, Ip + I)
        rows13 = [slice(0, I), slice(Ip, Ip + I)]
    for r in rows13:
        n = r.stop - r.start
        w13[:, r, : H // 2] = codes(n, H)
        s13[:, r, : H // 32] = scales(n, H)
        if biases:
            b13[:, r] = torch.randn(E, n, device=dev, generator=gen) * 0.1
    w2[:, :H, : I // 2] = codes(H, I)
    s2[:, :H, : I // 32] = scales(H, I)
    if biases:
        b2[:, :H] = torch.randn(E, H, device=dev, generator=gen) * 0.1
    return (w13, s13, b13, w2, s2, b2)


def expert_bytes(H, I, biases):
    """MXFP4 bytes of one expert (codes + e8m0 scales, + fp32 biases)."""
    b = 3 * H * I * (0.5 + 1 / 32)
    return b + (4 * (2 * I + H) if biases else 0)


def flops_per_token(H, I, k):
    return 2 * 3 * H * I * k


def route(logits, k, activation):
    """Router logits [T, E] -> (ids int64 [T, k], weights fp32 [T, k]) as each model does it, by
    the package's fused router (routing.py, fused=True: one launch on CUDA). Every kernel and
    peer gets the same routing."""
    if activation == "swiglu_oai":  # gpt-oss: top-k then softmax over the k
        tw, ids = routing.gpt_oss_routing(logits, k, fused=True)
    else:  # Mixtral: softmax, top-k, renormalize
        tw, ids = routing.mixtral_routing(logits, k, fused=True)
    return ids, tw


def eager_route(logits, k, activation):
    """The same routing from plain torch ops (torch.topk, softmax; several launches): what the
    benchmark's figures included before the fused topk_softmax op existed."""
    if activation == "swiglu_oai":
        tw, ids = routing.gpt_oss_routing(logits, k)
    else:
        tw, ids = routing.mixtral_routing(logits, k)
    return ids, tw


def distinct_experts(ids) -> int:
    return int(torch.unique(ids).numel())


def poison_free_memory(device, nbytes=1 << 30):
    """Fill freed allocator memory with NaN so that outputs a kernel forgets to write show up
    (CUDA caching allocator; on CPU outputs are poisoned by the caller instead)."""
    device = torch.device(device)
    if device.type != "cuda":
        return
    free = torch.cuda.mem_get_info(device)[0]
    nbytes = int(min(nbytes, free * 0.5))
    t = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    t.fill_(float("nan"))
    del t


def rel_l2(out, ref) -> float:
    """||out - ref|| / ||ref||; NaN when out has a non-finite element (unwritten/poisoned)."""
    out, ref = out.float(), ref.float()
    if not torch.isfinite(out).all():
        return float("nan")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()
