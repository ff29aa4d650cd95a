//! `flashattn._core`: the library's forward and backward passes on tensors that Python describes as (address,
//! dtype, shape, element strides). The extension never sees torch: the Python package allocates outputs and
//! workspace with torch's allocator and names torch's current stream, so one wheel serves every torch version.
//!
//! Tensors on the CPU run on the CPU backend (f32, f16, bf16); tensors on a GPU run on the borrowed GPU API on
//! the stream given. Every check of shapes, strides, dtypes and addresses is the library's; its errors become
//! Python exceptions (`ValueError` for bad input, `NotImplementedError` for what no kernel does).

use flashattn::{AttnError, AttnOptions, Backend, Element, TensorRef};
use half::{bf16, f16};
use pyo3::exceptions::{PyMemoryError, PyNotImplementedError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;

/// A tensor as Python describes it: address, dtype name (torch's, without "torch."), shape, element strides.
#[derive(FromPyObject)]
struct Tensor(u64, String, Vec<usize>, Vec<usize>);

impl Tensor {
    fn ptr(&self) -> u64 {
        self.0
    }
    fn dtype(&self) -> &str {
        &self.1
    }
    fn shape(&self) -> &[usize] {
        &self.2
    }
    fn strides(&self) -> &[usize] {
        &self.3
    }

    /// Elements from the first to the last one the shape and strides reach (0 for an empty tensor).
    fn extent(&self) -> Result<usize, AttnError> {
        if self.shape().contains(&0) {
            return Ok(0);
        }
        let overflow = || AttnError::Unsupported { what: "a tensor whose strides overflow".into(), why: "".into() };
        self.shape().iter().zip(self.strides()).try_fold(1usize, |acc, (&n, &s)| {
            (n - 1).checked_mul(s).and_then(|x| x.checked_add(acc)).ok_or_else(overflow)
        })
    }

    /// The byte range the tensor's elements span.
    fn span(&self, elem: usize) -> Result<(u64, u64), AttnError> {
        let bytes = self.extent()? as u64 * elem as u64;
        Ok((self.ptr(), self.ptr() + bytes))
    }
}

/// The options of a call, as a dict from Python.
#[derive(FromPyObject)]
#[pyo3(from_item_all)]
struct Options {
    scale: f32,
    causal: bool,
    /// Window sides in tokens; negative is unbounded.
    window_left: i64,
    window_right: i64,
    /// 0 is off.
    softcap: f32,
    deterministic: bool,
    /// f32 (heads_q) or (batch, heads_q).
    alibi_slopes: Option<Tensor>,
    /// i32 offsets (batch + 1) of a variable-length batch, with the longest sequences' lengths.
    cu_seqlens_q: Option<Tensor>,
    cu_seqlens_k: Option<Tensor>,
    max_seqlen_q: usize,
    max_seqlen_k: usize,
}

impl Options {
    /// The library's options, less the tensors (which each backend takes its own way).
    fn attn(&self) -> AttnOptions {
        let side = |w: i64| usize::try_from(w).ok();
        let opts = AttnOptions::new()
            .causal(self.causal)
            .window(side(self.window_left), side(self.window_right))
            .scale(self.scale)
            .deterministic(self.deterministic);
        if self.softcap != 0.0 {
            opts.softcap(self.softcap)
        } else {
            opts
        }
    }
}

fn to_py(e: AttnError) -> PyErr {
    let msg = e.to_string();
    match e {
        AttnError::Unsupported { .. } => PyNotImplementedError::new_err(msg),
        AttnError::Cuda(_) => PyRuntimeError::new_err(msg),
        AttnError::OutOfMemory { .. } => PyMemoryError::new_err(msg),
        _ => PyValueError::new_err(msg),
    }
}

/// Attention forward: `out` (q's shape, contiguous) and `lse` (f32) written in place. `device` is (GPU
/// ordinal, raw CUstream) for GPU tensors, None for CPU tensors; `alloc(nbytes)` returns a uint8 tensor of
/// workspace on that GPU.
#[pyfunction]
#[pyo3(signature = (q, k, v, out, lse, options, device=None, alloc=None))]
#[allow(clippy::too_many_arguments)]
fn forward(
    py: Python<'_>,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    options: Options,
    device: Option<(usize, usize)>,
    alloc: Option<Bound<'_, PyAny>>,
) -> PyResult<()> {
    match device {
        None => py.detach(|| host::forward(&[&q, &k, &v], &out, &lse, &options)).map_err(to_py),
        #[cfg(feature = "cuda")]
        Some(dev) => gpu::forward(py, dev, [&q, &k, &v], &out, &lse, &options, alloc),
        #[cfg(not(feature = "cuda"))]
        Some(_) => Err(to_py(no_cuda(alloc))),
    }
}

/// Attention backward: `dq` (q's shape), `dk`, `dv` (k's shape), contiguous, written in place.
#[pyfunction]
#[pyo3(signature = (q, k, v, out, lse, dout, dq, dk, dv, options, device=None, alloc=None))]
#[allow(clippy::too_many_arguments)]
fn backward(
    py: Python<'_>,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    dout: Tensor,
    dq: Tensor,
    dk: Tensor,
    dv: Tensor,
    options: Options,
    device: Option<(usize, usize)>,
    alloc: Option<Bound<'_, PyAny>>,
) -> PyResult<()> {
    let inputs = [&q, &k, &v, &out, &lse, &dout];
    let grads = [&dq, &dk, &dv];
    match device {
        None => py.detach(|| host::backward(&inputs, &grads, &options)).map_err(to_py),
        #[cfg(feature = "cuda")]
        Some(dev) => gpu::backward(py, dev, inputs, grads, &options, alloc),
        #[cfg(not(feature = "cuda"))]
        Some(_) => Err(to_py(no_cuda(alloc))),
    }
}

/// Attention of new queries `q` against a KV cache (`k_cache`, `v_cache`, contiguous or paged by `block_table`,
/// int32 `cache_seqlens` tokens each), after appending `new` = (k, v) when given; `out` and `lse` written in
/// place. `num_splits`: 0 lets the library choose (GPU).
#[pyfunction]
#[pyo3(signature = (q, k_cache, v_cache, cache_seqlens, block_table, new, out, lse, options, num_splits, device=None, alloc=None))]
#[allow(clippy::too_many_arguments)]
fn decode(
    py: Python<'_>,
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    block_table: Option<Tensor>,
    new: Option<(Tensor, Tensor)>,
    out: Tensor,
    lse: Tensor,
    options: Options,
    num_splits: usize,
    device: Option<(usize, usize)>,
    alloc: Option<Bound<'_, PyAny>>,
) -> PyResult<()> {
    let cache = Cache { q, k: k_cache, v: v_cache, seqlens: cache_seqlens, table: block_table, new };
    match device {
        None => py.detach(|| host::decode(&cache, &out, &lse, &options)).map_err(to_py),
        #[cfg(feature = "cuda")]
        Some(dev) => gpu::decode(py, dev, &cache, (&out, &lse), &options, num_splits, alloc),
        #[cfg(not(feature = "cuda"))]
        Some(_) => {
            let _ = num_splits;
            Err(to_py(no_cuda(alloc)))
        }
    }
}

/// The inputs of a decode call.
struct Cache {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    seqlens: Tensor,
    table: Option<Tensor>,
    new: Option<(Tensor, Tensor)>,
}

/// Offsets of one side only.
fn one_offset() -> AttnError {
    AttnError::Option {
        option: "cu_seqlens",
        expected: "both cu_seqlens_q and cu_seqlens_k, or neither".into(),
        got: "one of them".into(),
    }
}

#[cfg(not(feature = "cuda"))]
fn no_cuda<T>(_: T) -> AttnError {
    AttnError::Unsupported { what: "CUDA tensors".into(), why: "this build of flashattn has no GPU backend".into() }
}

/// What this machine offers: CPU instruction set, GPUs, NVRTC, the kernel cache.
#[pyfunction]
fn info() -> String {
    let mut lines =
        vec![format!("cpu kernels: {}", flashattn::Isa::detect().map_or_else(|e| e.to_string(), |i| i.to_string()))];
    #[cfg(feature = "cuda")]
    {
        use flashattn::cuda;
        match cuda::device_count() {
            Ok(n) => lines.push(format!("cuda devices: {n}")),
            Err(e) => lines.push(format!("cuda: {e}")),
        }
        lines.push(match cuda::compile::nvrtc_version() {
            Ok((a, b)) => format!("nvrtc: {a}.{b}"),
            Err(e) => format!("nvrtc: {e}"),
        });
        if let Some(dir) = cuda::compile::cache_dir() {
            lines.push(format!("kernel cache: {}", dir.display()));
        }
    }
    lines.join("\n")
}

/// Whether a GPU can run the kernels (a driver, a device and NVRTC).
#[pyfunction]
fn cuda_available() -> bool {
    #[cfg(feature = "cuda")]
    return flashattn::cuda::is_available();
    #[cfg(not(feature = "cuda"))]
    false
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(forward, m)?)?;
    m.add_function(wrap_pyfunction!(backward, m)?)?;
    m.add_function(wrap_pyfunction!(decode, m)?)?;
    m.add_function(wrap_pyfunction!(info, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_available, m)?)?;
    Ok(())
}

/// CPU tensors: slices over torch's host memory, run on the CPU backend.
mod host {
    use super::*;
    use flashattn::DType;

    /// torch's name of an element type.
    fn torch_name(dtype: DType) -> &'static str {
        match dtype {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
        }
    }

    /// That `t` holds `dtype` (a torch name) at an address aligned for it.
    fn check(name: &'static str, t: &Tensor, dtype: &str, elem: usize) -> Result<(), AttnError> {
        if t.dtype() != dtype {
            return Err(AttnError::Unsupported {
                what: format!("{name} in {}", t.dtype()),
                why: format!("this call needs {dtype}"),
            });
        }
        if (t.ptr() == 0 && t.extent()? > 0) || !t.ptr().is_multiple_of(elem as u64) {
            return Err(AttnError::Pointer { tensor: name, problem: format!("{:#x} is no {dtype} array", t.ptr()) });
        }
        Ok(())
    }

    /// The elements a host tensor's shape and strides reach, from its first.
    ///
    /// # Safety
    /// `t` must describe live host memory that nothing writes during the call.
    unsafe fn elements<'a, T>(name: &'static str, t: &'a Tensor, dtype: &str) -> Result<&'a [T], AttnError> {
        check(name, t, dtype, std::mem::size_of::<T>())?;
        Ok(match t.extent()? {
            0 => &[],
            // SAFETY: the caller's guarantee; the address is non-null and aligned (checked).
            len => unsafe { std::slice::from_raw_parts(t.ptr() as *const T, len) },
        })
    }

    /// # Safety
    /// As `elements`.
    unsafe fn view<'a, T: Element>(name: &'static str, t: &'a Tensor) -> Result<TensorRef<'a, T>, AttnError> {
        // SAFETY: the caller's guarantee.
        let data = unsafe { elements::<T>(name, t, torch_name(T::DTYPE)) }?;
        Ok(TensorRef::strided(data, t.shape(), t.strides()))
    }

    /// The elements of a contiguous host tensor.
    ///
    /// # Safety
    /// As `elements`.
    unsafe fn contiguous<'a, T>(name: &'static str, t: &'a Tensor, dtype: &str) -> Result<&'a [T], AttnError> {
        if t.strides() != flashattn::tensor::contiguous_strides(t.shape()) {
            return Err(AttnError::Shape {
                tensor: name,
                expected: "a contiguous tensor".into(),
                got: t.shape().to_vec(),
            });
        }
        // SAFETY: the caller's guarantee.
        unsafe { elements(name, t, dtype) }
    }

    /// A contiguous host output, writable.
    ///
    /// # Safety
    /// As `elements`, and no other slice of the call may overlap it (checked by `disjoint` first).
    #[allow(clippy::mut_from_ref)]
    unsafe fn output<'a, T>(name: &'static str, t: &'a Tensor, dtype: &str) -> Result<&'a mut [T], AttnError> {
        // SAFETY: the caller's guarantee.
        let data = unsafe { contiguous::<T>(name, t, dtype) }?;
        // SAFETY: live host memory that no other slice of the call overlaps.
        Ok(unsafe { std::slice::from_raw_parts_mut(data.as_ptr() as *mut T, data.len()) })
    }

    /// Outputs must overlap neither the inputs nor each other: their slices would alias.
    fn disjoint(
        outputs: &[(&'static str, &Tensor, usize)],
        inputs: &[(&'static str, &Tensor, usize)],
    ) -> Result<(), AttnError> {
        for (i, &(name, o, elem)) in outputs.iter().enumerate() {
            let (a0, a1) = o.span(elem)?;
            for &(other, t, elem) in outputs[..i].iter().chain(inputs) {
                let (b0, b1) = t.span(elem)?;
                if a0 < b1 && b0 < a1 {
                    return Err(AttnError::Overlap { output: name, other });
                }
            }
        }
        Ok(())
    }

    /// The options with host copies of their tensors: sequence offsets and ALiBi slopes.
    fn attn_options(o: &Options) -> Result<AttnOptions, AttnError> {
        let mut opts = o.attn();
        // SAFETY (both blocks): the Python package passes live CPU tensors.
        if let Some(slopes) = &o.alibi_slopes {
            opts = opts.alibi_slopes(unsafe { contiguous::<f32>("alibi_slopes", slopes, "float32") }?.to_vec());
        }
        match (&o.cu_seqlens_q, &o.cu_seqlens_k) {
            (Some(cq), Some(ck)) => {
                let cq = unsafe { contiguous::<i32>("cu_seqlens_q", cq, "int32") }?.to_vec();
                let ck = unsafe { contiguous::<i32>("cu_seqlens_k", ck, "int32") }?.to_vec();
                opts = opts.varlen(cq, ck);
            }
            (None, None) => {}
            _ => return Err(one_offset()),
        }
        Ok(opts)
    }

    fn dtype_of(q: &Tensor) -> Result<DType, AttnError> {
        q.dtype().parse().map_err(|_| AttnError::Unsupported {
            what: format!("q in {}", q.dtype()),
            why: "the CPU backend takes float32, float16 or bfloat16".into(),
        })
    }

    pub(super) fn forward(qkv: &[&Tensor; 3], out: &Tensor, lse: &Tensor, o: &Options) -> Result<(), AttnError> {
        match dtype_of(qkv[0])? {
            DType::F32 => forward_as::<f32>(qkv, out, lse, o),
            DType::F16 => forward_as::<f16>(qkv, out, lse, o),
            DType::BF16 => forward_as::<bf16>(qkv, out, lse, o),
        }
    }

    fn forward_as<T: Element>(
        [q, k, v]: &[&Tensor; 3],
        out: &Tensor,
        lse: &Tensor,
        o: &Options,
    ) -> Result<(), AttnError> {
        let e = std::mem::size_of::<T>();
        disjoint(&[("out", out, e), ("lse", lse, 4)], &[("q", q, e), ("k", k, e), ("v", v, e)])?;
        let opts = attn_options(o)?;
        let t = torch_name(T::DTYPE);
        // SAFETY: the Python package passes live CPU tensors; the outputs overlap nothing (checked above).
        unsafe {
            let (q, k, v) = (view::<T>("q", q)?, view::<T>("k", k)?, view::<T>("v", v)?);
            let (out, lse) = (output::<T>("out", out, t)?, output::<f32>("lse", lse, "float32")?);
            flashattn::forward_into(&q, &k, &v, &opts, Backend::cpu()?, out, lse)
        }
    }

    pub(super) fn decode(c: &Cache, out: &Tensor, lse: &Tensor, o: &Options) -> Result<(), AttnError> {
        match dtype_of(&c.q)? {
            DType::F32 => decode_as::<f32>(c, out, lse, o),
            DType::F16 => decode_as::<f16>(c, out, lse, o),
            DType::BF16 => decode_as::<bf16>(c, out, lse, o),
        }
    }

    fn decode_as<T: Element>(c: &Cache, out: &Tensor, lse: &Tensor, o: &Options) -> Result<(), AttnError> {
        let e = std::mem::size_of::<T>();
        let mut inputs = vec![("q", &c.q, e), ("cache_seqlens", &c.seqlens, 4)];
        inputs.extend(c.table.iter().map(|t| ("block_table", t, 4)));
        inputs.extend(c.new.iter().flat_map(|(k, v)| [("k", k, e), ("v", v, e)]));
        disjoint(&[("out", out, e), ("lse", lse, 4), ("k_cache", &c.k, e), ("v_cache", &c.v, e)], &inputs)?;
        let opts = attn_options(o)?;
        let t = torch_name(T::DTYPE);
        let bad_shape =
            |tensor, expected: String, got: &[usize]| AttnError::Shape { tensor, expected, got: got.to_vec() };
        let shape: [usize; 4] = c.k.shape().try_into().map_err(|_| {
            let layouts = "(batch, capacity, heads_kv, head_dim) or (num_blocks, page_size, heads_kv, head_dim)";
            bad_shape("k_cache", format!("4 dimensions {layouts}"), c.k.shape())
        })?;
        if c.v.shape() != shape {
            return Err(bad_shape("v_cache", format!("k_cache's shape {shape:?}"), c.v.shape()));
        }
        // SAFETY: the Python package passes live CPU tensors; the caches and outputs overlap nothing (checked
        // above), and the caches are written only when new keys and values are given.
        unsafe {
            let q = view::<T>("q", &c.q)?;
            let new = match &c.new {
                Some((k, v)) => Some((view::<T>("k", k)?, view::<T>("v", v)?)),
                None => None,
            };
            let seqlens = contiguous::<i32>("cache_seqlens", &c.seqlens, "int32")?;
            let table = match &c.table {
                Some(tb) => {
                    let max_blocks = tb.shape().get(1).copied().unwrap_or(0);
                    Some(flashattn::BlockTable { pages: contiguous::<i32>("block_table", tb, "int32")?, max_blocks })
                }
                None => None,
            };
            let cache = flashattn::KvCache {
                k: output::<T>("k_cache", &c.k, t)?,
                v: output::<T>("v_cache", &c.v, t)?,
                shape,
                block_table: table,
                seqlens,
            };
            let (out, lse) = (output::<T>("out", out, t)?, output::<f32>("lse", lse, "float32")?);
            let got = flashattn::forward_kvcache(&q, cache, new.as_ref().map(|(k, v)| (k, v)), &opts, Backend::cpu()?)?;
            out.copy_from_slice(&got.out);
            lse.copy_from_slice(&got.lse);
        }
        Ok(())
    }

    pub(super) fn backward(inputs: &[&Tensor; 6], grads: &[&Tensor; 3], o: &Options) -> Result<(), AttnError> {
        match dtype_of(inputs[0])? {
            DType::F32 => backward_as::<f32>(inputs, grads, o),
            DType::F16 => backward_as::<f16>(inputs, grads, o),
            DType::BF16 => backward_as::<bf16>(inputs, grads, o),
        }
    }

    fn backward_as<T: Element>(inputs: &[&Tensor; 6], grads: &[&Tensor; 3], o: &Options) -> Result<(), AttnError> {
        let [q, k, v, out, lse, dout] = *inputs;
        let [dq, dk, dv] = *grads;
        let e = std::mem::size_of::<T>();
        disjoint(
            &[("dq", dq, e), ("dk", dk, e), ("dv", dv, e)],
            &[("q", q, e), ("k", k, e), ("v", v, e), ("out", out, e), ("lse", lse, 4), ("dout", dout, e)],
        )?;
        let opts = attn_options(o)?;
        let t = torch_name(T::DTYPE);
        // SAFETY: as in `forward_as`.
        unsafe {
            let (q, k, v) = (view::<T>("q", q)?, view::<T>("k", k)?, view::<T>("v", v)?);
            let (out, dout) = (view::<T>("out", out)?, view::<T>("dout", dout)?);
            let lse = contiguous::<f32>("lse", lse, "float32")?;
            let grads = (output::<T>("dq", dq, t)?, output::<T>("dk", dk, t)?, output::<T>("dv", dv, t)?);
            flashattn::backward_into(&q, &k, &v, &out, lse, &dout, &opts, Backend::cpu()?, grads)
        }
    }
}

/// GPU tensors: device views on the caller's stream, workspace from the caller's allocator.
#[cfg(feature = "cuda")]
mod gpu {
    use super::*;
    use flashattn::cuda::{
        BackwardArgs, DecodeArgs, DeviceDType, DeviceInputs, DeviceVarLen, DeviceView, ForwardArgs, Gpu, Workspace,
        WorkspaceFrom,
    };

    fn view(name: &str, t: &Tensor) -> Result<DeviceView, AttnError> {
        let dtype = match t.dtype() {
            "float16" => DeviceDType::F16,
            "bfloat16" => DeviceDType::BF16,
            "float32" => DeviceDType::F32,
            "int32" => DeviceDType::I32,
            other => {
                return Err(AttnError::Unsupported {
                    what: format!("{name} in {other} on a GPU"),
                    why: "the GPU kernels take float16 or bfloat16 (float32 log-sum-exp and slopes, int32 offsets)"
                        .into(),
                })
            }
        };
        // SAFETY: every address is checked by the call (device memory of this GPU, covering the view) before use;
        // the Python package keeps the tensors alive while the work is queued (torch's stream-ordered allocator).
        Ok(unsafe { DeviceView::strided(t.ptr(), dtype, t.shape(), t.strides()) })
    }

    /// Views of named tensors, in order.
    fn views<const N: usize>(named: [(&str, &Tensor); N]) -> PyResult<[DeviceView; N]> {
        let mut out = Vec::with_capacity(N);
        for (name, t) in named {
            out.push(view(name, t).map_err(to_py)?);
        }
        Ok(out.try_into().unwrap_or_else(|_| unreachable!("N views of N tensors")))
    }

    /// The device-side inputs' views, kept alive for the call.
    struct Extras {
        alibi: Option<DeviceView>,
        cu: Option<(DeviceView, DeviceView)>,
        max: (usize, usize),
    }

    impl Extras {
        fn new(o: &Options) -> Result<Self, AttnError> {
            let alibi = o.alibi_slopes.as_ref().map(|t| view("alibi_slopes", t)).transpose()?;
            let cu = match (&o.cu_seqlens_q, &o.cu_seqlens_k) {
                (Some(q), Some(k)) => Some((view("cu_seqlens_q", q)?, view("cu_seqlens_k", k)?)),
                (None, None) => None,
                _ => return Err(one_offset()),
            };
            Ok(Extras { alibi, cu, max: (o.max_seqlen_q, o.max_seqlen_k) })
        }

        fn inputs(&self) -> DeviceInputs<'_> {
            DeviceInputs {
                varlen: self.cu.as_ref().map(|(q, k)| DeviceVarLen {
                    cu_seqlens_q: q,
                    cu_seqlens_k: k,
                    max_seqlen_q: self.max.0,
                    max_seqlen_k: self.max.1,
                }),
                alibi_slopes: self.alibi.as_ref(),
            }
        }
    }

    /// Runs `launch` with the caller's allocator (a Python callable taking a byte count and returning a tensor)
    /// as the source of workspace; the tensors it returns are held until the launch is queued, and torch's
    /// stream-ordered allocator keeps their memory from reuse until the queued work has run.
    fn with_allocator<R: Send>(
        py: Python<'_>,
        alloc: Option<Bound<'_, PyAny>>,
        launch: impl FnOnce(WorkspaceFrom) -> Result<R, AttnError> + Send,
    ) -> PyResult<R> {
        let alloc = alloc.map(Bound::unbind);
        let mut held: Vec<Py<PyAny>> = Vec::new();
        let mut allocate = |bytes: usize| -> Result<Workspace, AttnError> {
            let no_alloc = || AttnError::Unsupported {
                what: "a call that needs workspace".into(),
                why: "no allocator was given".into(),
            };
            let alloc = alloc.as_ref().ok_or_else(no_alloc)?;
            Python::attach(|py| {
                let tensor =
                    alloc.call1(py, (bytes,)).map_err(|e| AttnError::Cuda(format!("allocating workspace: {e}")))?;
                let ptr: u64 = tensor
                    .call_method0(py, "data_ptr")
                    .and_then(|p| p.extract(py))
                    .map_err(|e| AttnError::Cuda(format!("allocating workspace: {e}")))?;
                held.push(tensor);
                // SAFETY: a fresh uint8 tensor of `bytes` bytes on the call's device (the call checks it),
                // held until the launch is queued.
                Ok(unsafe { Workspace::from_raw(ptr, bytes) })
            })
        };
        let result = py.detach(|| launch(WorkspaceFrom::Allocator(&mut allocate)));
        drop(held);
        result.map_err(to_py)
    }

    fn open(
        ordinal: usize,
        raw_stream: usize,
    ) -> Result<(std::sync::Arc<Gpu>, std::sync::Arc<flashattn::cuda::CudaStream>), AttnError> {
        let gpu = Gpu::open(ordinal)?;
        // SAFETY: the Python package passes torch's current stream of this device, which outlives the call.
        let stream = unsafe { gpu.borrow_stream(raw_stream as flashattn::cuda::cudarc::driver::sys::CUstream) };
        Ok((gpu, stream))
    }

    pub(super) fn forward(
        py: Python<'_>,
        (ordinal, raw_stream): (usize, usize),
        [q, k, v]: [&Tensor; 3],
        out: &Tensor,
        lse: &Tensor,
        o: &Options,
        alloc: Option<Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let (gpu, stream) = open(ordinal, raw_stream).map_err(to_py)?;
        let [q, k, v, out, lse] = views([("q", q), ("k", k), ("v", v), ("out", out), ("lse", lse)])?;
        let extras = Extras::new(o).map_err(to_py)?;
        let opts = o.attn();
        let args = ForwardArgs { q: &q, k: &k, v: &v, out: &out, lse: &lse, opts: &opts, device: extras.inputs() };
        with_allocator(py, alloc, |ws| gpu.launch_forward_with(&stream, &args, ws))
    }

    pub(super) fn backward(
        py: Python<'_>,
        (ordinal, raw_stream): (usize, usize),
        inputs: [&Tensor; 6],
        grads: [&Tensor; 3],
        o: &Options,
        alloc: Option<Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let (gpu, stream) = open(ordinal, raw_stream).map_err(to_py)?;
        let [q, k, v, out, lse, dout] = inputs;
        let [q, k, v, out, lse, dout] =
            views([("q", q), ("k", k), ("v", v), ("out", out), ("lse", lse), ("dout", dout)])?;
        let [dq, dk, dv] = views([("dq", grads[0]), ("dk", grads[1]), ("dv", grads[2])])?;
        let extras = Extras::new(o).map_err(to_py)?;
        let opts = o.attn();
        let args = BackwardArgs {
            q: &q,
            k: &k,
            v: &v,
            o: &out,
            lse: &lse,
            dout: &dout,
            dq: &dq,
            dk: &dk,
            dv: &dv,
            opts: &opts,
            device: extras.inputs(),
        };
        with_allocator(py, alloc, |ws| gpu.launch_backward_with(&stream, &args, ws))
    }

    pub(super) fn decode(
        py: Python<'_>,
        (ordinal, raw_stream): (usize, usize),
        c: &Cache,
        (out, lse): (&Tensor, &Tensor),
        o: &Options,
        num_splits: usize,
        alloc: Option<Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let (gpu, stream) = open(ordinal, raw_stream).map_err(to_py)?;
        let [q, k_cache, v_cache, seqlens, out, lse] = views([
            ("q", &c.q),
            ("k_cache", &c.k),
            ("v_cache", &c.v),
            ("cache_seqlens", &c.seqlens),
            ("out", out),
            ("lse", lse),
        ])?;
        let table = c.table.as_ref().map(|t| view("block_table", t)).transpose().map_err(to_py)?;
        let new = match &c.new {
            Some((k, v)) => Some(views([("k", k), ("v", v)])?),
            None => None,
        };
        let alibi = o.alibi_slopes.as_ref().map(|t| view("alibi_slopes", t)).transpose().map_err(to_py)?;
        let opts = o.attn();
        let args = DecodeArgs {
            q: &q,
            k_cache: &k_cache,
            v_cache: &v_cache,
            cache_seqlens: &seqlens,
            block_table: table.as_ref(),
            new: new.as_ref().map(|[k, v]| (k, v)),
            out: &out,
            lse: &lse,
            opts: &opts,
            alibi_slopes: alibi.as_ref(),
            num_splits,
        };
        with_allocator(py, alloc, |ws| gpu.launch_decode_with(&stream, &args, ws))
    }
}
