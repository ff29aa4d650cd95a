//! The CUDA backend against the f64 oracle: the same random problems as the CPU tests (f16 and bf16, head dims
//! that are multiples of 8 up to 256), larger fixed shapes, the deterministic backward, and GPU-specific errors.
//! Without a usable GPU every test says so on stderr and passes.
#![cfg(feature = "cuda")]

mod common;

use common::{any_case, check_case, gpu, inputs, Case};
use flashattn::{AttnError, AttnOptions, Backend, DType, TensorRef};
use half::bf16;
use proptest::prelude::*;

const HEAD_DIMS: [usize; 13] = [8, 16, 32, 40, 64, 72, 96, 128, 136, 160, 192, 224, 256];

fn cases() -> u32 {
    std::env::var("FLASHATTN_TEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(64)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn gpu_forward_and_backward_match_the_oracle(case in any_case(vec![DType::BF16, DType::F16], HEAD_DIMS.to_vec())) {
        if let Some(backend) = gpu("gpu_forward_and_backward_match_the_oracle") {
            check_case(&case, backend, true)?;
        }
    }
}

/// Many blocks in every direction: long sequences, every pass's tile sizes crossed, GQA, masks, varlen.
#[test]
fn gpu_larger_shapes() {
    let Some(backend) = gpu("gpu_larger_shapes") else { return };
    for (d, causal, dtype) in [
        (64, false, DType::BF16),
        (128, true, DType::BF16),
        (96, true, DType::F16),
        (256, false, DType::BF16),
        (192, true, DType::F16),
    ] {
        let mut case = Case::dense(2, 1000, 1300, 4, 2, d);
        case.causal = causal;
        case.dtype = dtype;
        check_case(&case, backend, true).unwrap();
    }
    let mut varlen = Case::dense(1, 1, 1, 6, 2, 128);
    varlen.varlen = true;
    varlen.len_q = vec![700, 0, 129, 1500];
    varlen.len_k = vec![900, 64, 0, 1400];
    varlen.causal = true;
    varlen.window = (Some(300), None);
    varlen.dtype = DType::BF16;
    check_case(&varlen, backend, true).unwrap();
    // At least 2048 query rows: the long variants (on Hopper, d = 64 under a mask takes 192-row tiles), with a
    // partial last tile, a window with a score modifier, and a variable-length batch.
    let mut long = Case::dense(1, 2100, 2300, 2, 1, 64);
    long.causal = true;
    long.dtype = DType::BF16;
    check_case(&long, backend, true).unwrap();
    long.causal = false;
    long.window = (Some(700), Some(40));
    long.softcap = Some(15.0);
    check_case(&long, backend, true).unwrap();
    let mut long_varlen = Case::dense(1, 1, 1, 2, 2, 64);
    long_varlen.varlen = true;
    long_varlen.len_q = vec![2100, 5, 700];
    long_varlen.len_k = vec![2300, 40, 0];
    long_varlen.causal = true;
    long_varlen.dtype = DType::F16;
    check_case(&long_varlen, backend, true).unwrap();
    let mut modded = Case::dense(2, 777, 777, 8, 8, 128);
    modded.softcap = Some(20.0);
    modded.alibi = true;
    modded.dtype = DType::BF16;
    check_case(&modded, backend, true).unwrap();
    // Windows wider than any sequence (up to usize::MAX) behave as unbounded ones on each side.
    for (d, window) in [(64, (Some(usize::MAX), Some(0))), (128, (Some(1 << 40), Some(usize::MAX)))] {
        let mut wide = Case::dense(2, 300, 500, 4, 2, d);
        wide.window = window;
        wide.dtype = DType::BF16;
        check_case(&wide, backend, true).unwrap();
    }
}

#[test]
fn gpu_deterministic_backward_is_reproducible() {
    let Some(backend) = gpu("gpu_deterministic_backward_is_reproducible") else { return };
    // Head dims 64 and 128: on Hopper, both step sizes of its backward.
    for (causal, d) in [(false, 64), (true, 64), (false, 128), (true, 128)] {
        let mut case = Case::dense(2, 600, 900, 4, 1, d);
        case.causal = causal;
        case.dtype = DType::BF16;
        let inp = inputs::<bf16>(&case);
        let (q, k, v, dout) = (inp.q.view(), inp.k.view(), inp.v.view(), inp.dout.view());
        let opts = case.options().deterministic(true);
        let fwd = flashattn::forward(&q, &k, &v, &opts, backend).unwrap();
        let first = flashattn::backward(&q, &k, &v, &fwd.out_ref(), &fwd.lse, &dout, &opts, backend).unwrap();
        for _ in 0..3 {
            let again = flashattn::backward(&q, &k, &v, &fwd.out_ref(), &fwd.lse, &dout, &opts, backend).unwrap();
            assert!(
                again.dq == first.dq && again.dk == first.dk && again.dv == first.dv,
                "causal={causal}, d={d}: not bit-identical"
            );
        }
        let mut det = case.clone();
        det.seed = case.seed;
        check_case(&det, backend, true).unwrap();
    }
}

/// Dense batches with no queries or no keys (zero strides in the contiguous layout): zeros and -inf, no error.
#[test]
fn gpu_empty_sequences() {
    let Some(backend) = gpu("gpu_empty_sequences") else { return };
    for (sq, sk, d) in [(5, 0, 64), (0, 5, 128), (0, 0, 96), (70, 0, 32)] {
        let mut case = Case::dense(2, sq, sk, 2, 1, d);
        case.dtype = DType::BF16;
        check_case(&case, backend, true).unwrap();
    }
}

#[test]
fn gpu_errors() {
    let Some(backend) = gpu("gpu_errors") else { return };
    let x = vec![0.5f32; 2 * 3 * 4 * 16];
    let t = TensorRef::new(&x, &[2, 3, 4, 16]);
    let e = flashattn::forward(&t, &t, &t, &AttnOptions::new(), backend).unwrap_err();
    assert!(matches!(e, AttnError::Unsupported { .. }), "{e:?}");
    let y = vec![bf16::from_f32(0.5); 2 * 3 * 4 * 12];
    let t = TensorRef::new(&y, &[2, 3, 4, 12]);
    let e = flashattn::forward(&t, &t, &t, &AttnOptions::new(), backend).unwrap_err();
    assert!(matches!(e, AttnError::HeadDim { got: 12, .. }), "{e:?}");
    let z = vec![bf16::from_f32(0.5); 2 * 3 * 4 * 264];
    let t = TensorRef::new(&z, &[2, 3, 4, 264]);
    assert!(matches!(
        flashattn::forward(&t, &t, &t, &AttnOptions::new(), backend).unwrap_err(),
        AttnError::HeadDim { got: 264, .. }
    ));
    let e = flashattn::forward(&t, &t, &t, &AttnOptions::new(), Backend::Cuda(99)).unwrap_err();
    assert!(e.to_string().contains("GPU 99"), "{e}");
}

/// Linformer and Performer on the GPU against the same methods on the CPU (same projections and features):
/// outputs and gradients, f16 and bf16, GQA, causal Performer with a partial last chunk.
#[test]
fn gpu_approximations_match_the_cpu() {
    use flashattn::approx::{self, Method, Projection};
    let Some(gpu) = gpu("gpu_approximations_match_the_cpu") else { return };
    let cpu = Backend::cpu().unwrap();
    let rel = |a: &[f32], b: &[f32]| -> f64 {
        let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
        let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
        (num / den.max(1e-30)).sqrt()
    };
    let methods = [
        (Method::Linformer { k: 32, projection: Projection::Gaussian, seed: 5 }, false),
        (Method::Linformer { k: 40, projection: Projection::Pool, seed: 0 }, false),
        (Method::Performer { features: 48, seed: 9 }, false),
        (Method::Performer { features: 48, seed: 9 }, true),
    ];
    for (method, causal) in methods {
        for dtype in [DType::BF16, DType::F16] {
            let mut case = Case::dense(2, 150, 150, 4, 2, 64);
            case.causal = causal;
            case.dtype = dtype;
            // A small scale keeps the random-feature estimate well conditioned, so both sides agree closely.
            case.scale = Some(0.05);
            let inp = inputs::<half::bf16>(&case);
            let (q, k, v, dout) = (inp.q.view(), inp.k.view(), inp.v.view(), inp.dout.view());
            let opts = case.options();
            let f = |x: Vec<half::bf16>| x.into_iter().map(|v| v.to_f32()).collect::<Vec<f32>>();
            let (og, oc) = (
                f(approx::forward(&q, &k, &v, &opts, &method, gpu).unwrap()),
                f(approx::forward(&q, &k, &v, &opts, &method, cpu).unwrap()),
            );
            assert!(rel(&og, &oc) < 1e-2, "{method} causal={causal} {dtype}: output differs by {}", rel(&og, &oc));
            let (gq, gk, gv) = approx::backward(&q, &k, &v, &dout, &opts, &method, gpu).unwrap();
            let (cq, ck, cv) = approx::backward(&q, &k, &v, &dout, &opts, &method, cpu).unwrap();
            for (name, g, c) in [("dq", f(gq), f(cq)), ("dk", f(gk), f(ck)), ("dv", f(gv), f(cv))] {
                assert!(rel(&g, &c) < 2e-2, "{method} causal={causal} {dtype}: {name} differs by {}", rel(&g, &c));
            }
        }
    }
}
