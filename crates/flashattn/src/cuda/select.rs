//! The one place that chooses a kernel: (GPU architecture and shared-memory budget, pass, problem) -> variant.

use super::kernels::{self, Budget, Family, Pass, Variant};
use super::tuning::portable_forced;
use crate::dtype::DType;
use crate::error::Result;
use crate::problem::Plan;

/// The variant for a planned problem.
pub(crate) fn for_plan(arch: (i32, i32), budget: Budget, pass: Pass, plan: &Plan) -> Result<Variant> {
    let len_q = plan.len_q.iter().copied().max().unwrap_or(0);
    variant(arch, budget, pass, plan.dtype(), plan.head_dim, len_q, plan.mask.masked(), plan.mask.modifies_scores())
}

/// The Hopper family on sm_90 where it takes the head dim and fits the budget, unless
/// `FLASHATTN_GPU_KERNELS=portable`; else the portable one, with tiles for the budget. `len_q`: the longest
/// sequence's query rows.
#[allow(clippy::too_many_arguments)]
pub(crate) fn variant(
    arch: (i32, i32),
    budget: Budget,
    pass: Pass,
    dtype: DType,
    head_dim: usize,
    len_q: usize,
    masked: bool,
    has_mod: bool,
) -> Result<Variant> {
    let hdim = kernels::padded_head_dim(head_dim)?;
    let sm90 = kernels::sm90_features(arch.0);
    let free = Budget::Large;
    let portable =
        Variant { family: Family::Portable, pass, dtype, hdim, masked, has_mod, sm90, budget: free, long: false };
    if let Some(hdim) = kernels::hopper_head_dim(head_dim, pass).filter(|_| arch == (9, 0) && !portable_forced()) {
        let hopper = Variant { family: Family::Hopper, hdim, ..portable }.for_queries(len_q);
        if hopper.smem_bytes() <= budget.bytes() {
            return Ok(hopper);
        }
    }
    Ok(portable.within(budget))
}

/// The decode variant for `rows` query rows per KV head (new queries x query heads per KV head).
pub(crate) fn decode(arch: (i32, i32), budget: Budget, dtype: DType, head_dim: usize, rows: usize) -> Result<Variant> {
    let hdim = kernels::padded_head_dim(head_dim)?;
    Ok(Variant::decode(dtype, hdim, kernels::sm90_features(arch.0), rows).within(budget))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_capped_hopper_gpu_runs_the_portable_family_within_the_cap() {
        let pick = |budget, pass| variant((9, 0), budget, pass, DType::BF16, 128, 4096, false, false);
        assert_eq!(pick(Budget::Large, Pass::Forward).unwrap().family, Family::Hopper);
        for pass in [Pass::Forward, Pass::Backward] {
            for budget in [Budget::Small, Budget::Medium] {
                let v = pick(budget, pass).unwrap();
                assert_eq!(v.family, Family::Portable, "{pass:?} under {budget:?}");
                assert!(v.smem_bytes() <= budget.bytes(), "{} under {budget:?}", v.name());
            }
        }
    }
}
