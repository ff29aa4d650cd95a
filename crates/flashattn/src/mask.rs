//! Which keys each query sees, and the ALiBi bias: the single definition every backend follows.
//!
//! Query i is aligned to the bottom-right corner: it sits on key diagonal `i + shift`, `shift = seqlen_k -
//! seqlen_q`. It sees keys `j` with `i + shift - left <= j <= i + shift + right` (causal means right = 0), clipped
//! to `0..seqlen_k`. A row that sees no key yields o = 0 and lse = -inf.

use crate::problem::Plan;
use std::ops::Range;

/// The mask of one sequence of a batch.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SeqMask {
    shift: i64,
    left: Option<usize>,
    right: Option<usize>,
    len_k: usize,
}

impl SeqMask {
    pub fn new(plan: &Plan, seq: usize) -> Self {
        SeqMask {
            shift: plan.len_k[seq] as i64 - plan.len_q[seq] as i64,
            left: plan.mask.left,
            right: plan.mask.right,
            len_k: plan.len_k[seq],
        }
    }

    /// The keys query row `i` sees (empty when none). Both ends are non-decreasing in `i`.
    #[inline]
    pub fn keys(&self, i: usize) -> Range<usize> {
        let diag = self.diagonal(i);
        // Windows may be as wide as usize::MAX: saturate rather than wrap.
        let wide = |w: usize| i64::try_from(w).unwrap_or(i64::MAX);
        let lo = match self.left {
            Some(l) => diag.saturating_sub(wide(l)).max(0),
            None => 0,
        };
        let hi = match self.right {
            Some(r) => diag.saturating_add(wide(r)).saturating_add(1).clamp(0, self.len_k as i64),
            None => self.len_k as i64,
        };
        let lo = lo.min(hi);
        lo as usize..hi as usize
    }

    /// The keys any of the query rows `rows` sees: from the first row's start to the last row's end. Each row's
    /// start grows by at most one per row, so the union has no gaps.
    #[inline]
    pub fn keys_of_rows(&self, rows: Range<usize>) -> Range<usize> {
        if rows.is_empty() {
            return 0..0;
        }
        self.keys(rows.start).start..self.keys(rows.end - 1).end
    }

    /// True when every row of `rows` sees every key of `cols`: the block needs no masking.
    #[inline]
    pub fn block_is_full(&self, rows: Range<usize>, cols: Range<usize>) -> bool {
        if rows.is_empty() {
            return true;
        }
        let first = self.keys(rows.start);
        let last = self.keys(rows.end - 1);
        last.start <= cols.start && first.end >= cols.end
    }

    /// The key on query `i`'s diagonal (may lie outside `0..seqlen_k`).
    #[inline(always)]
    pub fn diagonal(&self, i: usize) -> i64 {
        i as i64 + self.shift
    }

    /// The ALiBi bias of query `i` and key `j` for a slope.
    #[inline(always)]
    pub fn alibi(&self, slope: f32, i: usize, j: usize) -> f32 {
        -slope * (self.diagonal(i) - j as i64).unsigned_abs() as f32
    }
}
