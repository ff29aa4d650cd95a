//! Flash attention on NVIDIA GPUs (sm_80 and newer): kernels compiled at run time by NVRTC for the GPU that is
//! present, cached on disk, launched through the driver API. Nothing of CUDA is needed to build; at run time the
//! driver (libcuda) and NVRTC (libnvrtc) are loaded dynamically, and their absence is an error, never a crash.

mod approx;
use approx::CachedProjections;
mod blas;
mod cluster;
pub mod compile;
pub mod kernels;
mod params;
mod tma;

use crate::dtype::{DType, Element};
use crate::error::{AttnError, Result};
use crate::problem::{AttnOptions, Plan};
use crate::tensor::{contiguous_strides, Qkv, TensorLayout, TensorRef};
pub use cudarc::driver::CudaSlice;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
};
use kernels::{Family, Pass, Variant};
use params::{strides3, AttnParams};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

fn driver_err(what: &str) -> impl Fn(cudarc::driver::DriverError) -> AttnError + '_ {
    move |e| AttnError::Cuda(format!("{what}: {e}"))
}

/// Whether the CUDA driver library can be loaded.
pub fn driver_present() -> bool {
    // SAFETY: only probes whether the shared library opens.
    unsafe { cudarc::driver::sys::is_culib_present() }
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

/// A tensor of 16-bit elements in GPU memory, with a shape and element strides (last dimension contiguous).
pub struct DeviceTensor {
    buf: CudaSlice<u16>,
    dtype: DType,
    shape: Vec<usize>,
    strides: Vec<usize>,
}

impl DeviceTensor {
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    fn ptr(&self, stream: &CudaStream) -> u64 {
        self.buf.device_ptr(stream).0
    }
    fn ptr_mut(&mut self, stream: &CudaStream) -> u64 {
        self.buf.device_ptr_mut(stream).0
    }
    fn is_contiguous(&self) -> bool {
        self.strides == contiguous_strides(&self.shape)
    }
}

impl TensorLayout for DeviceTensor {
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn strides(&self) -> &[usize] {
        &self.strides
    }
    fn buffer_len(&self) -> usize {
        self.buf.len()
    }
}

/// A compiled variant's kernels (each holds its module).
struct Loaded {
    main: CudaFunction,
    preprocess: Option<CudaFunction>,
    convert: Option<CudaFunction>,
    /// Clusters of the main kernel (CTAs, for a variant launched without clusters) that run on the GPU at once:
    /// as many as a persistent kernel launches.
    resident: usize,
}

/// One GPU, its stream and its loaded kernels.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    name: String,
    arch: (i32, i32),
    max_smem: usize,
    sm_count: usize,
    /// The Hopper forward's tile counter (zeroed before each launch; the kernel hands tiles out from it).
    tile_counter: Mutex<CudaSlice<i32>>,
    loaded: Mutex<HashMap<Variant, Arc<Loaded>>>,
    /// Auxiliary modules (the approximations' kernels), by name and element type.
    aux: Mutex<HashMap<(&'static str, DType), Arc<CudaModule>>>,
    /// The last Linformer projections uploaded (E, F), by (k, seqlen_k, kind, seed): drawn once, not per call.
    projections: Mutex<Option<CachedProjections>>,
    /// cuBLAS on this GPU's stream, created on first use.
    blas: OnceLock<cudarc::cublas::CudaBlas>,
    /// Device bytes of workspace the last forward or backward allocated.
    workspace: std::sync::atomic::AtomicUsize,
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
        // One stream: the library orders its own work, so the per-buffer event tracking is not needed.
        // SAFETY: no buffer of this context is shared across streams.
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
        let max_smem = attr(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)? as usize;
        let sm_count = attr(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as usize;
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let stream = ctx.default_stream();
        let tile_counter = Mutex::new(stream.alloc_zeros::<i32>(1).map_err(driver_err("allocating GPU memory"))?);
        let gpu = Arc::new(Gpu {
            ctx,
            stream,
            name,
            arch,
            max_smem,
            sm_count,
            tile_counter,
            loaded: Mutex::new(HashMap::new()),
            aux: Mutex::new(HashMap::new()),
            projections: Mutex::new(None),
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

    /// Device bytes of workspace the last forward or backward call allocated (beyond inputs and outputs).
    pub fn last_workspace_bytes(&self) -> usize {
        self.workspace.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The NVRTC architecture of this GPU, e.g. "sm_90".
    pub fn arch_name(&self) -> String {
        format!("sm_{}{}", self.arch.0, self.arch.1)
    }

    /// Waits for all work queued on the GPU.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(driver_err("synchronizing"))
    }

    /// Copies a host tensor (f16 or bf16) to the GPU, contiguous.
    pub fn upload<T: Element>(&self, t: &TensorRef<T>) -> Result<DeviceTensor> {
        if T::DTYPE == DType::F32 {
            return Err(AttnError::Unsupported {
                what: "f32 tensors on CUDA".into(),
                why: "the GPU kernels take f16 or bf16".into(),
            });
        }
        let data = gather(t);
        // SAFETY: f16 and bf16 are 16-bit plain values; the slice is reinterpreted without changing its bytes.
        let bits: &[u16] = unsafe { std::slice::from_raw_parts(data.as_ptr() as *const u16, data.len()) };
        let buf = self.stream.clone_htod(bits).map_err(driver_err("copying to the GPU"))?;
        Ok(DeviceTensor { buf, dtype: T::DTYPE, shape: t.shape.clone(), strides: contiguous_strides(&t.shape) })
    }

    /// A zeroed contiguous tensor.
    pub fn zeros(&self, dtype: DType, shape: &[usize]) -> Result<DeviceTensor> {
        if dtype == DType::F32 {
            return Err(AttnError::Unsupported {
                what: "f32 tensors on CUDA".into(),
                why: "the GPU kernels take f16 or bf16".into(),
            });
        }
        let n = shape.iter().product::<usize>();
        let buf = self.stream.alloc_zeros::<u16>(n.max(1)).map_err(driver_err("allocating GPU memory"))?;
        Ok(DeviceTensor { buf, dtype, shape: shape.to_vec(), strides: contiguous_strides(shape) })
    }

    /// A zeroed f32 buffer (for the log-sum-exp).
    pub fn zeros_f32(&self, n: usize) -> Result<CudaSlice<f32>> {
        self.stream.alloc_zeros::<f32>(n.max(1)).map_err(driver_err("allocating GPU memory"))
    }

    /// Copies a contiguous device tensor back to the host.
    pub fn download<T: Element>(&self, t: &DeviceTensor) -> Result<Vec<T>> {
        let mut out = vec![T::default(); t.shape.iter().product::<usize>()];
        self.download_into(t, &mut out)?;
        Ok(out)
    }

    /// Copies a contiguous device tensor into a host buffer of its element count.
    pub fn download_into<T: Element>(&self, t: &DeviceTensor, dst: &mut [T]) -> Result<()> {
        if T::DTYPE != t.dtype {
            return Err(AttnError::Unsupported {
                what: format!("reading a {} tensor as {}", t.dtype, T::DTYPE),
                why: "the types differ".into(),
            });
        }
        let n = t.shape.iter().product::<usize>();
        if dst.len() != n {
            return Err(AttnError::shape("the download buffer", format!("{n} elements"), &[dst.len()]));
        }
        // SAFETY: T is f16 or bf16 (checked above: a device tensor is never f32), a 16-bit plain value; the slice
        // is reinterpreted without changing its bytes.
        let bits: &mut [u16] = unsafe { std::slice::from_raw_parts_mut(dst.as_mut_ptr() as *mut u16, n) };
        self.stream.memcpy_dtoh(&t.buf.slice(..n), bits).map_err(driver_err("copying from the GPU"))
    }

    /// Copies the first `n` elements of an f32 device buffer back to the host.
    pub fn download_f32(&self, buf: &CudaSlice<f32>, n: usize) -> Result<Vec<f32>> {
        let mut out = vec![0.0; n];
        self.stream.memcpy_dtoh(&buf.slice(..n), &mut out[..]).map_err(driver_err("copying from the GPU"))?;
        Ok(out)
    }

    /// The variant's module, compiled (or read from the disk cache) and loaded on first use.
    fn load(&self, variant: Variant) -> Result<Arc<Loaded>> {
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
        let (preprocess, convert) = match variant.pass {
            Pass::Forward => (None, None),
            Pass::Backward => (Some(function("flash_bwd_preprocess")?), Some(function("flash_bwd_dq_convert")?)),
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
        } else {
            self.sm_count
        };
        let loaded = Arc::new(Loaded { main, preprocess, convert, resident });
        self.loaded.lock().unwrap().insert(variant, loaded.clone());
        Ok(loaded)
    }

    /// An auxiliary kernel module (common header + `source`) for one element type, compiled once.
    fn aux_module(&self, name: &'static str, source: &str, dtype: DType) -> Result<Arc<CudaModule>> {
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

    /// Compiles (or loads from the cache) the kernels a problem will use, so that timing excludes it.
    /// `len_q`: the longest sequence's query rows.
    pub fn prepare(
        &self,
        dtype: DType,
        head_dim: usize,
        len_q: usize,
        opts: &AttnOptions,
        backward: bool,
    ) -> Result<()> {
        self.load(self.variant(Pass::Forward, dtype, head_dim, len_q, opts)?)?;
        if backward {
            self.load(self.variant(Pass::Backward, dtype, head_dim, len_q, opts)?)?;
        }
        Ok(())
    }

    /// The kernel variant for a problem: the Hopper family on sm_90 where it takes the head dim, unless
    /// `FLASHATTN_GPU_KERNELS=portable`; else the portable one.
    fn variant(&self, pass: Pass, dtype: DType, head_dim: usize, len_q: usize, opts: &AttnOptions) -> Result<Variant> {
        let hdim = kernels::padded_head_dim(head_dim)?;
        let masked = opts.causal || opts.window.left.is_some() || opts.window.right.is_some();
        let has_mod = opts.softcap.is_some() || opts.alibi_slopes.is_some() || opts.scale.is_some_and(|s| s <= 0.0);
        let sm90 = self.arch.0 >= 9;
        let portable = Variant { family: Family::Portable, pass, dtype, hdim, masked, has_mod, sm90, long: false };
        match kernels::hopper_head_dim(head_dim, pass) {
            Some(hdim) if self.arch == (9, 0) && !portable_forced() => {
                Ok(Variant { family: Family::Hopper, hdim, ..portable }.for_queries(len_q))
            }
            _ => Ok(portable),
        }
    }

    /// Flash forward on device tensors: `out` (q's shape, contiguous) and `lse` (f32, the plan's lse length).
    pub fn forward(
        &self,
        q: &DeviceTensor,
        k: &DeviceTensor,
        v: &DeviceTensor,
        opts: &AttnOptions,
        out: &mut DeviceTensor,
        lse: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let (plan, variant) = self.plan(q, k, v, opts, Pass::Forward)?;
        check_output("out", out, plan.q_shape(), plan.dtype())?;
        if lse.len() < plan.lse_len() {
            return Err(AttnError::Shape {
                tensor: "lse",
                expected: format!("a buffer of {} elements", plan.lse_len()),
                got: vec![lse.len()],
            });
        }
        let loaded = self.load(variant)?;
        let extras = self.extras(&plan, opts)?;
        self.workspace.store(extras.bytes(), std::sync::atomic::Ordering::Relaxed);
        let mut p = self.base_params(&plan, (q, k, v), &extras);
        p.out = out.ptr_mut(&self.stream);
        (p.o_batch, p.o_row, p.o_head) = strides3(&out.strides);
        p.lse = lse.device_ptr_mut(&self.stream).0;
        let m_blocks = plan_max(&plan.len_q).div_ceil(variant.block_m()).max(1);
        if variant.family == Family::Hopper {
            // Persistent: as many CTAs as run at once take entries of the tile list (an entry is a query block per
            // CTA of a cluster), from a counter or, in clusters, a static share.
            let cluster = variant.cluster();
            let tiles = m_blocks.div_ceil(cluster) * plan.heads_q * plan.batch;
            let (m, n) = (variant.block_m(), variant.hopper_tiles().block_n);
            let maps = [
                self.tensor_map(&plan, q, Side::Query, m)?,
                self.tensor_map(&plan, k, Side::Key, n)?,
                self.tensor_map(&plan, v, Side::Key, n)?,
                // O is stored in 16-row boxes, one per consumer warp.
                self.tensor_map(&plan, out, Side::Query, 16)?,
            ];
            let mut counter = self.tile_counter.lock().unwrap();
            self.stream.memset_zeros(&mut *counter).map_err(driver_err("clearing the tile counter"))?;
            // Heads whose K and V (12 MB: a quarter of an H200's L2 cache) are read by the CTAs at once.
            let kv_head_bytes = 4 * plan_max(&plan.len_k).max(1) * plan.head_dim;
            let group = plan.heads_q / plan.heads_kv;
            let group_heads = (((12 << 20) / kv_head_bytes).clamp(1, plan.heads_kv * plan.batch) * group) as i32;
            // The launch builder takes no clusters: the arguments by hand.
            let (counter_ptr, _record) = counter.device_ptr_mut(&self.stream);
            let mut args: [*mut std::ffi::c_void; 7] = [
                &p as *const AttnParams as _,
                &maps[0] as *const _ as _,
                &maps[1] as *const _ as _,
                &maps[2] as *const _ as _,
                &maps[3] as *const _ as _,
                &counter_ptr as *const _ as _,
                &group_heads as *const _ as _,
            ];
            let geometry = cluster::Geometry {
                grid: (tiles.min(loaded.resident) * cluster) as u32,
                block: variant.threads(),
                smem: variant.smem_bytes() as u32,
                cluster: cluster as u32,
            };
            self.ctx.bind_to_thread().map_err(driver_err("binding the context"))?;
            // SAFETY: the arguments are the kernel's, in order; every pointer is a live buffer sized by the plan.
            return unsafe { cluster::launch(&loaded.main, &self.stream, geometry, &mut args) };
        }
        let cfg = LaunchConfig {
            grid_dim: (m_blocks as u32, plan.heads_q as u32, plan.batch as u32),
            block_dim: (variant.threads(), 1, 1),
            shared_mem_bytes: variant.smem_bytes() as u32,
        };
        // SAFETY: the parameters match the kernel's; every pointer is a live buffer sized by the plan.
        unsafe { self.stream.launch_builder(&loaded.main).arg(&p).launch(cfg) }
            .map_err(driver_err("launching the forward kernel"))?;
        Ok(())
    }

    /// The TMA map of a query-side (q, o, dout) or key-side (k, v) tensor, read in boxes of `box_rows` rows.
    fn tensor_map(&self, plan: &Plan, t: &DeviceTensor, side: Side, box_rows: usize) -> Result<tma::TmaMap> {
        let layout = map_layout(plan, side, t.ptr(&self.stream), t.shape[0], plan.head_dim, strides3(&t.strides));
        tma::tile_map(&layout, tma::Elem::Half(plan.dtype()), box_rows)
    }

    /// The TMA map of the backward's f32 dQ accumulator, (token, head_q, hdim), for reductions of 16-row boxes.
    fn dq_accum_map(&self, plan: &Plan, acc: &CudaSlice<f32>, tokens: usize, hdim: usize) -> Result<tma::TmaMap> {
        let row = (plan.heads_q * hdim) as i64;
        let strides = (row * plan_max(&plan.len_q) as i64, row, hdim as i64);
        let layout = map_layout(plan, Side::Query, acc.device_ptr(&self.stream).0, tokens, hdim, strides);
        tma::tile_map(&layout, tma::Elem::F32, 16)
    }

    /// Flash backward on device tensors: dq (q's shape), dk and dv (k's shape), contiguous.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        (q, k, v): (&DeviceTensor, &DeviceTensor, &DeviceTensor),
        o: &DeviceTensor,
        lse: &CudaSlice<f32>,
        dout: &DeviceTensor,
        opts: &AttnOptions,
        (dq, dk, dv): (&mut DeviceTensor, &mut DeviceTensor, &mut DeviceTensor),
    ) -> Result<()> {
        let (plan, variant) = self.plan(q, k, v, opts, Pass::Backward)?;
        if lse.len() < plan.lse_len() {
            return Err(AttnError::Shape {
                tensor: "lse",
                expected: format!("a buffer of {} elements", plan.lse_len()),
                got: vec![lse.len()],
            });
        }
        check_like_q(&plan, "o", o)?;
        check_like_q(&plan, "dout", dout)?;
        check_output("dq", dq, plan.q_shape(), plan.dtype())?;
        check_output("dk", dk, plan.kv_shape(), plan.dtype())?;
        check_output("dv", dv, plan.kv_shape(), plan.dtype())?;
        let loaded = self.load(variant)?;
        let extras = self.extras(&plan, opts)?;
        let tokens_q = plan.q_shape().iter().rev().skip(2).product::<usize>();
        let rows = tokens_q * plan.heads_q;
        let num_m = plan_max(&plan.len_q).div_ceil(variant.block_m());
        let mut delta = self.zeros_f32(plan.lse_len())?;
        let mut dq_accum = self.zeros_f32(rows * variant.hdim)?;
        // One counter per (batch, head, query block) orders the deterministic mode's dQ additions; unused otherwise.
        let counters = if plan.deterministic { plan.batch * plan.heads_q * num_m } else { 0 };
        let mut semaphore =
            self.stream.alloc_zeros::<i32>(counters.max(1)).map_err(driver_err("allocating GPU memory"))?;
        let bytes = extras.bytes() + 4 * (delta.len() + dq_accum.len() + semaphore.len());
        self.workspace.store(bytes, std::sync::atomic::Ordering::Relaxed);

        let mut p = self.base_params(&plan, (q, k, v), &extras);
        p.o = o.ptr(&self.stream);
        (p.o_batch, p.o_row, p.o_head) = strides3(&o.strides);
        p.dout = dout.ptr(&self.stream);
        (p.do_batch, p.do_row, p.do_head) = strides3(&dout.strides);
        p.lse = lse.device_ptr(&self.stream).0;
        p.delta = delta.device_ptr_mut(&self.stream).0;
        p.dq_accum = dq_accum.device_ptr_mut(&self.stream).0;
        p.dq_semaphore = semaphore.device_ptr_mut(&self.stream).0;
        p.deterministic = plan.deterministic as i32;
        p.dk = dk.ptr_mut(&self.stream);
        p.dv = dv.ptr_mut(&self.stream);
        (p.dk_batch, p.dk_row, p.dk_head) = strides3(&dk.strides);
        let max_q = plan_max(&plan.len_q);

        let pre = LaunchConfig {
            grid_dim: (max_q.div_ceil(64).max(1) as u32, plan.heads_q as u32, plan.batch as u32),
            block_dim: (64, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY (all launches): the parameter block matches the kernels'; pointers are live buffers sized by the plan.
        unsafe { self.stream.launch_builder(loaded.preprocess.as_ref().unwrap()).arg(&p).launch(pre) }
            .map_err(driver_err("launching the backward preprocess"))?;
        let main = LaunchConfig {
            grid_dim: (
                plan_max(&plan.len_k).div_ceil(variant.bwd_block_n()).max(1) as u32,
                plan.heads_kv as u32,
                plan.batch as u32,
            ),
            block_dim: (variant.threads(), 1, 1),
            shared_mem_bytes: variant.smem_bytes() as u32,
        };
        let mut launch = self.stream.launch_builder(&loaded.main);
        launch.arg(&p);
        let maps;
        if variant.family == Family::Hopper {
            let (m, n) = (variant.block_m(), variant.bwd_block_n());
            maps = [
                self.tensor_map(&plan, q, Side::Query, m)?,
                self.tensor_map(&plan, k, Side::Key, n)?,
                self.tensor_map(&plan, v, Side::Key, n)?,
                self.tensor_map(&plan, dout, Side::Query, m)?,
                self.dq_accum_map(&plan, &dq_accum, tokens_q, variant.hdim)?,
            ];
            launch.arg(&maps[0]).arg(&maps[1]).arg(&maps[2]).arg(&maps[3]).arg(&maps[4]);
        }
        unsafe { launch.launch(main) }.map_err(driver_err("launching the backward kernel"))?;
        // The output o is read through p.o; dq is written through p.dq by the conversion, with o's row layout.
        let mut pc = p;
        pc.dq = dq.ptr_mut(&self.stream);
        (pc.o_batch, pc.o_row, pc.o_head) = strides3(&dq.strides);
        let chunks = rows * variant.hdim / 8;
        let conv = LaunchConfig {
            grid_dim: (chunks.div_ceil(256).max(1) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let rows = rows as i64;
        unsafe { self.stream.launch_builder(loaded.convert.as_ref().unwrap()).arg(&pc).arg(&rows).launch(conv) }
            .map_err(driver_err("launching the dq conversion"))?;
        // The workspace is freed in stream order.
        drop((delta, dq_accum, semaphore));
        Ok(())
    }

    /// Validates a problem for the kernels and picks its variant.
    fn plan(
        &self,
        q: &DeviceTensor,
        k: &DeviceTensor,
        v: &DeviceTensor,
        opts: &AttnOptions,
        pass: Pass,
    ) -> Result<(Plan, Variant)> {
        for (name, t) in [("k", k), ("v", v)] {
            if t.dtype != q.dtype {
                return Err(AttnError::Unsupported {
                    what: format!("{name} in {}", t.dtype),
                    why: format!("q is {}", q.dtype),
                });
            }
        }
        let plan = Plan::new(q, k, v, opts, q.dtype)?;
        let variant = self.variant(pass, plan.dtype(), plan.head_dim, plan_max(&plan.len_q), opts)?;
        for (name, t) in [("q", q), ("k", k), ("v", v)] {
            check_aligned(name, t)?;
        }
        let too_long = |lens: &[usize]| lens.iter().sum::<usize>() > i32::MAX as usize;
        if too_long(&plan.len_q) || too_long(&plan.len_k) {
            return Err(AttnError::Unsupported {
                what: "more than 2^31 tokens".into(),
                why: "sequence offsets are 32-bit on the GPU".into(),
            });
        }
        Ok((plan, variant))
    }

    /// Small per-call device buffers: sequence offsets and ALiBi slopes.
    fn extras(&self, plan: &Plan, opts: &AttnOptions) -> Result<Extras> {
        let upload_i32 = |v: &[i32]| self.stream.clone_htod(v).map_err(driver_err("copying to the GPU"));
        let (cu_q, cu_k) = match &opts.varlen {
            Some(vl) => (Some(upload_i32(&vl.cu_seqlens_q)?), Some(upload_i32(&vl.cu_seqlens_k)?)),
            None => (None, None),
        };
        let alibi = if plan.mask.alibi.is_empty() {
            None
        } else {
            Some(self.stream.clone_htod(&plan.mask.alibi).map_err(driver_err("copying to the GPU"))?)
        };
        Ok(Extras { cu_q, cu_k, alibi })
    }

    fn base_params(
        &self,
        plan: &Plan,
        (q, k, v): (&DeviceTensor, &DeviceTensor, &DeviceTensor),
        x: &Extras,
    ) -> AttnParams {
        let s = &self.stream;
        let m = &plan.mask;
        let lse_shape = plan.lse_shape();
        let widest = (plan_max(&plan.len_q) + plan_max(&plan.len_k)).min(i32::MAX as usize);
        let (lse_batch, lse_head) = if plan.varlen {
            (0, lse_shape[1] as i64)
        } else {
            ((plan.heads_q * lse_shape[2]) as i64, lse_shape[2] as i64)
        };
        let mut p = AttnParams {
            q: q.ptr(s),
            k: k.ptr(s),
            v: v.ptr(s),
            cu_seqlens_q: x.cu_q.as_ref().map_or(0, |b| b.device_ptr(s).0),
            cu_seqlens_k: x.cu_k.as_ref().map_or(0, |b| b.device_ptr(s).0),
            alibi: x.alibi.as_ref().map_or(0, |b| b.device_ptr(s).0),
            lse_batch,
            lse_head,
            batch: plan.batch as i32,
            heads_q: plan.heads_q as i32,
            heads_kv: plan.heads_kv as i32,
            head_dim: plan.head_dim as i32,
            seqlen_q: plan_max(&plan.len_q) as i32,
            seqlen_k: plan_max(&plan.len_k) as i32,
            // A window wider than both sequences sees what an unbounded one sees; clamped there, the kernels'
            // 32-bit mask arithmetic (query + shift + window) cannot overflow.
            window_left: m.left.map_or(-1, |l| l.min(widest) as i32),
            window_right: m.right.map_or(-1, |r| r.min(widest) as i32),
            alibi_batch_stride: plan.heads_q as i32,
            scale: m.scale,
            scale_log2: m.scale * std::f32::consts::LOG2_E,
            softcap: m.softcap.unwrap_or(0.0),
            ..Default::default()
        };
        (p.q_batch, p.q_row, p.q_head) = strides3(&q.strides);
        (p.k_batch, p.k_row, p.k_head) = strides3(&k.strides);
        (p.v_batch, p.v_row, p.v_head) = strides3(&v.strides);
        p
    }
}

/// Where the rows of a (batch, rows, heads, head_dim) tensor on `side` lie, as a TMA map sees them: per batch for
/// dense batches, all `varlen_tokens` as one batch for variable-length ones.
fn map_layout(
    plan: &Plan,
    side: Side,
    ptr: u64,
    varlen_tokens: usize,
    head_dim: usize,
    strides: (i64, i64, i64),
) -> tma::Layout {
    let (heads, lens) = match side {
        Side::Query => (plan.heads_q, &plan.len_q),
        Side::Key => (plan.heads_kv, &plan.len_k),
    };
    let (rows, batch) = if plan.varlen { (varlen_tokens, 1) } else { (plan_max(lens), plan.batch) };
    // A map cannot have an empty dimension; with no rows no copy is issued.
    tma::Layout { ptr, head_dim, rows: rows.max(1), heads, batch, strides }
}

/// Which side of attention a tensor is on: its heads and sequence lengths are the queries' or the keys'.
#[derive(Clone, Copy)]
enum Side {
    Query,
    Key,
}

struct Extras {
    cu_q: Option<CudaSlice<i32>>,
    cu_k: Option<CudaSlice<i32>>,
    alibi: Option<CudaSlice<f32>>,
}

impl Extras {
    fn bytes(&self) -> usize {
        4 * (self.cu_q.as_ref().map_or(0, |b| b.len())
            + self.cu_k.as_ref().map_or(0, |b| b.len())
            + self.alibi.as_ref().map_or(0, |b| b.len()))
    }
}

/// Whether `FLASHATTN_GPU_KERNELS=portable` keeps both passes on the portable family (read once per process).
fn portable_forced() -> bool {
    static FORCED: OnceLock<bool> = OnceLock::new();
    *FORCED.get_or_init(|| std::env::var("FLASHATTN_GPU_KERNELS").is_ok_and(|v| v == "portable"))
}

fn plan_max(lens: &[usize]) -> usize {
    lens.iter().copied().max().unwrap_or(0)
}

/// 16-byte copies need strides (and so rows) in whole multiples of 8 elements.
fn check_aligned(name: &'static str, t: &DeviceTensor) -> Result<()> {
    let r = t.strides.len();
    if t.strides[..r - 1].iter().any(|s| s % 8 != 0) {
        return Err(AttnError::Stride {
            tensor: name,
            problem: "on CUDA every stride but the last must be a multiple of 8 elements (16 bytes)".into(),
            shape: t.shape.clone(),
            strides: t.strides.clone(),
            len: t.buf.len(),
        });
    }
    Ok(())
}

/// A backward input that must be laid out like q: q's shape, valid aligned strides, q's element type.
fn check_like_q(plan: &Plan, name: &'static str, t: &DeviceTensor) -> Result<()> {
    plan.check_like_q(name, t)?;
    if t.dtype != plan.dtype() {
        return Err(AttnError::Unsupported {
            what: format!("{name} in {}", t.dtype),
            why: format!("q is {}", plan.dtype()),
        });
    }
    check_aligned(name, t)
}

fn check_output(name: &'static str, t: &DeviceTensor, shape: &[usize], dtype: DType) -> Result<()> {
    if t.shape != shape || !t.is_contiguous() || t.dtype != dtype {
        return Err(AttnError::Shape {
            tensor: name,
            expected: format!("a contiguous {dtype} tensor of shape {shape:?}"),
            got: t.shape.clone(),
        });
    }
    Ok(())
}

/// The tensor's elements in row-major order (a copy only when it is strided).
fn gather<'a, T: Element>(t: &'a TensorRef<T>) -> std::borrow::Cow<'a, [T]> {
    let n: usize = t.shape.iter().product();
    if t.strides == contiguous_strides(&t.shape) {
        return std::borrow::Cow::Borrowed(&t.data[..n]);
    }
    let mut out = Vec::with_capacity(n);
    let mut idx = vec![0usize; t.shape.len()];
    for _ in 0..n {
        let off: usize = idx.iter().zip(&t.strides).map(|(i, s)| i * s).sum();
        out.push(t.data[off]);
        for ax in (0..idx.len()).rev() {
            idx[ax] += 1;
            if idx[ax] < t.shape[ax] {
                break;
            }
            idx[ax] = 0;
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Approximate attention forward on host tensors: uploads, runs, downloads.
pub(crate) fn approx_forward_host<T: Element>(
    ordinal: usize,
    (q, k, v): Qkv<T>,
    opts: &AttnOptions,
    method: &crate::approx::Method,
) -> Result<Vec<T>> {
    let gpu = Gpu::open(ordinal)?;
    let (gq, gk, gv) = (gpu.upload(q)?, gpu.upload(k)?, gpu.upload(v)?);
    let mut out = gpu.zeros(T::DTYPE, &q.shape)?;
    gpu.approx_forward((&gq, &gk, &gv), opts, method, &mut out)?;
    gpu.download(&out)
}

/// Approximate attention backward on host tensors: dq, dk, dv.
pub(crate) fn approx_backward_host<T: Element>(
    ordinal: usize,
    (q, k, v): Qkv<T>,
    dout: &TensorRef<T>,
    opts: &AttnOptions,
    method: &crate::approx::Method,
) -> Result<(Vec<T>, Vec<T>, Vec<T>)> {
    let gpu = Gpu::open(ordinal)?;
    let (gq, gk, gv, gd) = (gpu.upload(q)?, gpu.upload(k)?, gpu.upload(v)?, gpu.upload(dout)?);
    let (mut dq, mut dk, mut dv) =
        (gpu.zeros(T::DTYPE, &q.shape)?, gpu.zeros(T::DTYPE, &k.shape)?, gpu.zeros(T::DTYPE, &k.shape)?);
    gpu.approx_backward((&gq, &gk, &gv), &gd, opts, method, (&mut dq, &mut dk, &mut dv))?;
    Ok((gpu.download(&dq)?, gpu.download(&dk)?, gpu.download(&dv)?))
}

/// Forward on host tensors: uploads, runs, downloads (the `Backend::Cuda` path).
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward_host<T: Element>(
    ordinal: usize,
    plan: &Plan,
    (q, k, v): Qkv<T>,
    opts: &AttnOptions,
    out: &mut [T],
    lse: &mut [f32],
) -> Result<()> {
    let gpu = Gpu::open(ordinal)?;
    let (dq, dk, dv) = (gpu.upload(q)?, gpu.upload(k)?, gpu.upload(v)?);
    let mut o = gpu.zeros(T::DTYPE, plan.q_shape())?;
    let mut l = gpu.zeros_f32(plan.lse_len())?;
    gpu.forward(&dq, &dk, &dv, opts, &mut o, &mut l)?;
    gpu.download_into(&o, out)?;
    gpu.stream.memcpy_dtoh(&l.slice(..lse.len()), lse).map_err(driver_err("copying from the GPU"))?;
    Ok(())
}

/// Backward on host tensors (the `Backend::Cuda` path).
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_host<T: Element>(
    ordinal: usize,
    plan: &Plan,
    (q, k, v): Qkv<T>,
    o: &TensorRef<T>,
    lse: &[f32],
    dout: &TensorRef<T>,
    opts: &AttnOptions,
    (dq, dk, dv): (&mut [T], &mut [T], &mut [T]),
) -> Result<()> {
    let gpu = Gpu::open(ordinal)?;
    let (gq, gk, gv, go, gd) = (gpu.upload(q)?, gpu.upload(k)?, gpu.upload(v)?, gpu.upload(o)?, gpu.upload(dout)?);
    let gl = gpu.stream.clone_htod(lse).map_err(driver_err("copying to the GPU"))?;
    let mut gdq = gpu.zeros(T::DTYPE, plan.q_shape())?;
    let mut gdk = gpu.zeros(T::DTYPE, plan.kv_shape())?;
    let mut gdv = gpu.zeros(T::DTYPE, plan.kv_shape())?;
    gpu.backward((&gq, &gk, &gv), &go, &gl, &gd, opts, (&mut gdq, &mut gdk, &mut gdv))?;
    gpu.download_into(&gdq, dq)?;
    gpu.download_into(&gdk, dk)?;
    gpu.download_into(&gdv, dv)?;
    Ok(())
}

/// One NVRTC compilation: a kernel variant, or an auxiliary module for one element type.
struct Unit {
    name: String,
    source: String,
    defines: Vec<String>,
    /// An architecture-specific target ("sm_90a") instead of the GPU's own.
    target: Option<&'static str>,
    /// The attention kernel of a variant (held to no spills); None for auxiliary modules.
    main: Option<&'static str>,
}

impl Unit {
    fn variant(v: &Variant) -> Self {
        Unit {
            name: v.name(),
            source: v.source(),
            defines: v.defines(),
            target: v.target_arch(),
            main: Some(v.kernel_name()),
        }
    }

    fn aux(name: &str, source: &str, dtype: DType) -> Self {
        Unit {
            name: format!("{name}-{dtype}"),
            source: format!("{}\n{source}", kernels::COMMON),
            defines: vec![kernels::elem_define(dtype), "-DHDIM=32".to_string()],
            target: None,
            main: None,
        }
    }

    fn arch<'a>(&'a self, gpu_arch: &'a str) -> &'a str {
        self.target.unwrap_or(gpu_arch)
    }

    /// Every unit a GPU of `arch` may load.
    fn all(arch: &str) -> Vec<Unit> {
        let mut units: Vec<Unit> = Variant::all(arch).iter().map(Unit::variant).collect();
        units.extend([DType::BF16, DType::F16].map(|dtype| Unit::aux("approx", approx::SOURCE, dtype)));
        units
    }
}

/// One compiled unit's report: its name, the architecture it was compiled for, its attention kernel (None for
/// auxiliary modules) and ptxas' resources for each of its kernels.
pub struct UnitReport<'a> {
    pub name: &'a str,
    pub arch: &'a str,
    pub main: Option<&'static str>,
    pub resources: Vec<compile::Resources>,
}

/// Compiles every kernel unit for `arch` (no GPU needed), in parallel, with ptxas' resource report; calls
/// `on_unit` in order with each unit's report. Errors on a failed compilation.
pub fn check_kernels(arch: &str, mut on_unit: impl FnMut(UnitReport)) -> Result<()> {
    use rayon::prelude::*;
    let units = Unit::all(arch);
    let reports: Vec<Result<Vec<compile::Resources>>> = units
        .par_iter()
        .map(|u| {
            compile::compile(&u.name, &u.source, u.arch(arch), &u.defines, true)
                .map(|c| compile::parse_resources(&c.log))
        })
        .collect();
    for (u, r) in units.iter().zip(reports) {
        on_unit(UnitReport { name: &u.name, arch: u.arch(arch), main: u.main, resources: r? });
    }
    Ok(())
}

/// Compiles every kernel unit for `arch` into the disk cache, in parallel; returns how many were compiled (the
/// rest were cached already).
pub fn warm_cache(arch: &str) -> Result<usize> {
    use rayon::prelude::*;
    let compiled: Result<Vec<bool>> = Unit::all(arch)
        .par_iter()
        .map(|u| compile::compile(&u.name, &u.source, u.arch(arch), &u.defines, false).map(|c| !c.cached))
        .collect();
    Ok(compiled?.into_iter().filter(|&fresh| fresh).count())
}
