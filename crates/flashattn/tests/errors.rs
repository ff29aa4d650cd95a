//! Every invalid input is a typed error whose message names what was expected and what was given.

use flashattn::{AttnError, AttnOptions, Backend, Isa, TensorRef};

fn data(n: usize) -> Vec<f32> {
    (0..n).map(|i| (i as f32 * 0.1).sin()).collect()
}

/// Runs a forward on every backend and returns the error (all backends must agree).
fn forward_err(q: &TensorRef<f32>, k: &TensorRef<f32>, v: &TensorRef<f32>, opts: &AttnOptions) -> AttnError {
    let mut errs = [Backend::Reference, Backend::Cpu(Isa::Portable)]
        .into_iter()
        .map(|b| flashattn::forward(q, k, v, opts, b).unwrap_err());
    let first = errs.next().unwrap();
    assert!(errs.all(|e| e == first));
    first
}

fn msg_has(e: &AttnError, parts: &[&str]) {
    let m = e.to_string();
    for p in parts {
        assert!(m.contains(p), "message '{m}' lacks '{p}'");
    }
}

#[test]
fn shape_errors() {
    let x = data(2 * 3 * 4 * 8);
    let q = TensorRef::new(&x, &[2, 3, 4, 8]);
    let opts = AttnOptions::new();

    let e = forward_err(&TensorRef::new(&x, &[6, 4, 8]), &q, &q, &opts);
    assert!(matches!(e, AttnError::Shape { tensor: "q", .. }));
    msg_has(&e, &["4 dimensions", "[6, 4, 8]"]);

    let k = TensorRef::new(&x[..2 * 3 * 4 * 4], &[2, 3, 4, 4]);
    let e = forward_err(&q, &k, &k, &opts);
    assert!(matches!(e, AttnError::Mismatch { what: "head_dim", a: 8, b: 4, .. }), "{e:?}");

    let k = TensorRef::new(&x[..3 * 4 * 8], &[1, 3, 4, 8]);
    let e = forward_err(&q, &k, &k, &opts);
    assert!(matches!(e, AttnError::Mismatch { what: "batch", a: 2, b: 1, .. }), "{e:?}");

    let k3 = TensorRef::new(&x[..2 * 3 * 3 * 8], &[2, 3, 3, 8]);
    let e = forward_err(&q, &k3, &k3, &opts);
    assert_eq!(e, AttnError::Gqa { heads_q: 4, heads_kv: 3 });
    msg_has(&e, &["multiple", "heads_q = 4", "heads_kv = 3"]);

    let v = TensorRef::new(&x[..2 * 2 * 4 * 8], &[2, 2, 4, 8]);
    let e = forward_err(&q, &q, &v, &opts);
    assert!(matches!(e, AttnError::Mismatch { a: 3, b: 2, .. }), "{e:?}");

    let z = TensorRef::new(&x[..0], &[2, 3, 4, 0]);
    assert!(matches!(forward_err(&z, &z, &z, &opts), AttnError::HeadDim { got: 0, .. }));

    let empty = TensorRef::new(&x[..0], &[0, 3, 4, 8]);
    assert!(matches!(forward_err(&empty, &empty, &empty, &opts), AttnError::Shape { .. }));
}

#[test]
fn stride_errors() {
    let x = data(2 * 3 * 4 * 8);
    let good = TensorRef::new(&x, &[2, 3, 4, 8]);
    let opts = AttnOptions::new();
    // The last dimension must be contiguous.
    let t = TensorRef::strided(&x, &[2, 3, 4, 8], &[96, 32, 8, 2]);
    msg_has(&forward_err(&t, &good, &good, &opts), &["contiguous"]);
    // Strides that run past the buffer.
    let t = TensorRef::strided(&x, &[2, 3, 4, 8], &[100, 32, 8, 1]);
    msg_has(&forward_err(&good, &t, &good, &opts), &["past the end"]);
    // Overlapping heads.
    let t = TensorRef::strided(&x, &[2, 3, 4, 8], &[96, 32, 4, 1]);
    msg_has(&forward_err(&good, &good, &t, &opts), &["head stride"]);
    // A buffer too short for a contiguous shape.
    let t = TensorRef::new(&x[..10], &[2, 3, 4, 8]);
    assert!(matches!(forward_err(&t, &good, &good, &opts), AttnError::Stride { tensor: "q", .. }));
    // Wrong number of strides.
    let t = TensorRef::strided(&x, &[2, 3, 4, 8], &[96, 32, 1]);
    msg_has(&forward_err(&good, &good, &t, &opts), &["expected 4 strides"]);
    // Offsets that overflow.
    let t = TensorRef::strided(&x, &[3, 3, 4, 8], &[usize::MAX / 2, 32, 8, 1]);
    msg_has(&forward_err(&t, &good, &good, &opts), &["overflow"]);
}

#[test]
fn varlen_errors() {
    let x = data(10 * 2 * 8);
    let t = TensorRef::new(&x, &[10, 2, 8]);
    let cases: [(Vec<i32>, Vec<i32>, &str); 6] = [
        (vec![0], vec![0, 10], "batch + 1 >= 2"),
        (vec![1, 10], vec![0, 10], "start at 0"),
        (vec![0, 6, 4, 10], vec![0, 3, 5, 10], "must not decrease"),
        (vec![0, 4, 9], vec![0, 3, 10], "ends at 9"),
        (vec![0, 4, 10], vec![0, 10], "cu_seqlens_q has 2"),
        (vec![0, 4, 10], vec![0, -3, 10], "must not decrease"),
    ];
    for (cq, ck, expect) in cases {
        let e = forward_err(&t, &t, &t, &AttnOptions::new().varlen(cq.clone(), ck.clone()));
        msg_has(&e, &[expect]);
    }
    // Varlen needs 3-dimensional tensors, dense batches 4-dimensional ones.
    let t4 = TensorRef::new(&x, &[1, 10, 2, 8]);
    msg_has(
        &forward_err(&t4, &t4, &t4, &AttnOptions::new().varlen(vec![0, 10], vec![0, 10])),
        &["3 dimensions", "variable-length"],
    );
}

#[test]
fn option_errors() {
    let x = data(2 * 3 * 4 * 8);
    let t = TensorRef::new(&x, &[2, 3, 4, 8]);
    for (opts, expect) in [
        (AttnOptions::new().softcap(0.0), "softcap"),
        (AttnOptions::new().softcap(-1.0), "softcap"),
        (AttnOptions::new().softcap(f32::INFINITY), "softcap"),
        (AttnOptions::new().scale(f32::NAN), "scale"),
        (AttnOptions::new().alibi_slopes(vec![0.5; 3]), "heads_q = 4 or batch * heads_q = 8"),
        (AttnOptions::new().alibi_slopes(vec![f32::NAN; 4]), "finite"),
    ] {
        let e = forward_err(&t, &t, &t, &opts);
        assert!(matches!(e, AttnError::Option { .. }), "{e:?}");
        msg_has(&e, &[expect]);
    }
    // Per-(batch, head) slopes are accepted.
    flashattn::forward(&t, &t, &t, &AttnOptions::new().alibi_slopes(vec![0.25; 8]), Backend::Reference).unwrap();
}

#[test]
fn output_and_backward_input_errors() {
    let x = data(2 * 3 * 4 * 8);
    let t = TensorRef::new(&x, &[2, 3, 4, 8]);
    let opts = AttnOptions::new();
    for backend in [Backend::Reference, Backend::Cpu(Isa::Portable)] {
        let mut out = vec![0.0f32; x.len() - 1];
        let mut lse = vec![0.0f32; 2 * 4 * 3];
        let e = flashattn::forward_into(&t, &t, &t, &opts, backend, &mut out, &mut lse).unwrap_err();
        msg_has(&e, &["out", &format!("{} elements", x.len())]);
        let mut out = vec![0.0f32; x.len()];
        let mut short = vec![0.0f32; 5];
        let e = flashattn::forward_into(&t, &t, &t, &opts, backend, &mut out, &mut short).unwrap_err();
        msg_has(&e, &["lse", "24 elements"]);

        let fwd = flashattn::forward(&t, &t, &t, &opts, backend).unwrap();
        let small = TensorRef::new(&x[..48], &[2, 3, 1, 8]);
        let e = flashattn::backward(&t, &t, &t, &small, &fwd.lse, &t, &opts, backend).unwrap_err();
        assert!(matches!(e, AttnError::Shape { tensor: "o", .. }), "{e:?}");
        let e = flashattn::backward(&t, &t, &t, &fwd.out_ref(), &fwd.lse, &small, &opts, backend).unwrap_err();
        assert!(matches!(e, AttnError::Shape { tensor: "dout", .. }), "{e:?}");
        let e = flashattn::backward(&t, &t, &t, &fwd.out_ref(), &fwd.lse[1..], &t, &opts, backend).unwrap_err();
        assert!(matches!(e, AttnError::Shape { tensor: "lse", .. }), "{e:?}");
        let strided = TensorRef::strided(&x, &[2, 3, 4, 8], &[96, 32, 8, 3]);
        let e = flashattn::backward(&t, &t, &t, &strided, &fwd.lse, &t, &opts, backend).unwrap_err();
        assert!(matches!(e, AttnError::Stride { tensor: "o", .. }), "{e:?}");
        let (mut dq, mut dk, mut dv) = (vec![0.0f32; x.len()], vec![0.0f32; x.len()], vec![0.0f32; 3]);
        let e = flashattn::backward_into(
            &t,
            &t,
            &t,
            &fwd.out_ref(),
            &fwd.lse,
            &t,
            &opts,
            backend,
            (&mut dq, &mut dk, &mut dv),
        )
        .unwrap_err();
        assert!(matches!(e, AttnError::Shape { tensor: "dv", .. }), "{e:?}");
    }
}

#[test]
fn instruction_set_errors() {
    let e = "sse9".parse::<Isa>().unwrap_err();
    assert!(e.contains("portable, avx2, avx512 or amx"), "{e}");
    for isa in Isa::ALL {
        match isa.require() {
            Ok(i) => assert!(i.is_supported()),
            Err(e) => {
                assert!(matches!(e, AttnError::Unsupported { .. }));
                let x = data(64);
                let t = TensorRef::new(&x, &[1, 2, 4, 8]);
                let err = flashattn::forward(&t, &t, &t, &AttnOptions::new(), Backend::Cpu(isa)).unwrap_err();
                msg_has(&err, &[isa.name(), "not supported"]);
            }
        }
    }
}
