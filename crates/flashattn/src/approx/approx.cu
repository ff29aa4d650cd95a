// The element-wise and row-wise steps of Linformer and Performer on the GPU; their matrix products run on cuBLAS.
// Working tensors are f32, head-major: (heads, rows, cols) with `rows` padded to `prows` per head.

#include "elem.cuh"

// (batch, seq, heads_src, d) 16-bit -> (batch * heads, prows, d) f32, head h reading source head h / group; rows
// past `seq` become zeros.
extern "C" __global__ void heads_to_f32(const u16 *src, long long sb, long long ss, long long sh, float *dst, int batch,
                                        int seq, int prows, int heads, int group, int d) {
    const long long n = (long long)batch * heads * prows * d;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < n; e += (long long)gridDim.x * blockDim.x) {
        const int c = e % d;
        const long long row = e / d;
        const int i = row % prows;
        const long long bh = row / prows;
        const int h = bh % heads, b = bh / heads;
        dst[e] = i < seq ? to_float(src[b * sb + i * ss + (h / group) * sh + c]) : 0.f;
    }
}

// (batch * heads_src, prows, d) f32 -> (batch, seq, heads, d) 16-bit, head h summing source heads
// h * group .. h * group + group - 1 (the gradients of shared key/value heads).
extern "C" __global__ void heads_from_f32(const float *src, u16 *dst, long long db, long long ds, long long dh, int batch,
                                          int seq, int prows, int heads, int group, int d) {
    const long long n = (long long)batch * seq * heads * d;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < n; e += (long long)gridDim.x * blockDim.x) {
        const int c = e % d;
        const int h = (e / d) % heads;
        const int i = (e / d / heads) % seq;
        const int b = e / d / heads / seq;
        float acc = 0.f;
        for (int g = 0; g < group; ++g) acc += src[(((long long)b * heads + h) * group + g) * prows * d + (long long)i * d + c];
        dst[b * db + i * ds + h * dh + c] = from_float(acc);
    }
}

// One warp per row of n values: x = softmax(scale * x).
extern "C" __global__ void softmax_rows(float *x, long long rows, int n, float scale) {
    const long long row = blockIdx.x * (long long)(blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= rows) return;
    float *r = x + row * n;
    float mx = NEG_INF;
    for (int j = lane; j < n; j += 32) mx = fmaxf(mx, r[j] * scale);
    for (int o = 16; o > 0; o /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    float sum = 0.f;
    for (int j = lane; j < n; j += 32) {
        const float e = __expf(r[j] * scale - mx);
        r[j] = e;
        sum += e;
    }
    for (int o = 16; o > 0; o /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    const float inv = 1.f / sum;
    for (int j = lane; j < n; j += 32) r[j] *= inv;
}

// One warp per row: dp = scale * p * (dp - sum(p * dp)), the softmax gradient.
extern "C" __global__ void softmax_grad_rows(const float *p, float *dp, long long rows, int n, float scale) {
    const long long row = blockIdx.x * (long long)(blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const float *pr = p + row * n;
    float *g = dp + row * n;
    float dot = 0.f;
    for (int j = lane; j < n; j += 32) dot += pr[j] * g[j];
    for (int o = 16; o > 0; o /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, o);
    for (int j = lane; j < n; j += 32) g[j] = scale * pr[j] * (g[j] - dot);
}

// One warp per row: a += -scale |x|^2 / 2 (the Gaussian term of the positive features) and rowmax = max_r a.
extern "C" __global__ void feature_prep(float *a, const float *x, long long rows, int m, int d, float scale, float *rowmax) {
    const long long row = blockIdx.x * (long long)(blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= rows) return;
    float sq = 0.f;
    for (int c = lane; c < d; c += 32) sq += x[row * d + c] * x[row * d + c];
    for (int o = 16; o > 0; o /= 2) sq += __shfl_xor_sync(0xffffffffu, sq, o);
    const float u = -0.5f * scale * sq;
    float mx = NEG_INF;
    for (int r = lane; r < m; r += 32) {
        const float v = a[row * m + r] + u;
        a[row * m + r] = v;
        mx = fmaxf(mx, v);
    }
    for (int o = 16; o > 0; o /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    if (lane == 0) rowmax[row] = mx;
}

// One block per group of rows (a head): out[g] = max of its first `valid` row maxima.
extern "C" __global__ void group_max(const float *rowmax, int rows_per_group, int valid, float *out) {
    __shared__ float part[32];
    const float *r = rowmax + (long long)blockIdx.x * rows_per_group;
    float mx = NEG_INF;
    for (int i = threadIdx.x; i < valid; i += blockDim.x) mx = fmaxf(mx, r[i]);
    for (int o = 16; o > 0; o /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = mx;
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < blockDim.x / 32; ++w) mx = fmaxf(mx, part[w]);
        out[blockIdx.x] = fmaxf(mx, part[0]);
    }
}

// phi = exp(a - stabilizer) * norm, the stabilizer being the row's max or (when groupmax is set) its group's;
// rows past `valid` in their group of `prows` are padding and become 0.
extern "C" __global__ void feature_exp(float *a, long long rows, int m, const float *rowmax, const float *groupmax, int prows,
                                       int valid, float norm) {
    const long long n = rows * m;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < n; e += (long long)gridDim.x * blockDim.x) {
        const long long row = e / m;
        const float c = groupmax ? groupmax[row / prows] : rowmax[row];
        a[e] = (row % prows) < valid ? __expf(a[e] - c) * norm : 0.f;
    }
}

// out = num / den per row (0 where den is 0: a query that sees no key).
extern "C" __global__ void ratio_rows(const float *num, const float *den, float *out, long long rows, int d) {
    const long long n = rows * d;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < n; e += (long long)gridDim.x * blockDim.x) {
        const float dn = den[e / d];
        out[e] = dn > 0.f ? num[e] / dn : 0.f;
    }
}

// One warp per row of O = num / den: dnum = dO / den, dden = -(dO . O) / den.
extern "C" __global__ void ratio_grad(const float *dout, const float *out, const float *den, float *dnum, float *dden, long long rows,
                                      int d) {
    const long long row = blockIdx.x * (long long)(blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const float dn = den[row];
    float dot = 0.f;
    for (int c = lane; c < d; c += 32) {
        const float g = dout[row * d + c];
        dot += g * out[row * d + c];
        dnum[row * d + c] = dn > 0.f ? g / dn : 0.f;
    }
    for (int o = 16; o > 0; o /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, o);
    if (lane == 0) dden[row] = dn > 0.f ? -dot / dn : 0.f;
}

// One warp per row: dphi *= phi and rowsum = sum_r dphi.
extern "C" __global__ void feature_grad_prep(const float *phi, float *dphi, float *rowsum, long long rows, int m) {
    const long long row = blockIdx.x * (long long)(blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= rows) return;
    float s = 0.f;
    for (int r = lane; r < m; r += 32) {
        const float g = dphi[row * m + r] * phi[row * m + r];
        dphi[row * m + r] = g;
        s += g;
    }
    for (int o = 16; o > 0; o /= 2) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane == 0) rowsum[row] = s;
}

// dx = g - scale * x * rowsum, with g = (dphi o phi) W' from the matrix product (W' = sqrt(scale) W).
extern "C" __global__ void feature_grad_finish(float *dx, const float *x, const float *rowsum, long long rows, int d, float scale) {
    const long long n = rows * d;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < n; e += (long long)gridDim.x * blockDim.x) {
        dx[e] -= scale * x[e] * rowsum[e / d];
    }
}

// Zeros the entries above the diagonal of each c x c block (keys after the query in a causal chunk).
extern "C" __global__ void causal_mask_blocks(float *a, long long blocks, int c) {
    const long long n = blocks * c * c;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < n; e += (long long)gridDim.x * blockDim.x) {
        const int j = e % c, i = (e / c) % c;
        if (j > i) a[e] = 0.f;
    }
}

// In place, per head: s[chunk] becomes the sum of the chunks before it (or, `reverse`, after it), elements of
// `elems` floats; one thread per (head, element).
extern "C" __global__ void exclusive_scan_chunks(float *s, long long heads, int chunks, long long elems, int reverse) {
    const long long n = heads * elems;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < n; e += (long long)gridDim.x * blockDim.x) {
        const long long h = e / elems, x = e % elems;
        float acc = 0.f;
        for (int t = 0; t < chunks; ++t) {
            const int c = reverse ? chunks - 1 - t : t;
            float *p = s + (h * chunks + c) * elems + x;
            const float v = *p;
            *p = acc;
            acc += v;
        }
    }
}
