//! `flashattn compare`: exact flash attention against Linformer and Performer: time and memory against N, and
//! what the approximations give up (relative Frobenius error of the output, and of the attention weights they
//! effectively apply), with the N where each approximation overtakes flash attention, if it does.

use crate::bench::{human_bytes, loglog_slope, time};
use crate::device::{Device, Target};
use crate::plot::{self, Series};
use crate::random::fill_normal;
use crate::subject::{self, Pass, Shape, Subject};
use clap::Args;
use flashattn::approx::{self, Method, Projection};
use flashattn::{DType, Element, Plan, TensorRef};
use half::{bf16, f16};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct CompareArgs {
    /// Where everything runs: auto (a CUDA GPU when one can be used, else the CPU), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Element type [default: f32 on the CPU, bf16 on a GPU].
    #[arg(long)]
    pub dtype: Option<DType>,
    /// Head dimension.
    #[arg(long, default_value_t = 64)]
    pub head_dim: usize,
    /// Query heads.
    #[arg(long, default_value_t = 4)]
    pub heads: usize,
    /// Key/value heads (grouped-query attention when fewer than --heads, which they must divide); default: --heads.
    #[arg(long)]
    pub heads_kv: Option<usize>,
    /// Batch size.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Sequence lengths (comma-separated).
    #[arg(long, value_delimiter = ',', default_values = ["1024", "2048", "4096", "8192", "16384", "32768", "65536"])]
    pub seqlen: Vec<usize>,
    /// Causal mask (Performer through prefix sums; Linformer has no causal form and is left out).
    #[arg(long)]
    pub causal: bool,
    /// Linformer projection sizes k (comma-separated; empty for none).
    #[arg(long, value_delimiter = ',', default_values = ["64", "256"])]
    pub linformer_k: Vec<usize>,
    /// Linformer projection: pool (means over k segments; the identity at k = N) or gaussian (an untrained
    /// random projection, whose output grows like sqrt(N / k): see BENCHMARKS.md).
    #[arg(long, default_value = "pool")]
    pub projection: Projection,
    /// Softmax scale [default: 1/sqrt(head_dim)]. Random features estimate exp(scale q.k) well only when it
    /// stays moderate: a smaller scale shows Performer in its regime.
    #[arg(long)]
    pub scale: Option<f32>,
    /// Performer random features m (comma-separated; empty for none).
    #[arg(long, value_delimiter = ',', default_values = ["64", "256"])]
    pub performer_m: Vec<usize>,
    /// Seed of the projections and random features (another seed redraws them).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Which passes to time.
    #[arg(long, value_enum, default_value = "both")]
    pub pass: crate::bench::PassSel,
    /// Largest N at which the attention-weight error is computed (it materializes N x N weights).
    #[arg(long, default_value_t = 2048)]
    pub weights_max: usize,
    /// Skip exact attention where one call is predicted (from smaller sizes) to take longer than this, in seconds.
    #[arg(long, default_value_t = 120.0)]
    pub exact_budget: f64,
    /// Keep timing a cell until this many seconds have passed (median reported).
    #[arg(long, default_value_t = 0.5)]
    pub min_time: f64,
    /// One JSON object per measurement on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Chart of time against N and of error against k and m (.png or .svg).
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

/// One measured (or skipped) cell, as printed with --json.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    #[serde(rename = "impl")]
    pub implementation: String,
    /// k (Linformer) or m (Performer); 0 for exact attention.
    pub param: usize,
    pub device: String,
    pub dtype: String,
    pub batch: usize,
    pub heads: usize,
    pub seqlen: usize,
    pub head_dim: usize,
    pub causal: bool,
    pub pass: String,
    pub ms: Option<f64>,
    pub peak_bytes: Option<usize>,
    /// Relative Frobenius error of the output against exact attention.
    pub out_err: Option<f64>,
    /// Relative Frobenius error of the effective attention weights (first sequence, first head).
    pub attn_err: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
}

/// A closure as a benchmark subject.
struct Closure<F>(F);

impl<F: FnMut(Pass) -> flashattn::Result<()>> Subject for Closure<F> {
    fn run(&mut self, pass: Pass) -> flashattn::Result<()> {
        (self.0)(pass)
    }
}

pub fn run(args: &CompareArgs) -> Result<(), String> {
    let target = Target::resolve(&args.device, None)?;
    let dtype = target.dtype(args.dtype)?;
    if args.seqlen.is_empty() || args.seqlen.contains(&0) || args.head_dim == 0 || args.heads == 0 || args.batch == 0 {
        return Err("--seqlen, --head-dim, --heads and --batch must be positive".into());
    }
    if args.heads_kv.is_some_and(|kv| kv == 0 || !args.heads.is_multiple_of(kv)) {
        return Err(format!("--heads-kv: expected a divisor of --heads ({})", args.heads));
    }
    let mut methods: Vec<Method> = Vec::new();
    if !args.causal {
        methods.extend(args.linformer_k.iter().map(|&k| Method::Linformer {
            k,
            projection: args.projection,
            seed: args.seed,
        }));
    }
    methods.extend(args.performer_m.iter().map(|&m| Method::Performer { features: m, seed: args.seed }));
    match dtype {
        DType::F32 => compare::<f32>(args, target, &methods),
        DType::F16 => compare::<f16>(args, target, &methods),
        DType::BF16 => compare::<bf16>(args, target, &methods),
    }
}

fn method_name(m: &Method) -> (&'static str, usize) {
    match *m {
        Method::Linformer { k, .. } => ("linformer", k),
        Method::Performer { features, .. } => ("performer", features),
    }
}

fn rel_frobenius(a: impl Iterator<Item = f64>, b: impl Iterator<Item = f64>) -> f64 {
    let (mut num, mut den) = (0.0, 0.0);
    for (x, y) in a.zip(b) {
        num += (x - y) * (x - y);
        den += y * y;
    }
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

fn compare<T: Element>(args: &CompareArgs, target: Target, methods: &[Method]) -> Result<(), String> {
    let device = target.device;
    let exact_backend = target.backend();
    let label = target.label();
    let passes = args.pass.passes();
    let total = (args.seqlen.len() * (1 + methods.len()) * passes.len()) as u64;
    let bar = if args.json { ProgressBar::hidden() } else { ProgressBar::new(total) };
    bar.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed}] {msg}").unwrap());
    let mut rows: Vec<Row> = Vec::new();
    for &n in &args.seqlen {
        let shape = Shape {
            batch: args.batch,
            heads_q: args.heads,
            heads_kv: args.heads_kv.unwrap_or(args.heads),
            seqlen: n,
            head_dim: args.head_dim,
            causal: args.causal,
            scale: args.scale,
            deterministic: false,
        };
        let (qs, kvs) = (shape.q_shape(), shape.kv_shape());
        let numel: usize = qs.iter().product();
        let tensor = |seed| {
            let mut v = vec![T::default(); numel];
            fill_normal(&mut v, seed);
            v
        };
        let (q, k, v, dout) = (tensor(1), tensor(2), tensor(3), tensor(4));
        let (qt, kt, vt, dt) =
            (TensorRef::new(&q, &qs), TensorRef::new(&k, &kvs), TensorRef::new(&v, &kvs), TensorRef::new(&dout, &qs));
        let opts = shape.options();
        let cell = |implementation: &str, param: usize, dev: &str, pass: Pass| Row {
            implementation: implementation.into(),
            param,
            device: dev.into(),
            dtype: T::DTYPE.name().into(),
            batch: shape.batch,
            heads: shape.heads_q,
            seqlen: n,
            head_dim: shape.head_dim,
            causal: shape.causal,
            pass: pass.name().into(),
            ms: None,
            peak_bytes: None,
            out_err: None,
            attn_err: None,
            skipped: None,
        };

        // Exact attention: timed (as `bench` times it), and its output is what the approximations are measured
        // against.
        let mut exact_out: Option<Vec<f32>> = None;
        for &pass in passes {
            bar.set_message(format!("exact {} N={n}", pass.name()));
            let mut row = cell("flash", 0, &label, pass);
            if let Some(why) = over_budget(&rows, "flash", pass, n, args.exact_budget) {
                row.skipped = Some(why);
            } else {
                if exact_out.is_none() {
                    let f = flashattn::forward(&qt, &kt, &vt, &opts, exact_backend).map_err(|e| e.to_string())?;
                    exact_out = Some(f.out.iter().map(|x| x.to_f32()).collect());
                }
                let needs_forward_output = pass == Pass::Backward;
                let t = match device {
                    Device::Cpu => subject::host(exact_backend, T::DTYPE, shape, needs_forward_output),
                    Device::Cuda(i) => subject::device(i, T::DTYPE, shape, needs_forward_output),
                }
                .and_then(|mut s| time(s.as_mut(), pass, args.min_time))
                .map_err(|e| e.to_string())?;
                (row.ms, row.peak_bytes) = (Some(t.ms), Some(t.peak_bytes));
            }
            emit(args, &row);
            rows.push(row);
            bar.inc(1);
        }

        let exact_weights = (n <= args.weights_max).then(|| {
            let plan = Plan::new(&qt, &kt, &vt, &opts, T::DTYPE).expect("validated above");
            flashattn::reference::weights(&plan, &qt, &kt, 0, 0)
        });
        for method in methods {
            let (name, param) = method_name(method);
            let out = approx::forward(&qt, &kt, &vt, &opts, method, exact_backend).map_err(|e| e.to_string())?;
            let out_err = exact_out
                .as_ref()
                .map(|e| rel_frobenius(out.iter().map(|x| x.to_f32() as f64), e.iter().map(|&x| x as f64)));
            let attn_err = match &exact_weights {
                Some(w) => Some(rel_frobenius(
                    approx::weights(&qt, &kt, &vt, &opts, method, 0, 0).map_err(|e| e.to_string())?.into_iter(),
                    w.iter().copied(),
                )),
                None => None,
            };
            for &pass in passes {
                bar.set_message(format!("{method} {} N={n}", pass.name()));
                let mut row = cell(name, param, &label, pass);
                let t = match device {
                    Device::Cpu => {
                        let mut subject = Closure(|p: Pass| match p {
                            Pass::Forward => approx::forward(&qt, &kt, &vt, &opts, method, exact_backend).map(|_| ()),
                            Pass::Backward => {
                                approx::backward(&qt, &kt, &vt, &dt, &opts, method, exact_backend).map(|_| ())
                            }
                        });
                        time(&mut subject, pass, args.min_time)
                    }
                    Device::Cuda(i) => subject::approx_device(i, T::DTYPE, shape, *method)
                        .and_then(|mut s| time(s.as_mut(), pass, args.min_time)),
                }
                .map_err(|e| e.to_string())?;
                // Host memory on the CPU; on a GPU, the device buffers the call allocated.
                (row.ms, row.peak_bytes) = (Some(t.ms), Some(t.peak_bytes));
                (row.out_err, row.attn_err) = (out_err, attn_err);
                emit(args, &row);
                rows.push(row);
                bar.inc(1);
            }
        }
    }
    bar.finish_and_clear();
    if !args.json {
        print_table(&rows);
        print_crossovers(&rows);
    }
    if let Some(path) = &args.plot {
        draw(
            path,
            &rows,
            &format!(
                "{label}, {}, d={}, H={}{}, B={}{}",
                T::DTYPE,
                args.head_dim,
                args.heads,
                args.heads_kv.filter(|&kv| kv != args.heads).map_or(String::new(), |kv| format!(" (KV {kv})")),
                args.batch,
                if args.causal { ", causal" } else { "" }
            ),
        )?;
        if !args.json {
            println!("plot written to {}", path.display());
        }
    }
    Ok(())
}

fn emit(args: &CompareArgs, row: &Row) {
    if args.json {
        println!("{}", serde_json::to_string(row).unwrap());
    }
}

/// Why exact attention is skipped at N: one call predicted (quadratically from the largest N measured) to take
/// longer than the budget.
fn over_budget(rows: &[Row], implementation: &str, pass: Pass, n: usize, budget: f64) -> Option<String> {
    let prev = rows
        .iter()
        .filter(|r| r.implementation == implementation && r.pass == pass.name() && r.ms.is_some())
        .max_by_key(|r| r.seqlen)?;
    let predicted = prev.ms? * (n as f64 / prev.seqlen as f64).powi(2) / 1e3;
    (predicted > budget).then(|| format!("predicted {predicted:.0} s, over --exact-budget {budget} s"))
}

fn print_table(rows: &[Row]) {
    println!(
        "{:<10} {:>5} {:>4} {:>7} {:>11} {:>12} {:>9} {:>9}",
        "method", "k/m", "pass", "N", "ms", "peak extra", "out err", "attn err"
    );
    let fmt_err = |e: Option<f64>| e.map_or("-".to_string(), |e| format!("{e:.3}"));
    for r in rows {
        let head = format!(
            "{:<10} {:>5} {:>4} {:>7}",
            r.implementation,
            if r.param > 0 { r.param.to_string() } else { "-".into() },
            r.pass,
            r.seqlen
        );
        match (&r.skipped, r.ms) {
            (Some(why), _) => println!("{head} skipped: {why}"),
            (None, Some(ms)) => println!(
                "{head} {ms:>11.2} {:>12} {:>9} {:>9}",
                r.peak_bytes.map_or("-".into(), human_bytes),
                fmt_err(r.out_err),
                fmt_err(r.attn_err)
            ),
            _ => println!("{head} (no result)"),
        }
    }
}

/// Time slopes and, per approximation and pass, the first N where it beats exact attention.
fn print_crossovers(rows: &[Row]) {
    println!();
    let mut keys: Vec<(String, usize, String)> =
        rows.iter().map(|r| (r.implementation.clone(), r.param, r.pass.clone())).collect();
    keys.sort();
    keys.dedup();
    for (imp, param, pass) in &keys {
        let series: Vec<&Row> = rows
            .iter()
            .filter(|r| &r.implementation == imp && r.param == *param && &r.pass == pass && r.ms.is_some())
            .collect();
        let slope = loglog_slope(&series.iter().map(|r| (r.seqlen as f64, r.ms.unwrap())).collect::<Vec<_>>());
        let mut line = format!(
            "{imp:<10} {:>5} {pass}: time slope {}",
            if *param > 0 { param.to_string() } else { "-".into() },
            slope.map_or("-".into(), |s| format!("{s:.2}"))
        );
        if imp != "flash" {
            let beats = series.iter().find(|r| {
                rows.iter().any(|e| {
                    e.implementation == "flash"
                        && &e.pass == pass
                        && e.seqlen == r.seqlen
                        && e.ms.is_some_and(|m| m > r.ms.unwrap())
                })
            });
            line += &match beats {
                Some(r) => format!(", faster than exact attention from N = {}", r.seqlen),
                None => ", slower than exact attention at every N measured".into(),
            };
        }
        println!("{line}");
    }
}

fn draw(path: &std::path::Path, rows: &[Row], title: &str) -> Result<(), String> {
    let mut keys: Vec<(String, usize, String)> =
        rows.iter().map(|r| (r.implementation.clone(), r.param, r.pass.clone())).collect();
    keys.sort();
    keys.dedup();
    let time: Vec<Series> = keys
        .iter()
        .map(|(imp, param, pass)| Series {
            label: if *param > 0 { format!("{imp} {param} {pass}") } else { format!("{imp} {pass}") },
            points: rows
                .iter()
                .filter(|r| &r.implementation == imp && r.param == *param && &r.pass == pass)
                .filter_map(|r| Some((r.seqlen as f64, r.ms?)))
                .collect(),
        })
        .filter(|s| !s.points.is_empty())
        .collect();
    // Error against k or m, one line per method and N.
    let mut err: Vec<Series> = Vec::new();
    let mut ns: Vec<usize> = rows.iter().filter(|r| r.out_err.is_some()).map(|r| r.seqlen).collect();
    ns.sort();
    ns.dedup();
    for imp in ["linformer", "performer"] {
        for &n in &ns {
            let points: Vec<(f64, f64)> = rows
                .iter()
                .filter(|r| r.implementation == imp && r.seqlen == n && r.pass == "fwd")
                .filter_map(|r| Some((r.param as f64, r.out_err?)))
                .collect();
            if !points.is_empty() {
                err.push(Series { label: format!("{imp} N={n}"), points });
            }
        }
    }
    plot::panels(
        path,
        title,
        "N (time) / k or m (error)",
        &[("time per call", "ms", time), ("output error vs exact", "relative Frobenius", err)],
    )
}
