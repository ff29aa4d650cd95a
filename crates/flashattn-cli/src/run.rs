//! `flashattn run`: attention on tensors from .npy files (BSHD, or (total, heads, d) with cu_seqlens), results
//! written as f32 .npy. How tensors move in and out, and how results are checked against other libraries.

use crate::bench::Impl;
use crate::device::Target;
use crate::npy::{self, Array};
use clap::Args;
use flashattn::{AttnOptions, Backend, DType, Element, Isa, TensorRef};
use half::{bf16, f16};
use std::path::{Path, PathBuf};

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Queries: (batch, seqlen_q, heads_q, head_dim), or (total_q, heads_q, head_dim) with --cu-seqlens-q.
    #[arg(long)]
    pub q: PathBuf,
    /// Keys: (batch, seqlen_k, heads_kv, head_dim), or (total_k, heads_kv, head_dim).
    #[arg(long)]
    pub k: PathBuf,
    /// Values, shaped like the keys.
    #[arg(long)]
    pub v: PathBuf,
    /// Where to write the output (f32, q's shape).
    #[arg(long)]
    pub out: PathBuf,
    /// Where to write the log-sum-exp (f32; (batch, heads_q, seqlen_q) or (heads_q, total_q)).
    #[arg(long)]
    pub lse: Option<PathBuf>,
    /// Gradient of the output: runs the backward pass too.
    #[arg(long)]
    pub dout: Option<PathBuf>,
    /// Where to write dq (with --dout).
    #[arg(long)]
    pub dq: Option<PathBuf>,
    /// Where to write dk (with --dout).
    #[arg(long)]
    pub dk: Option<PathBuf>,
    /// Where to write dv (with --dout).
    #[arg(long)]
    pub dv: Option<PathBuf>,
    /// Compute in this type (inputs are rounded to it) [default: q's file type, f32 or f16; bf16 for f32 files
    /// on a GPU].
    #[arg(long)]
    pub dtype: Option<DType>,
    /// Causal mask (bottom-right aligned when seqlen_q != seqlen_k).
    #[arg(long)]
    pub causal: bool,
    /// Sliding window LEFT,RIGHT in tokens; -1 for unbounded.
    #[arg(long, value_parser = parse_window, allow_hyphen_values = true)]
    pub window: Option<(Option<usize>, Option<usize>)>,
    /// Soft cap of the scores: cap * tanh(score / cap).
    #[arg(long, allow_negative_numbers = true)]
    pub softcap: Option<f32>,
    /// Bit-for-bit reproducible backward (GPU: dQ added in a fixed order; the CPU's always is).
    #[arg(long)]
    pub deterministic: bool,
    /// Softmax scale [default: 1/sqrt(head_dim)].
    #[arg(long, allow_negative_numbers = true)]
    pub scale: Option<f32>,
    /// ALiBi slopes (.npy, heads_q or batch x heads_q values).
    #[arg(long)]
    pub alibi: Option<PathBuf>,
    /// Cumulative query offsets of a variable-length batch (.npy, int32, batch + 1 values).
    #[arg(long, requires = "cu_seqlens_k")]
    pub cu_seqlens_q: Option<PathBuf>,
    /// Cumulative key offsets of a variable-length batch (.npy, int32, batch + 1 values).
    #[arg(long, requires = "cu_seqlens_q")]
    pub cu_seqlens_k: Option<PathBuf>,
    /// Implementation.
    #[arg(long = "impl", value_enum, default_value = "flash")]
    pub implementation: Impl,
    /// Where flash attention runs: auto (a CUDA GPU when one can be used, else the CPU), cpu, cuda or cuda:N.
    /// GPUs compute in f16 or bf16.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// CPU instruction set for flash attention [default: the fastest this CPU has].
    #[arg(long)]
    pub cpu_isa: Option<Isa>,
}

/// "LEFT,RIGHT" with -1 meaning unbounded.
fn parse_window(s: &str) -> Result<(Option<usize>, Option<usize>), String> {
    let side = |x: &str| -> Result<Option<usize>, String> {
        match x.trim().parse::<i64>() {
            Ok(-1) => Ok(None),
            Ok(n) if n >= 0 => Ok(Some(n as usize)),
            _ => Err(format!("expected LEFT,RIGHT with non-negative integers or -1 (unbounded), got '{s}'")),
        }
    };
    match s.split_once(',') {
        Some((l, r)) => Ok((side(l)?, side(r)?)),
        None => Err(format!("expected LEFT,RIGHT (e.g. 128,0), got '{s}'")),
    }
}

pub fn run(args: &RunArgs) -> Result<(), String> {
    let target = Target::resolve(&args.device, args.cpu_isa)?;
    let wants_grads = args.dq.is_some() || args.dk.is_some() || args.dv.is_some();
    match (&args.dout, wants_grads) {
        (Some(_), false) => {
            return Err("--dout runs the backward pass: name at least one of --dq, --dk, --dv to write".into())
        }
        (None, true) => return Err("--dq/--dk/--dv need --dout, the gradient of the output".into()),
        _ => {}
    }
    let backend = match args.implementation {
        Impl::Reference => Backend::Reference,
        Impl::Flash => target.backend(),
    };
    let q = npy::read_floats(&args.q)?;
    let k = npy::read_floats(&args.k)?;
    let v = npy::read_floats(&args.v)?;
    let dout = args.dout.as_deref().map(npy::read_floats).transpose()?;
    let mut opts = AttnOptions::new().causal(args.causal);
    if let Some((l, r)) = args.window {
        opts = opts.window(l, r);
    }
    opts.deterministic = args.deterministic;
    opts.softcap = args.softcap;
    opts.scale = args.scale;
    if let Some(path) = &args.alibi {
        opts.alibi_slopes = Some(npy::read_floats(path)?.data);
    }
    if let (Some(cq), Some(ck)) = (&args.cu_seqlens_q, &args.cu_seqlens_k) {
        opts = opts.varlen(npy::read_offsets(cq)?, npy::read_offsets(ck)?);
    }
    let on_gpu = matches!(backend, Backend::Cuda(_));
    let dtype = args.dtype.unwrap_or(match (q.stored_as, on_gpu) {
        ("f16", _) => DType::F16,
        (_, true) => DType::BF16,
        _ => DType::F32,
    });
    let inputs = Inputs { q, k, v, dout };
    match dtype {
        DType::F32 => compute::<f32>(args, &inputs, &opts, backend),
        DType::F16 => compute::<f16>(args, &inputs, &opts, backend),
        DType::BF16 => compute::<bf16>(args, &inputs, &opts, backend),
    }
}

struct Inputs {
    q: Array,
    k: Array,
    v: Array,
    dout: Option<Array>,
}

fn convert<T: Element>(a: &Array) -> Vec<T> {
    a.data.iter().map(|&x| T::from_f32(x)).collect()
}

fn write<T: Element>(path: &Path, data: &[T], shape: &[usize]) -> Result<(), String> {
    npy::write_f32(path, &data.iter().map(|x| x.to_f32()).collect::<Vec<_>>(), shape)
}

fn compute<T: Element>(args: &RunArgs, inp: &Inputs, opts: &AttnOptions, backend: Backend) -> Result<(), String> {
    let (qd, kd, vd) = (convert::<T>(&inp.q), convert::<T>(&inp.k), convert::<T>(&inp.v));
    let (q, k, v) =
        (TensorRef::new(&qd, &inp.q.shape), TensorRef::new(&kd, &inp.k.shape), TensorRef::new(&vd, &inp.v.shape));
    let fwd = flashattn::forward(&q, &k, &v, opts, backend).map_err(|e| e.to_string())?;
    write(&args.out, &fwd.out, &fwd.out_shape)?;
    if let Some(path) = &args.lse {
        npy::write_f32(path, &fwd.lse, &fwd.lse_shape)?;
    }
    if let Some(dout) = &inp.dout {
        let dd = convert::<T>(dout);
        let dout = TensorRef::new(&dd, &dout.shape);
        let g = flashattn::backward(&q, &k, &v, &fwd.out_ref(), &fwd.lse, &dout, opts, backend)
            .map_err(|e| e.to_string())?;
        for (path, data, shape) in
            [(&args.dq, &g.dq, &g.dq_shape), (&args.dk, &g.dk, &g.dkv_shape), (&args.dv, &g.dv, &g.dkv_shape)]
        {
            if let Some(path) = path {
                write(path, data, shape)?;
            }
        }
    }
    Ok(())
}
