// Shared pieces of the Hopper (sm_90a) kernels: tensor maps and TMA copies, mbarriers, wgmma, shared-memory
// matrix descriptors and register reallocation.

#pragma once
#include "common.cuh"

// A CUtensorMap, passed by value.
struct __align__(64) TmaMap {
    u64 words[16];
};

// ---------------------------------------------------------------------------------------------------------------
// mbarriers, TMA, wgmma, register reallocation.
DEVICE void mbar_init(u32 bar, int count) { asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count)); }
DEVICE void mbar_expect_tx(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
DEVICE void mbar_arrive(u32 bar) { asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory"); }
DEVICE void mbar_wait(u32 bar, u32 parity) {
    u32 done;
    do {
        asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
                     : "=r"(done) : "r"(bar), "r"(parity) : "memory");
    } while (!done);
}

// Box (64 columns, rows) at (col, row, head, batch) of a 4-D tensor map into shared memory; completes on `bar`.
DEVICE void tma_load(u32 dst, const TmaMap &map, int col, int row, int head, int batch, u32 bar) {
    asm volatile("cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], [%6];\n"
                 ::"r"(dst), "l"((u64)&map), "r"(col), "r"(row), "r"(head), "r"(batch), "r"(bar) : "memory");
}

// The same box into the shared memory of every CTA of the cluster in `ctas` (a bit per rank), at the same offset
// in each, completing on the mbarrier at `bar`'s offset in each.
DEVICE void tma_load_multicast(u32 dst, const TmaMap &map, int col, int row, int head, int batch, u32 bar, u16 ctas) {
    asm volatile("cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes.multicast::cluster [%0], [%1, {%2, %3, %4, %5}], [%6], %7;\n"
                 ::"r"(dst), "l"((u64)&map), "r"(col), "r"(row), "r"(head), "r"(batch), "r"(bar), "h"(ctas) : "memory");
}

// Clusters: this CTA's rank, a shared-memory address of this CTA as the same offset in the CTA of rank `rank`,
// an arrival on an mbarrier there, and a barrier of all the cluster's threads (shared memory written before it,
// by any of them, is visible after it).
// (Not volatile: the rank is fixed, so the compiler may read it once.)
DEVICE u32 cluster_rank() {
    u32 r;
    asm("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
    return r;
}
DEVICE u32 cluster_addr(u32 addr, u32 rank) {
    u32 r;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(r) : "r"(addr), "r"(rank));
    return r;
}
// (Release at CTA scope: at cluster scope ptxas puts a MEMBAR.ALL.GPU before every arrival, and the forward
// measured 30% slower. A stage's readers are wgmma and the writer TMA, both asynchronous: the CTA's order suffices.)
DEVICE void mbar_arrive_cluster(u32 bar) {
    asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
DEVICE void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release;\nbarrier.cluster.wait.acquire;\n" ::: "memory");
}

// Stores a box (64 columns, rows) from shared memory to (col, row, head, batch) of a 4-D tensor map, in the bulk
// group of the issuing thread; the parts past the tensor's edges are dropped.
DEVICE void tma_store(const TmaMap &map, u32 src, int col, int row, int head, int batch) {
    asm volatile("cp.async.bulk.tensor.4d.global.shared::cta.tile.bulk_group [%0, {%1, %2, %3, %4}], [%5];\n"
                 ::"l"((u64)&map), "r"(col), "r"(row), "r"(head), "r"(batch), "r"(src) : "memory");
}

// Tiles of 16-bit elements in shared memory are HDIM / 64 slabs of `rows` rows x 64 columns (128 bytes per row,
// 128-byte swizzle), each 1024-byte aligned.
#define SLAB(rows) ((rows) * 128)  // bytes of one slab

// The batch coordinate of a tensor map: a variable-length batch's map has one batch (its sequences are rows).
DEVICE int map_batch(const AttnParams &p, int b) { return p.cu_seqlens_q ? 0 : b; }

// A warp's staging box for TMA stores and reductions: 16 rows of 128 bytes (64 16-bit or 32 f32 columns), SLAB(16)
// bytes, in the same swizzle: the address of 16-byte chunk `chunk` of row `row` in the box at `box` (row r's
// chunks permuted by r % 8).
// A macro rather than a function: as an inlined call it changed the backward's address arithmetic in the SASS;
// as a macro every variant's SASS is the one measured.
#define SWIZZLED(box, row, chunk) ((box) + (row) * 128 + (((chunk) ^ ((row) % 8)) * 16))

// A tile of `rows` rows from `row` on: one box per slab.
DEVICE void tma_tile(u32 dst, int rows, const TmaMap &map, int row, int head, int batch, u32 bar) {
#pragma unroll
    for (int s = 0; s < HDIM / 64; ++s) tma_load(dst + s * SLAB(rows), map, 64 * s, row, head, batch, bar);
}

// Adds a box of f32 (32 columns, rows) from shared memory at (col, row, head, batch) of a 4-D map, in the bulk
// group of the issuing thread (commit and wait with the bulk helpers of common.cuh).
DEVICE void tma_reduce_add(const TmaMap &map, u32 src, int col, int row, int head, int batch) {
    asm volatile("cp.reduce.async.bulk.tensor.4d.global.shared::cta.add.tile.bulk_group [%0, {%1, %2, %3, %4}], [%5];\n"
                 ::"l"((u64)&map), "r"(col), "r"(row), "r"(head), "r"(batch), "r"(src) : "memory");
}

// This thread's warpgroup, as a value ptxas knows to be the same across the warp (a shuffle from lane 0). Computed
// as threadIdx.x / 128 it is not, and the shared-memory addresses and wgmma descriptors derived from it are then
// built in ordinary registers and moved to uniform ones (R2UR pairs) before each wgmma.
DEVICE int warpgroup() { return __shfl_sync(~0u, threadIdx.x / 128, 0); }

DEVICE void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
DEVICE void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
DEVICE void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// wgmma.wait_group N, held after `x` is computed. ptxas orders a wait only against memory operations: register-only
// work written before it (a softmax) may be moved after it, so that the wait blocks where the tensor cores were
// meant to run under that work (every Hopper forward variant's loop waited for P V at its softmax's start). A
// shared-memory store of x, predicated on x being NaN (it almost never executes, and then writes the word at
// `sink`, kept for it), holds the wait after x.
template <int N>
DEVICE void wgmma_wait_after(float x, u32 sink) {
    asm volatile("{\n.reg .pred p;\nsetp.nan.f32 p, %0, %0;\n@p st.shared.f32 [%1], %0;\n}\n" ::"f"(x), "r"(sink) : "memory");
    wgmma_wait<N>();
}
// The compiler does not know that wgmma.wait_group writes the accumulators: make it think this does.
// Registers a wgmma reads (A operands) get the same fence: they may be rewritten only after it.
template <int N>
DEVICE void reg_fence(float (&d)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
template <int N>
DEVICE void reg_fence(u32 (&d)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+r"(d[i])::"memory");
}

// Shared-memory matrix descriptor of a 128-byte-swizzled tile (address and offsets in bytes).
DEVICE u64 smem_desc(u32 addr, u32 leading, u32 stride) {
    return (u64)((addr & 0x3ffff) >> 4) | ((u64)(leading >> 4) << 16) | ((u64)(stride >> 4) << 32) | (1ull << 62);
}
// A descriptor moved by `bytes` (a multiple of 16; the address field counts 16-byte units). Unsigned: a tile's
// offset is added once, then each k step's compile-time one, with no sign extension in between.
DEVICE u64 desc_plus(u64 desc, u32 bytes) { return desc + (bytes >> 4); }
// The k16 step kk of a K-major operand of `rows` rows (k steps along its 64-column slabs), and of an MN-major one
// (k steps along its rows).
DEVICE u64 kmajor(u64 desc, int rows, int kk) { return desc_plus(desc, (kk / 4) * SLAB(rows) + (kk % 4) * 32); }
DEVICE u64 mnmajor(u64 desc, int kk) { return desc_plus(desc, kk * 16 * 128); }

DEVICE void st_shared(u32 addr, int v) { asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(addr), "r"(v) : "memory"); }
DEVICE int ld_shared(u32 addr) {
    int v;
    asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(v) : "r"(addr) : "memory");
    return v;
}

DEVICE void st_shared_f32(u32 addr, float v) { asm volatile("st.shared.f32 [%0], %1;\n" ::"r"(addr), "f"(v) : "memory"); }
DEVICE void st_shared_f2(u32 addr, float x, float y) {
    asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(addr), "f"(x), "f"(y) : "memory");
}
DEVICE float2 ld_shared_f2(u32 addr) {
    float2 v;
    asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];\n" : "=f"(v.x), "=f"(v.y) : "r"(addr) : "memory");
    return v;
}

template <int REGS>
DEVICE void setmaxnreg_inc() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(REGS));
}
template <int REGS>
DEVICE void setmaxnreg_dec() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(REGS));
}
