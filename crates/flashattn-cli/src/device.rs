//! Where work runs: the CPU or a CUDA GPU, from a `--device` flag.

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// `auto` (a GPU when one can be used, else the CPU), `cpu`, `cuda` or `cuda:N`.
pub fn parse(s: &str) -> Result<Device, String> {
    match s {
        "auto" => Ok(if cuda_available() { Device::Cuda(0) } else { Device::Cpu }),
        "cpu" => Ok(Device::Cpu),
        _ => {
            let ordinal = match s.strip_prefix("cuda") {
                Some("") => 0,
                Some(rest) => rest.strip_prefix(':').and_then(|n| n.parse().ok()).ok_or_else(|| bad(s))?,
                None => return Err(bad(s)),
            };
            require_cuda(ordinal)?;
            Ok(Device::Cuda(ordinal))
        }
    }
}

fn bad(s: &str) -> String {
    format!("--device {s}: expected auto, cpu, cuda or cuda:N")
}

#[cfg(feature = "cuda")]
fn cuda_available() -> bool {
    flashattn::cuda::is_available()
}

#[cfg(not(feature = "cuda"))]
fn cuda_available() -> bool {
    false
}

#[cfg(feature = "cuda")]
fn require_cuda(ordinal: usize) -> Result<(), String> {
    flashattn::cuda::Gpu::open(ordinal).map(|_| ()).map_err(|e| format!("--device cuda:{ordinal}: {e}"))
}

#[cfg(not(feature = "cuda"))]
fn require_cuda(_: usize) -> Result<(), String> {
    Err("--device cuda: this build has no CUDA support (the `cuda` feature is off)".into())
}
