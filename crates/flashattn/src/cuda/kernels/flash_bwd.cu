// Flash backward for sm_80+, by recomputation from the saved log-sum-exp (D = rowsum(dO * O) and the dQ
// conversion are in bwd_common.cuh).
//
// flash_bwd: one CTA per BLOCK_N keys of one (batch, key/value head). It keeps K and V in shared memory and
//   dK, dV in registers, and loops over the query heads of the group and the query blocks that see its keys:
//   S^T = K Q^T, dP^T = V dO^T (each warp 16 keys), P^T = exp(S^T - lse), dS^T = P^T (dP^T - D) * dscore,
//   dV += P^T dO, dK += dS^T Q, then dS through shared memory for dQ = dS K, added to an f32 accumulator (atomics;
//   or, deterministic, plain adds ordered by a semaphore per query block).
//
// Defines: BLOCK_M (queries per step), SUB_M (queries per sub-step), NWARPS, WARPS_D (warps sharing a key group,
// splitting dK/dV columns), DQ_PARTS, BULK_DQ, IS_MASKED, HAS_MOD, SMEM_BYTES (the shared memory the host allocates).

#include "common.cuh"
#include "bwd_common.cuh"

#define NTHREADS (NWARPS * 32)
#define KGROUPS (NWARPS / WARPS_D)
#define BLOCK_N (16 * KGROUPS)
#define HD_W (HDIM / WARPS_D)        // dK / dV columns per warp
#define DTW (HD_W / 8)
#ifndef SUB_M
#define SUB_M BLOCK_M
#endif
#define QT (SUB_M / 8)               // n8 tiles of S^T (queries of a sub-step)
#define KT (HDIM / 16)
#define QGROUPS (BLOCK_M / 16)
// DQ_PARTS (a define): warps sharing a query group of dQ, splitting its columns in whole 16-column pairs; the
// warps past QGROUPS * DQ_PARTS sit the dQ product out.
#define DQW (HDIM / DQ_PARTS)
#define DQT (DQW / 8)
// BULK_DQ (a define, 1 only on sm_90+): dQ staged in shared memory and added to its accumulator by bulk
// asynchronous reductions (the Hopper copy engine), else by atomics from the registers.
#if BULK_DQ && __CUDA_ARCH__ < 900
#error "BULK_DQ needs sm_90's bulk copies"
#endif
#define DQ_PAD 8  // floats between rows of the dQ staging tile: spreads a warp's stores over the banks
static_assert(QT % 2 == 0 && DTW % 2 == 0 && DQT % 2 == 0 && DQW * DQ_PARTS == HDIM, "tiles must split into 16-column pairs");
static_assert(QGROUPS * DQ_PARTS <= NWARPS, "not enough warps for the dQ split");

// Token index of (sequence start, row) in dense or variable-length layout.
DEVICE long long q_token(const AttnParams &p, int b, const Seq &s, int i) {
    return p.cu_seqlens_q ? (long long)s.start_q + i : (long long)b * p.seqlen_q + i;
}

extern "C" __global__ void __launch_bounds__(NTHREADS, 1) flash_bwd(const AttnParams p) {
    extern __shared__ __align__(128) u16 smem[];
    u16 *sK = smem;
    u16 *sV = sK + Tile<BLOCK_N>::ELEMS;
    // Query-side tiles are double-buffered: step st + 1 loads while step st computes.
    u16 *sQ0 = sV + Tile<BLOCK_N>::ELEMS;  // Q, dO of buffer 0, then of buffer 1
    u16 *sdS = sQ0 + 4 * Tile<BLOCK_M>::ELEMS;
    float *sStats0 = (float *)(sdS + Tile<BLOCK_N, BLOCK_M>::ELEMS);  // lse * log2(e) (+inf: no probability), D
    float *sdQ = sStats0 + 4 * BLOCK_M;  // BULK_DQ: this step's dQ, rows of HDIM + DQ_PAD floats
    auto sQ = [&](int buf) { return sQ0 + 2 * buf * Tile<BLOCK_M>::ELEMS; };
    auto sdO = [&](int buf) { return sQ(buf) + Tile<BLOCK_M>::ELEMS; };
    // The host allocates SMEM_BYTES for these buffers: K, V, two of Q and dO, dS, two of the statistics, and the
    // dQ staging tile where it is used.
    static_assert(2 * (2 * Tile<BLOCK_N>::ELEMS + 4 * Tile<BLOCK_M>::ELEMS + Tile<BLOCK_N, BLOCK_M>::ELEMS) +
                          4 * (4 * BLOCK_M) + (BULK_DQ ? 4 * BLOCK_M * (HDIM + DQ_PAD) : 0) <= SMEM_BYTES,
                  "shared memory: the layout outgrew the host's SMEM_BYTES (Variant::smem_bytes)");

    const int b = blockIdx.z, hk = blockIdx.y, n_block = blockIdx.x;
    const Seq seq = sequence(p, b);
    const int n0 = n_block * BLOCK_N;
    if (n0 >= seq.len_k) return;
    const int group = p.heads_q / p.heads_kv;
    const Mask mask = make_mask(p, seq);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int kg = warp / WARPS_D, dpart = warp % WARPS_D;  // key group, dK/dV column part
    const int qg = warp / DQ_PARTS, dqp = warp % DQ_PARTS;  // dQ query group, column part
    const bool dq_warp = warp < QGROUPS * DQ_PARTS;

    const u16 *k = p.k + b * p.k_batch + (long long)(seq.start_k + n0) * p.k_row + hk * p.k_head;
    const u16 *v = p.v + b * p.v_batch + (long long)(seq.start_k + n0) * p.v_row + hk * p.v_head;
    load_tile<BLOCK_N, NTHREADS>(sK, k, p.k_row, seq.len_k - n0, p.head_dim);
    load_tile<BLOCK_N, NTHREADS>(sV, v, p.v_row, seq.len_k - n0, p.head_dim);

    // Query blocks that see these keys.
    const int2 blocks = query_blocks(mask, seq, n0, BLOCK_N, BLOCK_M);
    const int m_lo = blocks.x, m_hi = blocks.y;
    const int steps = m_hi > m_lo ? (m_hi - m_lo) * group : 0;

    float acc_dk[DTW][4], acc_dv[DTW][4];
#pragma unroll
    for (int t = 0; t < DTW; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_dk[t][e] = acc_dv[t][e] = 0.f;

    // Each lane's ldmatrix addresses: a per-lane base plus compile-time offsets. A operands (K, V rows of the key
    // group), B operands (Q, dO rows), transposed B operands (dO, Q, K columns), and dS^T read transposed as A.
    const int m8 = lane / 8;
    const u32 a_off = Tile<BLOCK_N>::bytes(kg * 16 + (lane % 16), (lane / 16) * 8);
    const u32 k_a = smem_addr(sK) + a_off, v_a = smem_addr(sV) + a_off;
    const u32 b_off = Tile<BLOCK_M>::bytes((m8 / 2) * 8 + (lane % 8), (m8 % 2) * 8);
    const u32 q_b0 = smem_addr(sQ(0)) + b_off, do_b0 = smem_addr(sdO(0)) + b_off;
    const u32 bt_off = Tile<BLOCK_M>::bytes((m8 % 2) * 8 + (lane % 8), dpart * HD_W + (m8 / 2) * 8);
    const u32 q_bt0 = smem_addr(sQ(0)) + bt_off, do_bt0 = smem_addr(sdO(0)) + bt_off;
    const u32 buf_bytes = 2 * 2 * Tile<BLOCK_M>::ELEMS;  // from one buffer's Q to the next's
    const u32 k_bt = smem_addr(sK) + Tile<BLOCK_N>::bytes((m8 % 2) * 8 + (lane % 8), dqp * DQW + (m8 / 2) * 8);
    const u32 ds_at = smem_addr(sdS) + Tile<BLOCK_N, BLOCK_M>::bytes((m8 / 2) * 8 + (lane % 8), qg * 16 + (m8 % 2) * 8);

    // Loads the query-side tiles of step `st` (head, query block) into buffer st % 2.
    auto load_step = [&](int st) {
        const int buf = st & 1;
        float *sLse = sStats0 + buf * 2 * BLOCK_M, *sDelta = sLse + BLOCK_M;
        const int h = hk * group + st / (m_hi - m_lo);
        const int m0 = (m_lo + st % (m_hi - m_lo)) * BLOCK_M;
        const u16 *q = p.q + b * p.q_batch + (long long)(seq.start_q + m0) * p.q_row + h * p.q_head;
        const u16 *dout = p.dout + b * p.do_batch + (long long)(seq.start_q + m0) * p.do_row + h * p.do_head;
        load_tile<BLOCK_M, NTHREADS>(sQ(buf), q, p.q_row, seq.len_q - m0, p.head_dim);
        load_tile<BLOCK_M, NTHREADS>(sdO(buf), dout, p.do_row, seq.len_q - m0, p.head_dim);
        for (int t = threadIdx.x; t < BLOCK_M; t += NTHREADS) {
            const float2 stats = step_stats(p, b, h, seq, m0 + t);
            sLse[t] = stats.x;
            sDelta[t] = stats.y;
        }
    };
    if (steps > 0) load_step(0);
    cp_async_commit();

    for (int st = 0; st < steps; ++st) {
        const int h = hk * group + st / (m_hi - m_lo);
        const int m_block = m_lo + st % (m_hi - m_lo);
        const int m0 = m_block * BLOCK_M;
        const float slope = (HAS_MOD && p.alibi) ? p.alibi[b * p.alibi_batch_stride + h] : 0.f;
        cp_async_wait_all();
        __syncthreads();  // step st is in; every warp is done with step st - 1 (its buffer is free)
        if (st + 1 < steps) load_step(st + 1);
        cp_async_commit();
        const int buf = st & 1;
        const u32 q_b = q_b0 + buf * buf_bytes, do_b = do_b0 + buf * buf_bytes;
        const u32 q_bt = q_bt0 + buf * buf_bytes, do_bt = do_bt0 + buf * buf_bytes;
        const float *sLse = sStats0 + buf * 2 * BLOCK_M, *sDelta = sLse + BLOCK_M;

        const bool need_mask = !mask.full(m0, m0 + BLOCK_M, n0, n0 + BLOCK_N);
        // The query block in sub-steps of SUB_M queries: S^T and dP^T of a sub-step fit the registers that
        // dK and dV leave; loads, barriers and dQ stay per block. Not unrolled, so they do not overlap.
#pragma unroll 1
        for (int q0 = 0; q0 < BLOCK_M; q0 += SUB_M) {
            // S^T = K Q^T and dP^T = V dO^T for this warp's 16 keys and queries [q0, q0 + SUB_M).
            float acc_s[QT][4], acc_dp[QT][4];
#pragma unroll
            for (int t = 0; t < QT; ++t)
#pragma unroll
                for (int e = 0; e < 4; ++e) acc_s[t][e] = acc_dp[t][e] = 0.f;
#pragma unroll
            for (int kk = 0; kk < KT; ++kk) {
                u32 ak[4], av[4];
                ldsm_x4(ak, k_a + Tile<BLOCK_N>::bytes(0, kk * 16));
                ldsm_x4(av, v_a + Tile<BLOCK_N>::bytes(0, kk * 16));
#pragma unroll
                for (int qp = 0; qp < QT / 2; ++qp) {
                    u32 bq[4], bd[4];
                    ldsm_x4(bq, q_b + Tile<BLOCK_M>::bytes(q0 + qp * 16, kk * 16));
                    ldsm_x4(bd, do_b + Tile<BLOCK_M>::bytes(q0 + qp * 16, kk * 16));
                    mma16816(acc_s[2 * qp], ak, bq);
                    mma16816(acc_s[2 * qp + 1], ak, bq + 2);
                    mma16816(acc_dp[2 * qp], av, bd);
                    mma16816(acc_dp[2 * qp + 1], av, bd + 2);
                }
            }

            // P^T and dS^T in place of S^T and dP^T.
#pragma unroll
            for (int t = 0; t < QT; ++t) {
                // The two query columns this thread holds in tile t: their lse and D in one 8-byte load each.
                const int c = q0 + t * 8 + 2 * (lane % 4);
                const float2 lse2 = *(const float2 *)(sLse + c), delta2 = *(const float2 *)(sDelta + c);
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int j = n0 + kg * 16 + lane / 4 + 8 * (e / 2), i = m0 + c + (e % 2);
                    const float lse = e % 2 ? lse2.y : lse2.x, delta = e % 2 ? delta2.y : delta2.x;
                    float dscore;
                    const float pr = probability(p, mask, need_mask, slope, i, j, acc_s[t][e], lse, dscore);
                    acc_s[t][e] = pr;
                    acc_dp[t][e] = pr * (acc_dp[t][e] - delta) * dscore;
                }
            }

            // dV += P^T dO and dK += dS^T Q (this warp's keys and columns).
#pragma unroll
            for (int kq = 0; kq < SUB_M / 16; ++kq) {
                u32 ap[4], ad[4];
                pack_a(ap, acc_s[2 * kq], acc_s[2 * kq + 1]);
                pack_a(ad, acc_dp[2 * kq], acc_dp[2 * kq + 1]);
#pragma unroll
                for (int dp = 0; dp < DTW / 2; ++dp) {
                    u32 bd[4], bq[4];
                    ldsm_x4_t(bd, do_bt + Tile<BLOCK_M>::bytes(q0 + kq * 16, dp * 16));
                    ldsm_x4_t(bq, q_bt + Tile<BLOCK_M>::bytes(q0 + kq * 16, dp * 16));
                    mma16816(acc_dv[2 * dp], ap, bd);
                    mma16816(acc_dv[2 * dp + 1], ap, bd + 2);
                    mma16816(acc_dk[2 * dp], ad, bq);
                    mma16816(acc_dk[2 * dp + 1], ad, bq + 2);
                }
            }

            // dS^T to shared memory (one warp of each key group writes it).
            if (dpart == 0) {
#pragma unroll
                for (int t = 0; t < QT; ++t)
#pragma unroll
                    for (int hf = 0; hf < 2; ++hf) {
                        const int r = kg * 16 + lane / 4 + 8 * hf, c = q0 + t * 8 + 2 * (lane % 4);
                        *(u32 *)(sdS + Tile<BLOCK_N, BLOCK_M>::offset(r, c)) = pack2(acc_dp[t][2 * hf], acc_dp[t][2 * hf + 1]);
                    }
            }
        }
#if BULK_DQ
        // The previous step's bulk reduction must have read sdQ before it is written again (after this barrier).
        if (!p.deterministic && threadIdx.x < BLOCK_M) bulk_wait_read();
#endif
        __syncthreads();  // dS is complete

        // dQ = dS K for query group qg, columns part dqp.
        float acc_dq[DQT][4];
#pragma unroll
        for (int t = 0; t < DQT; ++t)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc_dq[t][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < (dq_warp ? BLOCK_N / 16 : 0); ++kk) {
            u32 a[4];
            ldsm_x4_t(a, ds_at + Tile<BLOCK_N, BLOCK_M>::bytes(kk * 16, 0));
#pragma unroll
            for (int dp = 0; dp < DQT / 2; ++dp) {
                u32 bk[4];
                ldsm_x4_t(bk, k_bt + Tile<BLOCK_N>::bytes(kk * 16, dp * 16));
                mma16816(acc_dq[2 * dp], a, bk);
                mma16816(acc_dq[2 * dp + 1], a, bk + 2);
            }
        }
        float *dq = p.dq_accum + (q_token(p, b, seq, m0) * p.heads_q + h) * HDIM;
        const long long dq_row = (long long)p.heads_q * HDIM;
        int *sem = 0;
        int turn = 0;
        if (p.deterministic) {
            // Key blocks add to this query block in order: wait for the ones before this one.
            const int num_m = (p.seqlen_q + BLOCK_M - 1) / BLOCK_M;
            sem = p.dq_semaphore + ((long long)b * p.heads_q + h) * num_m + m_block;
            turn = n_block;
#if IS_MASKED
            turn -= mask.lo(m0) / BLOCK_N;
#endif
            if (threadIdx.x == 0) {
                while (atomicAdd(sem, 0) != turn) {
                }
            }
            __syncthreads();
            __threadfence();
        }
#if BULK_DQ
        if (!p.deterministic) {
            // The tile goes through shared memory to one bulk reduce-add per query row: full 512-byte rows instead
            // of scattered 4-byte atomics.
            if (dq_warp) {
#pragma unroll
                for (int t = 0; t < DQT; ++t)
#pragma unroll
                    for (int hf = 0; hf < 2; ++hf) {
                        const int il = qg * 16 + lane / 4 + 8 * hf, c = dqp * DQW + t * 8 + 2 * (lane % 4);
                        *(float2 *)(sdQ + il * (HDIM + DQ_PAD) + c) = make_float2(acc_dq[t][2 * hf], acc_dq[t][2 * hf + 1]);
                    }
            }
            fence_proxy_async();
            __syncthreads();
            if (threadIdx.x < BLOCK_M && m0 + (int)threadIdx.x < seq.len_q) {
                bulk_reduce_add_f32(dq + threadIdx.x * dq_row, smem_addr(sdQ + threadIdx.x * (HDIM + DQ_PAD)), HDIM * 4);
            }
            continue;
        }
#endif
#pragma unroll
        for (int t = 0; t < DQT; ++t)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int il = qg * 16 + lane / 4 + 8 * (e / 2), c = dqp * DQW + t * 8 + 2 * (lane % 4) + (e % 2);
                if (dq_warp && m0 + il < seq.len_q) {
                    float *at = dq + il * dq_row + c;
                    if (p.deterministic) {
                        *at += acc_dq[t][e];
                    } else {
                        atomicAdd(at, acc_dq[t][e]);
                    }
                }
            }
        if (p.deterministic) {
            __threadfence();
            __syncthreads();
            if (threadIdx.x == 0) atomicExch(sem, turn + 1);
        }
    }
    cp_async_wait_all();
#if BULK_DQ
    if (threadIdx.x < BLOCK_M) bulk_wait_all();
#endif

    // dK and dV of this warp's keys and columns.
    u16 *dk = p.dk + b * p.dk_batch + (long long)(seq.start_k + n0) * p.dk_row + hk * p.dk_head;
    u16 *dv = p.dv + b * p.dk_batch + (long long)(seq.start_k + n0) * p.dk_row + hk * p.dk_head;
#pragma unroll
    for (int t = 0; t < DTW; ++t)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            const int r = kg * 16 + lane / 4 + 8 * hf, c = dpart * HD_W + t * 8 + 2 * (lane % 4);
            if (n0 + r < seq.len_k && c < p.head_dim) {
                *(u32 *)(dk + (long long)r * p.dk_row + c) = pack2(acc_dk[t][2 * hf], acc_dk[t][2 * hf + 1]);
                *(u32 *)(dv + (long long)r * p.dk_row + c) = pack2(acc_dv[t][2 * hf], acc_dv[t][2 * hf + 1]);
            }
        }
}
