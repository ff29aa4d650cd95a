// The backward's kernels around the main one, shared by both families:
// flash_bwd_preprocess: D = rowsum(dO * O) per (batch, head, query).
// flash_bwd_dq_convert: the f32 dQ accumulator, (token, head_q, HDIM), to the output dtype.

#pragma once
#include "common.cuh"

// Query row i's statistics for a step of head h: lse in log2 units (+inf for a row past the sequence or that saw
// no key: it passes no gradient) and D.
DEVICE float2 step_stats(const AttnParams &p, int b, int h, const Seq &seq, int i) {
    const long long at = b * p.lse_batch + h * p.lse_head + seq.start_q + i;
    const bool in = i < seq.len_q;
    const float l = in ? p.lse[at] : NEG_INF;
    return make_float2(l == NEG_INF ? POS_INF : l * LOG2E, in ? p.delta[at] : 0.f);
}

// The probability of (query i, key j) from the raw product q.k and the row's lse (log2 units), 0 where the mask
// hides the key (`need_mask`: some key of the block may be hidden); `dscore` gets d score / d (q.k).
DEVICE float probability(const AttnParams &p, const Mask &mask, bool need_mask, float slope, int i, int j, float raw,
                         float lse, float &dscore) {
    float pr;
    dscore = p.scale;
    if (HAS_MOD) {
        pr = fast_exp2(score_mod(p, slope, i + mask.shift - j, raw, &dscore) * LOG2E - lse);
    } else {
        pr = fast_exp2(raw * p.scale_log2 - lse);
    }
    return need_mask & !mask.visible(i, j) ? 0.f : pr;
}

// The Hopper backward's CTA: a (batch, KV head, key block), from a one-dimensional grid. The (batch, KV head)
// pairs go in groups of KEY_TILE_PAIRS, each group's CTAs key block by key block: under a causal mask the longest
// CTAs (the first key blocks, which the most query blocks see) start first and the short ones fill the waves'
// tails, while the CTAs running at once share a few pairs' Q and dO in L2 (all pairs at once lost 5-45%, NOTES
// backward item 16). `from_last` runs each group's key blocks from the last instead.
#define KEY_TILE_PAIRS 4
struct KeyTile {
    int b, hk, n_block;
};
DEVICE KeyTile key_tile(const AttnParams &p, bool from_last) {
    const int pairs = p.batch * p.heads_kv, blocks = gridDim.x / pairs;
    const int first = blockIdx.x / (KEY_TILE_PAIRS * blocks) * KEY_TILE_PAIRS;
    const int size = min(KEY_TILE_PAIRS, pairs - first), i = blockIdx.x - first * blocks;
    const int n = i / size, pair = first + i % size;
    return KeyTile{pair / p.heads_kv, pair % p.heads_kv, from_last ? blocks - 1 - n : n};
}

// The query blocks (of block_m rows) that see some key of [n0, n0 + block_n): [lo, hi).
DEVICE int2 query_blocks(const Mask &mask, const Seq &seq, int n0, int block_n, int block_m) {
    int lo = 0, hi = (seq.len_q + block_m - 1) / block_m;
#if IS_MASKED
    lo = mask.rows_lo(n0) / block_m;
    hi = min(hi, (mask.rows_hi(n0 + block_n, seq.len_q) + block_m - 1) / block_m);
#endif
    return make_int2(lo, hi);
}

extern "C" __global__ void flash_bwd_preprocess(const AttnParams p) {
    const int b = blockIdx.z, h = blockIdx.y;
    const Seq seq = sequence(p, b);
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= seq.len_q) return;
    const u16 *o = p.o + b * p.o_batch + (long long)(seq.start_q + i) * p.o_row + h * p.o_head;
    const u16 *dout = p.dout + b * p.do_batch + (long long)(seq.start_q + i) * p.do_row + h * p.do_head;
    float acc = 0.f;
    for (int c = 0; c < p.head_dim; c += 8) {
        uint4 a = *(const uint4 *)(o + c), d = *(const uint4 *)(dout + c);
        const u16 *x = (const u16 *)&a, *y = (const u16 *)&d;
#pragma unroll
        for (int e = 0; e < 8; ++e) acc += to_float(x[e]) * to_float(y[e]);
    }
    p.delta[b * p.lse_batch + h * p.lse_head + seq.start_q + i] = acc;
}

extern "C" __global__ void flash_bwd_dq_convert(const AttnParams p, long long rows) {
    // One thread per 8 columns of one (token, head) row.
    const long long chunk = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const int per_row = HDIM / 8;
    const long long row = chunk / per_row;
    const int c = (int)(chunk % per_row) * 8;
    if (row >= rows || c >= p.head_dim) return;
    const long long token = row / p.heads_q;
    const int h = (int)(row % p.heads_q);
    const float *src = p.dq_accum + row * HDIM + c;
    uint4 v;
    u32 *w = (u32 *)&v;
#pragma unroll
    for (int e = 0; e < 4; ++e) w[e] = pack2(src[2 * e], src[2 * e + 1]);
    *(uint4 *)(p.dq + token * p.o_row + h * p.o_head + c) = v;
}

