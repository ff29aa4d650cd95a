// Flash forward, FlashAttention-2 design for sm_80+: one CTA per BLOCK_M query rows of one (batch, head); NWARPS
// warps each own BLOCK_M / NWARPS rows (two m16 tiles when BLOCK_M = 128, so each K/V fragment read from shared
// memory feeds two tensor-core instructions). Key/value blocks of BLOCK_N rows stream through shared memory with
// cp.async: K is double-buffered (block n-1 loads during all of block n), V loads during the first Q K^T. Each
// block is processed in sub-blocks of SUB_N keys (S = Q K^T, online softmax, O += P V), which bounds the score
// registers; P stays in registers; the output rescale is skipped when no row's max moved.
//
// Defines: BLOCK_M, BLOCK_N, SUB_N, NWARPS, IS_MASKED (causal / sliding window), HAS_MOD (softcap / ALiBi),
// SMEM_BYTES (the shared memory the host allocates).

#include "common.cuh"

#define NTHREADS (NWARPS * 32)
#define ROWS_W (BLOCK_M / NWARPS)  // query rows per warp
#define MT (ROWS_W / 16)           // m16 tiles per warp
#define NT (SUB_N / 8)             // n8 tiles of a sub-block of S
#define DT (HDIM / 8)              // n8 tiles of O
#define KT (HDIM / 16)             // k16 steps of Q K^T
#ifndef S_UNROLL
#define S_UNROLL KT
#endif

template <int N>
DEVICE void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

extern "C" __global__ void __launch_bounds__(NTHREADS, 1) flash_fwd(const AttnParams p) {
    extern __shared__ __align__(128) u16 smem[];
    u16 *sQ = smem;
    u16 *sK = sQ + Tile<BLOCK_M>::ELEMS;  // two buffers
    u16 *sV = sK + 2 * Tile<BLOCK_N>::ELEMS;
    // The host allocates SMEM_BYTES for these buffers: Q, two K, V.
    static_assert(2 * (Tile<BLOCK_M>::ELEMS + 3 * Tile<BLOCK_N>::ELEMS) <= SMEM_BYTES,
                  "shared memory: the layout outgrew the host's SMEM_BYTES (Variant::smem_bytes)");

    const int b = blockIdx.z, h = blockIdx.y;
    const Seq seq = sequence(p, b);
    const int num_m = (seq.len_q + BLOCK_M - 1) / BLOCK_M;
#if IS_MASKED
    // Longest blocks (the last rows, under a causal mask) first.
    const int m_block = num_m - 1 - (int)blockIdx.x;
#else
    const int m_block = blockIdx.x;
#endif
    if (m_block < 0 || m_block >= num_m) return;
    const int m0 = m_block * BLOCK_M;
    const int hk = h / (p.heads_q / p.heads_kv);
    const Mask mask = make_mask(p, seq);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const float slope = (HAS_MOD && p.alibi) ? p.alibi[b * p.alibi_batch_stride + h] : 0.f;

    const u16 *q = p.q + b * p.q_batch + (long long)(seq.start_q + m0) * p.q_row + h * p.q_head;
    // Row `n` of this head's keys or values (recomputed where used: cheaper than a register held across the loop).
    auto k_row = [&](int n) { return p.k + b * p.k_batch + (long long)(seq.start_k + n) * p.k_row + hk * p.k_head; };
    auto v_row = [&](int n) { return p.v + b * p.v_batch + (long long)(seq.start_k + n) * p.v_row + hk * p.v_head; };

    const int rows_valid = min(BLOCK_M, seq.len_q - m0);
    int n_lo = 0, n_hi = (seq.len_k + BLOCK_N - 1) / BLOCK_N;
#if IS_MASKED
    n_lo = mask.lo(m0) / BLOCK_N;
    n_hi = min(n_hi, (mask.hi(m0 + BLOCK_M) + BLOCK_N - 1) / BLOCK_N);
#endif

    float acc_o[MT][DT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int dt = 0; dt < DT; ++dt)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc_o[mt][dt][e] = 0.f;
    // Per thread: rows (mt, half) = warp * ROWS_W + mt * 16 + lane / 4 + 8 * half.
    float row_max[MT][2], row_sum[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            row_max[mt][hf] = NEG_INF;
            row_sum[mt][hf] = 0.f;
        }

    load_tile<BLOCK_M, NTHREADS>(sQ, q, p.q_row, rows_valid, p.head_dim);
    if (n_hi > n_lo) load_tile<BLOCK_N, NTHREADS>(sK, k_row((n_hi - 1) * BLOCK_N), p.k_row, seq.len_k - (n_hi - 1) * BLOCK_N, p.head_dim);
    cp_async_commit();

    // Each lane's ldmatrix addresses: a per-lane base plus compile-time offsets.
    const u32 q_lane = smem_addr(sQ) + Tile<BLOCK_M>::bytes(warp * ROWS_W + (lane % 16), (lane / 16) * 8);
    const u32 k_lane = smem_addr(sK) + Tile<BLOCK_N>::bytes(((lane / 8) / 2) * 8 + (lane % 8), ((lane / 8) % 2) * 8);
    const u32 v_lane = smem_addr(sV) + Tile<BLOCK_N>::bytes(((lane / 8) % 2) * 8 + (lane % 8), ((lane / 8) / 2) * 8);
    // Without a score transform, scores stay raw products and the exponential applies the scale.
    const float exp_scale = HAS_MOD ? LOG2E : p.scale_log2;

    int buf = 0;
    for (int n_block = n_hi - 1; n_block >= n_lo; --n_block, buf ^= 1) {
        const int n0 = n_block * BLOCK_N;
        cp_async_wait<0>();
        __syncthreads();  // K(n) is in; every warp is done with V(n+1) and the other K buffer
        load_tile<BLOCK_N, NTHREADS>(sV, v_row(n0), p.v_row, seq.len_k - n0, p.head_dim);
        cp_async_commit();
        if (n_block > n_lo) {
            load_tile<BLOCK_N, NTHREADS>(sK + (buf ^ 1) * Tile<BLOCK_N>::ELEMS, k_row(n0 - BLOCK_N), p.k_row, seq.len_k - (n0 - BLOCK_N), p.head_dim);
        }
        cp_async_commit();
        const u32 k_buf = k_lane + buf * 2 * Tile<BLOCK_N>::ELEMS;

        // Not unrolled: overlapping one sub-block's Q K^T with the previous one's P V would need more registers.
#pragma unroll 1
        for (int sb = 0; sb < BLOCK_N / SUB_N; ++sb) {
            const int c0 = n0 + sb * SUB_N;
            // S = Q K^T for keys [c0, c0 + SUB_N).
            float acc_s[MT][NT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) acc_s[mt][nt][e] = 0.f;
#pragma unroll S_UNROLL
            for (int kk = 0; kk < KT; ++kk) {
                u32 a[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) ldsm_x4(a[mt], q_lane + Tile<BLOCK_M>::bytes(mt * 16, kk * 16));
#pragma unroll
                for (int np = 0; np < NT / 2; ++np) {
                    u32 bk[4];
                    ldsm_x4(bk, k_buf + Tile<BLOCK_N>::bytes(sb * SUB_N + np * 16, kk * 16));
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        mma16816(acc_s[mt][2 * np], a[mt], bk);
                        mma16816(acc_s[mt][2 * np + 1], a[mt], bk + 2);
                    }
                }
            }

            // Scores: transform and mask where needed.
            const bool need_mask = !mask.full(m0, m0 + BLOCK_M, c0, c0 + SUB_N);
            if (HAS_MOD || need_mask) {
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                        for (int e = 0; e < 4; ++e) {
                            const int i = m0 + warp * ROWS_W + mt * 16 + lane / 4 + 8 * (e / 2);
                            const int j = c0 + nt * 8 + 2 * (lane % 4) + (e % 2);
                            float s = acc_s[mt][nt][e];
                            if (HAS_MOD) s = score_mod(p, slope, i + mask.shift - j, s, 0);
                            if (need_mask && !mask.visible_branching(i, j)) s = NEG_INF;
                            acc_s[mt][nt][e] = s;
                        }
            }

            // Online softmax: new max, P = exp2(s * c - max * c), running sum, and the rescale factors.
            float corr[MT][2];
            bool moved = false;
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int hf = 0; hf < 2; ++hf) {
                    float mx = row_max[mt][hf];
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt) mx = fmaxf(mx, fmaxf(acc_s[mt][nt][2 * hf], acc_s[mt][nt][2 * hf + 1]));
                    mx = quad_max(mx);
                    // A row with no visible key so far keeps max -inf: subtract 0 so exp2(-inf) = 0.
                    const float base = mx == NEG_INF ? 0.f : mx * exp_scale;
                    corr[mt][hf] = fast_exp2(row_max[mt][hf] * exp_scale - base);
                    moved |= mx != row_max[mt][hf];
                    row_max[mt][hf] = mx;
                    float sum = 0.f;
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                        for (int e = 0; e < 2; ++e) {
                            const float pr = fast_exp2(acc_s[mt][nt][2 * hf + e] * exp_scale - base);
                            acc_s[mt][nt][2 * hf + e] = pr;
                            sum += pr;
                        }
                    row_sum[mt][hf] = row_sum[mt][hf] * corr[mt][hf] + sum;
                }
            // Once the maxima settle, most sub-blocks move none of a warp's rows: skip the rescale then.
            if (__any_sync(0xffffffffu, moved)) {
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int dt = 0; dt < DT; ++dt)
#pragma unroll
                        for (int e = 0; e < 4; ++e) acc_o[mt][dt][e] *= corr[mt][e / 2];
            }

            if (sb == 0) {
                cp_async_wait<1>();  // V(n) is in (the next K may still be loading)
                __syncthreads();
            }

            // O += P V: two n8 tiles of P make the A operand of one k16 slice.
#pragma unroll
            for (int kk = 0; kk < SUB_N / 16; ++kk) {
                u32 a[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) pack_a(a[mt], acc_s[mt][2 * kk], acc_s[mt][2 * kk + 1]);
#pragma unroll
                for (int dp = 0; dp < DT / 2; ++dp) {
                    u32 bv[4];
                    ldsm_x4_t(bv, v_lane + Tile<BLOCK_N>::bytes(sb * SUB_N + kk * 16, dp * 16));
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        mma16816(acc_o[mt][2 * dp], a[mt], bv);
                        mma16816(acc_o[mt][2 * dp + 1], a[mt], bv + 2);
                    }
                }
            }
        }
    }
    cp_async_wait<0>();  // nothing may be in flight at exit (the Q tile, when no key block ran)

    // Epilogue: O / l and the log-sum-exp; a row that saw no key gets O = 0 and lse = -inf.
    // The varlen selects are redundant (batch strides are 0 then) but without them ptxas spills the d = 128 sm_90
    // variant, which sits at the register limit.
    u16 *out = p.out + (p.cu_seqlens_q ? 0 : b * p.o_batch) + (long long)(seq.start_q + m0) * p.o_row + h * p.o_head;
    float *lse = p.lse + (p.cu_seqlens_q ? 0 : b * p.lse_batch) + h * p.lse_head + seq.start_q + m0;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            const float sum = quad_sum(row_sum[mt][hf]);
            const float inv = sum > 0.f ? 1.f / sum : 0.f;
            const int r = warp * ROWS_W + mt * 16 + lane / 4 + 8 * hf;
            if (r < rows_valid) {
#pragma unroll
                for (int dt = 0; dt < DT; ++dt) {
                    const int c = dt * 8 + 2 * (lane % 4);
                    if (c < p.head_dim) {
                        *(u32 *)(out + (long long)r * p.o_row + c) = pack2(acc_o[mt][dt][2 * hf] * inv, acc_o[mt][dt][2 * hf + 1] * inv);
                    }
                }
                if (lane % 4 == 0) {
                    const float mx = row_max[mt][hf];
                    lse[r] = sum > 0.f ? (HAS_MOD ? mx : mx * p.scale) + logf(sum) : NEG_INF;
                }
            }
        }
}
