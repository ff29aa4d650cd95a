//! Fast exact attention: the FlashAttention algorithm (tiling, online softmax, recomputation in the backward
//! pass) on the CPU and NVIDIA GPUs, with the standard materializing attention as reference.
//!
//! ```
//! use flashattn::{AttnOptions, Backend, TensorRef};
//! let (b, s, h, d) = (1, 5, 2, 8);
//! let x: Vec<f32> = (0..b * s * h * d).map(|i| (i as f32 * 0.37).sin()).collect();
//! let t = TensorRef::new(&x, &[b, s, h, d]);
//! let opts = AttnOptions::new().causal(true);
//! let fwd = flashattn::forward(&t, &t, &t, &opts, Backend::cpu()?)?;
//! assert_eq!(fwd.lse.len(), b * h * s);
//! let grads = flashattn::backward(&t, &t, &t, &fwd.out_ref(), &fwd.lse, &t, &opts, Backend::cpu()?)?;
//! assert_eq!(grads.dq.len(), x.len());
//! # Ok::<(), flashattn::AttnError>(())
//! ```

pub mod approx;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod dtype;
pub mod error;
pub mod kvcache;
mod mask;
pub mod problem;
pub mod reference;
pub mod tensor;

pub use cpu::Isa;
pub use dtype::{DType, Element};
pub use error::{AttnError, Result};
pub use kvcache::{forward_kvcache, BlockTable, KvCache};
pub use problem::{AttnOptions, Plan, VarLen, Window};
pub use tensor::{TensorLayout, TensorRef};

use std::fmt;
use tensor::Qkv;

/// The auxiliary GPU modules beside the attention kernels, by name and source, which `cuda::check_kernels` and
/// `cuda::warm_cache` compile too: listed here, above both, since their owners build on `cuda`.
#[cfg(feature = "cuda")]
pub(crate) const CUDA_AUX_MODULES: &[(&str, &str)] = &[("approx", approx::cuda::SOURCE)];

/// Which implementation runs a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// Standard attention in f64, materializing the score matrix (the oracle and the baseline).
    Reference,
    /// Flash attention on the CPU with the given instruction set.
    Cpu(Isa),
    /// Flash attention on the CUDA GPU with this ordinal (f16 and bf16; host tensors are copied in and out).
    Cuda(usize),
}

impl Backend {
    /// Flash attention on the CPU with the fastest instruction set (or the one `FLASHATTN_CPU_ISA` names).
    pub fn cpu() -> Result<Backend> {
        Ok(Backend::Cpu(Isa::detect()?))
    }

    /// The first CUDA GPU when one can be used, else the CPU.
    pub fn auto() -> Result<Backend> {
        #[cfg(feature = "cuda")]
        if cuda::is_available() {
            return Ok(Backend::Cuda(0));
        }
        Backend::cpu()
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Backend::Reference => f.write_str("reference"),
            Backend::Cpu(isa) => write!(f, "cpu-flash ({isa})"),
            Backend::Cuda(ordinal) => write!(f, "cuda:{ordinal}"),
        }
    }
}

/// The forward pass's results.
#[derive(Clone, Debug)]
pub struct Forward<T> {
    /// The attention output, with q's shape, contiguous.
    pub out: Vec<T>,
    pub out_shape: Vec<usize>,
    /// Natural-log log-sum-exp of each query's scores: (batch, heads_q, seqlen_q), or (heads_q, total_q) for a
    /// variable-length batch; -inf for a query that sees no key.
    pub lse: Vec<f32>,
    pub lse_shape: Vec<usize>,
}

impl<T> Forward<T> {
    /// The output as a tensor view (for the backward pass).
    pub fn out_ref(&self) -> TensorRef<'_, T> {
        TensorRef::new(&self.out, &self.out_shape)
    }
}

/// The backward pass's results: gradients of q (q's shape), k and v (k's shape), contiguous.
#[derive(Clone, Debug)]
pub struct Gradients<T> {
    pub dq: Vec<T>,
    pub dk: Vec<T>,
    pub dv: Vec<T>,
    pub dq_shape: Vec<usize>,
    pub dkv_shape: Vec<usize>,
}

/// Attention forward: softmax(scale * q k^T, masked) v for every (sequence, query head).
pub fn forward<T: Element>(
    q: &TensorRef<T>,
    k: &TensorRef<T>,
    v: &TensorRef<T>,
    opts: &AttnOptions,
    backend: Backend,
) -> Result<Forward<T>> {
    let plan = Plan::new(q, k, v, opts, T::DTYPE)?;
    let mut out = vec![T::default(); plan.q_numel()];
    let mut lse = vec![0.0; plan.lse_len()];
    run_forward(&plan, opts, (q, k, v), backend, &mut out, &mut lse)?;
    Ok(Forward { out, out_shape: plan.q_shape().to_vec(), lse, lse_shape: plan.lse_shape() })
}

/// Attention forward into caller-provided buffers: `out` with q's element count (contiguous, q's shape),
/// `lse` with the log-sum-exp's.
pub fn forward_into<T: Element>(
    q: &TensorRef<T>,
    k: &TensorRef<T>,
    v: &TensorRef<T>,
    opts: &AttnOptions,
    backend: Backend,
    out: &mut [T],
    lse: &mut [f32],
) -> Result<()> {
    let plan = Plan::new(q, k, v, opts, T::DTYPE)?;
    run_forward(&plan, opts, (q, k, v), backend, out, lse)
}

fn run_forward<T: Element>(
    plan: &Plan,
    opts: &AttnOptions,
    (q, k, v): Qkv<T>,
    backend: Backend,
    out: &mut [T],
    lse: &mut [f32],
) -> Result<()> {
    plan.check_output("out", out.len(), plan.q_numel())?;
    plan.check_output("lse", lse.len(), plan.lse_len())?;
    match backend {
        Backend::Reference => {
            reference::forward_into(
                plan,
                (q, k, v),
                reference::Precision::F64,
                (out, lse),
                |x| T::from_f32(x as f32),
                |x| x as f32,
            );
            Ok(())
        }
        Backend::Cpu(isa) => cpu::forward(plan, isa, q, k, v, out, lse),
        #[cfg(feature = "cuda")]
        Backend::Cuda(ordinal) => cuda::forward_host(ordinal, plan, (q, k, v), opts, out, lse),
        #[cfg(not(feature = "cuda"))]
        Backend::Cuda(_) => {
            let _ = opts;
            Err(AttnError::cuda_off())
        }
    }
}

/// Attention backward: gradients of q, k and v given the forward's output `o`, its log-sum-exp and the
/// output's gradient `dout` (o and dout have q's shape, any strides).
#[allow(clippy::too_many_arguments)]
pub fn backward<T: Element>(
    q: &TensorRef<T>,
    k: &TensorRef<T>,
    v: &TensorRef<T>,
    o: &TensorRef<T>,
    lse: &[f32],
    dout: &TensorRef<T>,
    opts: &AttnOptions,
    backend: Backend,
) -> Result<Gradients<T>> {
    let plan = Plan::new(q, k, v, opts, T::DTYPE)?;
    let mut dq = vec![T::default(); plan.q_numel()];
    let mut dk = vec![T::default(); plan.kv_numel()];
    let mut dv = vec![T::default(); plan.kv_numel()];
    run_backward(&plan, opts, (q, k, v), o, lse, dout, backend, (&mut dq, &mut dk, &mut dv))?;
    Ok(Gradients { dq, dk, dv, dq_shape: plan.q_shape().to_vec(), dkv_shape: plan.kv_shape().to_vec() })
}

/// Attention backward into caller-provided buffers (dq with q's element count, dk and dv with k's).
#[allow(clippy::too_many_arguments)]
pub fn backward_into<T: Element>(
    q: &TensorRef<T>,
    k: &TensorRef<T>,
    v: &TensorRef<T>,
    o: &TensorRef<T>,
    lse: &[f32],
    dout: &TensorRef<T>,
    opts: &AttnOptions,
    backend: Backend,
    (dq, dk, dv): (&mut [T], &mut [T], &mut [T]),
) -> Result<()> {
    let plan = Plan::new(q, k, v, opts, T::DTYPE)?;
    run_backward(&plan, opts, (q, k, v), o, lse, dout, backend, (dq, dk, dv))
}

type GradsMut<'a, T> = (&'a mut [T], &'a mut [T], &'a mut [T]);

#[allow(clippy::too_many_arguments)]
fn run_backward<T: Element>(
    plan: &Plan,
    opts: &AttnOptions,
    qkv: Qkv<T>,
    o: &TensorRef<T>,
    lse: &[f32],
    dout: &TensorRef<T>,
    backend: Backend,
    grads: GradsMut<T>,
) -> Result<()> {
    plan.check_backward_inputs(o, lse.len(), dout)?;
    plan.check_output("dq", grads.0.len(), plan.q_numel())?;
    plan.check_output("dk", grads.1.len(), plan.kv_numel())?;
    plan.check_output("dv", grads.2.len(), plan.kv_numel())?;
    match backend {
        Backend::Reference => {
            reference::backward_into(plan, qkv, dout, reference::Precision::F64, grads, |x| T::from_f32(x as f32));
            Ok(())
        }
        Backend::Cpu(isa) => cpu::backward(plan, isa, qkv, o, lse, dout, grads),
        #[cfg(feature = "cuda")]
        Backend::Cuda(ordinal) => cuda::backward_host(ordinal, plan, qkv, o, lse, dout, opts, grads),
        #[cfg(not(feature = "cuda"))]
        Backend::Cuda(_) => {
            let _ = opts;
            Err(AttnError::cuda_off())
        }
    }
}
