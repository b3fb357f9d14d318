"""``python -m mxfp4_compile.bench plot``: roofline PNG from op.csv, readable without the table.

Top row, one panel per model: achieved TFLOP/s (whole forward) against arithmetic intensity
(FLOPs per MXFP4 weight byte touched; it grows with T), log-log, under the roofs of the same run:
min(floor bandwidth x intensity, bf16 matmul rate), the floor bandwidth being the byte floor's
(max of large copies and a large read stream; ``copy_GBps`` in CSVs written before it was
recorded). One line per kernel / peer through its T points, each point labelled with T. Bottom
row: percent of the floor (max of byte and FLOP floor) against T, same colours; 100% = at the
roof. Points whose time beat a floor (``floor_check`` set) are ringed in red: they are
measurements to re-check, not results.
"""
from __future__ import annotations

import csv
import os

STYLE = {  # kernel -> (colour, marker, label)
    "triton": ("tab:red", "o", "triton (ours)"),
    "reference": ("tab:gray", "x", "reference (ours, plain torch)"),
    "bf16_grouped_mm": ("tab:blue", "s", "bf16 torch._grouped_mm"),
    "triton_kernels": ("tab:green", "^", "triton_kernels matmul_ogs"),
    "flashinfer": ("tab:purple", "D", "FlashInfer trtllm-gen"),
}


def read_rows(path):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for r in rows:
        if r.get("status") != "ok" or not r.get("us"):
            continue
        for k in ("T", "flops", "mxfp4_bytes"):
            r[k] = int(float(r[k]))
        for k in ("us", "pct_of_floor", "matmul_TFLOPs"):
            r[k] = float(r[k])
        r["floor_GBps"] = float(r.get("floor_GBps") or r["copy_GBps"])
        r["floor_bw_source"] = r.get("floor_bw_source") or "copy"
        r["floor_check"] = r.get("floor_check") or ""
        out.append(r)
    return out


def run(args) -> int:
    csv_path = args.csv or os.path.join(args.out, "op.csv")
    png = args.png or os.path.join(args.out, "roofline.png")
    rows = read_rows(csv_path)
    if not rows:
        print(f"[plot] no timed rows in {csv_path}: nothing to plot", flush=True)
        return 1
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    bw, bw_src = rows[0]["floor_GBps"], rows[0]["floor_bw_source"]
    tf = rows[0]["matmul_TFLOPs"]
    fig, axes = plt.subplots(2, len(models), figsize=(5.2 * len(models), 8.6), squeeze=False)
    for j, model in enumerate(models):
        mr = [r for r in rows if r["model"] == model]
        ax, ax2 = axes[0][j], axes[1][j]
        ai = [r["flops"] / r["mxfp4_bytes"] for r in mr]
        lo, hi = min(ai) / 2, max(ai) * 2
        xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]
        ax.plot(xs, [min(bw * 1e9 * x, tf * 1e12) / 1e12 for x in xs], color="black", lw=2,
                label=f"roof: {bw:.0f} GB/s ({bw_src}), {tf:.0f} TFLOP/s bf16 mm")
        for kern in dict.fromkeys(r["kernel"] for r in mr):
            kr = sorted((r for r in mr if r["kernel"] == kern), key=lambda r: r["T"])
            c, m, lab = STYLE.get(kern, ("tab:orange", "v", kern))
            x = [r["flops"] / r["mxfp4_bytes"] for r in kr]
            y = [r["flops"] / (r["us"] * 1e-6) / 1e12 for r in kr]
            ax.plot(x, y, color=c, marker=m, label=lab)
            for xx, yy, r in zip(x, y, kr):
                ax.annotate(f"T={r['T']}", (xx, yy), textcoords="offset points", xytext=(4, -10),
                            fontsize=7, color=c)
            ax2.plot([r["T"] for r in kr], [r["pct_of_floor"] for r in kr], color=c, marker=m, label=lab)
        bad = [r for r in mr if r["floor_check"]]
        if bad:
            ax2.scatter([r["T"] for r in bad], [r["pct_of_floor"] for r in bad], s=160,
                        facecolors="none", edgecolors="red", linewidths=1.5,
                        label="faster than a floor: re-check", zorder=3)
        ys = [r["flops"] / (r["us"] * 1e-6) / 1e12 for r in mr]
        roof_top = min(bw * 1e9 * hi, tf * 1e12) / 1e12
        ax.set_ylim(min(ys) / 2, max(max(ys), roof_top) * 2)
        E, H, I, k = (mr[0][n] for n in ("E", "H", "I", "k"))
        ax.set(xscale="log", yscale="log", xlabel="FLOPs per MXFP4 weight byte touched",
               ylabel="achieved TFLOP/s (whole forward)",
               title=f"{model}: E={E} H={H} I={I} top-{k}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
        ax2.set(xscale="log", xlabel="tokens T", ylabel="% of floor (max of byte, FLOP floor)",
                title=f"{model}: how close to the roof")
        ax2.axhline(100, color="black", lw=1)
        ax2.grid(True, which="both", alpha=0.3)
        ax2.legend(fontsize=7)
    dev = rows[0].get("device", "")
    fig.suptitle(f"MXFP4 MoE roofline, {dev}, torch {rows[0].get('torch')}, triton {rows[0].get('triton')}: "
                 + ("CUDA graph, L2 cold, median" if "cpu" not in dev else "CPU harness run: numbers mean nothing"),
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(png, dpi=args.dpi)
    plt.close(fig)
    print(f"[plot] {png} ({os.path.getsize(png) // 1024} KB) from {len(rows)} rows of {csv_path}", flush=True)
    return 0
