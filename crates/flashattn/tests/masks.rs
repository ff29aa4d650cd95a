//! Rows that see no key: o = 0, lse = -inf and zero gradients, never NaN, on every backend.

mod common;

use common::{check_case, inputs, Case};
use flashattn::{Backend, DType, Isa, Plan};

fn backends() -> Vec<Backend> {
    Isa::supported().into_iter().map(Backend::Cpu).chain([Backend::Reference]).collect()
}

/// Runs `case` and returns (o, lse, dq) as f32, checking every value is finite or an lse of -inf.
fn run(case: &Case, backend: Backend) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let inp = inputs::<f32>(case);
    let (q, k, v, dout) = (inp.q.view(), inp.k.view(), inp.v.view(), inp.dout.view());
    let opts = case.options();
    let fwd = flashattn::forward(&q, &k, &v, &opts, backend).unwrap();
    let g = flashattn::backward(&q, &k, &v, &fwd.out_ref(), &fwd.lse, &dout, &opts, backend).unwrap();
    assert!(
        fwd.out.iter().chain(&g.dq).chain(&g.dk).chain(&g.dv).all(|x| x.is_finite()),
        "{backend}: non-finite output"
    );
    assert!(fwd.lse.iter().all(|x| x.is_finite() || *x == f32::NEG_INFINITY), "{backend}: bad lse");
    (fwd.out, fwd.lse, g.dq)
}

#[test]
fn causal_with_more_queries_than_keys_masks_the_first_rows() {
    // Bottom-right alignment: with Sq = 9 > Sk = 4, queries 0..5 see no key.
    let mut case = Case::dense(2, 9, 4, 2, 1, 16);
    case.causal = true;
    let (sq, sk, h, d) = (9usize, 4usize, 2usize, 16usize);
    for backend in backends() {
        let (o, lse, dq) = run(&case, backend);
        for b in 0..2 {
            for i in 0..sq {
                for hq in 0..h {
                    let row = ((b * sq + i) * h + hq) * d;
                    let masked = i < sq - sk;
                    let l = lse[(b * h + hq) * sq + i];
                    assert_eq!(l == f32::NEG_INFINITY, masked, "{backend}: lse of row {i} = {l}");
                    if masked {
                        assert!(o[row..row + d].iter().all(|&x| x == 0.0), "{backend}: o of masked row {i}");
                        assert!(dq[row..row + d].iter().all(|&x| x == 0.0), "{backend}: dq of masked row {i}");
                    }
                }
            }
        }
        check_case(&case, backend, true).unwrap();
    }
}

#[test]
fn windows_that_see_nothing_and_empty_sequences() {
    // A right window of 0 and a left window of 0 with Sq > Sk: only the diagonal, and early rows see nothing.
    let mut case = Case::dense(1, 40, 7, 3, 3, 8);
    case.window = (Some(0), Some(0));
    // A variable-length batch whose second sequence has no keys and whose third has no queries.
    let mut varlen = Case::dense(1, 1, 1, 2, 1, 24);
    varlen.varlen = true;
    varlen.len_q = vec![5, 6, 0, 3];
    varlen.len_k = vec![4, 0, 5, 9];
    for backend in backends() {
        let (_, lse, _) = run(&case, backend);
        assert_eq!(lse.iter().filter(|x| **x == f32::NEG_INFINITY).count(), 3 * (40 - 7), "{backend}");
        let (o, lse, dq) = run(&varlen, backend);
        // Sequence 1 (tokens 5..11) sees no key: zero outputs, -inf lse for both heads.
        let inp = inputs::<f32>(&varlen);
        let plan = Plan::new(&inp.q.view(), &inp.k.view(), &inp.v.view(), &varlen.options(), DType::F32).unwrap();
        assert_eq!(plan.lse_shape(), vec![2, 14]);
        for t in 5..11 {
            for h in 0..2 {
                assert_eq!(lse[h * 14 + t], f32::NEG_INFINITY, "{backend}");
                let row = (t * 2 + h) * 24;
                assert!(o[row..row + 24].iter().chain(&dq[row..row + 24]).all(|&x| x == 0.0), "{backend}");
            }
        }
        check_case(&case, backend, true).unwrap();
        check_case(&varlen, backend, true).unwrap();
    }
}

#[test]
fn windows_wider_than_any_sequence_are_unbounded() {
    // Compared with the unbounded mask directly: the oracle shares the mask code, so it cannot catch this alone.
    let base = Case::dense(2, 33, 50, 2, 1, 16);
    let with = |window, causal| Case { window, causal, ..base.clone() };
    let pairs = [
        (with((Some(usize::MAX), Some(usize::MAX)), false), with((None, None), false)),
        (with((Some(1 << 40), Some(0)), false), with((None, None), true)),
    ];
    for backend in backends() {
        for (wide, unbounded) in &pairs {
            let (o, lse, dq) = run(wide, backend);
            let (o2, lse2, dq2) = run(unbounded, backend);
            for (a, b) in o.iter().chain(&lse).chain(&dq).zip(o2.iter().chain(&lse2).chain(&dq2)) {
                assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{backend}: {a} vs {b}");
            }
        }
    }
}
