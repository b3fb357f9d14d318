"""How sensitive the e2e bench's random-weight gpt-oss is to routing ties (why `e2e --check`
reports large logits differences between implementations that break router ties differently).

The model is `bench e2e`'s own (`build_model`: gpt-oss-20b widths, N(0, 0.02) weights), eager, in
bf16, one prompt, run three times:
  lower    exact bf16 ties of the router logits at the top-k boundary sent to the lower expert
           index (what mxfp4.topk_softmax does; `e2e.tie_broken_routers`)
  higher   the same ties sent to the higher index; nothing else differs
  noise    lower, with the embeddings multiplied by (1 + 2^-9 N(0, 1)): about one bf16 rounding,
           the size of the difference between any two implementations' numbers
Prints the tie count and how far each run's final logits are from `lower`'s (rel-L2, argmax
agreement): what `e2e --check` can resolve at this --expert-scale.

    PYTHONPATH=. python benchmarks/routing_ties.py [--layers 4] [--prompt 256] [--expert-scale 1]
"""
import argparse
import json

import torch

from mxfp4_compile.bench import e2e
from mxfp4_compile.bench.workloads import rel_l2


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--expert-scale", type=float, default=1.0)
    a = ap.parse_args()
    args = argparse.Namespace(size="20b", layers=a.layers, prefill=0, new_tokens=0, seed=0,
                              expert_scale=a.expert_scale)
    model = e2e.build_model(args, torch.device(a.device))
    g = torch.Generator().manual_seed(17)
    ids = torch.randint(3, model.config.vocab_size, (1, a.prompt), generator=g).to(a.device)

    def noise(mod, inputs, out):
        g = torch.Generator().manual_seed(5)
        return out * (1 + 2.0 ** -9 * torch.randn(out.shape, generator=g).to(out))

    out, ties = {}, {}
    with torch.no_grad():
        for run, lower in (("lower", True), ("higher", False), ("noise", True)):
            hook = model.model.embed_tokens.register_forward_hook(noise) if run == "noise" else None
            with e2e.tie_broken_routers(model, lower) as ties[run]:
                out[run] = model(ids).logits[0].float()
            if hook is not None:
                hook.remove()
    ref = out["lower"]
    res = dict(layers=a.layers, prompt=a.prompt, expert_scale=a.expert_scale,
               top_k=model.config.num_experts_per_tok, experts=model.config.num_local_experts,
               ties_per_layer=[int(t) for t in ties["lower"]])
    for run in ("higher", "noise"):
        o = out[run]
        res[run] = dict(rel_l2_last=rel_l2(o[-1], ref[-1]), rel_l2_all=rel_l2(o, ref),
                        argmax_agree=float((o.argmax(-1) == ref.argmax(-1)).float().mean()))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
