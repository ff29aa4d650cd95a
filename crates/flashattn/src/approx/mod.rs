//! Approximate attention, for comparison with exact attention: Linformer (low-rank projection of keys and values
//! along the sequence, O(N k d)) and Performer (FAVOR+ positive orthogonal random features, O(N m d)).
//!
//! Both take dense batches (q: (batch, seqlen_q, heads_q, d), k and v: (batch, seqlen_k, heads_kv, d)), GQA, and
//! the softmax scale; Performer also takes the causal mask (through prefix sums). Masks that neither method can
//! express (Linformer causal, sliding windows, softcap, ALiBi, variable-length batches) are errors, not silent
//! approximations. They compute in f32 (f64 for the tests) from f32, f16 or bf16 inputs.

#[cfg(feature = "cuda")]
pub(crate) mod cuda;
pub mod linformer;
pub mod performer;

use crate::dtype::{DType, Element};
use crate::error::{AttnError, Result};
use crate::problem::{AttnOptions, Plan};
use crate::reference::{gather, Real, SharedMut};
use crate::tensor::{Qkv, TensorLayout, TensorRef};
use crate::Backend;
use rayon::prelude::*;
use std::fmt;

/// How Linformer projects keys and values along the sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Projection {
    /// Entries drawn from N(0, 1/k), a Johnson-Lindenstrauss projection.
    Gaussian,
    /// Means over k contiguous segments of the sequence: the identity when k = seqlen_k.
    Pool,
}

impl std::str::FromStr for Projection {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "gaussian" => Ok(Projection::Gaussian),
            "pool" => Ok(Projection::Pool),
            _ => Err(format!("unknown projection '{s}': expected gaussian or pool")),
        }
    }
}

/// An approximation and its parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Method {
    /// Keys and values projected to `k` rows; `seed` draws the projections (Gaussian).
    Linformer { k: usize, projection: Projection, seed: u64 },
    /// `features` positive orthogonal random features, drawn from `seed` (a new seed redraws them).
    Performer { features: usize, seed: u64 },
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Method::Linformer { k, projection, .. } => write!(f, "linformer(k={k}, {projection:?})"),
            Method::Performer { features, .. } => write!(f, "performer(m={features})"),
        }
    }
}

/// Checks what an approximation can compute and returns the validated plan.
pub(crate) fn plan(
    q: &impl TensorLayout,
    k: &impl TensorLayout,
    v: &impl TensorLayout,
    opts: &AttnOptions,
    method: &Method,
    dtype: DType,
) -> Result<Plan> {
    let unsupported = |what: &str| {
        Err(AttnError::Unsupported {
            what: format!("{what} with {method}"),
            why: "the approximation has no form for it".into(),
        })
    };
    if opts.varlen.is_some() {
        return unsupported("a variable-length batch");
    }
    if opts.window.left.is_some() || (opts.window.right.is_some() && !opts.causal) {
        return unsupported("a sliding window");
    }
    if opts.softcap.is_some() {
        return unsupported("softcap");
    }
    if opts.alibi_slopes.is_some() {
        return unsupported("ALiBi");
    }
    let plan = Plan::new(q, k, v, opts, dtype)?;
    match *method {
        Method::Linformer { .. } if opts.causal => {
            return Err(AttnError::Unsupported {
                what: format!("the causal mask with {method}"),
                why: "a projection along the sequence mixes every key into every row: Linformer has no causal form"
                    .into(),
            })
        }
        Method::Linformer { k, projection, .. } => {
            if k == 0 {
                return Err(AttnError::option("linformer k", "a projection size of at least 1", k));
            }
            if projection == Projection::Pool && k > plan.seqlen_k(0) {
                return Err(AttnError::option(
                    "linformer k",
                    format!("at most seqlen_k = {} for pooling", plan.seqlen_k(0)),
                    k,
                ));
            }
        }
        Method::Performer { features, .. } => {
            if features == 0 {
                return Err(AttnError::option("performer features", "at least 1 random feature", features));
            }
        }
    }
    if plan.scale() <= 0.0 {
        return Err(AttnError::option("scale", format!("a positive scale for {method}"), plan.scale()));
    }
    Ok(plan)
}

/// Approximate attention forward: the output, q's shape, contiguous. `Backend::Cuda` runs on the GPU (f16 and
/// bf16); any other backend on the CPU.
pub fn forward<T: Element>(
    q: &TensorRef<T>,
    k: &TensorRef<T>,
    v: &TensorRef<T>,
    opts: &AttnOptions,
    method: &Method,
    backend: Backend,
) -> Result<Vec<T>> {
    match backend {
        #[cfg(feature = "cuda")]
        Backend::Cuda(ordinal) => return cuda::approx_forward_host(ordinal, (q, k, v), opts, method),
        #[cfg(not(feature = "cuda"))]
        Backend::Cuda(_) => return Err(AttnError::cuda_off()),
        _ => {}
    }
    let plan = plan(q, k, v, opts, method, T::DTYPE)?;
    let mut out = vec![T::default(); plan.q_numel()];
    run::<T, f32, _>(&plan, (q, k, v), None, method, Outputs { out: Some(&mut out), grads: None }, |x| {
        T::from_f32(x as f32)
    });
    Ok(out)
}

/// Approximate attention backward (the forward is recomputed): dq, dk, dv. `Backend::Cuda` runs on the GPU.
#[allow(clippy::too_many_arguments)]
pub fn backward<T: Element>(
    q: &TensorRef<T>,
    k: &TensorRef<T>,
    v: &TensorRef<T>,
    dout: &TensorRef<T>,
    opts: &AttnOptions,
    method: &Method,
    backend: Backend,
) -> Result<(Vec<T>, Vec<T>, Vec<T>)> {
    match backend {
        #[cfg(feature = "cuda")]
        Backend::Cuda(ordinal) => return cuda::approx_backward_host(ordinal, (q, k, v), dout, opts, method),
        #[cfg(not(feature = "cuda"))]
        Backend::Cuda(_) => return Err(AttnError::cuda_off()),
        _ => {}
    }
    let plan = plan(q, k, v, opts, method, T::DTYPE)?;
    plan.check_like_q("dout", dout)?;
    let (mut dq, mut dk, mut dv) =
        (vec![T::default(); plan.q_numel()], vec![T::default(); plan.kv_numel()], vec![T::default(); plan.kv_numel()]);
    run::<T, f32, _>(
        &plan,
        (q, k, v),
        Some(dout),
        method,
        Outputs { out: None, grads: Some((&mut dq, &mut dk, &mut dv)) },
        |x| T::from_f32(x as f32),
    );
    Ok((dq, dk, dv))
}

/// The output and, with a gradient, [dq, dk, dv], in f64.
pub type F64Results = (Vec<f64>, Option<[Vec<f64>; 3]>);

/// The same computations in f64, for tests.
#[doc(hidden)]
pub fn run_f64<T: Element>(
    q: &TensorRef<T>,
    k: &TensorRef<T>,
    v: &TensorRef<T>,
    dout: Option<&TensorRef<T>>,
    opts: &AttnOptions,
    method: &Method,
) -> Result<F64Results> {
    let plan = plan(q, k, v, opts, method, T::DTYPE)?;
    let mut out = vec![0.0; plan.q_numel()];
    let mut g = dout.map(|_| [vec![0.0; plan.q_numel()], vec![0.0; plan.kv_numel()], vec![0.0; plan.kv_numel()]]);
    let grads = g.as_mut().map(|[a, b, c]| (&mut a[..], &mut b[..], &mut c[..]));
    run::<T, f64, _>(&plan, (q, k, v), dout, method, Outputs { out: Some(&mut out), grads }, |x| x);
    Ok((out, g))
}

/// The weights the approximation effectively puts on the values (seqlen_q x seqlen_k, f64) for one query head of
/// one sequence: Linformer's softmax(s Q K'^T) F, Performer's normalized phi(Q) phi(K)^T. Compared with the exact
/// weights (`reference::weights`), they show what the approximation gives up beyond the output.
pub fn weights<T: Element>(
    q: &TensorRef<T>,
    k: &TensorRef<T>,
    v: &TensorRef<T>,
    opts: &AttnOptions,
    method: &Method,
    seq: usize,
    head: usize,
) -> Result<Vec<f64>> {
    let plan = plan(q, k, v, opts, method, T::DTYPE)?;
    if seq >= plan.batch || head >= plan.heads_q {
        return Err(AttnError::option(
            "weights",
            format!("a sequence below {} and a head below {}", plan.batch, plan.heads_q),
            format!("({seq}, {head})"),
        ));
    }
    let (d, sq, sk) = (plan.head_dim, plan.len_q[seq], plan.len_k[seq]);
    let qh = gather::<T, f64>(q, &plan.q, seq, head, sq, d);
    let kh = gather::<T, f64>(k, &plan.k, seq, head / plan.group(), sk, d);
    let scale = plan.mask.scale as f64;
    Ok(match *method {
        Method::Linformer { k: rank, projection, seed } => {
            linformer::weights(&linformer::Projections::new(rank, sk, projection, seed), &qh, &kh, d, scale)
        }
        Method::Performer { features, seed } => performer::weights(
            &performer::features(features, d, seed),
            features,
            &qh,
            &kh,
            d,
            scale,
            plan.mask.causal.then_some(sk as i64 - sq as i64),
        ),
    })
}

/// Where results go (any element type, converted from f64 by the caller's function).
pub(crate) struct Outputs<'a, O> {
    pub out: Option<&'a mut [O]>,
    pub grads: Option<(&'a mut [O], &'a mut [O], &'a mut [O])>,
}

/// The result of one query head: its output (empty unless `want_out` or needed anyway), and with a gradient its
/// dq and its key-side gradients in its method's own terms (summed over the group, then taken to dk and dv).
pub(crate) struct HeadResult<R> {
    pub out: Vec<R>,
    pub grads: Option<(Vec<R>, Vec<R>, Vec<R>)>,
}

/// One query head's problem in the working precision (rows of `d`): what a method computes on.
pub(crate) struct HeadInput<'a, R> {
    pub d: usize,
    pub scale: R,
    /// Key `j` is visible to query `i` when `j <= i + shift` (causal), or always (None).
    pub causal_shift: Option<i64>,
    pub q: &'a [R],
    pub k: &'a [R],
    pub v: &'a [R],
    pub dout: Option<&'a [R]>,
    /// Whether the caller reads the output (a backward alone does not).
    pub want_out: bool,
}

impl<R: Real> HeadInput<'_, R> {
    pub fn len_q(&self) -> usize {
        self.q.len() / self.d
    }
    pub fn len_k(&self) -> usize {
        self.k.len() / self.d
    }
}

/// A method as the group loop runs it. The key-side work of a key/value head is done once for every query head of
/// its group (Linformer: K' = E K and V' = F V; Performer: the key features and, unmasked, the key state). Each
/// query head runs on top of it and returns its key-side gradients in the method's own terms; their sum over the
/// group is taken back to dK and dV once (a linear map for both methods).
pub(crate) trait GroupMethod<R: Real>: Sync {
    type Keys;
    fn keys(&self, k: &[R], v: &[R]) -> Self::Keys;
    fn head(&self, keys: &Self::Keys, h: &HeadInput<R>) -> HeadResult<R>;
    fn key_grads(&self, keys: &Self::Keys, gk: Vec<R>, gv: Vec<R>) -> (Vec<R>, Vec<R>);
}

/// Runs a method over every (sequence, key/value head) in parallel, the group's query heads inside, and writes
/// the results through `conv`.
fn run<T: Element, R: Real, O: Send>(
    plan: &Plan,
    qkv: Qkv<T>,
    dout: Option<&TensorRef<T>>,
    method: &Method,
    outs: Outputs<O>,
    conv: impl Fn(f64) -> O + Sync,
) {
    let (d, sk) = (plan.head_dim, plan.len_k[0]);
    match *method {
        Method::Linformer { k, projection, seed } => {
            let p = linformer::Projections::<R>::new(k, sk, projection, seed);
            run_groups(plan, qkv, dout, &linformer::Linformer { p, d }, outs, conv)
        }
        Method::Performer { features, seed } => {
            let w = performer::features::<R>(features, d, seed);
            let scale = R::of(plan.mask.scale as f64);
            let method = performer::Performer { w, m: features, d, scale, causal: plan.mask.causal };
            run_groups(plan, qkv, dout, &method, outs, conv)
        }
    }
}

fn run_groups<T: Element, R: Real, O: Send, M: GroupMethod<R>>(
    plan: &Plan,
    (q, k, v): Qkv<T>,
    dout: Option<&TensorRef<T>>,
    method: &M,
    outs: Outputs<O>,
    conv: impl Fn(f64) -> O + Sync,
) {
    let d = plan.head_dim;
    let (sq, sk) = (plan.len_q[0], plan.len_k[0]);
    let scale = R::of(plan.mask.scale as f64);
    let causal_shift = plan.mask.causal.then_some(sk as i64 - sq as i64);
    let out = outs.out.map(|o| SharedMut(o.as_mut_ptr()));
    let grads =
        outs.grads.map(|(a, b, c)| (SharedMut(a.as_mut_ptr()), SharedMut(b.as_mut_ptr()), SharedMut(c.as_mut_ptr())));
    let dout_acc = dout.map(|t| plan.access_like_q(t));
    let want_out = out.is_some();
    (0..plan.batch * plan.heads_kv).into_par_iter().for_each(|task| {
        let (seq, hk) = (task / plan.heads_kv, task % plan.heads_kv);
        let kh = gather(k, &plan.k, seq, hk, sk, d);
        let vh = gather(v, &plan.v, seq, hk, sk, d);
        let keys = method.keys(&kh, &vh);
        let mut key_grads: Option<(Vec<R>, Vec<R>)> = None; // summed over the group's query heads
        for h in hk * plan.group()..(hk + 1) * plan.group() {
            let qh = gather(q, &plan.q, seq, h, sq, d);
            let doh = dout.map(|t| gather(t, dout_acc.as_ref().unwrap(), seq, h, sq, d));
            let input = HeadInput { d, scale, causal_shift, q: &qh, k: &kh, v: &vh, dout: doh.as_deref(), want_out };
            let r = method.head(&keys, &input);
            for i in 0..sq {
                let base = plan.o.index(seq, i, h);
                for c in 0..d {
                    // SAFETY: this task alone writes the rows of query head h of this sequence.
                    unsafe {
                        if let Some(o) = out {
                            o.write(base + c, conv(r.out[i * d + c].f64()));
                        }
                        if let (Some((dq, _, _)), Some((gq, _, _))) = (grads, &r.grads) {
                            dq.write(base + c, conv(gq[i * d + c].f64()));
                        }
                    }
                }
            }
            if let Some((_, gk, gv)) = r.grads {
                match &mut key_grads {
                    None => key_grads = Some((gk, gv)),
                    Some((acc_k, acc_v)) => {
                        acc_k.iter_mut().zip(&gk).for_each(|(a, &b)| *a += b);
                        acc_v.iter_mut().zip(&gv).for_each(|(a, &b)| *a += b);
                    }
                }
            }
        }
        if let (Some((_, gk, gv)), Some((sum_k, sum_v))) = (grads, key_grads) {
            let (dk, dv) = method.key_grads(&keys, sum_k, sum_v);
            for j in 0..sk {
                let base = plan.dkv.index(seq, j, hk);
                for c in 0..d {
                    // SAFETY: this task alone writes the rows of key/value head hk of this sequence.
                    unsafe {
                        gk.write(base + c, conv(dk[j * d + c].f64()));
                        gv.write(base + c, conv(dv[j * d + c].f64()));
                    }
                }
            }
        }
    });
}

/// C (m x n) = A B, or C += A B with `accumulate`; A is m x k (stored k x m when `ta`), B is k x n (stored n x k
/// when `tb`), all row-major.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul<R: Real>(
    m: usize,
    n: usize,
    k: usize,
    a: &[R],
    ta: bool,
    b: &[R],
    tb: bool,
    c: &mut [R],
    accumulate: bool,
) {
    assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].iter_mut().for_each(|x| *x = R::ZERO);
        }
        return;
    }
    let (a_rs, a_cs) = if ta { (1, m) } else { (k, 1) };
    let (b_rs, b_cs) = if tb { (1, k) } else { (n, 1) };
    // SAFETY: the operands hold at least the extents asserted above; gemm reads and writes within them.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            R::ONE,
            R::ONE,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// SplitMix64 with Box-Muller: reproducible random projections and features from a seed.
pub(crate) struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x5DEE_CE66_D1CE_4E5B)
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// A standard normal sample.
    pub fn normal(&mut self) -> f64 {
        let u = ((self.next() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        let v = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
}
