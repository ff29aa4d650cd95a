#!/usr/bin/env python3
"""Side-by-side table of two `flashattn bench --json` runs of the same sweep (e.g. two builds measured in one
session): ab_compare.py A.jsonl B.jsonl prints TFLOP/s of each and B / A per cell, and the spread of the ratios."""
import json
import statistics
import sys


def cells(path):
    out = {}
    for line in open(path):
        if line.startswith("{"):
            r = json.loads(line)
            if r.get("tflops") is not None and "pass" in r:
                out[(r["head_dim"], r["causal"], r["pass"], r["seqlen_q"])] = r["tflops"]
    return out


def main():
    a, b = cells(sys.argv[1]), cells(sys.argv[2])
    print("| head dim | causal | pass | N | A TFLOP/s | B TFLOP/s | B / A |")
    print("|---|---|---|---|---|---|---|")
    ratios = []
    for key in sorted(a.keys() & b.keys()):
        d, causal, p, n = key
        ratios.append(b[key] / a[key])
        print(f"| {d} | {'yes' if causal else 'no'} | {p} | {n} | {a[key]:.0f} | {b[key]:.0f} | {ratios[-1]:.3f} |")
    if ratios:
        print(f"\nB / A over {len(ratios)} cells: median {statistics.median(ratios):.3f}, "
              f"min {min(ratios):.3f}, max {max(ratios):.3f}")


if __name__ == "__main__":
    main()
