#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root, with ./stage carried: the GPU tests, the sanitizers, the
# benchmark side by side with PyTorch's scaled_dot_product_attention backends, and the comparison with the
# approximations. Everything lands in $OUT: log.txt (all output), tests.txt, sanitizer.txt, ours.jsonl,
# torch.jsonl, summary.md, results.json, bench.png; cpu.jsonl and cpu_summary.md for the CPU against PyTorch's;
# compare.txt and compare.png for the approximations.
#
# With "python": the Python package's test suite on CUDA tensors (pytest.txt); with "prefill": the model-prefill
# exercise (prefill.md, prefill.jsonl, prefill.png); with "decode": the KV-cache tests (GPU, sanitizers, Python) and
# the decode benchmark beside SDPA's cuDNN and flash backends, as CUDA-graph replays and as eager calls
# (decode_tests.txt, decode_graphs.md/.jsonl, decode.md/.jsonl, decode_cli.txt).
#
# With "caps": the GPU tests and a memcheck under shared-memory caps of 99 and 163 KB (the tile tables of
# consumer GPUs and of the A100), in caps.txt.
#
# Environment: STEPS (default "info tests sanitize bench"; also "ab" (needs ./stage/flashattn-before), "caps", "cpu",
# "compare", "python", "prefill" and "decode" (these three need ./stage/wheels)), SEQLENS, HEAD_DIMS, CASES (property-test cases),
# MIN_TIME, COMPARE_SEQLENS, PREFILL_SEQLENS, PREFILL_ARGS.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PATH=/usr/local/cuda/bin:$PATH
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export FLASHATTN_CACHE_DIR=/tmp/flashattn-cache
# Charts need a TrueType font; matplotlib carries one.
export FLASHATTN_FONT=${FLASHATTN_FONT:-$(python3 -c 'import matplotlib, os; print(os.path.join(matplotlib.get_data_path(), "fonts/ttf/DejaVuSans.ttf"))' 2>/dev/null)}
STEPS=${STEPS:-"info tests sanitize bench"}
SEQLENS=${SEQLENS:-512,1024,2048,4096,8192,16384}
HEAD_DIMS=${HEAD_DIMS:-64,128}
CASES=${CASES:-64}
MIN_TIME=${MIN_TIME:-0.3}
FA=./stage/flashattn
exec > >(tee -a "$OUT/log.txt") 2>&1

step() { case " $STEPS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

if step info; then
    echo "== machine"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
    lscpu | grep -E "Model name|^CPU\(s\)|Flags" | sed 's/Flags:/Flags:/' | cut -c1-2000 | tr ' ' '\n' | grep -E "Model|CPU|avx512f$|avx512_bf16|amx_bf16|amx_tile|avx2$" | tr '\n' ' '; echo
    echo "== cold and warm start (kernel cache)"
    python3 scripts/make_inputs.py /tmp/san 2 300 4 2 128 > /dev/null
    rm -rf "$FLASHATTN_CACHE_DIR"
    for run in cold warm; do
        start=$(date +%s%N)
        $FA run --device cuda --q /tmp/san/q.npy --k /tmp/san/k.npy --v /tmp/san/v.npy --out /tmp/san/o.npy \
            --dout /tmp/san/do.npy --dq /tmp/san/dq.npy > /dev/null
        end=$(date +%s%N)
        echo "$run start: $(( (end - start) / 1000000 )) ms for 'flashattn run' (forward and backward, d=128; compiling its kernels when cold)"
    done
    $FA info
    echo "== compiling every kernel variant into the cache"
    $FA kernels --arch "$($FA info | sed -n 's/.*compute capability \([0-9]\)\.\([0-9]\)).*/sm_\1\2/p' | head -1)" --warm
fi

if step tests; then
    echo "== GPU tests"
    {
        FLASHATTN_TEST_CASES=$CASES ./stage/tests/cuda_flash 2>&1
        echo "== the borrowed device API (caller streams, CUDA graphs, two streams at once, bad views)"
        ./stage/tests/cuda_device_api 2>&1
        echo "== the README's borrowed-API example"
        ./stage/borrowed_stream 2>&1
        echo "== GPU tests with the portable family (the Hopper family is the default on sm_90)"
        FLASHATTN_GPU_KERNELS=portable FLASHATTN_TEST_CASES=$CASES ./stage/tests/cuda_flash 2>&1
        echo "== CPU tests on this machine's CPU"
        FLASHATTN_TEST_CASES=32 ./stage/tests/cpu_flash 2>&1
        ./stage/tests/masks 2>&1
    } | tee "$OUT/tests.txt" | tail -40
fi

if step sanitize; then
    echo "== compute-sanitizer"
    # Head dims 64 and 128: the Hopper backward's two step sizes (128 and 64 queries).
    {
        for d in 64 128; do
            python3 scripts/make_inputs.py /tmp/san$d 2 300 4 2 $d > /dev/null
            for tool in memcheck racecheck; do
                for flags in "" "--causal" "--window 64,16 --softcap 10"; do
                    echo "-- d=$d $tool $flags"
                    compute-sanitizer --tool $tool --error-exitcode 9 $FA run --device cuda --q /tmp/san$d/q.npy --k /tmp/san$d/k.npy --v /tmp/san$d/v.npy \
                        --out /tmp/san$d/o.npy --lse /tmp/san$d/lse.npy --dout /tmp/san$d/do.npy --dq /tmp/san$d/dq.npy --dk /tmp/san$d/dk.npy --dv /tmp/san$d/dv.npy $flags 2>&1 | tail -4
                    echo "exit ${PIPESTATUS[0]}"
                done
            done
        done
        for tool in memcheck racecheck; do
            echo "-- borrowed API: graph capture and two streams, $tool"
            compute-sanitizer --tool $tool --error-exitcode 9 ./stage/tests/cuda_device_api gpu_graph gpu_two_streams 2>&1 | tail -4
            echo "exit ${PIPESTATUS[0]}"
        done
    } | tee "$OUT/sanitizer.txt"
fi

if step caps; then
    echo "== GPU tests under shared-memory caps"
    python3 scripts/make_inputs.py /tmp/cap 2 300 4 2 128 > /dev/null
    {
        for cap in 99 163; do
            echo "-- FLASHATTN_SMEM_LIMIT_KB=$cap"
            FLASHATTN_SMEM_LIMIT_KB=$cap FLASHATTN_TEST_CASES=${CAP_CASES:-48} ./stage/tests/cuda_flash 2>&1 | tail -4
            FLASHATTN_SMEM_LIMIT_KB=$cap ./stage/tests/cuda_device_api 2>&1 | tail -3
            FLASHATTN_SMEM_LIMIT_KB=$cap FLASHATTN_TEST_CASES=64 ./stage/tests/kvcache 2>&1 | tail -3
            for d in 64 128; do
                python3 scripts/make_inputs.py /tmp/cap$d 2 300 4 2 $d > /dev/null
                FLASHATTN_SMEM_LIMIT_KB=$cap compute-sanitizer --tool memcheck --error-exitcode 9 $FA run --device cuda --q /tmp/cap$d/q.npy --k /tmp/cap$d/k.npy --v /tmp/cap$d/v.npy \
                    --out /tmp/cap$d/o.npy --dout /tmp/cap$d/do.npy --dq /tmp/cap$d/dq.npy --causal 2>&1 | tail -2
                echo "memcheck d=$d exit ${PIPESTATUS[0]}"
            done
        done
    } | tee "$OUT/caps.txt"
fi

if step bench; then
    echo "== benchmark: ours"
    : > "$OUT/ours.jsonl"
    for causal in "" "--causal"; do
        $FA bench --device cuda --dtype bf16 --head-dim "$HEAD_DIMS" --seqlen "$SEQLENS" --min-time "$MIN_TIME" $causal --json >> "$OUT/ours.jsonl"
    done
    echo "== benchmark: PyTorch scaled_dot_product_attention"
    PYTHONUNBUFFERED=1 python3 scripts/sdpa_bench.py --head-dims "$HEAD_DIMS" --seqlens "$SEQLENS" > "$OUT/torch.jsonl"
    python3 scripts/compare.py "$OUT/ours.jsonl" "$OUT/torch.jsonl" --out "$OUT"
    cat "$OUT/summary.md"
fi

if step ab; then
    # The same sweep with a second build (./stage/flashattn-before), alternating builds per head dim and mask so
    # that drift in the GPU's clocks falls on both alike.
    echo "== A/B: ./stage/flashattn-before (A) against ./stage/flashattn (B)"
    : > "$OUT/a.jsonl"
    : > "$OUT/b.jsonl"
    for d in ${HEAD_DIMS//,/ }; do
        for causal in "" "--causal"; do
            ./stage/flashattn-before bench --device cuda --dtype bf16 --head-dim "$d" --seqlen "$SEQLENS" --min-time "$MIN_TIME" $causal --json >> "$OUT/a.jsonl"
            $FA bench --device cuda --dtype bf16 --head-dim "$d" --seqlen "$SEQLENS" --min-time "$MIN_TIME" $causal --json >> "$OUT/b.jsonl"
        done
    done
    python3 scripts/ab_compare.py "$OUT/a.jsonl" "$OUT/b.jsonl" | tee "$OUT/ab.md"
fi

if step cpu; then
    echo "== CPU: flash attention on this machine's CPU, side by side with PyTorch's CPU attention"
    : > "$OUT/cpu.jsonl"
    for threads in $(nproc) 2; do
        for cfg in "f32 64" "bf16 128"; do
            set -- $cfg
            $FA --threads "$threads" bench --device cpu --dtype "$1" --head-dim "$2" --heads 16 --batch 1 \
                --seqlen 1024,4096 --impl flash --json >> "$OUT/cpu.jsonl"
            python3 scripts/sdpa_cpu_bench.py --threads "$threads" --dtype "$1" --head-dim "$2" --seqlens 1024,4096 >> "$OUT/cpu.jsonl"
        done
    done
    python3 scripts/cpu_summary.py "$OUT/cpu.jsonl" | tee "$OUT/cpu_summary.md"
fi

if step compare; then
    echo "== exact attention against Linformer and Performer"
    {
        $FA compare --device cuda --seqlen "${COMPARE_SEQLENS:-1024,2048,4096,8192,16384,32768,65536}" --heads 16 --linformer-k 64,256 --performer-m 64,256 --min-time 0.2 --plot "$OUT/compare.png"
        $FA compare --device cuda --seqlen "${COMPARE_SEQLENS:-1024,2048,4096,8192,16384,32768,65536}" --heads 16 --performer-m 64,256 --min-time 0.2 --causal --plot "$OUT/compare_causal.png"
        $FA compare --device cuda --seqlen 4096 --heads 16 --linformer-k 16,64,256,1024 --performer-m 16,64,256,1024 --scale 0.03 --pass fwd --min-time 0.2
    } 2>&1 | tee "$OUT/compare.txt"
fi

if step python || step prefill || step decode; then
    # The wheel into a folder of its own (the machine's torch and transformers stay as they are).
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/flashattn-py ./stage/wheels/*.whl
    export PYTHONPATH=/tmp/flashattn-py:${PYTHONPATH:-}
    python3 -c 'import flashattn, torch; print("flashattn", flashattn.__version__, "torch", torch.__version__); print(flashattn.info())'
fi

if step python; then
    echo "== Python package tests (CUDA and CPU tensors, torch.compile, transformers, SDPA override)"
    PYTHONUNBUFFERED=1 python3 -m pytest -q -p no:cacheprovider python/tests 2>&1 | tee "$OUT/pytest.txt" | tail -30
fi

if step prefill; then
    echo "== the model-prefill exercise"
    PYTHONUNBUFFERED=1 python3 -m flashattn.prefill --impl eager,sdpa,flashattn --seqlens "${PREFILL_SEQLENS:-512,4096,32768}" \
        --no-progress --json --plot "$OUT/prefill.png" ${PREFILL_ARGS:---train} > "$OUT/prefill.jsonl"
    python3 -c '
import json, sys
from flashattn import prefill
rows = [json.loads(l) for l in open(sys.argv[1])]
print(prefill.table(rows, prefill.slopes(rows)))' "$OUT/prefill.jsonl" | tee "$OUT/prefill.md"
fi

if step decode; then
    echo "== KV-cache attention: GPU tests, sanitizers, Python tests"
    {
        FLASHATTN_TEST_CASES=${DECODE_CASES:-300} ./stage/tests/kvcache 2>&1 | tail -8
        for tool in memcheck racecheck; do
            echo "-- $tool"
            FLASHATTN_TEST_CASES=4 compute-sanitizer --tool $tool --error-exitcode 9 ./stage/tests/kvcache gpu_ long_ 2>&1 | tail -4
            echo "exit ${PIPESTATUS[0]}"
        done
        PYTHONUNBUFFERED=1 python3 -m pytest -q -p no:cacheprovider python/tests/test_kvcache.py 2>&1 | tail -5
    } | tee "$OUT/decode_tests.txt"
    echo "== decode benchmark"
    PYTHONUNBUFFERED=1 python3 scripts/decode_bench.py --graphs ${DECODE_ARGS:-} --out "$OUT/decode_graphs.jsonl" | tee "$OUT/decode_graphs.md"
    PYTHONUNBUFFERED=1 python3 scripts/decode_bench.py ${DECODE_ARGS:-} --out "$OUT/decode.jsonl" | tee "$OUT/decode.md"
    {
        $FA bench --device cuda --seqlen-q 1 --heads 32 --heads-kv 8 --head-dim 128 --batch 1 --seqlen 2048,32768,131072 --min-time 0.2
        $FA bench --device cuda --seqlen-q 1 --heads 32 --heads-kv 8 --head-dim 128 --batch 64 --seqlen 4096 --paged 16 --min-time 0.2
    } 2>&1 | tee "$OUT/decode_cli.txt"
fi
