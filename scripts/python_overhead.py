"""Where the Python package's time goes on a GPU: the host cost of one call (tiny problems, many calls, one
synchronization), and, inside a 4K prefill of the Llama-shaped model (or a training step with `train` after the
length), the GPU time of the top kernels for sdpa and flashattn (torch.profiler). Prints a small report.

    python3 scripts/python_overhead.py 4096 [train]"""

import sys
import time

import torch

import flashattn
from flashattn import prefill


def host_cost(fn, n=2000):
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def main():
    q = torch.randn(1, 64, 32, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 64, 8, 64, device="cuda", dtype=torch.bfloat16)
    qt, kt = q.transpose(1, 2), k.transpose(1, 2)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    print(f"host cost per call, us: flashattn {host_cost(lambda: flashattn.flash_attn_func(q, k, k, causal=True)):.1f}"
          f", sdpa {host_cost(lambda: sdpa(qt, kt, kt, is_causal=True, enable_gqa=True)):.1f}")
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
    train = sys.argv[2:] == ["train"]
    what = "training step" if train else "prefill"
    args = prefill._args(["--seqlens", str(n)])
    names = {"sdpa": "sdpa", "flashattn": flashattn.register_transformers()}
    for impl, name in names.items():
        model = prefill.build_model(args, name)
        model = model.train() if train else model.eval()
        ids = torch.randint(0, 1000, (1, n), device="cuda")
        step = prefill._steps(model, ids, train)[-1][1]
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        events = prof.key_averages()
        rows = sorted(events, key=lambda e: -e.device_time_total)[:12]
        busy = sum(e.self_device_time_total for e in events)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / 10 * 1e6
        print(f"== {impl} N={n}: wall {wall:.0f} us per {what}, GPU busy {busy:.0f} us (kernels' own time)")
        print(f"   top GPU kernels (total us, calls)")
        for e in rows:
            print(f"  {e.device_time_total:10.0f} {e.count:5d}  {e.key[:110]}")
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
