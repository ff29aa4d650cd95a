//! Standard attention: materializes the (seqlen_q x seqlen_k) score matrix of each head, forward and backward.
//!
//! In f64 it is the oracle every test compares against and the "standard attention" baseline of the benchmarks.
//! In f32 with the operands of the matrix products rounded to the input dtype, it is the same-dtype standard
//! attention whose error sets the tolerance of the tests (as FlashAttention's own tests do).

use crate::dtype::{DType, Element};
use crate::mask::SeqMask;
use crate::problem::{Access, Plan};
use crate::tensor::{Qkv, TensorRef};
use rayon::prelude::*;
use std::ops::{Add, AddAssign, Div, Mul, Neg, Sub};

/// The arithmetic the reference runs in.
pub trait Real:
    Copy
    + Send
    + Sync
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + 'static
{
    const ZERO: Self;
    const ONE: Self;
    const NEG_INFINITY: Self;
    fn of(x: f64) -> Self;
    fn f64(self) -> f64;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn tanh(self) -> Self;
}

macro_rules! real {
    ($t:ty) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const NEG_INFINITY: Self = <$t>::NEG_INFINITY;
            #[inline(always)]
            fn of(x: f64) -> Self {
                x as $t
            }
            #[inline(always)]
            fn f64(self) -> f64 {
                self as f64
            }
            #[inline(always)]
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            #[inline(always)]
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            #[inline(always)]
            fn tanh(self) -> Self {
                <$t>::tanh(self)
            }
        }
    };
}
real!(f32);
real!(f64);

/// How the reference computes: the f64 oracle, or standard attention in the input dtype.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// f64 throughout: the oracle.
    F64,
    /// Standard attention as a framework computes it in the input dtype: f32 accumulation, with the result of
    /// every matrix product, the probabilities and the softmax gradient rounded to that dtype.
    Native,
}

/// Forward results, one f64 per element (already rounded to the dtype under `Precision::Native`).
#[derive(Clone, Debug)]
pub struct RefForward {
    pub out: Vec<f64>,
    pub lse: Vec<f64>,
}

/// Backward results, one f64 per element.
#[derive(Clone, Debug)]
pub struct RefGradients {
    pub dq: Vec<f64>,
    pub dk: Vec<f64>,
    pub dv: Vec<f64>,
}

/// Standard attention forward on a validated plan.
pub fn forward<T: Element>(
    plan: &Plan,
    q: &TensorRef<T>,
    k: &TensorRef<T>,
    v: &TensorRef<T>,
    precision: Precision,
) -> RefForward {
    let mut out = vec![0.0f64; plan.q_numel()];
    let mut lse = vec![0.0f64; plan.lse_len()];
    forward_into(plan, (q, k, v), precision, (&mut out, &mut lse), |x| x, |x| x);
    RefForward { out, lse }
}

/// Standard attention backward on a validated plan (o is not needed: it is recomputed in the working precision).
pub fn backward<T: Element>(
    plan: &Plan,
    q: &TensorRef<T>,
    k: &TensorRef<T>,
    v: &TensorRef<T>,
    dout: &TensorRef<T>,
    precision: Precision,
) -> RefGradients {
    let mut dq = vec![0.0f64; plan.q_numel()];
    let mut dk = vec![0.0f64; plan.kv_numel()];
    let mut dv = vec![0.0f64; plan.kv_numel()];
    backward_into(plan, (q, k, v), dout, precision, (&mut dq, &mut dk, &mut dv), |x| x);
    RefGradients { dq, dk, dv }
}

/// The forward into outputs of any element type (`conv_o`, `conv_lse` convert from f64).
pub(crate) fn forward_into<T: Element, O: Send, L: Send>(
    plan: &Plan,
    (q, k, v): Qkv<T>,
    precision: Precision,
    (out, lse): (&mut [O], &mut [L]),
    conv_o: impl Fn(f64) -> O + Sync,
    conv_lse: impl Fn(f64) -> L + Sync,
) {
    let (po, pl) = (SharedMut(out.as_mut_ptr()), SharedMut(lse.as_mut_ptr()));
    match precision {
        Precision::F64 => forward_in::<T, f64, O, L>(plan, q, k, v, DType::F32, false, po, pl, &conv_o, &conv_lse),
        Precision::Native => forward_in::<T, f32, O, L>(plan, q, k, v, T::DTYPE, true, po, pl, &conv_o, &conv_lse),
    }
}

/// The backward into gradients of any element type (`conv` converts from f64).
pub(crate) fn backward_into<T: Element, O: Send>(
    plan: &Plan,
    (q, k, v): Qkv<T>,
    dout: &TensorRef<T>,
    precision: Precision,
    (dq, dk, dv): (&mut [O], &mut [O], &mut [O]),
    conv: impl Fn(f64) -> O + Sync,
) {
    let ptrs = (SharedMut(dq.as_mut_ptr()), SharedMut(dk.as_mut_ptr()), SharedMut(dv.as_mut_ptr()));
    match precision {
        Precision::F64 => backward_in::<T, f64, O>(plan, q, k, v, dout, DType::F32, false, ptrs, &conv),
        Precision::Native => backward_in::<T, f32, O>(plan, q, k, v, dout, T::DTYPE, true, ptrs, &conv),
    }
}

/// Bytes of score matrices the f64 reference holds per worker (one per head at a time; two with softcap).
pub fn scratch_bytes(seqlen_q: usize, seqlen_k: usize, softcap: bool) -> usize {
    seqlen_q * seqlen_k * 8 * if softcap { 2 } else { 1 }
}

/// One head's rows, gathered in the working precision: `rows x head_dim`.
pub(crate) fn gather<T: Element, R: Real>(
    t: &TensorRef<T>,
    acc: &Access,
    seq: usize,
    head: usize,
    rows: usize,
    d: usize,
) -> Vec<R> {
    let mut out = Vec::with_capacity(rows * d);
    for i in 0..rows {
        let base = acc.index(seq, i, head);
        out.extend(t.data[base..base + d].iter().map(|x| R::of(x.to_f32() as f64)));
    }
    out
}

pub(crate) fn dot<R: Real>(a: &[R], b: &[R]) -> R {
    // Eight independent partial sums: vectorizes, and is as exact as a sequential sum for the oracle's needs.
    let mut acc = [R::ZERO; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = R::ZERO;
    for (x, y) in ra.iter().zip(rb) {
        s += *x * *y;
    }
    acc.iter().fold(s, |t, &x| t + x)
}

fn axpy<R: Real>(y: &mut [R], a: R, x: &[R]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// The scores of one head after scale, softcap, ALiBi and the mask; also returns tanh(score/cap) where the
/// softcap is on (needed by the backward). Rows are queries.
struct Scores<R> {
    s: Vec<R>,
    tanh: Vec<R>,
}

fn scores<R: Real>(plan: &Plan, seq: usize, head: usize, qh: &[R], kh: &[R], rnd: &impl Fn(R) -> R) -> Scores<R> {
    let (sq, sk, d) = (plan.len_q[seq], plan.len_k[seq], plan.head_dim);
    let m = &plan.mask;
    let mask = SeqMask::new(plan, seq);
    let scale = R::of(m.scale as f64);
    let slope = (!m.alibi.is_empty()).then(|| m.alibi[seq * plan.heads_q + head]);
    let mut s = vec![R::NEG_INFINITY; sq * sk];
    let mut tanh = if m.softcap.is_some() { vec![R::ZERO; sq * sk] } else { Vec::new() };
    for i in 0..sq {
        for j in mask.keys(i) {
            let mut x = rnd(dot(&qh[i * d..(i + 1) * d], &kh[j * d..(j + 1) * d]) * scale);
            if let Some(cap) = m.softcap {
                let cap = R::of(cap as f64);
                let t = (x / cap).tanh();
                tanh[i * sk + j] = t;
                x = rnd(cap * t);
            }
            if let Some(slope) = slope {
                x += R::of(mask.alibi(slope, i, j) as f64);
            }
            s[i * sk + j] = x;
        }
    }
    Scores { s, tanh }
}

/// Turns masked scores into normalized probabilities in place; returns each row's log-sum-exp.
pub(crate) fn softmax<R: Real>(s: &mut [R], sq: usize, sk: usize) -> Vec<R> {
    let mut lse = vec![R::NEG_INFINITY; sq];
    for i in 0..sq {
        let row = &mut s[i * sk..(i + 1) * sk];
        let max = row.iter().copied().fold(R::NEG_INFINITY, |a, b| if b > a { b } else { a });
        if max == R::NEG_INFINITY {
            row.iter_mut().for_each(|p| *p = R::ZERO);
            continue;
        }
        let mut sum = R::ZERO;
        for p in row.iter_mut() {
            *p = (*p - max).exp();
            sum += *p;
        }
        row.iter_mut().for_each(|p| *p = *p / sum);
        lse[i] = max + sum.ln();
    }
    lse
}

fn rounder<R: Real>(dtype: DType, active: bool) -> impl Fn(R) -> R {
    move |x: R| if active { R::of(dtype.round(x.f64() as f32) as f64) } else { x }
}

/// The attention weights (softmax of the masked scores, seqlen_q x seqlen_k, in f64) of one query head of one
/// sequence: what approximations are measured against.
pub fn weights<T: Element>(plan: &Plan, q: &TensorRef<T>, k: &TensorRef<T>, seq: usize, head: usize) -> Vec<f64> {
    let (sq, sk, d) = (plan.len_q[seq], plan.len_k[seq], plan.head_dim);
    let qh = gather::<T, f64>(q, &plan.q, seq, head, sq, d);
    let kh = gather::<T, f64>(k, &plan.k, seq, head / plan.group(), sk, d);
    let mut p = scores(plan, seq, head, &qh, &kh, &|x| x).s;
    softmax(&mut p, sq, sk);
    p
}

/// A raw pointer shared by workers that write disjoint elements.
pub(crate) struct SharedMut<T>(pub *mut T);
impl<T> Clone for SharedMut<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SharedMut<T> {}
unsafe impl<T> Send for SharedMut<T> {}
unsafe impl<T> Sync for SharedMut<T> {}
impl<T> SharedMut<T> {
    /// # Safety
    /// `i` is inside the buffer and no other worker touches element `i` concurrently.
    #[inline(always)]
    pub unsafe fn write(self, i: usize, x: T) {
        unsafe { *self.0.add(i) = x }
    }
}

#[allow(clippy::too_many_arguments)]
fn forward_in<T: Element, R: Real, O, L>(
    plan: &Plan,
    q: &TensorRef<T>,
    k: &TensorRef<T>,
    v: &TensorRef<T>,
    dtype: DType,
    round: bool,
    po: SharedMut<O>,
    pl: SharedMut<L>,
    conv_o: &(impl Fn(f64) -> O + Sync),
    conv_lse: &(impl Fn(f64) -> L + Sync),
) {
    let d = plan.head_dim;
    let rnd = rounder::<R>(dtype, round);
    (0..plan.batch * plan.heads_q).into_par_iter().for_each(|task| {
        let (seq, h) = (task / plan.heads_q, task % plan.heads_q);
        let hk = h / plan.group();
        let (sq, sk) = (plan.len_q[seq], plan.len_k[seq]);
        let qh = gather::<T, R>(q, &plan.q, seq, h, sq, d);
        let kh = gather::<T, R>(k, &plan.k, seq, hk, sk, d);
        let vh = gather::<T, R>(v, &plan.v, seq, hk, sk, d);
        let mut p = scores(plan, seq, h, &qh, &kh, &rnd).s;
        let row_lse = softmax(&mut p, sq, sk);
        let mut o = vec![R::ZERO; d];
        for i in 0..sq {
            o.iter_mut().for_each(|x| *x = R::ZERO);
            for j in 0..sk {
                axpy(&mut o, rnd(p[i * sk + j]), &vh[j * d..(j + 1) * d]);
            }
            let base = plan.o.index(seq, i, h);
            // SAFETY: task (seq, h) alone writes row i of head h of sequence seq.
            unsafe {
                for (c, &x) in o.iter().enumerate() {
                    po.write(base + c, conv_o(rnd(x).f64()));
                }
                pl.write(plan.lse.index(seq, i, h), conv_lse(row_lse[i].f64()));
            }
        }
    });
}

#[allow(clippy::too_many_arguments)]
fn backward_in<T: Element, R: Real, O>(
    plan: &Plan,
    q: &TensorRef<T>,
    k: &TensorRef<T>,
    v: &TensorRef<T>,
    dout: &TensorRef<T>,
    dtype: DType,
    round: bool,
    (pq, pk, pv): (SharedMut<O>, SharedMut<O>, SharedMut<O>),
    conv: &(impl Fn(f64) -> O + Sync),
) {
    let d = plan.head_dim;
    let rnd = rounder::<R>(dtype, round);
    let dout_acc = plan.access_like_q(dout);
    let scale = R::of(plan.mask.scale as f64);
    // One task per key/value head: it owns dk and dv of that head and dq of the query heads of its group.
    (0..plan.batch * plan.heads_kv).into_par_iter().for_each(|task| {
        let (seq, hk) = (task / plan.heads_kv, task % plan.heads_kv);
        let (sq, sk) = (plan.len_q[seq], plan.len_k[seq]);
        let kh = gather::<T, R>(k, &plan.k, seq, hk, sk, d);
        let vh = gather::<T, R>(v, &plan.v, seq, hk, sk, d);
        let mut dkh = vec![R::ZERO; sk * d];
        let mut dvh = vec![R::ZERO; sk * d];
        for h in hk * plan.group()..(hk + 1) * plan.group() {
            let qh = gather::<T, R>(q, &plan.q, seq, h, sq, d);
            let doh = gather::<T, R>(dout, &dout_acc, seq, h, sq, d);
            let Scores { s: mut p, tanh } = scores(plan, seq, h, &qh, &kh, &rnd);
            softmax(&mut p, sq, sk);
            p.iter_mut().for_each(|x| *x = rnd(*x));
            let mut dqh = vec![R::ZERO; sq * d];
            for i in 0..sq {
                let do_i = &doh[i * d..(i + 1) * d];
                // dP_ij = dO_i . V_j, and D_i = sum_j P_ij dP_ij.
                let dp: Vec<R> = (0..sk)
                    .map(|j| if p[i * sk + j] == R::ZERO { R::ZERO } else { rnd(dot(do_i, &vh[j * d..(j + 1) * d])) })
                    .collect();
                let di = (0..sk).fold(R::ZERO, |a, j| a + p[i * sk + j] * dp[j]);
                for j in 0..sk {
                    let pij = p[i * sk + j];
                    if pij == R::ZERO {
                        continue;
                    }
                    axpy(&mut dvh[j * d..(j + 1) * d], pij, do_i);
                    let mut ds = rnd(rnd(pij * (dp[j] - di)) * scale);
                    if !tanh.is_empty() {
                        let t = tanh[i * sk + j];
                        ds = rnd(ds * (R::ONE - t * t));
                    }
                    axpy(&mut dqh[i * d..(i + 1) * d], ds, &kh[j * d..(j + 1) * d]);
                    axpy(&mut dkh[j * d..(j + 1) * d], ds, &qh[i * d..(i + 1) * d]);
                }
            }
            for i in 0..sq {
                let base = plan.o.index(seq, i, h);
                // SAFETY: dq rows of head h belong to this task's group alone.
                unsafe {
                    for c in 0..d {
                        pq.write(base + c, conv(rnd(dqh[i * d + c]).f64()));
                    }
                }
            }
        }
        for j in 0..sk {
            let base = plan.dkv.index(seq, j, hk);
            // SAFETY: dk and dv rows of head hk belong to this task alone.
            unsafe {
                for c in 0..d {
                    pk.write(base + c, conv(rnd(dkh[j * d + c]).f64()));
                    pv.write(base + c, conv(rnd(dvh[j * d + c]).f64()));
                }
            }
        }
    });
}
