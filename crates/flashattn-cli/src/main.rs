//! The `flashattn` command-line tool.

mod alloc;
mod bench;
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
    /// What this machine offers: CPU instruction sets and threads.
    Info,
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
        Command::Info => {
            info();
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn info() {
    let supported: Vec<String> = flashattn::Isa::supported().iter().map(|i| i.to_string()).collect();
    println!("cpu: {} threads; instruction sets: {}", rayon::current_num_threads(), supported.join(", "));
    match flashattn::Isa::detect() {
        Ok(isa) => println!("cpu flash kernels: {isa}"),
        Err(e) => println!("cpu flash kernels: {e}"),
    }
}
