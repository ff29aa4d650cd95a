//! The backward pass's launches on a caller's stream: the preprocess (D = rowsum(dO * O)), the main kernel (one
//! CTA per key block: dK and dV in registers, dQ added to an f32 accumulator) and the conversion of dQ.

use super::call::BackwardArgs;
use super::checks::{self, Checked};
use super::gpu::{driver_err, Gpu};
use super::kernels::{Family, Pass, Variant};
use super::params::strides3;
use super::tensor::{DeviceDType, Workspace, WorkspaceFrom};
use super::tma;
use crate::error::{AttnError, Result};
use crate::problem::Plan;
use cudarc::driver::{CudaStream, LaunchConfig, PushKernelArg};
use std::sync::Arc;

/// Where a backward call's scratch lies in its workspace, in bytes from its start (each part 256-byte aligned).
/// All of it is zeroed before the launches.
struct Scratch {
    /// D = rowsum(dO * O), f32, like the log-sum-exp.
    delta: usize,
    /// dQ in f32, (token, head_q, hdim).
    dq_accum: usize,
    /// One counter per (batch, head, query block) that orders the deterministic mode's dQ additions.
    semaphore: usize,
    bytes: usize,
}

impl Scratch {
    fn of(plan: &Plan, variant: &Variant) -> Scratch {
        let slot = |bytes: usize| bytes.div_ceil(256) * 256;
        let rows = tokens_q(plan) * plan.heads_q;
        let num_m = plan.len_q.iter().copied().max().unwrap_or(0).div_ceil(variant.block_m());
        let counters = if plan.deterministic { plan.batch * plan.heads_q * num_m } else { 0 };
        let delta = 0;
        let dq_accum = delta + slot(4 * plan.lse_len().max(1));
        let semaphore = dq_accum + slot(4 * (rows * variant.hdim).max(1));
        Scratch { delta, dq_accum, semaphore, bytes: semaphore + slot(4 * counters.max(1)) }
    }
}

/// Query tokens: batch x seqlen_q, or the total of a variable-length batch.
fn tokens_q(plan: &Plan) -> usize {
    plan.q_shape().iter().rev().skip(2).product()
}

impl Gpu {
    /// Bytes of workspace `args` needs.
    pub fn backward_workspace_bytes(&self, args: &BackwardArgs) -> Result<usize> {
        let call = self.check_call((args.q, args.k, args.v), args.opts, &args.device, Pass::Backward)?;
        Ok(Scratch::of(&call.plan, &call.variant).bytes)
    }

    /// Checks `args` and loads (compiling on first use) the kernels they need (see `prepare_forward`).
    pub fn prepare_backward(&self, args: &BackwardArgs) -> Result<()> {
        let call = self.check_call((args.q, args.k, args.v), args.opts, &args.device, Pass::Backward)?;
        self.load(call.variant).map(|_| ())
    }

    /// Flash attention backward on device views, queued on `stream`; as `launch_forward`.
    pub fn launch_backward(
        &self,
        stream: &Arc<CudaStream>,
        args: &BackwardArgs,
        workspace: Option<Workspace>,
    ) -> Result<()> {
        self.run_backward(stream, args, workspace.into()).map(|_| ())
    }

    /// `launch_backward` with scratch from where `workspace` says: with [`WorkspaceFrom::Allocator`], the
    /// caller's allocator is asked for the bytes the call needs, so that one pass of checks serves both the
    /// size and the launch.
    pub fn launch_backward_with(
        &self,
        stream: &Arc<CudaStream>,
        args: &BackwardArgs,
        workspace: WorkspaceFrom,
    ) -> Result<()> {
        self.run_backward(stream, args, workspace).map(|_| ())
    }

    /// `launch_backward`, returning the bytes of scratch the call used.
    pub(crate) fn run_backward(
        &self,
        stream: &Arc<CudaStream>,
        args: &BackwardArgs,
        workspace: WorkspaceFrom,
    ) -> Result<usize> {
        checks::stream_of(self, stream)?;
        let call = self.check_call((args.q, args.k, args.v), args.opts, &args.device, Pass::Backward)?;
        let (plan, variant) = (&call.plan, call.variant);
        let dtype = args.q.dtype;
        let like_q = |name, view| -> Result<Checked> {
            let c = Checked::new(self, name, view, dtype, 16)?;
            plan.check_like_q(name, &c)?;
            checks::rows_aligned(name, &view.shape, &view.strides, view.numel())?;
            Ok(c)
        };
        let (o, dout) = (like_q("o", args.o)?, like_q("dout", args.dout)?);
        let lse = Checked::new(self, "lse", args.lse, DeviceDType::F32, 16)?;
        lse.contiguous("lse", &plan.lse_shape())?;
        let output = |name, view, shape: &[usize]| -> Result<Checked> {
            let c = Checked::new(self, name, view, dtype, 16)?;
            c.contiguous(name, shape)?;
            Ok(c)
        };
        let dq = output("dq", args.dq, plan.q_shape())?;
        let dk = output("dk", args.dk, plan.kv_shape())?;
        let dv = output("dv", args.dv, plan.kv_shape())?;
        let [q, k, v] = &call.qkv;
        let mut inputs = vec![("q", q), ("k", k), ("v", v), ("o", &o), ("lse", &lse), ("dout", &dout)];
        inputs.extend(call.extras.iter().map(|c| ("a device input", c)));
        checks::no_overlap(&[("dq", &dq), ("dk", &dk), ("dv", &dv)], &inputs)?;
        let loaded = self.load(variant)?;
        let layout = Scratch::of(plan, &variant);
        let scratch = self.scratch(stream, workspace, layout.bytes)?;
        self.zero(stream, scratch.ptr, layout.bytes)?;
        let dq_accum = scratch.ptr + layout.dq_accum as u64;

        let mut p = call.params;
        p.o = args.o.ptr;
        (p.o_batch, p.o_row, p.o_head) = strides3(&args.o.strides);
        p.dout = args.dout.ptr;
        (p.do_batch, p.do_row, p.do_head) = strides3(&args.dout.strides);
        p.lse = args.lse.ptr;
        p.delta = scratch.ptr + layout.delta as u64;
        p.dq_accum = dq_accum;
        p.dq_semaphore = scratch.ptr + layout.semaphore as u64;
        p.deterministic = plan.deterministic as i32;
        p.dk = args.dk.ptr;
        p.dv = args.dv.ptr;
        (p.dk_batch, p.dk_row, p.dk_head) = strides3(&args.dk.strides);
        let max_q = plan.len_q.iter().copied().max().unwrap_or(0);
        let max_k = plan.len_k.iter().copied().max().unwrap_or(0);

        let pre = LaunchConfig {
            grid_dim: (max_q.div_ceil(64).max(1) as u32, plan.heads_q as u32, plan.batch as u32),
            block_dim: (64, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY (all launches): the parameter block matches the kernels'; every pointer was checked to cover
        // what the plan reads and writes, and the scratch stays alive until the launches are queued.
        unsafe { stream.launch_builder(loaded.before.as_ref().unwrap()).arg(&p).launch(pre) }
            .map_err(driver_err("launching the backward preprocess"))?;
        let main = LaunchConfig {
            grid_dim: main_grid(variant, max_k, plan)?,
            block_dim: (variant.threads(), 1, 1),
            shared_mem_bytes: variant.smem_bytes() as u32,
        };
        let mut launch = stream.launch_builder(&loaded.main);
        launch.arg(&p);
        let maps;
        if variant.family == Family::Hopper {
            let (m, n) = (variant.block_m(), variant.bwd_block_n());
            maps = [
                tma::tensor_map(plan, args.q, tma::Side::Query, m)?,
                tma::tensor_map(plan, args.k, tma::Side::Key, n)?,
                tma::tensor_map(plan, args.v, tma::Side::Key, n)?,
                tma::tensor_map(plan, args.dout, tma::Side::Query, m)?,
                tma::dq_accum_map(plan, dq_accum, tokens_q(plan), variant.hdim)?,
            ];
            launch.arg(&maps[0]).arg(&maps[1]).arg(&maps[2]).arg(&maps[3]).arg(&maps[4]);
        }
        unsafe { launch.launch(main) }.map_err(driver_err("launching the backward kernel"))?;
        // The output o is read through p.o; dq is written through p.dq by the conversion, with o's row layout.
        let mut pc = p;
        pc.dq = args.dq.ptr;
        (pc.o_batch, pc.o_row, pc.o_head) = strides3(&args.dq.strides);
        let rows = tokens_q(plan) * plan.heads_q;
        let chunks = rows * variant.hdim / 8;
        let conv = LaunchConfig {
            grid_dim: (chunks.div_ceil(256).max(1) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let rows = rows as i64;
        unsafe { stream.launch_builder(loaded.after.as_ref().unwrap()).arg(&pc).arg(&rows).launch(conv) }
            .map_err(driver_err("launching the dq conversion"))?;
        drop(scratch);
        Ok(layout.bytes)
    }
}

/// The main kernel's grid. Hopper: one dimension, key block by key block within groups of (batch, KV head) pairs
/// (`key_tile` in bwd_common.cuh), so that the longest causal CTAs start first. Portable: (key blocks, KV heads, batch); the one-dimensional index made its
/// register-tight d = 96 variants spill.
fn main_grid(variant: Variant, max_k: usize, plan: &Plan) -> Result<(u32, u32, u32)> {
    let blocks = max_k.div_ceil(variant.bwd_block_n()).max(1);
    if variant.family != Family::Hopper {
        return Ok((blocks as u32, plan.heads_kv as u32, plan.batch as u32));
    }
    let ctas = blocks * plan.heads_kv * plan.batch;
    match i32::try_from(ctas) {
        Ok(n) => Ok((n as u32, 1, 1)),
        Err(_) => Err(AttnError::Unsupported {
            what: format!("a backward of {ctas} key blocks x KV heads x sequences"),
            why: "one launch runs at most 2^31 - 1 CTAs: split the batch".into(),
        }),
    }
}
