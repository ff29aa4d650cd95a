//! Linformer and Performer on the GPU: the matrix products on cuBLAS (f32, strided-batched over heads), the
//! row-wise steps in small kernels (approx.cu). Working tensors are f32 and head-major, (heads, rows, d),
//! with the key/value heads of grouped-query attention repeated per query head (their gradients summed back).
//! Causal Performer runs in chunks of CHUNK rows: exact masked products inside a chunk, exclusive prefix sums of
//! the key states across chunks (queries and keys aligned: seqlen_q = seqlen_k).
//!
//! Built on `crate::cuda` (its GPU, tensors, checks and auxiliary modules), which knows nothing of this module.

use super::{linformer::Projections, performer, Method, Projection};
use crate::cuda::{driver_err, owned_aligned, owned_like_q, owned_output, strides3, DeviceTensor, Gpu};
use crate::dtype::Element;
use crate::error::{AttnError, Result};
use crate::problem::{AttnOptions, Plan};
use crate::tensor::{Qkv, TensorRef};
use cudarc::cublas::{sys::cublasOperation_t as Op, CudaBlas, Gemm, GemmConfig, StridedBatchedConfig};
use cudarc::driver::{CudaModule, CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// The kernels' source, compiled as the auxiliary module "approx" (listed for `cuda::check_kernels` in lib.rs).
pub(crate) const SOURCE: &str = include_str!("approx.cu");
/// Rows of a causal chunk.
const CHUNK: usize = 64;

/// A row-major matrix operand of a batched product: buffer, leading dimension, stride between batch items, and
/// whether the product uses its transpose.
#[derive(Clone, Copy)]
struct Mat<'a> {
    buf: &'a CudaSlice<f32>,
    ld: usize,
    stride: usize,
    t: bool,
}

fn mat(buf: &CudaSlice<f32>, ld: usize, stride: usize) -> Mat<'_> {
    Mat { buf, ld, stride, t: false }
}

fn mat_t(buf: &CudaSlice<f32>, ld: usize, stride: usize) -> Mat<'_> {
    Mat { buf, ld, stride, t: true }
}

/// A kernel argument.
enum Arg {
    Ptr(u64),
    I64(i64),
    I32(i32),
    F32(f32),
}

/// One call's device state: cuBLAS, the kernels, and the working shape.
struct Ctx<'g> {
    gpu: &'g Gpu,
    blas: &'g CudaBlas,
    module: Arc<CudaModule>,
    plan: &'g Plan,
    /// Working heads (batch * heads_q), padded rows per head of queries and of keys, head dim.
    heads: usize,
    pq: usize,
    pk: usize,
    d: usize,
    /// Bytes of the device buffers this call allocated or used from the projection cache: all live until the
    /// call ends, bar a few intermediates, so their sum bounds the call's peak from above.
    bytes: std::cell::Cell<usize>,
}

impl<'g> Ctx<'g> {
    fn new(gpu: &'g Gpu, plan: &'g Plan, pad: usize) -> Result<Self> {
        let blas = gpu.blas()?;
        let module = gpu.aux_module("approx", SOURCE, plan.dtype())?;
        let round = |n: usize| n.div_ceil(pad) * pad;
        Ok(Ctx {
            gpu,
            blas,
            module,
            plan,
            heads: plan.batch * plan.heads_q,
            pq: round(plan.len_q[0]),
            pk: round(plan.len_k[0]),
            d: plan.head_dim,
            bytes: Default::default(),
        })
    }

    fn count(&self, elements: usize) {
        self.bytes.set(self.bytes.get() + elements * std::mem::size_of::<f32>());
    }

    fn zeros(&self, n: usize) -> Result<CudaSlice<f32>> {
        self.count(n);
        self.gpu.zeros_f32(n)
    }

    fn upload(&self, host: &[f32]) -> Result<CudaSlice<f32>> {
        self.count(host.len());
        self.gpu.stream.clone_htod(host).map_err(driver_err("copying to the GPU"))
    }

    /// Records the call's device bytes as the GPU's last workspace.
    fn finish(&self) {
        self.gpu.workspace.store(self.bytes.get(), std::sync::atomic::Ordering::Relaxed);
    }

    fn ptr(&self, b: &CudaSlice<f32>) -> Arg {
        Arg::Ptr(b.device_ptr(&self.gpu.stream).0)
    }

    /// Row-major C (m x n) = op(A) op(B) (+ C when `accumulate`), `batch` times. cuBLAS is column-major: it
    /// computes C^T = op(B)^T op(A)^T from the same memory.
    #[allow(clippy::too_many_arguments)]
    fn mm(
        &self,
        (m, n, k): (usize, usize, usize),
        a: Mat,
        b: Mat,
        c: &mut CudaSlice<f32>,
        (ldc, sc): (usize, usize),
        batch: usize,
        accumulate: bool,
    ) -> Result<()> {
        let op = |t: bool| if t { Op::CUBLAS_OP_T } else { Op::CUBLAS_OP_N };
        let cfg = StridedBatchedConfig {
            gemm: GemmConfig {
                transa: op(b.t),
                transb: op(a.t),
                m: n as i32,
                n: m as i32,
                k: k as i32,
                alpha: 1.0f32,
                lda: b.ld as i32,
                ldb: a.ld as i32,
                beta: if accumulate { 1.0 } else { 0.0 },
                ldc: ldc as i32,
            },
            batch_size: batch as i32,
            stride_a: b.stride as i64,
            stride_b: a.stride as i64,
            stride_c: sc as i64,
        };
        // SAFETY: every operand was allocated for the extents and strides the callers pass.
        unsafe { self.blas.gemm_strided_batched(cfg, b.buf, a.buf, c) }
            .map_err(|e| AttnError::Cuda(format!("cuBLAS: {e:?}")))
    }

    fn launch(&self, name: &str, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
        let f = self.module.load_function(name).map_err(driver_err("finding an approximation kernel"))?;
        let mut l = self.gpu.stream.launch_builder(&f);
        for a in args {
            match a {
                Arg::Ptr(p) => l.arg(p),
                Arg::I64(v) => l.arg(v),
                Arg::I32(v) => l.arg(v),
                Arg::F32(v) => l.arg(v),
            };
        }
        // SAFETY: the call sites pass the kernels' argument lists; buffers hold the extents passed.
        unsafe { l.launch(cfg) }.map_err(driver_err("launching an approximation kernel"))?;
        Ok(())
    }

    /// A grid-stride kernel over `n` elements.
    fn each(n: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (n.div_ceil(256).clamp(1, 65535) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// A warp-per-row kernel over `rows` rows.
    fn rows(rows: usize) -> LaunchConfig {
        LaunchConfig { grid_dim: (rows.div_ceil(8).max(1) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
    }

    /// (batch, seq, heads_src, d) 16-bit -> (heads, prows, d) f32, query head h reading source head h / group;
    /// padding rows are zero.
    fn read_heads(&self, t: &DeviceTensor, seq: usize, prows: usize, group: usize) -> Result<CudaSlice<f32>> {
        let out = self.zeros(self.heads * prows * self.d)?;
        let (sb, ss, sh) = strides3(&t.strides);
        let p = self.plan;
        let args = [
            Arg::Ptr(t.ptr(&self.gpu.stream)),
            Arg::I64(sb),
            Arg::I64(ss),
            Arg::I64(sh),
            self.ptr(&out),
            Arg::I32(p.batch as i32),
            Arg::I32(seq as i32),
            Arg::I32(prows as i32),
            Arg::I32(p.heads_q as i32),
            Arg::I32(group as i32),
            Arg::I32(self.d as i32),
        ];
        self.launch("heads_to_f32", Self::each(self.heads * prows * self.d), &args)?;
        Ok(out)
    }

    /// (heads, prows, d) f32 -> `dst` (batch, seq, heads / group, d) 16-bit, summing each group of heads.
    fn write_heads(
        &self,
        src: &CudaSlice<f32>,
        dst: &mut DeviceTensor,
        seq: usize,
        prows: usize,
        group: usize,
    ) -> Result<()> {
        let (db, ds, dh) = strides3(&dst.strides);
        let p = self.plan;
        let heads = p.heads_q / group;
        let args = [
            self.ptr(src),
            Arg::Ptr(dst.ptr_mut(&self.gpu.stream)),
            Arg::I64(db),
            Arg::I64(ds),
            Arg::I64(dh),
            Arg::I32(p.batch as i32),
            Arg::I32(seq as i32),
            Arg::I32(prows as i32),
            Arg::I32(heads as i32),
            Arg::I32(group as i32),
            Arg::I32(self.d as i32),
        ];
        self.launch("heads_from_f32", Self::each(p.batch * seq * heads * self.d), &args)
    }
}

/// The f32 working copies of the inputs.
struct Inputs {
    q: CudaSlice<f32>,
    k: CudaSlice<f32>,
    v: CudaSlice<f32>,
    dout: Option<CudaSlice<f32>>,
}

/// What one pass produces, f32 and head-major: the output, or dq and (per query head) dk, dv.
enum Produced {
    Out(CudaSlice<f32>),
    Grads(CudaSlice<f32>, CudaSlice<f32>, CudaSlice<f32>),
}

impl Gpu {
    /// Approximate attention forward on device tensors into `out` (q's shape, contiguous).
    pub fn approx_forward(
        &self,
        (q, k, v): (&DeviceTensor, &DeviceTensor, &DeviceTensor),
        opts: &AttnOptions,
        method: &Method,
        out: &mut DeviceTensor,
    ) -> Result<()> {
        let plan = self.approx_plan(q, k, v, opts, method)?;
        owned_output("out", out, plan.q_shape(), plan.dtype())?;
        let ctx = Ctx::new(self, &plan, if plan.mask.causal { CHUNK } else { 1 })?;
        let inp = self.approx_inputs(&ctx, (q, k, v), None)?;
        let produced = run(&ctx, &inp, method)?;
        ctx.finish();
        match produced {
            Produced::Out(o) => ctx.write_heads(&o, out, plan.len_q[0], ctx.pq, 1),
            Produced::Grads(..) => unreachable!("no gradient was asked for"),
        }
    }

    /// Approximate attention backward on device tensors (the forward is recomputed): dq (q's shape), dk, dv.
    pub fn approx_backward(
        &self,
        (q, k, v): (&DeviceTensor, &DeviceTensor, &DeviceTensor),
        dout: &DeviceTensor,
        opts: &AttnOptions,
        method: &Method,
        (dq, dk, dv): (&mut DeviceTensor, &mut DeviceTensor, &mut DeviceTensor),
    ) -> Result<()> {
        let plan = self.approx_plan(q, k, v, opts, method)?;
        owned_like_q(&plan, "dout", dout)?;
        owned_output("dq", dq, plan.q_shape(), plan.dtype())?;
        owned_output("dk", dk, plan.kv_shape(), plan.dtype())?;
        owned_output("dv", dv, plan.kv_shape(), plan.dtype())?;
        let ctx = Ctx::new(self, &plan, if plan.mask.causal { CHUNK } else { 1 })?;
        let inp = self.approx_inputs(&ctx, (q, k, v), Some(dout))?;
        let produced = run(&ctx, &inp, method)?;
        ctx.finish();
        match produced {
            Produced::Grads(gq, gk, gv) => {
                let group = plan.group();
                ctx.write_heads(&gq, dq, plan.len_q[0], ctx.pq, 1)?;
                ctx.write_heads(&gk, dk, plan.len_k[0], ctx.pk, group)?;
                ctx.write_heads(&gv, dv, plan.len_k[0], ctx.pk, group)
            }
            Produced::Out(_) => unreachable!("a gradient was asked for"),
        }
    }

    fn approx_plan(
        &self,
        q: &DeviceTensor,
        k: &DeviceTensor,
        v: &DeviceTensor,
        opts: &AttnOptions,
        method: &Method,
    ) -> Result<Plan> {
        for (name, t) in [("k", k), ("v", v)] {
            if t.dtype != q.dtype {
                return Err(AttnError::Unsupported {
                    what: format!("{name} in {}", t.dtype),
                    why: format!("q is {}", q.dtype),
                });
            }
        }
        let plan = super::plan(q, k, v, opts, method, q.dtype)?;
        for (name, t) in [("q", q), ("k", k), ("v", v)] {
            owned_aligned(name, t)?;
        }
        if plan.mask.causal && plan.len_q[0] != plan.len_k[0] {
            return Err(AttnError::Unsupported {
                what: format!(
                    "causal {method} on CUDA with seqlen_q = {} != seqlen_k = {}",
                    plan.len_q[0], plan.len_k[0]
                ),
                why: "the chunked prefix sums align query and key chunks (the CPU takes any lengths)".into(),
            });
        }
        Ok(plan)
    }

    fn approx_inputs(
        &self,
        ctx: &Ctx,
        (q, k, v): (&DeviceTensor, &DeviceTensor, &DeviceTensor),
        dout: Option<&DeviceTensor>,
    ) -> Result<Inputs> {
        let (sq, sk, g) = (ctx.plan.len_q[0], ctx.plan.len_k[0], ctx.plan.group());
        Ok(Inputs {
            q: ctx.read_heads(q, sq, ctx.pq, 1)?,
            k: ctx.read_heads(k, sk, ctx.pk, g)?,
            v: ctx.read_heads(v, sk, ctx.pk, g)?,
            dout: dout.map(|t| ctx.read_heads(t, sq, ctx.pq, 1)).transpose()?,
        })
    }
}

/// Approximate attention forward on host tensors: uploads, runs, downloads.
pub(crate) fn approx_forward_host<T: Element>(
    ordinal: usize,
    (q, k, v): Qkv<T>,
    opts: &AttnOptions,
    method: &Method,
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
    method: &Method,
) -> Result<(Vec<T>, Vec<T>, Vec<T>)> {
    let gpu = Gpu::open(ordinal)?;
    let (gq, gk, gv, gd) = (gpu.upload(q)?, gpu.upload(k)?, gpu.upload(v)?, gpu.upload(dout)?);
    let (mut dq, mut dk, mut dv) =
        (gpu.zeros(T::DTYPE, &q.shape)?, gpu.zeros(T::DTYPE, &k.shape)?, gpu.zeros(T::DTYPE, &k.shape)?);
    gpu.approx_backward((&gq, &gk, &gv), &gd, opts, method, (&mut dq, &mut dk, &mut dv))?;
    Ok((gpu.download(&dq)?, gpu.download(&dk)?, gpu.download(&dv)?))
}

/// Linformer's projections on the device, with what they were drawn for.
struct CachedProjections {
    key: (usize, usize, Projection, u64),
    ef: Arc<[CudaSlice<f32>; 2]>,
}

/// The last projections uploaded to each GPU, by ordinal: drawn once, not per call. GPUs are opened once per
/// process and never closed, so an entry lives as long as its GPU.
fn projection_cache() -> &'static Mutex<HashMap<usize, CachedProjections>> {
    static CACHE: OnceLock<Mutex<HashMap<usize, CachedProjections>>> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

/// E and F for (k, seqlen_k, kind, seed): from the GPU's one-entry cache, or drawn and uploaded.
fn projections(c: &Ctx, k: usize, projection: Projection, seed: u64) -> Result<Arc<[CudaSlice<f32>; 2]>> {
    let key = (k, c.plan.len_k[0], projection, seed);
    c.count(2 * k * key.1);
    let mut cache = projection_cache().lock().unwrap();
    if let Some(p) = cache.get(&c.gpu.ordinal).filter(|p| p.key == key) {
        return Ok(p.ef.clone());
    }
    let host = Projections::<f32>::new(k, key.1, projection, seed);
    let upload = |h: &[f32]| c.gpu.stream.clone_htod(h).map_err(driver_err("copying to the GPU"));
    let ef = Arc::new([upload(&host.e)?, upload(&host.f)?]);
    cache.insert(c.gpu.ordinal, CachedProjections { key, ef: ef.clone() });
    Ok(ef)
}

fn run(ctx: &Ctx, inp: &Inputs, method: &Method) -> Result<Produced> {
    match *method {
        Method::Linformer { k, projection, seed } => {
            let [e, f] = &*projections(ctx, k, projection, seed)?;
            linformer(ctx, inp, (e, f), k)
        }
        Method::Performer { features, seed } => {
            let root = ctx.plan.scale().sqrt();
            let w: Vec<f32> = performer::features::<f32>(features, ctx.d, seed).iter().map(|x| x * root).collect();
            if ctx.plan.mask.causal {
                performer_causal(ctx, inp, &ctx.upload(&w)?, features)
            } else {
                performer_full(ctx, inp, &ctx.upload(&w)?, features)
            }
        }
    }
}

/// O = softmax(s Q (E K)^T) (F V), and its gradients; E and F are r x seqlen_k.
fn linformer(c: &Ctx, inp: &Inputs, (e, f): (&CudaSlice<f32>, &CudaSlice<f32>), r: usize) -> Result<Produced> {
    let (nh, d, sq, sk) = (c.heads, c.d, c.pq, c.pk);
    let scale = c.plan.scale();
    let mut kp = c.zeros(nh * r * d)?;
    let mut vp = c.zeros(nh * r * d)?;
    c.mm((r, d, sk), mat(e, sk, 0), mat(&inp.k, d, sk * d), &mut kp, (d, r * d), nh, false)?;
    c.mm((r, d, sk), mat(f, sk, 0), mat(&inp.v, d, sk * d), &mut vp, (d, r * d), nh, false)?;
    let mut p = c.zeros(nh * sq * r)?;
    c.mm((sq, r, d), mat(&inp.q, d, sq * d), mat_t(&kp, d, r * d), &mut p, (r, sq * r), nh, false)?;
    c.launch(
        "softmax_rows",
        Ctx::rows(nh * sq),
        &[c.ptr(&p), Arg::I64((nh * sq) as i64), Arg::I32(r as i32), Arg::F32(scale)],
    )?;
    let Some(dout) = &inp.dout else {
        let mut o = c.zeros(nh * sq * d)?;
        c.mm((sq, d, r), mat(&p, r, sq * r), mat(&vp, d, r * d), &mut o, (d, sq * d), nh, false)?;
        return Ok(Produced::Out(o));
    };
    // dV' = P^T dO, dP = dO V'^T, dS = s P (dP - rowsum(P dP)), dQ = dS K', dK' = dS^T Q, dK = E^T dK'.
    let mut dvp = c.zeros(nh * r * d)?;
    c.mm((r, d, sq), mat_t(&p, r, sq * r), mat(dout, d, sq * d), &mut dvp, (d, r * d), nh, false)?;
    let mut ds = c.zeros(nh * sq * r)?;
    c.mm((sq, r, d), mat(dout, d, sq * d), mat_t(&vp, d, r * d), &mut ds, (r, sq * r), nh, false)?;
    c.launch(
        "softmax_grad_rows",
        Ctx::rows(nh * sq),
        &[c.ptr(&p), c.ptr(&ds), Arg::I64((nh * sq) as i64), Arg::I32(r as i32), Arg::F32(scale)],
    )?;
    let mut dq = c.zeros(nh * sq * d)?;
    c.mm((sq, d, r), mat(&ds, r, sq * r), mat(&kp, d, r * d), &mut dq, (d, sq * d), nh, false)?;
    let mut dkp = c.zeros(nh * r * d)?;
    c.mm((r, d, sq), mat_t(&ds, r, sq * r), mat(&inp.q, d, sq * d), &mut dkp, (d, r * d), nh, false)?;
    let mut dk = c.zeros(nh * sk * d)?;
    let mut dv = c.zeros(nh * sk * d)?;
    c.mm((sk, d, r), mat_t(e, sk, 0), mat(&dkp, d, r * d), &mut dk, (d, sk * d), nh, false)?;
    c.mm((sk, d, r), mat_t(f, sk, 0), mat(&dvp, d, r * d), &mut dv, (d, sk * d), nh, false)?;
    Ok(Produced::Grads(dq, dk, dv))
}

/// phi(X) for the rows of `x` ((heads, prows, d)), the stabilizer a max per row (queries) or per head (keys);
/// padding rows are zero.
fn features(
    c: &Ctx,
    x: &CudaSlice<f32>,
    prows: usize,
    valid: usize,
    w: &CudaSlice<f32>,
    m: usize,
    per_row: bool,
) -> Result<CudaSlice<f32>> {
    let (nh, d) = (c.heads, c.d);
    let rows = nh * prows;
    let mut a = c.zeros(rows * m)?;
    c.mm((prows, m, d), mat(x, d, prows * d), mat_t(w, d, 0), &mut a, (m, prows * m), nh, false)?;
    let rowmax = c.zeros(rows)?;
    c.launch(
        "feature_prep",
        Ctx::rows(rows),
        &[
            c.ptr(&a),
            c.ptr(x),
            Arg::I64(rows as i64),
            Arg::I32(m as i32),
            Arg::I32(d as i32),
            Arg::F32(c.plan.scale()),
            c.ptr(&rowmax),
        ],
    )?;
    let group = if per_row {
        None
    } else {
        let gm = c.zeros(nh)?;
        let cfg = LaunchConfig { grid_dim: (nh as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        c.launch("group_max", cfg, &[c.ptr(&rowmax), Arg::I32(prows as i32), Arg::I32(valid as i32), c.ptr(&gm)])?;
        Some(gm)
    };
    let norm = 1.0 / (m as f32).sqrt();
    let gptr = group.as_ref().map_or(Arg::Ptr(0), |g| c.ptr(g));
    c.launch(
        "feature_exp",
        Ctx::each(rows * m),
        &[
            c.ptr(&a),
            Arg::I64(rows as i64),
            Arg::I32(m as i32),
            c.ptr(&rowmax),
            gptr,
            Arg::I32(prows as i32),
            Arg::I32(valid as i32),
            Arg::F32(norm),
        ],
    )?;
    Ok(a)
}

/// Back through phi: dX = (dphi o phi) W' - scale X rowsum(dphi o phi).
fn feature_grad(
    c: &Ctx,
    phi: &CudaSlice<f32>,
    dphi: CudaSlice<f32>,
    x: &CudaSlice<f32>,
    prows: usize,
    w: &CudaSlice<f32>,
    m: usize,
) -> Result<CudaSlice<f32>> {
    let (nh, d) = (c.heads, c.d);
    let rows = nh * prows;
    let rowsum = c.zeros(rows)?;
    c.launch(
        "feature_grad_prep",
        Ctx::rows(rows),
        &[c.ptr(phi), c.ptr(&dphi), c.ptr(&rowsum), Arg::I64(rows as i64), Arg::I32(m as i32)],
    )?;
    let mut dx = c.zeros(rows * d)?;
    c.mm((prows, d, m), mat(&dphi, m, prows * m), mat(w, d, 0), &mut dx, (d, prows * d), nh, false)?;
    c.launch(
        "feature_grad_finish",
        Ctx::each(rows * d),
        &[c.ptr(&dx), c.ptr(x), c.ptr(&rowsum), Arg::I64(rows as i64), Arg::I32(d as i32), Arg::F32(c.plan.scale())],
    )?;
    Ok(dx)
}

/// O = num / den, per row.
fn ratio(c: &Ctx, num: &CudaSlice<f32>, den: &CudaSlice<f32>, rows: usize) -> Result<CudaSlice<f32>> {
    let o = c.zeros(rows * c.d)?;
    c.launch(
        "ratio_rows",
        Ctx::each(rows * c.d),
        &[c.ptr(num), c.ptr(den), c.ptr(&o), Arg::I64(rows as i64), Arg::I32(c.d as i32)],
    )?;
    Ok(o)
}

/// Through O = num / den: dnum = dO / den and dden = -(dO . O) / den.
fn ratio_grad(
    c: &Ctx,
    dout: &CudaSlice<f32>,
    o: &CudaSlice<f32>,
    den: &CudaSlice<f32>,
    rows: usize,
) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
    let (dnum, dden) = (c.zeros(rows * c.d)?, c.zeros(rows)?);
    c.launch(
        "ratio_grad",
        Ctx::rows(rows),
        &[c.ptr(dout), c.ptr(o), c.ptr(den), c.ptr(&dnum), c.ptr(&dden), Arg::I64(rows as i64), Arg::I32(c.d as i32)],
    )?;
    Ok((dnum, dden))
}

/// Non-causal Performer: O = phi(Q) (phi(K)^T V) / phi(Q) (phi(K)^T 1), and its gradients.
fn performer_full(c: &Ctx, inp: &Inputs, w: &CudaSlice<f32>, m: usize) -> Result<Produced> {
    let (nh, d, sq, sk) = (c.heads, c.d, c.pq, c.pk);
    let pq = features(c, &inp.q, sq, c.plan.len_q[0], w, m, true)?;
    let pk = features(c, &inp.k, sk, c.plan.len_k[0], w, m, false)?;
    let ones = c.upload(&vec![1.0f32; sq.max(sk)])?;
    let mut kv = c.zeros(nh * m * d)?;
    c.mm((m, d, sk), mat_t(&pk, m, sk * m), mat(&inp.v, d, sk * d), &mut kv, (d, m * d), nh, false)?;
    let mut z = c.zeros(nh * m)?;
    c.mm((m, 1, sk), mat_t(&pk, m, sk * m), mat(&ones, 1, 0), &mut z, (1, m), nh, false)?;
    let mut num = c.zeros(nh * sq * d)?;
    c.mm((sq, d, m), mat(&pq, m, sq * m), mat(&kv, d, m * d), &mut num, (d, sq * d), nh, false)?;
    let mut den = c.zeros(nh * sq)?;
    c.mm((sq, 1, m), mat(&pq, m, sq * m), mat(&z, 1, m), &mut den, (1, sq), nh, false)?;
    let o = ratio(c, &num, &den, nh * sq)?;
    let Some(dout) = &inp.dout else { return Ok(Produced::Out(o)) };

    let (dnum, dden) = ratio_grad(c, dout, &o, &den, nh * sq)?;
    // dphiQ = dnum KV^T + dden z^T; dKV = phiQ^T dnum; dz = phiQ^T dden.
    let mut dpq = c.zeros(nh * sq * m)?;
    c.mm((sq, m, d), mat(&dnum, d, sq * d), mat_t(&kv, d, m * d), &mut dpq, (m, sq * m), nh, false)?;
    c.mm((sq, m, 1), mat(&dden, 1, sq), mat(&z, m, m), &mut dpq, (m, sq * m), nh, true)?;
    let mut dkv = c.zeros(nh * m * d)?;
    c.mm((m, d, sq), mat_t(&pq, m, sq * m), mat(&dnum, d, sq * d), &mut dkv, (d, m * d), nh, false)?;
    let mut dz = c.zeros(nh * m)?;
    c.mm((m, 1, sq), mat_t(&pq, m, sq * m), mat(&dden, 1, sq), &mut dz, (1, m), nh, false)?;
    // dphiK = V dKV^T + 1 dz^T; dV = phiK dKV.
    let mut dpk = c.zeros(nh * sk * m)?;
    c.mm((sk, m, d), mat(&inp.v, d, sk * d), mat_t(&dkv, d, m * d), &mut dpk, (m, sk * m), nh, false)?;
    c.mm((sk, m, 1), mat(&ones, 1, 0), mat(&dz, m, m), &mut dpk, (m, sk * m), nh, true)?;
    let mut dv = c.zeros(nh * sk * d)?;
    c.mm((sk, d, m), mat(&pk, m, sk * m), mat(&dkv, d, m * d), &mut dv, (d, sk * d), nh, false)?;
    let dq = feature_grad(c, &pq, dpq, &inp.q, sq, w, m)?;
    let dk = feature_grad(c, &pk, dpk, &inp.k, sk, w, m)?;
    Ok(Produced::Grads(dq, dk, dv))
}

/// Causal Performer in chunks of CHUNK rows (query chunk i sees key chunks before it in full and its own key
/// chunk up to the diagonal): the key states phi(K_c)^T V_c and phi(K_c)^T 1 of every chunk, exclusive prefix
/// sums of them, then per chunk O = (phi(Q_c) S_c + mask(phi(Q_c) phi(K_c)^T) V_c) / (the same with 1 for V).
fn performer_causal(c: &Ctx, inp: &Inputs, w: &CudaSlice<f32>, m: usize) -> Result<Produced> {
    let (d, n) = (c.d, c.pq);
    let chunks = n / CHUNK;
    let nb = c.heads * chunks;
    let pq = features(c, &inp.q, n, c.plan.len_q[0], w, m, true)?;
    let pk = features(c, &inp.k, n, c.plan.len_k[0], w, m, false)?;
    let ones = c.upload(&vec![1.0f32; CHUNK])?;
    let scan = |s: &CudaSlice<f32>, elems: usize, reverse: bool| {
        c.launch(
            "exclusive_scan_chunks",
            Ctx::each(c.heads * elems),
            &[
                c.ptr(s),
                Arg::I64(c.heads as i64),
                Arg::I32(chunks as i32),
                Arg::I64(elems as i64),
                Arg::I32(reverse as i32),
            ],
        )
    };
    // Chunk-strided operands: rows of a chunk are contiguous, chunks CHUNK rows apart, across all heads.
    let rows_m = |b| mat(b, m, CHUNK * m);
    let rows_d = |b| mat(b, d, CHUNK * d);
    let (cm, cd, cc) = (CHUNK * m, CHUNK * d, CHUNK * CHUNK);
    let mut s = c.zeros(nb * m * d)?;
    c.mm((m, d, CHUNK), mat_t(&pk, m, cm), rows_d(&inp.v), &mut s, (d, m * d), nb, false)?;
    let mut z = c.zeros(nb * m)?;
    c.mm((m, 1, CHUNK), mat_t(&pk, m, cm), mat(&ones, 1, 0), &mut z, (1, m), nb, false)?;
    scan(&s, m * d, false)?;
    scan(&z, m, false)?;
    // The masked intra-chunk scores A_c = phi(Q_c) phi(K_c)^T.
    let mut a = c.zeros(nb * cc)?;
    c.mm((CHUNK, CHUNK, m), rows_m(&pq), mat_t(&pk, m, cm), &mut a, (CHUNK, cc), nb, false)?;
    c.launch("causal_mask_blocks", Ctx::each(nb * cc), &[c.ptr(&a), Arg::I64(nb as i64), Arg::I32(CHUNK as i32)])?;
    let mut num = c.zeros(c.heads * n * d)?;
    c.mm((CHUNK, d, m), rows_m(&pq), mat(&s, d, m * d), &mut num, (d, cd), nb, false)?;
    c.mm((CHUNK, d, CHUNK), mat(&a, CHUNK, cc), rows_d(&inp.v), &mut num, (d, cd), nb, true)?;
    let mut den = c.zeros(c.heads * n)?;
    c.mm((CHUNK, 1, m), rows_m(&pq), mat(&z, 1, m), &mut den, (1, CHUNK), nb, false)?;
    c.mm((CHUNK, 1, CHUNK), mat(&a, CHUNK, cc), mat(&ones, 1, 0), &mut den, (1, CHUNK), nb, true)?;
    let o = ratio(c, &num, &den, c.heads * n)?;
    let Some(dout) = &inp.dout else { return Ok(Produced::Out(o)) };

    let (dnum, dden) = ratio_grad(c, dout, &o, &den, c.heads * n)?;
    // G_c = mask(dnum_c V_c^T + dden_c 1^T): d out_i / d (phi(q_i) . phi(k_j)) inside the chunk.
    let mut g = c.zeros(nb * cc)?;
    c.mm((CHUNK, CHUNK, d), rows_d(&dnum), mat_t(&inp.v, d, cd), &mut g, (CHUNK, cc), nb, false)?;
    c.mm((CHUNK, CHUNK, 1), mat(&dden, 1, CHUNK), mat(&ones, CHUNK, 0), &mut g, (CHUNK, cc), nb, true)?;
    c.launch("causal_mask_blocks", Ctx::each(nb * cc), &[c.ptr(&g), Arg::I64(nb as i64), Arg::I32(CHUNK as i32)])?;
    // dphiQ_c = dnum_c S_c^T + dden_c z_c^T + G_c phi(K_c).
    let mut dpq = c.zeros(c.heads * n * m)?;
    c.mm((CHUNK, m, d), rows_d(&dnum), mat_t(&s, d, m * d), &mut dpq, (m, cm), nb, false)?;
    c.mm((CHUNK, m, 1), mat(&dden, 1, CHUNK), mat(&z, m, m), &mut dpq, (m, cm), nb, true)?;
    c.mm((CHUNK, m, CHUNK), mat(&g, CHUNK, cc), rows_m(&pk), &mut dpq, (m, cm), nb, true)?;
    // Suffix states of the queries: R_c = sum over later chunks of phi(Q)^T dnum, r_c likewise with dden.
    let mut rs = c.zeros(nb * m * d)?;
    c.mm((m, d, CHUNK), mat_t(&pq, m, cm), rows_d(&dnum), &mut rs, (d, m * d), nb, false)?;
    let mut rz = c.zeros(nb * m)?;
    c.mm((m, 1, CHUNK), mat_t(&pq, m, cm), mat(&dden, 1, CHUNK), &mut rz, (1, m), nb, false)?;
    scan(&rs, m * d, true)?;
    scan(&rz, m, true)?;
    // dphiK_c = V_c R_c^T + 1 r_c^T + G_c^T phi(Q_c); dV_c = phi(K_c) R_c + A_c^T dnum_c.
    let mut dpk = c.zeros(c.heads * n * m)?;
    c.mm((CHUNK, m, d), rows_d(&inp.v), mat_t(&rs, d, m * d), &mut dpk, (m, cm), nb, false)?;
    c.mm((CHUNK, m, 1), mat(&ones, 1, 0), mat(&rz, m, m), &mut dpk, (m, cm), nb, true)?;
    c.mm((CHUNK, m, CHUNK), mat_t(&g, CHUNK, cc), rows_m(&pq), &mut dpk, (m, cm), nb, true)?;
    let mut dv = c.zeros(c.heads * n * d)?;
    c.mm((CHUNK, d, m), rows_m(&pk), mat(&rs, d, m * d), &mut dv, (d, cd), nb, false)?;
    c.mm((CHUNK, d, CHUNK), mat_t(&a, CHUNK, cc), rows_d(&dnum), &mut dv, (d, cd), nb, true)?;
    let dq = feature_grad(c, &pq, dpq, &inp.q, n, w, m)?;
    let dk = feature_grad(c, &pk, dpk, &inp.k, n, w, m)?;
    Ok(Produced::Grads(dq, dk, dv))
}
