//! The `flashattn` binary end to end: .npy round trips checked against the library's reference, the benchmark's
//! JSON and plots, and the errors a user sees.

use flashattn::{AttnOptions, Backend, TensorRef};
use npyz::WriterBuilder;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_flashattn"))
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("flashattn-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write_npy<T: npyz::AutoSerialize + Copy>(path: &Path, data: &[T], shape: &[usize]) {
    let shape: Vec<u64> = shape.iter().map(|&n| n as u64).collect();
    let mut w = npyz::WriteOptions::new()
        .default_dtype()
        .shape(&shape)
        .writer(std::io::BufWriter::new(std::fs::File::create(path).unwrap()))
        .begin_nd()
        .unwrap();
    w.extend(data.iter().copied()).unwrap();
    w.finish().unwrap();
}

fn read_npy(path: &Path) -> (Vec<f32>, Vec<usize>) {
    let npy = npyz::NpyFile::new(std::fs::File::open(path).unwrap()).unwrap();
    let shape = npy.shape().iter().map(|&n| n as usize).collect();
    (npy.into_vec::<f32>().unwrap(), shape)
}

fn values(n: usize, seed: f32) -> Vec<f32> {
    (0..n).map(|i| ((i as f32 * 0.731 + seed).sin() * 1.7).fract() * 2.0).collect()
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn fails(out: Output, expect: &str) {
    assert!(!out.status.success(), "expected failure");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(expect), "stderr lacks '{expect}': {err}");
}

fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(1e-6f32, |m, x| m.max(x.abs()));
    a.iter().zip(b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// `flashattn run --q Q --k K --v V --out o.npy` on files of `dir`; callers add the rest.
fn run_cmd(dir: &Path, q: &str, k: &str, v: &str) -> Command {
    let p = |n: &str| dir.join(n).to_str().unwrap().to_string();
    let mut c = bin();
    c.args(["run", "--q", &p(q), "--k", &p(k), "--v", &p(v), "--out", &p("o.npy")]);
    c
}

#[test]
fn run_forward_and_backward_match_the_library() {
    let dir = scratch("run");
    let (b, s, hq, hkv, d) = (2, 37, 4, 2, 16);
    let q = values(b * s * hq * d, 0.1);
    let k = values(b * s * hkv * d, 0.2);
    let v = values(b * s * hkv * d, 0.3);
    let dout = values(b * s * hq * d, 0.4);
    for (name, data, shape) in
        [("q", &q, [b, s, hq, d]), ("k", &k, [b, s, hkv, d]), ("v", &v, [b, s, hkv, d]), ("do", &dout, [b, s, hq, d])]
    {
        write_npy(&dir.join(format!("{name}.npy")), data, &shape);
    }
    let p = |n: &str| dir.join(n).to_str().unwrap().to_string();
    ok(run_cmd(&dir, "q.npy", "k.npy", "v.npy")
        .args(["--lse", &p("lse.npy")])
        .args(["--dout", &p("do.npy"), "--dq", &p("dq.npy"), "--dk", &p("dk.npy"), "--dv", &p("dv.npy")])
        .args(["--causal", "--window", "10,-1", "--softcap", "5", "--scale", "0.3"])
        .output()
        .unwrap());

    let opts = AttnOptions::new().causal(true).window(Some(10), None).softcap(5.0).scale(0.3);
    let (qt, kt, vt, dt) = (
        TensorRef::new(&q, &[b, s, hq, d]),
        TensorRef::new(&k, &[b, s, hkv, d]),
        TensorRef::new(&v, &[b, s, hkv, d]),
        TensorRef::new(&dout, &[b, s, hq, d]),
    );
    let fwd = flashattn::forward(&qt, &kt, &vt, &opts, Backend::Reference).unwrap();
    let g = flashattn::backward(&qt, &kt, &vt, &fwd.out_ref(), &fwd.lse, &dt, &opts, Backend::Reference).unwrap();
    for (file, expect, shape) in [
        ("o.npy", &fwd.out, vec![b, s, hq, d]),
        ("lse.npy", &fwd.lse, vec![b, hq, s]),
        ("dq.npy", &g.dq, vec![b, s, hq, d]),
        ("dk.npy", &g.dk, vec![b, s, hkv, d]),
        ("dv.npy", &g.dv, vec![b, s, hkv, d]),
    ] {
        let (got, got_shape) = read_npy(&dir.join(file));
        assert_eq!(got_shape, shape, "{file}");
        assert!(max_rel(&got, expect) < 1e-5, "{file}: {}", max_rel(&got, expect));
    }
}

#[test]
fn run_varlen_f16_inputs_in_bf16() {
    let dir = scratch("varlen");
    let (total, h, d) = (30, 2, 8);
    let q: Vec<half::f16> = values(total * h * d, 0.5).into_iter().map(half::f16::from_f32).collect();
    write_npy(&dir.join("q.npy"), &q, &[total, h, d]);
    write_npy(&dir.join("cu.npy"), &[0i32, 12, 12, 30], &[4]);
    write_npy(&dir.join("cu64.npy"), &[0i64, 12, 12, 30], &[4]);
    let p = |n: &str| dir.join(n).to_str().unwrap().to_string();
    for cu in ["cu.npy", "cu64.npy"] {
        ok(run_cmd(&dir, "q.npy", "q.npy", "q.npy")
            .args(["--lse", &p("lse.npy"), "--dtype", "bf16", "--cu-seqlens-q", &p(cu), "--cu-seqlens-k", &p(cu)])
            .output()
            .unwrap());
        let (o, shape) = read_npy(&dir.join("o.npy"));
        assert_eq!(shape, vec![total, h, d]);
        // bf16 results are exactly representable in bf16.
        assert!(o.iter().all(|&x| half::bf16::from_f32(x).to_f32() == x));
        assert_eq!(read_npy(&dir.join("lse.npy")).1, vec![h, total]);
    }
}

#[test]
fn run_reports_bad_input() {
    let dir = scratch("bad");
    let p = |n: &str| dir.join(n).to_str().unwrap().to_string();
    write_npy(&dir.join("q.npy"), &values(2 * 3 * 4 * 8, 0.0), &[2, 3, 4, 8]);
    write_npy(&dir.join("k.npy"), &values(2 * 3 * 3 * 8, 0.0), &[2, 3, 3, 8]);
    write_npy(&dir.join("int.npy"), &[1i32, 2, 3], &[3]);
    std::fs::write(dir.join("junk.npy"), b"not a numpy file").unwrap();
    let base = |k: &str| run_cmd(&dir, "q.npy", k, k);
    fails(base("missing.npy").output().unwrap(), "missing.npy");
    fails(base("junk.npy").output().unwrap(), "not a readable .npy file");
    fails(base("int.npy").output().unwrap(), "expected a float32, float16 or float64 array");
    fails(base("k.npy").output().unwrap(), "heads_q to be a multiple of heads_kv");
    fails(base("q.npy").args(["--dq", &p("dq.npy")]).output().unwrap(), "need --dout");
    fails(base("q.npy").args(["--dout", &p("q.npy")]).output().unwrap(), "at least one of --dq");
    fails(base("q.npy").args(["--window", "3"]).output().unwrap(), "LEFT,RIGHT");
    fails(base("q.npy").args(["--window", "-2,3"]).output().unwrap(), "LEFT,RIGHT");
    fails(base("q.npy").args(["--softcap", "-1"]).output().unwrap(), "softcap");
    fails(base("q.npy").args(["--cu-seqlens-q", &p("int.npy")]).output().unwrap(), "cu-seqlens-k");
    fails(base("q.npy").args(["--device", "tpu"]).output().unwrap(), "--device tpu");
    fails(base("q.npy").env("FLASHATTN_CPU_ISA", "mmx").output().unwrap(), "FLASHATTN_CPU_ISA");
}

#[test]
fn bench_json_and_plot() {
    let dir = scratch("bench");
    let plot = dir.join("scaling.svg");
    let out = ok(bin()
        .args([
            "bench",
            "--seqlen",
            "64,128",
            "--head-dim",
            "16",
            "--heads",
            "2",
            "--batch",
            "1",
            "--json",
            "--min-time",
            "0.01",
            "--plot",
            plot.to_str().unwrap(),
        ])
        .env("FLASHATTN_CPU_ISA", "portable")
        .output()
        .unwrap());
    let rows: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    // 2 lengths x 2 implementations x 2 passes, and the GEMM ceiling.
    assert_eq!(rows.len(), 9);
    for r in rows.iter().filter(|r| r["impl"] != "gemm") {
        for key in [
            "impl",
            "device",
            "dtype",
            "batch",
            "heads_q",
            "heads_kv",
            "seqlen_q",
            "seqlen_k",
            "head_dim",
            "causal",
            "pass",
            "ms",
            "tflops",
            "peak_bytes",
        ] {
            assert!(!r[key].is_null(), "{key} missing in {r}");
        }
        assert!(r["ms"].as_f64().unwrap() > 0.0);
    }
    assert!(rows.iter().any(|r| r["impl"] == "flash-portable"));
    assert!(rows.iter().any(|r| r["impl"] == "gemm" && r["tflops"].as_f64().unwrap() > 0.0));
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(svg.contains("<svg") && svg.contains("time per sequence"));
}

#[test]
fn bench_table_and_errors() {
    let out = ok(bin()
        .args([
            "bench",
            "--seqlen",
            "32",
            "--head-dim",
            "8",
            "--heads",
            "1",
            "--batch",
            "1",
            "--pass",
            "fwd",
            "--min-time",
            "0.01",
        ])
        .output()
        .unwrap());
    assert!(out.contains("GFLOP/s") && out.contains("reference") && out.contains("scaling with N"), "{out}");
    fails(bin().args(["bench", "--seqlen", "0"]).output().unwrap(), "--seqlen");
    // Decoding times the GPU kernels: on the CPU it says so.
    fails(bin().args(["bench", "--device", "cpu", "--seqlen-q", "1"]).output().unwrap(), "--seqlen-q");
    fails(
        bin()
            .args([
                "bench",
                "--plot",
                "x.pdf",
                "--seqlen",
                "16",
                "--head-dim",
                "8",
                "--batch",
                "1",
                "--heads",
                "1",
                "--min-time",
                "0",
            ])
            .output()
            .unwrap(),
        ".png or .svg",
    );
    fails(bin().args(["--threads", "0", "info"]).output().unwrap(), "--threads 0");
}

#[test]
fn compare_json_plot_and_errors() {
    let plot = scratch("compare").join("compare.svg");
    let args = ["compare", "--device", "cpu", "--seqlen", "64,128", "--heads", "2", "--head-dim", "16"];
    let out = ok(bin()
        .args(args)
        .args(["--linformer-k", "8,64", "--performer-m", "16", "--min-time", "0.01", "--json", "--plot"])
        .arg(&plot)
        .output()
        .unwrap());
    let rows: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    // 2 lengths x (exact attention, Linformer k = 8 and 64, Performer m = 16) x 2 passes.
    assert_eq!(rows.len(), 16, "{out}");
    for r in &rows {
        assert!(r["ms"].as_f64().unwrap() > 0.0 && r["peak_bytes"].as_u64().is_some(), "{r}");
        let err = r["out_err"].as_f64();
        match (r["impl"].as_str().unwrap(), r["param"].as_u64().unwrap(), r["seqlen"].as_u64().unwrap()) {
            ("flash", ..) => assert!(err.is_none(), "{r}"),
            // k = N pooling is the identity: Linformer is exact attention.
            ("linformer", 64, 64) => assert!(err.unwrap() < 1e-4 && r["attn_err"].as_f64().unwrap() < 1e-4, "{r}"),
            _ => assert!(err.unwrap() > 1e-3, "an approximation should not be exact: {r}"),
        }
    }
    assert!(std::fs::read_to_string(&plot).unwrap().contains("<svg"));

    // Causal: Performer through prefix sums; Linformer, which has no causal form, is left out.
    let out = ok(bin()
        .args(args)
        .args([
            "--causal",
            "--linformer-k",
            "8",
            "--performer-m",
            "16",
            "--pass",
            "fwd",
            "--min-time",
            "0.01",
            "--json",
        ])
        .output()
        .unwrap());
    assert!(out.contains("\"performer\"") && !out.contains("\"linformer\""), "{out}");

    fails(bin().args(args).args(["--linformer-k", "0"]).output().unwrap(), "linformer k");
    fails(bin().args(args).args(["--linformer-k", "100"]).output().unwrap(), "seqlen_k");
}
