//! NVRTC compilation units (a kernel variant, or an auxiliary module for one element type), and the checks that
//! compile all of them without a GPU: the report of `flashattn kernels` and the cache warm-up.

use super::compile::{self, Source};
use super::kernels::{self, Budget, Variant};
use crate::dtype::DType;
use crate::error::Result;

/// One NVRTC compilation.
pub(crate) struct Unit {
    pub name: String,
    pub source: Source,
    pub defines: Vec<String>,
    /// An architecture-specific target ("sm_90a") instead of the GPU's own.
    target: Option<&'static str>,
    /// The attention kernel of a variant (held to no spills); None for auxiliary modules.
    main: Option<&'static str>,
    /// The variant's shared memory and the budget it must fit: its own, or the architecture's.
    smem: Option<(usize, Budget)>,
}

impl Unit {
    pub fn variant(v: &Variant) -> Self {
        Unit {
            name: v.name(),
            source: v.source(),
            defines: v.defines(),
            target: v.target_arch(),
            main: Some(v.kernel_name()),
            smem: Some((v.smem_bytes(), v.budget)),
        }
    }

    pub fn aux(name: &str, source: &'static str, dtype: DType) -> Self {
        Unit {
            name: format!("{name}-{dtype}"),
            source: Source { main: source, headers: kernels::headers() },
            defines: vec![kernels::elem_define(dtype)],
            target: None,
            main: None,
            smem: None,
        }
    }

    pub fn arch<'a>(&'a self, gpu_arch: &'a str) -> &'a str {
        self.target.unwrap_or(gpu_arch)
    }

    /// Every unit a GPU of `arch` may load.
    fn all(arch: &str) -> Vec<Unit> {
        let mut units: Vec<Unit> = Variant::all(arch).iter().map(Unit::variant).collect();
        for &(name, source) in crate::CUDA_AUX_MODULES {
            units.extend([DType::BF16, DType::F16].map(|dtype| Unit::aux(name, source, dtype)));
        }
        units
    }
}

/// One compiled unit's report: its name, the architecture it was compiled for, its attention kernel (None for
/// auxiliary modules) and ptxas' resources for each of its kernels.
pub struct UnitReport<'a> {
    pub name: &'a str,
    pub arch: &'a str,
    pub main: Option<&'static str>,
    pub resources: Vec<compile::Resources>,
    /// The main kernel's dynamic shared memory and the most it may have: the variant's budget or, for variants
    /// with the default tiles, the architecture's (its GPUs' opt-in limit).
    pub smem: Option<(usize, usize)>,
}

/// Compiles every kernel unit for `arch` (no GPU needed), or those whose names contain `only`, in parallel, with
/// ptxas' resource report; calls `on_unit` in order with each unit's report. Errors on a failed compilation.
pub fn check_kernels(arch: &str, only: Option<&str>, mut on_unit: impl FnMut(UnitReport)) -> Result<()> {
    use rayon::prelude::*;
    let mut units = Unit::all(arch);
    units.retain(|u| only.is_none_or(|o| u.name.contains(o)));
    let reports: Vec<Result<Vec<compile::Resources>>> = units
        .par_iter()
        .map(|u| {
            compile::compile(&u.name, &u.source, u.arch(arch), &u.defines, true)
                .map(|c| compile::parse_resources(&c.log))
        })
        .collect();
    for (u, r) in units.iter().zip(reports) {
        let smem = u.smem.map(|(bytes, budget)| (bytes, budget.min(Budget::of_arch(arch)).bytes()));
        on_unit(UnitReport { name: &u.name, arch: u.arch(arch), main: u.main, resources: r?, smem });
    }
    Ok(())
}

/// Compiles every kernel unit for `arch` into the disk cache, in parallel; returns how many were compiled (the
/// rest were cached already).
pub fn warm_cache(arch: &str) -> Result<usize> {
    use rayon::prelude::*;
    let compiled: Result<Vec<bool>> = Unit::all(arch)
        .par_iter()
        .map(|u| compile::compile(&u.name, &u.source, u.arch(arch), &u.defines, false).map(|c| !c.cached))
        .collect();
    Ok(compiled?.into_iter().filter(|&fresh| fresh).count())
}
