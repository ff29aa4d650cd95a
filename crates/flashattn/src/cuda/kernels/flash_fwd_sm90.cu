// Flash forward for Hopper (sm_90a), FlashAttention-3 design.
//
// A persistent CTA of three warpgroups takes (query block, head, batch) tiles from a list, one at a time, the
// next from a global counter (so no SM idles while another holds a long causal tile):
// - the producer warpgroup only loads: one thread issues TMA copies of Q (once per tile) and of K and V blocks
//   into a STAGES-deep shared-memory ring, each stage guarded by a "full" mbarrier (the copy engine completes
//   it with the bytes it wrote) and an "empty" one (the consumers release the stage);
// - CONSUMERS (2 or 3) consumer warpgroups compute, each owning 64 query rows: S = Q K^T as a wgmma with both
//   operands in shared memory, the online softmax in registers, and O += P V as a wgmma with P from registers.
// setmaxnreg moves registers from the producer to the consumers. Inside a consumer, the softmax of key block j
// runs while the tensor cores do P V of block j-1: step j issues Q K(j)^T, then P(j-1) V(j-1), waits only for the
// first, and does the softmax before waiting for the second. Each consumer warp writes its 16 rows of O through
// staging boxes in shared memory and TMA stores (O_STAGING): boxes of its own beside Q and the ring where there is
// room for them, else its own rows of the Q tile, which it then holds until the stores have read them.
// Three consumers store O straight from their registers.
//
// Shared tiles use the 128-byte swizzle of both TMA and wgmma: a tile of R rows is HDIM / 64 slabs of R rows x 64
// columns (128 bytes per row), each slab 1024-byte aligned.
//
// Defines: HDIM (64, 128, 192 or 256: the head dim rounded up; TMA zero-fills the columns past it), CONSUMERS,
// BLOCK_N, STAGES, CLUSTER (CTAs sharing each K/V load), O_STAGING (0: none, 1: boxes beside the ring, 2: in the
// Q tile), LAZY_RESCALE (see softmax), WAIT_AFTER_SOFTMAX (see the loop), IS_MASKED, HAS_MOD, SMEM_BYTES (the
// shared memory the host allocates); WGMMA_SS (N = BLOCK_N) and WGMMA_RS (N = HDIM), generated (wgmma.cuh).

#include "common.cuh"
#include "hopper.cuh"
#include "wgmma.cuh"

#define BLOCK_M (64 * CONSUMERS)
#define NTHREADS (128 * (CONSUMERS + 1))
#define Q_BYTES (BLOCK_M * HDIM * 2)
#define KV_BYTES (BLOCK_N * HDIM * 2)
#define S_REGS (BLOCK_N / 2)                     // f32 accumulators of S per thread
#define O_REGS (HDIM / 2)                        // ... of O
#define O_WARP_BYTES (16 * HDIM * 2)             // a warp's O staging (16 rows)
#define STAGE_O (O_STAGING > 0)
#define O_IN_Q (O_STAGING == 2)                  // Q is released after the epilogue, not after the last Q K^T
#define O_BOX_STRIDE (O_IN_Q ? SLAB(BLOCK_M) : SLAB(16))  // from one of a warp's staging boxes to the next
#define RELEASES (CONSUMERS * 4)                 // one arrival per consumer warp frees Q
#define KV_RELEASES (RELEASES * CLUSTER)         // ... and a K or V stage, in every CTA of the cluster
#if CLUSTER > 1 && IS_MASKED
#error "a cluster's CTAs read the same key blocks: no per-tile key ranges"
#endif
// Registers per thread after reallocation: producer and consumers share the 64K of the SM.
#define PRODUCER_REGS (CONSUMERS == 2 ? 40 : 32)
#define CONSUMER_REGS (CONSUMERS == 2 ? 232 : 160)

// ---------------------------------------------------------------------------------------------------------------
// The tile list: heads (with batches) in groups of `group_heads`, whose K and V fit in L2 together; within a
// group, query blocks from the last (the longest under a causal mask) to the first, heads fastest. With clusters
// an entry is CLUSTER consecutive query blocks of one head, a block per CTA (by rank), all valid when the first
// is: the cluster's CTAs read the same key blocks, and a block past the sequence's end computes rows it never
// stores.
struct Work {
    int m0, h, b;
    Seq seq;
    int n_lo, n_hi;  // key blocks [n_lo, n_hi)
    bool valid;      // false for query blocks past a short sequence's end
};

DEVICE Work work(const AttnParams &p, int t, int num_m, int group_heads) {
    Work w;
    const int rank = CLUSTER > 1 ? cluster_rank() : 0;
    const int per_group = num_m * group_heads;
    const int g = t / per_group, r = t % per_group;
    const int in_group = min(group_heads, p.heads_q * p.batch - g * group_heads);
    const int hb = g * group_heads + r % in_group;
    w.m0 = ((num_m - 1 - r / in_group) * CLUSTER + rank) * BLOCK_M;
    w.h = hb % p.heads_q;
    w.b = hb / p.heads_q;
    w.seq = sequence(p, w.b);
    w.valid = w.m0 - rank * BLOCK_M < w.seq.len_q;
    w.n_lo = 0;
    w.n_hi = (w.seq.len_k + BLOCK_N - 1) / BLOCK_N;
#if IS_MASKED
    const Mask mask = make_mask(p, w.seq);
    w.n_lo = mask.lo(w.m0) / BLOCK_N;
    w.n_hi = min(w.n_hi, (mask.hi(min(w.m0 + BLOCK_M, w.seq.len_q)) + BLOCK_N - 1) / BLOCK_N);
#endif
    return w;
}

// ---------------------------------------------------------------------------------------------------------------
// Shared memory: Q, the K ring, the V ring, the O staging boxes (1024-byte aligned), then the mbarriers and the
// current tile's index.
struct Smem {
    // Byte offsets from the aligned start, and the end of the layout (the tile index and the sink word).
    static constexpr u32 K_AT = Q_BYTES;
    static constexpr u32 V_AT = K_AT + STAGES * KV_BYTES;
    static constexpr u32 O_AT = V_AT + STAGES * KV_BYTES;
    static constexpr u32 BARS_AT = O_AT + (O_STAGING == 1 ? O_WARP_BYTES * 4 * CONSUMERS : 0);
    static constexpr u32 TILE_AT = BARS_AT + 16 + 32 * STAGES;
    static constexpr u32 END = TILE_AT + 8;
    u32 q, k, v, o, bars, tile;
    DEVICE Smem(const void *raw) {
        q = (smem_addr(raw) + 1023) & ~1023u;
        k = q + K_AT;
        v = q + V_AT;
        o = q + O_AT;
        bars = q + BARS_AT;
        tile = q + TILE_AT;
    }
    DEVICE u32 sink() const { return tile + 4; }  // a word that only wgmma_wait_after may write
    // The first staging box of warp `warp` of consumer c: its own beside the ring, or its 16 rows of Q's first slab.
    DEVICE u32 o_boxes(int c, int warp) const {
        return O_IN_Q ? q + (64 * c + 16 * warp) * 128 : o + (4 * c + warp) * O_WARP_BYTES;
    }
    DEVICE u32 q_full() const { return bars; }
    DEVICE u32 q_empty() const { return bars + 8; }
    DEVICE u32 k_full(int s) const { return bars + 16 + 32 * s; }
    DEVICE u32 v_full(int s) const { return bars + 24 + 32 * s; }
    DEVICE u32 k_empty(int s) const { return bars + 32 + 32 * s; }
    DEVICE u32 v_empty(int s) const { return bars + 40 + 32 * s; }
};
// The host allocates SMEM_BYTES: the layout and up to 1024 bytes of alignment before it.
static_assert(1024 + Smem::END <= SMEM_BYTES, "shared memory: the layout outgrew the host's SMEM_BYTES (Variant::smem_bytes)");

// The next entry of the tile list for this CTA after `t`: from the global counter, or, for a cluster (whose CTAs
// must agree without talking), every clusters-th entry from the cluster's own index on.
DEVICE int next_tile(int t, int *counter) {
    return CLUSTER > 1 ? t + gridDim.x / CLUSTER : gridDim.x + atomicAdd(counter, 1);
}

// A K or V block into stage `dst`: a box per slab. In a cluster each CTA issues every other box of the block's K
// and V (`first`: the boxes before these), multicast to all the cluster's CTAs, so that each block leaves L2 once.
DEVICE void load_kv(u32 dst, const TmaMap &map, int row, int head, int batch, u32 bar, int first) {
    if (CLUSTER == 1) {
        tma_tile(dst, BLOCK_N, map, row, head, batch, bar);
        return;
    }
    const int rank = cluster_rank();
#pragma unroll
    for (int s = 0; s < HDIM / 64; ++s) {
        if ((first + s) % CLUSTER == rank) {
            tma_load_multicast(dst + s * SLAB(BLOCK_N), map, 64 * s, row, head, batch, bar, (1 << CLUSTER) - 1);
        }
    }
}

// The producer: one thread takes the tiles and issues every copy. It passes each tile's index to the consumers
// with Q (-1 when the list is done).
DEVICE void produce(const AttnParams &p, const TmaMap &tq, const TmaMap &tk, const TmaMap &tv, const Smem &sm,
                    int *counter, int num_m, int tiles, int group_heads) {
    const int group = p.heads_q / p.heads_kv;
    int kv = 0;
    for (int round = 0, t = blockIdx.x / CLUSTER;; ++round, t = next_tile(t, counter)) {
        Work w;
        while (t < tiles && !(w = work(p, t, num_m, group_heads)).valid) t = next_tile(t, counter);
        mbar_wait(sm.q_empty(), (round & 1) ^ 1);  // the consumers are done with the last tile's Q
        st_shared(sm.tile, t < tiles ? t : -1);
        if (t >= tiles) {
            mbar_arrive(sm.q_full());
            return;
        }
        const int bq = map_batch(p, w.b), hk = w.h / group;
        mbar_expect_tx(sm.q_full(), Q_BYTES);
        tma_tile(sm.q, BLOCK_M, tq, w.seq.start_q + w.m0, w.h, bq, sm.q_full());
        for (int n = w.n_hi - 1; n >= w.n_lo; --n, ++kv) {
            const int stage = kv % STAGES, parity = ((kv / STAGES) & 1) ^ 1;
            const int row = w.seq.start_k + n * BLOCK_N;
            mbar_wait(sm.k_empty(stage), parity);
            mbar_expect_tx(sm.k_full(stage), KV_BYTES);
            load_kv(sm.k + stage * KV_BYTES, tk, row, hk, bq, sm.k_full(stage), 0);
            mbar_wait(sm.v_empty(stage), parity);
            mbar_expect_tx(sm.v_full(stage), KV_BYTES);
            load_kv(sm.v + stage * KV_BYTES, tv, row, hk, bq, sm.v_full(stage), HDIM / 64);
        }
    }
}

// O / l of a warp's 16 rows from `warp_row` on (those inside the sequence), straight from the registers.
DEVICE void store_o_direct(const AttnParams &p, const float (&o)[O_REGS], const float (&inv)[2], const Work &w,
                           int warp_row) {
    const int lane = threadIdx.x % 32;
    const long long o_base = w.b * p.o_batch + w.h * p.o_head;  // batch strides are 0 when varlen
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
        const int row = warp_row + lane / 4 + 8 * hf;
        if (row < w.seq.len_q) {
            u16 *out = p.out + o_base + (long long)(w.seq.start_q + row) * p.o_row;
#pragma unroll
            for (int i = 2 * hf; i < O_REGS; i += 4) {
                const int col = 8 * (i / 4) + 2 * (lane % 4);
                if (col < p.head_dim) *(u32 *)(out + col) = pack2(o[i] * inv[hf], o[i + 1] * inv[hf]);
            }
        }
    }
}

#if STAGE_O
// The same for 16 rows that all lie inside the sequence, through the warp's staging boxes in shared memory
// (HDIM / 64 boxes of 16 rows x 64 columns, 128-byte swizzle, O_BOX_STRIDE bytes apart) and TMA stores, which
// write whole lines (direct stores of a fragment touch 8 lines per instruction). The boxes are free again once the
// last stores have read them: only the warp itself waits for that.
DEVICE void store_o_staged(const AttnParams &p, const float (&o)[O_REGS], const float (&inv)[2], const TmaMap &tout,
                           u32 staging, const Work &w, int warp_row) {
    const int lane = threadIdx.x % 32;
    if (lane == 0) bulk_wait_read();
    __syncwarp();
#pragma unroll
    for (int i = 0; i < O_REGS; i += 2) {
        const int hf = (i / 2) % 2, row = lane / 4 + 8 * hf, col = 8 * (i / 4) + 2 * (lane % 4);
        st_shared(SWIZZLED(staging + (col / 64) * O_BOX_STRIDE, row, (col % 64) / 8) + (col % 8) * 2,
                  pack2(o[i] * inv[hf], o[i + 1] * inv[hf]));
    }
    fence_proxy_async();
    __syncwarp();
    if (lane == 0) {
#pragma unroll
        for (int box = 0; box < HDIM / 64; ++box) {
            tma_store(tout, staging + box * O_BOX_STRIDE, 64 * box, w.seq.start_q + warp_row, w.h, map_batch(p, w.b));
        }
        bulk_commit();
    }
}
#endif

// A consumer warpgroup: c owns rows [64c, 64c + 64) of each tile; a thread holds rows r and r + 8.
DEVICE void consume(const AttnParams &p, const TmaMap &tout, const Smem &sm, int num_m, int group_heads) {
    // The uniform warpgroup index where it pays: with three consumers (d = 64) it measured 1% slower than the
    // plain one, and at d = 256 with a score modifier it spills.
    const bool uniform_index = CONSUMERS == 2 && !(HAS_MOD && HDIM == 256);
    const int c = (uniform_index ? warpgroup() : threadIdx.x / 128) - 1;
    const int warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
    // Without a score transform, scores stay raw products and the exponential applies the scale.
    const float exp_scale = HAS_MOD ? LOG2E : p.scale_log2;
    // Operand descriptors: a base per tile plus a compile-time offset per k step, so that no per-step descriptor
    // is held in registers across the loop.
    const u64 q_base = smem_desc(sm.q + c * SLAB(64), 16, 1024);
    const u64 k_base = smem_desc(sm.k, 16, 1024), v_base = smem_desc(sm.v, SLAB(BLOCK_N), 1024);

    int kv = 0;
    for (int round = 0;; ++round) {
        mbar_wait(sm.q_full(), round & 1);
        const int t = ld_shared(sm.tile);
        __syncwarp();  // every lane's read before lane 0 releases the slot (NOTES H-6)
        if (t < 0) {
#if STAGE_O
            if (lane == 0) bulk_wait_all();  // the last O stores are done before the CTA's shared memory goes
#endif
            return;
        }
        const Work w = work(p, t, num_m, group_heads);
        const Mask mask = make_mask(p, w.seq);
        const float slope = (HAS_MOD && p.alibi) ? p.alibi[w.b * p.alibi_batch_stride + w.h] : 0.f;
        const int row_lo = w.m0 + 64 * c;  // first query row of this warpgroup
        const int r0 = row_lo + 16 * warp + lane / 4;

        float o[O_REGS], row_max[2] = {NEG_INF, NEG_INF}, row_sum[2] = {0.f, 0.f};
#pragma unroll
        for (int i = 0; i < O_REGS; ++i) o[i] = 0.f;
        float s[S_REGS];
        u32 pk[S_REGS / 2];  // P as 16-bit pairs: the A operand of P V

        // S = Q K(stage)^T, issued and committed, not waited for.
        auto issue_qk = [&](int stage) {
            const u64 k = desc_plus(k_base, stage * KV_BYTES);
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < HDIM / 16; ++kk) WGMMA_SS(s, kmajor(q_base, BLOCK_M, kk), kmajor(k, BLOCK_N, kk), kk > 0);
            wgmma_commit();
        };
        // O += P V(stage), issued and committed.
        auto issue_pv = [&](int stage) {
            const u64 v = desc_plus(v_base, stage * KV_BYTES);
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < BLOCK_N / 16; ++kk) {
                WGMMA_RS(o, pk[4 * kk], pk[4 * kk + 1], pk[4 * kk + 2], pk[4 * kk + 3], mnmajor(v, kk), 1);
            }
            wgmma_commit();
        };
        // Scores of key block n to probabilities (in s), with the online-softmax update. Returns whether O's rows
        // must shrink, by the factors it leaves in `corr`: always, or with LAZY_RESCALE only when some row of the
        // warp saw its maximum grow by more than 2^8 (in exp2 units); until then the maximum stays and the
        // exponentials may reach 2^8, harmless in f32 sums and 16-bit P, and most blocks skip the rescale.
        auto softmax = [&](int n, float(&corr)[2]) -> bool {
            const int n0 = n * BLOCK_N;
            if (HAS_MOD || !mask.full(row_lo, row_lo + 64, n0, n0 + BLOCK_N)) {
                const int2 seen[2] = {mask.keys(r0), mask.keys(r0 + 8)};  // by this thread's two rows
#pragma unroll
                for (int i = 0; i < S_REGS; ++i) {
                    const int hf = (i / 2) % 2, row = r0 + 8 * hf, col = n0 + 8 * (i / 4) + 2 * (lane % 4) + i % 2;
                    float x = s[i];
                    if (HAS_MOD) x = score_mod(p, slope, row + mask.shift - col, x, 0);
                    if ((col < seen[hf].x) | (col >= seen[hf].y)) x = NEG_INF;
                    s[i] = x;
                }
            }
            float mx[2];
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
                mx[hf] = row_max[hf];
#pragma unroll
                for (int i = 2 * hf; i < S_REGS; i += 4) mx[hf] = fmaxf(mx[hf], fmaxf(s[i], s[i + 1]));
                mx[hf] = quad_max(mx[hf]);
            }
            const bool grow = !LAZY_RESCALE || __any_sync(~0u, (mx[0] - row_max[0]) * exp_scale > 8.f ||
                                                                   (mx[1] - row_max[1]) * exp_scale > 8.f);
            // A row with no visible key so far keeps max -inf: subtract 0 so exp2(-inf) = 0.
            auto base_of = [&](float m) { return m == NEG_INF ? 0.f : m * exp_scale; };
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
                if (grow) {
                    corr[hf] = fast_exp2(row_max[hf] * exp_scale - base_of(mx[hf]));
                    row_max[hf] = mx[hf];
                    row_sum[hf] *= corr[hf];
                }
                const float base = base_of(row_max[hf]);
                float sum = 0.f;
#pragma unroll
                for (int i = 2 * hf; i < S_REGS; i += 4) {
                    s[i] = fast_exp2(s[i] * exp_scale - base);
                    s[i + 1] = fast_exp2(s[i + 1] * exp_scale - base);
                    sum += s[i] + s[i + 1];
                }
                row_sum[hf] += sum;
            }
            return grow;
        };
        // P to 16-bit pairs in the A-operand layout of wgmma (which is the accumulator's: no shuffles).
        auto pack_p = [&]() {
#pragma unroll
            for (int i = 0; i < S_REGS / 2; ++i) pk[i] = pack2(s[2 * i], s[2 * i + 1]);
        };
        auto rescale = [&](const float(&corr)[2]) {
#pragma unroll
            for (int i = 0; i < O_REGS; ++i) o[i] *= corr[(i / 2) % 2];
        };
        auto release = [&](u32 bar) {
            if (lane == 0) mbar_arrive(bar);
        };
        // A K or V stage is free once every CTA of the cluster is done with it (each one's loads fill them all).
        auto release_kv = [&](u32 bar) {
            if (CLUSTER == 1) {
                release(bar);
            } else if (lane == 0) {
#pragma unroll
                for (int r = 0; r < CLUSTER; ++r) mbar_arrive_cluster(cluster_addr(bar, r));
            }
        };
        // S of block n is in: K(stage) is free, and after the tile's last block so is Q unless O is staged in it
        // (the next tile's Q then loads under this one's last softmax, P V and epilogue).
        auto scores_done = [&](int n, int stage) {
            release_kv(sm.k_empty(stage));
            if (!O_IN_Q && n == w.n_lo) release(sm.q_empty());
        };

        if (w.n_hi > w.n_lo) {
            float corr[2];
            int stage = kv % STAGES;
            mbar_wait(sm.k_full(stage), (kv / STAGES) & 1);
            issue_qk(stage);
            wgmma_wait<0>();
            reg_fence(s);
            scores_done(w.n_hi - 1, stage);
            softmax(w.n_hi - 1, corr);
            pack_p();
            for (int n = w.n_hi - 2; n >= w.n_lo; --n) {
                const int prev = stage;
                const int prev_parity = (kv / STAGES) & 1;
                ++kv;
                stage = kv % STAGES;
                mbar_wait(sm.k_full(stage), (kv / STAGES) & 1);
                mbar_wait(sm.v_full(prev), prev_parity);
                issue_qk(stage);
                issue_pv(prev);
                wgmma_wait<1>();  // S is in; P V may still run
                reg_fence(s);
                scores_done(n, stage);
                const bool shrink = softmax(n, corr);
                // P V of the block before ran under the softmax; wait for it only now (see wgmma_wait_after).
                if (WAIT_AFTER_SOFTMAX) {
                    wgmma_wait_after<0>(row_sum[0] + row_sum[1], sm.sink());
                } else {
                    wgmma_wait<0>();
                }
                reg_fence(o);
                reg_fence(pk);
                release_kv(sm.v_empty(prev));
                if (shrink) rescale(corr);
                pack_p();
            }
            mbar_wait(sm.v_full(stage), (kv / STAGES) & 1);
            issue_pv(stage);
            wgmma_wait<0>();
            reg_fence(o);
            release_kv(sm.v_empty(stage));
            ++kv;
        } else if (!O_IN_Q) {
            release(sm.q_empty());
        }

        // Epilogue: O / l, then the log-sum-exp (after O, so that the staging's proxy fence has no global store
        // to wait for); a row that saw no key gets O = 0 and lse = -inf.
        float sum[2], inv[2];
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            sum[hf] = quad_sum(row_sum[hf]);
            inv[hf] = sum[hf] > 0.f ? 1.f / sum[hf] : 0.f;
        }
        const int warp_row = row_lo + 16 * warp;
#if STAGE_O
        // A vote, though the condition is the same across the warp: ptxas cannot tell, and a branch it takes for
        // divergent makes it keep the whole consumer's shared-memory addresses and wgmma descriptors in ordinary
        // registers (an R2UR pair before each wgmma of the loop): 1-3% slower at d = 128.
        if (__all_sync(~0u, warp_row + 16 <= w.seq.len_q)) {
            store_o_staged(p, o, inv, tout, sm.o_boxes(c, warp), w, warp_row);
        } else
#endif
        {
            store_o_direct(p, o, inv, w, warp_row);
        }
#if O_IN_Q
        // Q's tile is free once the stores have read this warp's rows of it.
        if (lane == 0) bulk_wait_read();
        release(sm.q_empty());
#endif
        float *lse = p.lse + w.b * p.lse_batch + w.h * p.lse_head + w.seq.start_q;
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            const int row = r0 + 8 * hf;
            if (row < w.seq.len_q && lane % 4 == 0) {
                const float mx = row_max[hf];
                lse[row] = sum[hf] > 0.f ? (HAS_MOD ? mx : mx * p.scale) + logf(sum[hf]) : NEG_INF;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
extern "C" __global__ void __launch_bounds__(NTHREADS, 1)
    flash_fwd_sm90(const __grid_constant__ AttnParams p, const __grid_constant__ TmaMap tq,
                   const __grid_constant__ TmaMap tk, const __grid_constant__ TmaMap tv,
                   const __grid_constant__ TmaMap tout, int *counter, int group_heads) {
    extern __shared__ unsigned char smem_raw[];
    const Smem sm(smem_raw);
    if (threadIdx.x == 0) {
        mbar_init(sm.q_full(), 1);
        mbar_init(sm.q_empty(), RELEASES);
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(sm.k_full(s), 1);
            mbar_init(sm.v_full(s), 1);
            mbar_init(sm.k_empty(s), KV_RELEASES);
            mbar_init(sm.v_empty(s), KV_RELEASES);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    // The barriers of every CTA of the cluster are set up before any of them is used.
    if (CLUSTER > 1) {
        cluster_sync();
    } else {
        __syncthreads();
    }

    const int num_m = (p.seqlen_q + CLUSTER * BLOCK_M - 1) / (CLUSTER * BLOCK_M);  // entries per head
    const int tiles = num_m * p.heads_q * p.batch;
    if (threadIdx.x < 128) {
        setmaxnreg_dec<PRODUCER_REGS>();
        if (threadIdx.x == 0) produce(p, tq, tk, tv, sm, counter, num_m, tiles, group_heads);
    } else {
        setmaxnreg_inc<CONSUMER_REGS>();
        consume(p, tout, sm, num_m, group_heads);
    }
    // No CTA leaves while another may still write to its shared memory or arrive on its barriers.
    if (CLUSTER > 1) cluster_sync();
}
