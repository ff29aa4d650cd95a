"""Prefill latency of a Llama-3.2-1B-shaped model with eager, sdpa and flashattn attention.

    python -m flashattn.prefill [--impl eager,sdpa,flashattn] [--seqlens 512,4096,32768] [--train]
                                [--weights DIR] [--plot FILE.png] [--json]

The model is built from Llama-3.2-1B's configuration (16 layers, hidden 2048, 32 heads, 8 KV heads, head dim 64,
vocabulary 128256) with random weights, or loaded from a local directory of safetensors (and its config.json)
with ``--weights``. A prefill is one forward pass over ``batch x seqlen`` random tokens without a KV cache,
keeping only the last position's logits (what serving needs); ``--train`` also times a training step (forward
with the language-model loss over every position, then backward). Each cell reports the median of repeated
runs after a warm-up; a cell that runs out of memory is reported as such. Attention costs O(N^2) and the rest
O(N), so on log-log axes latency bends towards slope 2 at long lengths: the plot shows the fitted slopes.
"""

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

LLAMA_3_2_1B = dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=8192),
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
    attention_dropout=0.0,
)

DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}


def _args(argv=None):
    p = argparse.ArgumentParser(prog="python -m flashattn.prefill", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impl", default="eager,sdpa,flashattn",
                   help="attention implementations, comma-separated: eager, sdpa, flashattn (default: all three)")
    p.add_argument("--seqlens", default="512,4096,32768", help="sequence lengths (default: 512,4096,32768)")
    p.add_argument("--batch", type=int, default=1, help="sequences per prefill (default: 1)")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="weights and activations (default: bf16 on a GPU, "
                   "f32 on the CPU)")
    p.add_argument("--weights", metavar="DIR", help="load real weights: a directory with config.json and "
                   "*.safetensors (default: Llama-3.2-1B's shape with random weights)")
    p.add_argument("--layers", type=int, default=None, help="override the number of layers (for a quick look)")
    p.add_argument("--train", action="store_true", help="also time a training step (forward + loss + backward)")
    p.add_argument("--min-time", type=float, default=1.0, help="seconds to time each cell for (default: 1)")
    p.add_argument("--max-reps", type=int, default=20, help="at most this many timed runs per cell (default: 20)")
    p.add_argument("--json", action="store_true", help="one JSON object per cell on stdout instead of the table")
    p.add_argument("--plot", metavar="FILE", help="log-log chart of latency against length (PNG, SVG or PDF)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.impl = [s.strip() for s in args.impl.split(",") if s.strip()]
    for impl in args.impl:
        if impl not in ("eager", "sdpa", "flashattn"):
            p.error(f"unknown --impl {impl!r}: choose from eager, sdpa, flashattn")
    try:
        args.seqlens = [int(s) for s in args.seqlens.split(",")]
    except ValueError:
        p.error(f"--seqlens must be integers, got {args.seqlens!r}")
    if any(n < 1 for n in args.seqlens) or args.batch < 1:
        p.error("--seqlens and --batch must be positive")
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if args.device.type == "cuda" else
                                                        torch.float32)
    return args


def build_model(args, attn_implementation):
    """The model on the device, in the dtype, with the given attention."""
    import transformers

    if args.weights:
        config = transformers.AutoConfig.from_pretrained(args.weights, local_files_only=True)
    else:
        config = transformers.LlamaConfig(**LLAMA_3_2_1B)
    if args.layers:
        config.num_hidden_layers = args.layers
    torch.manual_seed(args.seed)
    with torch.device(args.device):
        if args.weights:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                args.weights, config=config, dtype=args.dtype, local_files_only=True, use_safetensors=True)
        else:
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=args.dtype)
    model.set_attn_implementation(attn_implementation)
    return model.to(args.device)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_cell(step, device, min_time, max_reps):
    """Median seconds of `step` over repeated runs after one warm-up (which also compiles kernels)."""
    step()
    _sync(device)
    times = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < 3 or time.perf_counter() - start < min_time):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), len(times)


def _steps(model, ids, train):
    def prefill():
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)

    def train_step():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()

    return [("prefill", prefill)] + ([("train", train_step)] if train else [])


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def run(args, out=sys.stdout):
    """Times every (implementation, length, pass) cell; returns the results as dicts."""
    import flashattn

    names = {"eager": "eager", "sdpa": "sdpa", "flashattn": flashattn.register_transformers()}
    cells = [(impl, n) for impl in args.impl for n in args.seqlens]
    progress = None
    if not args.no_progress:
        try:
            from tqdm import tqdm

            progress = tqdm(total=len(cells), desc="prefill", file=sys.stderr, leave=False)
        except ImportError:
            pass
    results = []
    for impl in args.impl:
        model = build_model(args, names[impl])
        model.train(args.train)
        for n in args.seqlens:
            if progress:
                progress.set_postfix_str(f"{impl} N={n}")
            g = torch.Generator().manual_seed(args.seed + n)
            ids = torch.randint(0, model.config.vocab_size, (args.batch, n), generator=g).to(args.device)
            for phase, step in _steps(model, ids, args.train):
                row = dict(impl=impl, seqlen=n, batch=args.batch, phase=phase, device=str(args.device),
                           dtype=str(args.dtype).removeprefix("torch."), layers=model.config.num_hidden_layers)
                try:
                    if args.device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(args.device)
                    seconds, reps = time_cell(step, args.device, args.min_time, args.max_reps)
                    row.update(ms=seconds * 1e3, reps=reps)
                    if args.device.type == "cuda":
                        row["peak_gib"] = torch.cuda.max_memory_allocated(args.device) / 2**30
                except Exception as e:  # noqa: BLE001 - out of memory is a result; anything else is re-raised
                    if not _is_oom(e):
                        raise
                    row.update(ms=None, error="out of memory")
                model.zero_grad(set_to_none=True)
                if args.device.type == "cuda":
                    torch.cuda.empty_cache()
                results.append(row)
                if args.json:
                    print(json.dumps(row), file=out, flush=True)
            if progress:
                progress.update(1)
        del model
        if args.device.type == "cuda":
            torch.cuda.empty_cache()
    if progress:
        progress.close()
    return results


def slopes(results):
    """Per (implementation, phase): the least-squares slope of log latency against log length, and the slope of
    its last segment (the two longest lengths measured)."""
    series = {}
    for r in results:
        if r.get("ms"):
            series.setdefault((r["impl"], r["phase"]), []).append((r["seqlen"], r["ms"]))
    fits = {}
    for key, pts in series.items():
        pts.sort()
        if len(pts) < 2:
            continue
        xs = [math.log(n) for n, _ in pts]
        ys = [math.log(ms) for _, ms in pts]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        fit = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        last = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
        fits[key] = dict(fit=fit, last=last)
    return fits


def table(results, fits):
    impls = list(dict.fromkeys(r["impl"] for r in results))
    phases = list(dict.fromkeys(r["phase"] for r in results))
    lens = sorted({r["seqlen"] for r in results})
    cell = {(r["impl"], r["phase"], r["seqlen"]): r for r in results}
    lines = []
    for phase in phases:
        head = f"| {phase} (ms) | " + " | ".join(f"N = {n}" for n in lens) + " | slope (fit / last) |"
        lines += [head, "|" + "---|" * (len(lens) + 2)]
        for impl in impls:
            vals = []
            for n in lens:
                r = cell.get((impl, phase, n))
                vals.append("-" if r is None else ("OOM" if r.get("error") else f"{r['ms']:.1f}"))
            f = fits.get((impl, phase))
            slope = f"{f['fit']:.2f} / {f['last']:.2f}" if f else "-"
            lines.append(f"| {impl} | " + " | ".join(vals) + f" | {slope} |")
        lines.append("")
    return "\n".join(lines)


def plot(results, fits, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    colors = {impl: f"C{i}" for i, impl in enumerate(dict.fromkeys(r["impl"] for r in results))}
    for (impl, phase), f in sorted(fits.items()):
        pts = sorted((r["seqlen"], r["ms"]) for r in results if r["impl"] == impl and r["phase"] == phase
                     and r.get("ms"))
        style = "-" if phase == "prefill" else "--"
        ax.plot([n for n, _ in pts], [ms for _, ms in pts], style, marker="o", color=colors[impl],
                label=f"{impl} {phase} (slope {f['fit']:.2f}, last {f['last']:.2f})")
    lens = sorted({r["seqlen"] for r in results})
    if len(lens) >= 2:
        ref = [r["ms"] for r in results if r.get("ms") and r["seqlen"] == lens[-1]]
        if ref:
            top = max(ref)
            ax.plot(lens, [top * (n / lens[-1]) ** 2 for n in lens], ":", color="gray", label="slope 2")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("latency (ms)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    args = _args(argv)
    where = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "CPU"
    model_name = args.weights or "Llama-3.2-1B shape, random weights"
    print(f"# prefill: {model_name}, batch {args.batch}, {str(args.dtype).removeprefix('torch.')} on {where}",
          file=sys.stderr)
    results = run(args)
    fits = slopes(results)
    if not args.json:
        print(table(results, fits))
    if args.plot:
        plot(results, fits, args.plot, f"{os.path.basename(str(model_name))} prefill on {where}")
        print(f"# chart written to {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
