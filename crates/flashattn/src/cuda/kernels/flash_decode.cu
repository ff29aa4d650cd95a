// Attention of a few new queries per sequence against a key/value cache, contiguous or paged (flash-decoding).
//
// flash_decode: one CTA per (row block, batch x KV head, split). A KV head's rows are its query heads times the
// new queries (row r: query r / group, head r % group), MT * 16 of them per block, so each K/V byte is read once
// per group. The CTA's NWARPS warps take interleaved 16-key slices of each BLOCK_N-key block, which stream through
// a STAGES-deep cp.async ring; at the end the warps' partial softmax states are merged in shared memory. Each
// split covers a contiguous share of the key blocks: alone, it writes the output; with others, its normalised
// output (f32) and log-sum-exp go to the workspace and decode_combine merges them.
// kv_append: writes new keys and values into the cache at each sequence's length, before flash_decode runs.
//
// Memory safety does not depend on the device inputs: a page index outside the cache, or a length past the
// cache's capacity, reads zeros and writes nothing.
//
// Defines: HDIM, MT, BLOCK_N, STAGES, NWARPS, SMEM_BYTES.

#include "common.cuh"

#define NTHREADS (NWARPS * 32)
#define ROWS (MT * 16)
#define DT (HDIM / 8)   // n8 tiles of O
#define KT (HDIM / 16)  // k16 steps of Q K^T
#define CHUNKS (HDIM / 8)

// The layout of `cuda::decode::DecodeParams` on the Rust side.
struct DecodeParams {
    AttnParams a;              // q, the caches k / v (k_batch, v_batch: the page stride), out, lse, options
    const int *cache_seqlens;  // (batch): tokens in each cache before the new ones
    const int *block_table;    // (batch, table_stride) page indices; null: a contiguous cache, page b is sequence b
    const u16 *k_new, *v_new;  // (batch, seqlen_new, heads_kv, head_dim), or null
    float *o_part;             // (splits, rows, HDIM) normalised partial outputs, rows = batch * seqlen_q * heads_q
    float *lse_part;           // (splits, rows)
    long long kn_batch, kn_row, kn_head;
    long long vn_batch, vn_row, vn_head;
    long long table_stride;
    int page_size;             // tokens per page (the capacity, for a contiguous cache)
    int num_pages;
    int capacity;              // tokens a sequence's cache holds
    int seqlen_new;
    int num_splits;
};

// Keys sequence b attends to: its cache and the new tokens, within the capacity.
DEVICE int keys_of(const DecodeParams &dp, int b) {
    return min(max(dp.cache_seqlens[b], 0) + dp.seqlen_new, dp.capacity);
}

// The page holding token t of sequence b: its table entry (for a contiguous cache, b itself).
DEVICE int page_of(const DecodeParams &dp, int b, int t) {
    return dp.block_table ? dp.block_table[b * dp.table_stride + t / dp.page_size] : b;
}

// Where token t lives in page `page`: (page, slot), or page -1 when the page is outside the cache.
DEVICE int2 cache_slot(const DecodeParams &dp, int page, int t) {
    if (page < 0 || page >= dp.num_pages) return make_int2(-1, 0);
    return make_int2(page, dp.block_table ? t % dp.page_size : t);
}

// Element offset of a (page, slot) row, head 0, in a cache with these strides.
DEVICE long long row_offset(int2 at, long long page_stride, long long row_stride) {
    return at.x * page_stride + at.y * row_stride;
}

template <int N>
DEVICE void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Where a block's rows live: row r of keys [n0, n0 + BLOCK_N) at slots[r] (page -1 past `len` or on a page
// outside the cache). Threads below BLOCK_N each place one row; `page` is the table entry they fetched
// (`fetch_page`) earlier, so that its load's latency hides behind other work.
DEVICE void store_slots(const DecodeParams &dp, int2 *slots, int page, int n0, int len) {
    const int r = threadIdx.x, t = n0 + r;
    if (r < BLOCK_N) slots[r] = t < len ? cache_slot(dp, page, t) : make_int2(-1, 0);
}

// The table entry of this thread's row of keys [n0, n0 + BLOCK_N) (any value where there is none).
DEVICE int fetch_page(const DecodeParams &dp, int b, int n0, int len) {
    const int t = n0 + (int)threadIdx.x;
    return threadIdx.x < BLOCK_N && t < len ? page_of(dp, b, t) : -1;
}

// Keys [n0, n0 + BLOCK_N) of KV head hk into a K and a V tile, from the rows `slots` places (store_slots); rows
// without a page become zeros.
DEVICE void load_kv(const DecodeParams &dp, u16 *sK, u16 *sV, const int2 *slots, int hk) {
    const AttnParams &p = dp.a;
    const u32 k_base = smem_addr(sK), v_base = smem_addr(sV);
    // NTHREADS / CHUNKS rows at a time, one 16-byte chunk per thread (the rest sit out when CHUNKS does not
    // divide NTHREADS).
    constexpr int ROWS_AT_ONCE = NTHREADS / CHUNKS;
    if (threadIdx.x >= ROWS_AT_ONCE * CHUNKS) return;
    const int c = (threadIdx.x % CHUNKS) * 8;
    const bool col = c < p.head_dim;
    const u16 *k = p.k + hk * p.k_head + c, *v = p.v + hk * p.v_head + c;
#pragma unroll 4
    for (int r = threadIdx.x / CHUNKS; r < BLOCK_N; r += ROWS_AT_ONCE) {
        const int2 at = slots[r];
        const bool ok = col && at.x >= 0;
        cp_async16_stream(k_base + Tile<BLOCK_N>::bytes(r, c), ok ? k + row_offset(at, p.k_batch, p.k_row) : p.k, ok);
        cp_async16_stream(v_base + Tile<BLOCK_N>::bytes(r, c), ok ? v + row_offset(at, p.v_batch, p.v_row) : p.v, ok);
    }
}

extern "C" __global__ void __launch_bounds__(NTHREADS, 1) flash_decode(const DecodeParams dp) {
    const AttnParams &p = dp.a;
    extern __shared__ __align__(128) u16 smem[];
    u16 *sQ = smem;
    u16 *sKV = sQ + Tile<ROWS>::ELEMS;  // STAGES x (K, V)
    constexpr int KV_ELEMS = 2 * Tile<BLOCK_N>::ELEMS;
    // Per stage, where the rows of the block it receives next live (BLOCK_N slots).
    int2 *sSlots = (int2 *)(sKV + STAGES * KV_ELEMS);
    // After the loop the ring holds the warps' partial outputs (f32, rows padded by 4) and row statistics.
    float *sO = (float *)sKV;
    constexpr int O_LD = HDIM + 4;
    float *sMax = sO + NWARPS * ROWS * O_LD, *sSum = sMax + NWARPS * ROWS;
    static_assert(2 * (Tile<ROWS>::ELEMS + STAGES * KV_ELEMS) + 8 * STAGES * BLOCK_N <= SMEM_BYTES,
                  "shared memory: the layout outgrew the host's SMEM_BYTES (Variant::smem_bytes)");
    static_assert(4 * NWARPS * ROWS * (O_LD + 2) <= 2 * STAGES * KV_ELEMS, "the merge buffers outgrew the ring");
    static_assert(BLOCK_N == 16 * NWARPS, "each warp takes 16 keys of a block");

    const int group = p.heads_q / p.heads_kv;
    const int b = blockIdx.y / p.heads_kv, hk = blockIdx.y % p.heads_kv;
    const int rows = p.seqlen_q * group, r0 = blockIdx.x * ROWS;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

    Seq seq;
    seq.len_q = p.seqlen_q;
    seq.len_k = keys_of(dp, b);
    const Mask mask = make_mask(p, seq);
    // Keys some row of the block sees, in blocks, shared evenly among the splits.
    const int i_first = r0 / group, i_end = (min(r0 + ROWS, rows) - 1) / group + 1;
    const int k_lo = mask.lo(i_first), k_hi = mask.hi(i_end);
    const int blk_lo = k_lo / BLOCK_N, blocks = k_hi > k_lo ? (k_hi + BLOCK_N - 1) / BLOCK_N - blk_lo : 0;
    const int per_split = (blocks + dp.num_splits - 1) / dp.num_splits;
    const int n_begin = blk_lo + blockIdx.z * per_split;
    const int n_end = min(blk_lo + blocks, n_begin + per_split);

    // Q: ROWS rows, each a (query, head) pair; rows past the block's end become zeros.
    {
        const u32 base = smem_addr(sQ);
        for (int i = threadIdx.x; i < ROWS * CHUNKS; i += NTHREADS) {
            const int r = i / CHUNKS, c = (i % CHUNKS) * 8, row = r0 + r;
            const bool ok = row < rows && c < p.head_dim;
            const u16 *src = p.q + b * p.q_batch + (long long)(row / group) * p.q_row +
                             (long long)(hk * group + row % group) * p.q_head + c;
            cp_async16(base + Tile<ROWS>::bytes(r, c), ok ? src : p.q, ok);
        }
    }
    // The ring's prologue: where the rows of the first STAGES blocks live, then the first STAGES - 1 loads (Q
    // joins the first group).
    auto stage_kv = [&](int s) { return sKV + s * KV_ELEMS; };
    auto stage_slots = [&](int s) { return sSlots + s * BLOCK_N; };
#pragma unroll
    for (int s = 0; s < STAGES; ++s) {
        const int n0 = (n_begin + s) * BLOCK_N;
        store_slots(dp, stage_slots(s), fetch_page(dp, b, n0, seq.len_k), n0, seq.len_k);
    }
    __syncthreads();
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (n_begin + s < n_end) load_kv(dp, stage_kv(s), stage_kv(s) + Tile<BLOCK_N>::ELEMS, stage_slots(s), hk);
        cp_async_commit();
    }

    // Per thread: rows (mt, hf) = mt * 16 + lane / 4 + 8 * hf, each with its query and its head's ALiBi slope.
    float slope[MT][2];
    int query[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            const int row = min(r0 + mt * 16 + lane / 4 + 8 * hf, rows - 1);
            query[mt][hf] = row / group;
            slope[mt][hf] = p.alibi ? p.alibi[b * p.alibi_batch_stride + hk * group + row % group] : 0.f;
        }

    float acc_o[MT][DT][4];
    float row_max[MT][2], row_sum[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int dt = 0; dt < DT; ++dt)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc_o[mt][dt][e] = 0.f;
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            row_max[mt][hf] = NEG_INF;
            row_sum[mt][hf] = 0.f;
        }
    }

    const u32 q_lane = smem_addr(sQ) + Tile<ROWS>::bytes(lane % 16, (lane / 16) * 8);
    const u32 k_lane = smem_addr(sKV) + Tile<BLOCK_N>::bytes(warp * 16 + ((lane / 8) / 2) * 8 + (lane % 8), ((lane / 8) % 2) * 8);
    const u32 v_lane = smem_addr(sKV + Tile<BLOCK_N>::ELEMS) + Tile<BLOCK_N>::bytes(warp * 16 + ((lane / 8) % 2) * 8 + (lane % 8), ((lane / 8) / 2) * 8);

#pragma unroll 1
    for (int n = n_begin, stage = 0; n < n_end; ++n, stage = (stage + 1) % STAGES) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();  // block n is in; every warp is done with the stage the next load overwrites
        {
            const int ahead = n + STAGES - 1, s = (stage + STAGES - 1) % STAGES;
            if (ahead < n_end) load_kv(dp, stage_kv(s), stage_kv(s) + Tile<BLOCK_N>::ELEMS, stage_slots(s), hk);
            cp_async_commit();
        }
        // The table entries of block n + STAGES, placed in this stage's slots after the products (block n's own
        // slots were read when its load was issued).
        const int next0 = (n + STAGES) * BLOCK_N;
        const int next_page = fetch_page(dp, b, next0, seq.len_k);
        const u32 stage_bytes = 2u * stage * KV_ELEMS;

        // S = Q K^T for this warp's 16 keys.
        float acc_s[MT][2][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < 2; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) acc_s[mt][nt][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < KT; ++kk) {
            u32 bk[4];
            ldsm_x4(bk, k_lane + stage_bytes + Tile<BLOCK_N>::bytes(0, kk * 16));
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                u32 a[4];
                ldsm_x4(a, q_lane + Tile<ROWS>::bytes(mt * 16, kk * 16));
                mma16816(acc_s[mt][0], a, bk);
                mma16816(acc_s[mt][1], a, bk + 2);
            }
        }

        // Scores in natural units. Keys every row of the block sees, without score modifiers (all but a
        // sequence's last block in plain decoding), skip the per-element mask and modifiers.
        const int c0 = n * BLOCK_N + warp * 16;
        if (!p.alibi && p.softcap == 0.f && mask.full(i_first, i_end, c0, c0 + 16)) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int nt = 0; nt < 2; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) acc_s[mt][nt][e] *= p.scale;
        } else {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int hf = 0; hf < 2; ++hf)
#pragma unroll
                    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
                        for (int e = 0; e < 2; ++e) {
                            const int i = query[mt][hf], j = c0 + nt * 8 + 2 * (lane % 4) + e;
                            const float s = score_mod(p, slope[mt][hf], i + mask.shift - j, acc_s[mt][nt][2 * hf + e], 0);
                            acc_s[mt][nt][2 * hf + e] = mask.visible_branching(i, j) ? s : NEG_INF;
                        }
        }
        // The online softmax.
        float corr[MT][2];
        bool moved = false;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
                float mx = row_max[mt][hf];
#pragma unroll
                for (int nt = 0; nt < 2; ++nt)
#pragma unroll
                    for (int e = 0; e < 2; ++e) mx = fmaxf(mx, acc_s[mt][nt][2 * hf + e]);
                mx = quad_max(mx);
                const float base = mx == NEG_INF ? 0.f : mx * LOG2E;
                corr[mt][hf] = fast_exp2(row_max[mt][hf] * LOG2E - base);
                moved |= mx != row_max[mt][hf];
                row_max[mt][hf] = mx;
                float sum = 0.f;
#pragma unroll
                for (int nt = 0; nt < 2; ++nt)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const float pr = fast_exp2(acc_s[mt][nt][2 * hf + e] * LOG2E - base);
                        acc_s[mt][nt][2 * hf + e] = pr;
                        sum += pr;
                    }
                row_sum[mt][hf] = row_sum[mt][hf] * corr[mt][hf] + sum;
            }
        if (__any_sync(0xffffffffu, moved)) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int dt = 0; dt < DT; ++dt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) acc_o[mt][dt][e] *= corr[mt][e / 2];
        }

        // O += P V.
        u32 a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) pack_a(a[mt], acc_s[mt][0], acc_s[mt][1]);
#pragma unroll
        for (int dp2 = 0; dp2 < DT / 2; ++dp2) {
            u32 bv[4];
            ldsm_x4_t(bv, v_lane + stage_bytes + Tile<BLOCK_N>::bytes(0, dp2 * 16));
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                mma16816(acc_o[mt][2 * dp2], a[mt], bv);
                mma16816(acc_o[mt][2 * dp2 + 1], a[mt], bv + 2);
            }
        }
        store_slots(dp, stage_slots(stage), next_page, next0, seq.len_k);
    }
    cp_async_wait<0>();
    __syncthreads();  // the ring is free: it becomes the merge buffers

    // Each warp's state into shared memory: unnormalised O, row maxima and sums.
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            const int r = mt * 16 + lane / 4 + 8 * hf;
            float *o = sO + (warp * ROWS + r) * O_LD;
#pragma unroll
            for (int dt = 0; dt < DT; ++dt) {
                *(float2 *)(o + dt * 8 + 2 * (lane % 4)) = make_float2(acc_o[mt][dt][2 * hf], acc_o[mt][dt][2 * hf + 1]);
            }
            const float sum = quad_sum(row_sum[mt][hf]);
            if (lane % 4 == 0) {
                sMax[warp * ROWS + r] = row_max[mt][hf];
                sSum[warp * ROWS + r] = sum;
            }
        }
    __syncthreads();

    // Merge the warps: per row the maximum M, the sum L and each warp's weight exp(m_w - M) / L.
    const long long rows_all = (long long)p.batch * rows * p.heads_kv;
    for (int idx = threadIdx.x; idx < ROWS * (HDIM / 2); idx += NTHREADS) {
        const int r = idx / (HDIM / 2), c = (idx % (HDIM / 2)) * 2, row = r0 + r;
        if (row >= rows) continue;
        float m = NEG_INF;
#pragma unroll
        for (int w = 0; w < NWARPS; ++w) m = fmaxf(m, sMax[w * ROWS + r]);
        float l = 0.f, o0 = 0.f, o1 = 0.f;
        if (m != NEG_INF) {
#pragma unroll
            for (int w = 0; w < NWARPS; ++w) {
                const float wt = fast_exp2((sMax[w * ROWS + r] - m) * LOG2E);
                l += sSum[w * ROWS + r] * wt;
                const float2 x = *(const float2 *)(sO + (w * ROWS + r) * O_LD + c);
                o0 += x.x * wt;
                o1 += x.y * wt;
            }
        }
        const float inv = l > 0.f ? 1.f / l : 0.f;
        const float lse = l > 0.f ? m + logf(l) : NEG_INF;
        const int i = row / group, h = hk * group + row % group;
        if (dp.num_splits == 1) {
            if (c < p.head_dim) {
                u16 *out = p.out + b * p.o_batch + (long long)i * p.o_row + (long long)h * p.o_head + c;
                *(u32 *)out = pack2(o0 * inv, o1 * inv);
            }
            if (c == 0) p.lse[b * p.lse_batch + h * p.lse_head + i] = lse;
        } else {
            const long long part = (long long)blockIdx.z * rows_all + ((long long)b * p.seqlen_q + i) * p.heads_q + h;
            *(float2 *)(dp.o_part + part * HDIM + c) = make_float2(o0 * inv, o1 * inv);
            if (c == 0) dp.lse_part[part] = lse;
        }
    }
}

// Merges the splits' partial outputs by their log-sum-exps: one warp per (batch, query, head) row.
extern "C" __global__ void __launch_bounds__(128) decode_combine(const DecodeParams dp) {
    const AttnParams &p = dp.a;
    const long long rows_all = (long long)p.batch * p.seqlen_q * p.heads_q;
    const long long row = (long long)blockIdx.x * 4 + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= rows_all) return;
    float m = NEG_INF;
    for (int s = lane; s < dp.num_splits; s += 32) m = fmaxf(m, dp.lse_part[s * rows_all + row]);
#pragma unroll
    for (int o = 16; o > 0; o /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    float l = 0.f;
    if (m != NEG_INF) {
        for (int s = lane; s < dp.num_splits; s += 32) l += fast_exp2((dp.lse_part[s * rows_all + row] - m) * LOG2E);
    }
#pragma unroll
    for (int o = 16; o > 0; o /= 2) l += __shfl_xor_sync(0xffffffffu, l, o);
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const int h = row % p.heads_q, i = (row / p.heads_q) % p.seqlen_q, b = row / ((long long)p.heads_q * p.seqlen_q);
    u16 *out = p.out + b * p.o_batch + (long long)i * p.o_row + (long long)h * p.o_head;
    // head_dim is a multiple of 8: a lane's four columns are all inside it or all outside.
    for (int c = lane * 4; c < p.head_dim; c += 128) {
        float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
        if (l > 0.f) {
            for (int s = 0; s < dp.num_splits; ++s) {
                const float ls = dp.lse_part[s * rows_all + row];
                if (ls == NEG_INF) continue;
                const float wt = fast_exp2((ls - m) * LOG2E) * inv;
                const float4 x = *(const float4 *)(dp.o_part + (s * rows_all + row) * HDIM + c);
                acc.x += x.x * wt;
                acc.y += x.y * wt;
                acc.z += x.z * wt;
                acc.w += x.w * wt;
            }
        }
        *(uint2 *)(out + c) = make_uint2(pack2(acc.x, acc.y), pack2(acc.z, acc.w));
    }
    if (lane == 0) p.lse[b * p.lse_batch + h * p.lse_head + i] = l > 0.f ? m + logf(l) : NEG_INF;
}

// Appends the new keys and values: one CTA per (new token, sequence), 16-byte copies.
extern "C" __global__ void __launch_bounds__(128) kv_append(const DecodeParams dp) {
    const AttnParams &p = dp.a;
    const int t = blockIdx.x, b = blockIdx.y;
    const int pos = max(dp.cache_seqlens[b], 0) + t;
    if (pos >= dp.capacity) return;
    const int2 at = cache_slot(dp, page_of(dp, b, pos), pos);
    if (at.x < 0) return;
    const long long k_off = row_offset(at, p.k_batch, p.k_row), v_off = row_offset(at, p.v_batch, p.v_row);
    const int chunks = p.heads_kv * (p.head_dim / 8);
    for (int i = threadIdx.x; i < chunks; i += blockDim.x) {
        const int h = i / (p.head_dim / 8), c = (i % (p.head_dim / 8)) * 8;
        // The cache is this call's output.
        *(uint4 *)((u16 *)p.k + k_off + h * p.k_head + c) =
            *(const uint4 *)(dp.k_new + b * dp.kn_batch + t * dp.kn_row + h * dp.kn_head + c);
        *(uint4 *)((u16 *)p.v + v_off + h * p.v_head + c) =
            *(const uint4 *)(dp.v_new + b * dp.vn_batch + t * dp.vn_row + h * dp.vn_head + c);
    }
}
