"""Combines `flashattn bench --json` and sdpa_bench.py output into a side-by-side table (markdown and JSON) and
charts: compare.py OURS.jsonl TORCH.jsonl --out DIR."""
import argparse
import json
import os
from collections import defaultdict

COLUMNS = ["flash-cuda", "torch-flash", "torch-cudnn", "torch-efficient", "torch-math"]
NAMES = {"flash-cuda": "ours", "torch-flash": "FA2", "torch-cudnn": "cuDNN", "torch-efficient": "mem-eff", "torch-math": "math"}


def load(path):
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("{"):
                rows.append(json.loads(line))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("ours")
    ap.add_argument("torch")
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    rows = load(args.ours) + load(args.torch)
    ceilings = {r["impl"]: r for r in rows if r["impl"] in ("cublas", "torch-gemm", "gemm")}
    cells = defaultdict(dict)
    for r in rows:
        if r.get("tflops") is None or "pass" not in r:
            continue
        cells[(r["head_dim"], r["causal"], r["pass"], r["seqlen_q"])][r["impl"]] = r["tflops"]

    lines = ["| head dim | causal | pass | N | " + " | ".join(NAMES[c] for c in COLUMNS) + " | ours/FA2 | ours/cuDNN |",
             "|---|---|---|---|" + "---|" * (len(COLUMNS) + 2)]
    combined = []
    for key in sorted(cells):
        d, causal, p, n = key
        c = cells[key]
        fmt = lambda x: f"{x:.0f}" if x is not None else "-"
        ratio = lambda a, b: f"{c[a] / c[b]:.2f}" if a in c and b in c else "-"
        lines.append(f"| {d} | {'yes' if causal else 'no'} | {p} | {n} | " + " | ".join(fmt(c.get(k)) for k in COLUMNS)
                     + f" | {ratio('flash-cuda', 'torch-flash')} | {ratio('flash-cuda', 'torch-cudnn')} |")
        combined.append(dict(head_dim=d, causal=causal, pass_=p, seqlen=n, **{NAMES[k]: c.get(k) for k in COLUMNS}))
    head = "TFLOP/s, bf16 (FlashAttention's FLOP count). "
    head += "; ".join(f"{k} GEMM {v['size']}^3: {v['tflops']:.0f} TFLOP/s" for k, v in ceilings.items())
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(head + "\n\n" + "\n".join(lines) + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"ceilings": list(ceilings.values()), "cells": combined}, f, indent=1)

    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    groups = sorted({(k[0], k[1], k[2]) for k in cells})
    cols = 4
    rows_n = (len(groups) + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(5 * cols, 4 * rows_n), squeeze=False)
    for ax, (d, causal, p) in zip(axes.flat, groups):
        for impl in COLUMNS:
            pts = sorted((n, cells[(d, causal, p, n)][impl]) for (dd, cc, pp, n) in cells if (dd, cc, pp) == (d, causal, p) and impl in cells[(d, causal, p, n)])
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=NAMES[impl])
        ax.set_xscale("log", base=2)
        ax.set_title(f"d={d} {'causal' if causal else 'non-causal'} {p}")
        ax.set_xlabel("N")
        ax.set_ylabel("TFLOP/s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "bench.png"), dpi=90)


if __name__ == "__main__":
    main()
