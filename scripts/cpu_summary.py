"""Markdown table of a CPU side-by-side run (scripts/device-run.sh, step cpu): `flashattn bench --device cpu --json`
rows and scripts/sdpa_cpu_bench.py rows in one JSON-lines file. GFLOP/s; "fwd+bwd" adds our forward and backward
times, since PyTorch's autograd times them together.

Usage: cpu_summary.py cpu.jsonl
"""
import json
import sys
from collections import defaultdict


def main():
    rows = [json.loads(line) for line in open(sys.argv[1]) if line.startswith("{")]
    ms = defaultdict(dict)  # (threads, dtype, heads, d, n, pass) -> impl -> ms
    gemm = defaultdict(dict)  # (threads, dtype) -> impl -> GFLOP/s
    for r in rows:
        key = (r.get("threads"), r["dtype"])
        if r["impl"] in ("gemm", "torch-gemm"):
            gemm[key][r["impl"]] = r["tflops"] * 1e3
        elif r.get("ms") is not None:
            impl = "flash" if r["impl"].startswith("flash") else r["impl"]  # flash-avx512, flash-avx2, ...
            ms[key + (r["batch"] * r["heads_q"], r["head_dim"], r["seqlen_q"], r["pass"])][impl] = r["ms"]
    for key, cell in list(ms.items()):
        if key[-1] == "fwd" and "flash" in cell:
            bwd = ms.get(key[:-1] + ("bwd",), {}).get("flash")
            if bwd is not None:
                ms[key[:-1] + ("fwd+bwd",)]["flash"] = cell["flash"] + bwd

    print("| threads | dtype | B·H | d | N | pass | ours | torch SDPA | torch eager | ours / SDPA |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (threads, dtype, bh, d, n, pass_), cell in sorted(ms.items(), key=lambda kv: tuple(map(str, kv[0]))):
        if pass_ == "bwd":
            continue
        flops = 4 * bh * n * n * d * (3.5 if pass_ == "fwd+bwd" else 1)
        g = {impl: flops / t / 1e6 for impl, t in cell.items()}
        ratio = g["flash"] / g["torch-sdpa"] if "flash" in g and "torch-sdpa" in g else None
        fmt = lambda x: "-" if x is None else f"{x:.0f}"
        print(f"| {threads} | {dtype} | {bh} | {d} | {n} | {pass_} | {fmt(g.get('flash'))} | {fmt(g.get('torch-sdpa'))} "
              f"| {fmt(g.get('torch-eager'))} | {'-' if ratio is None else f'{ratio:.2f}'} |")
    print()
    print("GEMM 2048^3 in the same run, GFLOP/s (ours: the f32 `gemm` crate; torch: its matmul in the dtype):")
    for (threads, dtype), g in sorted(gemm.items(), key=lambda kv: tuple(map(str, kv[0]))):
        print(f"- {threads} threads, {dtype}: " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(g.items())))


if __name__ == "__main__":
    main()
