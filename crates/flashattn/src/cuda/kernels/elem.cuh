// The element type and the few definitions every kernel needs, the approximations' row kernels included: raw
// 16-bit bits converted by inline PTX (no CUDA headers), and float constants.
//
// Compile-time configuration (defines): ELEM_BF16 (1: bf16, 0: f16).

#pragma once

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define DEVICE __device__ __forceinline__

// ---------------------------------------------------------------------------------------------------------------
// Elements.
DEVICE float to_float(u16 x) {
#if ELEM_BF16
    return __uint_as_float(((u32)x) << 16);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x));
    return f;
#endif
}

// Two floats to a packed pair, `lo` in the low half (round to nearest even).
DEVICE u32 pack2(float lo, float hi) {
    u32 r;
#if ELEM_BF16
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#else
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#endif
    return r;
}

DEVICE u16 from_float(float x) { return (u16)(pack2(x, 0.f) & 0xffffu); }

#define LOG2E 1.4426950408889634f
#define NEG_INF (-__int_as_float(0x7f800000))
#define POS_INF (__int_as_float(0x7f800000))
