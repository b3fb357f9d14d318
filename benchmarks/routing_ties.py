"""How sensitive the e2e bench's random-weight gpt-oss is to routing ties (why `e2e --check`
reports large logits differences between any two implementations of the same model).

The model is `bench e2e`'s own (`build_model`: gpt-oss-20b widths, N(0, 0.02) weights), eager, in
bf16, one prompt. Two measurements:
  ties       per layer, how many tokens' router logits tie exactly (in bf16) at the top-k boundary
  tie-break  the final logits when those ties go to the lower expert index (what
             mxfp4.topk_softmax does) against the higher one; nothing else differs

    PYTHONPATH=. python benchmarks/routing_ties.py [--layers 4] [--prompt 256] [--device cpu]
"""
import argparse
import json

import torch
import torch.nn.functional as F

from mxfp4_compile.bench import e2e


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    args = argparse.Namespace(size="20b", layers=a.layers, prefill=0, new_tokens=0, seed=0)
    model = e2e.build_model(args, torch.device(a.device))
    routers = [layer.mlp.router for layer in model.model.layers]
    k = routers[0].top_k
    ties = []

    def count(mod, inputs):
        logits = F.linear(inputs[0], mod.weight, mod.bias)  # [T, E] bf16, as the router computes
        v = logits.float().sort(-1, descending=True).values
        ties.append(int((v[:, k - 1] == v[:, k]).sum()))

    def route(sign):
        def forward(self, hidden):  # transformers' GptOssTopKRouter.forward, ties broken by index
            logits = F.linear(hidden, self.weight, self.bias)
            order = torch.arange(logits.shape[-1], device=logits.device, dtype=torch.float32)
            ids = torch.topk(logits.float() + sign * 1e-6 * order, k, dim=-1).indices
            top = logits.gather(-1, ids)
            return logits, F.softmax(top, dim=1, dtype=top.dtype), ids
        return forward

    g = torch.Generator().manual_seed(17)
    ids = torch.randint(3, model.config.vocab_size, (1, a.prompt), generator=g).to(a.device)
    hooks = [r.register_forward_pre_hook(count) for r in routers]
    cls = type(routers[0])
    plain = cls.forward
    out = {}
    try:
        with torch.no_grad():
            for name, sign in (("lower", -1.0), ("higher", 1.0)):
                cls.forward = route(sign)
                out[name] = model(ids).logits[0].float()
                for h in hooks:
                    h.remove()
                hooks = []
    finally:
        cls.forward = plain
    lo, hi = out["lower"], out["higher"]
    res = dict(layers=a.layers, prompt=a.prompt, top_k=k, experts=model.config.num_local_experts,
               ties_per_layer=ties, routings=a.prompt * a.layers,
               rel_l2_last=float((lo[-1] - hi[-1]).norm() / hi[-1].norm()),
               rel_l2_all=float((lo - hi).norm() / hi.norm()),
               argmax_agree=float((lo.argmax(-1) == hi.argmax(-1)).float().mean()))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
