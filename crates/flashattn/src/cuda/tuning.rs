//! Every `FLASHATTN_*` override of the GPU backend, in one place. Each is read once per process (a loaded kernel
//! must be launched with the geometry it was compiled for) and is unset in normal use.

use std::sync::OnceLock;

/// `FLASHATTN_GPU_KERNELS=portable`: both passes on the portable family, also where the Hopper one would run.
pub(crate) fn portable_forced() -> bool {
    static FORCED: OnceLock<bool> = OnceLock::new();
    *FORCED.get_or_init(|| std::env::var("FLASHATTN_GPU_KERNELS").is_ok_and(|v| v == "portable"))
}

/// The kernels a tile override applies to (in the order of `tile_override`'s variables).
#[derive(Clone, Copy)]
pub(crate) enum Tuned {
    PortableForward,
    PortableBackward,
    HopperForward,
    HopperBackward,
}

/// Tile overrides for kernel tuning (every variant of the family takes them):
/// `FLASHATTN_FWD_TILES=block_m,block_n,sub_n,warps,s_unroll`, `FLASHATTN_BWD_TILES=block_m,sub_m,warps,warps_d`,
/// `FLASHATTN_SM90_TILES=consumers,block_n,stages[,cluster]` and `FLASHATTN_SM90_BWD_TILES=block_m`.
pub(crate) fn tile_override(family: Tuned) -> Option<&'static [usize]> {
    const VARS: [&str; 4] =
        ["FLASHATTN_FWD_TILES", "FLASHATTN_BWD_TILES", "FLASHATTN_SM90_TILES", "FLASHATTN_SM90_BWD_TILES"];
    static OVERRIDES: OnceLock<Vec<Option<Vec<usize>>>> = OnceLock::new();
    let read = |var: &str| -> Option<Vec<usize>> {
        let v: Vec<usize> = std::env::var(var).ok()?.split(',').filter_map(|x| x.trim().parse().ok()).collect();
        (!v.is_empty()).then_some(v)
    };
    OVERRIDES.get_or_init(|| VARS.iter().map(|v| read(v)).collect())[family as usize].as_deref()
}

/// Extra NVRTC defines for kernel experiments, from `FLASHATTN_KERNEL_DEFINES` (space-separated `NAME` or
/// `NAME=VALUE`, passed to every variant as `-DNAME...`). They are part of the options, so of the kernel cache's
/// key.
pub(crate) fn extra_defines() -> &'static [String] {
    static DEFINES: OnceLock<Vec<String>> = OnceLock::new();
    DEFINES.get_or_init(|| {
        let v = std::env::var("FLASHATTN_KERNEL_DEFINES").unwrap_or_default();
        v.split_whitespace().map(|d| format!("-D{d}")).collect()
    })
}

/// `FLASHATTN_CHECK_DEVICE_INPUTS=1`: the borrowed API copies sequence offsets back to the host and validates
/// them before launching (a debugging aid: it synchronizes the stream, so it cannot run under graph capture).
pub(crate) fn check_device_inputs() -> bool {
    static CHECK: OnceLock<bool> = OnceLock::new();
    *CHECK.get_or_init(|| std::env::var("FLASHATTN_CHECK_DEVICE_INPUTS").is_ok_and(|v| v == "1"))
}

/// `FLASHATTN_SMEM_LIMIT_KB=99` (or 163): tiles chosen as for a GPU with that much shared memory per block, and
/// kernels that need more refused, to test on one GPU the tables of others. Bytes.
pub(crate) fn smem_limit() -> Option<usize> {
    static LIMIT: OnceLock<Option<usize>> = OnceLock::new();
    *LIMIT
        .get_or_init(|| std::env::var("FLASHATTN_SMEM_LIMIT_KB").ok()?.trim().parse::<usize>().ok().map(|kb| kb << 10))
}
