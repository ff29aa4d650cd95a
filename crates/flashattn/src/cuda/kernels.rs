//! The kernel variants of the portable (sm_80+) family: which source, which defines, which tiles.

use crate::dtype::DType;
use crate::error::{AttnError, Result};

pub(crate) const COMMON: &str = include_str!("kernels/common.cuh");
const FWD: &str = include_str!("kernels/flash_fwd.cu");
const BWD: &str = include_str!("kernels/flash_bwd.cu");

/// Largest head dimension the kernels take.
pub const MAX_HEAD_DIM: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Pass {
    Forward,
    Backward,
}

/// One compiled kernel module: pass, element type, padded head dimension and the two masking switches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Variant {
    pub pass: Pass,
    pub dtype: DType,
    /// Head dimension rounded up to a multiple of 32 (the tile width).
    pub hdim: usize,
    /// Causal or sliding-window mask (per-block key ranges and masking of boundary blocks).
    pub masked: bool,
    /// Scores transformed beyond the scale: softcap, ALiBi or a non-positive scale.
    pub has_mod: bool,
    /// Compiled for sm_90 or newer (the backward stages dQ in shared memory for bulk reductions).
    pub sm90: bool,
}

/// Forward tiles: query rows per CTA, key rows per shared-memory block, keys per softmax sub-block, warps, and
/// the unrolling of the Q K^T loop (0: full).
pub struct FwdTiles {
    pub block_m: usize,
    pub block_n: usize,
    pub sub_n: usize,
    pub warps: usize,
    pub s_unroll: usize,
}

/// Backward tiles: query rows per step and per register-bound sub-step, warps, and warps sharing a key group
/// (splitting dK/dV columns).
pub struct BwdTiles {
    pub block_m: usize,
    pub sub_m: usize,
    pub warps: usize,
    pub warps_d: usize,
}

impl BwdTiles {
    /// Keys per CTA: 16 per key group.
    pub fn block_n(&self) -> usize {
        16 * self.warps / self.warps_d
    }

    /// Warps sharing one 16-query group of the dQ product, each taking whole 16-column pairs of `hdim`: the
    /// largest divisor of hdim / 16 the warps allow.
    pub fn dq_parts(&self, hdim: usize) -> usize {
        let most = self.warps / (self.block_m / 16);
        (1..=most).rev().find(|p| (hdim / 16).is_multiple_of(*p)).unwrap_or(1)
    }
}

/// The padded head dimension for `d`, or why the kernels cannot take it.
pub fn padded_head_dim(d: usize) -> Result<usize> {
    if d == 0 || !d.is_multiple_of(8) || d > MAX_HEAD_DIM {
        return Err(AttnError::HeadDim { got: d, expected: format!("a multiple of 8 up to {MAX_HEAD_DIM} on CUDA") });
    }
    Ok(d.div_ceil(32) * 32)
}

/// Tile overrides for kernel tuning, from the environment:
/// `FLASHATTN_FWD_TILES=block_m,block_n,sub_n,warps,s_unroll`
/// and `FLASHATTN_BWD_TILES=block_m,sub_m,warps,warps_d` (every variant takes them; unset in normal use).
/// Read once per process: a loaded kernel must be launched with the geometry it was compiled for.
fn tile_override(pass: Pass) -> Option<&'static [usize]> {
    static OVERRIDES: std::sync::OnceLock<[Option<Vec<usize>>; 2]> = std::sync::OnceLock::new();
    let read = |var: &str| -> Option<Vec<usize>> {
        let v: Vec<usize> = std::env::var(var).ok()?.split(',').filter_map(|x| x.trim().parse().ok()).collect();
        (!v.is_empty()).then_some(v)
    };
    let o = OVERRIDES.get_or_init(|| [read("FLASHATTN_FWD_TILES"), read("FLASHATTN_BWD_TILES")]);
    o[(pass == Pass::Backward) as usize].as_deref()
}

/// The define that selects the element type.
pub fn elem_define(dtype: DType) -> String {
    format!("-DELEM_BF16={}", (dtype == DType::BF16) as u8)
}

impl Variant {
    pub fn fwd_tiles(&self) -> FwdTiles {
        if let Some(&[block_m, block_n, sub_n, warps, s_unroll]) = tile_override(Pass::Forward) {
            return FwdTiles { block_m, block_n, sub_n, warps, s_unroll };
        }
        let t = |block_m, block_n, sub_n, s_unroll| FwdTiles { block_m, block_n, sub_n, warps: 4, s_unroll };
        match (self.hdim, self.sm90, self.masked, self.has_mod) {
            (0..=64, ..) => t(128, 128, 64, 0),
            // Head dim 128 at the register limit: on sm_90, softmax over whole 64-key blocks (10% faster than
            // 32-key sub-blocks) where ptxas fits it without spills, with the unrolling that makes it fit; the
            // kernel check in CI holds every variant to that.
            (97..=128, true, true, _) => t(128, 64, 64, 8),
            (97..=128, true, false, false) => t(128, 64, 64, 4),
            (65..=128, ..) => t(128, 64, 32, 0),
            _ => t(64, 32, 32, 0),
        }
    }

    pub fn bwd_tiles(&self) -> BwdTiles {
        if let Some(&[block_m, sub_m, warps, warps_d]) = tile_override(Pass::Backward) {
            return BwdTiles { block_m, sub_m, warps, warps_d };
        }
        match self.hdim {
            // Query steps as long as the shared memory allows (fewer barriers and dQ reductions per key), in
            // sub-steps as long as the registers allow (measured on the H200: 128/64 is 27% faster than 64/64 at
            // d = 64, 64/32 24% faster than 32/32 at d = 128).
            0..=64 => BwdTiles { block_m: 128, sub_m: 64, warps: 8, warps_d: 1 },
            65..=96 => BwdTiles { block_m: 64, sub_m: 64, warps: 8, warps_d: 1 },
            97..=128 => BwdTiles { block_m: 64, sub_m: 32, warps: 8, warps_d: 1 },
            _ => BwdTiles { block_m: 32, sub_m: 32, warps: 8, warps_d: 2 },
        }
    }

    pub fn threads(&self) -> u32 {
        32 * match self.pass {
            Pass::Forward => self.fwd_tiles().warps,
            Pass::Backward => self.bwd_tiles().warps,
        } as u32
    }

    /// Dynamic shared memory of the main kernel, in bytes (tiles' rows are padded by 8 elements).
    pub fn smem_bytes(&self) -> usize {
        let row = (self.hdim + 8) * 2;
        match self.pass {
            Pass::Forward => {
                let t = self.fwd_tiles();
                // Q, two K buffers, V.
                (t.block_m + 3 * t.block_n) * row
            }
            Pass::Backward => {
                let t = self.bwd_tiles();
                let n = t.block_n();
                // K, V; Q and dO twice; dS; lse and D twice; on sm_90 the dQ staging tile (f32, rows padded by 8).
                let staging = if self.sm90 { t.block_m * (self.hdim + 8) * 4 } else { 0 };
                (2 * n + 4 * t.block_m) * row + n * (t.block_m + 8) * 2 + 4 * t.block_m * 4 + staging
            }
        }
    }

    /// A readable name: "fwd-bf16-d128-masked-mod".
    pub fn name(&self) -> String {
        let pass = match self.pass {
            Pass::Forward => "fwd",
            Pass::Backward => "bwd",
        };
        let mut name = format!("{pass}-{}-d{}", self.dtype, self.hdim);
        if self.masked {
            name.push_str("-masked");
        }
        if self.has_mod {
            name.push_str("-mod");
        }
        name
    }

    /// The full source: the common header and the pass's kernels.
    pub fn source(&self) -> String {
        let body = match self.pass {
            Pass::Forward => FWD,
            Pass::Backward => BWD,
        };
        format!("{COMMON}\n{body}")
    }

    /// NVRTC options: the defines that select this variant.
    pub fn defines(&self) -> Vec<String> {
        let mut d = vec![
            elem_define(self.dtype),
            format!("-DHDIM={}", self.hdim),
            format!("-DIS_MASKED={}", self.masked as u8),
            format!("-DHAS_MOD={}", self.has_mod as u8),
        ];
        match self.pass {
            Pass::Forward => {
                let t = self.fwd_tiles();
                d.extend([
                    format!("-DBLOCK_M={}", t.block_m),
                    format!("-DBLOCK_N={}", t.block_n),
                    format!("-DSUB_N={}", t.sub_n),
                    format!("-DNWARPS={}", t.warps),
                ]);
                if t.s_unroll > 0 {
                    d.push(format!("-DS_UNROLL={}", t.s_unroll));
                }
            }
            Pass::Backward => {
                let t = self.bwd_tiles();
                d.extend([
                    format!("-DBLOCK_M={}", t.block_m),
                    format!("-DSUB_M={}", t.sub_m),
                    format!("-DNWARPS={}", t.warps),
                    format!("-DWARPS_D={}", t.warps_d),
                    format!("-DDQ_PARTS={}", t.dq_parts(self.hdim)),
                ]);
            }
        }
        d
    }

    /// Every variant for an architecture ("sm_80", "sm_90", ...): both passes, both 16-bit types, every padded
    /// head dimension, every switch.
    pub fn all(arch: &str) -> Vec<Variant> {
        let sm90 = arch.trim_start_matches("sm_").trim_end_matches('a').parse::<u32>().is_ok_and(|a| a >= 90);
        let mut v = Vec::new();
        for pass in [Pass::Forward, Pass::Backward] {
            for dtype in [DType::BF16, DType::F16] {
                for hdim in (32..=MAX_HEAD_DIM).step_by(32) {
                    for masked in [false, true] {
                        for has_mod in [false, true] {
                            v.push(Variant { pass, dtype, hdim, masked, has_mod, sm90 });
                        }
                    }
                }
            }
        }
        v
    }
}
