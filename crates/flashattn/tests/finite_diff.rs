//! Gradients against central finite differences of the loss L = sum(dout * o): in f64 for the reference
//! backward (which every other test trusts), and in f32, more loosely, for the flash backward directly.

mod common;

use common::{inputs, Case, Stored};
use flashattn::reference::{self, Precision};
use flashattn::{Backend, DType, Isa, Plan, TensorRef};

fn cases() -> Vec<Case> {
    let mut a = Case::dense(1, 5, 7, 2, 1, 8);
    a.causal = true;
    a.softcap = Some(1.5);
    a.scale = Some(0.7);
    let mut b = Case::dense(2, 6, 4, 2, 2, 4);
    b.window = (Some(1), Some(2));
    b.alibi = true;
    let mut c = Case::dense(1, 3, 3, 1, 1, 16);
    c.varlen = true;
    c.len_q = vec![2, 3];
    c.len_k = vec![3, 1];
    c.strided = true;
    vec![a, b, c]
}

/// L = sum(dout * o) with the f64 reference, for inputs given as f64 (converted to f32 storage when `as_f32`).
fn loss(case: &Case, q: &[f64], k: &[f64], v: &[f64], dout: &[f64]) -> f64 {
    let (qs, kvs) = (case.q_shape(), case.kv_shape());
    let (q, k, v): (Vec<f32>, Vec<f32>, Vec<f32>) = (
        q.iter().map(|&x| x as f32).collect(),
        k.iter().map(|&x| x as f32).collect(),
        v.iter().map(|&x| x as f32).collect(),
    );
    let (q, k, v) = (TensorRef::new(&q, &qs), TensorRef::new(&k, &kvs), TensorRef::new(&v, &kvs));
    let plan = Plan::new(&q, &k, &v, &case.options(), DType::F32).unwrap();
    let o = reference::forward(&plan, &q, &k, &v, Precision::F64).out;
    o.iter().zip(dout).map(|(a, b)| a * b).sum()
}

/// The finite-difference gradient of the loss with respect to input `which` (0 = q, 1 = k, 2 = v).
fn fd_grad(case: &Case, x: [&Vec<f64>; 3], dout: &[f64], which: usize, h: f64) -> Vec<f64> {
    (0..x[which].len())
        .map(|i| {
            let mut plus = [x[0].clone(), x[1].clone(), x[2].clone()];
            let mut minus = plus.clone();
            plus[which][i] += h;
            minus[which][i] -= h;
            (loss(case, &plus[0], &plus[1], &plus[2], dout) - loss(case, &minus[0], &minus[1], &minus[2], dout))
                / (2.0 * h)
        })
        .collect()
}

fn contiguous(s: &Stored<f32>) -> Vec<f64> {
    common::to_f64(s)
}

#[test]
fn gradients_match_finite_differences() {
    for case in cases() {
        let inp = inputs::<f32>(&case);
        let (q, k, v, dout) = (contiguous(&inp.q), contiguous(&inp.k), contiguous(&inp.v), contiguous(&inp.dout));
        // Inputs are exactly representable in f32, so the f64 loss sees them unchanged; step 2^-12 is exact too.
        let fd: Vec<Vec<f64>> = (0..3).map(|w| fd_grad(&case, [&q, &k, &v], &dout, w, 1.0 / 4096.0)).collect();
        let (qv, kv, vv, dv) = (inp.q.view(), inp.k.view(), inp.v.view(), inp.dout.view());
        let plan = Plan::new(&qv, &kv, &vv, &case.options(), DType::F32).unwrap();
        let oracle = reference::backward(&plan, &qv, &kv, &vv, &dv, Precision::F64);
        for (name, fd, ours) in [("dq", &fd[0], &oracle.dq), ("dk", &fd[1], &oracle.dk), ("dv", &fd[2], &oracle.dv)] {
            let err = common::max_err(fd, ours);
            assert!(
                err < 1e-5 * (1.0 + common::max_abs(fd)),
                "reference {name}: {err:e} from finite differences in {case:?}"
            );
        }
        for isa in Isa::supported() {
            let fwd = flashattn::forward(&qv, &kv, &vv, &case.options(), Backend::Cpu(isa)).unwrap();
            let g =
                flashattn::backward(&qv, &kv, &vv, &fwd.out_ref(), &fwd.lse, &dv, &case.options(), Backend::Cpu(isa))
                    .unwrap();
            for (name, fd, ours) in [("dq", &fd[0], &g.dq), ("dk", &fd[1], &g.dk), ("dv", &fd[2], &g.dv)] {
                let ours: Vec<f64> = ours.iter().map(|&x| x as f64).collect();
                let err = common::max_err(fd, &ours);
                assert!(
                    err < 1e-4 * (1.0 + common::max_abs(fd)),
                    "{isa} {name}: {err:e} from finite differences in {case:?}"
                );
            }
        }
    }
}
