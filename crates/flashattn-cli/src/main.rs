//! The `flashattn` command-line tool.

mod alloc;
mod bench;
mod compare;
mod decode;
mod device;
mod npy;
mod plot;
mod random;
mod run;
mod subject;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[global_allocator]
static ALLOCATOR: alloc::Counting = alloc::Counting;

/// Fast exact attention (FlashAttention) on CPUs: benchmarks and .npy runs.
#[derive(Parser, Debug)]
#[command(name = "flashattn", version, about)]
struct Cli {
    /// Worker threads [default: one per CPU].
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Standard vs flash attention over a sweep of sequence lengths: time, TFLOP/s, peak memory, scaling.
    Bench(bench::BenchArgs),
    /// Attention on q, k, v from .npy files; writes o, lse (and dq, dk, dv) as f32 .npy.
    Run(run::RunArgs),
    /// Exact flash attention against Linformer and Performer: time, memory and error against N, k and m.
    Compare(compare::CompareArgs),
    /// What this machine offers: CPU instruction sets and threads, GPUs, NVRTC and the kernel cache.
    Info,
    /// Compiles every GPU kernel variant with NVRTC (no GPU needed) and reports registers, stack and spills;
    /// fails on a compile error, on spills in the attention kernels, or on ptxas performance warnings (serialized
    /// wgmma, ignored setmaxnreg, injected wgmma waits). On sm_90 the Hopper family is compiled for sm_90a as well.
    Kernels(KernelsArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        if n == 0 || rayon::ThreadPoolBuilder::new().num_threads(n).build_global().is_err() {
            eprintln!("error: --threads {n}: expected a positive thread count");
            return ExitCode::from(2);
        }
    }
    let result = match &cli.command {
        Command::Bench(args) => bench::run(args),
        Command::Run(args) => run::run(args),
        Command::Compare(args) => compare::run(args),
        Command::Info => {
            info();
            Ok(())
        }
        Command::Kernels(args) => kernels(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[derive(clap::Args, Debug)]
struct KernelsArgs {
    /// GPU architectures to compile for (comma-separated).
    #[arg(long, value_delimiter = ',', default_values = ["sm_80", "sm_86", "sm_89", "sm_90", "sm_120"])]
    arch: Vec<String>,
    /// Instead of reporting, compile every variant into the kernel cache (so later runs start at once).
    #[arg(long)]
    warm: bool,
    /// Only the variants whose names contain this ("decode", "fwd-sm90a-bf16-d128").
    #[arg(long)]
    only: Option<String>,
}

#[cfg(feature = "cuda")]
fn kernels(args: &KernelsArgs) -> Result<(), String> {
    use flashattn::cuda::compile::nvrtc_version;
    let (major, minor) = nvrtc_version().map_err(|e| e.to_string())?;
    println!("NVRTC {major}.{minor}");
    if args.warm {
        for arch in &args.arch {
            let t = std::time::Instant::now();
            let n = flashattn::cuda::warm_cache(arch).map_err(|e| e.to_string())?;
            println!("{arch}: compiled {n} kernel variants into the cache in {:.1} s", t.elapsed().as_secs_f64());
        }
        return Ok(());
    }
    println!(
        "{:<32} {:<7} {:<24} {:>5} {:>6} {:>7} {:>7} {:>13}",
        "variant", "arch", "kernel", "regs", "stack", "spill-st", "spill-ld", "smem/limit KB"
    );
    let mut bad = Vec::new();
    for arch in &args.arch {
        flashattn::cuda::check_kernels(arch, args.only.as_deref(), |unit| {
            let (variant, arch) = (unit.name, unit.arch);
            if let Some((bytes, limit)) = unit.smem.filter(|(bytes, limit)| bytes > limit) {
                bad.push(format!("{variant} {arch}: needs {bytes} bytes of shared memory, the limit is {limit}"));
            }
            for r in &unit.resources {
                let hot = unit.main == Some(r.function.as_str());
                let smem = match unit.smem {
                    Some((bytes, limit)) if hot => format!("{:.0}/{}", bytes as f64 / 1024.0, limit >> 10),
                    _ => String::new(),
                };
                println!(
                    "{:<32} {:<7} {:<24} {:>5} {:>6} {:>7} {:>7} {:>13}",
                    variant, arch, r.function, r.registers, r.stack_bytes, r.spill_stores, r.spill_loads, smem
                );
                if hot && (r.stack_bytes > 0 || r.spill_stores > 0 || r.spill_loads > 0) {
                    bad.push(format!("{variant} {arch} {}: spills or a stack frame", r.function));
                }
                for w in &r.warnings {
                    println!("  {w}");
                    bad.push(format!("{variant} {arch} {}: {w}", r.function));
                }
            }
        })
        .map_err(|e| e.to_string())?;
    }
    if bad.is_empty() {
        println!("all kernels compiled; no spills, stack frames or performance warnings in the attention kernels");
        Ok(())
    } else {
        Err(format!("kernel resource problems: {}", bad.join("; ")))
    }
}

#[cfg(not(feature = "cuda"))]
fn kernels(_: &KernelsArgs) -> Result<(), String> {
    Err("this build has no CUDA support (the `cuda` feature is off)".into())
}

fn info() {
    let supported: Vec<String> = flashattn::Isa::supported().iter().map(|i| i.to_string()).collect();
    println!("cpu: {} threads; instruction sets: {}", rayon::current_num_threads(), supported.join(", "));
    match flashattn::Isa::detect() {
        Ok(isa) => println!("cpu flash kernels: {isa}"),
        Err(e) => println!("cpu flash kernels: {e}"),
    }
    #[cfg(feature = "cuda")]
    {
        use flashattn::cuda;
        match cuda::device_count() {
            Ok(n) => {
                println!("cuda devices: {n}");
                for i in 0..n {
                    match cuda::Gpu::open(i) {
                        Ok(g) => println!(
                            "  cuda:{i}: {} (compute capability {}.{})",
                            g.name(),
                            g.compute_capability().0,
                            g.compute_capability().1
                        ),
                        Err(e) => println!("  cuda:{i}: {e}"),
                    }
                }
            }
            Err(e) => println!("cuda: {e}"),
        }
        match cuda::compile::nvrtc_version() {
            Ok((a, b)) => println!("nvrtc: {a}.{b}"),
            Err(e) => println!("nvrtc: {e}"),
        }
        if let Some(dir) = cuda::compile::cache_dir() {
            println!("kernel cache: {}", dir.display());
        }
    }
}
