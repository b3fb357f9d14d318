"""python -m mxfp4_compile.bench {op,e2e,checkpoint,plot} [flags]; `--help` on each explains every flag."""
from __future__ import annotations

import argparse
import os
import sys

import torch

GPU_TOKENS = "1,8,64,512,4096,16384"


def _parser():
    gpu = torch.cuda.is_available()
    out_default = os.environ.get("OUT", "bench_out")
    ap = argparse.ArgumentParser(
        prog="python -m mxfp4_compile.bench",
        description="Benchmarks of the MXFP4 MoE: 'op' (the fused MoE alone, every kernel and "
                    "peer, with floors), 'e2e' (a GptOss model compiled with backend='mxfp4' vs "
                    "Inductor bf16) and 'plot' (roofline PNG from op's CSV). Without a GPU each "
                    "command runs at tiny CPU shapes (harness check only).")
    sub = ap.add_subparsers(dest="cmd", required=True)

    op = _command(sub, "op", "fused MoE op: correctness check, then CUDA-graph timing vs floors",
                  "Times the whole MoE forward (router top-k + the op) of every kernel and installed "
                  "peer after a correctness check, next to the byte, streaming and FLOP floors "
                  "measured in the same run (byte floor bandwidth: max of large copies and a large "
                  "read stream; a time under a floor is flagged for a re-check). Writes op.csv, "
                  "op.txt, op.json under --out.")
    op.add_argument("--models", default="20b,120b,mixtral" if gpu else "tiny,tiny_glu",
                    help="comma list of shapes: 20b (E32 H2880 I2880 top4 swiglu_oai+bias), 120b "
                    "(E128, same), mixtral (E8 H4096 I14336 top2 silu_glu), tiny, tiny_glu (CPU test shapes)")
    op.add_argument("--tokens", default=GPU_TOKENS if gpu else "1,8,64",
                    help="comma list of token counts T")
    op.add_argument("--kernels", default="auto",
                    help="comma list from triton, triton_fp8 (activations='fp8', sm90), reference, "
                    "bf16_grouped_mm, triton_kernels, flashinfer; 'auto' = ours that can run here "
                    "(reference only on CPU; triton_fp8 on sm90) + every peer "
                    "(peers not installed / not runnable on this GPU are listed as not run)")
    op.add_argument("--r-sets", type=int, default=4 if gpu else 2,
                    help="weight sets rotated inside one timed graph, so weights come from HBM, "
                    "not L2 (the bf16 peer uses at most 2: its sets are 4x larger)")
    op.add_argument("--tol", type=float, default=1e-2,
                    help="rel-L2 vs the float32 reference above which a kernel fails and is not timed")
    op.add_argument("--min-replays", type=int, default=10, help="fewest graph replays per timing")
    op.add_argument("--replay-s", type=float, default=0.3 if gpu else 0.02,
                    help="seconds of replays per timing (more replays than --min-replays if they fit)")
    op.add_argument("--stream-max-t", type=int, default=64,
                    help="measure the streaming floor for T up to this (decode shapes)")
    op.add_argument("--no-again", dest="again", action="store_false",
                    help="do not time our kernels a second time (the repeat shows run-to-run noise)")
    op.add_argument("--budget-s", type=float, default=0,
                    help="stop starting new shapes after this many seconds (0 = no limit); "
                    "shapes left are written as 'skipped' rows")
    op.add_argument("--strict", action="store_true", help="exit 1 when any check failed or errored")
    _common(op, out_default)

    e2e = _command(sub, "e2e", "transformers generate, static cache, compiled: mxfp4 vs Inductor",
                   "GptOssForCausalLM at gpt-oss-20b sizes (24 layers, vocab 201088; tiny on CPU), "
                   "random weights, one bf16 model shared by the backends. Times generate with a "
                   "static cache and a compiled forward (mode='reduce-overhead'): ms per decoded "
                   "token per batch size and time to first token at --prefill, backends "
                   "interleaved; compile time, cudagraph skips, memory, byte floor. Writes "
                   "e2e.csv, e2e.txt, e2e.json (and profile_<group>.txt with --profile) under --out.")
    e2e.add_argument("--size", choices=("20b", "tiny"), default="20b" if gpu else "tiny",
                     help="20b: gpt-oss-20b sizes; tiny: hidden 64, 2 layers (CPU test)")
    e2e.add_argument("--layers", type=int, default=0,
                     help="decoder layers (0 = the size's own: 24 for 20b); fewer only to explore")
    e2e.add_argument("--batches", default="1,8,64" if gpu else "1,2",
                     help="decode batch sizes (comma list; empty for none)")
    e2e.add_argument("--prompt", type=int, default=256 if gpu else 12,
                     help="prompt length of the decode groups (>= the sliding window: its cache "
                          "is full, as in a real conversation)")
    e2e.add_argument("--new-tokens", type=int, default=64 if gpu else 8,
                     help="tokens generated per timed decode call (and a quarter of that for the "
                          "short call subtracted)")
    e2e.add_argument("--prefill", type=int, default=2048 if gpu else 16,
                     help="prompt length of the time-to-first-token group (batch 1); 0 skips it")
    e2e.add_argument("--backends", default="mxfp4,inductor,triton_kernels" if gpu else "mxfp4,inductor",
                     help="comma list: mxfp4, inductor (default bf16 Inductor), triton_kernels "
                          "(backend='mxfp4' with kernel='triton_kernels'), mxfp4_torch_router, "
                          "mxfp4_autotune (Inductor max-autotune for the rest of the model), "
                          "mxfp4_sync (mxfp4 with transformers' per-token stop check, which the "
                          "backend defers on CUDA), mxfp4_host_masks (mxfp4 with transformers' own "
                          "eager masks, which copy a host value per step before 5.25; the backend "
                          "builds them on the device), mxfp4_fresh_cache (mxfp4 with a new static "
                          "cache address every generate, as transformers makes it; the backend "
                          "reuses one), mxfp4_cublas_gemv (mxfp4 with "
                          "decode_gemv off: Inductor's cuBLAS matmuls for the one-row "
                          "projections), mxfp4_combo (mxfp4 with Inductor's combo kernels: "
                          "independent kernels share a launch), "
                          "mxfp4_compileconfig (transformers' CompileConfig(backend='mxfp4') route: "
                          "generate compiles decode, the prefill runs eager)")
    e2e.add_argument("--kernel", default="auto",
                     help="MoE kernel of the mxfp4 backend (options={'kernel': ...})")
    e2e.add_argument("--rounds", type=int, default=5 if gpu else 2,
                     help="timed rounds (each backend once per round, interleaved)")
    e2e.add_argument("--floor-gbps", type=float, default=3000.0,
                     help="memory bandwidth for the byte floor (GB/s; H100 SXM HBM3 measures ~3000)")
    e2e.add_argument("--profile", type=int, default=0,
                     help="GPU: profile N decode steps per backend at batch 1, and the prefill (0: no profile)")
    e2e.add_argument("--check", action="store_true",
                     help="after the timings: quantize the shared model in place and compare "
                          "greedy generate of the compiled model against eager with the same "
                          "MXFP4 weights (tokens and teacher-forced logits)")
    e2e.add_argument("--check-control", action="store_true",
                     help="before --check: the same comparison for stock Inductor's compile of the "
                          "bf16 model against the bf16 eager model (how far any compile of this "
                          "model moves from eager)")
    e2e.add_argument("--expert-scale", type=float, default=1.0,
                     help="multiply the random expert weights by this (timings: keep 1). For "
                          "--check: with 1, a 2^-9 relative change of the embeddings already moves "
                          "the logits by ~0.3 rel-L2 (routing flips), so any two implementations "
                          "differ that much; 0.25 brings that noise floor to ~0.02 "
                          "(benchmarks/notes/e2e.md, session 19)")
    e2e.add_argument("--margin", type=float, default=1e-2,
                     help="--check: tokens are compared up to the first step where eager's top-2 "
                          "logit margin is below this")
    e2e.add_argument("--budget-s", type=float, default=0,
                     help="stop starting new groups after this many seconds (0 = no limit)")
    _common(e2e, out_default)

    ck = _command(sub, "checkpoint", "gpt-oss MXFP4 checkpoint: load, compile, forward; memory",
                  "Writes a gpt-oss MXFP4 checkpoint with random weights in the published layout "
                  "(unless --dir holds one), loads it with mxfp4_compile.from_pretrained, compiles "
                  "it with backend='mxfp4' and runs one forward: load time, resident and peak "
                  "memory, forward memory, CUDA-graph pool. Writes checkpoint_<shape>.json under --out.")
    ck.add_argument("--shape", choices=("20b", "120b", "120b_2layers", "tiny"),
                    default="20b" if gpu else "tiny",
                    help="gpt-oss-20b (24 layers, 32 experts), -120b (36, 128), its first 2 layers, "
                         "tiny (CPU test)")
    ck.add_argument("--dir", default=os.path.join(out_default, "ckpt"),
                    help="checkpoint folder (written first when it has no config.json)")
    ck.add_argument("--spill", default="", help="comma list of folders for shards that do not "
                    "fit --dir's filesystem (linked into --dir)")
    ck.add_argument("--tokens", type=int, default=512 if gpu else 8, help="tokens in the forward")
    ck.add_argument("--kernel", default="auto", help="kernel the experts are laid out for")
    ck.add_argument("--scale-bytes", default="118,122",
                    help="lowest,highest e8m0 byte of the random expert scales (127 = 2**0); lower "
                         "keeps a deep random model from diverging between implementations")
    ck.add_argument("--generate", type=int, default=0,
                    help="also time transformers' generate of this many tokens, eager and compiled")
    ck.add_argument("--no-cudagraphs", dest="cudagraphs", action="store_false",
                    help="skip the CUDA-graph compile (its pool is not measured)")
    _common(ck, out_default)

    pl = _command(sub, "plot", "roofline PNG from op.csv",
                  "One panel per model: achieved TFLOP/s against arithmetic intensity (FLOPs per "
                  "MXFP4 weight byte) under the floor-bandwidth and matmul-rate roofs of the run, "
                  "one line per kernel/peer through its T points; below, percent of floor against "
                  "T (points faster than a floor ringed in red).")
    pl.add_argument("--csv", default=None, help="op CSV to read (default: <out>/op.csv)")
    pl.add_argument("--png", default=None, help="PNG to write (default: <out>/roofline.png)")
    pl.add_argument("--out", default=out_default, help="folder of op.csv and the PNG")
    pl.add_argument("--dpi", type=int, default=110, help="PNG resolution")
    return ap


def _command(sub, name, summary, description):
    """One subcommand's parser; --help shows every flag's default."""
    return sub.add_parser(name, help=summary, description=description,
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def _common(p, out_default):
    p.add_argument("--out", default=out_default, help="output folder (default: $OUT or bench_out)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device")
    p.add_argument("--seed", type=int, default=0, help="random seed (weights, inputs, routing)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd in ("op", "e2e") and torch.device(args.device).type != "cuda":
        from .harness import no_gpu_message
        print(no_gpu_message(args.cmd), flush=True)
    if args.cmd == "op":
        from . import op
        return op.run(args)
    if args.cmd == "e2e":
        from . import e2e
        return e2e.run(args)
    if args.cmd == "checkpoint":
        from . import checkpoint
        return checkpoint.run(args)
    from . import plot
    return plot.run(args)


if __name__ == "__main__":
    sys.exit(main())
