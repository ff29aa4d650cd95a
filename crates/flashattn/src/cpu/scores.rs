//! From raw products q.k to masked scores, one row of a block at a time: scale, softcap, ALiBi, mask.

use super::simd::{abs, tanh_sech2, Simd};
use crate::mask::SeqMask;
use crate::problem::Plan;

/// What turns the products of one head of one sequence into scores.
#[derive(Clone, Copy)]
pub(crate) struct ScoreMap {
    /// Multiplies the product first: the softmax scale, divided by the cap when softcapping.
    factor: f32,
    cap: Option<f32>,
    slope: Option<f32>,
    pub mask: SeqMask,
}

impl ScoreMap {
    pub fn new(plan: &Plan, seq: usize, head_q: usize) -> Self {
        let m = &plan.mask;
        ScoreMap {
            factor: m.softcap.map_or(m.scale, |cap| m.scale / cap),
            cap: m.softcap,
            slope: (!m.alibi.is_empty()).then(|| m.alibi[seq * plan.heads_q + head_q]),
            mask: SeqMask::new(plan, seq),
        }
    }

    /// The factor the scores still need after [`Self::row`]: with neither softcap nor ALiBi and a positive
    /// scale, `row` leaves the products unscaled (the max commutes with the scale), and the exponential applies
    /// it in its fused multiply-add; otherwise 1.
    #[inline(always)]
    pub fn pending(&self) -> f32 {
        if self.deferred() {
            self.factor
        } else {
            1.0
        }
    }

    #[inline(always)]
    fn deferred(&self) -> bool {
        self.cap.is_none() && self.slope.is_none() && self.factor > 0.0
    }

    /// Turns `row` (products of query `i` with keys `c0..c0 + row.len()`) into scores (divided by
    /// [`Self::pending`]) in place; keys at or past `c0 + valid` and those the mask hides become -inf. With
    /// `full`, the caller knows the mask hides nothing below `valid`. When `dcap` is given and softcap is on, it
    /// receives d score / d (scaled product).
    ///
    /// # Safety
    /// The CPU supports `S`; `row.len()` (and `dcap`'s) is a multiple of `S::W`.
    #[inline(always)]
    pub unsafe fn row<S: Simd>(
        &self,
        row: &mut [f32],
        i: usize,
        c0: usize,
        valid: usize,
        full: bool,
        dcap: Option<&mut [f32]>,
    ) {
        let n = row.len();
        unsafe {
            let p = row.as_mut_ptr();
            let factor = S::splat(self.factor);
            if let Some(cap) = self.cap {
                let capv = S::splat(cap);
                let dp = dcap.map(|d| d.as_mut_ptr());
                for t in (0..n).step_by(S::W) {
                    let (th, sech2) = tanh_sech2::<S>(S::mul(S::load(p.add(t)), factor));
                    S::store(p.add(t), S::mul(capv, th));
                    if let Some(dp) = dp {
                        S::store(dp.add(t), sech2);
                    }
                }
            } else if !self.deferred() && self.factor != 1.0 {
                for t in (0..n).step_by(S::W) {
                    S::store(p.add(t), S::mul(S::load(p.add(t)), factor));
                }
            }
            if let Some(slope) = self.slope {
                // bias = -slope * |(i + shift - c0) - t|, t the column within the block.
                let diag = (self.mask.diagonal(i) - c0 as i64) as f32;
                let neg_slope = S::splat(-slope);
                for t in (0..n).step_by(S::W) {
                    let dist = abs::<S>(S::sub(S::splat(diag - t as f32), S::iota()));
                    S::store(p.add(t), S::fma(neg_slope, dist, S::load(p.add(t))));
                }
            }
        }
        let (lo, hi) = if full {
            (0, valid)
        } else {
            let keys = self.mask.keys(i);
            let clip = |x: usize| x.clamp(c0, c0 + valid) - c0;
            (clip(keys.start), clip(keys.end).max(clip(keys.start)))
        };
        row[..lo].fill(f32::NEG_INFINITY);
        row[hi..].fill(f32::NEG_INFINITY);
    }
}
