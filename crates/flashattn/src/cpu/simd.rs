//! The vector operations the CPU kernels are written in, and the elementary functions built on them.
//!
//! Each instruction set implements [`Simd`]; the kernels are generic over it and marked `#[inline(always)]`, so
//! each set's entry point (a `#[target_feature]` function) compiles them with its own instructions.

use super::gemm::{MatA, MatC, Update};

/// A vector of `W` f32 lanes. All methods are `unsafe` because the x86 implementations require the CPU
/// features of their set; pointers must be valid for `W` elements.
pub(crate) trait Simd: Copy + Send + Sync + 'static {
    /// Lanes per vector.
    const W: usize;
    /// Rows of the matrix micro-kernel (its tile is `MR x 2W`): as many as the register file holds.
    const MR: usize;
    type V: Copy;

    unsafe fn splat(x: f32) -> Self::V;
    unsafe fn load(p: *const f32) -> Self::V;
    unsafe fn store(p: *mut f32, v: Self::V);
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn div(a: Self::V, b: Self::V) -> Self::V;
    /// `a * b + c`, fused where the set has it.
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn min(a: Self::V, b: Self::V) -> Self::V;
    /// Round to the nearest integer (ties to even).
    unsafe fn round(a: Self::V) -> Self::V;
    /// `2^n` for lanes holding integers in `-126..=127`.
    unsafe fn pow2i(n: Self::V) -> Self::V;
    /// Lane-wise `if a < b { x } else { y }`.
    unsafe fn select_lt(a: Self::V, b: Self::V, x: Self::V, y: Self::V) -> Self::V;
    unsafe fn hmax(a: Self::V) -> f32;
    unsafe fn hsum(a: Self::V) -> f32;
    /// `[0, 1, ..., W-1]`.
    unsafe fn iota() -> Self::V;
    /// One micro-kernel tile of `rows <= MR` rows (see [`super::gemm::microkernel`]).
    unsafe fn tile(rows: usize, k: usize, a: MatA, b: *const f32, rsb: usize, c: MatC, up: Update);
}

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Below this, e^x is under the smallest normal f32: the result is 0.
const EXP_MIN: f32 = -87.336_55;
const EXP_MAX: f32 = 88.376_26;

/// `(2^n, q)` with `e^x = 2^n * (1 + q)` and `|r| <= ln2/2` reduced argument inside `q` (Cephes' expf
/// polynomial, about 1 ulp). `q` keeps full relative precision for small `x`, which `expm1` needs.
#[inline(always)]
unsafe fn exp_parts<S: Simd>(x: S::V) -> (S::V, S::V) {
    unsafe {
        let x = S::min(S::max(x, S::splat(EXP_MIN)), S::splat(EXP_MAX));
        let n = S::round(S::mul(x, S::splat(LOG2E)));
        let r = S::fma(n, S::splat(-LN2_HI), x);
        let r = S::fma(n, S::splat(-LN2_LO), r);
        let mut p = S::splat(1.987_569_1e-4);
        p = S::fma(p, r, S::splat(1.398_199_9e-3));
        p = S::fma(p, r, S::splat(8.333_452e-3));
        p = S::fma(p, r, S::splat(4.166_579_6e-2));
        p = S::fma(p, r, S::splat(1.666_666_5e-1));
        p = S::fma(p, r, S::splat(0.5));
        let q = S::fma(S::mul(p, r), r, r);
        (S::pow2i(n), q)
    }
}

/// e^x, exactly 0 below the normal range (so masked scores of -inf give 0).
#[inline(always)]
pub(crate) unsafe fn exp<S: Simd>(x: S::V) -> S::V {
    unsafe {
        let (two_n, q) = exp_parts::<S>(x);
        let e = S::fma(two_n, q, two_n);
        S::select_lt(x, S::splat(EXP_MIN), S::splat(0.0), e)
    }
}

/// `(tanh(x), 1 - tanh(x)^2)`, both to a few ulp. With `em = expm1(2|x|)`: `tanh = em / (em + 2)` (sign restored),
/// and `1 - tanh^2 = 4 (em + 1) / (em + 2)^2`, which avoids the cancellation of computing `1 - t*t`.
#[inline(always)]
pub(crate) unsafe fn tanh_sech2<S: Simd>(x: S::V) -> (S::V, S::V) {
    unsafe {
        let (zero, one, two) = (S::splat(0.0), S::splat(1.0), S::splat(2.0));
        let ax = S::max(x, S::sub(zero, x));
        let (two_n, q) = exp_parts::<S>(S::add(ax, ax));
        let em = S::add(S::mul(two_n, q), S::sub(two_n, one));
        let den = S::add(em, two);
        let t = S::div(em, den);
        // Two divisions: den^2 would overflow for large |x|.
        let sech2 = S::div(S::div(S::mul(S::splat(4.0), S::add(em, one)), den), den);
        (S::select_lt(x, zero, S::sub(zero, t), t), sech2)
    }
}

/// Lane-wise `|x|`.
#[inline(always)]
pub(crate) unsafe fn abs<S: Simd>(x: S::V) -> S::V {
    unsafe { S::max(x, S::sub(S::splat(0.0), x)) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::simd_portable::Portable;

    /// Largest error of `f` over `xs`, in units of the f32 spacing at the true value (ulp).
    fn max_ulp<S: Simd>(f: impl Fn(S::V) -> S::V, exact: fn(f64) -> f64, xs: &[f32]) -> f64 {
        let mut worst = 0.0f64;
        for chunk in xs.chunks_exact(S::W) {
            let mut out = vec![0.0f32; S::W];
            unsafe { S::store(out.as_mut_ptr(), f(S::load(chunk.as_ptr()))) };
            for (&x, &y) in chunk.iter().zip(&out) {
                let e = exact(x as f64);
                let ulp = (e.abs() as f32).max(f32::MIN_POSITIVE);
                let ulp = (f32::from_bits(ulp.to_bits() + 1) - ulp) as f64;
                worst = worst.max((y as f64 - e).abs() / ulp);
            }
        }
        worst
    }

    fn grid(lo: f32, hi: f32, n: usize) -> Vec<f32> {
        (0..n).map(|i| lo + (hi - lo) * i as f32 / (n - 1) as f32).collect()
    }

    fn check<S: Simd>() {
        let xs = grid(-87.0, 88.0, 160_000);
        assert!(max_ulp::<S>(|x| unsafe { exp::<S>(x) }, f64::exp, &xs) <= 2.0, "exp");
        let xs = grid(-12.0, 12.0, 160_000);
        let tanh = |x| unsafe { tanh_sech2::<S>(x).0 };
        assert!(max_ulp::<S>(tanh, f64::tanh, &xs) <= 4.0, "tanh");
        let sech2 = |x: f64| 1.0 / x.cosh().powi(2);
        assert!(max_ulp::<S>(|x| unsafe { tanh_sech2::<S>(x).1 }, sech2, &xs) <= 8.0, "sech^2");
        let small = grid(-1e-3, 1e-3, 16_000);
        assert!(max_ulp::<S>(tanh, f64::tanh, &small) <= 4.0, "tanh near 0");
        let mut out = vec![1.0f32; S::W];
        unsafe { S::store(out.as_mut_ptr(), exp::<S>(S::splat(f32::NEG_INFINITY))) };
        assert!(out.iter().all(|&x| x == 0.0), "exp(-inf) = {out:?}");
    }

    #[test]
    fn elementary_functions_are_accurate_portable() {
        check::<Portable>();
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn elementary_functions_are_accurate_x86() {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2() {
            check::<crate::cpu::simd_x86::Avx2>()
        }
        #[target_feature(enable = "avx512f")]
        unsafe fn avx512() {
            check::<crate::cpu::simd_x86::Avx512>()
        }
        if crate::Isa::Avx2.is_supported() {
            unsafe { avx2() }
        }
        if crate::Isa::Avx512.is_supported() {
            unsafe { avx512() }
        }
    }
}
