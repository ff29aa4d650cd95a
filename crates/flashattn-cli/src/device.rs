//! Where work runs: the CPU or a CUDA GPU, from a `--device` flag (and `--cpu-isa`).

use flashattn::{Backend, DType, Isa};
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

/// A resolved `--device` and `--cpu-isa`: where the flash kernels run.
#[derive(Clone, Copy, Debug)]
pub struct Target {
    pub device: Device,
    pub isa: Isa,
}

impl Target {
    /// `--device` and the optional `--cpu-isa` (default: the best instruction set this CPU has).
    pub fn resolve(device: &str, cpu_isa: Option<Isa>) -> Result<Target, String> {
        let device = parse(device)?;
        let isa = match cpu_isa {
            Some(isa) => isa.require(),
            None => Isa::detect(),
        }
        .map_err(|e| e.to_string())?;
        Ok(Target { device, isa })
    }

    /// `--dtype`, by default f32 on the CPU and bf16 on a GPU (whose kernels take only 16-bit types).
    pub fn dtype(&self, requested: Option<DType>) -> Result<DType, String> {
        let gpu = self.device != Device::Cpu;
        match requested.unwrap_or(if gpu { DType::BF16 } else { DType::F32 }) {
            DType::F32 if gpu => Err("--dtype f32: the GPU kernels take f16 or bf16".into()),
            dtype => Ok(dtype),
        }
    }

    /// The flash attention backend of this target.
    pub fn backend(&self) -> Backend {
        match self.device {
            Device::Cpu => Backend::Cpu(self.isa),
            Device::Cuda(i) => Backend::Cuda(i),
        }
    }

    /// For reports: "cpu (avx2, 2 threads)", "cuda:0 (NVIDIA H200)".
    pub fn label(&self) -> String {
        match self.device {
            Device::Cpu => format!("cpu ({}, {} threads)", self.isa, rayon::current_num_threads()),
            Device::Cuda(i) => format!("cuda:{i} ({})", gpu_name(i)),
        }
    }
}

#[cfg(feature = "cuda")]
fn gpu_name(ordinal: usize) -> String {
    flashattn::cuda::Gpu::open(ordinal).map(|g| g.name().to_string()).unwrap_or_default()
}

#[cfg(not(feature = "cuda"))]
fn gpu_name(_: usize) -> String {
    String::new()
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
