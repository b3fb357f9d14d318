"""A/B of our kernel between two source trees of this package, in one GPU session: a refactor
must not lose a microsecond, and timings compare only within one machine and one run.

    git archive <old commit> | tar -x -C /tmp/old          # (here: carried as a tarball)
    python benchmarks/ab_trees.py --trees old=/tmp/old,new=. --rounds 2 --out $OUT/ab

Each round runs `python -m mxfp4_compile.bench op --kernels triton` once per tree, the trees in
turn (old, new, old, new, ...), each in its own process with that tree first on PYTHONPATH, and
keeps each tree's per-shape medians; the table gives, per shape, every tree's median over rounds,
its spread (max - min over rounds, % of the median) and new / old. Trees are compared on the
same shapes, seed and settings; each bench run checks correctness before it times.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
from pathlib import Path


def run_bench(tree: Path, out: Path, models: str, tokens: str, seed: int) -> dict:
    """One `bench op` of our kernel from `tree` -> {(model, T): us} (rows that passed)."""
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "mxfp4_compile.bench", "op", "--kernels", "triton", "--models",
           models, "--tokens", tokens, "--seed", str(seed), "--no-progress", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True)
    (out / "log.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"bench op from {tree} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    times = {}
    with open(out / "op.csv") as fh:
        for row in csv.DictReader(fh):
            if row["kernel"] == "triton" and row["status"] == "ok":
                times[(row["model"], int(row["T"]))] = float(row["us"])
    return times


def table(names: list[str], runs: dict[str, list[dict]]) -> list[str]:
    """Markdown rows: shape, per tree median (spread %), last / first tree."""
    shapes = sorted(set().union(*(r.keys() for rs in runs.values() for r in rs)),
                    key=lambda s: (s[0], s[1]))
    lines = ["| shape | " + " | ".join(f"{n} us (spread %)" for n in names)
             + f" | {names[-1]} / {names[0]} |", "|---" * (len(names) + 2) + "|"]
    for shape in shapes:
        cells, meds = [], []
        for n in names:
            xs = [r[shape] for r in runs[n] if shape in r]
            if not xs:
                cells.append("-")
                meds.append(None)
                continue
            med = statistics.median(xs)
            meds.append(med)
            cells.append(f"{med:.1f} ({100 * (max(xs) - min(xs)) / med:.1f})")
        ratio = f"{meds[-1] / meds[0]:.3f}" if meds[0] and meds[-1] else "-"
        lines.append(f"| {shape[0]} T={shape[1]} | " + " | ".join(cells) + f" | {ratio} |")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trees", required=True, help="name=path,name=path (first is the baseline)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--models", default="20b,120b,mixtral")
    ap.add_argument("--tokens", default="1,8,64,512,4096,16384")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench_out/ab")
    args = ap.parse_args()
    trees = [t.split("=", 1) for t in args.trees.split(",")]
    names = [n for n, _ in trees]
    runs: dict[str, list[dict]] = {n: [] for n in names}
    out = Path(args.out)
    for r in range(args.rounds):
        for name, path in trees:
            runs[name].append(run_bench(Path(path).resolve(), out / f"{name}_{r}", args.models,
                                        args.tokens, args.seed))
            print(f"round {r} {name}: {len(runs[name][-1])} shapes", flush=True)
    text = "\n".join(table(names, runs))
    (out / "ab.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
