//! Every argument check of the borrowed API, written once: a view's memory (null, alignment, device, extent),
//! element types, shapes, aliasing between outputs and inputs, and the workspace.

use super::gpu::Gpu;
use super::tensor::{DeviceDType, DeviceView, Workspace};
use crate::error::{AttnError, Result};
use crate::tensor::TensorLayout;
use cudarc::driver::{sys, CudaStream};

/// A view whose memory was checked: it lies in an allocation of the call's GPU, with `avail` elements from its
/// address to the allocation's end (so shape and strides can be checked against them).
pub(crate) struct Checked<'a> {
    pub view: &'a DeviceView,
    avail: usize,
}

impl TensorLayout for Checked<'_> {
    fn shape(&self) -> &[usize] {
        &self.view.shape
    }
    fn strides(&self) -> &[usize] {
        &self.view.strides
    }
    fn buffer_len(&self) -> usize {
        self.avail
    }
}

impl<'a> Checked<'a> {
    /// The view's address: device memory of `gpu`, non-null, aligned to `align` bytes, of element type `dtype`.
    pub fn new(gpu: &Gpu, name: &'static str, view: &'a DeviceView, dtype: DeviceDType, align: u64) -> Result<Self> {
        if view.dtype != dtype {
            return Err(AttnError::Unsupported {
                what: format!("{name} in {}", view.dtype),
                why: format!("expected {dtype}"),
            });
        }
        if view.shape.len() != view.strides.len() {
            let problem = format!("{} dimensions but {} strides", view.shape.len(), view.strides.len());
            return Err(stride_error(name, view, problem, 0));
        }
        let pointer = |problem: String| AttnError::Pointer { tensor: name, problem };
        if view.numel() == 0 {
            return Ok(Checked { view, avail: 0 });
        }
        if view.ptr == 0 {
            return Err(pointer("null device pointer".into()));
        }
        if !view.ptr.is_multiple_of(align) {
            return Err(pointer(format!("address {:#x} is not a multiple of {align} bytes", view.ptr)));
        }
        let (start, size) = allocation(gpu, view.ptr).map_err(pointer)?;
        let avail = (start + size - view.ptr) as usize / dtype.size_bytes();
        Ok(Checked { view, avail })
    }

    /// Every element the shape and strides reach lies inside the allocation (offsets that overflow included).
    pub fn in_bounds(&self, name: &'static str) -> Result<&Self> {
        if self.view.numel() == 0 {
            return Ok(self);
        }
        match self.last_offset() {
            Some(last) if last < self.avail => Ok(self),
            Some(last) => Err(stride_error(
                name,
                self.view,
                format!("the last element, at offset {last}, lies past the end of its allocation"),
                self.avail,
            )),
            None => Err(stride_error(name, self.view, "offsets overflow".into(), self.avail)),
        }
    }

    /// The shape is `shape` and the layout contiguous (outputs, the log-sum-exp, offsets and slopes).
    pub fn contiguous(&self, name: &'static str, shape: &[usize]) -> Result<&Self> {
        if self.view.shape != shape || !self.view.is_contiguous() {
            return Err(AttnError::Shape {
                tensor: name,
                expected: format!("a contiguous {} tensor of shape {shape:?}", self.view.dtype),
                got: self.view.shape.clone(),
            });
        }
        self.in_bounds(name)
    }

    fn last_offset(&self) -> Option<usize> {
        let v = self.view;
        v.shape.iter().zip(&v.strides).try_fold(0usize, |acc, (&n, &s)| (n - 1).checked_mul(s)?.checked_add(acc))
    }

    /// The bytes from the first element to one past the last (empty for an empty tensor).
    fn extent(&self) -> std::ops::Range<u64> {
        match (self.view.numel(), self.last_offset()) {
            (0, _) | (_, None) => 0..0,
            (_, Some(last)) => self.view.ptr..self.view.ptr + ((last + 1) * self.view.dtype.size_bytes()) as u64,
        }
    }
}

/// The start and size of the allocation holding `ptr`, which must be device memory of `gpu`.
fn allocation(gpu: &Gpu, ptr: u64) -> std::result::Result<(u64, u64), String> {
    use sys::CUpointer_attribute as P;
    let mut memory_type: u32 = 0;
    let mut ordinal: i32 = -1;
    let (mut start, mut size): (u64, usize) = (0, 0);
    let mut attrs = [
        P::CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
        P::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
        P::CU_POINTER_ATTRIBUTE_RANGE_START_ADDR,
        P::CU_POINTER_ATTRIBUTE_RANGE_SIZE,
    ];
    let mut data: [*mut std::ffi::c_void; 4] = [
        (&mut memory_type) as *mut u32 as _,
        (&mut ordinal) as *mut i32 as _,
        (&mut start) as *mut u64 as _,
        (&mut size) as *mut usize as _,
    ];
    gpu.ctx.bind_to_thread().map_err(|e| e.to_string())?;
    // SAFETY: each data pointer points at a value of the attribute's documented type; the driver writes only those.
    let r = unsafe { sys::cuPointerGetAttributes(attrs.len() as u32, attrs.as_mut_ptr(), data.as_mut_ptr(), ptr) };
    if r != sys::CUresult::CUDA_SUCCESS {
        return Err(format!("address {ptr:#x} is not memory the CUDA driver knows ({r:?})"));
    }
    if memory_type != sys::CUmemorytype::CU_MEMORYTYPE_DEVICE as u32 || start == 0 {
        return Err(format!("address {ptr:#x} is not device memory"));
    }
    if ordinal != gpu.ordinal as i32 {
        return Err(format!("address {ptr:#x} is memory of GPU {ordinal}, the call runs on GPU {}", gpu.ordinal));
    }
    Ok((start, size as u64))
}

fn stride_error(name: &'static str, v: &DeviceView, problem: String, avail: usize) -> AttnError {
    AttnError::Stride { tensor: name, problem, shape: v.shape.clone(), strides: v.strides.clone(), len: avail }
}

/// The element type of a call's kernels, from q's: f16 or bf16.
pub(crate) fn kernel_dtype(q: &DeviceView) -> Result<crate::DType> {
    match q.dtype {
        DeviceDType::F16 => Ok(crate::DType::F16),
        DeviceDType::BF16 => Ok(crate::DType::BF16),
        other => Err(AttnError::Unsupported {
            what: format!("q in {other}"),
            why: "the GPU kernels take f16 or bf16".into(),
        }),
    }
}

/// ALiBi slopes on the device: f32, contiguous, (heads_q) or (batch, heads_q). Returns the checked view and the
/// kernels' batch stride of the slopes (0 when one set serves every sequence).
pub(crate) fn alibi_slopes<'a>(
    gpu: &Gpu,
    slopes: &'a DeviceView,
    batch: usize,
    heads_q: usize,
) -> Result<(Checked<'a>, i32)> {
    let c = Checked::new(gpu, "alibi_slopes", slopes, DeviceDType::F32, 4)?;
    let per_seq = slopes.shape.len() == 2;
    c.contiguous("alibi_slopes", &if per_seq { vec![batch, heads_q] } else { vec![heads_q] })?;
    Ok((c, if per_seq { heads_q as i32 } else { 0 }))
}

/// No output shares memory with an input or another output.
pub(crate) fn no_overlap(outputs: &[(&'static str, &Checked)], inputs: &[(&'static str, &Checked)]) -> Result<()> {
    let meet = |a: &std::ops::Range<u64>, b: &std::ops::Range<u64>| a.start < b.end && b.start < a.end;
    for (i, (name, out)) in outputs.iter().enumerate() {
        let others = outputs[i + 1..].iter().chain(inputs);
        if let Some((other, _)) = others.into_iter().find(|(_, t)| meet(&out.extent(), &t.extent())) {
            return Err(AttnError::Overlap { output: name, other });
        }
    }
    Ok(())
}

/// 16-byte copies need every stride but the last (and so every row) in whole multiples of 8 elements.
pub(crate) fn rows_aligned(name: &'static str, shape: &[usize], strides: &[usize], len: usize) -> Result<()> {
    let r = strides.len();
    if strides[..r - 1].iter().any(|s| s % 8 != 0) {
        return Err(AttnError::Stride {
            tensor: name,
            problem: "on CUDA every stride but the last must be a multiple of 8 elements (16 bytes)".into(),
            shape: shape.to_vec(),
            strides: strides.to_vec(),
            len,
        });
    }
    Ok(())
}

/// The stream belongs to the GPU's primary context.
pub(crate) fn stream_of(gpu: &Gpu, stream: &CudaStream) -> Result<()> {
    if stream.context().cu_ctx() != gpu.ctx.cu_ctx() {
        return Err(AttnError::Cuda(format!(
            "the stream belongs to another CUDA context than GPU {}'s primary context",
            gpu.ordinal
        )));
    }
    Ok(())
}

/// A caller's workspace holds `needed` bytes at a 256-byte aligned address of the GPU.
pub(crate) fn workspace(gpu: &Gpu, ws: &Workspace, needed: usize) -> Result<()> {
    if ws.bytes < needed {
        return Err(AttnError::Workspace { needed, given: ws.bytes });
    }
    if needed == 0 {
        return Ok(());
    }
    let pointer = |problem: String| AttnError::Pointer { tensor: "workspace", problem };
    if !ws.ptr.is_multiple_of(256) {
        return Err(pointer(format!("address {:#x} is not a multiple of 256 bytes", ws.ptr)));
    }
    let (start, size) = allocation(gpu, ws.ptr).map_err(pointer)?;
    if ws.ptr + needed as u64 > start + size {
        return Err(pointer(format!("{needed} bytes from {:#x} run past the end of its allocation", ws.ptr)));
    }
    Ok(())
}

/// An owned tensor laid out for the kernels: every stride but the last a multiple of 8 elements.
pub(crate) fn owned_aligned(name: &'static str, t: &super::tensor::DeviceTensor) -> Result<()> {
    rows_aligned(name, &t.shape, &t.strides, t.buf.len())
}

/// An owned input that must be laid out like q: q's shape, valid aligned strides, q's element type.
pub(crate) fn owned_like_q(
    plan: &crate::problem::Plan,
    name: &'static str,
    t: &super::tensor::DeviceTensor,
) -> Result<()> {
    plan.check_like_q(name, t)?;
    if t.dtype != plan.dtype() {
        return Err(AttnError::Unsupported {
            what: format!("{name} in {}", t.dtype),
            why: format!("q is {}", plan.dtype()),
        });
    }
    owned_aligned(name, t)
}

/// An owned output: contiguous, of `shape` and `dtype`.
pub(crate) fn owned_output(
    name: &'static str,
    t: &super::tensor::DeviceTensor,
    shape: &[usize],
    dtype: crate::DType,
) -> Result<()> {
    if t.shape != shape || !t.is_contiguous() || t.dtype != dtype {
        return Err(AttnError::Shape {
            tensor: name,
            expected: format!("a contiguous {dtype} tensor of shape {shape:?}"),
            got: t.shape.clone(),
        });
    }
    Ok(())
}
