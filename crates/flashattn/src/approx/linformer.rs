//! Linformer: keys and values projected along the sequence to k rows (K' = E K, V' = F V), then exact softmax
//! attention against the k projected rows: O = softmax(scale Q K'^T) V'. O(N k d) time, O(N k) memory.

use super::{matmul, GroupMethod, HeadInput, HeadResult, Projection, Rng};
use crate::reference::{dot, softmax, Real};

/// The two k x seqlen_k projections, E for keys and F for values.
pub(crate) struct Projections<R> {
    pub e: Vec<R>,
    pub f: Vec<R>,
    pub k: usize,
}

impl<R: Real> Projections<R> {
    pub fn new(k: usize, n: usize, kind: Projection, seed: u64) -> Self {
        let (e, f) = match kind {
            Projection::Gaussian => {
                let draw = |seed: u64| {
                    let mut rng = Rng::new(seed);
                    let sd = 1.0 / (k as f64).sqrt();
                    (0..k * n).map(|_| R::of(rng.normal() * sd)).collect::<Vec<R>>()
                };
                (draw(seed), draw(seed.wrapping_add(1)))
            }
            Projection::Pool => {
                // Row i averages keys [i n / k, (i + 1) n / k).
                let mut e = vec![R::ZERO; k * n];
                for i in 0..k {
                    let (lo, hi) = (i * n / k, (i + 1) * n / k);
                    for j in lo..hi {
                        e[i * n + j] = R::of(1.0 / (hi - lo) as f64);
                    }
                }
                (e.clone(), e)
            }
        };
        Projections { e, f, k }
    }
}

/// Linformer for the group loop: the projected keys and values of a key/value head serve every query head of
/// its group, and dK = E^T dK', dV = F^T dV' are taken once from the group's summed dK', dV'.
pub(crate) struct Linformer<R> {
    pub p: Projections<R>,
    pub d: usize,
}

/// K' = E K and V' = F V (k x d each).
pub(crate) struct Keys<R> {
    kp: Vec<R>,
    vp: Vec<R>,
}

impl<R: Real> GroupMethod<R> for Linformer<R> {
    type Keys = Keys<R>;

    fn keys(&self, k: &[R], v: &[R]) -> Keys<R> {
        let (r, d) = (self.p.k, self.d);
        let sk = k.len() / d;
        let (mut kp, mut vp) = (vec![R::ZERO; r * d], vec![R::ZERO; r * d]);
        matmul(r, d, sk, &self.p.e, false, k, false, &mut kp, false);
        matmul(r, d, sk, &self.p.f, false, v, false, &mut vp, false);
        Keys { kp, vp }
    }

    fn head(&self, keys: &Keys<R>, h: &HeadInput<R>) -> HeadResult<R> {
        head(&self.p, keys, h)
    }

    fn key_grads(&self, _: &Keys<R>, dkp: Vec<R>, dvp: Vec<R>) -> (Vec<R>, Vec<R>) {
        let (r, d) = (self.p.k, self.d);
        let sk = self.p.e.len() / r;
        let (mut dk, mut dv) = (vec![R::ZERO; sk * d], vec![R::ZERO; sk * d]);
        matmul(sk, d, r, &self.p.e, true, &dkp, false, &mut dk, false);
        matmul(sk, d, r, &self.p.f, true, &dvp, false, &mut dv, false);
        (dk, dv)
    }
}

/// One query head against its key head's K' and V': the output and, with dout, dq, dK' and dV'.
fn head<R: Real>(p: &Projections<R>, keys: &Keys<R>, h: &HeadInput<R>) -> HeadResult<R> {
    let (d, k, sq) = (h.d, p.k, h.len_q());
    let (kp, vp) = (&keys.kp, &keys.vp);
    let mut pr = vec![R::ZERO; sq * k];
    matmul(sq, k, d, h.q, false, kp, true, &mut pr, false);
    pr.iter_mut().for_each(|x| *x = *x * h.scale);
    softmax(&mut pr, sq, k);
    let mut out = Vec::new();
    if h.want_out {
        out = vec![R::ZERO; sq * d];
        matmul(sq, d, k, &pr, false, vp, false, &mut out, false);
    }
    let Some(dout) = h.dout else { return HeadResult { out, grads: None } };

    // dV' = P^T dO, dP = dO V'^T, dS = P (dP - rowsum(P dP)), dQ = s dS K', dK' = s dS^T Q.
    let mut dvp = vec![R::ZERO; k * d];
    matmul(k, d, sq, &pr, true, dout, false, &mut dvp, false);
    let mut ds = vec![R::ZERO; sq * k];
    matmul(sq, k, d, dout, false, vp, true, &mut ds, false);
    for (prow, drow) in pr.chunks(k).zip(ds.chunks_mut(k)) {
        let pd = dot(prow, drow);
        drow.iter_mut().zip(prow).for_each(|(g, &x)| *g = x * (*g - pd) * h.scale);
    }
    let mut dq = vec![R::ZERO; sq * d];
    matmul(sq, d, k, &ds, false, kp, false, &mut dq, false);
    let mut dkp = vec![R::ZERO; k * d];
    matmul(k, d, sq, &ds, true, h.q, false, &mut dkp, false);
    HeadResult { out, grads: Some((dq, dkp, dvp)) }
}

/// The effective weights on the values: softmax(scale Q K'^T) F, seqlen_q x seqlen_k.
pub(crate) fn weights(p: &Projections<f64>, q: &[f64], k: &[f64], d: usize, scale: f64) -> Vec<f64> {
    let (sq, sk, r) = (q.len() / d, k.len() / d, p.k);
    let mut kp = vec![0.0; r * d];
    matmul(r, d, sk, &p.e, false, k, false, &mut kp, false);
    let mut pr = vec![0.0; sq * r];
    matmul(sq, r, d, q, false, &kp, true, &mut pr, false);
    pr.iter_mut().for_each(|x| *x *= scale);
    softmax(&mut pr, sq, r);
    let mut w = vec![0.0; sq * sk];
    matmul(sq, sk, r, &pr, false, &p.f, false, &mut w, false);
    w
}
