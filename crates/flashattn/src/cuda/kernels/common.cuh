// Shared pieces of the attention kernels: tensor-core and copy instructions as inline PTX, swizzled shared-memory
// tiles, the parameter block and the mask (element conversion in elem.cuh). No CUDA headers are needed: 16-bit
// elements are handled as raw bits, so NVRTC compiles this with nothing but its built-ins.
//
// Compile-time configuration (defines): ELEM_BF16 (1: bf16, 0: f16), HDIM (head dim rounded up to 32), and per
// kernel the tile sizes and the IS_MASKED / HAS_MOD switches.

#pragma once
#include "elem.cuh"

// ---------------------------------------------------------------------------------------------------------------
// The parameter block, laid out exactly as `cuda::params::AttnParams` on the Rust side.
struct AttnParams {
    const u16 *q, *k, *v, *o, *dout;
    u16 *out, *dq, *dk, *dv;
    float *lse;            // forward output / backward input, natural log
    float *delta;          // backward: rowsum(dO * O), laid out like lse
    float *dq_accum;       // backward: f32 dQ, (token, head_q, HDIM)
    int *dq_semaphore;     // backward, deterministic mode: one counter per (batch, head_q, m_block)
    const int *cu_seqlens_q, *cu_seqlens_k;  // null for dense batches
    const float *alibi;    // null, or slopes indexed batch * alibi_batch_stride + head
    long long q_batch, q_row, q_head;        // strides in elements (batch strides are 0 when varlen)
    long long k_batch, k_row, k_head;
    long long v_batch, v_row, v_head;
    long long o_batch, o_row, o_head;        // o and dout, and the outputs out / dq
    long long do_batch, do_row, do_head;
    long long dk_batch, dk_row, dk_head;     // dk and dv outputs
    long long lse_batch, lse_head;           // lse / delta: batch * lse_batch + head * lse_head + row (0 / varlen)
    int batch, heads_q, heads_kv, head_dim;
    int seqlen_q, seqlen_k;                  // dense batches; max lengths for variable-length ones
    int window_left, window_right;           // -1: unbounded (causal sets right = 0)
    int alibi_batch_stride;
    int deterministic;
    float scale;                             // softmax scale
    float scale_log2;                        // scale * log2(e)
    float softcap;                           // 0: off
};

// ---------------------------------------------------------------------------------------------------------------
// Tensor cores: D = A (16x16, row) * B (16x8, col) + D, f32 accumulation.
DEVICE void mma16816(float *d, const u32 *a, const u32 *b) {
#if ELEM_BF16
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
#else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
#endif
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Two adjacent n8 accumulator tiles (lo: columns 0-7, hi: 8-15) as the 16-bit A operand of one k16 product.
DEVICE void pack_a(u32 *a, const float *lo, const float *hi) {
    a[0] = pack2(lo[0], lo[1]);
    a[1] = pack2(lo[2], lo[3]);
    a[2] = pack2(hi[0], hi[1]);
    a[3] = pack2(hi[2], hi[3]);
}

DEVICE u32 smem_addr(const void *p) { return (u32)__cvta_generic_to_shared(p); }

// Four 8x8 matrices of 16-bit elements; lane l gives the address of row l % 8 of matrix l / 8.
DEVICE void ldsm_x4(u32 *r, u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
DEVICE void ldsm_x4_t(u32 *r, u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

// 16-byte asynchronous copy global -> shared; zero-fills the destination when `pred` is false.
DEVICE void cp_async16(u32 dst, const void *src, bool pred) {
    int bytes = pred ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}
// The same for data read once, in long runs: the L2 fetches the whole 256-byte span around the chunk.
DEVICE void cp_async16_stream(u32 dst, const void *src, bool pred) {
    int bytes = pred ? 16 : 0;
    asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}
DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
DEVICE void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::); }

// Hopper's bulk copy engine: generic-proxy shared-memory writes become visible to it after this fence.
DEVICE void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
#if __CUDA_ARCH__ >= 900
DEVICE void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
// dst[0 .. bytes/4) += src[...] (f32), asynchronously, in the bulk group of the issuing thread.
DEVICE void bulk_reduce_add_f32(float *dst, u32 src, int bytes) {
    asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(dst), "r"(src), "r"(bytes) : "memory");
    bulk_commit();
}
// Waits until this thread's bulk operations have read their shared-memory sources / have completed.
DEVICE void bulk_wait_read() { asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory"); }
DEVICE void bulk_wait_all() { asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory"); }
#endif

DEVICE float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

DEVICE float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
DEVICE float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// ---------------------------------------------------------------------------------------------------------------
// A ROWS x COLS tile of 16-bit elements in shared memory, rows padded by 8 elements: with COLS a multiple of 16,
// a row is an odd number of 16-byte chunks, so the 8 rows an ldmatrix reads at one column fall in 8 different
// bank groups. Addresses stay linear: a lane's address plus a compile-time offset, no per-access arithmetic.
template <int ROWS, int COLS = HDIM>
struct Tile {
    static constexpr int LD = COLS + 8;
    static constexpr int ELEMS = ROWS * LD;
    // Element offset of (row, col).
    static constexpr DEVICE int offset(int row, int col) { return row * LD + col; }
    // Byte offset, for ldmatrix addresses.
    static constexpr DEVICE u32 bytes(int row, int col) { return 2u * (u32)(row * LD + col); }
};

// Copies rows [row0, row0 + ROWS) of one head (row stride `stride`, `rows_valid` of them real, `head_dim` real
// columns) into a swizzled tile with cp.async; missing rows and columns become zeros.
template <int ROWS, int NTHREADS>
DEVICE void load_tile(u16 *tile, const u16 *src, long long stride, int rows_valid, int head_dim) {
    constexpr int CHUNKS_PER_ROW = HDIM / 8;
    constexpr int TOTAL = ROWS * CHUNKS_PER_ROW;
    const u32 base = smem_addr(tile);
    // Not unrolled: unrolled, every copy's address would be precomputed and held in registers across the
    // main loop, which the accumulators need.
#pragma unroll 1
    for (int i = threadIdx.x; i < TOTAL; i += NTHREADS) {
        const int r = i / CHUNKS_PER_ROW, c = (i % CHUNKS_PER_ROW) * 8;
        const bool ok = r < rows_valid && c < head_dim;
        cp_async16(base + Tile<ROWS>::bytes(r, c), ok ? src + r * stride + c : src, ok);
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Sequences and masks.
struct Seq {
    int len_q, len_k;
    int start_q, start_k;  // first token (variable-length batches), else 0
};

DEVICE Seq sequence(const AttnParams &p, int b) {
    Seq s;
    if (p.cu_seqlens_q) {
        s.start_q = p.cu_seqlens_q[b];
        s.len_q = p.cu_seqlens_q[b + 1] - s.start_q;
        s.start_k = p.cu_seqlens_k[b];
        s.len_k = p.cu_seqlens_k[b + 1] - s.start_k;
    } else {
        s.start_q = 0;
        s.start_k = 0;
        s.len_q = p.seqlen_q;
        s.len_k = p.seqlen_k;
    }
    return s;
}

// The attention kernels say whether a causal mask or window applies (IS_MASKED); the others do not use masks.
#ifndef IS_MASKED
#define IS_MASKED 1
#endif
// Query i sees key j when j < len_k and i + shift - left <= j <= i + shift + right (shift = len_k - len_q).
struct Mask {
    int shift, left, right, len_k;
    // Whether query i sees key j: below len_k and, under a mask, i - j within `offsets`. Joined with `&`, not the
    // short-circuit operators, which compiled to a branch and a convergence barrier per element (the Hopper
    // backward was 3-20% slower). Without a mask (IS_MASKED = 0: no causal mask, no window) only the key bound
    // applies.
    DEVICE bool visible(int i, int j) const {
        const int2 d = offsets();
        return (j < len_k) & (!IS_MASKED || ((i - j >= d.x) & (i - j <= d.y)));
    }
    // The same with the short-circuit operators: the portable forward keeps it, since there the branch-free form
    // spills 80 bytes (d = 128 under a mask, compiled for sm_90).
    DEVICE bool visible_branching(int i, int j) const {
        const int diag = i + shift;
        return j < len_k && (right < 0 || j <= diag + right) && (left < 0 || j >= diag - left);
    }
    // The mask as a range [lo, hi] of i - j (how far query i's diagonal lies past key j), for keys below len_k.
    DEVICE int2 offsets() const {
        return make_int2(right < 0 ? -0x7fffffff : -shift - right, left < 0 ? 0x7fffffff : left - shift);
    }
    // Keys [lo, hi) that query i sees (keys are never negative: no left window means lo = 0), for a thread that
    // tests many keys against the same query (the Hopper forward: its masked 128 x 128 softmax 6250 -> 1870 cycles
    // against the short-circuit test).
    DEVICE int2 keys(int i) const {
        const int diag = i + shift;
        return make_int2(left < 0 ? 0 : diag - left, right < 0 ? len_k : min(len_k, diag + right + 1));
    }
    // Key range [lo, hi) seen by some query of rows [r0, r1).
    DEVICE int lo(int r0) const { return left < 0 ? 0 : max(0, r0 + shift - left); }
    DEVICE int hi(int r1) const { return right < 0 ? len_k : min(len_k, r1 - 1 + shift + right + 1); }
    // Whether every query of [r0, r1) sees every key of [c0, c1).
    DEVICE bool full(int r0, int r1, int c0, int c1) const {
        return c1 <= len_k && (right < 0 || c1 - 1 <= r0 + shift + right) && (left < 0 || c0 >= r1 - 1 + shift - left);
    }
    // Query range [lo, hi) that sees some key of [c0, c1), within [0, len_q).
    DEVICE int rows_lo(int c0) const { return right < 0 ? 0 : max(0, c0 - shift - right); }
    DEVICE int rows_hi(int c1, int len_q) const { return left < 0 ? len_q : min(len_q, c1 - 1 - shift + left + 1); }
};

DEVICE Mask make_mask(const AttnParams &p, const Seq &s) {
    Mask m;
    m.shift = s.len_k - s.len_q;
    m.left = p.window_left;
    m.right = p.window_right;
    m.len_k = s.len_k;
    return m;
}

// The score of (query i, key j) in natural units from the raw product q.k: scale, softcap, ALiBi. Also returns
// d score / d (q.k) through `dscore` (backward).
DEVICE float score_mod(const AttnParams &p, float slope, int diag_minus_j, float raw, float *dscore) {
    float s = raw * p.scale;
    float d = p.scale;
    if (p.softcap > 0.f) {
        // tanh via exp2: accurate to a few ulp away from 0, and to ~1e-7 absolute near 0.
        float x = s / p.softcap;
        float e = fast_exp2(-2.f * LOG2E * fabsf(x));
        float t = __fdividef(1.f - e, 1.f + e);
        t = copysignf(t, x);
        s = p.softcap * t;
        d = p.scale * (1.f - t * t);
    }
    s -= slope * fabsf((float)diag_minus_j);
    if (dscore) *dscore = d;
    return s;
}
