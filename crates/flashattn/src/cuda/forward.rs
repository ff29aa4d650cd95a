//! The forward pass's launches on a caller's stream: the portable kernel (one CTA per query block) and the
//! persistent Hopper kernel (as many CTAs as fit, taking tiles from a counter in the call's workspace).

use super::call::ForwardArgs;
use super::checks::{self, Checked};
use super::gpu::{driver_err, Gpu};
use super::kernels::{Family, Pass};
use super::params::strides3;
use super::tensor::{DeviceDType, Workspace, WorkspaceFrom};
use super::{cluster, tma};
use crate::error::Result;
use cudarc::driver::{CudaStream, LaunchConfig, PushKernelArg};
use std::sync::Arc;

/// Bytes of the Hopper forward's tile counter (a 256-byte slot of the workspace).
const TILE_COUNTER_BYTES: usize = 256;

impl Gpu {
    /// Bytes of workspace `args` needs (0 when none).
    pub fn forward_workspace_bytes(&self, args: &ForwardArgs) -> Result<usize> {
        let call = self.check_call((args.q, args.k, args.v), args.opts, &args.device, Pass::Forward)?;
        Ok(forward_scratch(call.variant.family))
    }

    /// Checks `args` and loads (compiling on first use) the kernel they need, so that a later launch does no
    /// more than launch: what must happen before a launch is captured in a CUDA graph.
    pub fn prepare_forward(&self, args: &ForwardArgs) -> Result<()> {
        let call = self.check_call((args.q, args.k, args.v), args.opts, &args.device, Pass::Forward)?;
        self.load(call.variant).map(|_| ())
    }

    /// Flash attention forward on device views, queued on `stream` (of this GPU's primary context); nothing is
    /// read back to the host. Scratch comes from `workspace` (`forward_workspace_bytes` says how much), or, when
    /// none is given, is allocated on `stream` and freed in its order.
    pub fn launch_forward(
        &self,
        stream: &Arc<CudaStream>,
        args: &ForwardArgs,
        workspace: Option<Workspace>,
    ) -> Result<()> {
        self.run_forward(stream, args, workspace.into()).map(|_| ())
    }

    /// `launch_forward` with scratch from where `workspace` says: with [`WorkspaceFrom::Allocator`], the
    /// caller's allocator is asked for the bytes the call needs, so that one pass of checks serves both the
    /// size and the launch.
    pub fn launch_forward_with(
        &self,
        stream: &Arc<CudaStream>,
        args: &ForwardArgs,
        workspace: WorkspaceFrom,
    ) -> Result<()> {
        self.run_forward(stream, args, workspace).map(|_| ())
    }

    /// `launch_forward`, returning the bytes of scratch the call used.
    pub(crate) fn run_forward(
        &self,
        stream: &Arc<CudaStream>,
        args: &ForwardArgs,
        workspace: WorkspaceFrom,
    ) -> Result<usize> {
        checks::stream_of(self, stream)?;
        let call = self.check_call((args.q, args.k, args.v), args.opts, &args.device, Pass::Forward)?;
        let (plan, variant) = (&call.plan, call.variant);
        let out = Checked::new(self, "out", args.out, args.q.dtype, 16)?;
        out.contiguous("out", plan.q_shape())?;
        let lse = Checked::new(self, "lse", args.lse, DeviceDType::F32, 16)?;
        lse.contiguous("lse", &plan.lse_shape())?;
        let [q, k, v] = &call.qkv;
        let mut inputs = vec![("q", q), ("k", k), ("v", v)];
        inputs.extend(call.extras.iter().map(|c| ("a device input", c)));
        checks::no_overlap(&[("out", &out), ("lse", &lse)], &inputs)?;
        let loaded = self.load(variant)?;
        let bytes = forward_scratch(variant.family);
        let scratch = self.scratch(stream, workspace, bytes)?;

        let mut p = call.params;
        p.out = args.out.ptr;
        (p.o_batch, p.o_row, p.o_head) = strides3(&args.out.strides);
        p.lse = args.lse.ptr;
        let max_q = plan.len_q.iter().copied().max().unwrap_or(0);
        let max_k = plan.len_k.iter().copied().max().unwrap_or(0);
        let m_blocks = max_q.div_ceil(variant.block_m()).max(1);
        if variant.family == Family::Portable {
            let cfg = LaunchConfig {
                grid_dim: (m_blocks as u32, plan.heads_q as u32, plan.batch as u32),
                block_dim: (variant.threads(), 1, 1),
                shared_mem_bytes: variant.smem_bytes() as u32,
            };
            // SAFETY: the parameters match the kernel's; every pointer was checked to cover what the plan reads.
            return unsafe { stream.launch_builder(&loaded.main).arg(&p).launch(cfg) }
                .map(|_| bytes)
                .map_err(driver_err("launching the forward kernel"));
        }
        // Persistent: as many CTAs as run at once take entries of the tile list (an entry is a query block per
        // CTA of a cluster), from the counter or, in clusters, a static share.
        let cluster = variant.cluster();
        let tiles = m_blocks.div_ceil(cluster) * plan.heads_q * plan.batch;
        let (m, n) = (variant.block_m(), variant.hopper_tiles().block_n);
        let maps = [
            tma::tensor_map(plan, args.q, tma::Side::Query, m)?,
            tma::tensor_map(plan, args.k, tma::Side::Key, n)?,
            tma::tensor_map(plan, args.v, tma::Side::Key, n)?,
            // O is stored in 16-row boxes, one per consumer warp.
            tma::tensor_map(plan, args.out, tma::Side::Query, 16)?,
        ];
        let counter = scratch.ptr;
        self.zero(stream, counter, TILE_COUNTER_BYTES)?;
        // Heads whose K and V (12 MB: a quarter of an H200's L2 cache) are read by the CTAs at once.
        let kv_head_bytes = 4 * max_k.max(1) * plan.head_dim;
        let group = plan.heads_q / plan.heads_kv;
        let group_heads = (((12 << 20) / kv_head_bytes).clamp(1, plan.heads_kv * plan.batch) * group) as i32;
        // The launch builder takes no clusters: the arguments by hand.
        let mut args: [*mut std::ffi::c_void; 7] = [
            &p as *const _ as _,
            &maps[0] as *const _ as _,
            &maps[1] as *const _ as _,
            &maps[2] as *const _ as _,
            &maps[3] as *const _ as _,
            &counter as *const _ as _,
            &group_heads as *const _ as _,
        ];
        let geometry = cluster::Geometry {
            grid: (tiles.min(loaded.resident) * cluster) as u32,
            block: variant.threads(),
            smem: variant.smem_bytes() as u32,
            cluster: cluster as u32,
        };
        self.ctx.bind_to_thread().map_err(driver_err("binding the context"))?;
        // SAFETY: the arguments are the kernel's, in order; every pointer was checked to cover what the plan
        // reads and writes, and the counter lies in the call's scratch, alive until the launch is queued.
        let launched = unsafe { cluster::launch(&loaded.main, stream, geometry, &mut args) };
        drop(scratch);
        launched.map(|_| bytes)
    }
}

/// Workspace bytes of a forward call.
fn forward_scratch(family: Family) -> usize {
    match family {
        Family::Hopper => TILE_COUNTER_BYTES,
        Family::Portable => 0,
    }
}
