#!/usr/bin/env python3
"""Decode side by side: flashattn.flash_attn_with_kvcache (contiguous and paged caches) against PyTorch SDPA's
cuDNN and flash backends, and a device-to-device copy, in one run on one GPU.

Grouped-query heads (32 query / 8 KV heads by default), head dim 128, bf16; every call timed with
triton.testing.do_bench (median; it clears the L2 cache before each call). With --graphs every call is captured
in a CUDA graph first and the replays are timed, as serving engines run decode steps: host time then drops out
for every implementation alike. Bandwidth = bytes of K and V read / time; the copy's rate counts bytes read and
written.

    python3 scripts/decode_bench.py --out decode.jsonl > decode.md
"""

import argparse
import json
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

from flashattn import flash_attn_with_kvcache


def copy_rate(nbytes=1 << 30):
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * nbytes / (ms * 1e-3) / 1e12


def paged(k, v, page, gen):
    """k and v as pages of `page` tokens in a shuffled order, and the block table."""
    b, n, h, d = k.shape
    blocks = -(-n // page)
    order = torch.randperm(b * blocks, generator=gen).to(k.device)

    def scatter(cache):
        padded = F.pad(cache, (0, 0, 0, 0, 0, blocks * page - n))
        pages = torch.empty(b * blocks, page, h, d, dtype=cache.dtype, device=cache.device)
        pages[order] = padded.reshape(b * blocks, page, h, d)
        return pages

    return scatter(k), scatter(v), order.reshape(b, blocks).to(torch.int32)


def bench(fn, graphs):
    """Median milliseconds of fn(), or of replaying a CUDA graph of it."""
    if graphs:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        fn = graph.replay
    return do_bench(fn, warmup=10, rep=100, return_mode="median")


def sdpa(backend, q, k, v):
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def run():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)

    try:
        run()
    except RuntimeError:
        return None
    return run


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="1x2048,1x32768,1x131072,8x8192,8x32768,32x8192,64x4096,64x16384,128x2048,128x8192",
                   help="batch x cache length, comma-separated")
    p.add_argument("--seqlen-q", default="1,4", help="new queries per sequence, comma-separated")
    p.add_argument("--pages", default="16,256", help="page sizes of the paged runs, comma-separated")
    p.add_argument("--heads", default="32,8", help="query heads, KV heads")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--graphs", action="store_true", help="time replays of CUDA graphs of the calls")
    p.add_argument("--out", help="also write one JSON object per measurement here")
    args = p.parse_args()
    hq, hkv = (int(x) for x in args.heads.split(","))
    d, dtype = args.head_dim, torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    copy = copy_rate()
    name = torch.cuda.get_device_name()
    mode = "CUDA-graph replays" if args.graphs else "eager calls"
    print(f"{name}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, bf16, heads {hq}/{hkv}, "
          f"head dim {d}, {mode}; device-to-device copy {copy:.2f} TB/s\n")
    pages = [int(x) for x in args.pages.split(",") if x]
    head = ["batch", "seq_q", "cache", "cuDNN", "SDPA flash", "flashattn"] + [f"paged {s}" for s in pages]
    head += ["flashattn TB/s", "of copy", "vs cuDNN"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    out = open(args.out, "w") if args.out else None
    for shape in args.shapes.split(","):
        batch, n = (int(x) for x in shape.split("x"))
        for sq in (int(x) for x in args.seqlen_q.split(",")):
            q = torch.randn(batch, sq, hq, d, dtype=dtype, device="cuda")
            k = torch.randn(batch, n, hkv, d, dtype=dtype, device="cuda")
            v = torch.randn_like(k)
            seqlens = torch.full((batch,), n, dtype=torch.int32, device="cuda")
            times = {}
            for label, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa_flash", SDPBackend.FLASH_ATTENTION)):
                fn = sdpa(backend, q, k, v)
                times[label] = bench(fn, args.graphs) if fn else None
            ours = flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens)
            ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 enable_gqa=True).transpose(1, 2)
            err = (ours.float() - ref.float()).abs().max().item()
            times["flashattn"] = bench(lambda: flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens), args.graphs)
            for page in pages:
                kp, vp, table = paged(k, v, page, gen)
                got = flash_attn_with_kvcache(q, kp, vp, cache_seqlens=seqlens, block_table=table)
                err = max(err, (got.float() - ref.float()).abs().max().item())
                times[f"paged{page}"] = bench(
                    lambda: flash_attn_with_kvcache(q, kp, vp, cache_seqlens=seqlens, block_table=table), args.graphs)
                del kp, vp
            kv_bytes = 2 * k.numel() * k.element_size()
            tb = kv_bytes / (times["flashattn"] * 1e-3) / 1e12
            us = lambda t: "n/a" if t is None else f"{t * 1e3:.0f} us"
            row = [str(batch), str(sq), str(n), us(times["cudnn"]), us(times["sdpa_flash"]), us(times["flashattn"])]
            row += [us(times[f"paged{s}"]) for s in pages]
            ratio = "n/a" if times["cudnn"] is None else f"{times['cudnn'] / times['flashattn']:.2f}x"
            row += [f"{tb:.2f}", f"{100 * tb / copy:.0f}%", ratio]
            print("| " + " | ".join(row) + " |")
            sys.stdout.flush()
            if out:
                out.write(json.dumps({"batch": batch, "seqlen_q": sq, "seqlen_k": n, "heads_q": hq, "heads_kv": hkv,
                                      "head_dim": d, "ms": times, "kv_bytes": kv_bytes, "copy_tb_per_s": copy,
                                      "max_abs_err_vs_sdpa": err, "gpu": name, "graphs": args.graphs}) + "\n")
            if err > 0.05:
                print(f"  WARNING: max |flashattn - sdpa| = {err:.3g}", file=sys.stderr)
            del q, k, v
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
