//! Flash forward on the CPU: for each block of query rows, stream key/value blocks through an online softmax.
//! Nothing of size seqlen_q x seqlen_k exists; a worker holds one task's keys and values and one block of scores.

use super::gemm::{gemm, MatA, MatB, MatC, Update};
use super::pack::{self, round_up, zeroed};
use super::scores::ScoreMap;
use super::simd::{exp, Simd};
use super::Task;
use crate::dtype::Element;
use crate::problem::Plan;
use crate::reference::SharedMut;
use crate::tensor::TensorRef;
use std::ops::Range;

/// Key/value columns per block of scores.
pub(crate) const BLOCK_N: usize = 128;

/// A worker's scratch, reused across its tasks: the packed operands and the block state.
#[derive(Default)]
pub(crate) struct Scratch<P = F32Operands> {
    ops: P,
    s: Vec<f32>,
    o: Vec<f32>,
    max: Vec<f32>,
    sum: Vec<f32>,
    corr: Vec<f32>,
}

/// The inputs and outputs of a forward pass, shared by all tasks.
pub(crate) struct FwdArgs<'a, T> {
    pub plan: &'a Plan,
    pub q: &'a TensorRef<'a, T>,
    pub k: &'a TensorRef<'a, T>,
    pub v: &'a TensorRef<'a, T>,
    pub out: SharedMut<T>,
    pub lse: SharedMut<f32>,
}

/// The operands of a task's two block products, packed for one kind of micro-kernel, and the products.
pub(crate) trait Operands: Default {
    /// The block buffers (scores, output) hold a multiple of this many rows; rows past the block's stay zero.
    const ROW_ALIGN: usize = 1;
    /// Packs the keys and values `keys` of the task's key/value head, in panels of `2 S::W` keys.
    fn pack_kv<S: Simd, T: Element>(&mut self, args: &FwdArgs<T>, task: &Task, keys: Range<usize>);
    /// Packs the query rows `rows` of head `head`.
    fn pack_q<T: Element>(&mut self, args: &FwdArgs<T>, seq: usize, head: usize, rows: Range<usize>);
    /// `s (m x ncp, rows BLOCK_N apart) = Q K^T` against the packed keys from `first` on.
    ///
    /// # Safety
    /// The CPU supports `S` and this kind's instructions; `first + ncp` is within the packed keys (padded).
    unsafe fn scores<S: Simd>(&self, m: usize, ncp: usize, d: usize, first: usize, s: &mut [f32]);
    /// `o (m x ld) = diag(corr) o + P V`, with m = `corr.len()` block rows and P the first `nc` columns of the
    /// block `s`, against the packed values from `first` on.
    ///
    /// # Safety
    /// As for [`Self::scores`].
    unsafe fn accumulate<S: Simd>(
        &mut self,
        nc: usize,
        ld: usize,
        first: usize,
        s: &[f32],
        o: &mut [f32],
        corr: &[f32],
    );
}

/// f32 operands for the f32 micro-kernel: keys transposed into panels, values and queries row-major.
#[derive(Default)]
pub(crate) struct F32Operands {
    kt: Vec<f32>,
    v: Vec<f32>,
    q: Vec<f32>,
}

impl Operands for F32Operands {
    fn pack_kv<S: Simd, T: Element>(&mut self, args: &FwdArgs<T>, task: &Task, keys: Range<usize>) {
        let (plan, d, nr) = (args.plan, args.plan.head_dim, 2 * S::W);
        pack::panels(args.k.data, &plan.k, (task.seq, task.head_kv), keys.clone(), d, nr, &mut self.kt);
        pack::rows(args.v.data, &plan.v, (task.seq, task.head_kv), keys, d, round_up(d, nr), &mut self.v);
    }

    fn pack_q<T: Element>(&mut self, args: &FwdArgs<T>, seq: usize, head: usize, rows: Range<usize>) {
        let d = args.plan.head_dim;
        pack::rows(args.q.data, &args.plan.q, (seq, head), rows, d, d, &mut self.q);
    }

    #[inline(always)]
    unsafe fn scores<S: Simd>(&self, m: usize, ncp: usize, d: usize, first: usize, s: &mut [f32]) {
        let nr = 2 * S::W;
        unsafe {
            gemm::<S>(
                m,
                ncp,
                d,
                MatA { ptr: self.q.as_ptr(), rs: d, cs: 1 },
                MatB { ptr: self.kt.as_ptr().add(first * d), rs: nr, ps: d * nr },
                MatC { ptr: s.as_mut_ptr(), rs: BLOCK_N },
                Update::Set,
            );
        }
    }

    #[inline(always)]
    unsafe fn accumulate<S: Simd>(
        &mut self,
        nc: usize,
        ld: usize,
        first: usize,
        s: &[f32],
        o: &mut [f32],
        corr: &[f32],
    ) {
        unsafe {
            gemm::<S>(
                corr.len(),
                ld,
                nc,
                MatA { ptr: s.as_ptr(), rs: BLOCK_N, cs: 1 },
                MatB { ptr: self.v.as_ptr().add(first * ld), rs: ld, ps: 2 * S::W },
                MatC { ptr: o.as_mut_ptr(), rs: ld },
                Update::Rescale(corr.as_ptr()),
            );
        }
    }
}

/// Query rows per block: about 64, a whole number of micro-kernel tiles.
pub(crate) fn block_m<S: Simd>() -> usize {
    64usize.div_ceil(S::MR) * S::MR
}

/// Runs one task with f32 products: the query rows `task.rows` of every query head that shares key/value head
/// `task.head_kv`.
///
/// # Safety
/// The CPU supports `S`; no other task writes these rows of `out` and `lse`.
#[inline(always)]
pub(crate) unsafe fn task<S: Simd, T: Element>(args: &FwdArgs<T>, task: &Task, scratch: &mut Scratch) {
    unsafe { task_with::<S, F32Operands, T>(args, task, scratch) }
}

/// [`task`] with the products of operands `P`.
///
/// # Safety
/// As for [`task`], and the CPU supports `P`'s instructions.
#[inline(always)]
pub(crate) unsafe fn task_with<S: Simd, P: Operands, T: Element>(
    args: &FwdArgs<T>,
    task: &Task,
    scratch: &mut Scratch<P>,
) {
    let plan = args.plan;
    let (d, nr) = (plan.head_dim, 2 * S::W);
    let ld = round_up(d, nr);
    let seq = task.seq;
    let keys = super::task_keys(plan, task);
    scratch.ops.pack_kv::<S, T>(args, task, keys.clone());
    let bm = block_m::<S>();
    for h in task.head_kv * plan.group()..(task.head_kv + 1) * plan.group() {
        let map = ScoreMap::new(plan, seq, h);
        for r0 in task.rows.clone().step_by(bm) {
            let rows = r0..(r0 + bm).min(task.rows.end);
            scratch.ops.pack_q(args, seq, h, rows.clone());
            let m = rows.len();
            let padded = round_up(m, P::ROW_ALIGN);
            let o = zeroed(&mut scratch.o, padded * ld);
            let max = &mut scratch.max;
            max.clear();
            max.resize(m, f32::NEG_INFINITY);
            zeroed(&mut scratch.sum, m);
            zeroed(&mut scratch.corr, m);
            let s = zeroed(&mut scratch.s, padded * BLOCK_N);
            // Blocks start on panel boundaries of the packed keys.
            let visible = map.mask.keys_of_rows(rows.clone());
            let visible = visible.start.max(keys.start)..visible.end.min(keys.end);
            let mut c0 = keys.start + (visible.start.saturating_sub(keys.start)) / nr * nr;
            while c0 < visible.end {
                let c1 = (c0 + BLOCK_N).min(visible.end);
                let (nc, ncp) = (c1 - c0, round_up(c1 - c0, nr));
                let first = c0 - keys.start;
                unsafe { scratch.ops.scores::<S>(m, ncp, d, first, s) };
                let full = map.mask.block_is_full(rows.clone(), c0..c1);
                for r in 0..m {
                    let row = &mut s[r * BLOCK_N..r * BLOCK_N + ncp];
                    unsafe {
                        map.row::<S>(row, rows.start + r, c0, nc, full, None);
                        scratch.corr[r] = softmax_row::<S>(row, map.pending(), &mut max[r], &mut scratch.sum[r]);
                    }
                }
                unsafe { scratch.ops.accumulate::<S>(nc, ld, first, s, o, &scratch.corr) };
                c0 = c1;
            }
            for r in 0..m {
                let i = rows.start + r;
                let (l, mx) = (scratch.sum[r], max[r]);
                let inv = if l > 0.0 { 1.0 / l } else { 0.0 };
                let base = plan.o.index(seq, i, h);
                for c in 0..d {
                    unsafe { args.out.write(base + c, T::from_f32(o[r * ld + c] * inv)) };
                }
                let lse = if l > 0.0 { mx + l.ln() } else { f32::NEG_INFINITY };
                unsafe { args.lse.write(plan.lse.index(seq, i, h), lse) };
            }
        }
    }
}

/// One step of the online softmax on a row of scores (still to be multiplied by `pending`): updates the
/// running max and sum, replaces the scores by `exp(s - max)` and returns the factor that rescales the row's
/// earlier accumulation.
#[inline(always)]
unsafe fn softmax_row<S: Simd>(row: &mut [f32], pending: f32, max: &mut f32, sum: &mut f32) -> f32 {
    unsafe {
        let (p, n) = (row.as_mut_ptr(), row.len());
        let mut mv = S::splat(f32::NEG_INFINITY);
        for t in (0..n).step_by(S::W) {
            mv = S::max(mv, S::load(p.add(t)));
        }
        let new_max = max.max(S::hmax(mv) * pending);
        // A row that has seen no key yet keeps a max of -inf; subtract 0 so its scores stay exp(-inf) = 0.
        let shift = if new_max == f32::NEG_INFINITY { 0.0 } else { new_max };
        let corr = (*max - shift).exp();
        let (scale, neg_shift) = (S::splat(pending), S::splat(-shift));
        for t in (0..n).step_by(S::W) {
            S::store(p.add(t), exp::<S>(S::fma(S::load(p.add(t)), scale, neg_shift)));
        }
        // Summed in a second pass over the (cached) row: inside the exponential's loop the accumulator would
        // not fit in the registers and its dependency chain would run through memory.
        let (mut a0, mut a1) = (S::splat(0.0), S::splat(0.0));
        let mut t = 0;
        while t + 2 * S::W <= n {
            a0 = S::add(a0, S::load(p.add(t)));
            a1 = S::add(a1, S::load(p.add(t + S::W)));
            t += 2 * S::W;
        }
        if t < n {
            a0 = S::add(a0, S::load(p.add(t)));
        }
        *max = new_max;
        *sum = *sum * corr + S::hsum(S::add(a0, a1));
        corr
    }
}
