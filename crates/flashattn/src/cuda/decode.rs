//! Decode launches: attention of new queries against a KV cache (`crate::kvcache`), contiguous or paged, on a
//! caller's stream. Up to three kernels: `kv_append` (when new keys and values are given), `flash_decode` (split
//! over the keys when the batch alone would not fill the GPU) and `decode_combine` (when it was split). The
//! number of splits depends only on the shapes and the GPU, so a call is safe to capture in a CUDA graph once
//! `prepare_decode` has run.

use super::checks::{self, Checked};
use super::gpu::{driver_err, Gpu, Loaded};
use super::kernels::Variant;
use super::params::{strides3, AttnParams};
use super::select;
use super::tensor::{view_of, DeviceDType, DeviceView, Workspace, WorkspaceFrom};
use crate::error::{AttnError, Result};
use crate::kvcache::DecodePlan;
use crate::problem::AttnOptions;
use crate::tensor::TensorLayout;
use cudarc::driver::{CudaStream, LaunchConfig, PushKernelArg};
use std::sync::Arc;

/// Most splits of one sequence's keys.
pub const MAX_DECODE_SPLITS: usize = 128;

/// A decode call on device views (f16 or bf16 unless stated; every stride but the last a multiple of 8 elements):
/// - `q` (batch, seqlen_q, heads_q, head_dim);
/// - `k_cache`, `v_cache` (batch, capacity, heads_kv, head_dim), or with a block table (num_blocks, page_size,
///   heads_kv, head_dim); written when `new` is given;
/// - `cache_seqlens` i32 (batch), contiguous: tokens in each cache before the new ones;
/// - `block_table` i32 (batch, max_blocks), last dimension contiguous;
/// - `new`: keys and values (batch, seqlen_new, heads_kv, head_dim) appended at `cache_seqlens` first;
/// - `out` with q's shape and `lse` f32 (batch, heads_q, seqlen_q), both contiguous;
/// - `alibi_slopes` f32 (heads_q) or (batch, heads_q), contiguous (`opts.alibi_slopes` must then be unset);
/// - `num_splits`: 0 lets the library choose, else at most that many (1: no split, no workspace).
///
/// The lengths and page indices stay on the device and are not checked (reading them back would synchronize):
/// a length past the capacity is cut to it and a page index outside the cache reads zeros and is not written,
/// so bad values give wrong results but never touch memory outside the tensors. `FLASHATTN_CHECK_DEVICE_INPUTS=1`
/// copies them back and checks them before each launch.
#[derive(Clone, Copy, Debug)]
pub struct DecodeArgs<'a> {
    pub q: &'a DeviceView,
    pub k_cache: &'a DeviceView,
    pub v_cache: &'a DeviceView,
    pub cache_seqlens: &'a DeviceView,
    pub block_table: Option<&'a DeviceView>,
    pub new: Option<(&'a DeviceView, &'a DeviceView)>,
    pub out: &'a DeviceView,
    pub lse: &'a DeviceView,
    pub opts: &'a AttnOptions,
    pub alibi_slopes: Option<&'a DeviceView>,
    pub num_splits: usize,
}

/// The kernels' parameter block: the same fields in the same order as `struct DecodeParams` in flash_decode.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct DecodeParams {
    a: AttnParams,
    cache_seqlens: u64,
    block_table: u64,
    k_new: u64,
    v_new: u64,
    o_part: u64,
    lse_part: u64,
    kn_batch: i64,
    kn_row: i64,
    kn_head: i64,
    vn_batch: i64,
    vn_row: i64,
    vn_head: i64,
    table_stride: i64,
    page_size: i32,
    num_pages: i32,
    capacity: i32,
    seqlen_new: i32,
    num_splits: i32,
}

// SAFETY: a plain C struct of integers and floats, passed by value as a kernel argument.
unsafe impl cudarc::driver::DeviceRepr for DecodeParams {}

/// A decode call past its checks, with its kernels loaded (the split count needs the main kernel's occupancy).
struct DecodeCall {
    plan: DecodePlan,
    variant: Variant,
    loaded: Arc<Loaded>,
    params: DecodeParams,
}

impl Gpu {
    /// Bytes of workspace `args` needs (0 when the keys are not split).
    pub fn decode_workspace_bytes(&self, args: &DecodeArgs) -> Result<usize> {
        let call = self.check_decode(args)?;
        Ok(self.decode_scratch(&call))
    }

    /// Checks `args` and loads (compiling on first use) the kernels they need: after it, a launch only launches.
    pub fn prepare_decode(&self, args: &DecodeArgs) -> Result<()> {
        self.check_decode(args).map(|_| ())
    }

    /// Attention of `args.q` against a KV cache, queued on `stream` (of this GPU's primary context); scratch
    /// from `workspace` (`decode_workspace_bytes` says how much) or, when none is given, allocated on `stream`.
    pub fn launch_decode(
        &self,
        stream: &Arc<CudaStream>,
        args: &DecodeArgs,
        workspace: Option<Workspace>,
    ) -> Result<()> {
        self.launch_decode_with(stream, args, workspace.into())
    }

    /// `launch_decode` with scratch from where `workspace` says.
    pub fn launch_decode_with(
        &self,
        stream: &Arc<CudaStream>,
        args: &DecodeArgs,
        workspace: WorkspaceFrom,
    ) -> Result<()> {
        checks::stream_of(self, stream)?;
        let mut call = self.check_decode(args)?;
        let loaded = call.loaded.clone();
        let bytes = self.decode_scratch(&call);
        let scratch = self.scratch(stream, workspace, bytes)?;
        let plan = &call.plan;
        let splits = call.params.num_splits as usize;
        let rows_all = plan.batch * plan.seqlen_q * plan.heads_q;
        if splits > 1 {
            call.params.o_part = scratch.ptr;
            call.params.lse_part = scratch.ptr + (splits * rows_all * call.variant.hdim * 4) as u64;
        }
        let p = call.params;
        let launch = |f, grid: (u32, u32, u32), block: u32, smem: u32, what: &'static str| {
            let cfg = LaunchConfig { grid_dim: grid, block_dim: (block, 1, 1), shared_mem_bytes: smem };
            // SAFETY: the parameters match the kernels'; every pointer was checked to cover what they read and
            // write, and the device-held lengths and page indices are bounded inside the kernels.
            unsafe { stream.launch_builder(f).arg(&p).launch(cfg) }.map(|_| ()).map_err(driver_err(what))
        };
        if plan.seqlen_new > 0 {
            let grid = (plan.seqlen_new as u32, plan.batch as u32, 1);
            launch(loaded.before.as_ref().unwrap(), grid, 128, 0, "launching the cache append")?;
        }
        let row_blocks = plan.rows_per_kv_head().div_ceil(call.variant.block_m());
        let grid = (row_blocks as u32, (plan.batch * plan.heads_kv) as u32, splits as u32);
        launch(
            &loaded.main,
            grid,
            call.variant.threads(),
            call.variant.smem_bytes() as u32,
            "launching the decode kernel",
        )?;
        if splits > 1 {
            let grid = (rows_all.div_ceil(4) as u32, 1, 1);
            launch(loaded.after.as_ref().unwrap(), grid, 128, 0, "launching the decode combine")?;
        }
        drop(scratch);
        Ok(())
    }

    fn decode_scratch(&self, call: &DecodeCall) -> usize {
        let splits = call.params.num_splits as usize;
        if splits <= 1 {
            return 0;
        }
        let rows_all = call.plan.batch * call.plan.seqlen_q * call.plan.heads_q;
        splits * rows_all * (call.variant.hdim + 1) * 4
    }

    /// Every check of a decode call; the plan, the variant and the parameters.
    fn check_decode(&self, args: &DecodeArgs) -> Result<DecodeCall> {
        if args.opts.alibi_slopes.is_some() {
            return Err(AttnError::Unsupported {
                what: "AttnOptions::alibi_slopes in a call on device tensors".into(),
                why: "give them on the device, in DecodeArgs::alibi_slopes".into(),
            });
        }
        let dtype = checks::kernel_dtype(args.q)?;
        let elem = args.q.dtype;
        let q = Checked::new(self, "q", args.q, elem, 16)?;
        let k = Checked::new(self, "k_cache", args.k_cache, elem, 16)?;
        let v = Checked::new(self, "v_cache", args.v_cache, elem, 16)?;
        let seqlens = Checked::new(self, "cache_seqlens", args.cache_seqlens, DeviceDType::I32, 4)?;
        let table = args.block_table.map(|t| Checked::new(self, "block_table", t, DeviceDType::I32, 4)).transpose()?;
        let new = match args.new {
            Some((kn, vn)) => Some((Checked::new(self, "k", kn, elem, 16)?, Checked::new(self, "v", vn, elem, 16)?)),
            None => None,
        };
        let new_layout = new.as_ref().map(|(k, v)| (k as &dyn TensorLayout, v as &dyn TensorLayout));
        let plan = DecodePlan::new(
            &q,
            &k,
            &v,
            args.block_table.map(|t| t.shape.as_slice()),
            &args.cache_seqlens.shape,
            new_layout,
            args.opts,
        )?;
        seqlens.contiguous("cache_seqlens", &[plan.batch])?;
        if let Some(t) = &table {
            if t.view.strides[1] != 1 {
                return Err(AttnError::Stride {
                    tensor: "block_table",
                    problem: "each row's page indices must be contiguous".into(),
                    shape: t.view.shape.clone(),
                    strides: t.view.strides.clone(),
                    len: t.buffer_len(),
                });
            }
            t.in_bounds("block_table")?;
        }
        for (name, t) in [("q", &q), ("k_cache", &k), ("v_cache", &v)]
            .into_iter()
            .chain(new.iter().flat_map(|(k, v)| [("k", k), ("v", v)]))
        {
            checks::rows_aligned(name, t.shape(), t.strides(), t.buffer_len())?;
        }
        let out = Checked::new(self, "out", args.out, elem, 16)?;
        out.contiguous("out", &plan.out_shape())?;
        let lse = Checked::new(self, "lse", args.lse, DeviceDType::F32, 16)?;
        lse.contiguous("lse", &plan.lse_shape())?;
        let alibi = args.alibi_slopes.map(|s| checks::alibi_slopes(self, s, plan.batch, plan.heads_q)).transpose()?;
        let mut inputs = vec![("q", &q), ("cache_seqlens", &seqlens)];
        inputs.extend(table.iter().map(|t| ("block_table", t)));
        inputs.extend(alibi.iter().map(|(a, _)| ("alibi_slopes", a)));
        let mut outputs = vec![("out", &out), ("lse", &lse)];
        match &new {
            Some((kn, vn)) => {
                inputs.extend([("k", kn), ("v", vn)]);
                outputs.extend([("k_cache", &k), ("v_cache", &v)]);
            }
            None => inputs.extend([("k_cache", &k), ("v_cache", &v)]),
        }
        checks::no_overlap(&outputs, &inputs)?;
        let most = plan.batch * plan.seqlen_q * plan.heads_q;
        if plan.batch * plan.heads_kv > 65535 {
            return Err(AttnError::Unsupported {
                what: format!("{} sequences x KV heads in one decode call", plan.batch * plan.heads_kv),
                why: "a launch's second grid dimension holds at most 65535: split the batch".into(),
            });
        }
        if most > i32::MAX as usize || plan.capacity() > i32::MAX as usize || plan.num_pages > i32::MAX as usize {
            return Err(AttnError::Unsupported {
                what: "more than 2^31 rows, tokens or pages".into(),
                why: "lengths and indices are 32-bit on the GPU".into(),
            });
        }
        if super::tuning::check_device_inputs() {
            self.validate_decode_inputs(&plan, args)?;
        }

        let variant = select::decode(self.arch, self.budget, dtype, plan.head_dim, plan.rows_per_kv_head())?;
        let loaded = self.load(variant)?;
        let splits = decode_splits(&plan, variant, loaded.resident, args.num_splits);
        let params = decode_params(&plan, args, alibi.map_or(0, |(_, s)| s), splits);
        Ok(DecodeCall { plan, variant, loaded, params })
    }

    /// The debugging check of the device-held lengths and page indices (`FLASHATTN_CHECK_DEVICE_INPUTS=1`).
    fn validate_decode_inputs(&self, plan: &DecodePlan, args: &DecodeArgs) -> Result<()> {
        self.ctx.synchronize().map_err(driver_err("synchronizing"))?;
        let read = |view: &DeviceView, n: usize| -> Result<Vec<i32>> {
            let mut host = vec![0i32; n];
            // SAFETY: the view was checked to hold at least `n` i32 in device memory; the copy is synchronous.
            unsafe { cudarc::driver::result::memcpy_dtoh_sync(&mut host, view.ptr) }
                .map_err(driver_err("copying device inputs back to check them"))?;
            Ok(host)
        };
        let seqlens = read(args.cache_seqlens, plan.batch)?;
        let table = match args.block_table {
            Some(t) => {
                let rows = read(t, (plan.batch - 1) * t.strides[0] + plan.max_blocks)?;
                Some(
                    (0..plan.batch)
                        .flat_map(|b| rows[b * t.strides[0]..][..plan.max_blocks].to_vec())
                        .collect::<Vec<_>>(),
                )
            }
            None => None,
        };
        plan.check_values(&seqlens, table.as_deref())
    }
}

/// Splits of each row block's keys: with as many CTAs as the GPU runs at once (`resident`) or more, none; else
/// enough that the waves of CTAs fill it (the fewest within 95% of the best wave efficiency: a streaming CTA's
/// time is set by its SM's share of bandwidth, so uneven SMs cost more than more splits; NOTES D-3), never more than
/// the key blocks of the capacity.
fn decode_splits(plan: &DecodePlan, variant: Variant, resident: usize, requested: usize) -> usize {
    let most = plan.capacity().div_ceil(variant.decode_block_n()).clamp(1, MAX_DECODE_SPLITS);
    if requested > 0 {
        return requested.min(most);
    }
    let ctas = plan.rows_per_kv_head().div_ceil(variant.block_m()) * plan.batch * plan.heads_kv;
    let efficiency = |s: usize| {
        let waves = (ctas * s) as f64 / resident as f64;
        waves / waves.ceil()
    };
    let best = (1..=most).map(efficiency).fold(0.0, f64::max);
    (1..=most).find(|&s| efficiency(s) >= 0.95 * best).unwrap_or(1)
}

/// The parameter block of a checked call (the workspace's addresses are filled in at launch).
fn decode_params(plan: &DecodePlan, args: &DecodeArgs, alibi_batch_stride: i32, splits: usize) -> DecodeParams {
    let m = &plan.mask;
    let widest = (plan.seqlen_q + plan.capacity()).min(i32::MAX as usize);
    let mut a = AttnParams {
        q: args.q.ptr,
        k: args.k_cache.ptr,
        v: args.v_cache.ptr,
        out: args.out.ptr,
        lse: args.lse.ptr,
        alibi: args.alibi_slopes.map_or(0, |s| s.ptr),
        alibi_batch_stride,
        lse_batch: (plan.heads_q * plan.seqlen_q) as i64,
        lse_head: plan.seqlen_q as i64,
        batch: plan.batch as i32,
        heads_q: plan.heads_q as i32,
        heads_kv: plan.heads_kv as i32,
        head_dim: plan.head_dim as i32,
        seqlen_q: plan.seqlen_q as i32,
        seqlen_k: plan.capacity() as i32,
        window_left: m.left.map_or(-1, |l| l.min(widest) as i32),
        window_right: m.right.map_or(-1, |r| r.min(widest) as i32),
        scale: m.scale,
        scale_log2: m.scale * std::f32::consts::LOG2_E,
        softcap: m.softcap.unwrap_or(0.0),
        ..Default::default()
    };
    (a.q_batch, a.q_row, a.q_head) = strides3(&args.q.strides);
    (a.k_batch, a.k_row, a.k_head) = strides3(&args.k_cache.strides);
    (a.v_batch, a.v_row, a.v_head) = strides3(&args.v_cache.strides);
    (a.o_batch, a.o_row, a.o_head) = strides3(&args.out.strides);
    let mut p = DecodeParams {
        a,
        cache_seqlens: args.cache_seqlens.ptr,
        block_table: args.block_table.map_or(0, |t| t.ptr),
        table_stride: args.block_table.map_or(0, |t| t.strides[0] as i64),
        page_size: plan.page_size as i32,
        num_pages: plan.num_pages as i32,
        capacity: plan.capacity() as i32,
        seqlen_new: plan.seqlen_new as i32,
        num_splits: splits as i32,
        ..Default::default()
    };
    if let Some((k, v)) = args.new {
        (p.k_new, p.v_new) = (k.ptr, v.ptr);
        (p.kn_batch, p.kn_row, p.kn_head) = strides3(&k.strides);
        (p.vn_batch, p.vn_row, p.vn_head) = strides3(&v.strides);
    }
    p
}

/// Decode on host tensors (the `Backend::Cuda` path of `kvcache::forward_kvcache`): uploads, runs on the
/// library's stream, downloads the output, the log-sum-exp and, when new keys were appended, the caches.
pub(crate) fn decode_host<T: crate::Element>(
    ordinal: usize,
    plan: &DecodePlan,
    q: &crate::TensorRef<T>,
    cache: crate::kvcache::KvCache<'_, T>,
    new: Option<(&crate::TensorRef<T>, &crate::TensorRef<T>)>,
    opts: &AttnOptions,
    (out, lse): (&mut [T], &mut [f32]),
) -> Result<()> {
    let gpu = Gpu::open(ordinal)?;
    let up_i32 = |v: &[i32]| gpu.stream.clone_htod(v).map_err(driver_err("copying to the GPU"));
    let shape = cache.shape.to_vec();
    let gq = gpu.upload(q)?;
    let gk = gpu.upload(&crate::TensorRef::new(&cache.k[..], &shape))?;
    let gv = gpu.upload(&crate::TensorRef::new(&cache.v[..], &shape))?;
    let seqlens = up_i32(cache.seqlens)?;
    let table = cache.block_table.map(|t| up_i32(t.pages)).transpose()?;
    let gnew = new.map(|(k, v)| Ok::<_, AttnError>((gpu.upload(k)?, gpu.upload(v)?))).transpose()?;
    let alibi = if plan.mask.alibi.is_empty() {
        None
    } else {
        Some(gpu.stream.clone_htod(&plan.mask.alibi).map_err(driver_err("copying to the GPU"))?)
    };
    let go = gpu.zeros(T::DTYPE, &plan.out_shape())?;
    let gl = gpu.zeros_f32(plan.lse_shape().iter().product())?;

    let (qv, kv, vv, ov) = (gq.view(), gk.view(), gv.view(), go.view());
    let lv = view_of(&gl, DeviceDType::F32, &plan.lse_shape());
    let sv = view_of(&seqlens, DeviceDType::I32, &[plan.batch]);
    let tv = table.as_ref().map(|t| view_of(t, DeviceDType::I32, &[plan.batch, plan.max_blocks]));
    let nv = gnew.as_ref().map(|(k, v)| (k.view(), v.view()));
    let av = alibi.as_ref().map(|a| view_of(a, DeviceDType::F32, &[plan.batch, plan.heads_q]));
    let device_opts = AttnOptions { alibi_slopes: None, ..opts.clone() };
    let args = DecodeArgs {
        q: &qv,
        k_cache: &kv,
        v_cache: &vv,
        cache_seqlens: &sv,
        block_table: tv.as_ref(),
        new: nv.as_ref().map(|(k, v)| (k, v)),
        out: &ov,
        lse: &lv,
        opts: &device_opts,
        alibi_slopes: av.as_ref(),
        num_splits: 0,
    };
    gpu.launch_decode(&gpu.stream, &args, None)?;
    gpu.download_into(&go, out)?;
    gpu.stream.memcpy_dtoh(&gl, lse).map_err(driver_err("copying from the GPU"))?;
    if new.is_some() {
        gpu.download_into(&gk, cache.k)?;
        gpu.download_into(&gv, cache.v)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn layout_matches_the_cuda_struct() {
        let attn = std::mem::size_of::<super::AttnParams>();
        // The attention block, 6 pointers, 7 strides, 5 ints, padded to 8 bytes.
        assert_eq!(std::mem::size_of::<super::DecodeParams>(), attn + 6 * 8 + 7 * 8 + 5 * 4 + 4);
    }
}
