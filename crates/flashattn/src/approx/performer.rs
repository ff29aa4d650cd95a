//! Performer (FAVOR+): exp(scale q.k) = E_w[phi(q) phi(k)] with positive random features
//! phi(x)_r = exp(w_r . x~ - |x~|^2 / 2) / sqrt(m), x~ = sqrt(scale) x, and the w_r drawn orthogonal in blocks of
//! head_dim with chi-distributed norms (each w_r is still N(0, I) marginally, so the estimate stays unbiased).
//! Attention becomes O = phi(Q) (phi(K)^T V) / phi(Q) (phi(K)^T 1): no N x N matrix; the causal mask becomes
//! prefix sums over the keys. Stabilizers (a max per query row, one max over all keys) cancel in the ratio.

use super::{matmul, GroupMethod, HeadInput, HeadResult, Rng};
use crate::reference::{dot, Real};

/// `m` random features of dimension `d` (m x d, row-major): orthogonal within each block of d rows.
pub(crate) fn features<R: Real>(m: usize, d: usize, seed: u64) -> Vec<R> {
    let mut rng = Rng::new(seed);
    let mut w = Vec::with_capacity(m * d);
    while w.len() < m * d {
        // A d x d Gaussian block, orthonormalized by Gram-Schmidt, each row rescaled to a Gaussian vector's norm.
        let mut block: Vec<Vec<f64>> = (0..d).map(|_| (0..d).map(|_| rng.normal()).collect()).collect();
        for i in 0..d {
            for j in 0..i {
                let (done, rest) = block.split_at_mut(i);
                let dot: f64 = rest[0].iter().zip(&done[j]).map(|(a, b)| a * b).sum();
                rest[0].iter_mut().zip(&done[j]).for_each(|(a, b)| *a -= dot * b);
            }
            let norm = block[i].iter().map(|x| x * x).sum::<f64>().sqrt();
            block[i].iter_mut().for_each(|x| *x /= norm);
        }
        for row in block {
            if w.len() == m * d {
                break;
            }
            let chi = (0..d).map(|_| rng.normal().powi(2)).sum::<f64>().sqrt();
            w.extend(row.iter().map(|&x| R::of(x * chi)));
        }
    }
    w
}

/// phi(rows) with the stabilizer subtracted from every exponent (`per_row`: each row's max; else one max over all
/// rows); also returns sqrt(scale) x (x~), which the gradient needs.
fn feature_map<R: Real>(w: &[R], m: usize, d: usize, x: &[R], scale: R, per_row: bool) -> (Vec<R>, Vec<R>) {
    let n = x.len() / d;
    let root = R::of(scale.f64().sqrt());
    let xt: Vec<R> = x.iter().map(|&v| v * root).collect();
    let mut a = vec![R::ZERO; n * m];
    matmul(n, m, d, &xt, false, w, true, &mut a, false);
    let half = R::of(0.5);
    for (i, row) in a.chunks_mut(m).enumerate() {
        let sq = xt[i * d..(i + 1) * d].iter().fold(R::ZERO, |s, &v| s + v * v);
        row.iter_mut().for_each(|v| *v = *v - half * sq);
    }
    let max_of = |s: &[R]| s.iter().copied().fold(R::NEG_INFINITY, |a, b| if b > a { b } else { a });
    let global = max_of(&a);
    let norm = R::of(1.0 / (m as f64).sqrt());
    for row in a.chunks_mut(m) {
        let c = if per_row { max_of(row) } else { global };
        row.iter_mut().for_each(|v| *v = (*v - c).exp() * norm);
    }
    (a, xt)
}

/// Back through phi: dx = sqrt(scale) ((dphi o phi) W - x~ rowsum(dphi o phi)).
fn feature_grad<R: Real>(w: &[R], m: usize, d: usize, phi: &[R], dphi: &mut [R], xt: &[R], scale: R) -> Vec<R> {
    let n = phi.len() / m;
    dphi.iter_mut().zip(phi).for_each(|(g, &p)| *g = *g * p);
    let mut dx = vec![R::ZERO; n * d];
    matmul(n, d, m, dphi, false, w, false, &mut dx, false);
    let root = R::of(scale.f64().sqrt());
    for i in 0..n {
        let s = dphi[i * m..(i + 1) * m].iter().fold(R::ZERO, |a, &b| a + b);
        for c in 0..d {
            dx[i * d + c] = (dx[i * d + c] - xt[i * d + c] * s) * root;
        }
    }
    dx
}

/// Performer for the group loop: the key features (and, without a mask, the key state) of a key/value head serve
/// every query head of its group, and dK is taken once through the features from the group's summed dphi(K).
pub(crate) struct Performer<R> {
    pub w: Vec<R>,
    pub m: usize,
    pub d: usize,
    pub scale: R,
    pub causal: bool,
}

/// phi(K) and sqrt(scale) K, and without a mask the full key state (KV = phi(K)^T V, z = phi(K)^T 1).
pub(crate) struct Keys<R> {
    pk: Vec<R>,
    kt: Vec<R>,
    state: Option<(Vec<R>, Vec<R>)>,
}

impl<R: Real> GroupMethod<R> for Performer<R> {
    type Keys = Keys<R>;

    fn keys(&self, k: &[R], v: &[R]) -> Keys<R> {
        let (m, d) = (self.m, self.d);
        let (pk, kt) = feature_map(&self.w, m, d, k, self.scale, false);
        let state = (!self.causal).then(|| {
            let mut kv = vec![R::ZERO; m * d];
            matmul(m, d, k.len() / d, &pk, true, v, false, &mut kv, false);
            let z = column_sums(&pk, m);
            (kv, z)
        });
        Keys { pk, kt, state }
    }

    fn head(&self, keys: &Keys<R>, h: &HeadInput<R>) -> HeadResult<R> {
        head(&self.w, self.m, keys, h)
    }

    fn key_grads(&self, keys: &Keys<R>, mut dpk: Vec<R>, dv: Vec<R>) -> (Vec<R>, Vec<R>) {
        (feature_grad(&self.w, self.m, self.d, &keys.pk, &mut dpk, &keys.kt, self.scale), dv)
    }
}

/// One query head against its key head's features: the output and, with dout, dq, dphi(K) and dV.
fn head<R: Real>(w: &[R], m: usize, keys: &Keys<R>, h: &HeadInput<R>) -> HeadResult<R> {
    let (d, sq, sk) = (h.d, h.len_q(), h.len_k());
    let (pq, qt) = feature_map(w, m, d, h.q, h.scale, true);
    let pk = &keys.pk;
    // Per query: num (d) and den from the key state (KV = phiK^T V, z = phiK^T 1) it sees; O = num / den. With a
    // gradient, dnum = dO / den, dden = -(dO . O) / den, and dphiQ = KV dnum + z dden.
    let mut num = vec![R::ZERO; sq * d];
    let mut out = vec![R::ZERO; sq * d];
    let mut dnum = vec![R::ZERO; if h.dout.is_some() { sq * d } else { 0 }];
    let mut dden = vec![R::ZERO; sq];
    let mut dpq = vec![R::ZERO; if h.dout.is_some() { sq * m } else { 0 }];
    // Without a mask every query sees the full key state (which the backward reuses).
    match h.causal_shift {
        None => {
            let (kv, z) = keys.state.as_ref().expect("an unmasked problem has the full key state");
            matmul(sq, d, m, &pq, false, kv, false, &mut num, false);
            for i in 0..sq {
                let g = h.dout.map(|g| (&g[i * d..(i + 1) * d], &mut dnum[i * d..(i + 1) * d]));
                dden[i] = output_row(
                    &num[i * d..(i + 1) * d],
                    dot(&pq[i * m..(i + 1) * m], z),
                    &mut out[i * d..(i + 1) * d],
                    g,
                );
            }
        }
        Some(shift) => {
            // Prefix sums over the keys; dphiQ needs the state each query saw, so it is taken in the same scan.
            let (mut kv, mut z) = (vec![R::ZERO; m * d], vec![R::ZERO; m]);
            let mut next = 0;
            for i in 0..sq {
                while next < sk && next as i64 <= i as i64 + shift {
                    add_outer(&mut kv, &mut z, &pk[next * m..(next + 1) * m], &h.v[next * d..(next + 1) * d], R::ONE);
                    next += 1;
                }
                let pqi = &pq[i * m..(i + 1) * m];
                let num_i = &mut num[i * d..(i + 1) * d];
                matvec_t(&kv, pqi, num_i);
                let g = h.dout.map(|g| (&g[i * d..(i + 1) * d], &mut dnum[i * d..(i + 1) * d]));
                dden[i] = output_row(num_i, dot(pqi, &z), &mut out[i * d..(i + 1) * d], g);
                if h.dout.is_some() {
                    let row = &mut dpq[i * m..(i + 1) * m];
                    matvec(&kv, &dnum[i * d..(i + 1) * d], row);
                    row.iter_mut().zip(&z).for_each(|(g, &zr)| *g += zr * dden[i]);
                }
            }
        }
    }
    if h.dout.is_none() {
        return HeadResult { out, grads: None };
    }

    let mut dpk = vec![R::ZERO; sk * m];
    let mut dv = vec![R::ZERO; sk * d];
    match (&keys.state, h.causal_shift) {
        (Some((kv, z)), None) => {
            // num = phiQ KV, den = phiQ z: dphiQ = dnum KV^T + dden z^T; dKV = phiQ^T dnum; dz = phiQ^T dden.
            matmul(sq, m, d, &dnum, false, kv, true, &mut dpq, false);
            for i in 0..sq {
                for r in 0..m {
                    dpq[i * m + r] += dden[i] * z[r];
                }
            }
            let mut dkv = vec![R::ZERO; m * d];
            matmul(m, d, sq, &pq, true, &dnum, false, &mut dkv, false);
            let mut dz = vec![R::ZERO; m];
            matmul(m, 1, sq, &pq, true, &dden, false, &mut dz, false);
            // KV = phiK^T V, z = phiK^T 1: dphiK = V dKV^T + 1 dz^T; dV = phiK dKV.
            matmul(sk, m, d, h.v, false, &dkv, true, &mut dpk, false);
            for j in 0..sk {
                for r in 0..m {
                    dpk[j * m + r] += dz[r];
                }
            }
            matmul(sk, d, m, pk, false, &dkv, false, &mut dv, false);
        }
        (_, shift) => {
            // Reverse scan over keys with the suffix sums of the queries that see them.
            let shift = shift.expect("an unmasked problem has the full key state");
            let (mut rk, mut rz) = (vec![R::ZERO; m * d], vec![R::ZERO; m]);
            let mut next_q = sq as i64 - 1;
            for j in (0..sk).rev() {
                while next_q >= 0 && next_q + shift >= j as i64 {
                    let i = next_q as usize;
                    add_outer(&mut rk, &mut rz, &pq[i * m..(i + 1) * m], &dnum[i * d..(i + 1) * d], dden[i]);
                    next_q -= 1;
                }
                let row = &mut dpk[j * m..(j + 1) * m];
                matvec(&rk, &h.v[j * d..(j + 1) * d], row);
                row.iter_mut().zip(&rz).for_each(|(g, &r)| *g += r);
                matvec_t(&rk, &pk[j * m..(j + 1) * m], &mut dv[j * d..(j + 1) * d]);
            }
        }
    }
    let dq = feature_grad(w, m, d, &pq, &mut dpq, &qt, h.scale);
    HeadResult { out, grads: Some((dq, dpk, dv)) }
}

/// A query's output O = num / den (0 when it sees no key); with (dO, dnum), writes dnum = dO / den and returns
/// dden = -(dO . O) / den.
fn output_row<R: Real>(num: &[R], den: R, out: &mut [R], grad: Option<(&[R], &mut [R])>) -> R {
    if den <= R::ZERO {
        return R::ZERO;
    }
    out.iter_mut().zip(num).for_each(|(o, &n)| *o = n / den);
    let Some((dout, dnum)) = grad else { return R::ZERO };
    dnum.iter_mut().zip(dout).for_each(|(dn, &g)| *dn = g / den);
    -dot(dout, out) / den
}

fn column_sums<R: Real>(a: &[R], m: usize) -> Vec<R> {
    let mut z = vec![R::ZERO; m];
    for row in a.chunks(m) {
        z.iter_mut().zip(row).for_each(|(s, &x)| *s += x);
    }
    z
}

/// state (m x d) += p v^T and z += zw p.
fn add_outer<R: Real>(state: &mut [R], z: &mut [R], p: &[R], v: &[R], zw: R) {
    let d = v.len();
    for (r, &pr) in p.iter().enumerate() {
        z[r] += pr * zw;
        state[r * d..(r + 1) * d].iter_mut().zip(v).for_each(|(s, &x)| *s += pr * x);
    }
}

/// out (d) = state^T p, state m x d.
fn matvec_t<R: Real>(state: &[R], p: &[R], out: &mut [R]) {
    let d = out.len();
    out.iter_mut().for_each(|x| *x = R::ZERO);
    for (r, &pr) in p.iter().enumerate() {
        out.iter_mut().zip(&state[r * d..(r + 1) * d]).for_each(|(o, &s)| *o += pr * s);
    }
}

/// out (m) = state x, state m x d.
fn matvec<R: Real>(state: &[R], x: &[R], out: &mut [R]) {
    let d = x.len();
    for (r, o) in out.iter_mut().enumerate() {
        *o = dot(&state[r * d..(r + 1) * d], x);
    }
}

/// The random-feature estimate of exp(scale q_i . k_j) for every pair (rows of `d`), without stabilizers: the
/// quantity FAVOR+ estimates without bias.
#[doc(hidden)]
pub fn kernel_estimate(q: &[f64], k: &[f64], d: usize, scale: f64, m: usize, seed: u64) -> Vec<f64> {
    let w = features::<f64>(m, d, seed);
    let phi = |x: &[f64]| -> Vec<f64> {
        let xt: Vec<f64> = x.iter().map(|v| v * scale.sqrt()).collect();
        let sq = xt.iter().map(|v| v * v).sum::<f64>();
        (0..m)
            .map(|r| ((0..d).map(|c| w[r * d + c] * xt[c]).sum::<f64>() - sq / 2.0).exp() / (m as f64).sqrt())
            .collect()
    };
    let pq: Vec<Vec<f64>> = q.chunks(d).map(phi).collect();
    let pk: Vec<Vec<f64>> = k.chunks(d).map(phi).collect();
    pq.iter().flat_map(|a| pk.iter().map(move |b| a.iter().zip(b).map(|(x, y)| x * y).sum())).collect()
}

/// The effective weights: phi(q_i) . phi(k_j) over the visible keys, normalized per row (seqlen_q x seqlen_k).
pub(crate) fn weights(
    w: &[f64],
    m: usize,
    q: &[f64],
    k: &[f64],
    d: usize,
    scale: f64,
    causal_shift: Option<i64>,
) -> Vec<f64> {
    let (sq, sk) = (q.len() / d, k.len() / d);
    let (pq, _) = feature_map(w, m, d, q, scale, true);
    let (pk, _) = feature_map(w, m, d, k, scale, false);
    let mut a = vec![0.0; sq * sk];
    matmul(sq, sk, m, &pq, false, &pk, true, &mut a, false);
    for (i, row) in a.chunks_mut(sk.max(1)).enumerate() {
        if let Some(shift) = causal_shift {
            row.iter_mut().enumerate().filter(|(j, _)| *j as i64 > i as i64 + shift).for_each(|(_, x)| *x = 0.0);
        }
        let sum: f64 = row.iter().sum();
        row.iter_mut().for_each(|x| *x = if sum > 0.0 { *x / sum } else { 0.0 });
    }
    a
}
