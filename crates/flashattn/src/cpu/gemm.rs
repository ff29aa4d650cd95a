//! The one matrix-product kernel every CPU pass uses: C (m x n) = A (m x k) * B (k x n), combined with C.
//!
//! A is read by broadcasting single elements (any strides, so a transposed operand costs nothing), B in panels
//! of `NR = 2W` contiguous columns, C row-major. The register tile is `MR x NR` accumulators; n must be a
//! multiple of NR (callers pad B and C with zero columns).

use super::simd::Simd;

/// A(i, k) = `ptr[i * rs + k * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct MatA {
    pub ptr: *const f32,
    pub rs: usize,
    pub cs: usize,
}

/// B(k, n) = `ptr[(n / NR) * ps + k * rs + n % NR]`: NR-column panels `ps` apart, rows `rs` apart in a panel.
#[derive(Clone, Copy)]
pub(crate) struct MatB {
    pub ptr: *const f32,
    pub rs: usize,
    pub ps: usize,
}

/// C(i, n) = `ptr[i * rs + n]`.
#[derive(Clone, Copy)]
pub(crate) struct MatC {
    pub ptr: *mut f32,
    pub rs: usize,
}

/// How the product combines with C.
#[derive(Clone, Copy)]
pub(crate) enum Update {
    /// C = AB
    Set,
    /// C += AB
    Add,
    /// C = diag(r) C + AB, `r` one factor per row of C (the online-softmax rescale, fused).
    Rescale(*const f32),
}

/// One `MR x 2W` tile of C over the whole k extent.
///
/// # Safety
/// The CPU supports `S`; A, B and C are valid for the tile's rows, `k` and `2W` columns.
#[inline(always)]
pub(crate) unsafe fn microkernel<S: Simd, const MR: usize>(
    k: usize,
    a: MatA,
    b: *const f32,
    rsb: usize,
    c: MatC,
    up: Update,
) {
    unsafe {
        let mut acc = [[S::splat(0.0); 2]; MR];
        // Rows of A from bases three rows apart: row r is base[r / 3] + (r % 3) * rs, which x86 addressing
        // (base + index * 1 or 2) reaches without per-row pointer arithmetic in the loop.
        let mut base = [a.ptr; 5];
        for (g, b) in base.iter_mut().enumerate() {
            *b = a.ptr.wrapping_add(3 * g * a.rs);
        }
        let mut bp = b;
        for _ in 0..k {
            let b0 = S::load(bp);
            let b1 = S::load(bp.add(S::W));
            for (r, acc) in acc.iter_mut().enumerate() {
                let x = S::splat(*base[r / 3].add((r % 3) * a.rs));
                acc[0] = S::fma(x, b0, acc[0]);
                acc[1] = S::fma(x, b1, acc[1]);
            }
            for b in base.iter_mut().take(MR.div_ceil(3)) {
                *b = b.add(a.cs);
            }
            bp = bp.add(rsb);
        }
        for (r, acc) in acc.iter().enumerate() {
            let cr = c.ptr.add(r * c.rs);
            let (c0, c1) = match up {
                Update::Set => (acc[0], acc[1]),
                Update::Add => (S::add(S::load(cr), acc[0]), S::add(S::load(cr.add(S::W)), acc[1])),
                Update::Rescale(f) => {
                    let f = S::splat(*f.add(r));
                    (S::fma(S::load(cr), f, acc[0]), S::fma(S::load(cr.add(S::W)), f, acc[1]))
                }
            };
            S::store(cr, c0);
            S::store(cr.add(S::W), c1);
        }
    }
}

/// Defines an instruction set's tile function: dispatches a row count in `1..=MR` to the micro-kernel
/// instantiated for it, compiled with the set's features.
macro_rules! tile_fn {
    ($name:ident, $simd:ty, [$($rows:literal),+] $(, $feature:literal)?) => {
        $(#[target_feature(enable = $feature)])?
        pub(crate) unsafe fn $name(rows: usize, k: usize, a: $crate::cpu::gemm::MatA, b: *const f32, rsb: usize, c: $crate::cpu::gemm::MatC, up: $crate::cpu::gemm::Update) {
            use $crate::cpu::gemm::microkernel;
            unsafe {
                match rows {
                    $($rows => microkernel::<$simd, $rows>(k, a, b, rsb, c, up),)+
                    _ => unreachable!("tile of {rows} rows"),
                }
            }
        }
    };
}
pub(crate) use tile_fn;

/// C (m x n) combined with A (m x k) B (k x n); n is a multiple of `2W`.
///
/// # Safety
/// The CPU supports `S`; every operand is valid over its extent.
#[inline(always)]
pub(crate) unsafe fn gemm<S: Simd>(m: usize, n: usize, k: usize, a: MatA, b: MatB, c: MatC, up: Update) {
    let nr = 2 * S::W;
    debug_assert!(n.is_multiple_of(nr), "n = {n} is not a multiple of {nr}");
    unsafe {
        for p in 0..n / nr {
            let (bp, cp) = (b.ptr.add(p * b.ps), c.ptr.add(p * nr));
            let mut i = 0;
            while i < m {
                let rows = (m - i).min(S::MR);
                let up = match up {
                    Update::Rescale(f) => Update::Rescale(f.add(i)),
                    other => other,
                };
                let a = MatA { ptr: a.ptr.add(i * a.rs), ..a };
                S::tile(rows, k, a, bp, b.rs, MatC { ptr: cp.add(i * c.rs), rs: c.rs }, up);
                i += rows;
            }
        }
    }
}
