//! What a benchmark times: one implementation on one problem, with its inputs and outputs allocated up front so
//! that a timed call allocates only its own working memory.

use crate::random::fill_normal;
use flashattn::{AttnOptions, Backend, DType, Element, Result, TensorRef};
use half::{bf16, f16};

/// The shape of a benchmark problem (dense batch, Sq = Sk).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Shape {
    pub batch: usize,
    pub heads_q: usize,
    pub heads_kv: usize,
    pub seqlen: usize,
    pub head_dim: usize,
    pub causal: bool,
    /// Softmax scale [default: 1/sqrt(head_dim)].
    pub scale: Option<f32>,
    /// Bit-for-bit reproducible backward (GPU).
    pub deterministic: bool,
}

impl Shape {
    /// FLOPs of one forward pass in the FlashAttention convention: 4 B H Sq Sk d, half of it when causal.
    pub fn forward_flops(&self) -> f64 {
        let full = 4.0 * (self.batch * self.heads_q) as f64 * (self.seqlen as f64).powi(2) * self.head_dim as f64;
        if self.causal {
            full / 2.0
        } else {
            full
        }
    }

    pub fn q_shape(&self) -> [usize; 4] {
        [self.batch, self.seqlen, self.heads_q, self.head_dim]
    }

    pub fn kv_shape(&self) -> [usize; 4] {
        [self.batch, self.seqlen, self.heads_kv, self.head_dim]
    }

    pub fn options(&self) -> AttnOptions {
        let mut opts = AttnOptions::new().causal(self.causal).deterministic(self.deterministic);
        opts.scale = self.scale;
        opts
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    Forward,
    Backward,
}

impl Pass {
    pub fn name(self) -> &'static str {
        match self {
            Pass::Forward => "fwd",
            Pass::Backward => "bwd",
        }
    }
    /// FLOPs relative to the forward pass (backward = 2.5x: five matrix products instead of two).
    pub fn flop_factor(self) -> f64 {
        match self {
            Pass::Forward => 1.0,
            Pass::Backward => 2.5,
        }
    }
}

/// One implementation on one problem, ready to run either pass repeatedly.
pub trait Subject {
    /// Runs the pass once, to completion.
    fn run(&mut self, pass: Pass) -> Result<()>;
    /// Runs the pass `reps` times back to back and returns the seconds per call (a GPU queues them all and
    /// waits once, so launch gaps do not count).
    fn run_batch(&mut self, pass: Pass, reps: usize) -> Result<f64> {
        let t = std::time::Instant::now();
        for _ in 0..reps {
            self.run(pass)?;
        }
        Ok(t.elapsed().as_secs_f64() / reps as f64)
    }
    /// Extra memory the last call used, when the subject knows it better than the heap counter (GPU memory).
    fn workspace_bytes(&self) -> Option<usize> {
        None
    }
}

/// A CPU backend (flash or reference) with host buffers.
struct Host<T> {
    backend: Backend,
    shape: Shape,
    q: Vec<T>,
    k: Vec<T>,
    v: Vec<T>,
    dout: Vec<T>,
    out: Vec<T>,
    lse: Vec<f32>,
    dq: Vec<T>,
    dk: Vec<T>,
    dv: Vec<T>,
}

impl<T: Element> Host<T> {
    fn new(backend: Backend, shape: Shape, seed: u64) -> Self {
        let (nq, nkv) = (shape.q_shape().iter().product(), shape.kv_shape().iter().product());
        let tensor = |n: usize, s: u64| {
            let mut v = vec![T::default(); n];
            fill_normal(&mut v, s);
            v
        };
        Host {
            backend,
            shape,
            q: tensor(nq, seed),
            k: tensor(nkv, seed + 1),
            v: tensor(nkv, seed + 2),
            dout: tensor(nq, seed + 3),
            out: vec![T::default(); nq],
            lse: vec![0.0; shape.batch * shape.heads_q * shape.seqlen],
            dq: vec![T::default(); nq],
            dk: vec![T::default(); nkv],
            dv: vec![T::default(); nkv],
        }
    }

    fn forward(&mut self) -> Result<()> {
        let (qs, kvs) = (self.shape.q_shape(), self.shape.kv_shape());
        let (q, k, v) = (TensorRef::new(&self.q, &qs), TensorRef::new(&self.k, &kvs), TensorRef::new(&self.v, &kvs));
        flashattn::forward_into(&q, &k, &v, &self.shape.options(), self.backend, &mut self.out, &mut self.lse)
    }
}

impl<T: Element> Subject for Host<T> {
    fn run(&mut self, pass: Pass) -> Result<()> {
        match pass {
            Pass::Forward => self.forward(),
            Pass::Backward => {
                let (qs, kvs) = (self.shape.q_shape(), self.shape.kv_shape());
                let (q, k, v) =
                    (TensorRef::new(&self.q, &qs), TensorRef::new(&self.k, &kvs), TensorRef::new(&self.v, &kvs));
                let (o, dout) = (TensorRef::new(&self.out, &qs), TensorRef::new(&self.dout, &qs));
                let grads = (&mut self.dq[..], &mut self.dk[..], &mut self.dv[..]);
                flashattn::backward_into(&q, &k, &v, &o, &self.lse, &dout, &self.shape.options(), self.backend, grads)
            }
        }
    }
}

/// A CPU subject for `backend`; the backward pass gets a real forward output and log-sum-exp first.
pub fn host(backend: Backend, dtype: DType, shape: Shape, needs_forward_output: bool) -> Result<Box<dyn Subject>> {
    fn make<T: Element>(backend: Backend, shape: Shape, prime: bool) -> Result<Box<dyn Subject>> {
        let mut h = Host::<T>::new(backend, shape, 7);
        if prime {
            // The backward consumes o and lse; any backend's forward gives the same values.
            let mut flash = Host::<T> { backend: Backend::cpu()?, ..h };
            flash.forward()?;
            h = Host { backend, ..flash };
        }
        Ok(Box::new(h))
    }
    match dtype {
        DType::F32 => make::<f32>(backend, shape, needs_forward_output),
        DType::F16 => make::<f16>(backend, shape, needs_forward_output),
        DType::BF16 => make::<bf16>(backend, shape, needs_forward_output),
    }
}

#[cfg(feature = "cuda")]
pub use gpu::{approx_device, device, random_tensor};

#[cfg(not(feature = "cuda"))]
pub fn device(_: usize, _: DType, _: Shape, _: bool) -> Result<Box<dyn Subject>> {
    Err(no_cuda())
}

#[cfg(not(feature = "cuda"))]
pub fn approx_device(_: usize, _: DType, _: Shape, _: flashattn::approx::Method) -> Result<Box<dyn Subject>> {
    Err(no_cuda())
}

#[cfg(not(feature = "cuda"))]
fn no_cuda() -> flashattn::AttnError {
    flashattn::AttnError::Unsupported { what: "CUDA".into(), why: "this build has no CUDA support".into() }
}

#[cfg(feature = "cuda")]
mod gpu {
    use super::{Pass, Shape, Subject};
    use crate::random::fill_normal;
    use flashattn::cuda::{CudaSlice, DeviceTensor, Gpu};
    use flashattn::{DType, Result, TensorRef};
    use half::{bf16, f16};
    use std::sync::Arc;

    /// Flash attention on a GPU, with every tensor resident there.
    struct Device {
        gpu: Arc<Gpu>,
        shape: Shape,
        q: DeviceTensor,
        k: DeviceTensor,
        v: DeviceTensor,
        dout: DeviceTensor,
        out: DeviceTensor,
        lse: CudaSlice<f32>,
        dq: DeviceTensor,
        dk: DeviceTensor,
        dv: DeviceTensor,
    }

    /// Random normal values of `dtype` (bf16, else f16) uploaded to the GPU.
    pub fn random_tensor(gpu: &Gpu, dtype: DType, shape: &[usize], seed: u64) -> Result<DeviceTensor> {
        let n = shape.iter().product();
        match dtype {
            DType::BF16 => {
                let mut v = vec![bf16::ZERO; n];
                fill_normal(&mut v, seed);
                gpu.upload(&TensorRef::new(&v, shape))
            }
            _ => {
                let mut v = vec![f16::ZERO; n];
                fill_normal(&mut v, seed);
                gpu.upload(&TensorRef::new(&v, shape))
            }
        }
    }

    impl Device {
        fn forward(&mut self) -> Result<()> {
            self.gpu.forward(&self.q, &self.k, &self.v, &self.shape.options(), &mut self.out, &mut self.lse)
        }
        fn launch(&mut self, pass: Pass) -> Result<()> {
            match pass {
                Pass::Forward => self.forward(),
                Pass::Backward => self.gpu.backward(
                    (&self.q, &self.k, &self.v),
                    &self.out,
                    &self.lse,
                    &self.dout,
                    &self.shape.options(),
                    (&mut self.dq, &mut self.dk, &mut self.dv),
                ),
            }
        }
    }

    impl Subject for Device {
        fn run(&mut self, pass: Pass) -> Result<()> {
            self.launch(pass)?;
            self.gpu.synchronize()
        }
        fn run_batch(&mut self, pass: Pass, reps: usize) -> Result<f64> {
            self.gpu.synchronize()?;
            let t = std::time::Instant::now();
            for _ in 0..reps {
                self.launch(pass)?;
            }
            self.gpu.synchronize()?;
            Ok(t.elapsed().as_secs_f64() / reps as f64)
        }
        fn workspace_bytes(&self) -> Option<usize> {
            Some(self.gpu.last_workspace_bytes())
        }
    }

    /// An approximation on a GPU, every tensor resident there.
    struct Approx {
        gpu: Arc<Gpu>,
        shape: Shape,
        method: flashattn::approx::Method,
        t: [DeviceTensor; 8],
    }

    impl Subject for Approx {
        fn run(&mut self, pass: Pass) -> Result<()> {
            let opts = self.shape.options();
            let [q, k, v, dout, out, dq, dk, dv] = &mut self.t;
            match pass {
                Pass::Forward => self.gpu.approx_forward((q, k, v), &opts, &self.method, out)?,
                Pass::Backward => self.gpu.approx_backward((q, k, v), dout, &opts, &self.method, (dq, dk, dv))?,
            }
            self.gpu.synchronize()
        }
        fn workspace_bytes(&self) -> Option<usize> {
            Some(self.gpu.last_workspace_bytes())
        }
    }

    /// An approximation subject on a GPU: random inputs uploaded once.
    pub fn approx_device(
        ordinal: usize,
        dtype: DType,
        shape: Shape,
        method: flashattn::approx::Method,
    ) -> Result<Box<dyn Subject>> {
        let gpu = Gpu::open(ordinal)?;
        let (qs, kvs) = (shape.q_shape(), shape.kv_shape());
        let t = [
            random_tensor(&gpu, dtype, &qs, 7)?,
            random_tensor(&gpu, dtype, &kvs, 8)?,
            random_tensor(&gpu, dtype, &kvs, 9)?,
            random_tensor(&gpu, dtype, &qs, 10)?,
            gpu.zeros(dtype, &qs)?,
            gpu.zeros(dtype, &qs)?,
            gpu.zeros(dtype, &kvs)?,
            gpu.zeros(dtype, &kvs)?,
        ];
        Ok(Box::new(Approx { gpu, shape, method, t }))
    }

    /// A GPU subject: random inputs uploaded once, kernels compiled before timing, and (for the backward) a
    /// real forward output and log-sum-exp.
    pub fn device(ordinal: usize, dtype: DType, shape: Shape, needs_forward_output: bool) -> Result<Box<dyn Subject>> {
        let gpu = Gpu::open(ordinal)?;
        let (qs, kvs) = (shape.q_shape(), shape.kv_shape());
        gpu.prepare(dtype, shape.head_dim, shape.seqlen, &shape.options(), needs_forward_output)?;
        let mut d = Device {
            q: random_tensor(&gpu, dtype, &qs, 7)?,
            k: random_tensor(&gpu, dtype, &kvs, 8)?,
            v: random_tensor(&gpu, dtype, &kvs, 9)?,
            dout: random_tensor(&gpu, dtype, &qs, 10)?,
            out: gpu.zeros(dtype, &qs)?,
            lse: gpu.zeros_f32(shape.batch * shape.heads_q * shape.seqlen)?,
            dq: gpu.zeros(dtype, &qs)?,
            dk: gpu.zeros(dtype, &kvs)?,
            dv: gpu.zeros(dtype, &kvs)?,
            gpu,
            shape,
        };
        if needs_forward_output {
            d.run(Pass::Forward)?;
        }
        Ok(Box::new(d))
    }
}
