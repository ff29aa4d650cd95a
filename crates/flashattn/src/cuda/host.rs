//! Thin layers over the borrowed API, on the library's own stream: the owned-buffer API (`DeviceTensor`) and the
//! host-slice API of `Backend::Cuda` (upload, run, download).

use super::call::{BackwardArgs, DeviceInputs, DeviceVarLen, ForwardArgs};
use super::gpu::{driver_err, Gpu};
use super::tensor::{view_of, DeviceDType, DeviceTensor, DeviceView};
use crate::dtype::{DType, Element};
use crate::error::{AttnError, Result};
use crate::problem::{AttnOptions, Plan};
use crate::tensor::{Qkv, TensorRef};
use cudarc::driver::CudaSlice;
use std::sync::atomic::Ordering;

/// The host-side offsets and slopes of `opts`, uploaded for one call, with the options left for the device call.
struct Uploaded {
    opts: AttnOptions,
    cu: Option<(CudaSlice<i32>, CudaSlice<i32>)>,
    alibi: Option<CudaSlice<f32>>,
    max_q: usize,
    max_k: usize,
    batch: usize,
    heads_q: usize,
}

impl Uploaded {
    fn new(gpu: &Gpu, plan: &Plan, opts: &AttnOptions) -> Result<Self> {
        let up = |v: &[i32]| gpu.stream.clone_htod(v).map_err(driver_err("copying to the GPU"));
        let cu = opts
            .varlen
            .as_ref()
            .map(|vl| Ok::<_, AttnError>((up(&vl.cu_seqlens_q)?, up(&vl.cu_seqlens_k)?)))
            .transpose()?;
        let alibi = if plan.mask.alibi.is_empty() {
            None
        } else {
            Some(gpu.stream.clone_htod(&plan.mask.alibi).map_err(driver_err("copying to the GPU"))?)
        };
        let max = |lens: &[usize]| lens.iter().copied().max().unwrap_or(0);
        Ok(Uploaded {
            opts: AttnOptions { varlen: None, alibi_slopes: None, ..opts.clone() },
            cu,
            alibi,
            max_q: max(&plan.len_q),
            max_k: max(&plan.len_k),
            batch: plan.batch,
            heads_q: plan.heads_q,
        })
    }

    fn bytes(&self) -> usize {
        4 * (self.cu.as_ref().map_or(0, |(q, k)| q.len() + k.len()) + self.alibi.as_ref().map_or(0, |a| a.len()))
    }

    /// The views of the uploaded buffers; `device` borrows them.
    fn views(&self) -> (Option<[DeviceView; 2]>, Option<DeviceView>) {
        let cu = self.cu.as_ref().map(|(q, k)| {
            [view_of(q, DeviceDType::I32, &[self.batch + 1]), view_of(k, DeviceDType::I32, &[self.batch + 1])]
        });
        let alibi = self.alibi.as_ref().map(|a| view_of(a, DeviceDType::F32, &[self.batch, self.heads_q]));
        (cu, alibi)
    }

    fn device<'a>(&self, views: &'a (Option<[DeviceView; 2]>, Option<DeviceView>)) -> DeviceInputs<'a> {
        DeviceInputs {
            varlen: views.0.as_ref().map(|[q, k]| DeviceVarLen {
                cu_seqlens_q: q,
                cu_seqlens_k: k,
                max_seqlen_q: self.max_q,
                max_seqlen_k: self.max_k,
            }),
            alibi_slopes: views.1.as_ref(),
        }
    }
}

fn check_lse_len(lse: &CudaSlice<f32>, plan: &Plan) -> Result<()> {
    if lse.len() < plan.lse_len() {
        return Err(AttnError::Shape {
            tensor: "lse",
            expected: format!("a buffer of {} elements", plan.lse_len()),
            got: vec![lse.len()],
        });
    }
    Ok(())
}

/// The dtype all of q, k and v share.
fn common_dtype(q: &DeviceTensor, others: &[(&'static str, &DeviceTensor)]) -> Result<DType> {
    for (name, t) in others {
        if t.dtype != q.dtype {
            return Err(AttnError::Unsupported {
                what: format!("{name} in {}", t.dtype),
                why: format!("q is {}", q.dtype),
            });
        }
    }
    Ok(q.dtype)
}

impl Gpu {
    /// Flash forward on owned device tensors, on the library's stream: `out` (q's shape, contiguous) and `lse`
    /// (f32, at least the plan's lse length).
    pub fn forward(
        &self,
        q: &DeviceTensor,
        k: &DeviceTensor,
        v: &DeviceTensor,
        opts: &AttnOptions,
        out: &mut DeviceTensor,
        lse: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let plan = Plan::new(q, k, v, opts, common_dtype(q, &[("k", k), ("v", v)])?)?;
        check_lse_len(lse, &plan)?;
        let up = Uploaded::new(self, &plan, opts)?;
        let views = up.views();
        let (qv, kv, vv, ov) = (q.view(), k.view(), v.view(), out.view());
        let lv = view_of(lse, DeviceDType::F32, &plan.lse_shape());
        let args =
            ForwardArgs { q: &qv, k: &kv, v: &vv, out: &ov, lse: &lv, opts: &up.opts, device: up.device(&views) };
        let scratch = self.run_forward(&self.stream, &args, super::WorkspaceFrom::Stream)?;
        self.workspace.store(up.bytes() + scratch, Ordering::Relaxed);
        Ok(())
    }

    /// Flash backward on owned device tensors, on the library's stream: dq (q's shape), dk and dv (k's shape),
    /// contiguous.
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
        let plan = Plan::new(q, k, v, opts, common_dtype(q, &[("k", k), ("v", v)])?)?;
        check_lse_len(lse, &plan)?;
        let up = Uploaded::new(self, &plan, opts)?;
        let views = up.views();
        let lv = view_of(lse, DeviceDType::F32, &plan.lse_shape());
        let [qv, kv, vv, ov, dov, dqv, dkv, dvv] = [q, k, v, o, dout, &*dq, &*dk, &*dv].map(DeviceTensor::view);
        let args = BackwardArgs {
            q: &qv,
            k: &kv,
            v: &vv,
            o: &ov,
            lse: &lv,
            dout: &dov,
            dq: &dqv,
            dk: &dkv,
            dv: &dvv,
            opts: &up.opts,
            device: up.device(&views),
        };
        let scratch = self.run_backward(&self.stream, &args, super::WorkspaceFrom::Stream)?;
        self.workspace.store(up.bytes() + scratch, Ordering::Relaxed);
        Ok(())
    }
}

/// Forward on host tensors: uploads, runs, downloads (the `Backend::Cuda` path).
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
