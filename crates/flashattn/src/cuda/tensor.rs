//! Tensors in GPU memory: borrowed views (a device address with an element type, a shape and element strides),
//! the workspace a call may borrow, and owned buffers, which lend views of themselves.

use super::gpu::{driver_err, Gpu};
use crate::dtype::DType;
use crate::error::{AttnError, Result};
use crate::tensor::{contiguous_strides, TensorLayout};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use std::sync::Arc;

/// The element type of a device tensor: the attention tensors' f16 and bf16, f32 for the log-sum-exp and ALiBi
/// slopes, i32 for sequence offsets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeviceDType {
    F16,
    BF16,
    F32,
    I32,
}

impl DeviceDType {
    pub fn size_bytes(self) -> usize {
        match self {
            DeviceDType::F16 | DeviceDType::BF16 => 2,
            DeviceDType::F32 | DeviceDType::I32 => 4,
        }
    }
}

impl From<DType> for DeviceDType {
    fn from(d: DType) -> Self {
        match d {
            DType::F16 => DeviceDType::F16,
            DType::BF16 => DeviceDType::BF16,
            DType::F32 => DeviceDType::F32,
        }
    }
}

impl std::fmt::Display for DeviceDType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DeviceDType::F16 => "f16",
            DeviceDType::BF16 => "bf16",
            DeviceDType::F32 => "f32",
            DeviceDType::I32 => "i32",
        })
    }
}

/// A borrowed view of a tensor in the memory of one GPU: its address, element type, shape and element strides
/// (the last dimension contiguous). It owns nothing: memory belongs to the caller (a PyTorch or candle tensor,
/// a cudarc buffer) and must stay allocated until the work queued on it has run.
///
/// Every call checks what it can of a view before launching anything: that the address is device memory of the
/// call's GPU, 16-byte aligned where copies need it, and that every element the shape and strides reach lies
/// inside that allocation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceView {
    pub(crate) ptr: u64,
    pub(crate) dtype: DeviceDType,
    pub(crate) shape: Vec<usize>,
    pub(crate) strides: Vec<usize>,
}

impl DeviceView {
    /// A contiguous (row-major) view.
    ///
    /// # Safety
    /// `ptr` must stay a live device allocation (or null, which calls reject) for as long as work that reads or
    /// writes the view is queued; nothing else may write the elements a call reads while it runs.
    pub unsafe fn contiguous(ptr: u64, dtype: DeviceDType, shape: &[usize]) -> Self {
        // SAFETY: the caller's guarantee.
        unsafe { Self::strided(ptr, dtype, shape, &contiguous_strides(shape)) }
    }

    /// A view with explicit element strides (PyTorch's `tensor.stride()`).
    ///
    /// # Safety
    /// As [`DeviceView::contiguous`].
    pub unsafe fn strided(ptr: u64, dtype: DeviceDType, shape: &[usize], strides: &[usize]) -> Self {
        DeviceView { ptr, dtype, shape: shape.to_vec(), strides: strides.to_vec() }
    }

    /// A contiguous view of a cudarc buffer (whose elements are `dtype`'s size).
    pub fn of_slice<T>(slice: &CudaSlice<T>, stream: &CudaStream, dtype: DeviceDType, shape: &[usize]) -> Self {
        // SAFETY: the buffer is a live allocation; the borrow checker does not follow the view, as documented.
        unsafe { Self::contiguous(slice.device_ptr(stream).0, dtype, shape) }
    }

    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    pub fn dtype(&self) -> DeviceDType {
        self.dtype
    }
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn strides(&self) -> &[usize] {
        &self.strides
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub(crate) fn is_contiguous(&self) -> bool {
        self.strides == contiguous_strides(&self.shape)
    }
}

/// Scratch memory a call may use (see `Gpu::forward_workspace_bytes` and `Gpu::backward_workspace_bytes`): a
/// device address and its size in bytes, 256-byte aligned. A call zeroes what it needs on its stream; two calls
/// in flight at once need two workspaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Workspace {
    pub(crate) ptr: u64,
    pub(crate) bytes: usize,
}

impl Workspace {
    /// # Safety
    /// `ptr` must be device memory of at least `bytes` bytes, live and unused by others until the calls that
    /// use it have run.
    pub unsafe fn from_raw(ptr: u64, bytes: usize) -> Self {
        Workspace { ptr, bytes }
    }

    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// A workspace in a cudarc buffer.
    pub fn of_slice(slice: &mut CudaSlice<u8>, stream: &CudaStream) -> Self {
        let bytes = slice.len();
        Workspace { ptr: slice.device_ptr_mut(stream).0, bytes }
    }
}

/// A tensor of 16-bit elements in GPU memory, owned, with a shape and element strides (last dimension
/// contiguous). It lends a [`DeviceView`] of itself.
pub struct DeviceTensor {
    pub(crate) buf: CudaSlice<u16>,
    pub(crate) dtype: DType,
    pub(crate) shape: Vec<usize>,
    pub(crate) strides: Vec<usize>,
}

impl DeviceTensor {
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// A view of the whole tensor.
    pub fn view(&self) -> DeviceView {
        // SAFETY: the buffer is live while `self` is; with the context's event tracking off, the stream only
        // names the buffer's context.
        let ptr = self.buf.device_ptr(self.buf.stream()).0;
        DeviceView { ptr, dtype: self.dtype.into(), shape: self.shape.clone(), strides: self.strides.clone() }
    }
    pub(crate) fn ptr(&self, stream: &CudaStream) -> u64 {
        self.buf.device_ptr(stream).0
    }
    pub(crate) fn ptr_mut(&mut self, stream: &CudaStream) -> u64 {
        self.buf.device_ptr_mut(stream).0
    }
    pub(crate) fn is_contiguous(&self) -> bool {
        self.strides == contiguous_strides(&self.shape)
    }
}

impl TensorLayout for DeviceTensor {
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn strides(&self) -> &[usize] {
        &self.strides
    }
    fn buffer_len(&self) -> usize {
        self.buf.len()
    }
}

/// An f32 or i32 buffer owned by the library (log-sum-exp, offsets, slopes), with the view it lends.
pub(crate) fn view_of<T>(buf: &CudaSlice<T>, dtype: DeviceDType, shape: &[usize]) -> DeviceView {
    DeviceView::of_slice(buf, buf.stream(), dtype, shape)
}

impl Gpu {
    /// Copies a host tensor (f16 or bf16) to the GPU, contiguous.
    pub fn upload<T: crate::Element>(&self, t: &crate::TensorRef<T>) -> Result<DeviceTensor> {
        let dtype = gpu_dtype(T::DTYPE)?;
        let data = crate::tensor::row_major(t);
        // SAFETY: f16 and bf16 are 16-bit plain values; the slice is reinterpreted without changing its bytes.
        let bits: &[u16] = unsafe { std::slice::from_raw_parts(data.as_ptr() as *const u16, data.len()) };
        let buf = self.stream.clone_htod(bits).map_err(driver_err("copying to the GPU"))?;
        Ok(DeviceTensor { buf, dtype, shape: t.shape.clone(), strides: contiguous_strides(&t.shape) })
    }

    /// A zeroed contiguous tensor.
    pub fn zeros(&self, dtype: DType, shape: &[usize]) -> Result<DeviceTensor> {
        let dtype = gpu_dtype(dtype)?;
        let n = shape.iter().product::<usize>();
        let buf = self.stream.alloc_zeros::<u16>(n.max(1)).map_err(driver_err("allocating GPU memory"))?;
        Ok(DeviceTensor { buf, dtype, shape: shape.to_vec(), strides: contiguous_strides(shape) })
    }

    /// A zeroed f32 buffer (for the log-sum-exp).
    pub fn zeros_f32(&self, n: usize) -> Result<CudaSlice<f32>> {
        self.stream.alloc_zeros::<f32>(n.max(1)).map_err(driver_err("allocating GPU memory"))
    }

    /// Copies a contiguous device tensor back to the host.
    pub fn download<T: crate::Element>(&self, t: &DeviceTensor) -> Result<Vec<T>> {
        let mut out = vec![T::default(); t.shape.iter().product::<usize>()];
        self.download_into(t, &mut out)?;
        Ok(out)
    }

    /// Copies a contiguous device tensor into a host buffer of its element count.
    pub fn download_into<T: crate::Element>(&self, t: &DeviceTensor, dst: &mut [T]) -> Result<()> {
        if T::DTYPE != t.dtype {
            return Err(AttnError::Unsupported {
                what: format!("reading a {} tensor as {}", t.dtype, T::DTYPE),
                why: "the types differ".into(),
            });
        }
        let n = t.shape.iter().product::<usize>();
        if dst.len() != n {
            return Err(AttnError::shape("the download buffer", format!("{n} elements"), &[dst.len()]));
        }
        // SAFETY: T is f16 or bf16 (checked above: a device tensor is never f32), a 16-bit plain value; the slice
        // is reinterpreted without changing its bytes.
        let bits: &mut [u16] = unsafe { std::slice::from_raw_parts_mut(dst.as_mut_ptr() as *mut u16, n) };
        self.stream.memcpy_dtoh(&t.buf.slice(..n), bits).map_err(driver_err("copying from the GPU"))
    }

    /// Copies the first `n` elements of an f32 device buffer back to the host.
    pub fn download_f32(&self, buf: &CudaSlice<f32>, n: usize) -> Result<Vec<f32>> {
        let mut out = vec![0.0; n];
        self.stream.memcpy_dtoh(&buf.slice(..n), &mut out[..]).map_err(driver_err("copying from the GPU"))?;
        Ok(out)
    }
}

/// The 16-bit element types the kernels take.
fn gpu_dtype(dtype: DType) -> Result<DType> {
    if dtype == DType::F32 {
        return Err(AttnError::Unsupported {
            what: "f32 tensors on CUDA".into(),
            why: "the GPU kernels take f16 or bf16".into(),
        });
    }
    Ok(dtype)
}

/// A call's scratch memory: the caller's workspace, or a buffer allocated on the call's stream and freed in its
/// order when this is dropped (after the launches that use it are queued).
pub(crate) struct Scratch {
    pub ptr: u64,
    _owned: Option<CudaSlice<u8>>,
}

/// Where a call's scratch comes from.
pub enum WorkspaceFrom<'a> {
    /// Allocated on the call's stream, freed in its order.
    Stream,
    /// The caller's workspace, at least as large as the call needs.
    Given(Workspace),
    /// The caller's allocator (a framework's caching allocator, say), asked once the call's checks have passed
    /// for the bytes it needs (never for 0); the memory must stay allocated until the queued work has run.
    Allocator(&'a mut dyn FnMut(usize) -> Result<Workspace>),
}

impl From<Option<Workspace>> for WorkspaceFrom<'_> {
    fn from(workspace: Option<Workspace>) -> Self {
        workspace.map_or(WorkspaceFrom::Stream, WorkspaceFrom::Given)
    }
}

impl Gpu {
    /// `bytes` of scratch for a call on `stream`, from where `from` says.
    pub(crate) fn scratch(&self, stream: &Arc<CudaStream>, from: WorkspaceFrom, bytes: usize) -> Result<Scratch> {
        let given = match from {
            WorkspaceFrom::Given(ws) => Some(ws),
            WorkspaceFrom::Allocator(alloc) if bytes > 0 => Some(alloc(bytes)?),
            _ => None,
        };
        if let Some(ws) = given {
            super::checks::workspace(self, &ws, bytes)?;
            return Ok(Scratch { ptr: ws.ptr, _owned: None });
        }
        if bytes == 0 {
            return Ok(Scratch { ptr: 0, _owned: None });
        }
        // SAFETY: the calls zero what they read of their scratch before reading it.
        let mut buf = unsafe { stream.alloc::<u8>(bytes) }.map_err(driver_err("allocating the call's workspace"))?;
        let ptr = buf.device_ptr_mut(stream).0;
        Ok(Scratch { ptr, _owned: Some(buf) })
    }

    /// Zeroes `bytes` from `ptr`, in `stream`'s order.
    pub(crate) fn zero(&self, stream: &CudaStream, ptr: u64, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.ctx.bind_to_thread().map_err(driver_err("binding the context"))?;
        // SAFETY: `ptr` is scratch of at least `bytes` bytes (checked or allocated by `scratch`).
        unsafe { cudarc::driver::result::memset_d8_async(ptr, 0, bytes, stream.cu_stream()) }
            .map_err(driver_err("clearing the call's workspace"))
    }
}
