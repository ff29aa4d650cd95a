//! The one place that chooses a kernel: (GPU architecture, pass, problem) -> variant.

use super::kernels::{self, Family, Pass, Variant};
use super::tuning::portable_forced;
use crate::dtype::DType;
use crate::error::Result;
use crate::problem::Plan;

/// The variant for a planned problem.
pub(crate) fn for_plan(arch: (i32, i32), pass: Pass, plan: &Plan) -> Result<Variant> {
    let len_q = plan.len_q.iter().copied().max().unwrap_or(0);
    variant(arch, pass, plan.dtype(), plan.head_dim, len_q, plan.mask.masked(), plan.mask.modifies_scores())
}

/// The Hopper family on sm_90 where it takes the head dim, unless `FLASHATTN_GPU_KERNELS=portable`; else the
/// portable one. `len_q`: the longest sequence's query rows.
pub(crate) fn variant(
    arch: (i32, i32),
    pass: Pass,
    dtype: DType,
    head_dim: usize,
    len_q: usize,
    masked: bool,
    has_mod: bool,
) -> Result<Variant> {
    let hdim = kernels::padded_head_dim(head_dim)?;
    let sm90 = arch.0 >= 9;
    let portable = Variant { family: Family::Portable, pass, dtype, hdim, masked, has_mod, sm90, long: false };
    match kernels::hopper_head_dim(head_dim, pass) {
        Some(hdim) if arch == (9, 0) && !portable_forced() => {
            Ok(Variant { family: Family::Hopper, hdim, ..portable }.for_queries(len_q))
        }
        _ => Ok(portable),
    }
}

/// The decode variant for `rows` query rows per KV head (new queries x query heads per KV head).
pub(crate) fn decode(arch: (i32, i32), dtype: DType, head_dim: usize, rows: usize) -> Result<Variant> {
    let hdim = kernels::padded_head_dim(head_dim)?;
    Ok(Variant::decode(dtype, hdim, arch.0 >= 9, rows))
}
