#!/usr/bin/env bash
# Nsight Compute profile of one forward (the Hopper kernel on sm_90) and one backward launch (head dim $1,
# N = $2, default 128 and 4096): speed of light, occupancy, scheduler and warp-state statistics and the stall
# reasons, into $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-} PATH=/usr/local/cuda/bin:$PATH
export FLASHATTN_CACHE_DIR=${FLASHATTN_CACHE_DIR:-/tmp/flashattn-cache}
D=${1:-128}
N=${2:-4096}
SECTIONS="--section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section InstructionStats"
STALLS=$(printf 'smsp__pcsamp_warps_issue_stalled_%s,' barrier long_scoreboard short_scoreboard math_pipe_throttle wait mio_throttle lg_throttle selected not_selected dispatch_stall branch_resolving no_instructions membar)
for pass in fwd bwd; do
    timeout 200 ncu --clock-control none --kernel-name "regex:^flash_${pass}(_sm90)?\$" --launch-count 1 $SECTIONS --metrics "${STALLS%,}" \
        ./stage/flashattn bench --device cuda --head-dim "$D" --seqlen "$N" --pass "$pass" --min-time 0 > "$OUT/ncu_$pass.txt" 2>&1
    echo "== $pass"
    grep -E "pcsamp|Duration|Issued Warp|Eligible Warps|Compute \(SM\)|L1/TEX Cache|L2 Cache Throughput" "$OUT/ncu_$pass.txt"
done
