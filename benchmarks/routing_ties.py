"""How sensitive the e2e bench's random-weight gpt-oss is to routing ties (why `e2e --check`
reports large logits differences between implementations that break router ties differently).

The model is `bench e2e`'s own (`build_model`: gpt-oss-20b widths, N(0, 0.02) weights), eager, in
bf16, one prompt, run twice: exact bf16 ties of the router logits at the top-k boundary sent to
the lower expert index (what mxfp4.topk_softmax does), then to the higher one
(`e2e.tie_broken_routers`); nothing else differs. Prints the tie count and how far apart the two
runs' final logits are.

    PYTHONPATH=. python benchmarks/routing_ties.py [--layers 4] [--prompt 256] [--device cpu]
"""
import argparse
import json

import torch

from mxfp4_compile.bench import e2e


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    args = argparse.Namespace(size="20b", layers=a.layers, prefill=0, new_tokens=0, seed=0)
    model = e2e.build_model(args, torch.device(a.device))
    g = torch.Generator().manual_seed(17)
    ids = torch.randint(3, model.config.vocab_size, (1, a.prompt), generator=g).to(a.device)
    out, ties = {}, {}
    with torch.no_grad():
        for lower in (True, False):
            with e2e.tie_broken_routers(model, lower) as ties[lower]:
                out[lower] = model(ids).logits[0].float()
    lo, hi = out[True], out[False]
    print(json.dumps(dict(
        layers=a.layers, prompt=a.prompt, top_k=model.config.num_experts_per_tok,
        experts=model.config.num_local_experts, ties_per_layer=[int(t) for t in ties[True]],
        rel_l2_last=float((lo[-1] - hi[-1]).norm() / hi[-1].norm()),
        rel_l2_all=float((lo - hi).norm() / hi.norm()),
        argmax_agree=float((lo.argmax(-1) == hi.argmax(-1)).float().mean()))))


if __name__ == "__main__":
    main()
