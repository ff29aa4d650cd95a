#!/usr/bin/env bash
# Kernel tuning on the GPU machine: benchmarks tile configurations (FLASHATTN_FWD_TILES / FLASHATTN_BWD_TILES)
# side by side in one run and prints a table of TFLOP/s. Usage: tune.sh "fwd:128,64,32,4 bwd:32,8,1 ..."
# Environment: HEAD_DIMS (64,128), SEQLEN (4096), MIN_TIME (0.3).
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export FLASHATTN_CACHE_DIR=${FLASHATTN_CACHE_DIR:-/tmp/flashattn-cache}
FA=./stage/flashattn
printf "%-5s %-16s %5s %-6s %8s\n" pass tiles d causal TFLOP/s | tee -a "$OUT/tune.txt"
for config in $1; do
    pass=${config%%:*}
    tiles=${config#*:}
    for d in ${HEAD_DIMS:-64 128}; do
        for causal in "" "--causal"; do
            if [ "$pass" = fwd ]; then export FLASHATTN_FWD_TILES=$tiles; unset FLASHATTN_BWD_TILES; else export FLASHATTN_BWD_TILES=$tiles; unset FLASHATTN_FWD_TILES; fi
            tf=$($FA bench --device cuda --head-dim "$d" --seqlen "${SEQLEN:-4096}" --pass "$pass" --min-time "${MIN_TIME:-0.3}" $causal --json 2>"$OUT/tune.err" |
                python3 -c 'import json,sys; r=[json.loads(l) for l in sys.stdin if l.startswith("{")]; print(" ".join("%.0f" % x["tflops"] for x in r if x["impl"] == "flash-cuda"))')
            [ -n "$tf" ] || tf="error: $(tail -1 "$OUT/tune.err")"
            printf "%-5s %-16s %5s %-6s %8s\n" "$pass" "$tiles" "$d" "${causal:+yes}" "$tf" | tee -a "$OUT/tune.txt"
        done
    done
done
