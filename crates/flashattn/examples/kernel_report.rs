//! Compiles one GPU kernel variant with NVRTC and prints ptxas' report (no GPU needed): a tool for kernel work.
//!
//! `cargo run --release --example kernel_report -- fwd|bwd HDIM MASKED(0|1) MOD(0|1) ARCH [-DEXTRA=...]`
//! (ARCH sm_90a: the Hopper family);
//! `CUBIN_OUT=file.cubin` also writes the cubin (for cuobjdump / nvdisasm), `SOURCE_OUT=file.cu` the source
//! (and the headers it includes beside it).
fn main() {
    #[cfg(feature = "cuda")]
    report();
}

#[cfg(feature = "cuda")]
fn report() {
    use flashattn::cuda::kernels::{Pass, Variant};
    let args: Vec<String> = std::env::args().collect();
    let pass = if args[1] == "fwd" { Pass::Forward } else { Pass::Backward };
    let hdim: usize = args[2].parse().unwrap();
    let hopper = args[5] == "sm_90a";
    let v = Variant {
        family: if hopper {
            flashattn::cuda::kernels::Family::Hopper
        } else {
            flashattn::cuda::kernels::Family::Portable
        },
        pass,
        dtype: flashattn::DType::BF16,
        hdim,
        masked: args[3] == "1",
        has_mod: args[4] == "1",
        sm90: args[5] != "sm_80",
        budget: flashattn::cuda::kernels::Budget::Large,
        long: false,
    }
    // The tiles of the architecture's shared-memory budget (sm_86: 99 KB).
    .within(flashattn::cuda::kernels::Budget::of_arch(&args[5]))
    // LONG=1: the variant for long problems (where it differs).
    .for_queries(if std::env::var("LONG").is_ok() { flashattn::cuda::kernels::LONG_QUERIES } else { 0 });
    let t = std::time::Instant::now();
    let mut defs = v.defines();
    if let Ok(bn) = std::env::var("FWD_BN") {
        defs.retain(|d| !d.starts_with("-DBLOCK_N="));
        defs.push(format!("-DBLOCK_N={bn}"));
    }
    defs.extend(args[6..].iter().cloned());
    if let Ok(path) = std::env::var("SOURCE_OUT") {
        // The headers beside the source, as its includes name them.
        let (source, path) = (v.source(), std::path::PathBuf::from(path));
        std::fs::write(&path, source.main).unwrap();
        for (name, text) in &source.headers {
            std::fs::write(path.with_file_name(name), text.as_bytes()).unwrap();
        }
        println!("defines: {}", defs.join(" "));
    }
    match flashattn::cuda::compile::compile(&v.name(), &v.source(), &args[5], &defs, true) {
        Ok(c) => {
            if let Ok(path) = std::env::var("CUBIN_OUT") {
                std::fs::write(path, &c.cubin).unwrap();
            }
            println!("{}", c.log);
            println!("{:?}", flashattn::cuda::compile::parse_resources(&c.log));
        }
        Err(e) => println!("{e}"),
    }
    println!("{:.1}s", t.elapsed().as_secs_f64());
}
