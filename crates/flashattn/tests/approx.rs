//! Linformer and Performer: exact where they should be, unbiased where they claim, gradients against finite
//! differences, the prefix-sum causal form against a direct evaluation, and their errors.

mod common;

use common::{inputs, max_abs, max_err, Case};
use flashattn::approx::{self, performer, Method, Projection};
use flashattn::reference::{self, Precision};
use flashattn::{AttnError, AttnOptions, Backend, DType, Plan, TensorRef};

fn oracle(case: &Case) -> Vec<f64> {
    let inp = inputs::<f32>(case);
    let plan = Plan::new(&inp.q.view(), &inp.k.view(), &inp.v.view(), &case.options(), DType::F32).unwrap();
    reference::forward(&plan, &inp.q.view(), &inp.k.view(), &inp.v.view(), Precision::F64).out
}

fn rel_frobenius(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den).sqrt()
}

#[test]
fn linformer_with_full_rank_pooling_is_exact_attention() {
    let case = Case::dense(2, 37, 50, 4, 2, 16);
    let inp = inputs::<f32>(&case);
    let method = Method::Linformer { k: 50, projection: Projection::Pool, seed: 0 };
    let (out, _) =
        approx::run_f64(&inp.q.view(), &inp.k.view(), &inp.v.view(), None, &case.options(), &method).unwrap();
    assert!(max_err(&out, &oracle(&case)) < 1e-12);
    // And in f32 through the public entry point.
    let o32 =
        approx::forward(&inp.q.view(), &inp.k.view(), &inp.v.view(), &case.options(), &method, Backend::cpu().unwrap())
            .unwrap();
    let o32: Vec<f64> = o32.iter().map(|&x| x as f64).collect();
    assert!(max_err(&o32, &oracle(&case)) < 1e-5);
}

#[test]
fn errors_say_what_the_approximations_cannot_do() {
    let x = vec![0.3f32; 2 * 8 * 2 * 4];
    let t = TensorRef::new(&x, &[2, 8, 2, 4]);
    let lin = Method::Linformer { k: 4, projection: Projection::Gaussian, seed: 1 };
    let e = approx::forward(&t, &t, &t, &AttnOptions::new().causal(true), &lin, Backend::cpu().unwrap()).unwrap_err();
    assert!(matches!(e, AttnError::Unsupported { .. }) && e.to_string().contains("no causal form"), "{e}");
    let e = approx::forward(
        &t,
        &t,
        &t,
        &AttnOptions::new(),
        &Method::Linformer { k: 9, projection: Projection::Pool, seed: 0 },
        Backend::cpu().unwrap(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("at most seqlen_k = 8"), "{e}");
    let e = approx::forward(
        &t,
        &t,
        &t,
        &AttnOptions::new(),
        &Method::Performer { features: 0, seed: 0 },
        Backend::cpu().unwrap(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("at least 1 random feature"), "{e}");
    for opts in [
        AttnOptions::new().softcap(5.0),
        AttnOptions::new().window(Some(2), None),
        AttnOptions::new().alibi_slopes(vec![0.5, 0.25]),
    ] {
        let e =
            approx::forward(&t, &t, &t, &opts, &Method::Performer { features: 8, seed: 0 }, Backend::cpu().unwrap())
                .unwrap_err();
        assert!(matches!(e, AttnError::Unsupported { .. }), "{e}");
    }
    let e = approx::forward(
        &t,
        &t,
        &t,
        &AttnOptions::new().scale(-1.0),
        &Method::Performer { features: 8, seed: 0 },
        Backend::cpu().unwrap(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("positive scale"), "{e}");
}

#[test]
fn performer_kernel_estimate_is_unbiased_and_shrinks_like_one_over_sqrt_m() {
    let mut rng = common::Rng::new(3);
    let d = 16;
    let q: Vec<f64> = (0..4 * d).map(|_| rng.normal() as f64 * 0.5).collect();
    let k: Vec<f64> = (0..5 * d).map(|_| rng.normal() as f64 * 0.5).collect();
    let scale = 1.0 / (d as f64).sqrt();
    let exact: Vec<f64> = q
        .chunks(d)
        .flat_map(|a| k.chunks(d).map(move |b| (scale * a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>()).exp()))
        .collect();
    let seeds = 400u64;
    let mut errs = Vec::new();
    for m in [16, 64, 256] {
        let mut mean = vec![0.0; exact.len()];
        let mut sq_err = 0.0;
        for s in 0..seeds {
            let est = performer::kernel_estimate(&q, &k, d, scale, m, s);
            mean.iter_mut().zip(&est).for_each(|(a, b)| *a += b / seeds as f64);
            sq_err += rel_frobenius(&est, &exact).powi(2) / seeds as f64;
        }
        // Unbiased: the mean over seeds is much closer than any single estimate.
        let bias = rel_frobenius(&mean, &exact);
        let rms = sq_err.sqrt();
        assert!(bias < 3.0 * rms / (seeds as f64).sqrt() + 1e-3, "m={m}: bias {bias:.4} vs single-draw error {rms:.4}");
        errs.push(rms);
    }
    // 4x the features halves the error.
    for w in errs.windows(2) {
        let ratio = w[0] / w[1];
        assert!((1.5..2.7).contains(&ratio), "error ratio {ratio:.2} for 4x features ({errs:?})");
    }
}

/// Performer's output against the same random features evaluated directly (every pair), causal or not.
#[test]
fn performer_prefix_sums_match_a_direct_evaluation() {
    for causal in [false, true] {
        let mut case = Case::dense(1, 23, 31, 2, 1, 8);
        case.causal = causal;
        let inp = inputs::<f32>(&case);
        let (sq, sk, d, m) = (23usize, 31usize, 8usize, 32usize);
        let method = Method::Performer { features: m, seed: 11 };
        let (out, _) =
            approx::run_f64(&inp.q.view(), &inp.k.view(), &inp.v.view(), None, &case.options(), &method).unwrap();
        let (q, k, v) = (common::to_f64(&inp.q), common::to_f64(&inp.k), common::to_f64(&inp.v));
        for h in 0..2 {
            let head = |t: &[f64], rows: usize, heads: usize, hh: usize| -> Vec<f64> {
                (0..rows).flat_map(|i| t[(i * heads + hh) * d..(i * heads + hh + 1) * d].to_vec()).collect()
            };
            let (qh, kh, vh) = (head(&q, sq, 2, h), head(&k, sk, 1, 0), head(&v, sk, 1, 0));
            // The library takes the scale in f32.
            let w = performer::kernel_estimate(&qh, &kh, d, (1.0 / (d as f32).sqrt()) as f64, m, 11);
            for i in 0..sq {
                let seen = |j: usize| !causal || j as i64 <= i as i64 + sk as i64 - sq as i64;
                let den: f64 = (0..sk).filter(|&j| seen(j)).map(|j| w[i * sk + j]).sum();
                for c in 0..d {
                    let num: f64 = (0..sk).filter(|&j| seen(j)).map(|j| w[i * sk + j] * vh[j * d + c]).sum();
                    let expect = if den > 0.0 { num / den } else { 0.0 };
                    let got = out[(i * 2 + h) * d + c];
                    assert!(
                        (got - expect).abs() < 1e-9 * (1.0 + expect.abs()),
                        "causal={causal} i={i} c={c}: {got} vs {expect}"
                    );
                }
            }
        }
    }
}

#[test]
fn performer_error_falls_with_more_features() {
    // A small softmax scale keeps exp(q.k) moderate, the regime random features estimate well (with unit-normal
    // q and k at scale 1/sqrt(d) the estimator's variance is huge: see the comparison in BENCHMARKS.md).
    let mut case = Case::dense(1, 64, 64, 2, 2, 16);
    case.scale = Some(0.05);
    let inp = inputs::<f32>(&case);
    let exact = oracle(&case);
    let err = |m: usize| -> f64 {
        // Averaged over redraws to compare expected errors, not single draws.
        (0..8)
            .map(|s| {
                let method = Method::Performer { features: m, seed: s };
                let (out, _) =
                    approx::run_f64(&inp.q.view(), &inp.k.view(), &inp.v.view(), None, &case.options(), &method)
                        .unwrap();
                rel_frobenius(&out, &exact)
            })
            .sum::<f64>()
            / 8.0
    };
    let (e16, e256) = (err(16), err(256));
    assert!(e256 < e16 / 2.5, "16 features: {e16:.4}, 256: {e256:.4}");
}

/// L = sum(dout * out) differentiated numerically, in f64.
#[test]
fn approximation_gradients_match_finite_differences() {
    let methods = [
        (Method::Linformer { k: 5, projection: Projection::Gaussian, seed: 2 }, false),
        (Method::Performer { features: 12, seed: 4 }, false),
        (Method::Performer { features: 12, seed: 4 }, true),
    ];
    for (method, causal) in methods {
        let mut case = Case::dense(1, 6, 9, 2, 1, 4);
        case.causal = causal;
        let inp = inputs::<f32>(&case);
        let opts = case.options();
        let (q, k, v, dout) =
            (common::to_f64(&inp.q), common::to_f64(&inp.k), common::to_f64(&inp.v), common::to_f64(&inp.dout));
        let loss = |q: &[f64], k: &[f64], v: &[f64]| -> f64 {
            let t = |x: &[f64]| x.iter().map(|&v| v as f32).collect::<Vec<f32>>();
            let (q32, k32, v32) = (t(q), t(k), t(v));
            let (qs, ks) = (case.q_shape(), case.kv_shape());
            let (out, _) = approx::run_f64(
                &TensorRef::new(&q32, &qs),
                &TensorRef::new(&k32, &ks),
                &TensorRef::new(&v32, &ks),
                None,
                &opts,
                &method,
            )
            .unwrap();
            out.iter().zip(&dout).map(|(a, b)| a * b).sum()
        };
        let (_, grads) =
            approx::run_f64(&inp.q.view(), &inp.k.view(), &inp.v.view(), Some(&inp.dout.view()), &opts, &method)
                .unwrap();
        let [dq, dk, dv] = grads.unwrap();
        let h = 1.0 / 4096.0;
        for (which, analytic) in [(0, &dq), (1, &dk), (2, &dv)] {
            let base = [&q, &k, &v][which];
            let fd: Vec<f64> = (0..base.len())
                .map(|i| {
                    let mut xs = [q.clone(), k.clone(), v.clone()];
                    xs[which][i] += h;
                    let plus = loss(&xs[0], &xs[1], &xs[2]);
                    xs[which][i] -= 2.0 * h;
                    let minus = loss(&xs[0], &xs[1], &xs[2]);
                    (plus - minus) / (2.0 * h)
                })
                .collect();
            let err = max_err(&fd, analytic);
            assert!(err < 1e-5 * (1.0 + max_abs(&fd)), "{method} causal={causal} grad {which}: {err:e}");
        }
    }
}
