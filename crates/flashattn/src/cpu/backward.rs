//! Flash backward on the CPU, by recomputation from the saved log-sum-exp.
//!
//! A task owns a chunk of keys of one key/value head: it accumulates dK and dV of those keys over every query
//! head of the group and every query block that sees them. When a task holds all keys of its head it also
//! owns dQ of the group's heads and accumulates it in its own scratch; otherwise it adds its share of dQ to a
//! per-chunk f32 slab that is summed afterwards.
//! Per (key block, query block): S = QK^T, P = exp(S - lse), dV += P^T dO, dP = dO V^T,
//! dS = P (dP - D) scale, dQ += dS K, dK += dS^T Q, with D = rowsum(dO o O).

use super::forward::{block_m, BLOCK_N};
use super::gemm::{gemm, MatA, MatB, MatC, Update};
use super::pack::{self, round_up, zeroed};
use super::scores::ScoreMap;
use super::simd::{exp, Simd};
use super::Task;
use crate::dtype::Element;
use crate::problem::{Access, Plan};
use crate::reference::SharedMut;
use crate::tensor::TensorRef;
use std::ops::Range;

#[derive(Default)]
pub(crate) struct Scratch {
    kt: Vec<f32>,
    vt: Vec<f32>,
    k: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
    q: Vec<f32>,
    dout: Vec<f32>,
    lse: Vec<f32>,
    delta: Vec<f32>,
    p: Vec<f32>,
    ds: Vec<f32>,
    dcap: Vec<f32>,
    dq: Vec<f32>,
}

/// Where dQ accumulates.
pub(crate) enum DqTarget<T> {
    /// Each task holds every key of its head: it accumulates a head's dQ in scratch and writes it out.
    Direct(SharedMut<T>),
    /// Tasks split the keys: f32 partials, one slab per key chunk, laid out (chunk, token, head_q, ld).
    Slabs { ptr: SharedMut<f32>, len: usize, ld: usize },
}

/// The inputs and outputs of a backward pass, shared by all tasks.
pub(crate) struct BwdArgs<'a, T> {
    pub plan: &'a Plan,
    pub q: &'a TensorRef<'a, T>,
    pub k: &'a TensorRef<'a, T>,
    pub v: &'a TensorRef<'a, T>,
    pub o: &'a TensorRef<'a, T>,
    pub dout: &'a TensorRef<'a, T>,
    pub lse: &'a [f32],
    /// Where o and dout live (their strides may differ from q's).
    pub o_acc: Access,
    pub dout_acc: Access,
    pub dq: DqTarget<T>,
    pub dk: SharedMut<T>,
    pub dv: SharedMut<T>,
}

/// The query rows (of `0..len_q`) that see at least one key of `keys`: a contiguous range, since both ends of
/// each row's visible keys grow with the row.
pub(crate) fn rows_seeing(map: &ScoreMap, len_q: usize, keys: Range<usize>) -> Range<usize> {
    let first = partition_point(len_q, |i| {
        let r = map.mask.keys(i);
        r.is_empty() || r.end <= keys.start
    });
    let end = partition_point(len_q, |i| map.mask.keys(i).start < keys.end);
    first..end.max(first)
}

/// The first index in `0..n` where `pred` turns false (`pred` is true on a prefix).
fn partition_point(n: usize, pred: impl Fn(usize) -> bool) -> usize {
    let (mut lo, mut hi) = (0, n);
    while lo < hi {
        let mid = (lo + hi) / 2;
        if pred(mid) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

/// Runs one task: keys `task.rows` of key/value head `task.head_kv`; dQ to its target (slab `task.chunk`).
///
/// # Safety
/// The CPU supports `S`; no other task writes these keys of dk and dv, or the group's heads of dq (of this slab).
#[inline(always)]
pub(crate) unsafe fn task<S: Simd, T: Element>(args: &BwdArgs<T>, task: &Task, sc: &mut Scratch) {
    let plan = args.plan;
    let (d, nr, seq, hk) = (plan.head_dim, 2 * S::W, task.seq, task.head_kv);
    let ld = round_up(d, nr);
    let keys = task.rows.clone();
    let nk = keys.len();
    pack::panels(args.k.data, &plan.k, (seq, hk), keys.clone(), d, nr, &mut sc.kt);
    pack::panels(args.v.data, &plan.v, (seq, hk), keys.clone(), d, nr, &mut sc.vt);
    pack::rows(args.k.data, &plan.k, (seq, hk), keys.clone(), d, ld, &mut sc.k);
    zeroed(&mut sc.dk, nk * ld);
    zeroed(&mut sc.dv, nk * ld);
    let len_q = plan.len_q[seq];
    for h in hk * plan.group()..(hk + 1) * plan.group() {
        let map = ScoreMap::new(plan, seq, h);
        let rows = rows_seeing(&map, len_q, keys.clone());
        // dQ row i of this head: (pointer, row stride).
        let (dq_rows, dq_rs) = match &args.dq {
            DqTarget::Direct(_) => (zeroed(&mut sc.dq, len_q * ld).as_mut_ptr(), ld),
            DqTarget::Slabs { ptr, len, ld: slab_ld } => {
                let first = plan.o.index(seq, 0, 0) / (plan.heads_q * d);
                (ptr.0.add(task.chunk * len + first * plan.heads_q * slab_ld + h * slab_ld), plan.heads_q * slab_ld)
            }
        };
        if !rows.is_empty() {
            head::<S, T>(args, sc, &map, (seq, h), keys.clone(), rows, (dq_rows, dq_rs));
        }
        if let DqTarget::Direct(out) = &args.dq {
            for i in 0..len_q {
                let base = plan.o.index(seq, i, h);
                for c in 0..d {
                    out.write(base + c, T::from_f32(*dq_rows.add(i * ld + c)));
                }
            }
        }
    }
    for (r, j) in keys.enumerate() {
        let base = plan.dkv.index(seq, j, hk);
        for c in 0..d {
            args.dk.write(base + c, T::from_f32(sc.dk[r * ld + c]));
            args.dv.write(base + c, T::from_f32(sc.dv[r * ld + c]));
        }
    }
}

/// One query head's share of a task: query rows `rows` of head `h` against `keys`, into the task's dK and dV
/// and into dQ, whose row i starts at `dq.0 + i * dq.1`.
#[inline(always)]
unsafe fn head<S: Simd, T: Element>(
    args: &BwdArgs<T>,
    sc: &mut Scratch,
    map: &ScoreMap,
    (seq, h): (usize, usize),
    keys: Range<usize>,
    rows: Range<usize>,
    dq: (*mut f32, usize),
) {
    let plan = args.plan;
    let (d, nr) = (plan.head_dim, 2 * S::W);
    let ld = round_up(d, nr);
    let (scale, softcap) = (plan.mask.scale, plan.mask.softcap.is_some());
    let bm = block_m::<S>();
    pack::rows(args.q.data, &plan.q, (seq, h), rows.clone(), d, ld, &mut sc.q);
    pack::rows(args.dout.data, &args.dout_acc, (seq, h), rows.clone(), d, ld, &mut sc.dout);
    sc.lse.clear();
    sc.delta.clear();
    for i in rows.clone() {
        sc.lse.push(args.lse[plan.lse.index(seq, i, h)]);
        let (ob, db) = (args.o_acc.index(seq, i, h), args.dout_acc.index(seq, i, h));
        sc.delta.push((0..d).map(|c| args.o.data[ob + c].to_f32() * args.dout.data[db + c].to_f32()).sum::<f32>());
    }
    let mut j0 = keys.start;
    while j0 < keys.end {
        let j1 = (j0 + BLOCK_N).min(keys.end);
        let (nc, ncp, first) = (j1 - j0, round_up(j1 - j0, nr), j0 - keys.start);
        let block_rows = rows_seeing(map, plan.len_q[seq], j0..j1);
        for i0 in (block_rows.start.max(rows.start)..block_rows.end.min(rows.end)).step_by(bm) {
            let i1 = (i0 + bm).min(block_rows.end.min(rows.end));
            let (m, qi) = (i1 - i0, i0 - rows.start);
            let p = zeroed(&mut sc.p, m * BLOCK_N);
            let ds = zeroed(&mut sc.ds, m * BLOCK_N);
            let dcap = zeroed(&mut sc.dcap, m * BLOCK_N);
            // S = Q K^T and dP = dO V^T.
            let qa = MatA { ptr: sc.q.as_ptr().add(qi * ld), rs: ld, cs: 1 };
            let da = MatA { ptr: sc.dout.as_ptr().add(qi * ld), rs: ld, cs: 1 };
            gemm::<S>(
                m,
                ncp,
                d,
                qa,
                MatB { ptr: sc.kt.as_ptr().add(first * d), rs: nr, ps: d * nr },
                MatC { ptr: p.as_mut_ptr(), rs: BLOCK_N },
                Update::Set,
            );
            gemm::<S>(
                m,
                ncp,
                d,
                da,
                MatB { ptr: sc.vt.as_ptr().add(first * d), rs: nr, ps: d * nr },
                MatC { ptr: ds.as_mut_ptr(), rs: BLOCK_N },
                Update::Set,
            );
            let full = map.mask.block_is_full(i0..i1, j0..j1);
            for r in 0..m {
                let span = r * BLOCK_N..r * BLOCK_N + ncp;
                map.row::<S>(&mut p[span.clone()], i0 + r, j0, nc, full, softcap.then(|| &mut dcap[span.clone()]));
                grad_row::<S>(
                    &mut p[span.clone()],
                    &mut ds[span.clone()],
                    softcap.then(|| &dcap[span]),
                    map.pending(),
                    sc.lse[qi + r],
                    sc.delta[qi + r],
                    scale,
                );
            }
            // dV += P^T dO, dK += dS^T Q, dQ += dS K.
            let (pt, dst) =
                (MatA { ptr: p.as_ptr(), rs: 1, cs: BLOCK_N }, MatA { ptr: ds.as_ptr(), rs: 1, cs: BLOCK_N });
            let dout_b = MatB { ptr: sc.dout.as_ptr().add(qi * ld), rs: ld, ps: nr };
            let q_b = MatB { ptr: sc.q.as_ptr().add(qi * ld), rs: ld, ps: nr };
            gemm::<S>(nc, ld, m, pt, dout_b, MatC { ptr: sc.dv.as_mut_ptr().add(first * ld), rs: ld }, Update::Add);
            gemm::<S>(nc, ld, m, dst, q_b, MatC { ptr: sc.dk.as_mut_ptr().add(first * ld), rs: ld }, Update::Add);
            let k_b = MatB { ptr: sc.k.as_ptr().add(first * ld), rs: ld, ps: nr };
            let dq_c = MatC { ptr: dq.0.add(i0 * dq.1), rs: dq.1 };
            gemm::<S>(m, ld, nc, MatA { ptr: ds.as_ptr(), rs: BLOCK_N, cs: 1 }, k_b, dq_c, Update::Add);
        }
        j0 = j1;
    }
}

/// Scores (still to be multiplied by `pending`) to probabilities `P = exp(s - lse)` (in `p`) and the
/// products dO.V to `dS = P (dP - D) scale [1 - tanh^2]` (in `ds`), for one row.
#[inline(always)]
unsafe fn grad_row<S: Simd>(
    p: &mut [f32],
    ds: &mut [f32],
    dcap: Option<&[f32]>,
    pending: f32,
    lse: f32,
    delta: f32,
    scale: f32,
) {
    unsafe {
        if lse == f32::NEG_INFINITY {
            // The row sees no key: it has no probabilities and passes no gradient.
            p.fill(0.0);
            ds.fill(0.0);
            return;
        }
        let (pp, dp) = (p.as_mut_ptr(), ds.as_mut_ptr());
        let (neg_lse, pend, dv, sv) = (S::splat(-lse), S::splat(pending), S::splat(delta), S::splat(scale));
        for t in (0..p.len()).step_by(S::W) {
            let prob = exp::<S>(S::fma(S::load(pp.add(t)), pend, neg_lse));
            S::store(pp.add(t), prob);
            let mut g = S::mul(S::mul(prob, S::sub(S::load(dp.add(t)), dv)), sv);
            if let Some(dc) = dcap {
                g = S::mul(g, S::load(dc.as_ptr().add(t)));
            }
            S::store(dp.add(t), g);
        }
    }
}
