//! The kernel variants of the portable (sm_80+) family: which source, which defines, which tiles.

use crate::dtype::DType;
use crate::error::{AttnError, Result};

const COMMON: &str = include_str!("kernels/common.cuh");
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
}

/// Forward tiles: query rows per CTA, key rows per shared-memory block, keys per softmax sub-block, warps.
pub struct FwdTiles {
    pub block_m: usize,
    pub block_n: usize,
    pub sub_n: usize,
    pub warps: usize,
}

/// Backward tiles: query rows per step, warps, and warps sharing a key group (splitting dK/dV columns).
pub struct BwdTiles {
    pub block_m: usize,
    pub warps: usize,
    pub warps_d: usize,
}

impl BwdTiles {
    /// Keys per CTA: 16 per key group.
    pub fn block_n(&self) -> usize {
        16 * self.warps / self.warps_d
    }
}

/// The padded head dimension for `d`, or why the kernels cannot take it.
pub fn padded_head_dim(d: usize) -> Result<usize> {
    if d == 0 || !d.is_multiple_of(8) || d > MAX_HEAD_DIM {
        return Err(AttnError::HeadDim { got: d, expected: format!("a multiple of 8 up to {MAX_HEAD_DIM} on CUDA") });
    }
    Ok(d.div_ceil(32) * 32)
}

impl Variant {
    pub fn fwd_tiles(&self) -> FwdTiles {
        match self.hdim {
            0..=64 => FwdTiles { block_m: 128, block_n: 128, sub_n: 64, warps: 4 },
            65..=128 => FwdTiles { block_m: 128, block_n: 64, sub_n: 32, warps: 4 },
            _ => FwdTiles { block_m: 64, block_n: 32, sub_n: 32, warps: 4 },
        }
    }

    pub fn bwd_tiles(&self) -> BwdTiles {
        match self.hdim {
            // 32 query rows per step where 64 would not fit the registers.
            0..=96 => BwdTiles { block_m: 64, warps: 8, warps_d: 1 },
            97..=128 => BwdTiles { block_m: 32, warps: 8, warps_d: 1 },
            129..=224 => BwdTiles { block_m: 64, warps: 8, warps_d: 2 },
            _ => BwdTiles { block_m: 32, warps: 8, warps_d: 2 },
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
                (2 * n + 2 * t.block_m) * row + n * (t.block_m + 8) * 2 + 2 * t.block_m * 4
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
            format!("-DELEM_BF16={}", (self.dtype == DType::BF16) as u8),
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
            }
            Pass::Backward => {
                let t = self.bwd_tiles();
                d.extend([
                    format!("-DBLOCK_M={}", t.block_m),
                    format!("-DNWARPS={}", t.warps),
                    format!("-DWARPS_D={}", t.warps_d),
                ]);
            }
        }
        d
    }

    /// Every variant: both passes, both 16-bit types, every padded head dimension, every switch.
    pub fn all() -> Vec<Variant> {
        let mut v = Vec::new();
        for pass in [Pass::Forward, Pass::Backward] {
            for dtype in [DType::BF16, DType::F16] {
                for hdim in (32..=MAX_HEAD_DIM).step_by(32) {
                    for masked in [false, true] {
                        for has_mod in [false, true] {
                            v.push(Variant { pass, dtype, hdim, masked, has_mod });
                        }
                    }
                }
            }
        }
        v
    }
}
