//! Tensor maps for Hopper's copy engine (TMA): how a kernel finds a tile of a tensor in global memory.

use super::params::strides3;
use super::tensor::DeviceView;
use crate::dtype::DType;
use crate::error::{AttnError, Result};
use crate::problem::Plan;
use cudarc::driver::sys;

/// A CUtensorMap (128 bytes, 64-byte aligned), passed to kernels by value.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub(crate) struct TmaMap([u64; 16]);

// SAFETY: an opaque block of bytes the driver filled in, passed by value as a kernel argument.
unsafe impl cudarc::driver::DeviceRepr for TmaMap {}

/// The element types a map can read: the inputs' 16-bit ones, and f32 (the backward's dQ accumulator).
#[derive(Clone, Copy)]
pub(crate) enum Elem {
    Half(DType),
    F32,
}

/// Where a (batch, rows, heads, head_dim) tensor lies: its address, its sizes and its element strides (batch,
/// row, head); the last dimension is contiguous.
pub(crate) struct Layout {
    pub ptr: u64,
    pub head_dim: usize,
    pub rows: usize,
    pub heads: usize,
    pub batch: usize,
    pub strides: (i64, i64, i64),
}

/// The map of `t` in boxes of 128 bytes of columns (64 16-bit elements or 32 floats) x `box_rows` rows, laid out
/// in shared memory with the 128-byte swizzle that wgmma reads; reads past the tensor's edges fill zeros, writes
/// there are dropped.
pub(crate) fn tile_map(t: &Layout, elem: Elem, box_rows: usize) -> Result<TmaMap> {
    let (batch_stride, row_stride, head_stride) = t.strides;
    // A batch of one (variable-length batches) has no batch stride, and a contiguous tensor with no rows has a
    // zero one: TMA wants a positive multiple of 16 bytes, and any will do since no box reads or reduces there.
    let batch_stride = if t.batch == 1 || batch_stride == 0 { row_stride * t.rows.max(1) as i64 } else { batch_stride };
    let dims = [t.head_dim, t.rows, t.heads, t.batch].map(|d| d as u64);
    use sys::CUtensorMapDataType as T;
    let (data_type, bytes) = match elem {
        Elem::Half(DType::BF16) => (T::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2),
        Elem::Half(_) => (T::CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 2),
        Elem::F32 => (T::CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 4),
    };
    let strides = [row_stride, head_stride, batch_stride].map(|s| bytes * s as u64);
    let boxes: [u32; 4] = [128 / bytes as u32, box_rows as u32, 1, 1];
    let unit = [1u32; 4];
    let mut map = std::mem::MaybeUninit::<sys::CUtensorMap>::uninit();
    // SAFETY: every array has the rank's length (strides one less); the map is written by the driver.
    let r = unsafe {
        sys::cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            data_type,
            4,
            t.ptr as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            unit.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    if r != sys::CUresult::CUDA_SUCCESS {
        return Err(AttnError::Cuda(format!(
            "encoding a tensor map (sizes {dims:?}, byte strides {strides:?}) failed: {r:?}; \
             FLASHATTN_GPU_KERNELS=portable avoids the copy engine"
        )));
    }
    // SAFETY: the driver initialized the map; CUtensorMap is 128 plain bytes.
    Ok(unsafe { std::mem::transmute::<sys::CUtensorMap, TmaMap>(map.assume_init()) })
}

/// Which side of attention a tensor is on: its heads and sequence lengths are the queries' or the keys'.
#[derive(Clone, Copy)]
pub(crate) enum Side {
    Query,
    Key,
}

/// Where the rows of a (batch, rows, heads, head_dim) tensor on `side` lie, as a map sees them: per batch for
/// dense batches, all `varlen_tokens` as one batch for variable-length ones.
fn layout(
    plan: &Plan,
    side: Side,
    ptr: u64,
    varlen_tokens: usize,
    head_dim: usize,
    strides: (i64, i64, i64),
) -> Layout {
    let (heads, lens) = match side {
        Side::Query => (plan.heads_q, &plan.len_q),
        Side::Key => (plan.heads_kv, &plan.len_k),
    };
    let longest = lens.iter().copied().max().unwrap_or(0);
    let (rows, batch) = if plan.varlen { (varlen_tokens, 1) } else { (longest, plan.batch) };
    // A map cannot have an empty dimension; with no rows no copy is issued.
    Layout { ptr, head_dim, rows: rows.max(1), heads, batch, strides }
}

/// The map of a query-side (q, o, dout) or key-side (k, v) tensor, read in boxes of `box_rows` rows.
pub(crate) fn tensor_map(plan: &Plan, t: &DeviceView, side: Side, box_rows: usize) -> Result<TmaMap> {
    let layout = layout(plan, side, t.ptr, t.shape[0], plan.head_dim, strides3(&t.strides));
    tile_map(&layout, Elem::Half(plan.dtype()), box_rows)
}

/// The map of the backward's f32 dQ accumulator at `ptr`, (token, head_q, hdim), for reductions of 16-row boxes.
pub(crate) fn dq_accum_map(plan: &Plan, ptr: u64, tokens: usize, hdim: usize) -> Result<TmaMap> {
    let row = (plan.heads_q * hdim) as i64;
    let longest = plan.len_q.iter().copied().max().unwrap_or(0);
    let strides = (row * longest as i64, row, hdim as i64);
    tile_map(&layout(plan, Side::Query, ptr, tokens, hdim, strides), Elem::F32, 16)
}
