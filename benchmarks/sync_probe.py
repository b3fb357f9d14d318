"""Where generate's decode makes the host wait for the GPU, and what building the masks on the
device is worth (benchmarks/notes/e2e.md, session 18; e2e_h100/session18/sync_probe_2layers.json).

GptOssForCausalLM at gpt-oss-20b widths (the e2e bench's model, ``--layers`` of them), static cache,
forward compiled with backend="mxfp4" (mode="reduce-overhead"), prompt 256, greedy:
1. every host sync of a generate, under ``torch.cuda.set_sync_debug_mode("warn")``, counted by its
   Python stack, for 8 and 24 new tokens (the difference is per decode step), with transformers'
   eager masks and with the backend's (``hf_generate.sync_free_masks``), with and without
   ``min_new_tokens``;
2. the CUDA runtime's synchronize / copy / launch calls per generate under torch.profiler;
3. ms per token, (t(48) - t(16)) / 32, the two mask paths interleaved over 4 rounds, and once
   with transformers' synchronized stop check as well.

    PYTHONPATH=. python benchmarks/sync_probe.py --out OUT_DIR [--layers 2]   # GPU only
"""
import argparse
import collections
import json
import os
import time
import traceback
import warnings

import torch


def build(layers, prompt):
    import mxfp4_compile  # noqa: F401  (registers backend="mxfp4")
    from mxfp4_compile.bench import e2e
    dev = torch.device("cuda")
    args = argparse.Namespace(size="20b", layers=layers, prefill=0, new_tokens=16, seed=0)
    model = e2e.build_model(args, dev)
    e2e.use(model, e2e.compiled_forward(model, "mxfp4", True, {}))
    ids = torch.randint(3, 1000, (1, prompt), device=dev, generator=torch.Generator(dev).manual_seed(1))
    return model, ids


def generate(model, ids, n, min_new=True):
    kw = dict(min_new_tokens=n) if min_new else {}
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                              do_sample=False, **kw)


def device_masks(model, on: bool) -> None:
    from mxfp4_compile import hf_generate
    if on:
        hf_generate.sync_free_masks(model)
    else:
        hf_generate.host_masks(model)


def sync_sites(model, ids, n, min_new) -> list:
    """The host syncs of one generate, by the last 14 frames of their Python stack."""
    sites, msgs = collections.Counter(), {}

    def show(message, category, filename, lineno, file=None, line=None):
        stack = traceback.extract_stack()[:-1]
        key = tuple(f"{'/'.join(f.filename.split('/')[-2:])}:{f.lineno}:{f.name}" for f in stack[-14:])
        sites[key] += 1
        msgs[key] = str(message)[:200]

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            generate(model, ids, n, min_new)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return [{"count": c, "msg": msgs[k], "stack": list(k)} for k, c in sites.most_common()]


def runtime_calls(model, ids, n) -> dict:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        generate(model, ids, n)
    calls = collections.Counter(e.name for e in prof.events() if e.name.startswith("cuda") and any(
        k in e.name for k in ("Synchronize", "Memcpy", "Launch")))
    return dict(calls)


def ms_per_token(model, ids) -> float:
    from mxfp4_compile.bench import e2e
    t16 = e2e.timed_generate(model, ids, 16, True)
    t48 = e2e.timed_generate(model, ids, 48, True)
    return (t48 - t16) / 32 * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=256, help=">= the sliding window (128)")
    ap.add_argument("--rounds", type=int, default=4)
    a = ap.parse_args()
    import transformers
    from mxfp4_compile import hf_generate
    model, ids = build(a.layers, a.prompt)
    res = dict(torch=torch.__version__, transformers=transformers.__version__, layers=a.layers,
               device=torch.cuda.get_device_name())
    t0 = time.time()
    first, again = generate(model, ids, 24), generate(model, ids, 24)
    res["compile_s"] = time.time() - t0
    device_masks(model, False)
    host = generate(model, ids, 24)
    device_masks(model, True)
    res["tokens_equal"] = bool(torch.equal(first, again) and torch.equal(first, host))
    for on in (False, True):
        device_masks(model, on)
        for n in (8, 24):
            for min_new in (True, False):
                res[f"syncs_device_masks{int(on)}_n{n}_min{int(min_new)}"] = sync_sites(model, ids, n, min_new)
        res[f"runtime_calls_device_masks{int(on)}_n8"] = runtime_calls(model, ids, 8)
        res[f"runtime_calls_device_masks{int(on)}_n24"] = runtime_calls(model, ids, 24)
    generate(model, ids, 48), generate(model, ids, 48)  # the 48-token cache length records here
    ab = collections.defaultdict(list)
    for _ in range(a.rounds):
        for on in (False, True):
            device_masks(model, on)
            ab[f"device_masks{int(on)}"].append(ms_per_token(model, ids))
    device_masks(model, False)
    hf_generate.stop_deferring(model)
    ab["host_masks_and_synchronized_stop_check"] = [ms_per_token(model, ids) for _ in range(2)]
    res["ms_per_token"] = dict(ab)
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, f"sync_probe_{a.layers}layers.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    for k, v in res.items():
        if k.startswith("syncs_"):
            print(k, sum(s["count"] for s in v), [(s["count"], s["stack"][-2]) for s in v if s["count"] > 1])
        elif not isinstance(v, list):
            print(k, v)
    print("wrote", path)


if __name__ == "__main__":
    main()
