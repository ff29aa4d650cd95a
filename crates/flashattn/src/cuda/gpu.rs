//! One GPU: its primary context (the one PyTorch and candle use), the library's own stream for the owned and
//! host-slice APIs, the device's limits, and the kernel modules loaded on it.

use super::compile;
use super::kernels::{Budget, Pass, Variant};
use super::units::Unit;
use super::{cluster, select};
use crate::dtype::DType;
use crate::error::{AttnError, Result};
use crate::problem::AttnOptions;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

pub(crate) fn driver_err(what: &str) -> impl Fn(cudarc::driver::DriverError) -> AttnError + '_ {
    move |e| AttnError::Cuda(format!("{what}: {e}"))
}

/// Whether the CUDA driver library can be loaded.
pub fn driver_present() -> bool {
    #[cfg(feature = "dynamic-loading")]
    // SAFETY: only probes whether the shared library opens.
    return unsafe { cudarc::driver::sys::is_culib_present() };
    #[cfg(not(feature = "dynamic-loading"))]
    library_present(&["libcuda.so.1", "libcuda.so", "nvcuda.dll"])
}

/// Whether one of these shared libraries opens. Without this crate's `dynamic-loading` feature the embedder chose
/// how cudarc finds CUDA: linked at build time, a library is already loaded and opens by its name; loaded at run
/// time, these are the names it goes by.
#[cfg(not(feature = "dynamic-loading"))]
pub(crate) fn library_present(names: &[&str]) -> bool {
    // SAFETY: opening CUDA's libraries runs only their initializers, which have no preconditions.
    names.iter().any(|&n| unsafe { libloading::Library::new(n) }.is_ok())
}

/// The number of CUDA GPUs, or why none can be used.
pub fn device_count() -> Result<usize> {
    if !driver_present() {
        return Err(AttnError::Cuda("no CUDA driver (libcuda) was found on this machine".into()));
    }
    let n = CudaContext::device_count().map_err(driver_err("counting devices"))?;
    Ok(n.max(0) as usize)
}

/// Whether a GPU can run the kernels here (a driver, a device and NVRTC).
pub fn is_available() -> bool {
    device_count().map(|n| n > 0).unwrap_or(false) && compile::nvrtc_present()
}

/// A compiled variant's kernels (each holds its module).
pub(crate) struct Loaded {
    pub main: CudaFunction,
    /// The pass's kernels around the main one: the backward's preprocess and dQ conversion, decode's append
    /// and combine.
    pub before: Option<CudaFunction>,
    pub after: Option<CudaFunction>,
    /// Clusters of the main kernel (CTAs, for a variant launched without clusters) that run on the GPU at once:
    /// as many as a persistent kernel launches.
    pub resident: usize,
}

/// One GPU, opened once per process: its context, its loaded kernels, and a stream of the library's own.
pub struct Gpu {
    pub(crate) ordinal: usize,
    pub(crate) ctx: Arc<CudaContext>,
    /// The stream of the owned and host-slice APIs (not the legacy default stream, which synchronizes with
    /// every other); borrowed calls run on the stream they are given.
    pub(crate) stream: Arc<CudaStream>,
    name: String,
    pub(crate) arch: (i32, i32),
    /// Shared memory a block may have: the device's opt-in limit, or `FLASHATTN_SMEM_LIMIT_KB` if lower.
    max_smem: usize,
    /// The tile tables' budget within `max_smem`.
    pub(crate) budget: Budget,
    pub(crate) sm_count: usize,
    loaded: Mutex<HashMap<Variant, Arc<Loaded>>>,
    /// Auxiliary modules (kernels of the modules built on this one), by name and element type.
    aux: Mutex<HashMap<(&'static str, DType), Arc<CudaModule>>>,
    /// cuBLAS on this GPU's stream, created on first use.
    pub(crate) blas: OnceLock<cudarc::cublas::CudaBlas>,
    /// Device bytes of workspace the last call on the library's stream allocated.
    pub(crate) workspace: std::sync::atomic::AtomicUsize,
}

impl Gpu {
    /// The GPU with this ordinal, opened once per process.
    pub fn open(ordinal: usize) -> Result<Arc<Gpu>> {
        static GPUS: OnceLock<Mutex<HashMap<usize, Arc<Gpu>>>> = OnceLock::new();
        let mut gpus = GPUS.get_or_init(Default::default).lock().unwrap();
        if let Some(g) = gpus.get(&ordinal) {
            return Ok(g.clone());
        }
        let count = device_count()?;
        if ordinal >= count {
            return Err(AttnError::Cuda(format!("GPU {ordinal} requested, but this machine has {count}")));
        }
        compile::nvrtc_version()?;
        let ctx = CudaContext::new(ordinal).map_err(driver_err("creating a context"))?;
        // Work is ordered by the streams it runs on (the library's, or the caller's): cudarc's per-buffer event
        // tracking would add events to foreign streams and break graph capture.
        // SAFETY: the library's own buffers are used on its own stream only.
        unsafe { ctx.disable_event_tracking() };
        use cudarc::driver::sys::CUdevice_attribute as A;
        let attr = |a| ctx.attribute(a).map_err(driver_err("reading a device attribute"));
        let arch = (
            attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
            attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
        );
        if arch.0 < 8 {
            return Err(AttnError::Unsupported {
                what: format!("GPU of compute capability {}.{}", arch.0, arch.1),
                why: "the kernels need sm_80 (Ampere) or newer".into(),
            });
        }
        let device_smem = attr(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)? as usize;
        let max_smem = super::tuning::smem_limit().map_or(device_smem, |cap| cap.min(device_smem));
        let sm_count = attr(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as usize;
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let stream = ctx.new_stream().map_err(driver_err("creating a stream"))?;
        let gpu = Arc::new(Gpu {
            ordinal,
            ctx,
            stream,
            name,
            arch,
            max_smem,
            budget: Budget::within(max_smem),
            sm_count,
            loaded: Mutex::new(HashMap::new()),
            aux: Mutex::new(HashMap::new()),
            blas: OnceLock::new(),
            workspace: Default::default(),
        });
        gpus.insert(ordinal, gpu.clone());
        Ok(gpu)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Compute capability (major, minor).
    pub fn compute_capability(&self) -> (i32, i32) {
        self.arch
    }

    /// The device's primary context (retained): streams for the borrowed API come from it.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The library's own stream, on which the owned and host-slice APIs run.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// A stream created by another runtime (PyTorch's `torch.cuda.current_stream().cuda_stream`, say), for the
    /// borrowed API; it is not destroyed when dropped.
    ///
    /// # Safety
    /// `raw` must be a live stream of this GPU's primary context, and outlive the returned handle.
    pub unsafe fn borrow_stream(&self, raw: cudarc::driver::sys::CUstream) -> Arc<CudaStream> {
        // SAFETY: the caller's guarantee.
        unsafe { self.ctx.wrap_borrowed_stream(raw) }
    }

    /// Device bytes of workspace the last forward or backward call on the library's stream allocated (beyond
    /// inputs and outputs).
    pub fn last_workspace_bytes(&self) -> usize {
        self.workspace.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The NVRTC architecture of this GPU, e.g. "sm_90".
    pub fn arch_name(&self) -> String {
        format!("sm_{}{}", self.arch.0, self.arch.1)
    }

    /// Waits for all work queued on the library's stream.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(driver_err("synchronizing"))
    }

    /// Compiles (or loads from the cache) the kernels a problem will use, so that timing excludes it.
    /// `len_q`: the longest sequence's query rows. The borrowed API's `prepare_forward` and `prepare_backward`
    /// do the same for one call's arguments.
    pub fn prepare(
        &self,
        dtype: DType,
        head_dim: usize,
        len_q: usize,
        opts: &AttnOptions,
        backward: bool,
    ) -> Result<()> {
        let masked = opts.causal || opts.window.left.is_some() || opts.window.right.is_some();
        let has_mod = opts.softcap.is_some() || opts.alibi_slopes.is_some() || opts.scale.is_some_and(|s| s <= 0.0);
        let pick = |pass| select::variant(self.arch, self.budget, pass, dtype, head_dim, len_q, masked, has_mod);
        self.load(pick(Pass::Forward)?)?;
        if backward {
            self.load(pick(Pass::Backward)?)?;
        }
        Ok(())
    }

    /// The variant's module, compiled (or read from the disk cache) and loaded on first use.
    pub(crate) fn load(&self, variant: Variant) -> Result<Arc<Loaded>> {
        if let Some(l) = self.loaded.lock().unwrap().get(&variant) {
            return Ok(l.clone());
        }
        let smem = variant.smem_bytes();
        if smem > self.max_smem {
            return Err(AttnError::Unsupported {
                what: format!("head dim {} {:?} on {}", variant.hdim, variant.pass, self.name),
                why: format!(
                    "the kernel needs {smem} bytes of shared memory per block, the GPU offers {}",
                    self.max_smem
                ),
            });
        }
        let module = self.compile_and_load(&Unit::variant(&variant))?;
        let function = |name: &str| module.load_function(name).map_err(driver_err("finding a kernel"));
        let main = function(variant.kernel_name())?;
        use cudarc::driver::sys::CUfunction_attribute as F;
        main.set_attribute(F::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)
            .map_err(driver_err("raising the shared-memory limit"))?;
        let (before, after) = match variant.pass {
            Pass::Forward => (None, None),
            Pass::Backward => (Some(function("flash_bwd_preprocess")?), Some(function("flash_bwd_dq_convert")?)),
            Pass::Decode => (Some(function("kv_append")?), Some(function("decode_combine")?)),
        };
        let cluster = variant.cluster();
        let resident = if cluster > 1 {
            let one = cluster::Geometry {
                grid: cluster as u32,
                block: variant.threads(),
                smem: smem as u32,
                cluster: cluster as u32,
            };
            match cluster::max_active(&main, &self.stream, one)? {
                0 => {
                    return Err(AttnError::Unsupported {
                        what: format!("{} on {}", variant.name(), self.name),
                        why: format!("no cluster of {cluster} CTAs of it fits on the GPU"),
                    })
                }
                n => n,
            }
        } else if variant.pass == Pass::Decode {
            // Decode splits its keys to fill the CTAs that run at once (two per SM at d <= 128 on sm_90).
            let per_sm = main
                .occupancy_max_active_blocks_per_multiprocessor(variant.threads(), smem, None)
                .map_err(driver_err("reading the decode kernel's occupancy"))?;
            self.sm_count * (per_sm as usize).max(1)
        } else {
            self.sm_count
        };
        let loaded = Arc::new(Loaded { main, before, after, resident });
        self.loaded.lock().unwrap().insert(variant, loaded.clone());
        Ok(loaded)
    }

    /// An auxiliary kernel module (`source`, which may include the kernels' headers) for one element type,
    /// compiled once.
    pub(crate) fn aux_module(&self, name: &'static str, source: &'static str, dtype: DType) -> Result<Arc<CudaModule>> {
        if let Some(m) = self.aux.lock().unwrap().get(&(name, dtype)) {
            return Ok(m.clone());
        }
        let module = self.compile_and_load(&Unit::aux(name, source, dtype))?;
        self.aux.lock().unwrap().insert((name, dtype), module.clone());
        Ok(module)
    }

    /// Compiles a unit for this GPU (or reads it from the disk cache) and loads it.
    fn compile_and_load(&self, unit: &Unit) -> Result<Arc<CudaModule>> {
        let arch = self.arch_name();
        let compiled = compile::compile(&unit.name, &unit.source, unit.arch(&arch), &unit.defines, false)?;
        self.ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(compiled.cubin))
            .map_err(driver_err("loading a kernel module"))
    }
}
