//! The portable vector set: plain arrays the compiler vectorizes for whatever target it builds (SSE2, NEON, ...).

use super::gemm::{tile_fn, MatA, MatC, Update};
use super::simd::Simd;

const W: usize = 8;

#[derive(Clone, Copy)]
pub(crate) struct Portable;

#[inline(always)]
fn map2(a: [f32; W], b: [f32; W], f: impl Fn(f32, f32) -> f32) -> [f32; W] {
    std::array::from_fn(|l| f(a[l], b[l]))
}

// SAFETY (whole impl): pointers are valid for W elements, as the trait requires; nothing else is assumed.
tile_fn!(tile_portable, Portable, [1, 2, 3, 4]);

impl Simd for Portable {
    const W: usize = W;
    const MR: usize = 4;
    type V = [f32; W];

    #[inline(always)]
    unsafe fn splat(x: f32) -> [f32; W] {
        [x; W]
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> [f32; W] {
        unsafe { std::ptr::read_unaligned(p as *const [f32; W]) }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: [f32; W]) {
        unsafe { std::ptr::write_unaligned(p as *mut [f32; W], v) }
    }
    #[inline(always)]
    unsafe fn add(a: [f32; W], b: [f32; W]) -> [f32; W] {
        map2(a, b, |x, y| x + y)
    }
    #[inline(always)]
    unsafe fn sub(a: [f32; W], b: [f32; W]) -> [f32; W] {
        map2(a, b, |x, y| x - y)
    }
    #[inline(always)]
    unsafe fn mul(a: [f32; W], b: [f32; W]) -> [f32; W] {
        map2(a, b, |x, y| x * y)
    }
    #[inline(always)]
    unsafe fn div(a: [f32; W], b: [f32; W]) -> [f32; W] {
        map2(a, b, |x, y| x / y)
    }
    #[inline(always)]
    unsafe fn fma(a: [f32; W], b: [f32; W], c: [f32; W]) -> [f32; W] {
        // Unfused on purpose: without hardware FMA, `mul_add` is a slow library call.
        std::array::from_fn(|l| a[l] * b[l] + c[l])
    }
    #[inline(always)]
    unsafe fn max(a: [f32; W], b: [f32; W]) -> [f32; W] {
        map2(a, b, |x, y| if x > y { x } else { y })
    }
    #[inline(always)]
    unsafe fn min(a: [f32; W], b: [f32; W]) -> [f32; W] {
        map2(a, b, |x, y| if x < y { x } else { y })
    }
    #[inline(always)]
    unsafe fn round(a: [f32; W]) -> [f32; W] {
        a.map(f32::round_ties_even)
    }
    #[inline(always)]
    unsafe fn pow2i(n: [f32; W]) -> [f32; W] {
        n.map(|x| f32::from_bits(((x as i32 + 127) as u32) << 23))
    }
    #[inline(always)]
    unsafe fn select_lt(a: [f32; W], b: [f32; W], x: [f32; W], y: [f32; W]) -> [f32; W] {
        std::array::from_fn(|l| if a[l] < b[l] { x[l] } else { y[l] })
    }
    #[inline(always)]
    unsafe fn hmax(a: [f32; W]) -> f32 {
        a.into_iter().fold(f32::NEG_INFINITY, |m, x| if x > m { x } else { m })
    }
    #[inline(always)]
    unsafe fn hsum(a: [f32; W]) -> f32 {
        a.into_iter().sum()
    }
    #[inline(always)]
    unsafe fn iota() -> [f32; W] {
        std::array::from_fn(|l| l as f32)
    }
    #[inline(always)]
    unsafe fn tile(rows: usize, k: usize, a: MatA, b: *const f32, rsb: usize, c: MatC, up: Update) {
        unsafe { tile_portable(rows, k, a, b, rsb, c, up) }
    }
}
