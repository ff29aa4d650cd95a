"""PyTorch scaled_dot_product_attention on the shapes `flashattn bench` uses, one JSON object per measurement.

Backends: flash (FlashAttention-2), cudnn, efficient (memory-efficient) and math, each forced with sdpa_kernel.
Forward: the call; backward: torch.autograd.grad of q, k, v from a fixed output gradient. Median of
triton.testing.do_bench. FLOPs as FlashAttention counts them: 4 B H N^2 d (half when causal), backward 2.5x.
"""
import argparse
import json
import sys

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {
    "torch-flash": SDPBackend.FLASH_ATTENTION,
    "torch-cudnn": SDPBackend.CUDNN_ATTENTION,
    "torch-efficient": SDPBackend.EFFICIENT_ATTENTION,
    "torch-math": SDPBackend.MATH,
}


def emit(**row):
    print(json.dumps(row), flush=True)


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--head-dims", default="64,128")
    ap.add_argument("--seqlens", default="512,1024,2048,4096,8192,16384")
    ap.add_argument("--math-max", type=int, default=4096, help="largest N for the materializing math backend")
    args = ap.parse_args()
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name()

    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    ms = bench(lambda: a @ b)
    emit(impl="torch-gemm", device=name, dtype="bf16", size=8192, ms=ms, tflops=2 * 8192**3 / ms / 1e9)
    del a, b

    for d in map(int, args.head_dims.split(",")):
        for causal in (False, True):
            for n in map(int, args.seqlens.split(",")):
                batch, heads = max(1, 16384 // n), 2048 // d
                shape = (batch, n, heads, d)
                q, k, v, do = (torch.randn(shape, device=dev, dtype=torch.bfloat16).transpose(1, 2) for _ in range(4))
                for t in (q, k, v):
                    t.requires_grad_(True)
                flops = 4 * batch * heads * n * n * d / (2 if causal else 1)
                for impl, backend in BACKENDS.items():
                    if impl == "torch-math" and n > args.math_max:
                        continue
                    base = dict(impl=impl, device=name, dtype="bf16", batch=batch, heads_q=heads, heads_kv=heads,
                                seqlen_q=n, seqlen_k=n, head_dim=d, causal=causal)
                    try:
                        with sdpa_kernel(backend):
                            f = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
                            ms = bench(f)
                            emit(**base, **{"pass": "fwd"}, ms=ms, tflops=flops / ms / 1e9)
                            out = f()
                            g = lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True)
                            ms = bench(g)
                            emit(**base, **{"pass": "bwd"}, ms=ms, tflops=2.5 * flops / ms / 1e9)
                            del out
                    except Exception as e:  # a backend that does not support the shape
                        print(f"{impl} d={d} causal={causal} N={n}: {e}".splitlines()[0], file=sys.stderr)
                    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
