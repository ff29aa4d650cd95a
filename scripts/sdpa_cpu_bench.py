"""PyTorch attention on the CPU, one JSON object per measurement, for side-by-side runs with `flashattn bench
--device cpu`: scaled_dot_product_attention (its fused CPU flash kernel) and eager attention (softmax(QK^T)V
materialized), forward and forward + backward, plus the GEMM ceiling. Median of timed calls after a warm-up.

Usage: sdpa_cpu_bench.py --threads T --dtype f32|bf16 --head-dim D --heads H --seqlens 1024,4096
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def median_ms(fn, min_time=1.0):
    fn()
    samples, start = [], time.perf_counter()
    while time.perf_counter() - start < min_time or len(samples) < 3:
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1e3)
    return sorted(samples)[len(samples) // 2]


def eager(q, k, v):
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.softmax(s.float(), dim=-1).to(q.dtype) @ v


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--seqlens", default="1024,4096")
    ap.add_argument("--eager-max", type=int, default=4096)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    base = dict(device="cpu", threads=args.threads, dtype=args.dtype, torch=torch.__version__)

    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    ms = median_ms(lambda: a @ b)
    print(json.dumps(dict(impl="torch-gemm", size=2048, ms=ms, tflops=2 * 2048**3 / ms / 1e9, **base)), flush=True)

    d, h = args.head_dim, args.heads
    for n in map(int, args.seqlens.split(",")):
        q, k, v, do = (torch.randn(1, h, n, d, dtype=dtype) for _ in range(4))
        for t in (q, k, v):
            t.requires_grad_(True)
        flops = 4 * h * n * n * d
        impls = {"torch-sdpa": lambda: F.scaled_dot_product_attention(q, k, v)}
        if n <= args.eager_max:
            impls["torch-eager"] = lambda: eager(q, k, v)
        for impl, fwd in impls.items():
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]):
                # The backward is timed with its forward, as autograd runs them: "fwd+bwd", 3.5x the forward's FLOPs.
                for pass_, fn, f in (
                    ("fwd", lambda: fwd().detach(), flops),
                    ("fwd+bwd", lambda: torch.autograd.grad(fwd(), (q, k, v), do), 3.5 * flops),
                ):
                    with torch.no_grad() if pass_ == "fwd" else torch.enable_grad():
                        ms = median_ms(fn)
                    row = dict(impl=impl, batch=1, heads_q=h, seqlen_q=n, head_dim=d, causal=False, pass_=pass_,
                               ms=ms, tflops=f / ms / 1e9, **base)
                    row["pass"] = row.pop("pass_")
                    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
