//! A call of the borrowed API: its tensors as device views, its options, the inputs that live on the device,
//! and the checks every call shares before it launches anything.

use super::checks::{self, Checked};
use super::gpu::Gpu;
use super::kernels::{Pass, Variant};
use super::params::{strides3, AttnParams};
use super::select;
use super::tensor::{DeviceDType, DeviceView};
use crate::error::{AttnError, Result};
use crate::problem::{AttnOptions, Plan};
use crate::tensor::TensorLayout;

/// A variable-length batch whose offsets live on the device: `cu_seqlens_q` and `cu_seqlens_k` are i32 of
/// length batch + 1 (as FlashAttention's varlen API), and the host gives only the longest sequences' lengths.
///
/// The kernels assume, without reading the offsets back, that each starts at 0, never decreases, and ends at
/// its tensor's token count, and that no sequence is longer than its maximum (query rows past `max_seqlen_q`
/// would be left unwritten, keys past `max_seqlen_k` unread). `FLASHATTN_CHECK_DEVICE_INPUTS=1` copies the
/// offsets back and checks all of that before each launch (it synchronizes the stream).
#[derive(Clone, Copy, Debug)]
pub struct DeviceVarLen<'a> {
    pub cu_seqlens_q: &'a DeviceView,
    pub cu_seqlens_k: &'a DeviceView,
    pub max_seqlen_q: usize,
    pub max_seqlen_k: usize,
}

/// The inputs of a call beyond q, k and v that live on the device. (In `AttnOptions`, the host-side
/// `varlen` and `alibi_slopes` must then be unset.)
#[derive(Clone, Copy, Debug, Default)]
pub struct DeviceInputs<'a> {
    pub varlen: Option<DeviceVarLen<'a>>,
    /// ALiBi slopes, f32, (heads_q) or (batch, heads_q), contiguous.
    pub alibi_slopes: Option<&'a DeviceView>,
}

/// A forward call: q (batch, seqlen_q, heads_q, head_dim) or (total_q, heads_q, head_dim), k and v likewise with
/// heads_kv; `out` with q's shape, contiguous; `lse` f32 (batch, heads_q, seqlen_q) or (heads_q, total_q),
/// contiguous. f16 or bf16, every stride but the last a multiple of 8 elements.
#[derive(Clone, Copy, Debug)]
pub struct ForwardArgs<'a> {
    pub q: &'a DeviceView,
    pub k: &'a DeviceView,
    pub v: &'a DeviceView,
    pub out: &'a DeviceView,
    pub lse: &'a DeviceView,
    pub opts: &'a AttnOptions,
    pub device: DeviceInputs<'a>,
}

/// A backward call: the forward's inputs, its output `o` and log-sum-exp, the output's gradient `dout` (o and
/// dout with q's shape, any aligned strides), and the gradients dq (q's shape), dk and dv (k's shape), contiguous.
#[derive(Clone, Copy, Debug)]
pub struct BackwardArgs<'a> {
    pub q: &'a DeviceView,
    pub k: &'a DeviceView,
    pub v: &'a DeviceView,
    pub o: &'a DeviceView,
    pub lse: &'a DeviceView,
    pub dout: &'a DeviceView,
    pub dq: &'a DeviceView,
    pub dk: &'a DeviceView,
    pub dv: &'a DeviceView,
    pub opts: &'a AttnOptions,
    pub device: DeviceInputs<'a>,
}

/// A call past its shared checks: the plan, the kernel variant, q, k and v checked, and the parameter block
/// with the inputs' addresses and layouts filled in.
pub(crate) struct CheckedCall<'a> {
    pub plan: Plan,
    pub variant: Variant,
    pub qkv: [Checked<'a>; 3],
    pub extras: Vec<Checked<'a>>,
    pub params: AttnParams,
}

impl Gpu {
    /// The checks shared by both passes: q, k, v and the device inputs, the plan and the variant.
    pub(crate) fn check_call<'a>(
        &self,
        (q, k, v): (&'a DeviceView, &'a DeviceView, &'a DeviceView),
        opts: &AttnOptions,
        device: &DeviceInputs<'a>,
        pass: Pass,
    ) -> Result<CheckedCall<'a>> {
        for (set, name) in [(opts.varlen.is_some(), "varlen"), (opts.alibi_slopes.is_some(), "alibi_slopes")] {
            if set {
                return Err(AttnError::Unsupported {
                    what: format!("AttnOptions::{name} in a call on device tensors"),
                    why: "give them on the device, in DeviceInputs".into(),
                });
            }
        }
        let dtype = checks::kernel_dtype(q)?;
        let qkv = [
            Checked::new(self, "q", q, q.dtype, 16)?,
            Checked::new(self, "k", k, q.dtype, 16)?,
            Checked::new(self, "v", v, q.dtype, 16)?,
        ];
        let mut extras = Vec::new();
        let varlen = match &device.varlen {
            Some(vl) => {
                let batch = vl.cu_seqlens_q.shape.first().copied().unwrap_or(0).saturating_sub(1);
                for (name, cu) in [("cu_seqlens_q", vl.cu_seqlens_q), ("cu_seqlens_k", vl.cu_seqlens_k)] {
                    let c = Checked::new(self, name, cu, DeviceDType::I32, 4)?;
                    c.contiguous(name, &[batch + 1])?;
                    extras.push(c);
                }
                Some((batch, vl.max_seqlen_q, vl.max_seqlen_k))
            }
            None => None,
        };
        let plan = Plan::for_device(&qkv[0], &qkv[1], &qkv[2], opts, dtype, varlen, device.alibi_slopes.is_some())?;
        let alibi_batch_stride = match device.alibi_slopes {
            Some(slopes) => {
                let (c, stride) = checks::alibi_slopes(self, slopes, plan.batch, plan.heads_q)?;
                extras.push(c);
                stride
            }
            None => 0,
        };
        let variant = select::for_plan(self.arch, self.budget, pass, &plan)?;
        for (name, t) in ["q", "k", "v"].into_iter().zip(&qkv) {
            checks::rows_aligned(name, t.shape(), t.strides(), t.buffer_len())?;
        }
        let tokens = |t: &Checked| if plan.varlen { t.view.shape[0] } else { plan.batch * t.view.shape[1] };
        if tokens(&qkv[0]).max(tokens(&qkv[1])) > i32::MAX as usize {
            return Err(AttnError::Unsupported {
                what: "more than 2^31 tokens".into(),
                why: "sequence offsets are 32-bit on the GPU".into(),
            });
        }
        if let (Some(vl), true) = (&device.varlen, super::tuning::check_device_inputs()) {
            self.validate_offsets(vl, qkv[0].view.shape[0], qkv[1].view.shape[0])?;
        }
        let mut params = AttnParams::for_plan(&plan, [q, k, v].map(|t| (t.ptr, t.strides.as_slice())));
        if let Some(vl) = &device.varlen {
            (params.cu_seqlens_q, params.cu_seqlens_k) = (vl.cu_seqlens_q.ptr, vl.cu_seqlens_k.ptr);
        }
        params.alibi = device.alibi_slopes.map_or(0, |s| s.ptr);
        params.alibi_batch_stride = alibi_batch_stride;
        Ok(CheckedCall { plan, variant, qkv, extras, params })
    }

    /// The debugging check of device offsets (`FLASHATTN_CHECK_DEVICE_INPUTS=1`): copied back and validated.
    fn validate_offsets(&self, vl: &DeviceVarLen, total_q: usize, total_k: usize) -> Result<()> {
        for (name, cu, total, max) in [
            ("cu_seqlens_q", vl.cu_seqlens_q, total_q, vl.max_seqlen_q),
            ("cu_seqlens_k", vl.cu_seqlens_k, total_k, vl.max_seqlen_k),
        ] {
            let mut host = vec![0i32; cu.numel()];
            // The offsets may still be being written on the caller's stream: wait for all of the GPU's work.
            self.ctx.synchronize().map_err(super::gpu::driver_err("synchronizing"))?;
            // SAFETY: the view was checked to hold `numel` i32 in device memory; the copy is synchronous.
            unsafe { cudarc::driver::result::memcpy_dtoh_sync(&mut host, cu.ptr) }
                .map_err(super::gpu::driver_err("copying offsets back to check them"))?;
            let starts = crate::problem::validate_cu_seqlens(name, &host, total)?;
            let longest = starts.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
            if longest > max {
                return Err(AttnError::CuSeqlens {
                    name,
                    problem: format!("a sequence of {longest} tokens is longer than the maximum given, {max}"),
                });
            }
        }
        Ok(())
    }
}

impl AttnParams {
    /// The parameters every pass shares: q, k and v (address, strides), the shapes and the resolved options.
    pub(crate) fn for_plan(plan: &Plan, [q, k, v]: [(u64, &[usize]); 3]) -> AttnParams {
        let m = &plan.mask;
        let lse_shape = plan.lse_shape();
        let max = |lens: &[usize]| lens.iter().copied().max().unwrap_or(0);
        let widest = (max(&plan.len_q) + max(&plan.len_k)).min(i32::MAX as usize);
        let (lse_batch, lse_head) = if plan.varlen {
            (0, lse_shape[1] as i64)
        } else {
            ((plan.heads_q * lse_shape[2]) as i64, lse_shape[2] as i64)
        };
        let mut p = AttnParams {
            q: q.0,
            k: k.0,
            v: v.0,
            lse_batch,
            lse_head,
            batch: plan.batch as i32,
            heads_q: plan.heads_q as i32,
            heads_kv: plan.heads_kv as i32,
            head_dim: plan.head_dim as i32,
            seqlen_q: max(&plan.len_q) as i32,
            seqlen_k: max(&plan.len_k) as i32,
            // A window wider than both sequences sees what an unbounded one sees; clamped there, the kernels'
            // 32-bit mask arithmetic (query + shift + window) cannot overflow.
            window_left: m.left.map_or(-1, |l| l.min(widest) as i32),
            window_right: m.right.map_or(-1, |r| r.min(widest) as i32),
            scale: m.scale,
            scale_log2: m.scale * std::f32::consts::LOG2_E,
            softcap: m.softcap.unwrap_or(0.0),
            ..Default::default()
        };
        (p.q_batch, p.q_row, p.q_head) = strides3(q.1);
        (p.k_batch, p.k_row, p.k_head) = strides3(k.1);
        (p.v_batch, p.v_row, p.v_head) = strides3(v.1);
        p
    }
}
