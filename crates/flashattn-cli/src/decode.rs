//! `flashattn bench --seqlen-q N`: attention of N new queries per sequence against a KV cache of --seqlen tokens
//! (decoding), contiguous or paged (`--paged PAGE_SIZE`, pages in a shuffled order). Each cell reports the
//! median time and the bandwidth achieved (bytes of K and V read per second) beside a device-to-device copy
//! measured in the same run (bytes read and written per second). The caches of successive calls rotate through
//! at least 256 MB, so that no call finds its keys in the GPU's L2 cache.

use crate::bench::{time, BenchArgs};
use crate::device::{Device, Target};
use crate::subject::{Pass, Subject};
use flashattn::{AttnError, AttnOptions, DType, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

/// Bytes the rotating caches (and the copy) span at least: several times a GPU's L2 cache.
const ROTATE_BYTES: usize = 256 << 20;

/// One decode problem.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct DecodeShape {
    pub batch: usize,
    pub seqlen_q: usize,
    pub seqlen_k: usize,
    pub heads_q: usize,
    pub heads_kv: usize,
    pub head_dim: usize,
    /// Tokens per page, or None for a contiguous cache.
    pub page_size: Option<usize>,
    pub causal: bool,
}

impl DecodeShape {
    /// Bytes of K and V one call reads.
    fn kv_bytes(&self, elem: usize) -> usize {
        2 * self.batch * self.seqlen_k * self.heads_kv * self.head_dim * elem
    }
}

/// One measured cell, as printed with --json.
#[derive(Clone, Debug, Serialize)]
struct DecodeMeasurement {
    device: String,
    dtype: String,
    #[serde(flatten)]
    shape: DecodeShape,
    us: f64,
    /// Bytes of K and V read per second, in TB/s.
    tb_per_s: f64,
    /// The device-to-device copy's rate in the same run (bytes read and written per second), TB/s.
    copy_tb_per_s: f64,
    reps: usize,
}

pub fn run(args: &BenchArgs, target: &Target, seqlen_q: usize) -> Result<(), String> {
    let dtype = target.dtype(args.dtype)?;
    let Device::Cuda(ordinal) = target.device else {
        return Err("--seqlen-q times the GPU decode kernels; the CPU's path gathers the cache into a packed batch \
                    and is timed by `bench` itself"
            .into());
    };
    if seqlen_q == 0 || args.seqlen.contains(&0) {
        return Err("--seqlen-q and --seqlen: expected positive lengths".into());
    }
    if args.paged == Some(0) {
        return Err("--paged: expected a positive page size".into());
    }
    let copy = gpu::copy_rate(ordinal).map_err(|e| e.to_string())?;
    let mut shapes = Vec::new();
    for &d in &args.head_dim {
        let heads_q = args.heads.unwrap_or(32);
        for &n in &args.seqlen {
            shapes.push(DecodeShape {
                batch: args.batch.unwrap_or(1),
                seqlen_q,
                seqlen_k: n,
                heads_q,
                heads_kv: args.heads_kv.unwrap_or(heads_q),
                head_dim: d,
                page_size: args.paged,
                causal: args.causal,
            });
        }
    }
    let bar = if args.json { ProgressBar::hidden() } else { ProgressBar::new(shapes.len() as u64) };
    bar.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed}] {msg}").unwrap());
    let mut rows = Vec::new();
    for shape in shapes {
        bar.set_message(format!("batch {} N={}", shape.batch, shape.seqlen_k));
        let mut subject = gpu::decode(ordinal, dtype, shape).map_err(|e| e.to_string())?;
        let t = time(subject.as_mut(), Pass::Forward, args.min_time).map_err(|e| e.to_string())?;
        let m = DecodeMeasurement {
            device: target.label(),
            dtype: dtype.to_string(),
            shape,
            us: t.ms * 1e3,
            tb_per_s: shape.kv_bytes(dtype.size_bytes()) as f64 / (t.ms * 1e-3) / 1e12,
            copy_tb_per_s: copy,
            reps: t.reps,
        };
        if args.json {
            println!("{}", serde_json::to_string(&m).unwrap());
        }
        rows.push(m);
        bar.inc(1);
    }
    bar.finish_and_clear();
    if !args.json {
        println!("{}, {dtype}; device-to-device copy: {copy:.2} TB/s (bytes read and written)", target.label());
        println!(
            "{:>5} {:>6} {:>8} {:>7} {:>5} {:>6} {:>10} {:>8} {:>7}",
            "batch", "seq_q", "seq_k", "heads", "dim", "paged", "time", "K/V TB/s", "of copy"
        );
        for m in &rows {
            let s = &m.shape;
            println!(
                "{:>5} {:>6} {:>8} {:>7} {:>5} {:>6} {:>8.1}us {:>8.2} {:>6.0}%",
                s.batch,
                s.seqlen_q,
                s.seqlen_k,
                format!("{}/{}", s.heads_q, s.heads_kv),
                s.head_dim,
                s.page_size.map_or("-".to_string(), |p| p.to_string()),
                m.us,
                m.tb_per_s,
                100.0 * m.tb_per_s / m.copy_tb_per_s
            );
        }
    }
    Ok(())
}

fn options(shape: &DecodeShape) -> AttnOptions {
    AttnOptions::new().causal(shape.causal)
}

#[cfg(not(feature = "cuda"))]
mod gpu {
    use super::*;
    pub fn copy_rate(_: usize) -> Result<f64> {
        Err(AttnError::Unsupported { what: "GPU decode".into(), why: "this build has no CUDA support".into() })
    }
    pub fn decode(_: usize, _: DType, _: DecodeShape) -> Result<Box<dyn Subject>> {
        Err(AttnError::Unsupported { what: "GPU decode".into(), why: "this build has no CUDA support".into() })
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    use super::*;
    use crate::subject::random_tensor;
    use flashattn::cuda::{CudaSlice, DecodeArgs, DeviceDType, DeviceTensor, DeviceView, Gpu, Workspace};
    use std::sync::Arc;

    /// The device-to-device copy rate of this GPU: bytes read and written per second over ROTATE_BYTES, in TB/s
    /// (median of 20 after a warm-up).
    pub fn copy_rate(ordinal: usize) -> Result<f64> {
        let gpu = Gpu::open(ordinal)?;
        let s = gpu.stream();
        let err = |e: flashattn::cuda::cudarc::driver::DriverError| AttnError::Cuda(e.to_string());
        let src = s.alloc_zeros::<u8>(ROTATE_BYTES).map_err(err)?;
        let mut dst = s.alloc_zeros::<u8>(ROTATE_BYTES).map_err(err)?;
        let mut samples = Vec::new();
        for i in 0..21 {
            gpu.synchronize()?;
            let t = std::time::Instant::now();
            for _ in 0..5 {
                s.memcpy_dtod(&src, &mut dst).map_err(err)?;
            }
            gpu.synchronize()?;
            if i > 0 {
                samples.push(t.elapsed().as_secs_f64() / 5.0);
            }
        }
        samples.sort_by(f64::total_cmp);
        Ok(2.0 * ROTATE_BYTES as f64 / samples[samples.len() / 2] / 1e12)
    }

    /// One set of inputs: q and the caches.
    struct Set {
        q: DeviceTensor,
        k: DeviceTensor,
        v: DeviceTensor,
    }

    struct Decode {
        gpu: Arc<Gpu>,
        shape: DecodeShape,
        sets: Vec<Set>,
        next: usize,
        seqlens: CudaSlice<i32>,
        table: Option<CudaSlice<i32>>,
        max_blocks: usize,
        out: DeviceTensor,
        lse: CudaSlice<f32>,
        /// The workspace's buffer and its address.
        _buffer: Option<CudaSlice<u8>>,
        workspace: Option<Workspace>,
    }

    impl Decode {
        /// Calls `f` with the arguments of a call on input set `i`.
        fn with_args<R>(&self, i: usize, f: impl FnOnce(&DecodeArgs) -> R) -> R {
            let (s, sh, set) = (self.gpu.stream(), &self.shape, &self.sets[i]);
            let (q, k, v, out) = (set.q.view(), set.k.view(), set.v.view(), self.out.view());
            let lse = DeviceView::of_slice(&self.lse, s, DeviceDType::F32, &[sh.batch, sh.heads_q, sh.seqlen_q]);
            let seqlens = DeviceView::of_slice(&self.seqlens, s, DeviceDType::I32, &[sh.batch]);
            let table =
                self.table.as_ref().map(|t| DeviceView::of_slice(t, s, DeviceDType::I32, &[sh.batch, self.max_blocks]));
            let opts = options(sh);
            f(&DecodeArgs {
                q: &q,
                k_cache: &k,
                v_cache: &v,
                cache_seqlens: &seqlens,
                block_table: table.as_ref(),
                new: None,
                out: &out,
                lse: &lse,
                opts: &opts,
                alibi_slopes: None,
                num_splits: 0,
            })
        }

        fn launch(&mut self) -> Result<()> {
            let i = self.next;
            self.next = (i + 1) % self.sets.len();
            self.with_args(i, |args| self.gpu.launch_decode(self.gpu.stream(), args, self.workspace))
        }
    }

    impl Subject for Decode {
        fn run(&mut self, _: Pass) -> Result<()> {
            self.launch()?;
            self.gpu.synchronize()
        }
        fn run_batch(&mut self, _: Pass, reps: usize) -> Result<f64> {
            self.gpu.synchronize()?;
            let t = std::time::Instant::now();
            for _ in 0..reps {
                self.launch()?;
            }
            self.gpu.synchronize()?;
            Ok(t.elapsed().as_secs_f64() / reps as f64)
        }
        fn workspace_bytes(&self) -> Option<usize> {
            Some(self.workspace.map_or(0, |w| w.bytes()))
        }
    }

    /// A decode subject: full caches of random keys and values (enough copies to rotate through ROTATE_BYTES),
    /// the kernels compiled and the workspace allocated before timing.
    pub fn decode(ordinal: usize, dtype: DType, shape: DecodeShape) -> Result<Box<dyn Subject>> {
        let gpu = Gpu::open(ordinal)?;
        let s = gpu.stream().clone();
        let err = |e: flashattn::cuda::cudarc::driver::DriverError| AttnError::Cuda(e.to_string());
        let (b, n, hkv, d) = (shape.batch, shape.seqlen_k, shape.heads_kv, shape.head_dim);
        let (cache_shape, table, max_blocks) = match shape.page_size {
            Some(page) => {
                // Pages in a shuffled order: entry i of the table is page i * P mod count, P a prime not dividing it.
                let max_blocks = n.div_ceil(page);
                let count = b * max_blocks;
                let p = [7919, 7927, 7933].into_iter().find(|p| count % p != 0).unwrap();
                let table: Vec<i32> = (0..count).map(|i| ((i * p) % count) as i32).collect();
                ([count, page, hkv, d], Some(s.clone_htod(&table).map_err(err)?), max_blocks)
            }
            None => ([b, n, hkv, d], None, 1),
        };
        let copies = ROTATE_BYTES.div_ceil(shape.kv_bytes(dtype.size_bytes()).max(1)).clamp(1, 64);
        let q_shape = [b, shape.seqlen_q, shape.heads_q, d];
        let mut sets = Vec::new();
        for i in 0..copies as u64 {
            sets.push(Set {
                q: random_tensor(&gpu, dtype, &q_shape, 3 * i + 1)?,
                k: random_tensor(&gpu, dtype, &cache_shape, 3 * i + 2)?,
                v: random_tensor(&gpu, dtype, &cache_shape, 3 * i + 3)?,
            });
        }
        let mut subject = Decode {
            out: gpu.zeros(dtype, &q_shape)?,
            lse: gpu.zeros_f32(b * shape.heads_q * shape.seqlen_q)?,
            seqlens: s.clone_htod(&vec![n as i32; b]).map_err(err)?,
            gpu: gpu.clone(),
            shape,
            sets,
            next: 0,
            table,
            max_blocks,
            _buffer: None,
            workspace: None,
        };
        let bytes =
            subject.with_args(0, |args| gpu.prepare_decode(args).and_then(|_| gpu.decode_workspace_bytes(args)))?;
        if bytes > 0 {
            let mut buffer = s.alloc_zeros::<u8>(bytes).map_err(err)?;
            subject.workspace = Some(Workspace::of_slice(&mut buffer, &s));
            subject._buffer = Some(buffer);
        }
        subject.run(Pass::Forward)?;
        Ok(Box::new(subject))
    }
}
