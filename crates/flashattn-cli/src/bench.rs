//! `flashattn bench`: standard vs flash attention over a sweep of sequence lengths.
//!
//! Shapes follow the FlashAttention papers: batch * seqlen = 16384 tokens, hidden = 2048 (heads = 2048 / d).
//! Each cell reports the median time, TFLOP/s in the papers' convention, and the peak extra heap memory of the
//! call; a matrix multiplication measured in the same run gives the machine's ceiling for context.

use crate::alloc::peak_extra;
use crate::device::{Device, Target};
use crate::plot;
use crate::subject::{self, Pass, Shape, Subject};
use clap::{Args, ValueEnum};
use flashattn::{AttnError, Backend, DType, Isa};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Impl {
    /// Tiled flash attention.
    Flash,
    /// Standard attention materializing the score matrix, in f64 (the reference).
    Reference,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PassSel {
    Fwd,
    Bwd,
    Both,
}

impl PassSel {
    pub fn passes(self) -> &'static [Pass] {
        match self {
            PassSel::Fwd => &[Pass::Forward],
            PassSel::Bwd => &[Pass::Backward],
            PassSel::Both => &[Pass::Forward, Pass::Backward],
        }
    }
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Where flash attention runs: auto (a CUDA GPU when one can be used, else the CPU), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Element type of q, k, v [default: f32 on the CPU, bf16 on a GPU].
    #[arg(long)]
    pub dtype: Option<DType>,
    /// Head dimensions to sweep (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "64")]
    pub head_dim: Vec<usize>,
    /// Query heads [default: 2048 / head_dim].
    #[arg(long)]
    pub heads: Option<usize>,
    /// Key/value heads (grouped-query attention) [default: --heads].
    #[arg(long)]
    pub heads_kv: Option<usize>,
    /// Batch size [default: 16384 / seqlen, at least 1].
    #[arg(long)]
    pub batch: Option<usize>,
    /// Sequence lengths to sweep (comma-separated); seqlen_q = seqlen_k, or with --seqlen-q the KV cache's length.
    #[arg(long, value_delimiter = ',', default_value = "512,1024,2048,4096,8192,16384")]
    pub seqlen: Vec<usize>,
    /// New queries per sequence against a KV cache of --seqlen tokens (decoding, GPU): times the decode kernels
    /// and reports the bandwidth reached beside a device-to-device copy [default batch 1, heads 32].
    #[arg(long)]
    pub seqlen_q: Option<usize>,
    /// With --seqlen-q: the cache in pages of this many tokens, in a shuffled order.
    #[arg(long)]
    pub paged: Option<usize>,
    /// Causal mask.
    #[arg(long)]
    pub causal: bool,
    /// Time the deterministic backward (GPU: dQ added in a fixed order; the CPU's is always deterministic).
    #[arg(long)]
    pub deterministic: bool,
    /// Which passes to time.
    #[arg(long, value_enum, default_value = "both")]
    pub pass: PassSel,
    /// Implementations to compare (comma-separated) [default: flash,reference on the CPU; flash on a GPU]. The
    /// reference always runs on the CPU.
    #[arg(long = "impl", value_enum, value_delimiter = ',')]
    pub impls: Vec<Impl>,
    /// Print one JSON object per measurement on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Draw time and memory against sequence length into this .png or .svg file.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Keep timing a cell until this many seconds have passed (median reported).
    #[arg(long, default_value_t = 1.0)]
    pub min_time: f64,
    /// Skip the reference where one call is predicted (from smaller sizes) to take longer than this, in seconds.
    #[arg(long, default_value_t = 120.0)]
    pub reference_budget: f64,
    /// CPU instruction set for flash attention [default: the fastest this CPU has].
    #[arg(long)]
    pub cpu_isa: Option<Isa>,
}

/// One measured (or skipped) cell, as printed with --json.
#[derive(Clone, Debug, Serialize)]
pub struct Measurement {
    #[serde(rename = "impl")]
    pub implementation: String,
    pub device: String,
    /// CPU worker threads of the run.
    pub threads: usize,
    pub dtype: String,
    pub batch: usize,
    pub heads_q: usize,
    pub heads_kv: usize,
    pub seqlen_q: usize,
    pub seqlen_k: usize,
    pub head_dim: usize,
    pub causal: bool,
    pub pass: String,
    pub ms: Option<f64>,
    pub tflops: Option<f64>,
    pub peak_bytes: Option<usize>,
    pub reps: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
}

/// The machine's matrix-multiplication throughput, measured in the same run.
#[derive(Clone, Debug, Serialize)]
pub struct Ceiling {
    #[serde(rename = "impl")]
    pub implementation: String,
    pub device: String,
    pub threads: usize,
    pub dtype: String,
    pub size: usize,
    pub ms: f64,
    pub tflops: f64,
}

/// What a run measures on: the device, its element type, and the implementations.
struct Setup {
    device: Device,
    isa: Isa,
    dtype: DType,
    label: String,
}

pub fn run(args: &BenchArgs) -> Result<(), String> {
    let target = Target::resolve(&args.device, args.cpu_isa)?;
    if let Some(seqlen_q) = args.seqlen_q {
        return crate::decode::run(args, &target, seqlen_q);
    }
    let (device, isa) = (target.device, target.isa);
    if args.seqlen.is_empty() || args.seqlen.contains(&0) {
        return Err("--seqlen: expected positive sequence lengths".into());
    }
    let dtype = target.dtype(args.dtype)?;
    let impls = if !args.impls.is_empty() {
        args.impls.clone()
    } else if device == Device::Cpu {
        vec![Impl::Flash, Impl::Reference]
    } else {
        vec![Impl::Flash]
    };
    let passes = args.pass.passes();
    let setup = Setup { device, isa, dtype, label: target.label() };
    let first = ceiling(&setup, args.json)?;

    let mut shapes = Vec::new();
    for &d in &args.head_dim {
        if d == 0 {
            return Err("--head-dim: expected positive head dimensions".into());
        }
        for &n in &args.seqlen {
            let heads_q = args.heads.unwrap_or((2048 / d).max(1));
            shapes.push(Shape {
                batch: args.batch.unwrap_or((16384 / n).max(1)),
                heads_q,
                heads_kv: args.heads_kv.unwrap_or(heads_q),
                seqlen: n,
                head_dim: d,
                causal: args.causal,
                scale: None,
                deterministic: args.deterministic,
            });
        }
    }
    let total = (shapes.len() * impls.len() * passes.len()) as u64;
    let bar = if args.json { ProgressBar::hidden() } else { ProgressBar::new(total) };
    bar.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed}] {msg}").unwrap());

    let mut rows: Vec<Measurement> = Vec::new();
    for shape in &shapes {
        for &imp in &impls {
            for &pass in passes {
                bar.set_message(format!("{imp:?} {} d={} N={}", pass.name(), shape.head_dim, shape.seqlen));
                let m = measure(args, &setup, imp, *shape, pass, &rows)?;
                if args.json {
                    println!("{}", serde_json::to_string(&m).unwrap());
                }
                rows.push(m);
                bar.inc(1);
            }
        }
    }
    bar.finish_and_clear();
    // The machine's matrix rate, at the start and at the end of the run (clocks and neighbours drift).
    let last = ceiling(&setup, args.json)?;
    let ceiling = if last.tflops > first.tflops { last } else { first };
    if args.json {
        println!("{}", serde_json::to_string(&ceiling).unwrap());
    } else {
        println!(
            "{}, attention in {dtype}; {} GEMM {n}^3 ({}, median of 10, the better of start and end of the run): {}",
            setup.label,
            ceiling.dtype,
            ceiling.implementation,
            rate(ceiling.tflops, device),
            n = ceiling.size
        );
        print_table(&rows, &ceiling, device);
        print_summary(&rows);
    }
    if let Some(path) = &args.plot {
        plot::scaling(path, &rows, &format!("{}, {}", setup.label, dtype))?;
        if !args.json {
            println!("plot written to {}", path.display());
        }
    }
    Ok(())
}

/// A throughput in the unit that suits the device: GFLOP/s on CPUs, TFLOP/s on GPUs.
fn rate(tflops: f64, device: Device) -> String {
    match device {
        Device::Cpu => format!("{:.1} GFLOP/s", tflops * 1e3),
        Device::Cuda(_) => format!("{tflops:.1} TFLOP/s"),
    }
}

/// The device's matrix rate: an f32 GEMM of the gemm crate on the CPU, a bf16 cuBLAS GEMM on a GPU.
fn ceiling(setup: &Setup, quiet: bool) -> Result<Ceiling, String> {
    match setup.device {
        Device::Cpu => Ok(gemm_ceiling(quiet)),
        Device::Cuda(i) => gpu_ceiling(i, &setup.label, quiet),
    }
}

#[cfg(feature = "cuda")]
fn gpu_ceiling(ordinal: usize, label: &str, quiet: bool) -> Result<Ceiling, String> {
    let n = 8192;
    if !quiet {
        eprintln!("measuring the bf16 GEMM ceiling ({n}^3, cuBLAS)...");
    }
    let gpu = flashattn::cuda::Gpu::open(ordinal).map_err(|e| e.to_string())?;
    let tflops = gpu.matmul_tflops(n, 10).map_err(|e| e.to_string())?;
    Ok(Ceiling {
        implementation: "cublas".into(),
        device: label.into(),
        threads: rayon::current_num_threads(),
        dtype: "bf16".into(),
        size: n,
        ms: 2.0 * (n as f64).powi(3) / tflops / 1e9,
        tflops,
    })
}

#[cfg(not(feature = "cuda"))]
fn gpu_ceiling(_: usize, _: &str, _: bool) -> Result<Ceiling, String> {
    Err("no CUDA support in this build".into())
}

fn impl_name(imp: Impl, setup: &Setup) -> String {
    match (imp, setup.device) {
        (Impl::Flash, Device::Cpu) => format!("flash-{}", setup.isa),
        (Impl::Flash, Device::Cuda(_)) => "flash-cuda".into(),
        (Impl::Reference, _) => "reference".into(),
    }
}

fn measure(
    args: &BenchArgs,
    setup: &Setup,
    imp: Impl,
    shape: Shape,
    pass: Pass,
    done: &[Measurement],
) -> Result<Measurement, String> {
    let mut m = Measurement {
        implementation: impl_name(imp, setup),
        device: if imp == Impl::Flash { setup.label.clone() } else { "cpu".into() },
        threads: rayon::current_num_threads(),
        dtype: setup.dtype.name().into(),
        batch: shape.batch,
        heads_q: shape.heads_q,
        heads_kv: shape.heads_kv,
        seqlen_q: shape.seqlen,
        seqlen_k: shape.seqlen,
        head_dim: shape.head_dim,
        causal: shape.causal,
        pass: pass.name().into(),
        ms: None,
        tflops: None,
        peak_bytes: None,
        reps: 0,
        skipped: None,
    };
    if imp == Impl::Reference {
        if let Some(why) = reference_skip(args, shape, pass, &m.implementation, done) {
            m.skipped = Some(why);
            return Ok(m);
        }
    }
    let mut subject = match (imp, setup.device) {
        (Impl::Flash, Device::Cpu) => {
            subject::host(Backend::Cpu(setup.isa), setup.dtype, shape, pass == Pass::Backward)
        }
        (Impl::Reference, _) => subject::host(Backend::Reference, setup.dtype, shape, pass == Pass::Backward),
        (Impl::Flash, Device::Cuda(i)) => subject::device(i, setup.dtype, shape, pass == Pass::Backward),
    }
    .map_err(|e| e.to_string())?;
    let t = time(subject.as_mut(), pass, args.min_time).map_err(|e| e.to_string())?;
    m.ms = Some(t.ms);
    m.tflops = Some(shape.forward_flops() * pass.flop_factor() / (t.ms * 1e-3) / 1e12);
    m.peak_bytes = Some(t.peak_bytes);
    m.reps = t.reps;
    Ok(m)
}

/// Why the reference cannot run this cell: its score matrices would not fit in memory, or it would take longer
/// than the budget (predicted quadratically from the largest size already measured).
fn reference_skip(args: &BenchArgs, shape: Shape, pass: Pass, name: &str, done: &[Measurement]) -> Option<String> {
    let threads = rayon::current_num_threads();
    let need = threads * flashattn::reference::scratch_bytes(shape.seqlen, shape.seqlen, false);
    if let Some(avail) = available_memory() {
        if need as f64 > 0.7 * avail as f64 {
            return Some(format!("its {0}x{0} score matrices ({1:.1} GiB on {threads} threads) do not fit in memory ({2:.1} GiB available)", shape.seqlen, gib(need), gib(avail)));
        }
    }
    let previous = done
        .iter()
        .filter(|m| m.implementation == name && m.pass == pass.name() && m.head_dim == shape.head_dim && m.ms.is_some())
        .max_by_key(|m| m.seqlen_q)?;
    let per_seq = previous.ms? / previous.batch as f64;
    let predicted = per_seq * shape.batch as f64 * (shape.seqlen as f64 / previous.seqlen_q as f64).powi(2) / 1e3;
    (predicted > args.reference_budget).then(|| {
        format!("one call would take about {predicted:.0} s, over --reference-budget {} s", args.reference_budget)
    })
}

fn gib(bytes: usize) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// MemAvailable from /proc/meminfo, in bytes (None where unknown).
fn available_memory() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

pub struct Timing {
    pub ms: f64,
    pub reps: usize,
    pub peak_bytes: usize,
}

/// Median time of a pass: one warm-up (which also measures peak memory), then batches of calls (each about
/// 20 ms, so launch gaps and timer resolution do not count) until `min_time` seconds have passed, at least 3
/// and at most 100 batches. A warm-up already longer than `min_time` is the only sample.
pub fn time(subject: &mut dyn Subject, pass: Pass, min_time: f64) -> Result<Timing, AttnError> {
    let start = Instant::now();
    let (r, heap_peak) = peak_extra(|| subject.run(pass));
    r?;
    let peak_bytes = subject.workspace_bytes().unwrap_or(heap_peak);
    let warm = start.elapsed().as_secs_f64();
    if warm >= min_time {
        return Ok(Timing { ms: warm * 1e3, reps: 1, peak_bytes });
    }
    let per_batch = ((0.02 / warm).ceil() as usize).clamp(1, 1000);
    let batches = ((min_time / (warm * per_batch as f64)).ceil() as usize).clamp(3, 100);
    let mut samples = Vec::with_capacity(batches);
    for _ in 0..batches {
        samples.push(subject.run_batch(pass, per_batch)? * 1e3);
    }
    samples.sort_by(f64::total_cmp);
    Ok(Timing { ms: samples[batches / 2], reps: batches * per_batch, peak_bytes })
}

/// f32 GEMM throughput of a well-tuned library (the gemm crate) on all threads: median of 10 after a warm-up,
/// the statistic every other cell reports.
fn gemm_ceiling(quiet: bool) -> Ceiling {
    let n = 2048;
    if !quiet {
        eprintln!("measuring the f32 GEMM ceiling ({n}^3)...");
    }
    let mut a = vec![0f32; n * n];
    let mut b = vec![0f32; n * n];
    crate::random::fill_normal(&mut a, 1);
    crate::random::fill_normal(&mut b, 2);
    let mut c = vec![0f32; n * n];
    let threads = rayon::current_num_threads();
    let mut once = || {
        let t = Instant::now();
        // SAFETY: a, b, c are n x n row-major buffers that outlive the call.
        unsafe {
            gemm::gemm(
                n,
                n,
                n,
                c.as_mut_ptr(),
                1,
                n as isize,
                false,
                a.as_ptr(),
                1,
                n as isize,
                b.as_ptr(),
                1,
                n as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(threads),
            );
        }
        t.elapsed().as_secs_f64() * 1e3
    };
    once();
    let mut samples: Vec<f64> = (0..10).map(|_| once()).collect();
    samples.sort_by(f64::total_cmp);
    let ms = samples[5];
    Ceiling {
        implementation: "gemm".into(),
        device: "cpu".into(),
        threads: rayon::current_num_threads(),
        dtype: "f32".into(),
        size: n,
        ms,
        tflops: 2.0 * (n as f64).powi(3) / (ms * 1e-3) / 1e12,
    }
}

fn print_table(rows: &[Measurement], ceiling: &Ceiling, device: Device) {
    let (unit, scale) = match device {
        Device::Cpu => ("GFLOP/s", 1e3),
        Device::Cuda(_) => ("TFLOP/s", 1.0),
    };
    println!();
    println!(
        "{:<14} {:>4} {:>4} {:>6} {:>7} {:>4} {:>4} {:>10} {:>9} {:>7} {:>12}",
        "impl", "pass", "d", "causal", "N", "B", "H", "ms", unit, "%GEMM", "peak extra"
    );
    for m in rows {
        let head = format!(
            "{:<14} {:>4} {:>4} {:>6} {:>7} {:>4} {:>4}",
            m.implementation,
            m.pass,
            m.head_dim,
            if m.causal { "yes" } else { "no" },
            m.seqlen_q,
            m.batch,
            m.heads_q
        );
        match (&m.skipped, m.ms, m.tflops, m.peak_bytes) {
            (Some(why), ..) => println!("{head} skipped: {why}"),
            (None, Some(ms), Some(tf), Some(peak)) => {
                println!(
                    "{head} {ms:>10.3} {:>9.1} {:>6.0}% {:>12}",
                    tf * scale,
                    100.0 * tf / ceiling.tflops,
                    human_bytes(peak)
                )
            }
            _ => println!("{head} (no result)"),
        }
    }
}

pub fn human_bytes(b: usize) -> String {
    let b = b as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else if b >= (1u64 << 20) as f64 {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    } else {
        format!("{:.1} KiB", b / 1024.0)
    }
}

/// Least-squares slope of log(y) against log(x).
pub fn loglog_slope(points: &[(f64, f64)]) -> Option<f64> {
    let pts: Vec<(f64, f64)> =
        points.iter().filter(|(x, y)| *x > 0.0 && *y > 0.0).map(|(x, y)| (x.ln(), y.ln())).collect();
    if pts.len() < 2 {
        return None;
    }
    let n = pts.len() as f64;
    let (mx, my) = (pts.iter().map(|p| p.0).sum::<f64>() / n, pts.iter().map(|p| p.1).sum::<f64>() / n);
    let sxx: f64 = pts.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = pts.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

/// Scaling slopes per series and flash's speedup over the reference.
fn print_summary(rows: &[Measurement]) {
    println!();
    println!("scaling with N (log-log slopes; time is per sequence, so both methods' O(N^2) work gives 2):");
    let mut series: Vec<(String, String, usize, bool)> =
        rows.iter().map(|m| (m.implementation.clone(), m.pass.clone(), m.head_dim, m.causal)).collect();
    series.sort();
    series.dedup();
    for (imp, pass, d, causal) in &series {
        let pts: Vec<&Measurement> = rows
            .iter()
            .filter(|m| {
                &m.implementation == imp && &m.pass == pass && m.head_dim == *d && m.causal == *causal && m.ms.is_some()
            })
            .collect();
        let time =
            loglog_slope(&pts.iter().map(|m| (m.seqlen_q as f64, m.ms.unwrap() / m.batch as f64)).collect::<Vec<_>>());
        let mem = loglog_slope(
            &pts.iter().map(|m| (m.seqlen_q as f64, m.peak_bytes.unwrap_or(0) as f64)).collect::<Vec<_>>(),
        );
        let fmt = |s: Option<f64>| s.map_or("-".into(), |s| format!("{s:.2}"));
        println!("  {imp:<14} {pass} d={d:<4} causal={causal:<5}  time {}  peak memory {}", fmt(time), fmt(mem));
    }
    let flash: Vec<&Measurement> =
        rows.iter().filter(|m| m.implementation.starts_with("flash") && m.ms.is_some()).collect();
    let mut printed = false;
    for f in flash {
        if let Some(r) = rows.iter().find(|r| {
            r.implementation == "reference"
                && r.pass == f.pass
                && r.head_dim == f.head_dim
                && r.seqlen_q == f.seqlen_q
                && r.causal == f.causal
                && r.ms.is_some()
        }) {
            if !printed {
                println!("flash speedup over the reference:");
                printed = true;
            }
            println!(
                "  {} d={} N={}: {:.1}x faster, {:.1}x less peak extra memory",
                f.pass,
                f.head_dim,
                f.seqlen_q,
                r.ms.unwrap() / f.ms.unwrap(),
                r.peak_bytes.unwrap_or(0) as f64 / f.peak_bytes.unwrap_or(1).max(1) as f64
            );
        }
    }
}
