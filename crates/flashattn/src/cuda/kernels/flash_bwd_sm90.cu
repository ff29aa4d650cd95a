// Flash backward for Hopper (sm_90a), by recomputation from the saved log-sum-exp, FlashAttention-3 design.
//
// One CTA per BLOCK_N (128) keys of one (batch, key/value head), three warpgroups:
// - the producer warpgroup loads: one thread brings K and V in once, then Q and dO of each step (a query block of
//   one query head of the group) into a STAGES-deep ring by TMA; one warp copies the step's log-sum-exp and
//   D = rowsum(dO * O) next to them. Each stage has a "full" mbarrier (the copy engine's bytes and the warp's 32
//   arrivals) and an "empty" one (one arrival per consumer warp);
// - two consumer warpgroups compute, each owning 64 of the keys and holding their dK and dV in registers:
//   S^T = K Q^T and dP^T = V dO^T (wgmma, both operands in shared memory), P^T = exp2(S^T - lse),
//   dS^T = P^T (dP^T - D) * dscore, dV += P^T dO and dK += dS^T Q (wgmma with P^T, dS^T from registers; with
//   64-query steps P^T is computed under dP^T and dS^T under dV), then
//   dS^T through shared memory (double-buffered, both warpgroups' halves, handed over by mbarriers) for
//   dQ = dS K, computed one step later, which each warp adds to the f32 dQ accumulator by TMA (reduce-add of
//   its 16 rows, staged in shared memory; in deterministic mode key blocks add in order, through a counter per
//   query block).
// dQ = dS K is split between the consumers by query rows when a step has 128 of them, else by halves of the
// columns (DQ_N of them each).
//
// Shared tiles of 16-bit elements are slabs in the 128-byte swizzle of TMA and wgmma (hopper.cuh). dS^T is stored
// as keys x queries, queries contiguous: the transposed (MN-major) A operand of dQ = dS K, whose B operand, K, is
// read transposed too. The dQ staging is, per warp, DQ_N / 32 boxes of 16 rows x 32 f32 columns (2048 bytes, the
// same swizzle), as the f32 map of the accumulator reads them.
//
// Defines: HDIM (64 or 128: the head dim rounded up), BLOCK_N (keys per CTA: 128), BLOCK_M (queries per step: 64
// or 128), DQ_N, STAGES, IS_MASKED, HAS_MOD, SMEM_BYTES (the shared memory the host allocates); WGMMA_SS
// (N = BLOCK_M), WGMMA_RS (N = HDIM) and WGMMA_TT (N = DQ_N, both operands transposed), generated (wgmma.cuh).

#include "common.cuh"
#include "hopper.cuh"
#include "wgmma.cuh"
#include "bwd_common.cuh"

#define NTHREADS 384
#define KV_BYTES (BLOCK_N * HDIM * 2)
#define QT_BYTES (BLOCK_M * HDIM * 2)            // a Q or dO tile
#define DS_BYTES (BLOCK_N * BLOCK_M * 2)
#define S_REGS (BLOCK_M / 2)                     // f32 accumulators of S^T (and dP^T) per thread
#define ACC_REGS (HDIM / 2)                      // ... of dK (and dV)
#define DQ_SPLIT_M (DQ_N == HDIM)                // consumers split dQ by rows (else by columns)
#define DQ_WARP_BYTES (16 * DQ_N * 4)            // a warp's 16 rows of dQ in f32: boxes of 16 rows x 32 columns
// Issue dV += P^T dO before computing dS^T (which then runs under it): P^T, dS^T and dP^T are live at once, which
// fits the registers with 64-query steps only (at 128 ptxas spills, and it was 10% slower).
#define EARLY_DV (BLOCK_M == 64)
#define RELEASES 8                               // one arrival per consumer warp frees a stage or dS^T buffer
#define STATS_ARRIVALS 33                        // the TMA thread's and the statistics warp's
#define PRODUCER_REGS 24
#define CONSUMER_REGS 240
static_assert((BLOCK_M == 64 || BLOCK_M == 128) && DQ_SPLIT_M == (BLOCK_M == 128), "unsupported step size");
static_assert(BLOCK_N == 128, "two consumers of 64 keys each");

// ---------------------------------------------------------------------------------------------------------------
// The CTA's keys and the steps that see them: query blocks [m_lo, m_lo + num_m) of each query head of the group.
struct KeyBlock {
    int b, hk, n0, group, m_lo, num_m, steps;
    Seq seq;
    Mask mask;
    DEVICE int head(int st) const { return hk * group + st / num_m; }
    DEVICE int m0(int st) const { return (m_lo + st % num_m) * BLOCK_M; }
};

DEVICE KeyBlock key_block(const AttnParams &p) {
    KeyBlock kb;
    // Deterministic mode takes key blocks from the last: a query block's dQ additions run from its last key block
    // down (under a causal mask the last is the first to reach it), and a CTA then waits only for CTAs launched
    // before it.
    const KeyTile tile = key_tile(p, p.deterministic);
    kb.b = tile.b;
    kb.hk = tile.hk;
    kb.n0 = tile.n_block * BLOCK_N;
    kb.group = p.heads_q / p.heads_kv;
    kb.seq = sequence(p, kb.b);
    kb.mask = make_mask(p, kb.seq);
    const int2 blocks = query_blocks(kb.mask, kb.seq, kb.n0, BLOCK_N, BLOCK_M);
    kb.m_lo = blocks.x;
    kb.num_m = max(0, blocks.y - blocks.x);
    kb.steps = kb.num_m * kb.group;
    return kb;
}

// Deterministic mode: the counter of the dQ additions to step st's query block (one per batch, head and query
// block). Key blocks add in order, from the last, each as its 8 consumer warps finish.
DEVICE int *dq_turns(const AttnParams &p, const KeyBlock &kb, int st, int h) {
    const int num_m = (p.seqlen_q + BLOCK_M - 1) / BLOCK_M;
    return p.dq_semaphore + ((long long)kb.b * p.heads_q + h) * num_m + kb.m0(st) / BLOCK_M;
}

DEVICE int ld_acquire(const int *at) {
    int v;
    asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(v) : "l"(at) : "memory");
    return v;
}

// Waits until the warps of the key blocks after this one (up to the last that step st's query block sees) have
// added their dQ: each counts itself in when done (the warps of one block add to different rows or columns, in
// any order).
DEVICE void wait_turn(const AttnParams &p, const KeyBlock &kb, int st, int h) {
    const int m0 = kb.m0(st), last = (kb.mask.hi(min(m0 + BLOCK_M, kb.seq.len_q)) - 1) / BLOCK_N;
    const int before = (last - kb.n0 / BLOCK_N) * RELEASES;
    const int *turns = dq_turns(p, kb, st, h);
    while (ld_acquire(turns) < before) {
    }
    asm volatile("fence.proxy.async.global;\n" ::: "memory");
}

// ---------------------------------------------------------------------------------------------------------------
// Shared memory: K, V, the Q and dO rings, two dS^T buffers, the consumers' dQ staging tiles, the statistics
// ring (lse and D per stage), the mbarriers (K and V; full and empty per stage and per dS^T buffer).
struct Smem {
    // Byte offsets from the aligned start, and the end of the layout (the mbarriers: K and V, 2 per stage, 2 per
    // dS^T buffer).
    static constexpr u32 V_AT = KV_BYTES;
    static constexpr u32 Q_AT = V_AT + KV_BYTES;
    static constexpr u32 DOUT_AT = Q_AT + STAGES * QT_BYTES;
    static constexpr u32 DS_AT = DOUT_AT + STAGES * QT_BYTES;
    static constexpr u32 DQ_AT = DS_AT + 2 * DS_BYTES;
    static constexpr u32 STATS_AT = DQ_AT + 8 * DQ_WARP_BYTES;
    static constexpr u32 BARS_AT = STATS_AT + STAGES * 2 * BLOCK_M * 4;
    static constexpr u32 END = BARS_AT + 8 + 16 * STAGES + 16 * 2;
    u32 k, v, q, dout, ds, dq, stats, bars;
    DEVICE Smem(const void *raw) {
        k = (smem_addr(raw) + 1023) & ~1023u;
        v = k + V_AT;
        q = k + Q_AT;
        dout = k + DOUT_AT;
        ds = k + DS_AT;
        dq = k + DQ_AT;
        stats = k + STATS_AT;
        bars = k + BARS_AT;
    }
    DEVICE u32 lse(int stage) const { return stats + stage * 2 * BLOCK_M * 4; }
    DEVICE u32 delta(int stage) const { return lse(stage) + BLOCK_M * 4; }
    DEVICE u32 kv_full() const { return bars; }
    DEVICE u32 full(int s) const { return bars + 8 + 16 * s; }
    DEVICE u32 empty(int s) const { return bars + 16 + 16 * s; }
    DEVICE u32 ds_full(int buf) const { return bars + 8 + 16 * STAGES + 16 * buf; }
    DEVICE u32 ds_empty(int buf) const { return bars + 16 + 16 * STAGES + 16 * buf; }
};
// The host allocates SMEM_BYTES: the layout and up to 1024 bytes of alignment before it.
static_assert(1024 + Smem::END <= SMEM_BYTES, "shared memory: the layout outgrew the host's SMEM_BYTES (Variant::smem_bytes)");

// The TMA thread: K and V once, then each step's Q and dO.
DEVICE void produce(const AttnParams &p, const TmaMap &tq, const TmaMap &tk, const TmaMap &tv, const TmaMap &tdo,
                    const Smem &sm, const KeyBlock &kb) {
    const int bq = map_batch(p, kb.b);
    mbar_expect_tx(sm.kv_full(), 2 * KV_BYTES);
    tma_tile(sm.k, BLOCK_N, tk, kb.seq.start_k + kb.n0, kb.hk, bq, sm.kv_full());
    tma_tile(sm.v, BLOCK_N, tv, kb.seq.start_k + kb.n0, kb.hk, bq, sm.kv_full());
    for (int st = 0; st < kb.steps; ++st) {
        const int stage = st % STAGES, row = kb.seq.start_q + kb.m0(st), h = kb.head(st);
        mbar_wait(sm.empty(stage), ((st / STAGES) & 1) ^ 1);
        mbar_expect_tx(sm.full(stage), 2 * QT_BYTES);
        tma_tile(sm.q + stage * QT_BYTES, BLOCK_M, tq, row, h, bq, sm.full(stage));
        tma_tile(sm.dout + stage * QT_BYTES, BLOCK_M, tdo, row, h, bq, sm.full(stage));
    }
}

// The statistics warp: each step's lse (in log2 units; +inf for rows past the sequence or that saw no key, so
// that they pass no gradient) and D. This is `step_stats` (bwd_common.cuh) written out: called here, it makes
// the 24-register producer spill 4 bytes (d = 64 with a score modifier).
DEVICE void load_stats(const AttnParams &p, const Smem &sm, const KeyBlock &kb) {
    const int lane = threadIdx.x % 32;
    for (int st = 0; st < kb.steps; ++st) {
        const int stage = st % STAGES, m0 = kb.m0(st), h = kb.head(st);
        mbar_wait(sm.empty(stage), ((st / STAGES) & 1) ^ 1);
        for (int r = lane; r < BLOCK_M; r += 32) {
            const int i = m0 + r;
            const long long at = kb.b * p.lse_batch + h * p.lse_head + kb.seq.start_q + i;
            const float l = i < kb.seq.len_q ? p.lse[at] : NEG_INF;
            st_shared_f32(sm.lse(stage) + 4 * r, l == NEG_INF ? POS_INF : l * LOG2E);
            st_shared_f32(sm.delta(stage) + 4 * r, i < kb.seq.len_q ? p.delta[at] : 0.f);
        }
        mbar_arrive(sm.full(stage));
    }
}

// A consumer warpgroup: c owns keys [64c, 64c + 64) of the block; a thread holds keys r and r + 8.
DEVICE void consume(const AttnParams &p, const TmaMap &tdq, const Smem &sm, const KeyBlock &kb) {
    const int c = warpgroup() - 1, t = threadIdx.x % 128;
    const int warp = t / 32, lane = t % 32;
    // Operand descriptors: a base per tile plus a compile-time offset per k step (16-byte units).
    // S^T, dP^T: A = this consumer's K or V rows, B = Q or dO, both K-major (k steps along the head dim).
    const u64 k_a = smem_desc(sm.k + c * SLAB(64), 16, 1024), v_a = smem_desc(sm.v + c * SLAB(64), 16, 1024);
    const u64 q_b = smem_desc(sm.q, 16, 1024), do_b = smem_desc(sm.dout, 16, 1024);
    // dV, dK: B = dO or Q transposed (k steps along the queries).
    const u64 do_t = smem_desc(sm.dout, SLAB(BLOCK_M), 1024), q_t = smem_desc(sm.q, SLAB(BLOCK_M), 1024);
    // dQ: A = dS transposed (this consumer's 64 queries, or all), B = K transposed (all its columns, or a half).
    const u64 ds_t = smem_desc(sm.ds + (DQ_SPLIT_M ? c * SLAB(BLOCK_N) : 0), SLAB(BLOCK_N), 1024);
    const int dq_col = DQ_SPLIT_M ? 0 : c * DQ_N;
    const u64 k_t = smem_desc(sm.k + (dq_col / 64) * SLAB(BLOCK_N) + (dq_col % 64) * 2, SLAB(BLOCK_N), 1024);

    const int key_lo = kb.n0 + 64 * c;  // first key of this warpgroup
    const int r0 = 64 * c + 16 * warp + lane / 4;  // this thread's first key row in the block
    float dv[ACC_REGS], dk[ACC_REGS];
#pragma unroll
    for (int i = 0; i < ACC_REGS; ++i) dv[i] = dk[i] = 0.f;
    const u32 staging = sm.dq + (4 * c + warp) * DQ_WARP_BYTES;  // this warp's dQ rows, 1024-byte aligned

    // dQ = dS K of step st, through the staging boxes (free once the last reductions have read them; 128-byte
    // swizzled, as the map reads them) to one TMA reduce-add per box. A warp holds 16 rows of dQ and adds them
    // itself: the staging needs only warp-level synchronization. Rows past a sequence's end are exact zeros (their
    // probabilities are), so adding them is harmless; past the tensor's end TMA drops them.
    auto dq_step = [&](int st) {
        const int buf = st & 1, h = kb.head(st);
        const u64 ds = desc_plus(ds_t, buf * DS_BYTES);
        mbar_wait(sm.ds_full(buf), (st / 2) & 1);
        float dq[DQ_N / 2];
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < BLOCK_N / 16; ++kk) WGMMA_TT(dq, mnmajor(ds, kk), mnmajor(k_t, kk), kk > 0);
        wgmma_commit();
        wgmma_wait<0>();
        reg_fence(dq);
        if (lane == 0) mbar_arrive(sm.ds_empty(buf));
        if (lane == 0) bulk_wait_read();
        __syncwarp();
#pragma unroll
        for (int i = 0; i < DQ_N / 2; i += 2) {
            const int row = lane / 4 + 8 * ((i / 2) % 2), col = 8 * (i / 4) + 2 * (lane % 4);
            st_shared_f2(SWIZZLED(staging + (col / 32) * SLAB(16), row, (col % 32) / 4) + (col % 4) * 4, dq[i], dq[i + 1]);
        }
        fence_proxy_async();
        __syncwarp();
        if (lane == 0) {
            const int row = kb.seq.start_q + kb.m0(st) + (DQ_SPLIT_M ? 64 * c : 0) + 16 * warp;
            if (p.deterministic) wait_turn(p, kb, st, h);
#pragma unroll
            for (int box = 0; box < DQ_N / 32; ++box) {
                tma_reduce_add(tdq, staging + box * SLAB(16), dq_col + 32 * box, row, h, map_batch(p, kb.b));
            }
            bulk_commit();
            if (p.deterministic) {
                bulk_wait_all();  // the additions are done
                asm volatile("fence.proxy.async.global;\n" ::: "memory");
                __threadfence();
                atomicAdd(dq_turns(p, kb, st, h), 1);
            }
        }
        __syncwarp();  // the warp goes on to warpgroup-wide instructions together
    };

    mbar_wait(sm.kv_full(), 0);
    for (int st = 0; st < kb.steps; ++st) {
        const int stage = st % STAGES, m0 = kb.m0(st), h = kb.head(st);
        const float slope = (HAS_MOD && p.alibi) ? p.alibi[kb.b * p.alibi_batch_stride + h] : 0.f;
        mbar_wait(sm.full(stage), (st / STAGES) & 1);

        // This stage's Q and dO, read K-major (S^T, dP^T) and transposed (dK, dV).
        const u64 q = desc_plus(q_b, stage * QT_BYTES), dout = desc_plus(do_b, stage * QT_BYTES);
        const u64 qt = desc_plus(q_t, stage * QT_BYTES), dout_t = desc_plus(do_t, stage * QT_BYTES);
        float s[S_REGS], dp[S_REGS];
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < HDIM / 16; ++kk) WGMMA_SS(s, kmajor(k_a, BLOCK_N, kk), kmajor(q, BLOCK_M, kk), kk > 0);
        wgmma_commit();
#pragma unroll
        for (int kk = 0; kk < HDIM / 16; ++kk) WGMMA_SS(dp, kmajor(v_a, BLOCK_N, kk), kmajor(dout, BLOCK_M, kk), kk > 0);
        wgmma_commit();

        // The lse and D of the two query columns this thread holds in 8-query tile q8.
        auto lse_pair = [&](int q8) { return ld_shared_f2(sm.lse(stage) + 4 * (8 * q8 + 2 * (lane % 4))); };
        auto delta_pair = [&](int q8) { return ld_shared_f2(sm.delta(stage) + 4 * (8 * q8 + 2 * (lane % 4))); };

        // P^T and d score / d (q.k) of the thread's four elements of 8-query tile q8: `probability` (bwd_common.cuh)
        // written out, since called here it added 56-120 instructions to the masked variants and the backward
        // measured 1-2% slower.
        const bool need_mask = !kb.mask.full(m0, m0 + BLOCK_M, key_lo, key_lo + 64);
        auto probabilities = [&](int q8, float(&pr)[4], float(&dscore)[4]) {
            const int col = 8 * q8 + 2 * (lane % 4);
            const float2 lse2 = lse_pair(q8);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int i = m0 + col + e % 2, j = kb.n0 + r0 + 8 * (e / 2);
                const float lse = e % 2 ? lse2.y : lse2.x;
                float x = s[4 * q8 + e];
                dscore[e] = p.scale;
                if (HAS_MOD) {
                    x = score_mod(p, slope, i + kb.mask.shift - j, x, &dscore[e]);
                    pr[e] = fast_exp2(x * LOG2E - lse);
                } else {
                    pr[e] = fast_exp2(x * p.scale_log2 - lse);
                }
                if (need_mask & !kb.mask.visible(i, j)) pr[e] = 0.f;
            }
        };
        // P^T and dS^T = P^T (dP^T - D) dscore as 16-bit pairs: the A operand layout of wgmma is the
        // accumulator's.
        u32 pk[S_REGS / 2], dsk[S_REGS / 2];
        auto issue_dv = [&]() {
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < BLOCK_M / 16; ++kk) {
                WGMMA_RS(dv, pk[4 * kk], pk[4 * kk + 1], pk[4 * kk + 2], pk[4 * kk + 3], mnmajor(dout_t, kk), 1);
            }
            wgmma_commit();
        };
        if (EARLY_DV) {
            // P^T under dP^T, then dS^T under dV += P^T dO; s keeps P^T dscore in between.
            wgmma_wait<1>();
            reg_fence(s);
#pragma unroll
            for (int q8 = 0; q8 < BLOCK_M / 8; ++q8) {
                float pr[4], dscore[4];
                probabilities(q8, pr, dscore);
                pk[2 * q8] = pack2(pr[0], pr[1]);
                pk[2 * q8 + 1] = pack2(pr[2], pr[3]);
#pragma unroll
                for (int e = 0; e < 4; ++e) s[4 * q8 + e] = pr[e] * dscore[e];
            }
            issue_dv();
            wgmma_wait<1>();
            reg_fence(dp);
#pragma unroll
            for (int q8 = 0; q8 < BLOCK_M / 8; ++q8) {
                const float2 d2 = delta_pair(q8);
#pragma unroll
                for (int e = 0; e < 4; ++e) dp[4 * q8 + e] = s[4 * q8 + e] * (dp[4 * q8 + e] - (e % 2 ? d2.y : d2.x));
            }
        } else {
            // Both at once, with fewer registers live.
            wgmma_wait<0>();
            reg_fence(s);
            reg_fence(dp);
#pragma unroll
            for (int q8 = 0; q8 < BLOCK_M / 8; ++q8) {
                float pr[4], dscore[4];
                probabilities(q8, pr, dscore);
                const float2 d2 = delta_pair(q8);
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    s[4 * q8 + e] = pr[e];
                    dp[4 * q8 + e] = pr[e] * (dp[4 * q8 + e] - (e % 2 ? d2.y : d2.x)) * dscore[e];
                }
            }
#pragma unroll
            for (int i = 0; i < S_REGS / 2; ++i) pk[i] = pack2(s[2 * i], s[2 * i + 1]);
            issue_dv();
        }
#pragma unroll
        for (int i = 0; i < S_REGS / 2; ++i) dsk[i] = pack2(dp[2 * i], dp[2 * i + 1]);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < BLOCK_M / 16; ++kk) {
            WGMMA_RS(dk, dsk[4 * kk], dsk[4 * kk + 1], dsk[4 * kk + 2], dsk[4 * kk + 3], mnmajor(qt, kk), 1);
        }
        wgmma_commit();

        // dS^T (keys x queries, swizzled) to this step's buffer, once both consumers' dQ products of step st - 2
        // are done with it; then dQ of the previous step, whose dS^T halves are both in by now (a step later,
        // so that the consumers need not meet: they drift apart and their elementwise passes interleave).
        const int buf = st & 1;
        mbar_wait(sm.ds_empty(buf), ((st / 2) & 1) ^ 1);
#pragma unroll
        for (int i = 0; i < S_REGS / 2; ++i) {
            const int r = r0 + 8 * (i % 2), q = 8 * (i / 2) + 2 * (lane % 4);
            const u32 at = sm.ds + buf * DS_BYTES + (q / 64) * SLAB(BLOCK_N) + r * 128 +
                           ((((q % 64) / 8) ^ (r % 8)) * 16) + (q % 8) * 2;
            st_shared(at, dsk[i]);
        }
        fence_proxy_async();
        mbar_arrive(sm.ds_full(buf));
        if (st > 0) {
            dq_step(st - 1);  // waits for every product in flight
        } else {
            wgmma_wait<0>();
            __syncwarp();  // as dq_step does: every lane's reads of the stage before lane 0 releases it (H-6)
        }
        reg_fence(dv);
        reg_fence(dk);
        reg_fence(pk);
        reg_fence(dsk);
        if (lane == 0) mbar_arrive(sm.empty(stage));  // Q, dO and the statistics of this stage are free
    }
    if (kb.steps > 0) dq_step(kb.steps - 1);
    if (lane == 0) bulk_wait_all();

    // dK and dV of this warpgroup's keys.
    const long long base = kb.b * p.dk_batch + kb.hk * p.dk_head;  // batch strides are 0 when varlen
#pragma unroll
    for (int i = 0; i < ACC_REGS; i += 2) {
        const int r = r0 + 8 * ((i / 2) % 2), col = 8 * (i / 4) + 2 * (lane % 4);
        const int key = kb.n0 + r;
        if (key < kb.seq.len_k && col < p.head_dim) {
            const long long at = base + (long long)(kb.seq.start_k + key) * p.dk_row + col;
            *(u32 *)(p.dk + at) = pack2(dk[i], dk[i + 1]);
            *(u32 *)(p.dv + at) = pack2(dv[i], dv[i + 1]);
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
extern "C" __global__ void __launch_bounds__(NTHREADS, 1)
    flash_bwd_sm90(const __grid_constant__ AttnParams p, const __grid_constant__ TmaMap tq,
                   const __grid_constant__ TmaMap tk, const __grid_constant__ TmaMap tv,
                   const __grid_constant__ TmaMap tdo, const __grid_constant__ TmaMap tdq) {
    extern __shared__ unsigned char smem_raw[];
    const Smem sm(smem_raw);
    const KeyBlock kb = key_block(p);
    if (kb.n0 >= kb.seq.len_k) return;  // past a short sequence's keys
    if (threadIdx.x == 0) {
        mbar_init(sm.kv_full(), 1);
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(sm.full(s), STATS_ARRIVALS);
            mbar_init(sm.empty(s), RELEASES);
        }
        for (int buf = 0; buf < 2; ++buf) {
            mbar_init(sm.ds_full(buf), 256);  // every consumer thread's part of dS^T
            mbar_init(sm.ds_empty(buf), RELEASES);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    if (threadIdx.x < 128) {
        setmaxnreg_dec<PRODUCER_REGS>();
        if (threadIdx.x == 0) produce(p, tq, tk, tv, tdo, sm, kb);
        if (threadIdx.x / 32 == 1) load_stats(p, sm, kb);
    } else {
        setmaxnreg_inc<CONSUMER_REGS>();
        consume(p, tdq, sm, kb);
    }
}
